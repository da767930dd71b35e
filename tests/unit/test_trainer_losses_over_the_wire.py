"""Every built-in loss as the tinker SDK (0.38) encodes it and the cookbook shapes its datums,
through the gateway's decoder and submission checks, the trainer engine, and back through the
gateway's encoder into the SDK's decoder: loss names, ``loss_fn_config`` (numbers travel in
both config maps), gspo's ``sequence_ratio_mask`` and stable_reinforce's provenance spans are
accepted, and the client reads per-datum ``logprobs`` and ``name:reduction`` metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output
from tinker.types import Datum as SdkDatum
from tinker.types import (
    ForwardBackwardInput,
    ForwardBackwardRequest,
    ModelInput,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
)
from transformers import Qwen3Config, Qwen3ForCausalLM

from services.gateway import wire
from services.gateway.validation import validate_forward_backward
from services.trainer.engine import TrainerEngine
from whetstone.errors import UserError
from whetstone.messages import LoraConfig
from whetstone.models.registry import ModelSpec

VOCAB = 64
PROMPT, SAMPLED = [3, 9, 27, 17], [5, 44, 12, 8, 2]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TrainerEngine:
    config = Qwen3Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=48,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Qwen3ForCausalLM(config).float()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    engine = TrainerEngine(path, logprob_chunk_tokens=4)
    engine.create_run("r", LoraConfig(rank=2, seed=1))
    return engine


SPEC = ModelSpec(name="tiny", path=Path("unused"), context_length=64, vocab_size=VOCAB)


def cookbook_datum(loss_fn: str) -> SdkDatum:
    """``recipes/rl_loop.py``'s layout: targets 0, logprobs 0.0, advantages 0 over the prompt."""
    ob = len(PROMPT) - 1
    inputs: dict = {
        "target_tokens": [0] * ob + SAMPLED,
        "logprobs": [0.0] * ob + [-2.5, -3.0, -4.1, -3.3, -4.0],
        "advantages": [0.0] * ob + [0.75] * len(SAMPLED),
    }
    if loss_fn == "gspo":
        inputs["sequence_ratio_mask"] = [0.0] * ob + [1.0] * len(SAMPLED)
    if loss_fn == "cross_entropy":
        inputs = {"target_tokens": inputs["target_tokens"], "weights": [1.0] * (ob + 5)}
    datum = SdkDatum(model_input=ModelInput.from_ints(PROMPT + SAMPLED[:-1]), loss_fn_inputs=inputs)
    if loss_fn != "stable_reinforce":
        return datum
    return datum.with_provenance(
        model_input=[
            PromptProvenanceSpan(sequence_id="seq-A", length=len(PROMPT)),
            SampledProvenanceSpan(sequence_id="seq-A", length=len(SAMPLED) - 1),
        ],
        loss_fn_inputs=[
            PromptProvenanceSpan(sequence_id="seq-A", offset=1, length=len(PROMPT) - 1),
            SampledProvenanceSpan(sequence_id="seq-A", length=len(SAMPLED)),
        ],
    )


def body(loss_fn: str, config: dict | None) -> bytes:
    request = ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(
            data=[cookbook_datum(loss_fn)] * 2, loss_fn=loss_fn, loss_fn_config=config
        ),
        model_id="s:train:0",
        seq_id=1,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


CASES = [
    ("cross_entropy", None),
    ("importance_sampling", None),
    ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    ("cispo", {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    ("dro", {"beta": 0.05}),
    ("dro", {"beta": 1}),  # an int, as JSON or Python users write it
    ("gspo", None),
    ("stable_reinforce", None),  # what the cookbook sends: no config
    ("stable_reinforce", {"kl_coeff": 0.01}),  # the SDK's documented example key
]


@pytest.mark.parametrize(("loss_fn", "config"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sdk_request_to_sdk_response(engine: TrainerEngine, loss_fn: str, config) -> None:
    _, _, cmd = wire.decode_forward_backward(body(loss_fn, config), None)
    validate_forward_backward(cmd, SPEC)
    assert cmd.loss_fn == loss_fn and cmd.loss_fn_config == {
        k: float(v) for k, v in (config or {}).items()
    }
    result = engine.forward_backward("r", cmd.model_copy(update={"forward_only": True}))
    sdk = deserialize_forward_backward_output(wire.encode_forward_backward_output(result))
    assert len(sdk.loss_fn_outputs) == 2
    for out in sdk.loss_fn_outputs:
        assert out["logprobs"].to_torch().shape == (len(PROMPT) - 1 + len(SAMPLED),)
    assert "loss:sum" in sdk.metrics
    assert sdk.metrics["loss:sum"] == pytest.approx(result.metrics["loss:sum"], rel=1e-6)


def test_bad_config_over_the_wire_is_a_user_error(engine: TrainerEngine) -> None:
    _, _, cmd = wire.decode_forward_backward(body("gspo", {"beta": 0.1}), None)
    with pytest.raises(UserError, match="does not take config key 'beta'"):
        engine.forward_backward("r", cmd)
    _, _, cmd = wire.decode_forward_backward(body("stable_reinforce", {"kl_coeff": -1}), None)
    with pytest.raises(UserError, match="must be >= 0"):
        engine.forward_backward("r", cmd)
