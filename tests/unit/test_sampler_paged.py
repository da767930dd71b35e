"""The continuous-batching sampler against references: teacher-forced HF forwards, each request
alone, the trainer's logprobs, a float64 sampler; plus the block allocator and the Triton kernel.

CPU, float32, the built-in tiny Qwen3. A small block size and prefill budget make every run cross
block boundaries and split prompts into several chunks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.sampler.engine import SamplerEngine
from services.sampler.kvcache import BlockAllocator, CacheShape, PagedKVCache
from services.sampler.model import DecodeBatch, PrefillBatch
from services.sampler.sampling import CANDIDATES, SamplingRows, _inverse_cdf, sample
from services.trainer.engine import TrainerEngine
from whetstone.errors import UserError
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
from whetstone_ml.lora import LoraAdapter, LoraModel

PROMPTS = [
    "Q: What is the capital of France?\nA:",
    "The quick brown fox",
    "In 1950 there were many cats in the old town, and",
    "x",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("models"))


def make_engine(model_dir: Path, **kwargs: object) -> SamplerEngine:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("prefill_tokens", 13)
    return SamplerEngine(model_dir, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> SamplerEngine:
    return make_engine(model_dir)


def hf(model_dir: Path, adapter_dir: Path | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def make_adapter(model_dir: Path, directory: Path, seed: int, **config: object) -> Path:
    base = LoraModel(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32))
    adapter = LoraAdapter.init(base, LoraConfig(seed=seed, **config))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for f in adapter.factors.values():
            f.b.copy_(torch.randn(f.b.shape, generator=gen) * 0.05)
    adapter.save_peft(directory, str(model_dir))
    return directory


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "r4": make_adapter(model_dir, root / "r4", 1, rank=4),
        "r16": make_adapter(model_dir, root / "r16", 2, rank=16, train_unembed=True),
        "attn8": make_adapter(model_dir, root / "attn8", 3, rank=8, train_mlp=False),
    }


def request(engine: SamplerEngine, text: str, *, n: int = 1, plp: bool = False, **params):
    params.setdefault("stop_on_eos", False)
    return SampleRequest(
        request_id="r",
        tenant="t",
        base_model="tiny",
        prompt=Tensor.from_list(engine.tokenizer.encode(text), "int64"),
        num_samples=n,
        params=SamplingParams.model_construct(**params),
        prompt_logprobs=plp,
    )


def tokens(result, i: int = 0) -> list[int]:
    return result.sequences[i].tokens.to_numpy().tolist()


def logprobs(result, i: int = 0) -> np.ndarray:
    return result.sequences[i].logprobs.to_numpy()


@torch.inference_mode()
def teacher_forced(model: torch.nn.Module, prompt: list[int], output: list[int]) -> np.ndarray:
    """log p(x[t] | x[:t]) for every t >= 1 from one full-sequence forward, in float64."""
    ids = torch.tensor([prompt + output])
    scores = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return scores[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()


# ------------------------------------------------------------------------------ references


def test_paged_batched_path_equals_teacher_forced_forward(engine, model_dir):
    """Several prompts (chunked prefill, blocks of 4, num_samples forked) sampled at temperature
    1: every generated and prompt logprob equals a full-sequence HF forward over the result."""
    reference = hf(model_dir)
    jobs = [
        (request(engine, text, n=n, plp=True, max_tokens=m, temperature=1.0, seed=i), None)
        for i, (text, n, m) in enumerate(zip(PROMPTS, (1, 3, 2, 1), (9, 12, 7, 5), strict=True))
    ]
    for (req, _), result in zip(jobs, engine.generate(jobs), strict=True):
        prompt = req.prompt.to_numpy().tolist()
        for i in range(req.num_samples):
            expected = teacher_forced(reference, prompt, tokens(result, i))
            np.testing.assert_allclose(logprobs(result, i), expected[len(prompt) - 1 :], atol=1e-4)
            np.testing.assert_allclose(
                result.prompt_logprobs.to_numpy()[1:], expected[: len(prompt) - 1], atol=1e-4
            )


@pytest.mark.parametrize("prefill_tokens", [7, 1000])
def test_equal_length_prompts_prefilled_together_equal_teacher_forced(model_dir, prefill_tokens):
    """Whole prompts of one length share one batched SDPA per layer (a budget of 1000); a budget
    of 7 splits them into chunks that continue from the cache instead. Both equal HF."""
    engine = make_engine(model_dir, prefill_tokens=prefill_tokens)
    reference = hf(model_dir)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 1500, size=6).tolist() for _ in range(3)] + [[5] * 11]
    jobs = [
        (
            SampleRequest(
                request_id="r",
                tenant="t",
                base_model="tiny",
                prompt=Tensor.from_list(p, "int64"),
                params=SamplingParams(max_tokens=5, seed=i, stop_on_eos=False),
                prompt_logprobs=True,
            ),
            None,
        )
        for i, p in enumerate(prompts)
    ]
    for prompt, result in zip(prompts, engine.generate(jobs), strict=True):
        expected = teacher_forced(reference, prompt, tokens(result))
        np.testing.assert_allclose(logprobs(result), expected[len(prompt) - 1 :], atol=1e-4)
        np.testing.assert_allclose(
            result.prompt_logprobs.to_numpy()[1:], expected[: len(prompt) - 1], atol=1e-4
        )


def test_continuing_chunks_of_one_shape_share_one_sdpa_and_equal_teacher_forced(
    model_dir, monkeypatch
):
    """Three prompts that share a cached 12-token prefix continue from it together: their
    5-token chunks (same length, same start) run as one batched SDPA per layer, and every
    sample equals a teacher-forced HF forward."""
    seen: list[tuple[int, int, int]] = []
    groups = PrefillBatch._continued_groups

    def spy(self, device):
        out = groups(self, device)
        seen.extend((n, pos, tables.shape[0]) for n, pos, _, tables in out)
        return out

    monkeypatch.setattr(PrefillBatch, "_continued_groups", spy)
    engine = make_engine(model_dir, prefill_tokens=1000)
    rng = np.random.default_rng(2)
    prefix = rng.integers(3, 1500, size=12).tolist()
    prompts = [prefix + rng.integers(3, 1500, size=5).tolist() for _ in range(4)]

    def job(prompt: list[int], seed: int):
        params = SamplingParams(max_tokens=5, seed=seed, stop_on_eos=False)
        prompt_t = Tensor.from_list(prompt, "int64")
        return SampleRequest(
            request_id="r", tenant="t", base_model="tiny", prompt=prompt_t, params=params
        )

    engine.generate([(job(prompts[0], 0), None)])  # caches the prefix's three full blocks
    results = engine.generate([(job(p, i), None) for i, p in enumerate(prompts[1:], 1)])
    assert (5, 12, 3) in seen
    reference = hf(model_dir)
    for prompt, result in zip(prompts[1:], results, strict=True):
        assert result.prompt_cache_hit_tokens == 12
        expected = teacher_forced(reference, prompt, tokens(result))
        np.testing.assert_allclose(logprobs(result), expected[len(prompt) - 1 :], atol=1e-4)


def test_forked_samples_share_prompt_blocks_and_equal_one_greedy(model_dir):
    engine = make_engine(model_dir)
    req = request(engine, PROMPTS[2], n=3, max_tokens=6, temperature=0.0)
    prompt_len = req.prompt.numel
    engine.add(req, None)
    engine.step()
    while engine._prefilling:
        engine.step()
    first = engine._running[0].blocks[0]
    # the three samples and the prefix cache
    assert engine.cache.allocator.refs(first) == 4, "full prompt blocks are shared by the samples"
    assert prompt_len // engine.block_size >= 1
    results = {}
    while engine.has_work:
        results.update(engine.step())
    [result] = results.values()
    [alone] = engine.generate([(request(engine, PROMPTS[2], max_tokens=6, temperature=0.0), None)])
    assert tokens(result, 0) == tokens(result, 1) == tokens(result, 2) == tokens(alone)
    held = len(engine.prefix)  # the prompt's full blocks, kept for later requests
    assert held == prompt_len // engine.block_size
    assert engine.cache.allocator.num_free == engine.cache.shape.num_blocks - 1 - held, "leaked"


def test_requests_joining_and_leaving_equal_each_alone(model_dir):
    """Requests added between steps, with different lengths (so they leave at different steps),
    give exactly what each gives alone: seeded sampling is independent of the batch."""
    engine = make_engine(model_dir)
    reqs = [
        request(engine, PROMPTS[0], max_tokens=10, temperature=0.8, seed=1, top_p=0.9),
        request(engine, PROMPTS[1], n=2, max_tokens=4, temperature=1.0, seed=2, top_k=5),
        request(engine, PROMPTS[2], max_tokens=12, temperature=1.0, seed=3),
        request(engine, PROMPTS[3], max_tokens=3, temperature=0.0),
    ]
    schedule = {0: [0], 2: [1], 3: [2], 7: [3]}  # step -> requests added before it
    handles: dict[int, int] = {}
    results = {}
    step = 0
    while step <= max(schedule) or engine.has_work:
        for i in schedule.get(step, []):
            handles[engine.add(reqs[i], None)] = i
        results.update({handles[h]: r for h, r in engine.step()})
        step += 1
    for i, req in enumerate(reqs):
        [alone] = make_engine(model_dir, prefill_tokens=1000).generate([(req, None)])
        for k in range(req.num_samples):
            assert tokens(results[i], k) == tokens(alone, k)
            np.testing.assert_allclose(logprobs(results[i], k), logprobs(alone, k), atol=1e-5)
    again = make_engine(model_dir).generate([(r, None) for r in reqs])
    assert [tokens(r) for r in again] == [tokens(results[i]) for i in range(len(reqs))]


def test_rows_stopped_while_the_next_step_is_in_flight_are_dropped(model_dir):
    """Decode launches step N + 1 before it reads step N back, so a row that step N stops (a
    stop token, a stop string) is launched once more: that draw is dropped, its row and blocks
    go to a waiting request, nothing leaks, and every result equals the request alone."""
    probe = make_engine(model_dir)
    [free] = probe.generate([(request(probe, PROMPTS[0], max_tokens=9, temperature=0.0), None)])
    stop_token = tokens(free)[2]
    cut = tokens(free).index(stop_token) + 1
    text = probe.tokenizer.decode(tokens(free)[:6])
    reqs = [  # the first one's dropped draw would be its last (max_tokens) if it were kept
        request(probe, PROMPTS[0], max_tokens=cut + 1, temperature=0, stop_token_ids=[stop_token]),
        request(probe, PROMPTS[1], max_tokens=9, temperature=1.0, seed=5),
        request(probe, PROMPTS[0], max_tokens=9, temperature=0.0, stop_strings=[text[-2:]]),
        request(probe, PROMPTS[2], max_tokens=7, temperature=1.0, seed=6),
    ]
    engine = make_engine(model_dir, max_seqs=2, prefix_cache_blocks=0)
    start_free = engine.cache.allocator.num_free
    results = dict(zip(
        [engine.add(r, None) for r in reqs], [None] * len(reqs), strict=True
    ))  # fmt: skip
    while engine.has_work:
        results.update(engine.step())
    got = [results[h] for h in sorted(results)]
    assert tokens(got[0])[-1] == stop_token and got[0].sequences[0].stop_reason == "stop"
    assert len(tokens(got[0])) == cut
    assert got[2].sequences[0].stop_reason == "stop" and len(tokens(got[2])) < 9
    for req, result in zip(reqs, got, strict=True):
        [alone] = make_engine(model_dir).generate([(req, None)])
        assert tokens(result) == tokens(alone)
        np.testing.assert_allclose(logprobs(result), logprobs(alone), atol=1e-5)
    assert engine.cache.allocator.num_free == start_free
    assert not engine.has_work


def test_cancel_frees_rows_and_blocks_wherever_the_request_is(model_dir):
    """``cancel`` takes requests out while waiting, prefilling (a prompt longer than the prefill
    budget) and decoding: their results never come, their rows and blocks serve the others at
    once, and the others equal each alone."""
    engine = make_engine(model_dir, max_seqs=3, prefix_cache_blocks=0)
    start_free = engine.cache.allocator.num_free
    long_prompt = PROMPTS[2] * 3  # several prefill steps at 13 tokens a step
    reqs = {
        "decoding": request(engine, PROMPTS[0], n=2, max_tokens=40, temperature=1.0, seed=1),
        "prefilling": request(engine, long_prompt, max_tokens=5, temperature=0.0),
        "waiting": request(engine, PROMPTS[1], max_tokens=5, temperature=0.0),
        "kept": request(engine, PROMPTS[3], max_tokens=12, temperature=1.0, seed=2),
    }
    handles = {name: engine.add(req, None) for name, req in reqs.items()}
    results = {}
    for _ in range(3):
        results.update(engine.step())
    assert engine.num_waiting == 2  # "waiting" and "kept" wait for rows
    assert any(r.handle == handles["prefilling"] for r in engine._prefilling)
    assert {q.req.handle for q in engine._running} == {handles["decoding"]}
    cut = {handles[name] for name in ("decoding", "prefilling", "waiting")}
    assert sorted(engine.cancel(cut)) == sorted(cut)
    while engine.has_work:
        results.update(engine.step())
    assert set(results) == {handles["kept"]}
    [alone] = make_engine(model_dir).generate([(reqs["kept"], None)])
    assert tokens(results[handles["kept"]]) == tokens(alone)
    assert engine.cache.allocator.num_free == start_free
    assert engine._free_rows == 3 and engine._free_blocks == engine.cache.shape.num_blocks - 1


def test_adapters_of_different_ranks_in_one_batch_equal_each_alone(model_dir, adapters):
    engine = make_engine(model_dir)
    for name, directory in adapters.items():
        engine.ensure_adapter(name, directory)
    jobs = [
        (request(engine, PROMPTS[0], max_tokens=8, temperature=1.0, seed=5), "r4"),
        (request(engine, PROMPTS[1], max_tokens=8, temperature=1.0, seed=6), None),
        (request(engine, PROMPTS[2], n=2, max_tokens=6, temperature=1.0, seed=7), "r16"),
        (request(engine, PROMPTS[0], max_tokens=8, temperature=1.0, seed=8), "attn8"),
        (request(engine, PROMPTS[3], max_tokens=8, temperature=1.0, seed=9), "r4"),
    ]
    together = engine.generate(jobs)
    for (req, adapter), result in zip(jobs, together, strict=True):
        [alone] = engine.generate([(req, adapter)])
        reference = hf(model_dir, adapters[adapter] if adapter else None)
        prompt = req.prompt.to_numpy().tolist()
        for k in range(req.num_samples):
            assert tokens(result, k) == tokens(alone, k)
            expected = teacher_forced(reference, prompt, tokens(result, k))
            np.testing.assert_allclose(logprobs(result, k), expected[len(prompt) - 1 :], atol=1e-4)
    assert len({tuple(tokens(r)) for r in together}) == len(together)


def test_one_slot_serves_adapters_in_turn_without_leaking(model_dir, adapters):
    """A single decode slot per rank class: requests on two adapters of one class (r4 with MLP
    factors, attn8 without) take the slot in turn (admission waits for it), and each result is
    what that adapter gives alone on a fresh engine (no columns of the slot's previous holder)."""
    jobs = [
        (request(make_engine(model_dir), PROMPTS[0], max_tokens=6, temperature=0.0), "r4"),
        (request(make_engine(model_dir), PROMPTS[1], max_tokens=6, temperature=0.0), "attn8"),
        (request(make_engine(model_dir), PROMPTS[2], max_tokens=6, temperature=0.0), "r4"),
    ]
    small = make_engine(model_dir, adapter_slots=1)
    for name in ("r4", "attn8"):
        small.ensure_adapter(name, adapters[name])
    together = small.generate(jobs)
    assert small.slots.pools[8].holder == ["r4"]  # the last one to run holds it
    for (req, adapter), result in zip(jobs, together, strict=True):
        fresh = make_engine(model_dir)
        fresh.ensure_adapter(adapter, adapters[adapter])
        [alone] = fresh.generate([(req, adapter)])
        assert tokens(result) == tokens(alone)
        np.testing.assert_allclose(logprobs(result), logprobs(alone), atol=1e-5)


def test_evicted_adapter_is_reloaded_with_the_same_output(model_dir, adapters):
    """LRU bound 1: loading attn8 evicts r4 (its factors and its slot); r4 requested again is
    loaded again and samples exactly what it did before."""
    engine = make_engine(model_dir, max_adapters=1)
    job = (request(engine, PROMPTS[0], max_tokens=8, temperature=1.0, seed=3), "r4")
    engine.ensure_adapter("r4", adapters["r4"])
    [before] = engine.generate([job])
    engine.ensure_adapter("attn8", adapters["attn8"])
    assert not engine.lora.has("r4")
    assert all(module.adapters.keys() <= {"attn8"} for module in engine.lora.layers.values())
    assert "r4" not in engine.slots.pools[8].holder
    [other] = engine.generate([(job[0], "attn8")])
    engine.ensure_adapter("r4", adapters["r4"])
    [after] = engine.generate([job])
    assert tokens(after) == tokens(before) != tokens(other)
    np.testing.assert_allclose(logprobs(after), logprobs(before), atol=1e-6)


def test_adapter_rank_above_the_largest_slot_class_is_refused(model_dir, tmp_path):
    engine = make_engine(model_dir)
    directory = make_adapter(model_dir, tmp_path / "r128", 5, rank=128)
    with pytest.raises(UserError, match="rank 128"):
        engine.ensure_adapter("big", directory)
    assert not engine.lora.has("big")


@pytest.mark.parametrize("vocab", [5000, 151_936])
def test_two_level_inverse_cdf_equals_float64_cumsum(vocab):
    """The chunked inverse CDF picks what a full float64 cumsum picks, never a zero entry, at
    the edges (u = 0, u just under 1, a tail of zeros) too."""
    gen = torch.Generator().manual_seed(vocab)
    for trial in range(10):
        probs = torch.rand(6, vocab, generator=gen) ** 8
        probs[:, torch.randperm(vocab, generator=gen)[: vocab // 2]] = 0
        if trial % 2:
            probs[:, vocab // 3 :] = 0
        u = torch.rand(6, generator=gen)
        u[0], u[1] = 0.0, 1 - 1e-7
        cdf = probs.double().cumsum(-1)
        expected = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)
        got = _inverse_cdf(probs, u)
        assert torch.equal(got, expected.squeeze(-1).clamp(max=vocab - 1))
        assert (probs.gather(1, got[:, None]) > 0).all()


@pytest.mark.slow
def test_compiled_decode_step_equals_eager_on_cpu(model_dir, adapters):
    """The layer bodies that CUDA graphs run compiled (``decode_fns``), here compiled for the
    CPU: the same greedy tokens and logprobs as the eager step, with and without an adapter."""
    jobs = [
        (request(make_engine(model_dir), PROMPTS[0], max_tokens=6, temperature=0.0), "r4"),
        (request(make_engine(model_dir), PROMPTS[2], max_tokens=6, temperature=0.0), None),
    ]
    results = {}
    for compiled in (False, True):
        engine = make_engine(model_dir)
        engine.ensure_adapter("r4", adapters["r4"])
        forward, logits = engine.model.forward, engine.model.logits

        def decode_forward(*args, _f=forward, _c=compiled, **kwargs):
            return _f(*args, **kwargs, compiled=_c and isinstance(args[3], DecodeBatch))

        engine.model.forward = decode_forward  # type: ignore[method-assign]
        engine.model.logits = lambda h, lora=None, _l=logits, _c=compiled: _l(h, lora, _c)  # type: ignore[method-assign]
        results[compiled] = engine.generate(jobs)
    for eager, compiled in zip(results[False], results[True], strict=True):
        assert tokens(eager) == tokens(compiled)
        np.testing.assert_allclose(logprobs(compiled), logprobs(eager), atol=1e-5)


def test_compiled_base_prefill_equals_eager_on_cpu(model_dir):
    """Prefills without LoRA run compiled with a symbolic token count (``prefill_fns``) when the
    engine compiles: here compiled for the CPU, prompts of several lengths in chunks give the
    same prompt logprobs, greedy tokens and logprobs as the eager prefill."""

    def jobs(engine: SamplerEngine) -> list:
        return [
            (request(engine, text, plp=True, max_tokens=4, temperature=0.0), None)
            for text in PROMPTS
        ]

    eager = make_engine(model_dir, cuda_graphs=False, compile_decode=False)
    compiled = make_engine(model_dir, cuda_graphs=False, compile_decode=True)
    for a, b in zip(eager.generate(jobs(eager)), compiled.generate(jobs(compiled)), strict=True):
        assert tokens(a) == tokens(b)
        np.testing.assert_allclose(logprobs(b), logprobs(a), atol=1e-5)
        pa, pb = a.prompt_logprobs.to_numpy()[1:], b.prompt_logprobs.to_numpy()[1:]
        np.testing.assert_allclose(pb, pa, atol=1e-5)


def test_sampler_logprobs_match_trainer(model_dir, tmp_path):
    """Same weights (an adapter trained one step, saved for sampling): the sampler's logprobs at
    temperature 1 equal the trainer's forward logprobs of the same tokens within 1e-4."""
    trainer = TrainerEngine(model_dir)
    trainer.create_run("r", LoraConfig(rank=8, seed=1))
    rng = np.random.default_rng(0)
    batch = rng.integers(3, 1000, size=33)
    datum = Datum(
        model_input=Tensor.from_numpy(batch[:-1]),
        loss_fn_inputs={
            "target_tokens": Tensor.from_numpy(batch[1:]),
            "weights": Tensor.from_numpy(np.ones(32, dtype=np.float32)),
        },
    )
    trainer.forward_backward("r", ForwardBackward(data=[datum], loss_fn="cross_entropy"))
    trainer.optim_step("r", AdamParams(learning_rate=1e-2))
    trainer.save_sampler("r", tmp_path / "adapter")

    engine = make_engine(model_dir)
    engine.ensure_adapter("r", tmp_path / "adapter")
    req = request(engine, PROMPTS[0], n=2, max_tokens=10, temperature=1.0, seed=3)
    [result] = engine.generate([(req, "r")])
    prompt = req.prompt.to_numpy().tolist()
    for k in range(2):
        ids = np.asarray(prompt + tokens(result, k), dtype=np.int64)
        datum = Datum(
            model_input=Tensor.from_numpy(ids[:-1]),
            loss_fn_inputs={
                "target_tokens": Tensor.from_numpy(ids[1:]),
                "weights": Tensor.from_numpy(np.ones(len(ids) - 1, dtype=np.float32)),
            },
        )
        out = trainer.forward_backward(
            "r", ForwardBackward(data=[datum], loss_fn="cross_entropy", forward_only=True)
        )
        learner = out.outputs[0]["logprobs"].to_numpy()
        np.testing.assert_allclose(logprobs(result, k), learner[len(prompt) - 1 :], atol=1e-4)


def test_stop_string_across_token_boundary(engine):
    [greedy] = engine.generate(
        [(request(engine, PROMPTS[1], max_tokens=16, temperature=0.0), None)]
    )
    full = tokens(greedy)
    pieces = [engine.tokenizer.decode([t]) for t in full]

    # A string made of the end of token j and the start of token j + 1, found in no single
    # token and first completed by token j + 1: only a check across the boundary can see it.
    def first_cut(stop: str) -> int:
        return next(n for n in range(1, len(full) + 1) if stop in engine.tokenizer.decode(full[:n]))

    candidates = [
        (pieces[j][-1:] + pieces[j + 1][:1], j + 2)
        for j in range(1, len(full) - 1)
        if pieces[j][-1:].strip() and pieces[j + 1][:1].strip()
    ]
    stop, cut = next(
        (stop, cut)
        for stop, cut in candidates
        if all(stop not in piece for piece in pieces) and first_cut(stop) == cut
    )
    req = request(engine, PROMPTS[1], max_tokens=16, temperature=0.0, stop_strings=[stop])
    [result] = engine.generate([(req, None)])
    assert tokens(result) == full[:cut]
    assert result.sequences[0].stop_reason == "stop"


def test_add_rejects_bad_request_without_touching_the_others(engine):
    from whetstone.errors import UserError

    good = engine.add(request(engine, PROMPTS[0], max_tokens=3, temperature=0.0), None)
    with pytest.raises(UserError):
        engine.add(request(engine, PROMPTS[0], max_tokens=3, temperature=-1.0), None)
    done = {}
    while engine.has_work:
        done.update(engine.step())
    assert list(done) == [good] and len(tokens(done[good])) == 3


# ------------------------------------------------------------------------------ sampling


def reference_sample(logits: torch.Tensor, t: float, k: int, p: float, u: float):
    """Float64 reference: full stable sort, top-k, renormalise, top-p, inverse CDF at ``u``;
    without truncation, inverse CDF over the vocabulary in id order (no sort)."""
    probs = torch.softmax(logits.double() / t, dim=-1)
    if k >= len(probs) and p >= 1:
        cdf = probs.cumsum(0)
        pick = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])]), right=True))
        return pick, float(probs[pick].log())
    values, ids = probs.sort(descending=True, stable=True)
    values = values * (torch.arange(len(values)) < k)
    values = values / values.sum()
    values = values * ((values.cumsum(0) - values) < p)
    cdf = values.cumsum(0)
    pick = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])]), right=True))
    return int(ids[pick]), float(torch.log(values[pick] / values.sum()))


