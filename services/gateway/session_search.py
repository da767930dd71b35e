"""``POST /api/v1/sessions/search`` (``RestClient.search_sessions``, experimental in tinker 0.38):
the caller's sessions, newest first, filtered and paged by a keyset cursor.

The request and answer are the SDK's ``SessionSearchRequest`` / ``SessionSearchResponse``. A tenant
only ever finds its own sessions: ``owner`` "own" and "accessible" both mean the caller's (no
other tenant's session is readable here), and ``user`` owner URNs match only the caller's own
(``owner`` is reported as the tenant name). A session with no project is in project
``default``. Status: ``active`` until finished, then ``client_finished`` with the reason the
client sent; a session ended without one (its heartbeats stopped, or a copy's holder) has no
known status (None), as the SDK's type allows. ``failed`` and ``cancelled`` never match: this
platform does not end sessions that way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.gateway.context import Gateway, gateway, tenant
from services.gateway.rest import live, records
from whetstone import subjects as s
from whetstone.messages import CheckpointRecord, SessionRecord, TrainingRunRecord, utcnow

router = APIRouter(prefix="/api/v1")
DEFAULT_PROJECT = "default"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Owner(Strict):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] | None = Field(None, min_length=1, max_length=10)


class StatusQuery(Strict):
    type: Literal["active", "cancelled", "failed", "client_finished"]
    reasons: list[Literal["success", "errored", "interrupted"]] | None = Field(None, min_length=1)


class Cursor(BaseModel):
    model_config = ConfigDict(extra="ignore")
    last_created_at: AwareDatetime
    last_session_id: str


class SearchBody(Strict):
    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = {}
    display_name: Annotated[str, Field(min_length=1)] | None = None
    owner: Owner = Owner()
    statuses: list[StatusQuery] | None = Field(None, min_length=1)
    limit: int = Field(50, ge=1, le=200)
    cursor: Cursor | None = None


def _status(record: SessionRecord) -> dict[str, object] | None:
    if not record.finished:
        return {"type": "active"}
    if record.finish_reason is None:
        return None
    return {"type": "client_finished", "reason": {"type": record.finish_reason}}


def _matches(body: SearchBody, record: SessionRecord) -> bool:
    by_id = body.session_id is not None and record.session_id == body.session_id
    name = (record.display_name or "").lower()
    by_name = body.display_name is not None and all(
        word in name for word in body.display_name.lower().split()
    )
    if (body.session_id is not None or body.display_name is not None) and not (by_id or by_name):
        return False
    project = record.project_id or DEFAULT_PROJECT
    if body.project_ids is not None and project not in body.project_ids:
        return False
    if any(record.user_metadata.get(k) != v for k, v in body.user_metadata.items()):
        return False
    if body.statuses is not None:
        status = _status(record)
        if not any(_status_matches(q, status, record.finish_reason) for q in body.statuses):
            return False
    return True


def _status_matches(
    query: StatusQuery, status: dict[str, object] | None, reason: str | None
) -> bool:
    if status is None or status["type"] != query.type:
        return False
    return query.reasons is None or reason in query.reasons


@router.post("/sessions/search")
async def search_sessions(
    body: SearchBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    if body.owner.type == "user" and t not in (body.owner.owner_urns or []):
        return {"sessions": []}  # other owners' sessions are never found
    found = [r for r, _ in await records(gw, s.SESSIONS_BUCKET, SessionRecord) if r.tenant == t]
    order = sorted(
        (r for r in found if _matches(body, r)),
        key=lambda r: (r.created_at, r.session_id),
        reverse=True,
    )
    if body.cursor is not None:
        after = (body.cursor.last_created_at, body.cursor.last_session_id)
        order = [r for r in order if (r.created_at, r.session_id) < after]
    page = order[: body.limit]
    counts = await _checkpoints_by_session(gw, t)
    out: dict[str, object] = {"sessions": [_summary(r, counts) for r in page]}
    if len(order) > body.limit:
        last = page[-1]
        out["next_cursor"] = {
            "last_created_at": last.created_at.isoformat(),
            "last_session_id": last.session_id,
        }
    return out


async def _checkpoints_by_session(gw: Gateway, t: str) -> dict[str, tuple[int, int]]:
    """session id -> (live checkpoints, their bytes) of the tenant's runs."""
    sessions = {
        r.run_id: r.session_id
        for r, _ in await records(gw, s.RUNS_BUCKET, TrainingRunRecord)
        if r.tenant == t
    }
    now = utcnow()
    counts: dict[str, tuple[int, int]] = {}
    for c, _ in await records(gw, s.CHECKPOINTS_BUCKET, CheckpointRecord):
        session = sessions.get(c.run_id)
        if c.tenant == t and session is not None and live(c, now):
            n, size = counts.get(session, (0, 0))
            counts[session] = (n + 1, size + (c.size_bytes or 0))
    return counts


def _summary(record: SessionRecord, counts: dict[str, tuple[int, int]]) -> dict[str, object]:
    n, size = counts.get(record.session_id, (0, 0))
    created: datetime = record.created_at
    out: dict[str, object] = {
        "session_id": record.session_id,
        "created_at": created.isoformat(),
        "owner": record.tenant,
        "project_id": record.project_id or DEFAULT_PROJECT,
        "status": _status(record),
        "checkpoints_count": n,
        "display_name": record.display_name,
        "user_metadata": record.user_metadata,
        "checkpoint_storage_bytes": size,
    }
    return {k: v for k, v in out.items() if v is not None}
