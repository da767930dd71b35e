"""The sampling session's lifecycle endpoints on a real nats-server: an in-process gateway, and
a real ``SamplerWorker`` (the built-in model on the CPU) started only when the test wants the
queued requests served.

* ``cancel_future`` of a sample still in the queue: its future answers cancelled at once, the
  sampler that later takes the message never runs it, nothing is billed, the result is never
  written over the cancellation.
* ``retrieve_futures``: completions newer than the cursor, each reported once; a long poll that
  wakes when a sample finishes; acknowledged ids leave the index; another tenant gets 404.
* ``join_sampling_session``: clone ids 1, 2, ... per sampling session.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services.sampler.engine import SamplerEngine
from services.sampler.handlers import SamplerWorker
from services.sampler.settings import SamplerSettings
from tests.integration.gateway_app import client, running_gateway
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.keys import create_key
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.models.registry import default_registry

pytestmark = pytest.mark.timeout(120)

TENANT = "tenant-s"


async def sampler_session(http) -> str:
    session = (await http.post("/api/v1/create_session", json={"tags": []})).json()["session_id"]
    answer = await http.post(
        "/api/v1/create_sampling_session",
        json={
            "session_id": session,
            "sampling_session_seq_id": 0,
            "base_model": BUILTIN_MODEL_NAME,
        },
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["sampling_session_id"]


async def asample(http, sampler_id: str, seq_id: int, max_tokens: int = 3) -> str:
    answer = await http.post(
        "/api/v1/asample",
        json={
            "sampling_session_id": sampler_id,
            "seq_id": seq_id,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": max_tokens, "seed": 1},
        },
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["request_id"]


async def start_sampler(
    bus: b.Bus, nats_url: str, tmp_path, models_dir, log, **options: object
) -> SamplerWorker:
    settings = SamplerSettings(
        nats_url=nats_url, state_dir=tmp_path, models_dir=models_dir, **options
    )
    settings.worker_id = "sampler-test"
    engine = SamplerEngine.from_spec(default_registry(models_dir).resolve(BUILTIN_MODEL_NAME))
    worker = SamplerWorker(settings, bus, engine, LocalCheckpointStore(tmp_path / "ck"), log)
    await worker.declare()
    await worker.start()
    return worker


async def usage_messages(bus: b.Bus) -> int:
    info = await bus.js.stream_info(s.USAGE_STREAM)
    return int(info.state.messages)


async def drained(bus: b.Bus) -> None:
    deadline = time.monotonic() + 60
    while await b.consumer_depth(bus, s.SAMPLE_STREAM, s.sample_consumer(BUILTIN_MODEL_NAME)):
        assert time.monotonic() < deadline, "the sampler did not drain its queue"
        await asyncio.sleep(0.2)


async def test_a_sample_cancelled_in_the_queue_never_runs_and_is_not_billed(
    bus: b.Bus, spawned: None, nats_url: str, tmp_path, models_dir, builtin_model, log
) -> None:
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        sampler_id = await sampler_session(http)
        cancelled = await asample(http, sampler_id, 0, max_tokens=50)
        kept = await asample(http, sampler_id, 1)
        assert (await http.post("/api/v1/cancel_future", json={"request_id": cancelled})).is_success
        answer = await http.post("/api/v1/retrieve_future", json={"request_id": cancelled})
        assert answer.json() == {"error": "cancelled by the client", "category": "user"}
        # Another tenant cannot cancel (or learn of) the kept one.
        other = await create_key(bus, "tenant-other")
        async with client(app, other) as stranger:
            refused = await stranger.post("/api/v1/cancel_future", json={"request_id": kept})
            assert refused.status_code == 404
        assert await usage_messages(bus) == 0
        await start_sampler(bus, nats_url, tmp_path, models_dir, log)
        done = await http.post("/api/v1/retrieve_future", json={"request_id": kept})
        assert "sequences" in done.text or done.headers["content-type"].startswith("application")
        await drained(bus)
        record = await b.future_record(bus, cancelled)
        assert record is not None and record.status == "failed" and record.started_at is None
        kept_record = await b.future_record(bus, kept)
        assert kept_record is not None and kept_record.status == "done"
        assert kept_record.enqueued_at and kept_record.started_at and kept_record.finished_at
        assert kept_record.enqueued_at <= kept_record.started_at <= kept_record.finished_at
        # Only the kept sample is billed: its prefill and sample tokens, nothing for the other.
        await asyncio.sleep(0.5)
        assert await usage_messages(bus) == 2
        again = await http.post("/api/v1/cancel_future", json={"request_id": kept})
        assert again.is_success  # a finished future stays finished
        assert (await b.future_record(bus, kept)).status == "done"  # type: ignore[union-attr]


async def test_a_sample_cancelled_while_decoding_leaves_the_engine_unbilled(
    bus: b.Bus, spawned: None, nats_url: str, tmp_path, models_dir, builtin_model, log
) -> None:
    """``cancel_future`` of a sample the engine is decoding: the sampler's sweep sees the final
    record and takes it out of the batch before the next step (its rows and KV blocks free), so
    it never runs to its ``max_tokens``; the record stays the cancellation, nothing is billed,
    and a sample sent after it is served."""
    key = await create_key(bus, TENANT)
    worker = await start_sampler(bus, nats_url, tmp_path, models_dir, log, session_check_s=0.1)
    engine = worker.engine
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        sampler_id = await sampler_session(http)
        long = await asample(http, sampler_id, 0, max_tokens=2000)
        deadline = time.monotonic() + 30
        while not engine._running:  # decoding
            assert time.monotonic() < deadline, "the long sample never started decoding"
            await asyncio.sleep(0.02)
        [seq] = engine._running
        assert (await http.post("/api/v1/cancel_future", json={"request_id": long})).is_success
        deadline = time.monotonic() + 10
        while engine.has_work:
            assert time.monotonic() < deadline, "the cancelled sample kept decoding"
            await asyncio.sleep(0.02)
        assert not engine._running and engine._free_rows == engine.max_seqs
        # Left alone, it runs to the end of text at token 1021 (seeded): well after this.
        assert seq.done and len(seq.tokens) < 500
        answer = await http.post("/api/v1/retrieve_future", json={"request_id": long})
        assert answer.json() == {"error": "cancelled by the client", "category": "user"}
        after = await asample(http, sampler_id, 1)
        done = await http.post("/api/v1/retrieve_future", json={"request_id": after})
        assert done.status_code == 200 and "error" not in done.text
        await asyncio.sleep(0.5)
        assert await usage_messages(bus) == 2  # the later sample's prefill and sample tokens


async def poll(http, target: dict[str, object], cursor: int) -> dict[str, object]:
    """Long-poll as the SDK's session poller does, until something completes."""
    deadline = time.monotonic() + 60
    while True:
        answer = await http.post(
            "/api/v1/retrieve_futures", json={"target": target, "prev_cursor": cursor}
        )
        assert answer.status_code == 200, answer.text
        if answer.json()["completions"] or time.monotonic() > deadline:
            return answer.json()
        assert answer.json()["cursor"] >= cursor


