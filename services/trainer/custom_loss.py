"""Server-side custom losses: an uploaded graph rebuilt from our own table of torch operations and
run once per datum (``../shared/losses.md`` §3, "Server-side custom").

The graph (``whetstone.custom_loss.CustomLoss``, checked by its rules when the command was
decoded) names operations; nothing in it is executed as code. Each name maps to a callable of
``_FUNCTIONS`` or ``_METHODS``, resolved once at import from the whitelist's own names, so a name
outside the whitelist has nothing to resolve to. ``getattr`` reads only the whitelisted
attributes, Python operators take tensors and numbers only (no sequence repetition, no huge
integer powers), and every value a node computes is bounded to ``MAX_ELEMENTS`` elements: an
operation on several tensors is first evaluated on meta tensors (shapes only, no memory), so
broadcasting cannot allocate the bound's excess before it is refused. The graph runs on the host
(on a GPU, an out-of-range index is a device-side assert that ends the process). Any failure of
an operation is the client's: a ``UserError`` naming the node.

Semantics follow the SDK's client-side ``run_loss_handle``: the graph runs per datum with the
datum's ``logprobs`` (shaped like its ``target_tokens``, float32, carrying the autograd graph) and
its declared ``loss_fn_inputs`` (float32 or int64, as sent; a rank-0 input is a scalar); the
datum losses are summed (``loss:sum``); metrics named ``custom/<name>:sum`` are summed over
datums and ``custom/<name>:mean`` averaged over them. ``loss_fn_outputs`` hold ``logprobs`` only.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import JsonValue

from services.trainer.losses import Config, Inputs, LossFn, LossOutput, get_loss
from whetstone.custom_loss import ATTRIBUTES, DTYPES, FUNCTIONS, METHODS, CustomLoss, LossNode
from whetstone.errors import UserError
from whetstone.messages import ForwardBackward

MAX_ELEMENTS = 1 << 22  # elements in any one value a graph computes (16 MB of float32)
MAX_INT_EXPONENT = 64  # int ** int on Python numbers (shapes): larger ones could take forever

_MODULES: dict[str, Any] = {
    "operator": operator,
    "torch": torch,
    "torch.nn.functional": F,
    "torch._C._nn": torch._C._nn,
    "torch._C._special": torch._C._special,  # type: ignore[attr-defined]
}
_NUMBERS = (bool, int, float)
_OPERATIONAL_ERRORS = (
    RuntimeError,
    TypeError,
    ValueError,
    IndexError,
    ZeroDivisionError,
    OverflowError,
)


def _numeric(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A Python operator restricted to tensors and numbers: on a shape (a tuple), ``*`` and
    ``+`` would repeat and concatenate sequences."""

    def call(*args: Any) -> Any:
        for arg in args:
            if not isinstance(arg, (torch.Tensor, *_NUMBERS)):
                raise TypeError(f"operands must be tensors or numbers, got {type(arg).__name__}")
        return fn(*args)

    return call


def _pow(base: Any, exponent: Any) -> Any:
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and abs(exponent) > MAX_INT_EXPONENT
        and abs(base) > 1
    ):
        raise ValueError(f"integer power {exponent} exceeds {MAX_INT_EXPONENT}")
    return _numeric(operator.pow)(base, exponent)


def _getitem(value: Any, index: Any) -> Any:
    if not isinstance(value, (torch.Tensor, tuple)):
        raise TypeError(f"cannot index a {type(value).__name__}")
    return value[index]


def _getattr(value: Any, name: str) -> Any:
    # Checked at create time too; again here so that nothing but these can ever be read.
    if name not in ATTRIBUTES:
        raise TypeError(f"attribute {name!r} may not be read")
    if not (isinstance(value, torch.Tensor) or (isinstance(value, tuple) and hasattr(value, name))):
        raise TypeError(f"cannot read {name!r} of a {type(value).__name__}")
    return getattr(value, name)


def _resolve(qualified: str) -> Callable[..., Any]:
    module, _, name = qualified.rpartition(".")
    function = getattr(_MODULES[module], name)
    assert callable(function), qualified
    return function  # type: ignore[no-any-return]


