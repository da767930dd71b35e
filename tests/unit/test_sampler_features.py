"""Sampling features of protocol.md 5.8-5.9 on the engine, against float64 references of the
same weights, and their wire form through the SDK's own decoder.

Top-k sample logprobs, top-k prompt logprobs, ``prompt_logprobs_last_n``,
``target_prompt_logprobs``, ``prompt_alt_tokens_k``, and per-token logprobs of the distribution
actually sampled (temperature and truncation applied). Runs on the built-in tiny Qwen3 on CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from tinker.proto.response_conv import deserialize_sample_response
from transformers import AutoModelForCausalLM

from services.gateway.wire import encode_sample_response, target_prompt_logprobs_from_json
from services.sampler.engine import SamplerEngine
from whetstone.errors import UserError
from whetstone.messages import (
    TOPK_EMPTY_LOGPROB,
    SampledSequence,
    SampleRequest,
    SampleResult,
    SamplingParams,
    TopkLogprobs,
)
from whetstone.tensors import Tensor
from whetstone_ml.builtin import ensure_builtin_model

PROMPT = "Q: What is the capital of France?\nA: Paris is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> SamplerEngine:
    return SamplerEngine(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _request(engine: SamplerEngine, tokens: list[int] | None = None, **fields: object):
    params = {"max_tokens": 6, "stop_on_eos": False, **fields.pop("params", {})}  # type: ignore[dict-item]
    tokens = tokens if tokens is not None else engine.tokenizer.encode(PROMPT)
    return SampleRequest(
        request_id="req",
        tenant="tenant",
        base_model="tiny",
        prompt=Tensor.from_list(tokens, "int64"),
        params=SamplingParams(**params),
        **fields,
    )


def _run(engine: SamplerEngine, request: SampleRequest) -> SampleResult:
    return engine.generate([(request, None)])[0]


@torch.inference_mode()
def _logp(hf: torch.nn.Module, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """float64 log-softmax of every position's next-token logits ``[len(ids), V]``."""
    logits = hf(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1)


# ------------------------------------------------------------------------------ sampled tokens


def test_topk_sample_logprobs_are_the_sampled_distribution(engine, hf):
    """Untruncated at temperature 0.7: each row is the top 5 of log_softmax(logits / 0.7), the
    sampled token's own logprob is that distribution's, and it appears in its row when likely."""
    request = _request(engine, topk_sample_logprobs=5, params={"temperature": 0.7, "seed": 3})
    seq = _run(engine, request).sequences[0]
    prompt = request.prompt.to_numpy().tolist()
    out = seq.tokens.to_numpy().tolist()
    assert seq.topk_logprobs is not None
    ids, values = seq.topk_logprobs.token_ids.to_numpy(), seq.topk_logprobs.logprobs.to_numpy()
    assert ids.shape == values.shape == (len(out), 5)
    ref = _logp(hf, prompt + out, 0.7)[len(prompt) - 1 : -1]
    ref_values, ref_ids = ref.topk(5, dim=-1)
    np.testing.assert_allclose(values, ref_values.numpy(), atol=1e-4)
    assert (ids == ref_ids.numpy()).all()
    np.testing.assert_allclose(
        seq.logprobs.to_numpy(), ref.gather(-1, torch.tensor(out)[:, None])[:, 0], atol=1e-4
    )
    for t, token in enumerate(out):
        if token in ids[t]:
            assert values[t][list(ids[t]).index(token)] == pytest.approx(seq.logprobs.to_numpy()[t])


def test_topk_sample_logprobs_under_top_k_truncation(engine, hf):
    """top_k=3: the rows hold 3 tokens renormalised over the top 3 (they sum to probability 1),
    the other cells are the SDK's empty sentinel, and the reported logprob is the same number."""
    request = _request(
        engine, topk_sample_logprobs=6, params={"temperature": 1.3, "top_k": 3, "seed": 5}
    )
    seq = _run(engine, request).sequences[0]
    prompt = request.prompt.to_numpy().tolist()
    out = seq.tokens.to_numpy().tolist()
    assert seq.topk_logprobs is not None
    ids, values = seq.topk_logprobs.token_ids.to_numpy(), seq.topk_logprobs.logprobs.to_numpy()
    assert (ids[:, 3:] == 0).all() and (values[:, 3:] == TOPK_EMPTY_LOGPROB).all()
    np.testing.assert_allclose(np.exp(values[:, :3]).sum(axis=1), 1.0, atol=1e-5)
    ref = _logp(hf, prompt + out, 1.3)[len(prompt) - 1 : -1]
    ref_values, ref_ids = ref.topk(3, dim=-1)
    assert (ids[:, :3] == ref_ids.numpy()).all()
    renormalised = ref_values - torch.logsumexp(ref_values, dim=-1, keepdim=True)
    np.testing.assert_allclose(values[:, :3], renormalised.numpy(), atol=1e-4)
    for t, token in enumerate(out):
        assert token in ids[t, :3]
        expected = renormalised[t][list(ids[t, :3]).index(token)]
        assert seq.logprobs.to_numpy()[t] == pytest.approx(float(expected), abs=1e-4)


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, hf):
    request = _request(engine, params={"temperature": 0.8, "top_p": 0.6, "seed": 9})
    seq = _run(engine, request).sequences[0]
    prompt = request.prompt.to_numpy().tolist()
    out = seq.tokens.to_numpy().tolist()
    ref = _logp(hf, prompt + out, 0.8)[len(prompt) - 1 : -1]
    for t, token in enumerate(out):
        values, ids = ref[t].sort(descending=True)
        probs = values.exp()
        nucleus = ((probs.cumsum(0) - probs) < 0.6).sum()
        kept = ids[:nucleus].tolist()
        assert token in kept
        expected = ref[t, token] - torch.logsumexp(values[:nucleus], dim=0)
        assert seq.logprobs.to_numpy()[t] == pytest.approx(float(expected), abs=1e-4)


