"""The vLLM engine against the same references as Whetstone's engine (tests/unit/
test_sampler_engine.py and test_sampler_features.py): no-cache greedy loops, PEFT, float64
logprobs, every sampling feature of protocol.md 5.8-5.9 vLLM does, and a refusal for the rest.

vLLM's CPU kernels (attention, its LoRA kernels) sum in other orders than a float64 reference:
logprobs are compared at ``ATOL``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from services.sampler.vllm_engine import VllmEngine
from tests.vllm.conftest import MAX_ADAPTERS, peft_model
from whetstone.errors import UserError
from whetstone.messages import TOPK_EMPTY_LOGPROB, SampleRequest, SampleResult, SamplingParams
from whetstone.tensors import Tensor

ATOL = 1e-4
PROMPTS = [
    "Q: What is the capital of France?\nA:",
    "The quick brown fox",
    "In 1950 there were many cats in",
]


def _request(
    engine: VllmEngine,
    text: str | list[int],
    *,
    num_samples: int = 1,
    fields: dict[str, object] | None = None,
    **params: object,
) -> SampleRequest:
    """A request for ``text``; EOS stopping is off unless asked, so lengths are predictable."""
    params.setdefault("stop_on_eos", False)
    tokens = engine.tokenizer.encode(text) if isinstance(text, str) else text
    return SampleRequest(
        request_id="req",
        tenant="tenant",
        base_model="tiny",
        prompt=Tensor.from_list(tokens, "int64"),
        num_samples=num_samples,
        # Unvalidated: the engine's own checks are under test (the gateway validates first).
        params=SamplingParams.model_construct(**params),
        **(fields or {}),
    )


def _one(engine: VllmEngine, request: SampleRequest, adapter: str | None = None) -> SampleResult:
    return engine.generate([(request, adapter)])[0]


def _tokens(result: SampleResult, i: int = 0) -> list[int]:
    return result.sequences[i].tokens.to_numpy().tolist()


def _logprobs(result: SampleResult, i: int = 0) -> np.ndarray:
    return result.sequences[i].logprobs.to_numpy()


@torch.inference_mode()
def _greedy_reference(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.inference_mode()
def _logp(model: torch.nn.Module, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """float64 log-softmax of every position's next-token logits ``[len(ids), V]``."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1)


@pytest.fixture(scope="module")
def f64(model_dir: Path) -> torch.nn.Module:
    return peft_model(model_dir, None, torch.float64)


# ------------------------------------------------------------------------------ correctness


@pytest.mark.parametrize("adapter", [None, "a"])
def test_greedy_matches_no_cache_reference(engine, adapters, model_dir, adapter):
    reference = peft_model(model_dir, adapters[adapter] if adapter else None)
    for text in PROMPTS[:2]:
        prompt = engine.tokenizer.encode(text)
        result = _one(engine, _request(engine, prompt, max_tokens=12, temperature=0.0), adapter)
        assert _tokens(result) == _greedy_reference(reference, prompt, 12)
        assert result.sequences[0].stop_reason == "length"


def test_batch_of_base_and_adapters_equals_each_alone(engine, adapters):
    """Base-model and LoRA requests added together still come out as each alone (they never
    share a vLLM batch, which vLLM-cpu gets wrong), and the adapters change the output."""
    jobs = [
        (_request(engine, PROMPTS[0], max_tokens=10, temperature=0.0), "a"),
        (_request(engine, PROMPTS[0], max_tokens=10, temperature=0.0), None),
        (_request(engine, PROMPTS[0], max_tokens=10, temperature=0.0), "b"),
        (_request(engine, PROMPTS[1], max_tokens=8, temperature=0.0, num_samples=2), "a"),
    ]
    together = engine.generate(jobs)
    assert len({tuple(_tokens(r)) for r in together[:3]}) == 3, "adapters change the output"
    for job, batched in zip(jobs, together, strict=True):
        alone = _one(engine, *job)
        for i in range(len(alone.sequences)):
            assert _tokens(batched, i) == _tokens(alone, i)
            np.testing.assert_allclose(_logprobs(batched, i), _logprobs(alone, i), atol=ATOL)