@pytest.mark.parametrize(
    "vocab,scale",
    [(3000, 4.0), (5000, 0.05)],  # peaked; flat (the top-p fallback sort)
)
def test_sampling_matches_float64_reference(vocab, scale):
    gen = torch.Generator().manual_seed(0)
    rows = [(1.0, vocab, 1.0), (0.7, 40, 1.0), (1.3, vocab, 0.9), (1.0, 2000, 0.8), (0.5, 7, 0.5)]
    b = len(rows)
    logits = torch.randn(b, vocab, generator=gen) * scale
    uniforms = torch.rand(b, generator=gen)
    t, k, p = (torch.tensor(c) for c in zip(*rows, strict=True))
    batch = SamplingRows(
        temperature=t.float(),
        greedy=torch.zeros(b, dtype=torch.bool),
        top_k=k.long(),
        top_p=p.float(),
        uniforms=uniforms,
        any_greedy=False,
        all_greedy=False,
        any_truncated=True,
        max_top_k=max(x for x in k.tolist() if x < vocab),
    )
    got_tokens, got_logprobs = sample(logits, batch)
    for i, (ti, ki, pi) in enumerate(rows):
        token, logprob = reference_sample(logits[i], ti, ki, pi, float(uniforms[i]))
        assert int(got_tokens[i]) == token
        assert float(got_logprobs[i]) == pytest.approx(logprob, abs=1e-4)
    if scale < 1:  # the flat case really needed more than the candidate set
        assert vocab * 0.9 > CANDIDATES


