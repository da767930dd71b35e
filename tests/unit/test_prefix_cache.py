"""The sampler's prefix cache: full prompt blocks reused by later requests with the same weights.

Outputs with the cache equal outputs without it (greedy and seeded, with an adapter too), hits are
counted exactly (``prompt_cache_hit_tokens``), the weights are part of the key, positions a
request scores are never skipped, the LRU bound holds, and idle cached blocks make room for
requests when the KV cache is short. The built-in tiny Qwen3 on CPU, 4-token blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.sampler.engine import SamplerEngine
from whetstone.messages import LoraConfig, SampleRequest, SampleResult, SamplingParams
from whetstone.tensors import Tensor
from whetstone_ml.builtin import ensure_builtin_model
from whetstone_ml.lora import LoraAdapter, LoraModel

BS = 4
BASE = list(range(40, 63))  # 23 tokens: 5 full blocks and 3 tokens over


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = LoraModel(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32))
    adapter = LoraAdapter.init(base, LoraConfig(rank=4, seed=1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for f in adapter.factors.values():
            f.b.copy_(torch.randn(f.b.shape, generator=gen) * 0.05)
    directory = tmp_path_factory.mktemp("adapter") / "a"
    adapter.save_peft(directory, str(model_dir))
    return directory


def make_engine(model_dir: Path, adapter_dir: Path, **kwargs: object) -> SamplerEngine:
    engine = SamplerEngine(model_dir, block_size=BS, prefill_tokens=64, **kwargs)  # type: ignore[arg-type]
    engine.ensure_adapter("a", adapter_dir)
    return engine


def request(prompt: list[int], n: int = 1, **fields: object) -> SampleRequest:
    params = {"max_tokens": 5, "stop_on_eos": False, **fields.pop("params", {})}  # type: ignore[dict-item]
    return SampleRequest(
        request_id="req",
        tenant="t",
        base_model="tiny",
        prompt=Tensor.from_list(prompt, "int64"),
        num_samples=n,
        params=SamplingParams(**params),
        **fields,
    )


def run(engine: SamplerEngine, req: SampleRequest, adapter: str | None = None) -> SampleResult:
    return engine.generate([(req, adapter)])[0]


def same(a: SampleResult, b: SampleResult) -> None:
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert x.tokens.to_numpy().tolist() == y.tokens.to_numpy().tolist()
        np.testing.assert_allclose(x.logprobs.to_numpy(), y.logprobs.to_numpy(), atol=1e-5)


# A conversation-like sequence: (prompt, samples, adapter, sampling params, expected hit tokens).
STEPS = [
    (BASE, 1, None, {"temperature": 0.0}, 0),
    (BASE, 1, None, {"temperature": 0.0}, 20),  # 5 full blocks; the last token is recomputed
    (BASE + [7, 8, 9, 10, 11], 3, None, {"seed": 3}, 20),  # a longer prompt: the shared part
    (BASE + [7, 8, 9, 10, 11], 3, None, {"seed": 3}, 24),  # now its 6th block too (28 tokens)
    (BASE, 1, "a", {"temperature": 0.0}, 0),  # other weights: nothing shared
    (BASE, 2, "a", {"seed": 11, "temperature": 0.9}, 20),
    (BASE[:8] + [1, 2, 3, 4, 5], 1, None, {"seed": 5}, 8),  # diverges in the 3rd block
    ([9, 9, 9, 9], 1, None, {"temperature": 0.0}, 0),  # one block: the last token is recomputed
]


def test_outputs_with_the_cache_equal_outputs_without_and_hits_are_exact(model_dir, adapter_dir):
    cached = make_engine(model_dir, adapter_dir)
    plain = make_engine(model_dir, adapter_dir, prefix_cache_blocks=0)
    total = 0
    for prompt, n, adapter, params, hits in STEPS:
        with_cache = run(cached, request(prompt, n, params=params), adapter)
        without = run(plain, request(prompt, n, params=params), adapter)
        same(with_cache, without)
        assert with_cache.prompt_cache_hit_tokens == hits, (prompt, adapter)
        assert without.prompt_cache_hit_tokens == 0
        total += hits
    assert cached.prefix.hit_tokens == total
    held = len(cached.prefix)
    assert cached.cache.allocator.num_free == cached.cache.shape.num_blocks - 1 - held


def test_a_reloaded_adapter_does_not_reuse_its_old_blocks(model_dir, adapter_dir):
    engine = make_engine(model_dir, adapter_dir, max_adapters=1)
    run(engine, request(BASE), "a")
    assert run(engine, request(BASE), "a").prompt_cache_hit_tokens == 20
    engine.ensure_adapter("b", adapter_dir)  # evicts "a" (max_adapters=1)
    engine.ensure_adapter("a", adapter_dir)  # loaded again: its weights could have changed
    assert run(engine, request(BASE), "a").prompt_cache_hit_tokens == 0


def test_scored_positions_are_never_served_from_the_cache(model_dir, adapter_dir):
    engine = make_engine(model_dir, adapter_dir)
    plain = make_engine(model_dir, adapter_dir, prefix_cache_blocks=0)
    run(engine, request(BASE))
    whole = request(BASE, prompt_logprobs=True, topk_prompt_logprobs=2)
    got = run(engine, whole)
    assert got.prompt_cache_hit_tokens == 0  # every position is scored
    # the last 6 are scored: positions from 16 on are needed, so 4 blocks (16 tokens) are reused
    tail = request(BASE, prompt_logprobs=True, prompt_logprobs_last_n=6)
    got = run(engine, tail)
    assert got.prompt_cache_hit_tokens == 16
    expected = run(plain, tail)
    np.testing.assert_allclose(
        got.prompt_logprobs.to_numpy(), expected.prompt_logprobs.to_numpy(), atol=1e-5
    )
    targets = Tensor.from_numpy(np.asarray(BASE[1:], dtype=np.int64)[:, None])
    assert run(engine, request(BASE, target_prompt_logprobs=targets)).prompt_cache_hit_tokens == 0


def test_the_lru_bound_evicts_leaves_first(model_dir, adapter_dir):
    engine = make_engine(model_dir, adapter_dir, prefix_cache_blocks=3)
    run(engine, request(BASE))  # 5 full blocks offered, 3 kept: the first three
    assert len(engine.prefix) == 3
    assert run(engine, request(BASE)).prompt_cache_hit_tokens == 12
    other = [200 + i for i in range(13)]
    run(engine, request(other))  # three blocks of another prompt push BASE's out
    assert run(engine, request(BASE)).prompt_cache_hit_tokens == 0
    assert run(engine, request(other)).prompt_cache_hit_tokens == 0  # BASE's pushed it out
    held = len(engine.prefix)
    assert held == 3
    assert engine.cache.allocator.num_free == engine.cache.shape.num_blocks - 1 - held


def test_idle_cached_blocks_make_room_when_the_kv_cache_is_short(model_dir, adapter_dir):
    # 16 blocks: BASE's 5 stay cached (idle) after it finishes, and a request that needs 14
    # blocks is admitted only by evicting them.
    engine = make_engine(model_dir, adapter_dir, kv_cache_tokens=64)
    run(engine, request(BASE))
    assert len(engine.prefix) == 5
    big = request(list(range(300, 352)), params={"max_tokens": 4, "temperature": 0.0})
    engine.add(big, None)
    for _ in range(50):
        finished = engine.step()
        if finished:
            break
    assert finished, "the request waited for blocks only the prefix cache held"
    assert engine.cache.allocator.num_free == engine.cache.shape.num_blocks - 1 - len(engine.prefix)
