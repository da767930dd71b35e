"""The hpcai 0.2.0 SDK (HPC-AI's fork of the Tinker SDK) against a platform of real processes,
on the same port as the Tinker SDK.

The SDK pins numpy<2, so it runs in its own virtual environment, ``.venv-hpcai``, which the
``hpcai_python`` fixture creates with ``scripts/setup-hpcai`` when it is missing (a failure to
create it fails these tests: it is never a skip). ``hpcai_driver.py`` runs there as a
subprocess: it calls every public method of hpcai's ServiceClient, TrainingClient,
SamplingClient and RestClient, runs a short SFT loop, and reports what it covered.

The platform holds one run per trainer (``WHETSTONE_MAX_RUNS=1``), so that a second run waits
``in_queue`` until ``unload_model`` frees the slot (a short long-poll keeps that wait brief), and
queues one sample per base model (``WHETSTONE_SAMPLE_QUEUE_LIMIT=1``), so that a burst of
samples meets 429s.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from services.gateway.hpcai import future_response, hpcai_path, is_hpcai, tinker_path
from whetstone import bus as b
from whetstone.checkpoints import TinkerPath
from whetstone.errors import UserError
from whetstone.keys import create_key
from whetstone.messages import FutureRecord, SaveWeightsResult
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.platform import Platform, start_platform

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("hpcai_driver.py")
HPCAI_HEADERS = {"User-Agent": "AsyncHpcAI/Python 0.1.5", "X-Username": ""}


@pytest.fixture(scope="module")
def hpcai_python() -> Path:
    python = ROOT / ".venv-hpcai" / "bin" / "python"
    done = subprocess.run(
        [str(ROOT / "scripts" / "setup-hpcai")], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/setup-hpcai failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return python


@pytest.fixture(scope="module")
def hpcai_platform(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    running: Platform = start_platform(
        tmp_path_factory.mktemp("hpcai-platform"),
        port=0,
        models_dir=models_dir,
        extra_env={
            "WHETSTONE_MAX_RUNS": "1",
            "WHETSTONE_LONG_POLL_S": "2",
            "WHETSTONE_SAMPLE_QUEUE_LIMIT": "1",
        },
    )
    yield running
    running.stop()


def make_key(platform: Platform, tenant: str) -> str:
    async def mint() -> str:
        bus = await b.connect(platform.nats_url, "test-keys")
        try:
            return await create_key(bus, tenant)
        finally:
            await bus.close()

    return asyncio.run(mint())


@pytest.fixture(scope="module")
def report(hpcai_python: Path, hpcai_platform: Platform) -> dict:
    other_key = make_key(hpcai_platform, "hpcai-other-tenant")
    done = subprocess.run(
        [
            str(hpcai_python),
            str(DRIVER),
            hpcai_platform.base_url,
            hpcai_platform.api_key,
            other_key,
            BUILTIN_MODEL_NAME,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={"PATH": "/usr/bin:/bin", "HPCAI_TELEMETRY": "1", "HOME": str(Path.home())},
    )
    assert done.returncode == 0, f"driver failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_public_method_of_the_hpcai_clients_is_exercised(report: dict) -> None:
    assert report["missing"] == [], f"public hpcai methods no check calls: {report['missing']}"
    assert "TrainingClient.unload_model" in report["covered"]
    assert len(report["covered"]) >= 55


def test_sft_through_hpcai_lowers_the_loss(report: dict) -> None:
    losses = report["losses"]
    assert len(losses) == 16
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, losses


def test_a_run_waits_in_queue_until_unload_model_frees_the_slot(report: dict) -> None:
    assert report["queued_after_unload"] is True


def test_a_full_sampler_answered_hpcai_429s_that_it_resubmitted(hpcai_platform, report) -> None:
    """The driver's burst of samples all succeeded (it checks each), and some met a 429 first:
    hpcai announces X-HpcAI-Sampling-Backpressure, waits and resubmits."""
    metrics = httpx.get(f"{hpcai_platform.base_url}/metrics", timeout=30).text
    refused = [
        line
        for line in metrics.splitlines()
        if line.startswith("whetstone_gateway_refusals_total") and 'reason="RateLimited"' in line
    ]
    assert refused and float(refused[0].rsplit(" ", 1)[1]) >= 1, refused


def test_tinker_requests_on_shared_paths_are_not_taken_for_hpcai(hpcai_platform) -> None:
    """The same path answers each dialect in its own way: a JSON forward_backward is hpcai's
    (a 404 for an unknown run), while without hpcai's headers it is refused as tinker's (which
    takes protobuf only)."""
    key = {"X-API-Key": hpcai_platform.api_key}
    body = {
        "model_id": "hpcai-none:train:0",
        "forward_backward_input": {"data": [], "loss_fn": "x"},
    }
    with httpx.Client(base_url=hpcai_platform.base_url, timeout=30) as http:
        as_hpcai = http.post("/api/v1/forward_backward", json=body, headers=key | HPCAI_HEADERS)
        as_tinker = http.post("/api/v1/forward_backward", json=body, headers=key)
        info = http.post("/api/v1/get_info", json={"model_id": "x"}, headers=key | HPCAI_HEADERS)
        bad = http.post(
            "/api/v1/create_model",
            json={"base_model": BUILTIN_MODEL_NAME, "lora_config": {"rank": 0}},
            headers=key | HPCAI_HEADERS,
        )
        no_key = http.post("/api/v1/forward", json=body, headers=HPCAI_HEADERS)
    assert as_hpcai.status_code == 404 and "unknown model_id" in as_hpcai.json()["error"]
    assert as_tinker.status_code == 400 and "protobuf" in as_tinker.json()["error"]
    assert info.status_code == 404
    assert bad.status_code == 400 and bad.json()["category"] == "user"
    assert no_key.status_code == 401


def test_a_retried_hpcai_request_gets_the_first_ones_future(hpcai_platform, report) -> None:
    """hpcai keeps a request's X-Idempotency-Key over all of its retries: the retry is the same
    request (same future, same seq_id), a new key is a new one. Runs after the driver (which
    unloads every run it made), so the one trainer slot is free."""
    headers = {"X-API-Key": hpcai_platform.api_key} | HPCAI_HEADERS
    with httpx.Client(base_url=hpcai_platform.base_url, timeout=60, headers=headers) as http:
        created = http.post(
            "/api/v1/create_model",
            json={"base_model": BUILTIN_MODEL_NAME, "lora_config": {"rank": 2}},
            headers={"X-Idempotency-Key": "stainless-python-retry-create-1"},
        ).json()
        again = http.post(
            "/api/v1/create_model",
            json={"base_model": BUILTIN_MODEL_NAME, "lora_config": {"rank": 2}},
            headers={"X-Idempotency-Key": "stainless-python-retry-create-1"},
        ).json()
        assert again == created
        model_id = created["model_id"]

        def result_of(request_id: str) -> dict:
            for _ in range(60):  # the platform's long poll is 2 s
                done = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
                if done.status_code == 200 and done.json().get("type") != "try_again":
                    return done.json()
            raise AssertionError(f"{request_id} still pending: {done.text}")

        assert result_of(created["request_id"]) == {"type": "create_model", "model_id": model_id}
        step = {"model_id": model_id, "adam_params": {"learning_rate": 1e-3}}
        first = http.post("/api/v1/optim_step", json=step, headers={"X-Idempotency-Key": "c:0:0"})
        retry = http.post("/api/v1/optim_step", json=step, headers={"X-Idempotency-Key": "c:0:0"})
        other = http.post("/api/v1/optim_step", json=step, headers={"X-Idempotency-Key": "c:0:1"})
        assert first.status_code == 200 and retry.json() == first.json(), (first.text, retry.text)
        assert other.json()["request_id"] != first.json()["request_id"]
        for future in (first.json(), other.json()):  # both run, in order
            assert "metrics" in result_of(future["request_id"])
        unloaded = http.post("/api/v1/unload_model", json={"model_id": model_id})
        assert unloaded.status_code == 200, unloaded.text


# ---------------------------------------------------------------- the dialect's pure parts


def test_hpcai_paths_name_the_same_checkpoints_as_tinker_paths() -> None:
    path = tinker_path("hpcai://hpcai-1:train:0/training/c1")
    assert path == TinkerPath("hpcai-1:train:0", "training", "c1")
    assert str(path) == "tinker://hpcai-1:train:0/weights/c1"
    assert hpcai_path("tinker://r:train:0/sampler_weights/s") == "hpcai://r:train:0/sampler/s"
    assert tinker_path("tinker://r:train:0/sampler_weights/s").kind == "sampler"
    with pytest.raises(UserError, match="hpcai://<run>/<training|sampler>/<name>"):
        tinker_path("hpcai://r/weights/c1")


def test_futures_answer_as_hpcai_reads_them() -> None:
    pending = FutureRecord(request_id="req-1", tenant="t", op="create_model")
    paused = future_response(pending.model_copy(update={"queue_state": "paused_capacity"}))
    assert paused.status_code == 408  # hpcai reads a queue state from a 408 only
    assert json.loads(paused.body)["queue_state"] == "in_queue"
    active = future_response(pending)
    assert active.status_code == 200 and json.loads(active.body)["type"] == "try_again"
    saved = SaveWeightsResult(kind="sampler", path="tinker://r:train:0/sampler_weights/s1")
    done = future_response(pending.model_copy(update={"status": "done", "result": saved}))
    assert json.loads(done.body) == {
        "type": "save_weights_for_sampler",
        "path": "hpcai://r:train:0/sampler/s1",
    }


def test_hpcai_requests_are_told_by_their_headers() -> None:
    def scope(*headers: tuple[str, str]) -> dict:
        return {"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers]}

    assert is_hpcai(scope(("user-agent", "AsyncHpcAI/Python 0.1.5")))
    assert is_hpcai(scope(("x-username", "")))
    assert is_hpcai(scope(("x-hpcai-request-type", "Sample")))
    assert not is_hpcai(scope(("user-agent", "AsyncTinker/Python 0.38.0")))
