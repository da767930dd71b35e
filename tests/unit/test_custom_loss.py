"""Server-side custom losses: graphs traced by the real tinker SDK (``create_custom_loss``'s own
tracer and encoder) run by the trainer's interpreter, against float64 references written here
by hand (values and dL/dlp derived on paper, no autograd), then every refusal: operations off
the whitelist, malformed graphs, runaway sizes, and inputs that do not match the declaration.
No server: ``lp`` is a leaf tensor, so ``lp.grad`` is dL/dlp."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from tinker.lib.public_interfaces.custom_loss import encode_graph, run_loss_handle, trace_loss
from tinker.types import Datum, ModelInput, TensorData
from transformers import Qwen3Config, Qwen3ForCausalLM

from services.trainer import custom_loss
from services.trainer.custom_loss import MAX_ELEMENTS, custom_loss_fn, loss_for
from services.trainer.engine import TrainerEngine
from services.trainer.losses import count_metrics
from whetstone.custom_loss import FUNCTIONS, MAX_NODES, METHODS, CustomLoss
from whetstone.errors import UserError
from whetstone.messages import Datum as WireDatum
from whetstone.messages import ForwardBackward, LoraConfig
from whetstone.tensors import Tensor

TOL = dict(abs=1e-5, rel=1e-6)


def upload(fn: Any, ranks: dict[str, int]) -> CustomLoss:
    """What the gateway stores for ``fn``: the SDK's trace and encoding, checked by our rules."""
    handle = trace_loss(fn, ranks, "session-1")  # type: ignore[arg-type]
    graph = encode_graph(handle).model_dump(mode="json")
    return CustomLoss(
        name=handle.name, inputs=[i.model_dump() for i in handle.inputs], nodes=graph["nodes"]
    )


def raw_graph(fn: Any, ranks: dict[str, int]) -> dict[str, Any]:
    handle = trace_loss(fn, ranks, "session-1")  # type: ignore[arg-type]
    return {
        "name": handle.name,
        "inputs": [i.model_dump() for i in handle.inputs],
        "nodes": encode_graph(handle).model_dump(mode="json")["nodes"],
    }


def run(loss: CustomLoss, lp: list, inputs: dict[str, torch.Tensor], num_datums: int = 1):
    """(loss, dL/dlp, counts) of one datum through the loss's own input checks."""
    fn = custom_loss_fn(loss, num_datums)
    lp_t = torch.tensor(lp, dtype=torch.float32).requires_grad_()
    raw = {"target_tokens": torch.zeros(lp_t.shape, dtype=torch.int64), **inputs}
    checked = fn.check_inputs(raw, lp_t.shape[0], "datum 0")
    out = fn(lp_t, checked, fn.check_config({"loss_id": "x"}))
    out.elementwise.backward()
    assert lp_t.grad is not None
    return float(out.elementwise.detach()), lp_t.grad.double().tolist(), out.counts


def f32(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- losses and references


def clipped_surrogate(logprobs, sampler, advantages):
    ratio = torch.exp(logprobs - sampler)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"custom/clip_frac:mean": ((ratio - 1).abs() > 0.2).float().mean()}


def test_clipped_surrogate_equals_its_float64_reference() -> None:
    lp, q, adv = [-0.5, -1.0, -2.0, -0.2], [-0.9, -1.1, -2.3, -0.25], [1.0, 2.0, -1.0, 0.5]
    loss = upload(clipped_surrogate, {"logprobs": 1, "sampler": 1, "advantages": 1})
    value, grad, counts = run(loss, lp, {"sampler": f32(q), "advantages": f32(adv)})
    ref_loss, ref_grad, clipped = 0.0, [], 0
    for lpi, qi, ai in zip(lp, q, adv, strict=True):
        r = math.exp(lpi - qi)
        c = min(max(r, 0.8), 1.2)
        ref_loss -= min(r * ai, c * ai)
        # The unclipped branch is the smaller one (no ties here): its gradient is -A*r;
        # the clipped branch is constant in lp outside the band.
        ref_grad.append(-ai * r if r * ai <= c * ai else 0.0)
        clipped += abs(r - 1) > 0.2
    assert value == pytest.approx(ref_loss, **TOL)
    assert grad == pytest.approx(ref_grad, **TOL)
    assert float(counts["custom/clip_frac:mean"]) == pytest.approx(clipped / len(lp))