@pytest.mark.parametrize("adapter,temperature", [(None, 1.0), (None, 0.7), ("a", 1.0), (None, 0.0)])
def test_logprobs_match_float64_reference(engine, adapters, model_dir, adapter, temperature):
    reference = peft_model(model_dir, adapters[adapter] if adapter else None, torch.float64)
    prompt = engine.tokenizer.encode(PROMPTS[2])
    request = _request(
        engine,
        prompt,
        max_tokens=10,
        temperature=temperature,
        seed=7,
        fields={"prompt_logprobs": True},
    )
    result = _one(engine, request, adapter)
    output = _tokens(result)
    assert len(output) == 10
    # Temperature 0 reports the temperature-1 distribution, as Whetstone's engine does.
    ref = _logp(reference, prompt + output, temperature or 1.0)[len(prompt) - 1 : -1]
    expected = ref.gather(-1, torch.tensor(output)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(_logprobs(result), expected, atol=ATOL)
    plp = result.prompt_logprobs.to_numpy()
    assert plp.dtype == np.float32 and plp.shape == (len(prompt),) and math.isnan(plp[0])
    at_t1 = _logp(reference, prompt)[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    np.testing.assert_allclose(plp[1:], at_t1.numpy(), atol=ATOL)


# ------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_greedy_num_samples_are_copies(engine, temperature):
    """vLLM samples greedily below temperature 1e-5 and refuses n > 1 there: one sample, copied."""
    request = _request(engine, PROMPTS[0], max_tokens=5, temperature=temperature, num_samples=3)
    result = _one(engine, request)
    assert len(result.sequences) == 3
    assert _tokens(result, 0) == _tokens(result, 1) == _tokens(result, 2)


def test_seed_determinism_and_num_samples(engine):
    request = _request(engine, PROMPTS[0], max_tokens=8, temperature=1.0, seed=123, num_samples=3)
    first, second = _one(engine, request), _one(engine, request)
    runs = [[_tokens(r, i) for i in range(3)] for r in (first, second)]
    assert runs[0] == runs[1]
    assert all(len(t) == 8 for t in runs[0])
    assert len({tuple(t) for t in runs[0]}) > 1, "samples of one request should differ"
    other = _one(engine, _request(engine, PROMPTS[0], max_tokens=8, seed=124, num_samples=3))
    assert [_tokens(other, i) for i in range(3)] != runs[0]
    for seq in first.sequences:
        assert seq.tokens.dtype == "int64" and seq.logprobs.dtype == "float32"


def test_seeded_request_independent_of_batch_neighbours(engine):
    request = _request(engine, PROMPTS[1], max_tokens=8, temperature=1.0, seed=5, num_samples=2)
    alone = _one(engine, request)
    together = engine.generate(
        [
            (_request(engine, PROMPTS[0], max_tokens=4, temperature=1.0, seed=9), None),
            (request, None),
        ]
    )
    assert [_tokens(together[1], i) for i in range(2)] == [_tokens(alone, i) for i in range(2)]


def test_cancel_takes_requests_out_queued_or_running(engine):
    """``cancel`` aborts a request running in vLLM and drops one still queued: neither result
    comes back, and a request running beside them completes as if alone."""
    kept = _request(engine, PROMPTS[1], max_tokens=12, temperature=1.0, seed=5)
    running = _request(engine, PROMPTS[0], max_tokens=1000, temperature=1.0, seed=6)
    queued = _request(engine, PROMPTS[2], max_tokens=4, temperature=0.0)
    handles = [engine.add(r, None) for r in (running, kept, queued)]
    results = dict(engine.step())
    assert sorted(engine.cancel({handles[0], handles[2]})) == [handles[0], handles[2]]
    while engine.has_work:
        results.update(engine.step())
    assert set(results) == {handles[1]}
    assert _tokens(results[handles[1]]) == _tokens(_one(engine, kept))


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-6}])
def test_extreme_truncation_equals_greedy(engine, truncation):
    """Same tokens as greedy; logprob 0, since the distribution sampled is a point mass."""
    greedy = _one(engine, _request(engine, PROMPTS[0], max_tokens=10, temperature=0.0))
    sampled = _one(
        engine, _request(engine, PROMPTS[0], max_tokens=10, temperature=1.0, **truncation)
    )
    assert _tokens(sampled) == _tokens(greedy)
    np.testing.assert_allclose(_logprobs(sampled), 0.0, atol=1e-6)