# ------------------------------------------------------------------------------ prompt side


def test_topk_prompt_logprobs_and_last_n(engine, hf):
    request = _request(
        engine,
        prompt_logprobs=True,
        topk_prompt_logprobs=4,
        prompt_logprobs_last_n=3,
        params={"max_tokens": 1},
    )
    result = _run(engine, request)
    prompt = request.prompt.to_numpy().tolist()
    n = len(prompt)
    ref = _logp(hf, prompt)
    plp = result.prompt_logprobs.to_numpy()
    assert np.isnan(plp[: n - 3]).all() and not np.isnan(plp[n - 3 :]).any()
    expected = ref[n - 4 : n - 1].gather(-1, torch.tensor(prompt[n - 3 :])[:, None])[:, 0]
    np.testing.assert_allclose(plp[n - 3 :], expected.numpy(), atol=1e-4)
    topk = result.topk_prompt_logprobs
    assert topk is not None
    ids, values = topk.token_ids.to_numpy(), topk.logprobs.to_numpy()
    assert ids.shape == (n, 4)
    assert (values[: n - 3] == TOPK_EMPTY_LOGPROB).all() and (ids[: n - 3] == 0).all()
    ref_values, ref_ids = ref[n - 4 : n - 1].topk(4, dim=-1)
    assert (ids[n - 3 :] == ref_ids.numpy()).all()
    np.testing.assert_allclose(values[n - 3 :], ref_values.numpy(), atol=1e-4)


def test_whole_prompt_topk_without_last_n(engine, hf):
    request = _request(engine, topk_prompt_logprobs=2, params={"max_tokens": 1})
    result = _run(engine, request)
    assert result.prompt_logprobs is None
    prompt = request.prompt.to_numpy().tolist()
    ref_values, ref_ids = _logp(hf, prompt)[:-1].topk(2, dim=-1)
    topk = result.topk_prompt_logprobs
    assert topk is not None
    assert (topk.token_ids.to_numpy()[0] == 0).all()
    assert (topk.token_ids.to_numpy()[1:] == ref_ids.numpy()).all()
    np.testing.assert_allclose(topk.logprobs.to_numpy()[1:], ref_values.numpy(), atol=1e-4)


def test_target_prompt_logprobs(engine, hf):
    prompt = engine.tokenizer.encode(PROMPT)
    n = len(prompt)
    rng = np.random.default_rng(0)
    target = rng.integers(0, engine.vocab_size, size=(n - 1, 3))
    target[::2, 2] = -1  # nothing requested in these cells
    target[:, 0] = prompt[1:]
    request = _request(
        engine,
        prompt,
        target_prompt_logprobs=Tensor.from_numpy(target),
        params={"max_tokens": 2},
    )
    result = _run(engine, request)
    got = result.target_prompt_logprobs.to_numpy()
    assert got.shape == (n - 1, 3)
    ref = _logp(hf, prompt)[:-1]
    expected = ref.gather(-1, torch.from_numpy(target).clamp(min=0)).numpy()
    expected[target == -1] = 0.0
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got[::2, 2] == 0.0).all()


def test_prompt_alt_tokens_seeded_and_scored(engine, hf):
    prompt = engine.tokenizer.encode(PROMPT)
    request = _request(
        engine, prompt, prompt_alt_tokens_k=4, params={"temperature": 0.9, "seed": 7}
    )
    first, second = _run(engine, request), _run(engine, request)
    alt = first.prompt_alt_tokens
    assert alt is not None and second.prompt_alt_tokens is not None
    ids, values = alt.token_ids.to_numpy(), alt.logprobs.to_numpy()
    assert ids.shape == values.shape == (len(prompt) - 1, 4)
    assert (ids == second.prompt_alt_tokens.token_ids.to_numpy()).all()  # seeded: repeats
    assert len(np.unique(ids)) > 4  # draws, not one token repeated
    ref = _logp(hf, prompt, 0.9)[:-1]
    np.testing.assert_allclose(values, ref.gather(-1, torch.tensor(ids)).numpy(), atol=1e-4)
    # The samples themselves do not depend on whether prompt draws were asked for.
    plain = _run(engine, _request(engine, prompt, params={"temperature": 0.9, "seed": 7}))
    assert (plain.sequences[0].tokens.to_numpy() == first.sequences[0].tokens.to_numpy()).all()


