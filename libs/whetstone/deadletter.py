"""The dead-letter stream (``WS_DEADLETTER``, subjects ``ws.dlq.<original subject>``): what an
operator reads and replays (``whetstone dlq list|replay``).

The message-fate wrapper (``fate.py``) puts a message here when it cannot be decoded or when its
handler failed ``MAX_DELIVER`` times, with its body and headers as published plus
``Ws-Dlq-Subject`` (where it was published), ``Ws-Dlq-Error`` and ``Ws-Dlq-Deliveries``. The
stream keeps dead letters for 14 days (limits retention): reading never removes one, replaying
publishes it to its original subject again and then deletes it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from nats.js.errors import NotFoundError

from whetstone import subjects as s
from whetstone.bus import Bus, stream_of

_DLQ_HEADERS = (s.DLQ_SUBJECT_HEADER, s.DLQ_ERROR_HEADER, s.DLQ_DELIVERIES_HEADER)


@dataclass(frozen=True)
class DeadLetter:
    seq: int  # its sequence number in WS_DEADLETTER: what ``replay`` takes
    subject: str  # where it was published
    error: str
    deliveries: int
    request_id: str | None
    size_bytes: int
    time: datetime | None


async def list_dead_letters(bus: Bus, limit: int = 50) -> list[DeadLetter]:
    """The newest ``limit`` dead letters, oldest first."""
    info = await bus.js.stream_info(s.DEADLETTER_STREAM)
    first, last = info.state.first_seq or 1, info.state.last_seq or 0
    found: list[DeadLetter] = []
    seq = last
    while seq >= first and len(found) < limit:
        try:
            msg = await bus.js.get_msg(s.DEADLETTER_STREAM, seq)
        except NotFoundError:  # deleted (replayed) or expired
            seq -= 1
            continue
        headers: dict[str, str] = msg.headers or {}
        found.append(
            DeadLetter(
                seq=seq,
                subject=headers.get(s.DLQ_SUBJECT_HEADER, msg.subject or ""),
                error=headers.get(s.DLQ_ERROR_HEADER, ""),
                deliveries=int(headers.get(s.DLQ_DELIVERIES_HEADER, "0") or 0),
                request_id=headers.get(s.REQUEST_ID_HEADER),
                size_bytes=len(msg.data or b""),
                time=getattr(msg, "time", None),
            )
        )
        seq -= 1
    return list(reversed(found))


async def replay(bus: Bus, seq: int) -> str:
    """Publish dead letter ``seq`` to its original subject again (body and headers as they were)
    and delete it from the dead-letter stream; returns the subject. ``LookupError`` when no such
    dead letter exists."""
    try:
        msg = await bus.js.get_msg(s.DEADLETTER_STREAM, seq)
    except NotFoundError:
        raise LookupError(f"no dead letter {seq}") from None
    headers: dict[str, str] = dict(msg.headers or {})
    subject = headers.get(s.DLQ_SUBJECT_HEADER)
    if not subject:
        raise LookupError(f"dead letter {seq} does not say where it came from")
    for name in _DLQ_HEADERS:
        headers.pop(name, None)
    headers = {k: v for k, v in headers.items() if not k.startswith("Nats-")}  # the DLQ's own
    if stream_of(subject) is not None:
        await bus.js.publish(subject, msg.data or b"", headers=headers or None)
    else:
        await bus.nc.publish(subject, msg.data or b"", headers=headers or None)
    await bus.js.delete_msg(s.DEADLETTER_STREAM, seq)
    return subject
