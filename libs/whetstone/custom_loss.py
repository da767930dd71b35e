"""Server-side custom losses as data: the graph a client uploads and the rules it must obey.

tinker 0.38's ``ServiceClient.create_custom_loss(fn, input_ranks)`` traces a per-datum loss
``fn(logprobs, *inputs) -> (loss, {"custom/<name>:sum|mean": value})`` with torch.fx and, when the
client config says ``custom_loss_server_side``, uploads its nodes as plain data (protocol.md
§3.2, the SDK's ``custom_loss.encode_graph``). Nothing in a graph is executable: the trainer
(``services/trainer/custom_loss.py``) rebuilds it from its own table of operations, one entry per
name allowed here. This module is torch-free, so the gateway refuses a bad graph when it is
created (HTTP 400), and the same rules hold again wherever a command carrying one is decoded.

A graph may hold, in order:

* one ``placeholder`` per declared input, ``logprobs`` first (rank 1 or 2, the datum's
  ``target_tokens`` shape), then the ``loss_fn_inputs`` keys it reads with their ranks;
* ``call_function`` nodes naming a function of ``FUNCTIONS`` (Python operators, torch and
  torch.nn.functional math, ``getattr`` of an attribute in ``ATTRIBUTES`` only) and
  ``call_method`` nodes naming a tensor method of ``METHODS`` (nothing in place, nothing that
  leaves torch such as ``item`` or ``tolist``);
* one ``output`` node, last, returning ``(loss, {metric: value})``.

Arguments use the SDK's encoding (JSON scalars and lists, and one-key objects ``ref``, ``tuple``,
``dict``, ``slice``, ``ellipsis``, ``float``, ``dtype``); keyword names come from ``KWARGS`` and
dtypes from ``DTYPES``; a device, a layout or a memory format is refused, and so are ``get_attr``
(a captured tensor) and ``call_module``, as the SDK's own tracer does.
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

MAX_NODES = 1024
MAX_INPUTS = 16  # logprobs included, as the SDK allows
MAX_LIST = 64  # items in one encoded list, tuple or dict
MAX_DEPTH = 8  # nesting of encoded values
MAX_STRING = 64

INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# The SDK's rule: the custom/ prefix keeps a loss's metrics from shadowing the trainer's own.
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")

_OPERATORS = (
    "add sub mul truediv floordiv mod pow neg pos abs lt le gt ge eq ne and_ or_ xor invert "
    "getitem matmul"
)
_TORCH = (
    "abs add sub mul div true_divide neg pow square sqrt rsqrt exp exp2 expm1 log log2 log10 log1p "
    "sigmoid tanh relu sign clamp clip clamp_min clamp_max minimum maximum where min max amin "
    "amax sum mean prod cumsum logsumexp softmax log_softmax logaddexp lt le gt ge eq ne "
    "logical_and logical_or logical_not logical_xor isfinite isnan isinf nan_to_num zeros_like "
    "ones_like full_like stack cat gather masked_fill std var floor ceil round trunc reciprocal "
    "erf sin cos detach flatten reshape squeeze unsqueeze transpose matmul dot"
)
_FUNCTIONAL = (
    "relu softmax log_softmax silu mse_loss l1_loss smooth_l1_loss huber_loss kl_div "
    "binary_cross_entropy_with_logits"
)
# Functions torch.fx records by their C binding's name (F.logsigmoid, F.softplus, F.gelu,
# torch.special.*).
_BINDINGS = (
    "torch._C._nn.log_sigmoid",
    "torch._C._nn.softplus",
    "torch._C._nn.gelu",
    "torch._C._special.special_expit",
    "torch._C._special.special_log1p",
)

FUNCTIONS: frozenset[str] = frozenset(
    [f"operator.{name}" for name in _OPERATORS.split()]
    + [f"torch.{name}" for name in _TORCH.split()]
    + [f"torch.nn.functional.{name}" for name in _FUNCTIONAL.split()]
    + list(_BINDINGS)
    + ["getattr"]
)
METHODS: frozenset[str] = frozenset(
    (
        "abs add sub mul div neg pow square sqrt rsqrt exp expm1 log log2 log1p sigmoid tanh relu "
        "sign clamp clip clamp_min clamp_max minimum maximum where min max amin amax sum mean "
        "prod cumsum logsumexp softmax log_softmax lt le gt ge eq ne logical_and logical_or "
        "logical_not isfinite isnan isinf nan_to_num masked_fill gather std var floor ceil round "
        "reciprocal detach float double long int bool to type_as view reshape view_as reshape_as "
        "expand_as flatten squeeze unsqueeze transpose t permute contiguous clone size dim numel "
        "new_tensor matmul dot"
    ).split()
)
# ``getattr`` may read only these: a tensor's shape and type, and a min/max result's parts.
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "T", "mT", "values", "indices"})
KWARGS = frozenset(
    (
        "dim keepdim dtype min max other exponent alpha value nan posinf neginf reduction beta "
        "delta log_target weight pos_weight size_average reduce inplace _stacklevel correction "
        "unbiased index mask condition start_dim end_dim dim0 dim1 eps input target approximate "
        "threshold rounding_mode decimals fill_value"
    ).split()
)
DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"})
_SPECIAL_FLOATS = frozenset({"inf", "-inf", "nan"})
_REFUSED_KINDS = frozenset({"device", "layout", "memory_format"})


class LossInput(BaseModel):
    """One input of the loss: ``logprobs`` or a ``loss_fn_inputs`` key, with every datum's rank
    for it (0: a scalar, 1: ``[N]``, 2: ``[N, K]``)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    rank: Literal[0, 1, 2]


