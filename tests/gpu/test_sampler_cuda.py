"""The sampler's CUDA path (CUDA-graphed decode, eager prefill) against its CPU eager path.

Same engine code, same built-in tiny model in float32 on both devices, with either decode
attention (SDPA over gathered blocks, the Triton paged kernel) and with the graphed step's layer
bodies compiled or not: greedy tokens must match and logprobs agree to 1e-3; a seeded top-k
request draws the same tokens; mixed adapters go through the graphs too; one prompt is long
enough that attention spans several of the kernel's 64-token tiles. The Triton kernel alone is
checked against a float64 reference at Qwen3-4B's attention shapes (32/8 heads, head_dim 128,
16-token blocks, contexts up to 768) in float32 and bf16. Marked ``gpu``: run with
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


@pytest.mark.parametrize(
    ("kernel", "compiled"), [("sdpa", False), ("triton", False), ("sdpa", True), ("triton", True)]
)
def test_cuda_graphs_match_cpu_eager(
    model_dir: Path, adapter_dir: Path, kernel: str, compiled: bool
) -> None:
    jobs = [
        (request([1, 20, 30, 40, 50, 60], max_tokens=24, temperature=0.0), None),
        (request(list(range(5, 45)), max_tokens=20, temperature=0.0), "a"),
        (request([7, 8, 9], max_tokens=16, temperature=1.0, top_k=20, seed=11), None),
        (request([(7 * i) % 300 + 3 for i in range(150)], max_tokens=40, temperature=0.0), "a"),
    ]
    outputs = {}
    for device in ("cpu", "cuda"):
        engine = SamplerEngine(
            model_dir,
            device=device,
            prefill_tokens=64,
            decode_attention=kernel if device == "cuda" else "sdpa",
            compile_decode=compiled and device == "cuda",
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_float64_reference_at_qwen3_4b_shapes(dtype: torch.dtype) -> None:
    from services.sampler.kvcache import CacheShape, PagedKVCache
    from services.sampler.model import DecodeBatch
    from services.sampler.paged_attention import paged_decode_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, heads, kvh, hd, bs, n_blocks = 24, 32, 8, 128, 16, 48
    cache = PagedKVCache(CacheShape(1, kvh, hd, bs, 24 * 48 + 1), dtype, torch.device("cuda"))
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    table = torch.randperm(24 * 48, device="cuda", generator=gen).add(1).view(b, n_blocks)
    context = torch.randint(1, n_blocks * bs + 1, (b,), device="cuda", generator=gen)
    context[:4] = torch.tensor([1, 63, 64, 65], device="cuda")  # tile edges
    context[4] = n_blocks * bs
    q = torch.randn(b, heads, hd, device="cuda", dtype=dtype, generator=gen)
    out = torch.full((b, heads * hd), float("nan"), device="cuda", dtype=dtype)
    out.copy_(paged_decode_attention(q, cache.k[0], cache.v[0], table, context))
    assert torch.isfinite(out).all()
    ref = torch.empty(b, heads * hd, dtype=torch.float64, device="cuda")
    for row in range(b):
        n = int(context[row])
        k = cache.k[0][table[row]].reshape(-1, kvh, hd)[:n].double()
        v = cache.v[0][table[row]].reshape(-1, kvh, hd)[:n].double()
        qq = q[row].double().view(kvh, heads // kvh, hd)
        p = torch.einsum("hgd,thd->hgt", qq, k).mul(hd**-0.5).softmax(-1)
        ref[row] = torch.einsum("hgt,thd->hgd", p, v).reshape(-1)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), float(err)
    unused = torch.empty(0, device="cuda")
    sdpa = DecodeBatch(torch.zeros(b, dtype=torch.long, device="cuda"), table, context)
    sdpa_out = sdpa.attend(cache, 0, q, unused, unused).double()
    assert (sdpa_out - ref).norm() / ref.norm() < (1e-5 if dtype == torch.float32 else 1e-2)
