"""SamplerEngine against plain references: no-cache greedy loops, PEFT, float64 logprobs.

Runs on the built-in tiny Qwen3 (generated locally, a few seconds the first time) on CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.sampler.engine import SamplerEngine
from whetstone.errors import UserError
from whetstone.messages import LoraConfig, SampleRequest, SamplingParams
from whetstone.tensors import Tensor
from whetstone_ml.builtin import ensure_builtin_model
from whetstone_ml.lora import LoraAdapter, LoraModel

PROMPTS = [
    "Q: What is the capital of France?\nA:",
    "The quick brown fox",
    "In 1950 there were many cats in",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> SamplerEngine:
    return SamplerEngine(model_dir)


def _make_adapter(
    engine: SamplerEngine, directory: Path, seed: int, model_dir: Path, rank: int = 8
) -> Path:
    """A PEFT adapter whose B is random, so that it really changes the model's outputs."""
    base = LoraModel(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32))
    adapter = LoraAdapter.init(base, LoraConfig(rank=rank, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for f in adapter.factors.values():
            f.b.copy_(torch.randn(f.b.shape, generator=gen) * 0.05)
    adapter.save_peft(directory, str(model_dir))
    return directory


@pytest.fixture(scope="module")
def adapters(
    engine: SamplerEngine, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        name: _make_adapter(engine, root / name, seed, model_dir)
        for name, seed in (("a", 1), ("b", 2))
    }
    for name, directory in dirs.items():
        engine.ensure_adapter(name, directory)
    return dirs


def _peft_model(
    model_dir: Path, adapter_dir: Path | None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.to(dtype).eval()


def _request(
    engine: SamplerEngine,
    text: str | list[int],
    *,
    num_samples: int = 1,
    prompt_logprobs: bool = False,
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
        prompt_logprobs=prompt_logprobs,
    )


def _tokens(result, i: int = 0) -> list[int]:
    return result.sequences[i].tokens.to_numpy().tolist()


def _logprobs(result, i: int = 0) -> np.ndarray:
    return result.sequences[i].logprobs.to_numpy()


@torch.inference_mode()
def _greedy_reference(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward over the whole sequence at every step, no cache."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@torch.inference_mode()
def _logprob_reference(
    model: torch.nn.Module, prompt: list[int], output: list[int], temperature: float = 1.0
) -> np.ndarray:
    """Per-position log p(token | prefix) from one float64 forward over prompt + output."""
    ids = torch.tensor([prompt + output])
    scores = torch.log_softmax(model(input_ids=ids).logits[0].double() / temperature, dim=-1)
    targets = ids[0, 1:]
    return scores[:-1].gather(-1, targets[:, None]).squeeze(-1).numpy()


# ------------------------------------------------------------------------------ correctness


@pytest.mark.parametrize("adapter", [None, "a"])
def test_greedy_matches_no_cache_reference(engine, adapters, model_dir, adapter):
    reference = _peft_model(model_dir, adapters[adapter] if adapter else None)
    for text in PROMPTS[:2]:
        prompt = engine.tokenizer.encode(text)
        [result] = engine.generate(
            [(_request(engine, prompt, max_tokens=12, temperature=0.0), adapter)]
        )
        assert _tokens(result) == _greedy_reference(reference, prompt, 12)
        assert result.sequences[0].stop_reason == "length"


def test_adapter_changes_output(engine, adapters):
    jobs = [
        (_request(engine, PROMPTS[0], max_tokens=12, temperature=0.0), a) for a in (None, "a", "b")
    ]
    outputs = [_tokens(r) for r in engine.generate(jobs)]
    assert outputs[0] != outputs[1] and outputs[0] != outputs[2] and outputs[1] != outputs[2]


def test_batch_of_adapters_equals_each_alone(engine, adapters):
    jobs = [
        (_request(engine, PROMPTS[0], max_tokens=10, temperature=0.0, prompt_logprobs=True), "a"),
        (_request(engine, PROMPTS[1], max_tokens=6, temperature=0.0, prompt_logprobs=True), None),
        (_request(engine, PROMPTS[2], max_tokens=10, temperature=0.0), "b"),
        (_request(engine, PROMPTS[1], max_tokens=8, temperature=0.0, num_samples=2), "a"),
    ]
    batched = engine.generate(jobs)
    for job, together in zip(jobs, batched, strict=True):
        [alone] = engine.generate([job])
        assert len(together.sequences) == len(alone.sequences)
        for i in range(len(alone.sequences)):
            assert _tokens(together, i) == _tokens(alone, i)
            np.testing.assert_allclose(_logprobs(together, i), _logprobs(alone, i), atol=1e-4)
        if alone.prompt_logprobs is not None:
            np.testing.assert_allclose(
                together.prompt_logprobs.to_numpy(), alone.prompt_logprobs.to_numpy(), atol=1e-4
            )


@pytest.mark.parametrize("adapter,temperature", [(None, 1.0), (None, 0.7), ("a", 1.0), (None, 0.0)])
def test_logprobs_match_float64_reference(engine, adapters, model_dir, adapter, temperature):
    reference = _peft_model(model_dir, adapters[adapter] if adapter else None, torch.float64)
    prompt = engine.tokenizer.encode(PROMPTS[2])
    request = _request(
        engine, prompt, max_tokens=10, temperature=temperature, seed=7, prompt_logprobs=True
    )
    [result] = engine.generate([(request, adapter)])
    output = _tokens(result)
    assert len(output) == 10
    # Temperature 0 reports the temperature-1 distribution.
    expected = _logprob_reference(reference, prompt, output, temperature or 1.0)
    np.testing.assert_allclose(_logprobs(result), expected[len(prompt) - 1 :], atol=1e-4)
    plp = result.prompt_logprobs.to_numpy()
    assert plp.dtype == np.float32 and plp.shape == (len(prompt),) and math.isnan(plp[0])
    at_t1 = _logprob_reference(reference, prompt, output)
    np.testing.assert_allclose(plp[1:], at_t1[: len(prompt) - 1], atol=1e-4)


def test_single_token_prompt_logprobs(engine):
    [result] = engine.generate([(_request(engine, [5], max_tokens=1, prompt_logprobs=True), None)])
    plp = result.prompt_logprobs.to_numpy()
    assert plp.shape == (1,) and math.isnan(plp[0])


# ------------------------------------------------------------------------------ sampling


def test_seed_determinism_and_num_samples(engine):
    request = _request(engine, PROMPTS[0], max_tokens=8, temperature=1.0, seed=123, num_samples=3)
    first, second = engine.generate([(request, None)]), engine.generate([(request, None)])
    assert len(first[0].sequences) == 3
    runs = [[_tokens(r[0], i) for i in range(3)] for r in (first, second)]
    assert runs[0] == runs[1]
    assert all(len(t) == 8 for t in runs[0])
    assert len({tuple(t) for t in runs[0]}) > 1, "samples of one request should differ"
    [other] = engine.generate(
        [(_request(engine, PROMPTS[0], max_tokens=8, seed=124, num_samples=3), None)]
    )
    assert [_tokens(other, i) for i in range(3)] != runs[0]
    for seq in first[0].sequences:
        assert seq.tokens.dtype == "int64" and seq.logprobs.dtype == "float32"


def test_seeded_request_independent_of_batch_neighbours(engine, adapters):
    request = _request(engine, PROMPTS[1], max_tokens=8, temperature=1.0, seed=5, num_samples=2)
    [alone] = engine.generate([(request, None)])
    together = engine.generate(
        [(_request(engine, PROMPTS[0], max_tokens=4, seed=9), "b"), (request, None)]
    )
    assert [_tokens(together[1], i) for i in range(2)] == [_tokens(alone, i) for i in range(2)]


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-6}])
def test_extreme_truncation_equals_greedy(engine, truncation):
    """Same tokens as greedy; logprob 0, since the distribution sampled is a point mass."""
    [greedy] = engine.generate(
        [(_request(engine, PROMPTS[0], max_tokens=10, temperature=0.0), None)]
    )
    sampled_request = _request(engine, PROMPTS[0], max_tokens=10, temperature=1.0, **truncation)
    [sampled] = engine.generate([(sampled_request, None)])
    assert _tokens(sampled) == _tokens(greedy)
    np.testing.assert_allclose(_logprobs(sampled), 0.0, atol=1e-6)


def test_top_k_restricts_support(engine, model_dir):
    """With top_k=3 every sampled token must be among the 3 greedy-best at its step."""
    prompt = engine.tokenizer.encode(PROMPTS[2])
    reference = _peft_model(model_dir, None)
    request = _request(engine, prompt, max_tokens=6, temperature=1.0, top_k=3, seed=3)
    [result] = engine.generate([(request, None)])
    ids = prompt + _tokens(result)
    with torch.inference_mode():
        logits = reference(input_ids=torch.tensor([ids])).logits[0]
    for i, token in enumerate(_tokens(result)):
        assert token in logits[len(prompt) - 1 + i].topk(3).indices.tolist()


# ------------------------------------------------------------------------------ stopping


def test_stop_token_ids(engine):
    [greedy] = engine.generate(
        [(_request(engine, PROMPTS[0], max_tokens=12, temperature=0.0), None)]
    )
    full = _tokens(greedy)
    stop = full[3]
    request = _request(engine, PROMPTS[0], max_tokens=12, temperature=0.0, stop_token_ids=[stop])
    [result] = engine.generate([(request, None)])
    assert _tokens(result) == full[: full.index(stop) + 1]
    assert result.sequences[0].stop_reason == "stop"
    np.testing.assert_allclose(
        _logprobs(result), _logprobs(greedy)[: full.index(stop) + 1], atol=1e-5
    )


def test_stop_strings(engine):
    [greedy] = engine.generate(
        [(_request(engine, PROMPTS[1], max_tokens=16, temperature=0.0), None)]
    )
    full = _tokens(greedy)
    pieces = [engine.tokenizer.decode([t]) for t in full[2:]]
    stop = next(
        p.strip() for p in pieces if p.strip().isascii() and p.strip().isprintable() and p.strip()
    )
    # Reference: the shortest prefix whose full decoded text contains the stop string.
    cut = next(n for n in range(1, len(full) + 1) if stop in engine.tokenizer.decode(full[:n]))
    request = _request(
        engine, PROMPTS[1], max_tokens=16, temperature=0.0, stop_strings=["zzzq", stop]
    )
    [result] = engine.generate([(request, None)])
    assert _tokens(result) == full[:cut]
    assert result.sequences[0].stop_reason == "stop"


def test_max_tokens_gives_length_and_eos_ids(engine):
    [result] = engine.generate([(_request(engine, PROMPTS[0], max_tokens=3), None)])
    assert len(_tokens(result)) == 3 and result.sequences[0].stop_reason == "length"
    [empty] = engine.generate(
        [(_request(engine, PROMPTS[0], max_tokens=0, prompt_logprobs=True), None)]
    )
    assert _tokens(empty) == [] and empty.sequences[0].stop_reason == "length"
    vocab = engine.tokenizer.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= set(engine.eos_ids)


def test_eos_stops_only_when_asked(engine):
    [greedy] = engine.generate(
        [(_request(engine, PROMPTS[0], max_tokens=12, temperature=0.0), None)]
    )
    full = _tokens(greedy)
    # Pretend the 3rd greedy token is EOS: it must stop the row only with stop_on_eos.
    saved = engine.eos_ids
    engine.eos_ids = [full[2]]
    try:
        on_request = _request(engine, PROMPTS[0], max_tokens=12, temperature=0.0, stop_on_eos=True)
        [on] = engine.generate([(on_request, None)])
        [off] = engine.generate(
            [(_request(engine, PROMPTS[0], max_tokens=12, temperature=0.0), None)]
        )
    finally:
        engine.eos_ids = saved
    assert _tokens(on) == full[: full.index(full[2]) + 1] and on.sequences[0].stop_reason == "stop"
    assert _tokens(off) == full and off.sequences[0].stop_reason == "length"


# ------------------------------------------------------------------------------ adapters and errors


def test_lru_eviction(model_dir, adapters):
    small = SamplerEngine(model_dir, max_adapters=1)
    small.ensure_adapter("a", adapters["a"])
    small.ensure_adapter("b", adapters["b"])
    assert not small.lora.has("a") and small.lora.has("b")
    small.ensure_adapter("a", adapters["a"])
    assert small.lora.has("a") and not small.lora.has("b")


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


def test_prompt_at_context_limit_is_accepted(engine):
    [result] = engine.generate([(_request(engine, [1] * 2046, max_tokens=2), None)])
    assert len(_tokens(result)) == 2
