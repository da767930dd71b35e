"""A session's timeline as a trace: what ``tinker session export-trace`` downloads.

``GET /api/v1/sessions/{session_id}/trace_export`` answers ``{"status": "ready", "url": ...}`` at
once (the SDK polls until ready); the URL is ``/downloads/traces/<session>?expires=&sig=``,
signed with HMAC-SHA256 under the gateway's ``url_signing_secret`` and valid for
``download_url_ttl_s``. The signature is the credential (the CLI downloads it with a plain GET,
no API key), so the path lies under the app's self-authenticated ``/downloads/`` prefix.

The trace is built when it is downloaded, from the platform's own timing on each of the
session's futures (``FutureIndex``): when the request was queued (the gateway accepted it; the
stream's timestamp when a worker took it), when its worker started it and when it finished. Each
request becomes two complete events in Chrome's trace-event JSON, which Perfetto opens: its
queue wait and its execution, on one track per kind of work (training, sampling, control).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import datetime
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from services.gateway.context import Gateway, gateway, tenant
from services.gateway.futures import FutureIndex
from whetstone.messages import FutureRecord, utcnow

router = APIRouter(prefix="/api/v1")
downloads = APIRouter(prefix="/downloads/traces")

TRACKS = {"sample": (2, "sampling"), "create_model": (3, "control")}
TRAINING_TRACK = (1, "training")


def signature(secret: str, session_id: str, expires: int) -> str:
    message = f"trace\n{session_id}\n{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@router.get("/sessions/{session_id}/trace_export")
async def trace_export(
    session_id: str, request: Request, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    await gw.session(t, session_id)
    expires = int(time.time()) + gw.settings.download_url_ttl_s
    query = urlencode(
        {"expires": expires, "sig": signature(gw.settings.url_signing_secret, session_id, expires)}
    )
    base = str(request.base_url).rstrip("/")
    return {"status": "ready", "url": f"{base}/downloads/traces/{quote(session_id)}?{query}"}


@downloads.get("/{session_id}")
async def download_trace(
    session_id: str, expires: int = 0, sig: str = "", gw: Gateway = Depends(gateway)
) -> Response:
    expected = signature(gw.settings.url_signing_secret, session_id, expires)
    if not hmac.compare_digest(expected, sig) or expires < time.time():
        return JSONResponse(
            {"error": "the trace URL is expired or invalid; export again", "category": "user"},
            status_code=403,
        )
    index = FutureIndex(gw.bus)
    records = [r for r, _ in await index.records(await index.request_ids(session_id))]
    body = json.dumps(session_trace(session_id, records, utcnow())).encode()
    return Response(
        body,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{session_id}.pftrace"'},
    )


def session_trace(session_id: str, records: list[FutureRecord], now: datetime) -> dict[str, object]:
    """Chrome trace-event JSON of the session's requests (timestamps in microseconds since the
    epoch): per request a ``queue`` event (queued until started) and an ``execute`` event
    (started until finished). A request still waiting shows its queue wait until ``now``."""
    events: list[dict[str, object]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": f"session {session_id}"}}
    ]
    for tid, name in sorted({TRAINING_TRACK, *TRACKS.values()}):
        events.append(
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
        )
    for record in sorted(records, key=lambda r: r.enqueued_at or r.created_at):
        tid = TRACKS.get(record.op, TRAINING_TRACK)[0]
        queued = record.enqueued_at or record.created_at
        started = record.started_at or record.finished_at or now
        args = {"request_id": record.request_id, "status": record.status}
        if record.error:
            args["error"] = record.error
        events.append(_slice(f"queue {record.op}", "queue", tid, queued, started, args))
        if record.started_at is not None:
            finished = record.finished_at or now
            events.append(_slice(record.op, "execute", tid, record.started_at, finished, args))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _slice(
    name: str, cat: str, tid: int, start: datetime, end: datetime, args: dict[str, str]
) -> dict[str, object]:
    start_us = int(start.timestamp() * 1e6)
    return {
        "name": name,
        "cat": cat,
        "ph": "X",
        "pid": 1,
        "tid": tid,
        "ts": start_us,
        "dur": max(0, int(end.timestamp() * 1e6) - start_us),
        "args": args,
    }