class LossNode(BaseModel):
    """One traced node as the SDK sends it (``tinker.types.CustomLossNode``)."""

    model_config = ConfigDict(extra="ignore")
    op: str
    name: str
    target: str
    args: list[JsonValue] = []
    kwargs: dict[str, JsonValue] = {}


class CustomLoss(BaseModel):
    """A checked custom loss: its name, inputs (``logprobs`` first) and nodes in execution
    order. Constructing one runs every rule of this module (a ``ValueError`` names the node)."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=128)
    inputs: list[LossInput]
    nodes: list[LossNode]

    @model_validator(mode="after")
    def _obeys_the_rules(self) -> Self:
        check_graph(self)
        return self

    @property
    def input_names(self) -> list[str]:
        """The ``loss_fn_inputs`` keys the loss reads, in the order it takes them."""
        return [i.name for i in self.inputs[1:]]

    def rank_of(self, key: str) -> int | None:
        """The declared rank of ``loss_fn_inputs[key]`` (``target_tokens``: logprobs' rank)."""
        if key == "target_tokens" and key not in self.input_names:
            return self.inputs[0].rank
        return next((i.rank for i in self.inputs[1:] if i.name == key), None)


def check_graph(loss: CustomLoss) -> None:
    """Every rule of the module docstring; a ``ValueError`` saying which one a graph breaks."""
    _check_inputs(loss.inputs)
    nodes = loss.nodes
    if len(nodes) > MAX_NODES:
        raise ValueError(f"the graph has {len(nodes)} nodes; a custom loss has at most {MAX_NODES}")
    if len(nodes) < len(loss.inputs) + 1:
        raise ValueError("the graph needs a placeholder per input and an output node")
    defined: set[str] = set()
    for index, node in enumerate(nodes):
        where = f"node {index} ({node.name!r})"
        if not NODE_NAME.fullmatch(node.name) or node.name in defined:
            raise ValueError(f"{where}: node names must be unique identifiers")
        if index < len(loss.inputs):
            _check_placeholder(where, node, loss.inputs[index].name)
        elif node.op == "output":
            if index != len(nodes) - 1:
                raise ValueError(f"{where}: the output node must come last")
            _check_output(where, node, defined)
        elif node.op in ("call_function", "call_method"):
            _check_call(where, node, defined)
        elif node.op == "placeholder":
            raise ValueError(f"{where}: more placeholders than declared inputs")
        elif node.op == "get_attr":
            raise ValueError(f"{where}: a custom loss cannot capture tensors ({node.target!r})")
        elif node.op == "call_module":
            raise ValueError(f"{where}: a custom loss cannot call modules ({node.target!r})")
        else:
            raise ValueError(f"{where}: unknown node op {node.op!r}")
        defined.add(node.name)
    if nodes[-1].op != "output":
        raise ValueError("the graph must end with its output node")


def _check_inputs(inputs: list[LossInput]) -> None:
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"a custom loss takes 1 to {MAX_INPUTS} inputs, logprobs first")
    if inputs[0].name != "logprobs" or inputs[0].rank == 0:
        raise ValueError("the first input must be logprobs, of rank 1 or 2")
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"input names must be distinct, got {names}")
    for name in names:
        if not INPUT_NAME.fullmatch(name):
            raise ValueError(f"input {name!r} must be a lowercase name of letters, digits and _")


def _check_placeholder(where: str, node: LossNode, name: str) -> None:
    if node.op != "placeholder" or node.target != name:
        raise ValueError(f"{where}: expected the placeholder of input {name!r}")
    if node.args or node.kwargs:
        raise ValueError(f"{where}: inputs take no default values")