def test_prompt_alt_tokens_at_temperature_zero_are_the_argmax(engine, hf):
    prompt = engine.tokenizer.encode(PROMPT)
    result = _run(
        engine, _request(engine, prompt, prompt_alt_tokens_k=2, params={"temperature": 0})
    )
    ids = result.prompt_alt_tokens.token_ids.to_numpy()
    ref = _logp(hf, prompt)[:-1]
    assert (ids == ref.argmax(-1, keepdim=True).expand(-1, 2).numpy()).all()


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt_logprobs_last_n": 2}, "needs prompt_logprobs"),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": 99}, "must be in 1..4"),
        ({"target_prompt_logprobs": Tensor.from_numpy(np.zeros((3, 2), np.int64))}, "shape"),
        ({"topk_sample_logprobs": 65}, "less than or equal to 64"),
        (
            {"num_samples": 128, "topk_sample_logprobs": 64, "params": {"max_tokens": 64}},
            "more than 262144",
        ),
    ],
)
def test_contract_refuses(engine, fields, message):
    with pytest.raises(ValidationError, match=message):
        _request(engine, [1, 2, 3, 4, 5], **fields)


def test_target_outside_vocabulary_is_a_user_error(engine):
    target = np.full((4, 1), engine.vocab_size, dtype=np.int64)
    request = _request(engine, [1, 2, 3, 4, 5], target_prompt_logprobs=Tensor.from_numpy(target))
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.add(request, None)


# ------------------------------------------------------------------------------ on the wire


def test_every_field_through_the_sdk_decoder():
    topk = TopkLogprobs(
        token_ids=Tensor.from_numpy(np.array([[5, 7], [9, 0]], np.int64)),
        logprobs=Tensor.from_numpy(
            np.array([[-0.5, -1.5], [-0.25, TOPK_EMPTY_LOGPROB]], np.float32)
        ),
    )
    target = np.array([[-1.0, 0.0, -2.0], [0.0, 0.0, -3.0]], np.float32)
    result = SampleResult(
        sequences=[
            SampledSequence(
                tokens=Tensor.from_list([5, 9], "int64"),
                logprobs=Tensor.from_list([-0.5, -0.25], "float32"),
                stop_reason="length",
                topk_logprobs=topk,
            )
        ],
        prompt_logprobs=Tensor.from_list([float("nan"), -1.0, -2.0], "float32"),
        topk_prompt_logprobs=TopkLogprobs(
            token_ids=Tensor.from_numpy(np.array([[0], [3], [4]], np.int64)),
            logprobs=Tensor.from_numpy(
                np.array([[TOPK_EMPTY_LOGPROB], [-0.1], [-0.2]], np.float32)
            ),
        ),
        target_prompt_logprobs=Tensor.from_numpy(target),
        target_prompt_csr=True,
        prompt_alt_tokens=topk,
        prompt_cache_hit_tokens=16,
    )
    response = deserialize_sample_response(encode_sample_response(result))
    assert response.sequences[0].topk_logprobs == [[(5, -0.5), (7, -1.5)], [(9, -0.25)]]
    assert response.topk_prompt_logprobs == [
        None,
        [(3, pytest.approx(-0.1))],
        [(4, pytest.approx(-0.2))],
    ]
    assert response.prompt_cache_hit_tokens == 16
    td = response.target_prompt_logprobs
    assert td is not None and td.sparse_crow_indices is not None  # the layout it came in
    np.testing.assert_array_equal(td.to_numpy(), target)
    alt = response.prompt_alt_tokens
    assert alt is not None
    np.testing.assert_array_equal(alt.tokens.to_numpy(), [[5, 7], [9, 0]])


def test_sparse_target_request_means_nothing_outside_its_cells():
    dense, csr = target_prompt_logprobs_from_json(
        {
            "dtype": "int64",
            "shape": [2, 3],
            "data": [0, 42],  # token 0 listed explicitly: it must stay 0, not become -1
            "sparse_crow_indices": [0, 1, 2],
            "sparse_col_indices": [2, 0],
        }
    )
    assert csr
    np.testing.assert_array_equal(dense.to_numpy(), [[-1, -1, 0], [42, -1, -1]])
    dense, csr = target_prompt_logprobs_from_json(
        {"dtype": "int64", "shape": [1, 2], "data": [3, -1]}
    )
    assert not csr and dense.to_numpy().tolist() == [[3, -1]]
    with pytest.raises(UserError, match="int64"):
        target_prompt_logprobs_from_json({"dtype": "float32", "shape": [1], "data": [1.0]})
