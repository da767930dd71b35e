"""The walking skeleton end to end: the unmodified tinker SDK against a platform of real
processes (nats-server, gateway, scheduler, trainer, sampler, billing).

One module-scoped platform serves every test here; the tests run in file order and share the
tenant's token tally, which the last test compares with the usage report."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from whetstone import bus as b
from whetstone.cli import request_usage_report
from whetstone.keys import create_key
from whetstone.messages import UsageReportQuery
from whetstone.models.builtin import BUILTIN_MODEL_NAME

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sft.py"


def load_example():
    spec = importlib.util.spec_from_file_location("sft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Tally:
    """Tokens this test sent and received, per meter, to check the bill against."""

    train_tokens = 0
    prefill_tokens = 0
    cached_prefill_tokens = 0  # prompt tokens the sampler's prefix cache served (billed apart)
    forward_tokens = 0
    sample_tokens = 0


def make_key(platform, tenant: str) -> str:
    async def mint() -> str:
        bus = await b.connect(platform.nats_url, "test-keys")
        try:
            return await create_key(bus, tenant)
        finally:
            await bus.close()

    return asyncio.run(mint())


@pytest.fixture(scope="module")
def service(platform):
    client = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def trained(service):
    """A LoRA run trained for 24 SFT steps on the example's data; returns (client, losses, data)."""
    example = load_example()
    training = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=16, seed=0
    ).result()
    tokenizer = training.get_tokenizer()
    data = [example.make_datum(tokenizer, q, a) for q, a in example.make_examples()[:192]]
    losses = []
    adam = types.AdamParams(learning_rate=5e-3)
    for step in range(24):
        batch = data[(step % 6) * 32 : (step % 6 + 1) * 32]
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(adam)
        result = fwd_bwd.result()
        optim.result()
        Tally.train_tokens += sum(d.model_input.length for d in batch)
        weights = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
        losses.append(result.metrics["loss:sum"] / weights)
        assert len(result.loss_fn_outputs) == len(batch)
        assert result.loss_fn_outputs[0]["logprobs"].shape == [batch[0].model_input.length]
    return training, losses, data


def test_sft_lowers_the_loss(trained) -> None:
    _, losses, _ = trained
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, losses


def test_forward_matches_the_trained_weights(trained) -> None:
    training, _, data = trained
    out = training.forward(data[:4], "cross_entropy").result()
    Tally.forward_tokens += sum(d.model_input.length for d in data[:4])
    again = training.forward(data[:4], "cross_entropy").result()
    Tally.forward_tokens += sum(d.model_input.length for d in data[:4])
    # forward applies no gradient: the same call gives the same numbers
    assert out.metrics["loss:sum"] == pytest.approx(again.metrics["loss:sum"], rel=1e-6)
    logprobs = out.loss_fn_outputs[0]["logprobs"].tolist()
    assert all(lp <= 0 for lp in logprobs)


def test_sample_from_saved_sampler_weights(service, trained) -> None:
    training, _, _ = trained
    saved = training.save_weights_for_sampler("e2e").result()
    assert saved.path.endswith("/sampler_weights/e2e") and saved.path.startswith("tinker://")
    sampler = service.create_sampling_client(model_path=saved.path).result()
    tokenizer = training.get_tokenizer()
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Peru?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = types.ModelInput.from_ints(tokenizer.encode(prompt_text, add_special_tokens=False))
    params = types.SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    result = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    Tally.prefill_tokens += prompt.length - result.prompt_cache_hit_tokens
    Tally.cached_prefill_tokens += result.prompt_cache_hit_tokens
    assert len(result.sequences) == 2
    for seq in result.sequences:
        Tally.sample_tokens += len(seq.tokens)
        assert 1 <= len(seq.tokens) <= 12
        assert len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length")
    # the same seed gives the same samples
    repeat = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    # the repeated prompt's full blocks come from the prefix cache, billed as cached prefill
    assert repeat.prompt_cache_hit_tokens > 0
    Tally.prefill_tokens += prompt.length - repeat.prompt_cache_hit_tokens
    Tally.cached_prefill_tokens += repeat.prompt_cache_hit_tokens
    Tally.sample_tokens += sum(len(seq.tokens) for seq in repeat.sequences)
    assert [s.tokens for s in repeat.sequences] == [s.tokens for s in result.sequences]