def test_top_k_past_the_vocabulary_is_no_truncation(engine):
    plain = _one(engine, _request(engine, PROMPTS[0], max_tokens=6, temperature=1.0, seed=4))
    wide = _one(
        engine, _request(engine, PROMPTS[0], max_tokens=6, temperature=1.0, seed=4, top_k=5000)
    )
    assert _tokens(wide) == _tokens(plain)
    np.testing.assert_allclose(_logprobs(wide), _logprobs(plain), atol=1e-6)


def test_topk_sample_logprobs_are_the_sampled_distribution(engine, f64):
    request = _request(
        engine,
        PROMPTS[0],
        max_tokens=6,
        temperature=0.7,
        seed=3,
        fields={"topk_sample_logprobs": 5},
    )
    seq = _one(engine, request).sequences[0]
    prompt, out = request.prompt.to_numpy().tolist(), seq.tokens.to_numpy().tolist()
    assert seq.topk_logprobs is not None
    ids, values = seq.topk_logprobs.token_ids.to_numpy(), seq.topk_logprobs.logprobs.to_numpy()
    assert ids.shape == values.shape == (len(out), 5)
    ref = _logp(f64, prompt + out, 0.7)[len(prompt) - 1 : -1]
    ref_values, ref_ids = ref.topk(5, dim=-1)
    np.testing.assert_allclose(values, ref_values.numpy(), atol=ATOL)
    assert (ids == ref_ids.numpy()).all()
    expected = ref.gather(-1, torch.tensor(out)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(seq.logprobs.to_numpy(), expected, atol=ATOL)


def test_topk_sample_logprobs_under_top_k_truncation(engine, f64):
    """top_k=3: rows of 3 tokens renormalised over the top 3, the rest the SDK's empty cell."""
    request = _request(
        engine,
        PROMPTS[0],
        max_tokens=6,
        temperature=1.3,
        top_k=3,
        seed=5,
        fields={"topk_sample_logprobs": 6},
    )
    seq = _one(engine, request).sequences[0]
    prompt, out = request.prompt.to_numpy().tolist(), seq.tokens.to_numpy().tolist()
    ids, values = seq.topk_logprobs.token_ids.to_numpy(), seq.topk_logprobs.logprobs.to_numpy()
    assert (ids[:, 3:] == 0).all() and (values[:, 3:] == TOPK_EMPTY_LOGPROB).all()
    np.testing.assert_allclose(np.exp(values[:, :3]).sum(axis=1), 1.0, atol=1e-5)
    ref = _logp(f64, prompt + out, 1.3)[len(prompt) - 1 : -1]
    ref_values, ref_ids = ref.topk(3, dim=-1)
    assert (ids[:, :3] == ref_ids.numpy()).all()
    renormalised = ref_values - torch.logsumexp(ref_values, dim=-1, keepdim=True)
    np.testing.assert_allclose(values[:, :3], renormalised.numpy(), atol=ATOL)
    for t, token in enumerate(out):
        expected = renormalised[t][list(ids[t, :3]).index(token)]
        assert seq.logprobs.to_numpy()[t] == pytest.approx(float(expected), abs=ATOL)


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, f64):
    request = _request(engine, PROMPTS[0], max_tokens=6, temperature=0.8, top_p=0.6, seed=9)
    seq = _one(engine, request).sequences[0]
    prompt, out = request.prompt.to_numpy().tolist(), seq.tokens.to_numpy().tolist()
    ref = _logp(f64, prompt + out, 0.8)[len(prompt) - 1 : -1]
    for t, token in enumerate(out):
        values, ids = ref[t].sort(descending=True)
        probs = values.exp()
        nucleus = int(((probs.cumsum(0) - probs) < 0.6).sum())
        assert token in ids[:nucleus].tolist()
        expected = ref[t, token] - torch.logsumexp(values[:nucleus], dim=0)
        assert seq.logprobs.to_numpy()[t] == pytest.approx(float(expected), abs=ATOL)


# ------------------------------------------------------------------------------ prompt side


