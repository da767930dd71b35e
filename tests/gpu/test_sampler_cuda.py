"""The sampler's CUDA path (CUDA-graphed decode, eager prefill) against its CPU eager path.

Same engine code, same built-in tiny model in float32 on both devices, with either decode
attention (SDPA over gathered blocks, the Triton paged kernel): greedy tokens must match
and logprobs agree to 1e-3; a seeded top-k request draws the same tokens; mixed adapters and
requests joining mid-flight go through the graphs too. Marked ``gpu``: run with
``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.sampler.engine import SamplerEngine
from whetstone.messages import LoraConfig, SampleRequest, SamplingParams
from whetstone.tensors import Tensor
from whetstone_ml.builtin import ensure_builtin_model
from whetstone_ml.lora import LoraAdapter, LoraModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    base = LoraModel(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32))
    adapter = LoraAdapter.init(base, LoraConfig(rank=4, seed=3))
    gen = torch.Generator().manual_seed(4)
    for f in adapter.factors.values():
        f.b.data.copy_(torch.randn(f.b.shape, generator=gen) * 0.05)
    directory = tmp_path_factory.mktemp("adapter")
    adapter.save_peft(directory, str(model_dir))
    return directory


def request(prompt: list[int], **params: object) -> SampleRequest:
    params.setdefault("stop_on_eos", False)
    return SampleRequest(
        request_id="q",
        tenant="t",
        base_model="m",
        prompt=Tensor.from_list(prompt, "int64"),
        num_samples=2,
        params=SamplingParams(**params),  # type: ignore[arg-type]
        prompt_logprobs=True,
    )


@pytest.mark.parametrize("kernel", ["sdpa", "triton"])
def test_cuda_graphs_match_cpu_eager(model_dir: Path, adapter_dir: Path, kernel: str) -> None:
    jobs = [
        (request([1, 20, 30, 40, 50, 60], max_tokens=24, temperature=0.0), None),
        (request(list(range(5, 45)), max_tokens=20, temperature=0.0), "a"),
        (request([7, 8, 9], max_tokens=16, temperature=1.0, top_k=20, seed=11), None),
    ]
    outputs = {}
    for device in ("cpu", "cuda"):
        engine = SamplerEngine(
            model_dir,
            device=device,
            prefill_tokens=16,
            decode_attention=kernel if device == "cuda" else "sdpa",
        )
        assert engine.cuda_graphs == (device == "cuda")
        engine.ensure_adapter("a", adapter_dir)
        outputs[device] = engine.generate(jobs)
    for cpu, cuda in zip(outputs["cpu"], outputs["cuda"], strict=True):
        for a, b in zip(cpu.sequences, cuda.sequences, strict=True):
            assert a.tokens.to_numpy().tolist() == b.tokens.to_numpy().tolist()
            np.testing.assert_allclose(b.logprobs.to_numpy(), a.logprobs.to_numpy(), atol=1e-3)
        np.testing.assert_allclose(
            cuda.prompt_logprobs.to_numpy()[1:], cpu.prompt_logprobs.to_numpy()[1:], atol=1e-3
        )