# ------------------------------------------------------------------------------ blocks and kernels


def test_block_allocator_refcounts():
    alloc = BlockAllocator(6)
    blocks = [alloc.allocate() for _ in range(5)]
    assert 0 not in blocks and alloc.num_free == 0
    with pytest.raises(RuntimeError):
        alloc.allocate()
    alloc.share(blocks[0])
    alloc.release([blocks[0]])
    assert alloc.num_free == 0 and alloc.refs(blocks[0]) == 1
    alloc.release(blocks)
    assert alloc.num_free == 5
    with pytest.raises(AssertionError):
        alloc.release([blocks[1]])


def test_fork_copies_only_the_partial_block():
    cache = PagedKVCache(CacheShape(1, 1, 2, 4, 8), torch.float32, torch.device("cpu"))
    blocks = [cache.allocator.allocate() for _ in range(2)]
    cache.k[0, blocks[1]] = 7.0
    table = cache.fork(blocks, 6)
    assert table[0] == blocks[0] and table[1] != blocks[1]
    assert torch.equal(cache.k[0, table[1]], cache.k[0, blocks[1]])
    assert cache.allocator.refs(blocks[0]) == 2
    assert cache.fork(blocks, 8) == blocks  # all full: nothing copied


def test_triton_paged_kernel_equals_sdpa_path():
    """The Triton decode kernel on Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before
    anything imports Triton, and Triton installed); skipped otherwise, as in CI."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    pytest.importorskip("triton")
    from services.sampler.paged_attention import paged_decode_attention

    torch.manual_seed(0)
    kvh, hd, bs = 2, 32, 4
    cache = PagedKVCache(CacheShape(1, kvh, hd, bs, 40), torch.float32, torch.device("cpu"))
    cache.k.normal_()
    cache.v.normal_()
    table = torch.randperm(39)[:24].add(1).view(2, 12)
    table = torch.cat([table, torch.zeros(1, 12, dtype=torch.long)])
    table[2, 0] = 33
    context = torch.tensor([14, 48, 3])
    q = torch.randn(3, 8, hd)
    unused = torch.empty(0)  # decode reads its new keys and values from the cache
    sdpa = DecodeBatch(torch.zeros(3, dtype=torch.long), table, context).attend(
        cache, 0, q, unused, unused
    )
    out = paged_decode_attention(q, cache.k[0], cache.v[0], table, context)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)
