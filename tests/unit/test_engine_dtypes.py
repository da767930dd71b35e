"""The engines load the base model in the registry's dtype and on its device (CPU here).

bfloat16 on a CPU is slow but exact enough to check what matters: the base weights really are
bfloat16, the trainer's LoRA factors and AdamW state stay float32 master weights, and logprobs
and sampled tokens come out finite and close to the float32 engine's.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from services.sampler.engine import SamplerEngine
from services.trainer.engine import TrainerEngine
from whetstone.messages import (
    AdamParams,
    Datum,
    ForwardBackward,
    LoraConfig,
    SampleRequest,
    SamplingParams,
)
from whetstone.models.builtin import BUILTIN_MODEL_DIRNAME
from whetstone.models.registry import builtin_spec
from whetstone.tensors import Tensor
from whetstone_ml.loading import torch_dtype


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty models directory: ``from_spec`` must generate the built-in model into it."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def bf16_trainer(models_dir: Path) -> TrainerEngine:
    spec = builtin_spec(models_dir, dtype="bfloat16")
    engine = TrainerEngine.from_spec(spec)
    assert (models_dir / BUILTIN_MODEL_DIRNAME / "config.json").is_file()
    return engine


def _datum(seed: int, n: int = 12) -> Datum:
    rng = random.Random(seed)
    seq = [rng.randrange(3, 2000) for _ in range(n + 1)]
    return Datum(
        model_input=Tensor.from_list(seq[:-1], "int64"),
        loss_fn_inputs={"target_tokens": Tensor.from_list(seq[1:], "int64")},
    )


def test_dtype_names_and_torch_dtypes() -> None:
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        torch_dtype("int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        torch_dtype(torch.float64)


def test_trainer_in_bfloat16_keeps_float32_master_weights(
    bf16_trainer: TrainerEngine, models_dir: Path
) -> None:
    engine = bf16_trainer
    assert engine.dtype is torch.bfloat16
    assert {p.dtype for p in engine.model.base_tensors()} == {torch.bfloat16}
    engine.create_run("r", LoraConfig(rank=4, seed=0))
    adapter = engine.runs["r"].adapter
    assert {t.dtype for t in adapter.parameters()} == {torch.float32}

    cmd = ForwardBackward(data=[_datum(1), _datum(2, 7)], loss_fn="cross_entropy")
    result = engine.forward_backward("r", cmd)
    logprobs = np.concatenate([o["logprobs"].to_numpy() for o in result.outputs])
    assert np.isfinite(logprobs).all() and (logprobs < 0).all()
    assert math.isfinite(result.metrics["loss:sum"])

    # The same numbers as the float32 engine, within bfloat16's precision.
    reference = TrainerEngine(models_dir / BUILTIN_MODEL_DIRNAME)
    reference.create_run("r", LoraConfig(rank=4, seed=0))
    expected = reference.forward_backward("r", cmd.model_copy(update={"forward_only": True}))
    np.testing.assert_allclose(
        logprobs, np.concatenate([o["logprobs"].to_numpy() for o in expected.outputs]), atol=0.15
    )

    before = [t.detach().clone() for t in adapter.parameters()]
    step = engine.optim_step("r", AdamParams(learning_rate=1e-2))
    assert math.isfinite(step.metrics["grad_norm:mean"]) and step.metrics["grad_norm:mean"] > 0
    after = adapter.parameters()
    assert all(torch.isfinite(t).all() for t in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    moments = engine.runs["r"].optimizer.state[after[0]]
    assert moments["exp_avg"].dtype == torch.float32

    logits = engine.forward_logits("r", torch.tensor([[5, 6, 7, 8]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_sampler_in_bfloat16_samples_finite_logprobs(
    bf16_trainer: TrainerEngine, models_dir: Path, tmp_path: Path
) -> None:
    spec = builtin_spec(models_dir, device="cpu", dtype="bfloat16")
    engine = SamplerEngine.from_spec(spec, max_adapters=2)
    assert engine.dtype is torch.bfloat16 and engine.context_length == spec.context_length
    bf16_trainer.create_run("s", LoraConfig(rank=4, seed=3))
    bf16_trainer.save_sampler("s", tmp_path / "adapter")
    engine.ensure_adapter("s", tmp_path / "adapter")
    layer = next(iter(engine.lora.layers.values()))
    assert layer.adapters["s"].a.dtype is torch.bfloat16  # cast to the base model's dtype

    prompt = engine.tokenizer.encode("Q: What is the capital of France?\nA:")
    request = SampleRequest(
        request_id="req",
        tenant="t",
        base_model=spec.name,
        prompt=Tensor.from_list(prompt, "int64"),
        num_samples=2,
        params=SamplingParams(max_tokens=6, seed=7, stop_on_eos=False),
        prompt_logprobs=True,
    )
    for adapter_id in (None, "s"):
        result = engine.generate([(request, adapter_id)])[0]
        for seq in result.sequences:
            tokens, lps = seq.tokens.to_numpy(), seq.logprobs.to_numpy()
            assert len(tokens) == 6 and ((0 <= tokens) & (tokens < engine.vocab_size)).all()
            assert np.isfinite(lps).all() and (lps <= 0).all()
        assert result.prompt_logprobs is not None
        assert np.isfinite(result.prompt_logprobs.to_numpy()[1:]).all()
