"""The audit log: one durable message per security-relevant action, read back by day.

Stream ``WS_AUDIT`` (limits retention, file storage, kept ``bus.AUDIT_MAX_AGE_S``), subject
``ws.audit.<event>``. Written where the action happens, after it succeeded: API keys created,
revoked or given new limits (``keys.py``, so the CLI's and the gateway's changes alike),
checkpoints published, unpublished, deleted, copied or given a TTL, sessions moved to a project,
training runs created and unloaded (the gateway), checkpoints deleted when their TTL ran out (the
scheduler's sweep; no key acted). A failed write raises: the caller's retry
records it again (an entry may repeat; none is lost).

Read by the gateway's ``GET /api/v1/audit`` (``AdminClient.get_audit_log``) for admin keys:
one UTC day at a time, optionally one ``category`` (Tinker's ``event_type`` filter): events are
named ``<resource>_<action>`` and ``CATEGORY`` says which filter each belongs to.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import nats.errors
from nats.js import api
from nats.js.errors import NotFoundError
from pydantic import Field

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.messages import Message, utcnow

# Tinker's event_type filter ("all" matches everything; "teams": this platform has none).
EVENT_TYPES = ("all", "checkpoints", "projects", "teams", "organizations")
CATEGORY: dict[str, str] = {
    "api_key_created": "organizations",
    "api_key_revoked": "organizations",
    "api_key_limits_changed": "organizations",
    "checkpoint_published": "checkpoints",
    "checkpoint_unpublished": "checkpoints",
    "checkpoint_deleted": "checkpoints",
    "checkpoint_ttl_set": "checkpoints",
    "checkpoint_copied": "checkpoints",
    "session_project_assigned": "projects",  # runs live in a session's project
    "training_run_created": "projects",
    "training_run_unloaded": "projects",
}
FETCH_BATCH = 256


class AuditEvent(Message):
    """One audited action: what (``event``, ``details``), whose (``tenant``), by which key
    (``api_key_id``; None for the operator's CLI), when."""

    event: str
    tenant: str
    api_key_id: str | None = None
    at: datetime = Field(default_factory=utcnow)
    details: dict[str, str] = {}


async def record(
    bus: b.Bus,
    event: str,
    tenant: str,
    api_key_id: str | None = None,
    *,
    dedup_id: str | None = None,
    **details: str | None,
) -> None:
    """Append one event to the audit log (waits for the stream's acknowledgement). An action
    that a client may retry records its event on every try under one ``dedup_id``: the stream
    keeps one copy, and a try that failed after the action but before its event loses none."""
    if event not in CATEGORY:
        raise ValueError(f"unknown audit event {event!r}")
    entry = AuditEvent(
        event=event,
        tenant=tenant,
        api_key_id=api_key_id,
        details={k: v for k, v in details.items() if v is not None},
    )
    await b.publish(bus, f"{s.AUDIT_PREFIX}.{event}", entry, msg_id=dedup_id)


async def read_day(bus: b.Bus, day: date, category: str = "all") -> list[AuditEvent]:
    """The events of the UTC day ``day`` (midnight to midnight), oldest first."""
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    end = start + timedelta(days=1)
    config = api.ConsumerConfig(
        name=f"audit-{uuid.uuid4().hex[:12]}",
        deliver_policy=api.DeliverPolicy.BY_START_TIME,
        opt_start_time=start,
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=30.0,  # the server removes it if we vanish mid-read
        mem_storage=True,
    )
    events: list[AuditEvent] = []
    try:
        info = await bus.js.stream_info(s.AUDIT_STREAM)
    except NotFoundError:
        return events
    if info.state.messages == 0:
        return events  # nothing recorded yet: no consumer needed
    sub = await bus.js.pull_subscribe(f"{s.AUDIT_PREFIX}.>", stream=s.AUDIT_STREAM, config=config)
    try:
        while True:
            try:
                batch = await sub.fetch(FETCH_BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                break  # nothing (more) from the start time on
            last = False
            for msg in batch:
                if msg.metadata.timestamp >= end:
                    last = True
                    break
                entry = AuditEvent.decode(msg.data)
                if category == "all" or CATEGORY.get(entry.event) == category:
                    events.append(entry)
                last = msg.metadata.num_pending == 0
            if last:
                break
    finally:
        await sub.unsubscribe()
        try:
            await bus.js.delete_consumer(s.AUDIT_STREAM, config.name or "")
        except NotFoundError:
            pass
    return events