async def test_retrieve_futures_reports_each_completion_once(
    bus: b.Bus, spawned: None, nats_url: str, tmp_path, models_dir, builtin_model, log
) -> None:
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        sampler_id = await sampler_session(http)
        target = {"type": "sampling_session", "sampling_session_id": sampler_id}
        first = await asample(http, sampler_id, 0)
        empty = await http.post(
            "/api/v1/retrieve_futures", json={"target": target, "prev_cursor": 0, "timeout": 0}
        )
        assert empty.status_code == 200 and empty.json()["completions"] == []
        await start_sampler(bus, nats_url, tmp_path, models_dir, log)
        polled = await poll(http, target, 0)
        assert polled["completions"] == [{"state": "finished", "request_id": first}]
        cursor = polled["cursor"]
        # Seen: not reported again; a second sample is.
        second = await asample(http, sampler_id, 1)
        polled = await poll(http, target, cursor)
        assert polled["completions"] == [{"state": "finished", "request_id": second}]
        # Acknowledged ids leave the index; the poll answers at once with timeout 0.
        acked = await http.post(
            "/api/v1/retrieve_futures",
            json={
                "target": target,
                "prev_cursor": 0,
                "timeout": 0,
                "retrieved_request_ids": [first, second],
            },
        )
        assert acked.json()["completions"] == []
        # A clone's futures are its own.
        clone = {**target, "cloned_sampler_id": 1}
        cloned = await asample(http, sampler_id, 1_000_000_000)
        polled = await poll(http, clone, 0)
        assert polled["completions"] == [{"state": "finished", "request_id": cloned}]
        other = await create_key(bus, "tenant-other")
        async with client(app, other) as stranger:
            refused = await stranger.post(
                "/api/v1/retrieve_futures", json={"target": target, "prev_cursor": 0}
            )
            assert refused.status_code == 404


async def test_join_sampling_session_counts_clones(
    bus: b.Bus, spawned: None, nats_url: str, models_dir, builtin_model, log
) -> None:
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        sampler_id = await sampler_session(http)
        body = {"sampling_session_id": sampler_id, "type": "join_sampling_session"}
        answers = await asyncio.gather(
            *(http.post("/api/v1/join_sampling_session", json=body) for _ in range(3))
        )
        assert sorted(a.json()["client_counter"] for a in answers) == [1, 2, 3]
        other = await create_key(bus, "tenant-other")
        async with client(app, other) as stranger:
            refused = await stranger.post("/api/v1/join_sampling_session", json=body)
            assert refused.status_code == 404