def test_topk_prompt_logprobs_and_last_n(engine, f64):
    request = _request(
        engine,
        PROMPTS[0],
        max_tokens=1,
        fields={"prompt_logprobs": True, "topk_prompt_logprobs": 4, "prompt_logprobs_last_n": 3},
    )
    result = _one(engine, request)
    prompt = request.prompt.to_numpy().tolist()
    n = len(prompt)
    ref = _logp(f64, prompt)
    plp = result.prompt_logprobs.to_numpy()
    assert np.isnan(plp[: n - 3]).all() and not np.isnan(plp[n - 3 :]).any()
    expected = ref[n - 4 : n - 1].gather(-1, torch.tensor(prompt[n - 3 :])[:, None])[:, 0]
    np.testing.assert_allclose(plp[n - 3 :], expected.numpy(), atol=ATOL)
    ids, values = (result.topk_prompt_logprobs.token_ids.to_numpy(),
                   result.topk_prompt_logprobs.logprobs.to_numpy())  # fmt: skip
    assert ids.shape == (n, 4)
    assert (values[: n - 3] == TOPK_EMPTY_LOGPROB).all() and (ids[: n - 3] == 0).all()
    ref_values, ref_ids = ref[n - 4 : n - 1].topk(4, dim=-1)
    assert (ids[n - 3 :] == ref_ids.numpy()).all()
    np.testing.assert_allclose(values[n - 3 :], ref_values.numpy(), atol=ATOL)


def test_whole_prompt_topk_without_prompt_logprobs(engine, f64):
    request = _request(engine, PROMPTS[0], max_tokens=1, fields={"topk_prompt_logprobs": 2})
    result = _one(engine, request)
    assert result.prompt_logprobs is None
    prompt = request.prompt.to_numpy().tolist()
    ref_values, ref_ids = _logp(f64, prompt)[:-1].topk(2, dim=-1)
    topk = result.topk_prompt_logprobs
    assert (topk.token_ids.to_numpy()[0] == 0).all()
    assert (topk.token_ids.to_numpy()[1:] == ref_ids.numpy()).all()
    np.testing.assert_allclose(topk.logprobs.to_numpy()[1:], ref_values.numpy(), atol=ATOL)


def test_single_token_prompt_and_max_tokens_zero(engine):
    result = _one(engine, _request(engine, [5], max_tokens=1, fields={"prompt_logprobs": True}))
    plp = result.prompt_logprobs.to_numpy()
    assert plp.shape == (1,) and math.isnan(plp[0])
    empty = _one(
        engine, _request(engine, PROMPTS[0], max_tokens=0, fields={"prompt_logprobs": True})
    )
    assert _tokens(empty) == [] and empty.sequences[0].stop_reason == "length"
    assert not np.isnan(empty.prompt_logprobs.to_numpy()[1:]).any()


def test_prefix_cache_hits_are_reported_and_change_nothing(engine):
    block = engine.llm.vllm_config.cache_config.block_size  # 128 on vLLM's CPU backend
    prompt = list(range(100, 100 + 2 * block + 44))
    request = _request(engine, prompt, max_tokens=4, temperature=0.0)
    first, second = _one(engine, request), _one(engine, request)
    assert first.prompt_cache_hit_tokens == 0
    assert second.prompt_cache_hit_tokens == 2 * block  # the full blocks
    assert _tokens(first) == _tokens(second)
    np.testing.assert_allclose(_logprobs(first), _logprobs(second), atol=ATOL)
    # A request that asks for prompt logprobs is served no cached prefix (vLLM recomputes it).
    scored = _one(engine, _request(engine, prompt, max_tokens=1, fields={"prompt_logprobs": True}))
    assert scored.prompt_cache_hit_tokens == 0


# ------------------------------------------------------------------------------ stopping


def test_stop_token_ids(engine):
    greedy = _one(engine, _request(engine, PROMPTS[0], max_tokens=12, temperature=0.0))
    full = _tokens(greedy)
    stop = full[3]
    result = _one(
        engine, _request(engine, PROMPTS[0], max_tokens=12, temperature=0.0, stop_token_ids=[stop])
    )
    assert _tokens(result) == full[: full.index(stop) + 1]
    assert result.sequences[0].stop_reason == "stop"
    np.testing.assert_allclose(
        _logprobs(result), _logprobs(greedy)[: len(_tokens(result))], atol=1e-5
    )


def test_stop_strings(engine):
    greedy = _one(engine, _request(engine, PROMPTS[1], max_tokens=16, temperature=0.0))
    full = _tokens(greedy)
    pieces = [engine.tokenizer.decode([t]) for t in full[2:]]
    stop = next(
        p.strip() for p in pieces if p.strip().isascii() and p.strip().isprintable() and p.strip()
    )
    # Reference: the shortest prefix whose decoded text contains the stop string.
    cut = next(n for n in range(1, len(full) + 1) if stop in engine.tokenizer.decode(full[:n]))
    result = _one(
        engine,
        _request(engine, PROMPTS[1], max_tokens=16, temperature=0.0, stop_strings=["zzzq", stop]),
    )
    assert _tokens(result) == full[:cut]
    assert result.sequences[0].stop_reason == "stop"