def test_save_state_names_a_training_checkpoint(trained) -> None:
    training, _, _ = trained
    saved = training.save_state("e2e-state").result()
    assert saved.path == f"tinker://{training.model_id}/weights/e2e-state"
    with pytest.raises(tinker.RequestFailedError, match="already exists") as failed:
        training.save_state("e2e-state").result()  # names are not overwritten silently
    assert failed.value.category == "user"


def test_compute_logprobs(service, trained) -> None:
    training, _, _ = trained
    sampler = training.save_weights_and_get_sampling_client().result()
    tokens = training.get_tokenizer().encode(
        "The capital of Peru is Lima.", add_special_tokens=False
    )
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    Tally.prefill_tokens += len(tokens)
    Tally.sample_tokens += 1  # compute_logprobs is a sample of max_tokens=1; that token is billed
    assert len(logprobs) == len(tokens)
    assert logprobs[0] is None
    # The sampler serves exactly the weights the trainer holds: its prompt logprobs equal the
    # trainer's forward logprobs of the same tokens.
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    forward = training.forward([datum], "cross_entropy").result()
    Tally.forward_tokens += len(tokens) - 1
    assert logprobs[1:] == pytest.approx(forward.loss_fn_outputs[0]["logprobs"].tolist(), abs=1e-4)


def test_unknown_model_is_a_clear_error(service) -> None:
    with pytest.raises(tinker.BadRequestError, match="unknown base model"):
        service.create_lora_training_client(base_model="no-such/model", rank=8).result()


def test_token_outside_vocabulary_is_rejected(trained) -> None:
    training, _, data = trained
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 10**6]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
        training.forward_backward([bad], "cross_entropy").result()
    # the run carries on: the rejected call consumed nothing
    ok = training.forward(data[:1], "cross_entropy").result()
    Tally.forward_tokens += data[0].model_input.length
    assert "loss:sum" in ok.metrics


def test_wrong_api_key_is_refused(platform) -> None:
    client = tinker.ServiceClient(base_url=platform.base_url, api_key="tml-not-a-key")
    with pytest.raises(tinker.AuthenticationError):
        client.create_lora_training_client(base_model=BUILTIN_MODEL_NAME, rank=8).result()


def test_tenants_cannot_touch_each_others_runs(platform, trained) -> None:
    training, _, _ = trained
    other_key = make_key(platform, "other-tenant")
    headers = {"X-API-Key": other_key}
    with httpx.Client(base_url=platform.base_url, timeout=30) as http:
        info = http.post(
            "/api/v1/get_info",
            json={"model_id": training.model_id, "type": "get_info"},
            headers=headers,
        )
        assert info.status_code == 404 and "unknown model_id" in info.json()["error"]
        step = http.post(
            "/api/v1/optim_step",
            headers=headers,
            json={
                "model_id": training.model_id,
                "seq_id": 999,
                "type": "optim_step",
                "adam_params": {
                    "learning_rate": 1.0,
                    "beta1": 0.9,
                    "beta2": 0.95,
                    "eps": 1e-12,
                    "weight_decay": 0.0,
                    "grad_clip_norm": 0.0,
                },
            },
        )
        assert step.status_code == 404
    other = tinker.ServiceClient(base_url=platform.base_url, api_key=other_key)
    path = f"tinker://{training.model_id}/sampler_weights/e2e"
    with pytest.raises(tinker.NotFoundError):
        other.create_sampling_client(model_path=path).result().sample(
            types.ModelInput.from_ints([1, 2]),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=2),
        ).result()