def weighted_square(logprobs, weights, scale):
    loss = (weights * logprobs**2).sum() * scale + logprobs.sum() / logprobs.shape[0]
    return loss, {"custom/lp_mean:mean": logprobs.mean(), "custom/weight:sum": weights.sum()}


def test_scalar_input_shapes_and_metric_reductions() -> None:
    """``scale`` has rank 0 (a scalar; the proto wire sends it as one element); ``:mean``
    metrics are divided by the call's datums, so summed over them they average."""
    lp, w, scale = [-0.5, -1.5, -3.0], [1.0, 0.0, 2.0], 0.25
    loss = upload(weighted_square, {"logprobs": 1, "weights": 1, "scale": 0})
    value, grad, counts = run(loss, lp, {"weights": f32(w), "scale": f32([scale])}, num_datums=2)
    n = len(lp)
    pairs = list(zip(w, lp, strict=True))
    assert value == pytest.approx(scale * sum(wi * x * x for wi, x in pairs) + sum(lp) / n)
    assert grad == pytest.approx([2 * scale * wi * x + 1 / n for wi, x in pairs], **TOL)
    assert float(counts["custom/lp_mean:mean"]) == pytest.approx(sum(lp) / n / 2)  # 2 datums
    assert float(counts["custom/weight:sum"]) == pytest.approx(sum(w))
    assert count_metrics(counts).keys() == {"custom/lp_mean:mean", "custom/weight:sum"}


def logsumexp_minus_tail(logprobs, mask):
    kept = torch.where(mask > 0, logprobs, torch.zeros_like(logprobs))
    return torch.logsumexp(logprobs, dim=0) - kept[1:].sum() + logprobs[..., None].max(), {}


def test_indexing_masks_and_reductions() -> None:
    lp, mask = [-0.3, -1.2, -2.0, -0.7], [1.0, 1.0, 0.0, 1.0]
    loss = upload(logsumexp_minus_tail, {"logprobs": 1, "mask": 1})
    value, grad, _ = run(loss, lp, {"mask": f32(mask)})
    z = sum(math.exp(x) for x in lp)
    top = max(range(len(lp)), key=lambda i: lp[i])
    tail = sum(x for x, m in list(zip(lp, mask, strict=True))[1:] if m > 0)
    assert value == pytest.approx(math.log(z) - tail + lp[top], **TOL)
    ref = [math.exp(x) / z - (1.0 if i > 0 and mask[i] > 0 else 0.0) for i, x in enumerate(lp)]
    ref[top] += 1.0
    assert grad == pytest.approx(ref, **TOL)


def distribution_cross_entropy(logprobs, target_distribution):
    loss = -(target_distribution * logprobs).sum()
    return loss, {
        "custom/entropy:sum": -(target_distribution * torch.log(target_distribution)).sum()
    }


