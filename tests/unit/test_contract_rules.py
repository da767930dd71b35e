"""The validation rules written once on the contract models (``whetstone.messages``): what the
gateway refuses with a 400 is exactly what a worker can never decode. No servers needed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from services.gateway import validation, wire
from whetstone.errors import UserError
from whetstone.messages import (
    AdamParams,
    LoraConfig,
    OptimStep,
    SampleRequest,
    SamplingParams,
    TrainRequest,
)
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.models.registry import ModelSpec
from whetstone.tensors import Tensor


@pytest.mark.parametrize(
    "fields",
    [
        {"learning_rate": -1e-3},
        {"beta1": 1.0},
        {"beta2": -0.1},
        {"eps": 0.0},
        {"weight_decay": -0.1},
        {"grad_clip_norm": -1.0},
        {"learning_rate": math.nan},
        {"eps": math.inf},
    ],
)
def test_adam_params_out_of_range(fields: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        AdamParams(**fields)


def test_adam_params_at_the_edges() -> None:
    AdamParams(
        learning_rate=0.0, beta1=0.0, beta2=0.999, eps=1e-30, weight_decay=0.0, grad_clip_norm=0.0
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"rank": 0},
        {"rank": -4},
        {"train_attn": False, "train_mlp": False, "train_unembed": False},
    ],
)
def test_lora_config_out_of_range(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LoraConfig(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0},
        {"temperature": -0.5},
        {"temperature": math.inf},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_k": 0},
        {"top_k": -2},
        {"stop_strings": [""]},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": list(range(65))},
    ],
)
def test_sampling_params_out_of_range(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SamplingParams(**fields)


def test_sample_request_counts() -> None:
    prompt = Tensor.from_list([1, 2], "int64")
    for fields in ({"num_samples": 0}, {"topk_prompt_logprobs": -1}):
        with pytest.raises(ValidationError):
            SampleRequest(
                request_id="r",
                tenant="t",
                base_model="m",
                prompt=prompt,
                params=SamplingParams(),
                **fields,
            )  # type: ignore[arg-type]


def test_a_worker_cannot_decode_what_the_gateway_refuses() -> None:
    good = TrainRequest(
        request_id="r",
        tenant="t",
        run_id="s:train:0",
        seq_id=1,
        command=OptimStep(adam=AdamParams()),
    )
    bad = good.encode().replace(b'"beta1":0.9', b'"beta1":1.5')
    assert bad != good.encode()
    assert TrainRequest.decode(good.encode()) == good
    with pytest.raises(ValidationError):
        TrainRequest.decode(bad)


def test_wire_sampling_params_become_user_errors_naming_the_field() -> None:
    with pytest.raises(UserError, match="top_p"):
        wire.sampling_params_from_json({"top_p": 0})
    with pytest.raises(UserError, match="max_tokens"):
        wire.sampling_params_from_json({"max_tokens": True})  # a bool is no integer on the wire


def _spec() -> ModelSpec:
    return ModelSpec(
        name=BUILTIN_MODEL_NAME,
        path=Path("unused"),
        context_length=64,
        vocab_size=100,
        max_lora_rank=8,
    )


def test_model_dependent_limits_take_the_spec() -> None:
    spec = _spec()
    validation.check_lora(LoraConfig(rank=8), spec)
    with pytest.raises(UserError, match="1..8"):
        validation.check_lora(LoraConfig(rank=9), spec)
    prompt = np.arange(10, dtype=np.int64)
    validation.check_sample(prompt, SamplingParams(max_tokens=54), spec)
    for tokens, params, needle in (
        (prompt, SamplingParams(max_tokens=55), "context length"),
        (np.array([1, 100]), SamplingParams(), "vocabulary"),
        (np.zeros(0, dtype=np.int64), SamplingParams(), "empty"),
        (prompt, SamplingParams(stop_token_ids=[100]), "stop token"),
    ):
        with pytest.raises(UserError, match=needle):
            validation.check_sample(tokens, params, spec)