def _check_call(where: str, node: LossNode, defined: set[str]) -> None:
    allowed = FUNCTIONS if node.op == "call_function" else METHODS
    if node.target not in allowed:
        kind = "function" if node.op == "call_function" else "tensor method"
        raise ValueError(f"{where}: {kind} {node.target!r} is not allowed in a custom loss")
    if node.op == "call_method" and not (node.args and _is_ref(node.args[0])):
        raise ValueError(f"{where}: a method call needs the tensor it is called on")
    if node.target == "getattr":
        if len(node.args) != 2 or not _is_ref(node.args[0]) or node.kwargs:
            raise ValueError(f"{where}: getattr takes a node and an attribute name")
        if node.args[1] not in ATTRIBUTES:
            raise ValueError(f"{where}: attribute {node.args[1]!r} may not be read")
    if node.target == "to":
        # Only a dtype (or another node's): never a device, which a plain string would name.
        if any(not (_is_ref(a) or _is_kind(a, "dtype")) for a in node.args) or set(node.kwargs) - {
            "dtype"
        }:
            raise ValueError(f"{where}: .to() may only change the dtype")
    for key, value in node.kwargs.items():
        if key not in KWARGS:
            raise ValueError(f"{where}: keyword argument {key!r} is not allowed")
        if key == "inplace" and value is not False:
            raise ValueError(f"{where}: in-place operations are not allowed")
    if len(node.args) > MAX_LIST:
        raise ValueError(f"{where}: too many arguments")
    for value in [*node.args, *node.kwargs.values()]:
        _check_value(where, value, defined, 0)


def _check_output(where: str, node: LossNode, defined: set[str]) -> None:
    if len(node.args) != 1 or node.kwargs:
        raise ValueError(f"{where}: the output node returns one value, (loss, metrics)")
    value = node.args[0]
    pair = value.get("tuple") if isinstance(value, dict) else value
    if not (isinstance(pair, list) and len(pair) == 2):
        raise ValueError(f"{where}: a custom loss returns (loss, metrics)")
    loss, metrics = pair
    if not (_is_ref(loss) and isinstance(loss, dict) and loss["ref"] in defined):
        raise ValueError(f"{where}: the loss must be a tensor the graph computes")
    table = metrics.get("dict") if isinstance(metrics, dict) and len(metrics) == 1 else None
    if not isinstance(table, dict) or len(table) > MAX_LIST:
        raise ValueError(f"{where}: the metrics must be a dict of at most {MAX_LIST} entries")
    for key, ref in table.items():
        if not METRIC_KEY.fullmatch(key):
            raise ValueError(
                f"{where}: metric {key!r} must be named custom/<name>:sum or custom/<name>:mean"
            )
        if not (_is_ref(ref) and isinstance(ref, dict) and ref["ref"] in defined):
            raise ValueError(f"{where}: metric {key!r} must be a tensor the graph computes")


def _is_ref(value: JsonValue) -> bool:
    return _is_kind(value, "ref") and isinstance(value, dict) and isinstance(value["ref"], str)


def _is_kind(value: JsonValue, kind: str) -> bool:
    return isinstance(value, dict) and len(value) == 1 and kind in value


def _check_value(where: str, value: JsonValue, defined: set[str], depth: int) -> None:
    """One encoded argument: its form, its size, and that every ref names an earlier node."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: arguments nest deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, float)):
        return
    if isinstance(value, int):
        if abs(value) >= 2**63:
            raise ValueError(f"{where}: integer {value} is out of range")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueError(f"{where}: string argument longer than {MAX_STRING} characters")
        return
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise ValueError(f"{where}: list argument longer than {MAX_LIST}")
        for item in value:
            _check_value(where, item, defined, depth + 1)
        return
    if len(value) != 1:
        raise ValueError(f"{where}: an encoded argument object has exactly one key")
    ((kind, inner),) = value.items()
    if kind == "ref":
        if not (isinstance(inner, str) and inner in defined):
            raise ValueError(f"{where}: {inner!r} is not an earlier node")
    elif kind == "tuple":
        if not isinstance(inner, list):
            raise ValueError(f"{where}: a tuple is encoded as a list")
        _check_value(where, inner, defined, depth + 1)
    elif kind == "dict":
        if not isinstance(inner, dict) or len(inner) > MAX_LIST:
            raise ValueError(f"{where}: a dict argument holds at most {MAX_LIST} entries")
        for item in inner.values():
            _check_value(where, item, defined, depth + 1)
    elif kind == "slice":
        if not (isinstance(inner, list) and len(inner) == 3):
            raise ValueError(f"{where}: a slice is [start, stop, step]")
        for part in inner:
            if not (part is None or (isinstance(part, int) and not isinstance(part, bool))):
                if not _is_ref(part):
                    raise ValueError(f"{where}: slice bounds are integers, None or nodes")
            _check_value(where, part, defined, depth + 1)
    elif kind == "ellipsis":
        if inner is not True:
            raise ValueError(f"{where}: malformed ellipsis")
    elif kind == "float":
        if inner not in _SPECIAL_FLOATS:
            raise ValueError(f"{where}: float {inner!r} is not inf, -inf or nan")
    elif kind == "dtype":
        if inner not in DTYPES:
            raise ValueError(f"{where}: dtype {inner!r} is not one of {sorted(DTYPES)}")
    elif kind in _REFUSED_KINDS:
        raise ValueError(f"{where}: a custom loss cannot name a {kind}")
    else:
        raise ValueError(f"{where}: unknown argument encoding {kind!r}")