def test_two_dimensional_logprobs() -> None:
    lp = [[-0.2, -1.7], [-0.9, -0.5], [-2.0, -0.1]]
    dist = [[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]
    loss = upload(distribution_cross_entropy, {"logprobs": 2, "target_distribution": 2})
    fn = custom_loss_fn(loss, 1)
    lp_t = torch.tensor(lp).requires_grad_()
    raw = {
        "target_tokens": torch.zeros((3, 2), dtype=torch.int64),
        "target_distribution": f32(dist),
    }
    out = fn(lp_t, fn.check_inputs(raw, 3, "datum 0"), {})
    out.elementwise.backward()
    flat_lp = [x for row in lp for x in row]
    flat_d = [x for row in dist for x in row]
    assert float(out.elementwise.detach()) == pytest.approx(
        -sum(d * x for d, x in zip(flat_d, flat_lp, strict=True))
    )
    assert lp_t.grad.reshape(-1).tolist() == pytest.approx([-d for d in flat_d], **TOL)
    entropy = -sum(d * math.log(d) for d in flat_d)
    assert float(out.counts["custom/entropy:sum"]) == pytest.approx(entropy, **TOL)


def test_server_equals_the_sdk_client_side_run() -> None:
    """The same handle run by the SDK's client-side ``run_loss_handle`` on two datums: equal
    summed loss, metrics (reduced as the engine reports them) and gradients."""
    handle = trace_loss(clipped_surrogate, {"logprobs": 1, "sampler": 1, "advantages": 1}, "s")
    lps = [[-0.5, -1.0, -2.0], [-0.1, -3.0, -0.4]]
    qs, advs = [[-0.9, -1.1, -2.3], [-0.1, -2.0, -0.8]], [[1.0, 2.0, -1.0], [0.5, -0.5, 1.0]]
    data = [
        Datum(
            model_input=ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={
                "target_tokens": TensorData(data=[1, 2, 3], dtype="int64", shape=[3]),
                "sampler": TensorData(data=q, dtype="float32", shape=[3]),
                "advantages": TensorData(data=a, dtype="float32", shape=[3]),
            },
        )
        for q, a in zip(qs, advs, strict=True)
    ]
    client_lps = [torch.tensor(lp).requires_grad_() for lp in lps]
    client_loss, client_metrics = run_loss_handle(handle, data, client_lps)
    client_loss.backward()

    loss = upload(clipped_surrogate, {"logprobs": 1, "sampler": 1, "advantages": 1})
    fn = custom_loss_fn(loss, len(data))
    total, counts, grads = 0.0, {}, []
    for lp, q, a in zip(lps, qs, advs, strict=True):
        value, grad, datum_counts = run(loss, lp, {"sampler": f32(q), "advantages": f32(a)}, 2)
        total += value
        grads.append(grad)
        for key, v in datum_counts.items():
            counts[key] = counts.get(key, 0.0) + float(v)
    assert fn.per_token is False
    assert total == pytest.approx(float(client_loss.detach()), **TOL)
    assert counts == pytest.approx(client_metrics, **TOL)
    for grad, client in zip(grads, client_lps, strict=True):
        assert grad == pytest.approx(client.grad.tolist(), **TOL)


def test_loss_for_needs_the_resolved_loss() -> None:
    datum = {"model_input": Tensor.from_numpy(torch.tensor([1, 2]).numpy())}
    with pytest.raises(UserError, match=r"needs loss_fn_config\['loss_id'\]"):
        loss_for(ForwardBackward(data=[datum], loss_fn="custom", loss_fn_config={"loss_id": "x"}))
    assert loss_for(ForwardBackward(data=[datum], loss_fn="cross_entropy")).name == "cross_entropy"


# ---------------------------------------------------------------- refusals at create time


def neg_ll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss}


def graph_with(change) -> dict[str, Any]:
    graph = raw_graph(neg_ll, {"logprobs": 1, "weights": 1})
    change(graph)
    return graph


def call(target: str, *args: Any, op: str = "call_function", **kwargs: Any) -> dict[str, Any]:
    return {"op": op, "name": "evil", "target": target, "args": list(args), "kwargs": kwargs}


def insert(node: dict[str, Any]):
    """Insert ``node`` before the loss's last call and make the output depend on nothing new."""

    def change(graph: dict[str, Any]) -> None:
        graph["nodes"].insert(-1, node)

    return change


