"""Automatic micro-batching in the trainer engine: a forward_backward larger than the token
budget runs as micro-batches with gradient accumulation and gives the outputs, metrics and
gradients of one pass; a micro-batch that runs out of device memory is redone at half the budget
from the gradients the call started with. The engine's knobs come from ``TrainerSettings``.

This machine has no GPU, so the out-of-memory case is made by a model that raises
``torch.OutOfMemoryError`` above a token count, as a smaller card would."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from services.trainer.engine import TrainerEngine
from services.trainer.settings import TrainerSettings
from whetstone.messages import Datum, ForwardBackward, LoraConfig
from whetstone.models.registry import ModelSpec
from whetstone.tensors import Tensor

VOCAB = 200


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
        torch.manual_seed(5)
        model = Qwen3ForCausalLM(config).float()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path


def command(seed: int, forward_only: bool = False) -> ForwardBackward:
    rng = random.Random(seed)
    data = []
    for _ in range(6):
        seq = [rng.randrange(VOCAB) for _ in range(rng.randint(4, 14))]
        weights = [rng.choice([0.0, 0.5, 1.0]) for _ in seq[1:]]
        data.append(
            Datum(
                model_input=Tensor.from_list(seq[:-1], "int64"),
                loss_fn_inputs={
                    "target_tokens": Tensor.from_list(seq[1:], "int64"),
                    "weights": Tensor.from_list(weights, "float32"),
                },
            )
        )
    return ForwardBackward(data=data, loss_fn="cross_entropy", forward_only=forward_only)


def grads(engine: TrainerEngine) -> list[torch.Tensor]:
    out = []
    for p in engine.runs["r"].adapter.parameters():
        assert p.grad is not None
        out.append(p.grad.clone())
    return out


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_micro_batches_equal_one_pass(model_dir: Path) -> None:
    results, gradients = {}, {}
    for budget in (10**6, 12, 1):  # one pass; a few datums each; one datum each
        engine = TrainerEngine(model_dir, micro_batch_tokens=budget)
        engine.create_run("r", LoraConfig(rank=4, seed=2))
        results[budget] = engine.forward_backward("r", command(1))
        engine.forward_backward("r", command(2))  # gradients accumulate across calls too
        gradients[budget] = grads(engine)
    assert any(bool(g.abs().max() > 0) for g in gradients[1])
    for budget in (12, 1):
        assert results[budget].metrics["loss:sum"] == pytest.approx(
            results[10**6].metrics["loss:sum"], abs=1e-5
        )
        for a, b in zip(results[budget].outputs, results[10**6].outputs, strict=True):
            for key in ("logprobs", "elementwise_loss"):
                torch.testing.assert_close(
                    torch.from_numpy(a[key].to_numpy().copy()),
                    torch.from_numpy(b[key].to_numpy().copy()),
                    atol=1e-6,
                    rtol=0,
                )
        assert_same(gradients[budget], gradients[10**6])


def test_out_of_memory_halves_the_budget_and_keeps_earlier_gradients(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = TrainerEngine(model_dir)
    reference.create_run("r", LoraConfig(rank=4, seed=2))
    reference.forward_backward("r", command(1))
    expected = reference.forward_backward("r", command(2))
    expected_grads = grads(reference)

    engine = TrainerEngine(model_dir, micro_batch_tokens=10**6)
    engine.create_run("r", LoraConfig(rank=4, seed=2))
    engine.forward_backward("r", command(1))  # gradients the OOM retry must start from

    hidden = engine.model.hidden
    passes: list[int] = []

    def small_card(tokens: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        passes.append(int(tokens.shape[0]))
        if tokens.shape[0] > 20:
            raise torch.OutOfMemoryError("simulated: the card holds 20 tokens of activations")
        return hidden(tokens, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.model, "hidden", small_card)
    got = engine.forward_backward("r", command(2))
    assert max(passes) > 20 and engine.micro_batch_tokens <= 20  # it failed, then adapted
    assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], abs=1e-5)
    assert_same(grads(engine), expected_grads)

    # A single datum too large for the card cannot be split: that error stands.
    engine.micro_batch_tokens = 10**6
    ids = Tensor.from_list(list(range(30)), "int64")
    long_one = ForwardBackward(
        data=[Datum(model_input=ids, loss_fn_inputs={"target_tokens": ids})],
        loss_fn="cross_entropy",
    )
    with pytest.raises(torch.OutOfMemoryError):
        engine.forward_backward("r", long_one)


def test_settings_reach_the_engine(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHETSTONE_MICRO_BATCH_TOKENS", "512")
    monkeypatch.setenv("WHETSTONE_COMPILE", "false")
    monkeypatch.setenv("WHETSTONE_CHECKPOINTING", "full")
    settings = TrainerSettings()
    assert (settings.micro_batch_tokens, settings.compile, settings.checkpointing) == (
        512,
        False,
        "full",
    )
    spec = ModelSpec.from_dir("tiny", model_dir)
    engine = TrainerEngine.from_spec(
        spec,
        micro_batch_tokens=settings.micro_batch_tokens,
        compile=settings.compile,
        checkpointing=settings.checkpointing,
    )
    assert engine.micro_batch_tokens == 512
    assert engine.model.options.checkpointing == "full" and not engine.model.options.compile
    monkeypatch.setenv("WHETSTONE_MICRO_BATCH_TOKENS", "0")
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        TrainerSettings()
