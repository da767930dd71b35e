"""The trainer and sampler engines on a CUDA device agree with the CPU reference.

Marked ``gpu``: skipped (and deselected by default) without CUDA. Run on a GPU machine with
``pytest -m gpu tests/gpu``."""

from __future__ import annotations

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
from whetstone.tensors import Tensor
from whetstone_ml.builtin import ensure_builtin_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def datum(rng: np.random.Generator, n: int) -> Datum:
    tokens = rng.integers(3, 2000, size=n + 1)
    return Datum(
        model_input=Tensor.from_numpy(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": Tensor.from_numpy(tokens[1:]),
            "weights": Tensor.from_numpy(np.ones(n, dtype=np.float32)),
        },
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("models"))


def test_trainer_on_cuda_matches_cpu(model_dir: Path) -> None:
    rng = np.random.default_rng(0)
    cmd = ForwardBackward(data=[datum(rng, 17), datum(rng, 40)], loss_fn="cross_entropy")
    losses = {}
    for device in ("cpu", "cuda"):
        engine = TrainerEngine(model_dir, device=device)
        engine.create_run("r", LoraConfig(rank=8, seed=1))
        first = engine.forward_backward("r", cmd)
        engine.optim_step("r", AdamParams(learning_rate=1e-2))
        second = engine.forward_backward("r", cmd.model_copy(update={"forward_only": True}))
        losses[device] = (
            first.metrics["loss:sum"],
            second.metrics["loss:sum"],
            first.outputs[1]["logprobs"].to_numpy(),
        )
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=1e-4)
    assert losses["cuda"][1] == pytest.approx(losses["cpu"][1], rel=1e-4)
    assert losses["cuda"][1] < losses["cuda"][0]
    np.testing.assert_allclose(losses["cuda"][2], losses["cpu"][2], atol=1e-3)


def test_sampler_on_cuda_matches_cpu(model_dir: Path) -> None:
    prompt = Tensor.from_list([1, 20, 30, 40, 50, 60], "int64")
    request = SampleRequest(
        request_id="q",
        tenant="t",
        base_model="m",
        prompt=prompt,
        num_samples=2,
        params=SamplingParams(max_tokens=24, temperature=0.0, stop_on_eos=False),
        prompt_logprobs=True,
    )
    outputs = {}
    for device in ("cpu", "cuda"):
        result = SamplerEngine(model_dir, device=device).generate([(request, None)])[0]
        outputs[device] = result
    cpu, cuda = outputs["cpu"], outputs["cuda"]
    assert [s.tokens.to_numpy().tolist() for s in cuda.sequences] == [
        s.tokens.to_numpy().tolist() for s in cpu.sequences
    ]
    np.testing.assert_allclose(
        cuda.prompt_logprobs.to_numpy()[1:], cpu.prompt_logprobs.to_numpy()[1:], atol=1e-3
    )
