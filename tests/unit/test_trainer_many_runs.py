"""Many runs in one pass (``TrainerEngine.forward_backward_many``): runs of different ranks,
targets and losses (one of them forward-only) packed into one base-model pass give each run the
outputs, metrics and gradients of its own pass, and the same weights after AdamW; a bad call
fails alone; micro-batches may cut across runs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from services.trainer.engine import TrainerEngine
from whetstone.errors import NotFound, UserError
from whetstone.messages import AdamParams, Datum, ForwardBackward, ForwardBackwardResult, LoraConfig
from whetstone.tensors import Tensor

VOCAB = 200
ADAM = AdamParams(learning_rate=1e-2)
RUNS = {
    "a": LoraConfig(rank=4, seed=1),
    "b": LoraConfig(rank=8, seed=2, train_unembed=False),
    "c": LoraConfig(rank=2, seed=3, train_attn=False),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = Qwen3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        model = Qwen3ForCausalLM(config).float()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path


def datums(seed: int, rl: bool = False) -> list[Datum]:
    rng = random.Random(seed)
    out = []
    for _ in range(rng.randint(2, 3)):
        seq = [rng.randrange(VOCAB) for _ in range(rng.randint(4, 12))]
        n = len(seq) - 1
        inputs = {"target_tokens": Tensor.from_list(seq[1:], "int64")}
        if rl:
            inputs["logprobs"] = Tensor.from_list([-rng.uniform(3, 7) for _ in range(n)], "float32")
            inputs["advantages"] = Tensor.from_list([rng.choice([-1.0, 1.0])] * n, "float32")
        out.append(Datum(model_input=Tensor.from_list(seq[:-1], "int64"), loss_fn_inputs=inputs))
    return out


def calls(round_: int) -> list[tuple[str, ForwardBackward]]:
    return [
        ("a", ForwardBackward(data=datums(10 + round_), loss_fn="cross_entropy")),
        ("b", ForwardBackward(data=datums(20 + round_, rl=True), loss_fn="importance_sampling")),
        (
            "c",
            ForwardBackward(data=datums(30 + round_), loss_fn="cross_entropy", forward_only=True),
        ),
        ("a", ForwardBackward(data=datums(40 + round_), loss_fn="cross_entropy")),
        ("c", ForwardBackward(data=datums(50 + round_), loss_fn="cross_entropy")),
    ]


def engine_with_runs(model_dir: Path, **kwargs: int) -> TrainerEngine:
    engine = TrainerEngine(model_dir, **kwargs)
    for run_id, config in RUNS.items():
        engine.create_run(run_id, config)
    return engine


def state(engine: TrainerEngine, run_id: str) -> list[torch.Tensor]:
    out = []
    for p in engine.runs[run_id].adapter.parameters():
        out += [p.detach().clone(), torch.zeros_like(p) if p.grad is None else p.grad.clone()]
    return out


def assert_results_equal(a: ForwardBackwardResult, b: ForwardBackwardResult) -> None:
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert a.metrics[key] == pytest.approx(b.metrics[key], abs=1e-5, rel=1e-5)
    assert len(a.outputs) == len(b.outputs)
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(
                torch.from_numpy(x[key].to_numpy().copy()),
                torch.from_numpy(y[key].to_numpy().copy()),
                atol=1e-5,
                rtol=1e-5,
            )


@pytest.mark.parametrize("budget", [10**6, 15])
def test_runs_in_one_pass_equal_separate_passes(model_dir: Path, budget: int) -> None:
    together = engine_with_runs(model_dir, micro_batch_tokens=budget)
    apart = engine_with_runs(model_dir)
    for round_ in range(2):
        joint = together.forward_backward_many(calls(round_))
        alone = [apart.forward_backward(run_id, cmd) for run_id, cmd in calls(round_)]
        for x, y in zip(joint, alone, strict=True):
            assert isinstance(x, ForwardBackwardResult)
            assert_results_equal(x, y)
        for run_id in RUNS:
            for x, y in zip(state(together, run_id), state(apart, run_id), strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
        for e in (together, apart):
            for run_id in RUNS:
                e.optim_step(run_id, ADAM)
    # Not vacuous: the runs trained, and differently.
    a, b = state(together, "a"), state(together, "b")
    assert any(bool(f.b.abs().max() > 0) for f in together.runs["a"].adapter.factors.values())
    assert a[0].shape != b[0].shape


def test_a_forward_only_call_gains_no_gradient(model_dir: Path) -> None:
    engine = engine_with_runs(model_dir)
    engine.forward_backward_many(
        [
            ("a", ForwardBackward(data=datums(1), loss_fn="cross_entropy")),
            ("c", ForwardBackward(data=datums(2), loss_fn="cross_entropy", forward_only=True)),
        ]
    )
    assert all(p.grad is None for p in engine.runs["c"].adapter.parameters())
    assert any(p.grad is not None for p in engine.runs["a"].adapter.parameters())


def test_a_bad_call_fails_alone(model_dir: Path) -> None:
    engine = engine_with_runs(model_dir)
    reference = engine_with_runs(model_dir)
    good = ForwardBackward(data=datums(3), loss_fn="cross_entropy")
    bad_ids = ForwardBackward(
        data=[
            Datum(
                model_input=Tensor.from_list([1, VOCAB + 5], "int64"),
                loss_fn_inputs={"target_tokens": Tensor.from_list([2, 3], "int64")},
            )
        ],
        loss_fn="cross_entropy",
    )
    results = engine.forward_backward_many([("a", good), ("b", bad_ids), ("nope", good)])
    assert isinstance(results[1], UserError) and "token ids must lie" in str(results[1])
    assert isinstance(results[2], NotFound)
    assert isinstance(results[0], ForwardBackwardResult)
    assert_results_equal(results[0], reference.forward_backward("a", good))
    assert all(p.grad is None for p in engine.runs["b"].adapter.parameters())