def test_eos_stops_only_when_asked(engine):
    greedy = _one(engine, _request(engine, PROMPTS[0], max_tokens=12, temperature=0.0))
    full = _tokens(greedy)
    vocab = engine.tokenizer.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= set(engine.eos_ids)
    saved = engine.eos_ids
    engine.eos_ids = [full[2]]  # pretend the 3rd greedy token is EOS
    try:
        on = _one(
            engine, _request(engine, PROMPTS[0], max_tokens=12, temperature=0.0, stop_on_eos=True)
        )
        off = _one(engine, _request(engine, PROMPTS[0], max_tokens=12, temperature=0.0))
    finally:
        engine.eos_ids = saved
    assert _tokens(on) == full[: full.index(full[2]) + 1] and on.sequences[0].stop_reason == "stop"
    assert _tokens(off) == full and off.sequences[0].stop_reason == "length"


# ------------------------------------------------------------------------------ the loop


def test_requests_join_and_leave_between_steps(engine, adapters):
    """A base-model and a LoRA request added while a long one decodes join its batch at the
    next step and leave it when done, before it."""
    long = engine.add(_request(engine, PROMPTS[0], max_tokens=24, temperature=0.0), None)
    for _ in range(3):
        assert engine.step() == []
    short = engine.add(_request(engine, PROMPTS[1], max_tokens=2, temperature=0.0), None)
    lora = engine.add(_request(engine, PROMPTS[2], max_tokens=2, temperature=0.0), "a")
    assert engine.num_waiting == 2
    finished_at: dict[int, int] = {}
    steps = 0
    while engine.has_work:
        finished_at.update((handle, steps) for handle, _ in engine.step())
        assert engine.num_waiting == 0
        steps += 1
    assert finished_at[short] < finished_at[long] and finished_at[lora] < finished_at[long]
    assert steps >= 20  # the long one kept decoding after the others left


def test_lru_eviction_and_transparent_reload(engine, adapter_dirs):
    for name in ("a", "b", "c"):
        engine.ensure_adapter(name, adapter_dirs[name])
    assert list(engine._adapters) == ["b", "c"] and len(engine._adapters) == MAX_ADAPTERS
    registered = {engine._adapters[a].lora_int_id for a in ("b", "c")}
    assert set(engine.llm.list_loras()) == registered | {engine._base.lora_int_id}
    engine.ensure_adapter("a", adapter_dirs["a"])  # back, as a handler does before its request
    assert list(engine._adapters) == ["c", "a"]
    result = _one(engine, _request(engine, PROMPTS[0], max_tokens=4, temperature=0.0), "a")
    assert len(_tokens(result)) == 4


def test_a_broken_adapter_is_a_user_error(engine, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(UserError, match="cannot be loaded by vLLM"):
        engine.ensure_adapter("broken", tmp_path)
    assert "broken" not in engine._adapters


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("fields", "option"),
    [
        ({"target_prompt_logprobs": Tensor.from_numpy(np.zeros((4, 2), np.int64))},
         "target_prompt_logprobs"),
        ({"prompt_alt_tokens_k": 2}, "prompt_alt_tokens_k"),
    ],
)  # fmt: skip
def test_what_vllm_cannot_do_is_refused(engine, fields, option):
    request = _request(engine, [1, 2, 3, 4, 5], max_tokens=2, fields=fields)
    with pytest.raises(UserError, match=f"{option} is not supported .* vLLM"):
        engine.add(request, None)
    assert not engine.has_work


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ([], {}, "empty"),
        ([1, 2, 2048], {}, "vocabulary"),
        ([1, -1], {}, "vocabulary"),
        ([1] * 10, {"max_tokens": 2039}, "context length"),
        ([1], {"temperature": -1.0}, "temperature"),
        ([1], {"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_inputs_raise_user_error(engine, prompt, params, message):
    good = _request(engine, [1, 2, 3], max_tokens=2)
    with pytest.raises(UserError, match=message):
        engine.generate([(good, None), (_request(engine, prompt, **params), None)])
    assert not engine.has_work
