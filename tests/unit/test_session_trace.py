"""The session trace export's events (``services/gateway/traces.py``), from future records alone:
queue wait and execution per request on its kind's track, a request still queued shown up to
now, a failure's error in its args, and the download signature bound to session and expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.gateway.traces import session_trace, signature
from whetstone.messages import FutureRecord, OptimStepResult

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def slices(trace: dict[str, object]) -> list[dict[str, object]]:
    events = trace["traceEvents"]
    assert isinstance(events, list)
    return [e for e in events if e["ph"] == "X"]


def test_each_request_is_its_queue_wait_then_its_execution() -> None:
    done = FutureRecord(
        request_id="req-1",
        tenant="t",
        op="optim_step",
        status="done",
        result=OptimStepResult(),
        enqueued_at=at(1.0),
        started_at=at(1.5),
        finished_at=at(2.25),
    )
    trace = session_trace("sess-1", [done], now=at(10))
    queue, run = slices(trace)
    assert (queue["name"], queue["cat"], queue["dur"]) == ("queue optim_step", "queue", 500_000)
    assert (run["name"], run["cat"], run["dur"]) == ("optim_step", "execute", 750_000)
    assert queue["ts"] + queue["dur"] == run["ts"] == int(at(1.5).timestamp() * 1e6)
    assert queue["tid"] == run["tid"] == 1  # the training track
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"]
    assert names[0] == "session sess-1" and "sampling" in names and "training" in names


def test_waiting_and_failed_requests() -> None:
    waiting = FutureRecord(request_id="req-2", tenant="t", op="sample", created_at=at(3))
    refused = FutureRecord(
        request_id="req-3",
        tenant="t",
        op="sample",
        status="failed",
        error="cancelled by the client",
        category="user",
        created_at=at(1),
        finished_at=at(2),
    )
    events = slices(session_trace("sess-1", [waiting, refused], now=at(5)))
    # sorted by when they were queued; neither started, so each is a queue wait only
    assert [e["args"]["request_id"] for e in events] == ["req-3", "req-2"]
    failed, pending = events
    assert failed["dur"] == 1_000_000 and failed["args"]["error"] == "cancelled by the client"
    assert pending["dur"] == 2_000_000 and pending["args"]["status"] == "pending"
    assert failed["tid"] == pending["tid"] == 2  # the sampling track


def test_the_signature_names_the_session_and_the_expiry() -> None:
    sig = signature("secret", "sess-1", 100)
    assert sig == signature("secret", "sess-1", 100)
    assert sig != signature("secret", "sess-2", 100)
    assert sig != signature("secret", "sess-1", 101)
    assert sig != signature("other", "sess-1", 100)