def test_usage_report_matches_the_tokens_sent_and_received(platform, trained) -> None:
    expected = {
        "train_tokens": Tally.train_tokens,
        "prefill_tokens": Tally.prefill_tokens,
        "cached_prefill_tokens": Tally.cached_prefill_tokens,
        "forward_tokens": Tally.forward_tokens,
        "sample_tokens": Tally.sample_tokens,
        "checkpoints": 2,  # save_state and save_weights_for_sampler (ephemeral ones are free)
    }
    deadline = time.monotonic() + 30
    while True:  # billing ingests asynchronously; wait until it has caught up
        report = asyncio.run(
            request_usage_report(platform.nats_url, UsageReportQuery(tenant="default"))
        )
        billed = {row.meter: row.tokens for row in report.rows if row.meter != "checkpoint_bytes"}
        if billed == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert report.error is None
    assert billed == expected
    assert all(row.base_model == BUILTIN_MODEL_NAME for row in report.rows)
    assert all(row.cost_usd > 0 for row in report.rows if row.meter.endswith("_tokens"))
    assert all(row.cost_usd == 0 for row in report.rows if row.meter.startswith("checkpoint"))
    stored = [row.tokens for row in report.rows if row.meter == "checkpoint_bytes"]
    assert stored and stored[0] > 0
    others = asyncio.run(
        request_usage_report(platform.nats_url, UsageReportQuery(tenant="other-tenant"))
    )
    assert others.rows == []  # the other tenant's rejected calls cost nothing


def test_cli_mints_keys_and_prints_the_report(platform) -> None:
    cli = [sys.executable, "-m", "whetstone.cli", "--state-dir", str(platform.state_dir)]
    key = subprocess.run(
        [*cli, "keys", "create", "--tenant", "cli-tenant"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert key.startswith("tml-")
    caps = (
        tinker.RestClient(base_url=platform.base_url, api_key=key)
        .get_server_capabilities()
        .result()
    )
    assert [m.model_name for m in caps.supported_models] == [BUILTIN_MODEL_NAME]
    report = subprocess.run(
        [*cli, "usage", "--tenant", "default"], check=True, capture_output=True, text=True
    ).stdout
    assert "train_tokens" in report and "sample_tokens" in report and "total" in report


def test_closing_a_client_finishes_its_session(platform) -> None:
    client = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    training = client.create_lora_training_client(base_model=BUILTIN_MODEL_NAME, rank=4).result()
    session_id = training.model_id.split(":train:")[0]
    beat = {"session_id": session_id, "type": "session_heartbeat"}
    headers = {"X-API-Key": platform.api_key}
    with httpx.Client(base_url=platform.base_url, timeout=30) as http:
        assert http.post("/api/v1/session_heartbeat", json=beat, headers=headers).status_code == 200
        client.close("success").result()
        gone = http.post("/api/v1/session_heartbeat", json=beat, headers=headers)
        assert gone.status_code == 410  # the SDK stops heartbeating a finished session
        other = http.post(
            "/api/v1/session_heartbeat", json=beat, headers={"X-API-Key": make_key(platform, "x")}
        )
        assert other.status_code == 404


def test_no_key_appears_in_any_log(platform) -> None:
    """After everything above (keys minted, a wrong key refused, the CLI), no service's log and
    not NATS's holds an API key or anything shaped like one; each service's lines are JSON bound
    to its name."""
    logs = sorted((platform.state_dir / "logs").glob("*.log")) + [platform.state_dir / "nats.log"]
    assert {p.stem for p in logs} >= {"gateway", "trainer", "sampler", "scheduler", "billing"}
    key_like = re.compile(r"tml-[A-Za-z0-9_\-]{8,}")
    for path in logs:
        text = path.read_text(errors="replace")
        assert platform.api_key not in text, f"the API key is in {path.name}"
        found = key_like.search(text)
        assert not found, f"a key-like token in {path.name}: {found}"
    for name in ("trainer", "sampler", "scheduler", "billing"):
        lines = [
            json.loads(line)
            for line in (platform.state_dir / "logs" / f"{name}.log").read_text().splitlines()
            if line.startswith("{")
        ]
        assert lines and all(line.get("service") == name for line in lines), name
