"""The gateway's HTTP edge on a real nats-server (in-process app, no workers): the body limit
(413), contract rules as 400s with a Tinker error body, the probes, Prometheus metrics that move
with the traffic, and no API key in any log line or span."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import nats.errors
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.context import Gateway
from tests.integration.gateway_app import PROTOBUF, client, create_run, running_gateway
from whetstone import bus as b
from whetstone import observability
from whetstone import subjects as s
from whetstone.keys import create_key
from whetstone.messages import CreateModelResult, FutureRecord, Message
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(60)

TENANT = "tenant-http"
MB = 1024 * 1024


class RecordingLog:
    """Stands in for the structlog logger: keeps every event and its fields as one JSON line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __getattr__(self, level: str):  # info, warning, error, exception, ...
        def record(event: str, **fields: object) -> None:
            self.lines.append(json.dumps({"level": level, "event": event, **fields}, default=str))

        return record


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}; raises if it does not parse."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_bodies_over_the_limit_get_413_with_a_body(
    bus: b.Bus, nats_url: str, models_dir: Path, log
) -> None:
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        limit = app.state.gateway.settings.max_body_bytes
        assert 8 * MB < limit < 20 * MB  # an SDK chunk (~5 MB) fits; 20 MB does not

        declared = await http.post(
            "/api/v1/forward_backward",
            content=b"\0" * (20 * MB),
            headers={"content-type": PROTOBUF},
        )
        assert declared.status_code == 413
        assert declared.json()["category"] == "user" and "too large" in declared.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(20):
                yield b"\0" * MB

        streamed = await http.post(
            "/api/v1/optim_step", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413 and streamed.json()["category"] == "user"

        # Under the limit the request reaches its route (and is refused there, for its content).
        small = await http.post(
            "/api/v1/forward_backward", content=b"\xff" * MB, headers={"content-type": PROTOBUF}
        )
        assert small.status_code == 400 and "protobuf" in small.json()["error"]


async def test_contract_rules_answer_400_with_a_tinker_error_body(
    bus: b.Bus, nats_url: str, models_dir: Path, log
) -> None:
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        session = (await http.post("/api/v1/create_session", json={})).json()["session_id"]
        spec = app.state.gateway.registry.resolve(BUILTIN_MODEL_NAME)
        for lora, needle in (
            ({"rank": 0}, "rank"),
            ({"rank": spec.max_lora_rank + 1}, "rank"),
            ({"train_attn": False, "train_mlp": False, "train_unembed": False}, "at least one"),
        ):
            answer = await http.post(
                "/api/v1/create_model",
                json={
                    "session_id": session,
                    "model_seq_id": 0,
                    "base_model": BUILTIN_MODEL_NAME,
                    "lora_config": lora,
                },
            )
            assert answer.status_code == 400, answer.text
            assert answer.json()["category"] == "user" and needle in answer.json()["error"]
        # An optimizer other than AdamW (tinker's "dimuon") is refused, never trained as AdamW.
        answer = await http.post(
            "/api/v1/create_model",
            json={
                "session_id": session,
                "model_seq_id": 0,
                "base_model": BUILTIN_MODEL_NAME,
                "optimizer_config": {"type": "dimuon", "version": 1},
            },
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["category"] == "user" and "dimuon" in answer.json()["error"]

        sampler = (
            await http.post(
                "/api/v1/create_sampling_session",
                json={
                    "session_id": session,
                    "sampling_session_seq_id": 0,
                    "base_model": BUILTIN_MODEL_NAME,
                },
            )
        ).json()["sampling_session_id"]
        prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
        for params in (
            {"top_p": 0.0},
            {"top_k": 0},
            {"max_tokens": 0},
            {"temperature": -1},
            {"max_tokens": spec.context_length},
        ):
            answer = await http.post(
                "/api/v1/asample",
                json={
                    "sampling_session_id": sampler,
                    "seq_id": 1,
                    "prompt": prompt,
                    "sampling_params": params,
                },
            )
            assert answer.status_code == 400, (params, answer.text)
            assert answer.json()["category"] == "user" and answer.json()["error"]

        broken = await http.post(
            "/api/v1/create_session",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert broken.status_code == 400 and broken.json()["category"] == "user"


async def test_probes_need_no_key_and_readyz_follows_nats(
    bus: b.Bus, nats_url: str, models_dir: Path, log
) -> None:
    async with running_gateway(nats_url, models_dir, log) as app, client(app, None) as http:
        for path in ("/livez", "/readyz", "/api/v1/healthz", "/metrics"):
            answer = await http.get(path)
            assert answer.status_code == 200, (path, answer.text)
        assert (await http.post("/api/v1/create_session", json={})).status_code == 401

        gw: Gateway = app.state.gateway
        real_bus = gw.bus
        gw.bus = SimpleNamespace(nc=SimpleNamespace(is_connected=False))  # type: ignore[assignment]
        try:
            answer = await http.get("/readyz")
            assert answer.status_code == 503 and answer.json()["nats"] == "disconnected"
            assert (await http.get("/livez")).status_code == 200  # alive all the same
        finally:
            gw.bus = real_bus


async def test_metrics_move_with_requests_and_parse_as_prometheus_text(
    bus: b.Bus, nats_url: str, models_dir: Path, log
) -> None:
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        before = samples((await http.get("/metrics")).text)
        run_id, create_request_id = await create_run(http)
        await http.post("/api/v1/get_info", json={"model_id": "sess-none:train:0"})  # 404

        # A long poll waits (and is in flight) until a worker writes the result.
        poll = asyncio.create_task(
            http.post("/api/v1/retrieve_future", json={"request_id": create_request_id})
        )
        await asyncio.sleep(0.5)
        during = samples((await http.get("/metrics")).text)
        pending = await b.future_record(bus, create_request_id)
        assert pending is not None
        await b.finish_future(bus, pending, CreateModelResult(model_id=run_id))
        assert (await poll).json()["model_id"] == run_id
        after = samples((await http.get("/metrics")).text)

    assert value(during, "whetstone_gateway_long_polls_waiting") >= 1
    assert value(during, "whetstone_gateway_http_requests_in_flight") >= 1
    assert value(after, "whetstone_gateway_long_polls_waiting") == 0

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "whetstone_gateway_http_requests_total"
    assert moved(requests, operation="/api/v1/create_session", status="200") == 1
    assert moved(requests, operation="/api/v1/create_model", status="200") == 1
    assert moved(requests, operation="/api/v1/get_info", status="404") == 1
    assert moved(requests, operation="/api/v1/retrieve_future", status="200") == 1
    assert (
        moved(
            "whetstone_gateway_http_request_duration_seconds_count",
            operation="/api/v1/create_model",
            status="200",
        )
        == 1
    )
    assert moved("whetstone_gateway_submissions_total", op="create_model") == 1
    assert moved("whetstone_gateway_refusals_total", reason="NotFound", category="user") == 1
    assert moved("whetstone_gateway_futures_completed_total", op="create_model", status="done") == 1
    assert not any(dict(labels).get("operation") == "/metrics" for _, labels in after)


async def test_api_keys_never_reach_logs_or_spans(
    bus: b.Bus,
    nats_url: str,
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    observability.add_span_exporter(spans)
    key = await create_key(bus, TENANT)
    wrong_key = "tml-" + "x" * 43
    recording = RecordingLog()
    async with running_gateway(nats_url, models_dir, recording) as app, client(app, key) as http:
        await create_run(http)
        await http.post("/api/v1/get_info", json={"model_id": "sess-none:train:0"})
        async with client(app, wrong_key) as intruder:
            assert (await intruder.post("/api/v1/create_session", json={})).status_code == 401

        async def failing(
            bus_: b.Bus, subject: str, message: Message, msg_id: str | None = None
        ) -> None:
            raise nats.errors.TimeoutError

        monkeypatch.setattr(b, "publish", failing)  # a warning line, with the request's context
        session = (await http.post("/api/v1/create_session", json={})).json()["session_id"]
        answer = await http.post(
            "/api/v1/create_model",
            json={"session_id": session, "model_seq_id": 0, "base_model": BUILTIN_MODEL_NAME},
        )
        assert answer.status_code == 503
    assert any(line for line in recording.lines if "publish failed" in line)
    out, err = capfd.readouterr()
    span_text = json.dumps(
        [dict(span.attributes or {}) for span in spans.get_finished_spans()], default=str
    )
    assert spans.get_finished_spans(), "the FastAPI instrumentation made no spans"
    for secret in (key, wrong_key, key[4:], wrong_key[4:]):
        for where, text in (
            ("log", "\n".join(recording.lines)),
            ("stdout", out),
            ("stderr", err),
            ("spans", span_text),
        ):
            assert secret not in text, f"an API key appeared in {where}"


async def test_a_pending_record_is_never_left_without_its_message(
    bus: b.Bus, nats_url: str, models_dir: Path, log, monkeypatch
) -> None:
    """create_model goes through the same path: after a 503, the retry queues PlaceRun once."""
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        real = b.publish
        failures = [nats.errors.TimeoutError()]

        async def flaky(
            bus_: b.Bus, subject: str, message: Message, msg_id: str | None = None
        ) -> None:
            if failures:
                raise failures.pop()
            await real(bus_, subject, message, msg_id=msg_id)

        monkeypatch.setattr(b, "publish", flaky)
        session = (await http.post("/api/v1/create_session", json={})).json()["session_id"]
        body = {"session_id": session, "model_seq_id": 0, "base_model": BUILTIN_MODEL_NAME}
        assert (await http.post("/api/v1/create_model", json=body)).status_code == 503
        retry = await http.post("/api/v1/create_model", json=body)
        assert retry.status_code == 200
        record = await b.kv_get(bus.kv[s.FUTURES_BUCKET], retry.json()["request_id"], FutureRecord)
        assert record is not None and record.status == "pending"
        info = await bus.js.stream_info(s.CONTROL_STREAM, subjects_filter=s.PLACE_SUBJECT)
        assert (info.state.subjects or {}).get(s.PLACE_SUBJECT) == 1