LP_REF = {"ref": "logprobs"}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (insert(call("builtins.eval", "1")), "function 'builtins.eval' is not allowed"),
        (insert(call("os.system", "ls")), "function 'os.system' is not allowed"),
        (insert(call("torch.load", "x.pt")), "function 'torch.load' is not allowed"),
        (insert(call("torch.save", LP_REF, "x.pt")), "function 'torch.save' is not allowed"),
        (insert(call("item", LP_REF, op="call_method")), "method 'item' is not allowed"),
        (insert(call("add_", LP_REF, 1, op="call_method")), "method 'add_' is not allowed"),
        (insert(call("__class__", LP_REF, op="call_method")), "method '__class__' is not"),
        (insert(call("getattr", LP_REF, "grad_fn")), "attribute 'grad_fn' may not be read"),
        (insert(call("getattr", LP_REF, "__class__")), "attribute '__class__' may not be read"),
        (insert(call("to", LP_REF, "cuda:1", op="call_method")), r"\.to\(\) may only change"),
        (insert(call("torch.zeros_like", LP_REF, device={"device": "cuda"})), "'device'"),
        (insert(call("torch.exp", LP_REF, out=LP_REF)), "keyword argument 'out'"),
        (insert(call("torch.nn.functional.relu", LP_REF, inplace=True)), "in-place"),
        (lambda g: g["nodes"].insert(2, call("torch.exp", {"ref": "mul"})), "'mul' is not an"),
        (insert(call("torch.exp", {"pickle": "gASVAA=="})), "unknown argument encoding"),
        (insert(call("torch.exp", {"dtype": "complex128"})), "dtype 'complex128'"),
        (insert({**call("w", op="get_attr")}), "cannot capture tensors"),
        (insert({**call("linear", op="call_module")}), "cannot call modules"),
        (insert(call("torch.exp", list(range(100)))), "longer than 64"),
        (lambda g: g["nodes"].pop(), "must end with its output node"),
        (lambda g: g["nodes"].insert(1, g["nodes"].pop(0)), "placeholder of input 'logprobs'"),
        (lambda g: g["inputs"].reverse(), "first input must be logprobs"),
        (lambda g: g["inputs"][0].update(rank=0), "first input must be logprobs"),
        (lambda g: g["inputs"][1].update(name="Weights"), "lowercase name"),
        (
            lambda g: g["nodes"][-1].update(
                args=[{"tuple": [{"ref": "neg"}, {"dict": {"loss:sum": {"ref": "neg"}}}]}]
            ),
            "must be named custom/<name>:sum",
        ),
        (lambda g: g["nodes"][-1].update(args=[{"ref": "neg"}]), r"returns \(loss, metrics\)"),
        (lambda g: g["nodes"][2].update(name="logprobs"), "unique identifiers"),
        (
            lambda g: g["nodes"].__setitem__(
                slice(2, 2),
                [call("torch.exp", LP_REF) | {"name": f"e{i}"} for i in range(MAX_NODES)],
            ),
            f"at most {MAX_NODES}",
        ),
    ],
)
def test_graphs_off_the_whitelist_are_refused(change, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        CustomLoss(**graph_with(change))


def test_every_whitelisted_name_has_an_operation() -> None:
    assert set(custom_loss._FUNCTIONS) == FUNCTIONS
    assert set(custom_loss._METHODS) == METHODS


def test_the_unchanged_graph_is_accepted() -> None:
    """The refusals above are of the changes, not of the graph they start from."""
    loss = CustomLoss(**graph_with(lambda g: None))
    assert run(loss, [-1.0, -2.0], {"weights": f32([1.0, 0.5])})[0] == pytest.approx(2.0)


# ---------------------------------------------------------------- refusals while running


def pairwise(logprobs):
    return (logprobs[:, None] * logprobs[None, :]).sum(), {}


def shape_repeat(logprobs):
    return logprobs.sum() + logprobs.new_tensor(logprobs.shape * 4).sum(), {}


def huge_power(logprobs):
    return logprobs.sum() * (logprobs.shape[0] ** 100000), {}


def vector_loss(logprobs):
    return logprobs * 2, {}


def test_runaway_values_are_refused_before_they_are_allocated() -> None:
    loss = upload(pairwise, {"logprobs": 1})
    assert run(loss, [1.0, 2.0], {})[0] == pytest.approx(9.0)  # small: fine
    n = math.isqrt(MAX_ELEMENTS) + 1
    with pytest.raises(UserError, match="would compute more than"):
        run(loss, [0.0] * n, {})


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (shape_repeat, "operands must be tensors or numbers"),
        (huge_power, "integer power"),
        (vector_loss, "must return a scalar floating-point loss"),
    ],
)
def test_operations_that_misbehave_at_run_time_are_user_errors(fn, match: str) -> None:
    loss = upload(fn, {"logprobs": 1})
    with pytest.raises(UserError, match=match):
        run(loss, [-1.0, -2.0], {})


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({}, r"reads loss_fn_inputs\['weights'\], which this datum lacks"),
        ({"weights": f32([1.0])}, "declared rank 1, with 2 rows"),
        ({"weights": f32([[1.0], [2.0]])}, "declared rank 1"),
        ({"weights": f32([1.0, math.inf])}, "NaN or infinite"),
    ],
)
def test_inputs_must_match_the_declaration(inputs, match: str) -> None:
    loss = upload(neg_ll, {"logprobs": 1, "weights": 1})
    with pytest.raises(UserError, match=match):
        run(loss, [-1.0, -2.0], inputs)


