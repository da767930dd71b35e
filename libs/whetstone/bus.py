"""The bus: connecting to NATS, declaring streams and buckets, and the KV access every service
shares (futures, state records).

``ensure_topology`` declares every stream and bucket of ``subjects.py`` idempotently; each
service calls it at start-up, so whichever process starts first creates them and the others find
them (a changed definition is applied as an update).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from whetstone import subjects as s
from whetstone.messages import FutureRecord, Message, Result, UsageEvent

M = TypeVar("M", bound=Message)

FUTURE_TTL_S = 24 * 3600
DEDUP_TTL_S = 24 * 3600

_STREAMS: dict[str, list[str]] = {
    s.TRAIN_STREAM: [f"{s.TRAIN_PREFIX}.>"],
    s.SAMPLE_STREAM: [f"{s.SAMPLE_PREFIX}.>"],
    s.USAGE_STREAM: [f"{s.USAGE_PREFIX}.>"],
    s.CONTROL_STREAM: [s.PLACE_SUBJECT],
}
_BUCKETS: dict[str, float | None] = {  # bucket -> TTL in seconds (None: forever)
    s.FUTURES_BUCKET: FUTURE_TTL_S,
    s.DEDUP_BUCKET: DEDUP_TTL_S,
    s.KEYS_BUCKET: None,
    s.SESSIONS_BUCKET: None,
    s.RUNS_BUCKET: None,
    s.SAMPLERS_BUCKET: None,
    s.CHECKPOINTS_BUCKET: None,
    s.PLACEMENTS_BUCKET: None,
}


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext
    kv: dict[str, KeyValue]

    async def close(self) -> None:
        await self.nc.drain()


async def connect(url: str, name: str, replicas: int = 1) -> Bus:
    """Connect and declare the topology. ``url`` is one NATS URL or several, comma-separated;
    reconnects are unlimited, so services ride out a NATS restart."""
    servers = [u.strip() for u in url.split(",") if u.strip()]  # a cluster: several seed URLs
    nc = await nats.connect(servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                             drain_timeout=5)
    js = nc.jetstream()
    kv = await ensure_topology(js, replicas)
    return Bus(nc, js, kv)


async def ensure_topology(js: JetStreamContext, replicas: int = 1) -> dict[str, KeyValue]:
    for name, subs in _STREAMS.items():
        config = api.StreamConfig(
            name=name,
            subjects=subs,
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=120.0,
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    buckets: dict[str, KeyValue] = {}
    for bucket, ttl in _BUCKETS.items():
        buckets[bucket] = await _ensure_bucket(js, bucket, ttl, replicas)
    return buckets


async def _ensure_bucket(js: JetStreamContext, bucket: str, ttl: float | None, replicas: int) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except Exception:  # BucketNotFoundError; racing creators are fine, creation is idempotent
        return await js.create_key_value(
            bucket=bucket, history=1, ttl=ttl, storage=api.StorageType.FILE, replicas=replicas
        )


# ---------------------------------------------------------------- typed KV access


async def kv_get(kv: KeyValue, key: str, cls: type[M]) -> M | None:
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):
        return None
    if entry.value is None or entry.operation is not None:  # a delete or purge marker
        return None
    return cls.decode(entry.value)


async def kv_put(kv: KeyValue, key: str, record: Message) -> None:
    await kv.put(key, record.encode())


async def kv_create(kv: KeyValue, key: str, value: bytes) -> bytes | None:
    """Create ``key`` if absent. Returns None when created, else the value already there."""
    try:
        await kv.create(key, value)
        return None
    except KeyWrongLastSequenceError:
        entry = await kv.get(key)
        return entry.value


# ---------------------------------------------------------------- futures


async def finish_future(bus: Bus, pending: FutureRecord, result: Result) -> None:
    await kv_put(bus.kv[s.FUTURES_BUCKET], pending.request_id,
                 pending.model_copy(update={"status": "done", "result": result}))


async def fail_future(bus: Bus, pending: FutureRecord, error: str, category: str) -> None:
    await kv_put(bus.kv[s.FUTURES_BUCKET], pending.request_id,
                 pending.model_copy(update={"status": "failed", "error": error, "category": category}))


async def future_record(bus: Bus, request_id: str) -> FutureRecord | None:
    return await kv_get(bus.kv[s.FUTURES_BUCKET], request_id, FutureRecord)


async def publish(bus: Bus, subject: str, message: Message, msg_id: str | None = None) -> None:
    """Publish durably (JetStream) and wait for the stream's acknowledgement."""
    headers = {s.MSG_ID_HEADER: msg_id} if msg_id else None
    await bus.js.publish(subject, message.encode(), headers=headers)


async def publish_usage(bus: Bus, events: Sequence[UsageEvent]) -> None:
    """Usage events go to their tenant's subject, de-duplicated by the stream on their ids."""
    await publish_many(bus, [(s.usage_subject(e.tenant), e, e.event_id) for e in events])


async def publish_many(bus: Bus, items: Sequence[tuple[str, Message, str | None]]) -> None:
    """Publish a batch and gather the acknowledgements (an order of magnitude faster than one by
    one when many events complete together)."""
    await asyncio.gather(*(publish(bus, subj, msg, mid) for subj, msg, mid in items))


async def set_queue_state(bus: Bus, request_id: str, state: str) -> None:
    """Report why a pending future waits (``paused_capacity``...). Compare-and-set, so it can
    never overwrite a result that a worker wrote in the meantime."""
    kv = bus.kv[s.FUTURES_BUCKET]
    try:
        entry = await kv.get(request_id)
    except (KeyNotFoundError, NotFoundError):
        return
    if entry.value is None:
        return
    record = FutureRecord.decode(entry.value)
    if record.final or record.queue_state == state:
        return
    try:
        await kv.update(request_id, record.model_copy(update={"queue_state": state}).encode(), last=entry.revision)
    except KeyWrongLastSequenceError:
        pass


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout_s: float, log=None) -> list:
    """Pull up to ``batch`` messages, waiting at most ``timeout_s`` for the first; [] when none
    came (nats-py raises either its own or asyncio's TimeoutError for that) or the connection is
    down (a pull loop simply tries again)."""
    try:
        return await sub.fetch(batch, timeout=timeout_s)
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        return []
    except nats.errors.Error as exc:
        if log is not None:
            log.warning("fetch failed", error=str(exc))
        await asyncio.sleep(0.5)
        return []