def _function_table() -> dict[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    for qualified in FUNCTIONS:
        if qualified == "getattr":
            table[qualified] = _getattr
        elif qualified == "operator.getitem":
            table[qualified] = _getitem
        elif qualified == "operator.pow":
            table[qualified] = _pow
        elif qualified.startswith("operator."):
            table[qualified] = _numeric(_resolve(qualified))
        else:
            table[qualified] = _resolve(qualified)
    return table


def _method(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, torch.Tensor):
            raise TypeError(f".{name}() is called on a {type(self).__name__}, not a tensor")
        return getattr(self, name)(*args, **kwargs)

    return call


_FUNCTIONS = _function_table()
_METHODS = {name: _method(name) for name in METHODS if hasattr(torch.Tensor, name)}


@dataclass(frozen=True)
class _Step:
    name: str
    target: str
    function: Callable[..., Any]
    args: list[JsonValue]
    kwargs: dict[str, JsonValue]


class Program:
    """A checked graph bound to torch callables; ``run`` evaluates it for one datum."""

    def __init__(self, loss: CustomLoss) -> None:
        self.loss = loss
        self.steps = [self._bind(node) for node in loss.nodes[len(loss.inputs) : -1]]
        self.output = loss.nodes[-1].args[0]

    @staticmethod
    def _bind(node: LossNode) -> _Step:
        table = _FUNCTIONS if node.op == "call_function" else _METHODS
        function = table.get(node.target)
        if function is None:  # the contract's rules make this unreachable; refuse all the same
            raise UserError(f"custom loss operation {node.target!r} is not available")
        return _Step(node.name, node.target, function, node.args, node.kwargs)

    def run(
        self, logprobs: torch.Tensor, inputs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The datum's loss (a 0-dim tensor, differentiable in ``logprobs``) and its metrics
        (detached 0-dim float32 tensors keyed ``custom/<name>:sum|mean``)."""
        env: dict[str, Any] = {}
        for spec, value in zip(self.loss.inputs, [logprobs, *inputs], strict=True):
            env[spec.name] = value
        for step in self.steps:
            env[step.name] = self._call(step, env)
        loss, metrics = _decode(self.output, env)
        where = f"custom loss {self.loss.name!r}"
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
            got = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UserError(f"{where} must return a scalar floating-point loss, got {got}")
        values: dict[str, torch.Tensor] = {}
        for key, value in metrics.items():
            if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise UserError(f"{where}: metric {key!r} must be a one-element tensor")
            values[key] = value.detach().float().reshape(())
        return loss.float(), values

    def _call(self, step: _Step, env: Mapping[str, Any]) -> Any:
        args = [_decode(a, env) for a in step.args]
        kwargs = {k: _decode(v, env) for k, v in step.kwargs.items()}
        where = f"custom loss {self.loss.name!r}, node {step.name!r} ({step.target})"
        try:
            _check_growth(step.function, args, kwargs, where)
            value = step.function(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except _OPERATIONAL_ERRORS as exc:
            raise UserError(f"{where}: {type(exc).__name__}: {exc}") from None
        if _elements(value) > MAX_ELEMENTS:
            raise UserError(f"{where}: computes more than {MAX_ELEMENTS} elements")
        return value


def _decode(value: JsonValue, env: Mapping[str, Any]) -> Any:
    """An argument in the SDK's encoding as a Python value (refs: the values of earlier nodes)."""
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    ((kind, inner),) = value.items()
    if kind == "ref":
        return env[str(inner)]
    if kind == "tuple" and isinstance(inner, list):
        return tuple(_decode(v, env) for v in inner)
    if kind == "dict" and isinstance(inner, dict):
        return {k: _decode(v, env) for k, v in inner.items()}
    if kind == "slice" and isinstance(inner, list):
        return slice(*(_decode(v, env) for v in inner))
    if kind == "ellipsis":
        return ...
    if kind == "float":
        return float(str(inner))
    if kind == "dtype":
        if inner not in DTYPES:  # the contract refuses these first
            raise UserError(f"dtype {inner!r} is not allowed")
        return getattr(torch, str(inner))
    raise UserError(f"unknown argument encoding {kind!r}")  # the contract refuses these first


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, list):
        return [_to_meta(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _elements(value: Any) -> int:
    return sum(t.numel() for t in _tensors(value))


def _check_growth(
    function: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], where: str
) -> None:
    """Refuse, before it runs, an operation on several tensors whose result would exceed
    ``MAX_ELEMENTS`` (broadcasting, concatenation, advanced indexing): the same call on meta
    tensors gives the shapes without allocating. Operations whose result shape depends on the
    data (a boolean mask) cannot run on meta; they never grow past their input."""
    if len(_tensors(args) + _tensors(kwargs)) < 2:
        return
    try:
        shapes = function(*_to_meta(args), **_to_meta(kwargs))
    except Exception:  # noqa: BLE001 - no meta kernel or data-dependent: checked after it runs
        return
    if _elements(shapes) > MAX_ELEMENTS:
        raise UserError(f"{where}: would compute more than {MAX_ELEMENTS} elements")


# ---------------------------------------------------------------- the loss the engine runs


@dataclass(frozen=True)
class CustomLossFn(LossFn):
    """A server-side custom loss in the engine's ``LossFn`` shape: it reads ``target_tokens``
    and the declared inputs at their declared ranks; its config is the ``loss_id`` alone."""

    spec: CustomLoss | None = None

    def check_config(self, raw: Mapping[str, float | str]) -> dict[str, float]:
        extra = sorted(set(raw) - {"loss_id"})
        if extra:
            raise UserError(f"loss_fn 'custom' takes only config key 'loss_id', got {extra}")
        return {}

    def check_inputs(
        self, raw: Mapping[str, torch.Tensor], n: int, where: str
    ) -> dict[str, torch.Tensor]:
        assert self.spec is not None
        spec = self.spec
        inputs: dict[str, torch.Tensor] = {}
        for key in self.input_names:
            if key not in raw:
                raise UserError(
                    f"{where}: custom loss {spec.name!r} reads loss_fn_inputs[{key!r}], "
                    "which this datum lacks"
                )
            value, rank = raw[key], spec.rank_of(key)
            if rank == 0:
                if value.numel() != 1:
                    raise UserError(f"{where}: loss_fn_inputs[{key!r}] must be a scalar")
                value = value.reshape(())
            elif value.dim() != rank or value.shape[0] != n:
                raise UserError(
                    f"{where}: loss_fn_inputs[{key!r}] has shape {list(value.shape)}; custom loss "
                    f"{spec.name!r} declared rank {rank}, with {n} rows (len(model_input))"
                )
            if value.is_floating_point():
                value = value.float()
                if not bool(torch.isfinite(value).all()):
                    raise UserError(
                        f"{where}: loss_fn_inputs[{key!r}] holds NaN or infinite values"
                    )
            else:
                value = value.long()
            inputs[key] = value
        targets = inputs["target_tokens"]
        if targets.is_floating_point() or targets.dim() != spec.inputs[0].rank:
            raise UserError(
                f"{where}: target_tokens must hold token ids of rank {spec.inputs[0].rank}, "
                f"the rank custom loss {spec.name!r} declared for logprobs"
            )
        return inputs


def custom_loss_fn(spec: CustomLoss, num_datums: int) -> CustomLossFn:
    """The engine's loss for an uploaded graph, in a call of ``num_datums`` datums.

    The engine sums every count over the call's datums, so a ``:mean`` metric is divided by
    ``num_datums`` per datum: its sum is then the mean over the call's datums, which the client
    averages over chunks weighted by their datums, as the SDK's client-side path does."""
    program = Program(spec)

    def compute(lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
        # On the host: a datum's values are small, and an out-of-range index (gather, getitem)
        # on a GPU is a device-side assert that would end the worker; the copies are
        # differentiable, so the gradient flows back to the device.
        values = [inputs[name].cpu() for name in spec.input_names]
        loss, metrics = program.run(lp.cpu(), values)
        loss = loss.to(lp.device)
        counts = {
            key: value / num_datums if key.endswith(":mean") else value
            for key, value in metrics.items()
        }
        return LossOutput(loss, counts)

    required = tuple(dict.fromkeys(["target_tokens", *spec.input_names]))
    return CustomLossFn(
        name="custom", compute=compute, required_inputs=required, per_token=False, spec=spec
    )


def loss_for(cmd: ForwardBackward) -> LossFn:
    """The loss a forward_backward names: a built-in, or the custom loss it carries."""
    if cmd.loss_fn != "custom":
        return get_loss(cmd.loss_fn)
    if cmd.custom_loss is None:
        raise UserError(
            "loss_fn 'custom' needs loss_fn_config['loss_id'], the id create_custom_loss returned"
        )
    return custom_loss_fn(cmd.custom_loss, max(1, len(cmd.data)))