def test_config_takes_only_the_loss_id() -> None:
    fn = custom_loss_fn(upload(neg_ll, {"logprobs": 1, "weights": 1}), 1)
    assert fn.check_config({"loss_id": "sess:loss:0"}) == {}
    with pytest.raises(UserError, match="only config key 'loss_id'"):
        fn.check_config({"loss_id": "x", "beta": 1.0})


# ---------------------------------------------------------------- through the engine

VOCAB = 97


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    config = Qwen3Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = Qwen3ForCausalLM(config).float()
    path = tmp_path_factory.mktemp("tiny-qwen3-custom")
    model.save_pretrained(path)
    return path


def test_the_engine_runs_it_as_the_client_side_path_would(model_dir) -> None:
    """A custom forward_backward in micro-batches of one datum gives the loss, the metrics and
    the adapter gradient of the client-side recipe: a forward, then cross-entropy with
    weights = -dC/dlp (dC/dlp derived by hand for ``weighted_square``)."""
    engine = TrainerEngine(model_dir, micro_batch_tokens=4)
    for run_id in ("custom", "surrogate"):
        engine.create_run(run_id, LoraConfig(rank=4, seed=11))
    seqs, scale = [[3, 14, 15, 92, 65], [35, 89, 79], [32, 38, 46, 26]], 0.5
    weights = [[1.0 + (i % 2) for i in range(len(s) - 1)] for s in seqs]

    def datum(seq: list[int], extra: dict[str, Tensor]) -> WireDatum:
        targets = Tensor.from_list(seq[1:], "int64")
        return WireDatum(
            model_input=Tensor.from_list(seq[:-1], "int64"),
            loss_fn_inputs={"target_tokens": targets, **extra},
        )

    loss = upload(weighted_square, {"logprobs": 1, "weights": 1, "scale": 0})
    data = [
        datum(
            s,
            {
                "weights": Tensor.from_list(w, "float32"),
                "scale": Tensor.from_list([scale], "float32"),
            },
        )
        for s, w in zip(seqs, weights, strict=True)
    ]
    result = engine.forward_backward(
        "custom",
        ForwardBackward(
            data=data, loss_fn="custom", loss_fn_config={"loss_id": "x"}, custom_loss=loss
        ),
    )
    lps = [out["logprobs"].to_numpy().astype(float).tolist() for out in result.outputs]
    assert all("elementwise_loss" not in out for out in result.outputs)
    expected = sum(
        scale * sum(wi * x * x for wi, x in zip(w, lp, strict=True)) + sum(lp) / len(lp)
        for w, lp in zip(weights, lps, strict=True)
    )
    assert result.metrics["loss:sum"] == pytest.approx(expected, **TOL)
    mean_lp = sum(sum(lp) / len(lp) for lp in lps) / len(lps)
    assert result.metrics["custom/lp_mean:mean"] == pytest.approx(mean_lp, **TOL)
    assert result.metrics["custom/weight:sum"] == pytest.approx(sum(map(sum, weights)))

    surrogate = [
        datum(
            s,
            {
                "weights": Tensor.from_list(
                    [-(2 * scale * wi * x + 1 / len(lp)) for wi, x in zip(w, lp, strict=True)],
                    "float32",
                )
            },
        )
        for s, w, lp in zip(seqs, weights, lps, strict=True)
    ]
    engine.forward_backward("surrogate", ForwardBackward(data=surrogate, loss_fn="cross_entropy"))
    grads = [p.grad for p in engine.runs["custom"].adapter.parameters()]
    expected_grads = [p.grad for p in engine.runs["surrogate"].adapter.parameters()]
    assert any(float(g.abs().max()) > 0 for g in grads if g is not None)
    for g, h in zip(grads, expected_grads, strict=True):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)
