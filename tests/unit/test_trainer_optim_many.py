"""Several runs' optimizer steps at once (``TrainerEngine.optim_step_many``): the weights, AdamW
moments, step counts and metrics equal one ``optim_step`` per run in order, bitwise in float32
on the CPU, with runs of different hyperparameters (one clipping) in one call, a run named
twice, and bad calls failing alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from services.trainer.engine import TrainerEngine
from whetstone.errors import NotFound, UserError
from whetstone.messages import AdamParams, Datum, ForwardBackward, LoraConfig, OptimStepResult
from whetstone.tensors import Tensor

VOCAB = 150
RUNS = {
    "a": LoraConfig(rank=4, seed=1),
    "b": LoraConfig(rank=8, seed=2, train_unembed=False),
    "c": LoraConfig(rank=2, seed=3, train_attn=False),
    "d": LoraConfig(rank=4, seed=4),
}
SHARED = AdamParams(learning_rate=1e-2, weight_decay=0.01)
STEPS: list[tuple[str, AdamParams]] = [
    ("a", SHARED),
    ("b", SHARED),  # same hyperparameters as a: one AdamW call
    ("c", AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.99, eps=1e-6)),
    ("d", AdamParams(learning_rate=1e-2, grad_clip_norm=1e-3)),  # clips: its norm is larger
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = Qwen3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = Qwen3ForCausalLM(config).float()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path


def batch(seed: int) -> ForwardBackward:
    rng = random.Random(seed)
    data = []
    for _ in range(2):
        seq = [rng.randrange(VOCAB) for _ in range(rng.randint(5, 10))]
        data.append(
            Datum(
                model_input=Tensor.from_list(seq[:-1], "int64"),
                loss_fn_inputs={"target_tokens": Tensor.from_list(seq[1:], "int64")},
            )
        )
    return ForwardBackward(data=data, loss_fn="cross_entropy")


def engine(model_dir: Path) -> TrainerEngine:
    out = TrainerEngine(model_dir)
    for run_id, config in RUNS.items():
        out.create_run(run_id, config)
    return out


def snapshot(e: TrainerEngine, run_id: str) -> list[torch.Tensor]:
    state = e.runs[run_id]
    out = [p.detach().clone() for p in state.adapter.parameters()]
    for p in state.adapter.parameters():
        moments = state.optimizer.state[p]
        out += [moments["exp_avg"].clone(), moments["exp_avg_sq"].clone(), moments["step"].clone()]
    return out


def test_many_steps_equal_one_step_per_run(model_dir: Path) -> None:
    apart, together = engine(model_dir), engine(model_dir)
    for round_ in range(2):
        for e in (apart, together):
            for i, run_id in enumerate(RUNS):
                e.forward_backward(run_id, batch(10 * round_ + i))
        one_by_one = [apart.optim_step(run_id, adam) for run_id, adam in STEPS]
        at_once = together.optim_step_many(STEPS)
        assert [r.metrics for r in one_by_one] == [
            r.metrics for r in at_once if isinstance(r, OptimStepResult)
        ]
        norm = one_by_one[3].metrics["grad_norm:mean"]
        assert norm > 1e-3  # d's gradient was clipped: the test covers the clipping path
        for run_id in RUNS:
            for x, y in zip(snapshot(apart, run_id), snapshot(together, run_id), strict=True):
                assert torch.equal(x, y)
            assert apart.runs[run_id].step == together.runs[run_id].step == round_ + 1
            assert all(p.grad is None for p in together.runs[run_id].adapter.parameters())
    # Not vacuous: the runs moved (the B factors start at zero).
    assert any(bool(f.b.abs().max() > 0) for f in together.runs["a"].adapter.factors.values())


def test_a_run_named_twice_steps_twice_and_bad_calls_fail_alone(model_dir: Path) -> None:
    apart, together = engine(model_dir), engine(model_dir)
    for e in (apart, together):
        e.forward_backward("a", batch(1))
        e.forward_backward("b", batch(2))
    bad = AdamParams(learning_rate=1e-2).model_copy(update={"beta1": 1.5})
    calls = [("a", SHARED), ("nope", SHARED), ("b", bad), ("a", SHARED), ("b", SHARED)]
    results = together.optim_step_many(calls)
    assert isinstance(results[1], NotFound)
    assert isinstance(results[2], UserError)
    # The second step of a has no gradient left (its first step consumed it), as in order.
    expected = [apart.optim_step("a", SHARED), apart.optim_step("a", SHARED)]
    expected.append(apart.optim_step("b", SHARED))
    got = [results[0], results[3], results[4]]
    assert [r.metrics for r in got if isinstance(r, OptimStepResult)] == [
        r.metrics for r in expected
    ]
    assert together.runs["a"].step == 2 and together.runs["b"].step == 1
    for run_id in ("a", "b"):
        for x, y in zip(snapshot(apart, run_id), snapshot(together, run_id), strict=True):
            assert torch.equal(x, y)
