"""The bus: a FastStream NATS broker per service, the topology every service shares, and typed
access to the state kept in NATS (futures, records, large payloads).

``connect`` builds the service's ``NatsBroker`` with the three middlewares every consumer runs
under, outermost first: OpenTelemetry (one span per publish and per message, trace context in
the headers; none for a KV bucket's change feed, whose updates carry no trace), Prometheus
(per-subject counts and times) and the message-fate wrapper
(``fate.py``: ack, nak with back-off, dead letters). It connects, then declares every stream,
bucket and the payload object store idempotently (``ensure_topology``), so whichever process
starts first creates them and the others find them.

Services declare their consumers as FastStream subscribers on ``bus.broker`` and start them
with the broker. Key-value buckets and the object store are reached through the broker's own
nats-py connection (``bus.js``): FastStream has no typed KV store API of its own.

Payloads larger than ``OFFLOAD_BYTES`` (the server refuses messages over 8 MB) are put in the
object store ``ws_payloads`` and the message carries the object's name in ``Ws-Payload-Ref``;
the fate wrapper swaps the body back in before the handler decodes it.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
from faststream.nats import NatsBroker
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from opentelemetry import propagate

from whetstone import subjects as s
from whetstone.messages import FutureRecord, Message, Result, UsageEvent, utcnow

if TYPE_CHECKING:
    from whetstone.fate import MessageFate

M = TypeVar("M", bound=Message)

FUTURE_TTL_S = 24 * 3600
DEDUP_TTL_S = 24 * 3600
STABILITY_TTL_S = 24 * 3600  # a recorded sequence can be trained on for a day (losses.md 2.7)
PAYLOAD_TTL_S = 7 * 24 * 3600
DEADLETTER_MAX_AGE_S = 14 * 24 * 3600
AUDIT_MAX_AGE_S = 400 * 24 * 3600  # the audit log keeps a year and a bit
OFFLOAD_BYTES = 4 * 1024 * 1024  # well under the server's 8 MB max payload, headers included
PUBLISH_TIMEOUT_S = 10.0

_STREAMS: dict[str, list[str]] = {
    s.TRAIN_STREAM: [f"{s.TRAIN_PREFIX}.>"],
    s.SAMPLE_STREAM: [f"{s.SAMPLE_PREFIX}.>"],
    s.USAGE_STREAM: [f"{s.USAGE_PREFIX}.>"],
    s.CONTROL_STREAM: [s.PLACE_SUBJECT],
}
_BUCKETS: dict[str, float | None] = {  # bucket -> TTL in seconds (None: forever)
    s.FUTURES_BUCKET: FUTURE_TTL_S,
    s.DEDUP_BUCKET: DEDUP_TTL_S,
    s.FUTURE_INDEX_BUCKET: FUTURE_TTL_S,
    s.KEYS_BUCKET: None,
    s.SESSIONS_BUCKET: None,
    s.RUNS_BUCKET: None,
    s.SAMPLERS_BUCKET: None,
    s.CUSTOM_LOSSES_BUCKET: None,
    s.CHECKPOINTS_BUCKET: None,
    s.PLACEMENTS_BUCKET: None,
    s.QUOTAS_BUCKET: None,
    s.RUN_PROGRESS_BUCKET: None,
    s.RUN_SEQ_BUCKET: None,
    s.SCHEDULER_BUCKET: None,
    s.STABILITY_BUCKET: STABILITY_TTL_S,
}


def stream_of(subject: str) -> str | None:
    """The stream that stores ``subject`` (None: a core NATS subject)."""
    for stream, patterns in _STREAMS.items():
        for pattern in patterns:
            if subject == pattern or (pattern.endswith(".>") and subject.startswith(pattern[:-1])):
                return stream
    if subject.startswith(s.DEADLETTER_PREFIX + "."):
        return s.DEADLETTER_STREAM
    if subject.startswith(s.AUDIT_PREFIX + "."):
        return s.AUDIT_STREAM
    return None


@dataclass
class Bus:
    broker: NatsBroker
    nc: NATS
    js: JetStreamContext
    kv: dict[str, KeyValue]
    payloads: ObjectStore
    service: str
    fate: MessageFate

    async def close(self) -> None:
        """Stop the subscribers (in-flight handlers finish) and drain the connection."""
        await self.broker.stop()


async def subscribe(bus: Bus, handler: Any, subject: str, **options: Any) -> Any:
    """Declare a FastStream subscriber for ``handler`` on the service's broker; one declared
    while the broker runs (a run arriving at a trainer) starts at once."""
    subscriber = bus.broker.subscriber(subject, **options)
    subscriber(handler)
    if bus.broker.running:
        await subscriber.start()
    return subscriber


async def connect(url: str, name: str, replicas: int = 1, service: str | None = None) -> Bus:
    """Connect ``service``'s broker and declare the topology. ``url`` is one NATS URL or several,
    comma-separated; reconnects are unlimited, so services ride out a NATS restart."""
    from faststream.nats.opentelemetry import NatsTelemetryMiddleware
    from faststream.nats.prometheus import NatsPrometheusMiddleware

    from whetstone.fate import MessageFate
    from whetstone.metrics import REGISTRY
    from whetstone.observability import tracer_provider

    service = service or name
    servers = [u.strip() for u in url.split(",") if u.strip()]  # a cluster: several seed URLs
    fate = MessageFate(service)
    telemetry = NatsTelemetryMiddleware(tracer_provider=tracer_provider(service))
    telemetry._settings_provider_factory = _telemetry_settings  # no spans for KV change feeds
    broker = NatsBroker(
        servers,
        name=name,
        max_reconnect_attempts=-1,
        # nats-py annotates it int but only sleeps on it: half a second is what is meant.
        reconnect_time_wait=0.5,  # type: ignore[arg-type]
        drain_timeout=5,
        graceful_timeout=30.0,
        logger=None,  # our own structured lines come from the fate wrapper and the handlers
        middlewares=[
            telemetry,
            NatsPrometheusMiddleware(registry=REGISTRY, app_name=f"whetstone-{service}"),
            fate,
        ],
    )
    await broker.connect()
    nc = broker.connection
    js = nc.jetstream()
    kv, payloads = await ensure_topology(js, replicas)
    bus = Bus(broker, nc, js, kv, payloads, service, fate)
    fate.bus = bus
    return bus


def _telemetry_settings(msg: Any) -> Any:
    """FastStream's span attributes for ``msg``, or None (no spans) for a KV bucket's change
    feed (``$KV.<bucket>.<key>``, the gateway's future updates). A KV write carries no trace
    context, so every update would open a new trace of two spans that belongs to no request;
    the request's own trace continues from the trace context stored in the record."""
    from faststream.nats.opentelemetry.provider import telemetry_attributes_provider_factory

    if isinstance(msg, Msg) and msg.subject.startswith("$KV."):
        return None
    return telemetry_attributes_provider_factory(msg)


async def ensure_topology(
    js: JetStreamContext, replicas: int = 1
) -> tuple[dict[str, KeyValue], ObjectStore]:
    configs = [
        api.StreamConfig(
            name=name,
            subjects=subs,
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=120.0,
        )
        for name, subs in _STREAMS.items()
    ]
    configs.append(
        api.StreamConfig(
            name=s.DEADLETTER_STREAM,
            subjects=[f"{s.DEADLETTER_PREFIX}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            max_age=DEADLETTER_MAX_AGE_S,
        )
    )
    configs.append(
        api.StreamConfig(
            name=s.AUDIT_STREAM,
            subjects=[f"{s.AUDIT_PREFIX}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            max_age=AUDIT_MAX_AGE_S,
        )
    )
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    buckets: dict[str, KeyValue] = {}
    for bucket, ttl in _BUCKETS.items():
        buckets[bucket] = await _ensure_bucket(js, bucket, ttl, replicas)
    try:
        payloads = await js.object_store(s.PAYLOADS_BUCKET)
    except Exception:  # BucketNotFoundError; racing creators are fine, creation is idempotent
        payloads = await js.create_object_store(
            s.PAYLOADS_BUCKET,
            config=api.ObjectStoreConfig(
                ttl=PAYLOAD_TTL_S, storage=api.StorageType.FILE, replicas=replicas
            ),
        )
    return buckets, payloads


async def _ensure_bucket(
    js: JetStreamContext, bucket: str, ttl: float | None, replicas: int
) -> KeyValue:
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


async def kv_records(
    bus: Bus, bucket: str, cls: type[M], pattern: str = ">"
) -> dict[str, tuple[M, int]]:
    """Every record of ``bucket`` under the key ``pattern`` (NATS wildcards) as key -> (record,
    revision); deleted keys are left out. The keys come from the bucket's stream (one
    ``stream_info``), then each is read: a KV watch's end-of-data marker can come before entries
    already on their way (nats-py), and a listing read that way could miss records."""
    prefix = f"$KV.{bucket}."
    info = await bus.js.stream_info(f"KV_{bucket}", subjects_filter=prefix + pattern)
    keys = [subject[len(prefix) :] for subject in info.state.subjects or {}]
    kv = bus.kv[bucket]

    async def read(key: str) -> tuple[str, M, int] | None:
        try:
            entry = await kv.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None  # deleted: only its marker is left
        if entry.value is None or entry.operation is not None:
            return None
        return key, cls.decode(entry.value), entry.revision or 0

    found = await asyncio.gather(*(read(key) for key in keys))
    return {key: (record, revision) for key, record, revision in filter(None, found)}


async def kv_create(kv: KeyValue, key: str, value: bytes) -> bytes | None:
    """Create ``key`` if absent. Returns None when created, else the value already there."""
    try:
        await kv.create(key, value)
        return None
    except KeyWrongLastSequenceError:
        entry = await kv.get(key)
        return entry.value or b""  # an empty value reads back as None: still not created


# ---------------------------------------------------------------- futures


def trace_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``), for records that travel
    through KV rather than as messages."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


async def finish_future(bus: Bus, pending: FutureRecord, result: Result) -> None:
    await kv_put(
        bus.kv[s.FUTURES_BUCKET],
        pending.request_id,
        pending.model_copy(
            update={
                "status": "done",
                "result": result,
                "finished_at": utcnow(),
                "trace": trace_carrier(),
            }
        ),
    )


async def fail_future(bus: Bus, pending: FutureRecord, error: str, category: str) -> None:
    await kv_put(
        bus.kv[s.FUTURES_BUCKET],
        pending.request_id,
        pending.model_copy(
            update={
                "status": "failed",
                "error": error,
                "category": category,
                "finished_at": utcnow(),
                "trace": trace_carrier(),
            }
        ),
    )


def enqueued_at(msg: Any) -> datetime | None:
    """When the stream stored a delivered JetStream message: when its request was queued."""
    metadata = getattr(getattr(msg, "raw_message", msg), "metadata", None)
    stamp = getattr(metadata, "timestamp", None)
    return stamp if isinstance(stamp, datetime) else None


async def future_record(bus: Bus, request_id: str) -> FutureRecord | None:
    return await kv_get(bus.kv[s.FUTURES_BUCKET], request_id, FutureRecord)


def work_headers(message: Message) -> dict[str, str]:
    """Headers naming the work a message carries, read by the fate wrapper and the logs even
    when the body cannot be decoded."""
    headers: dict[str, str] = {"content-type": "application/json"}
    for attr, header in (
        ("request_id", s.REQUEST_ID_HEADER),
        ("tenant", s.TENANT_HEADER),
        ("run_id", s.RUN_HEADER),
        ("base_model", s.MODEL_HEADER),
    ):
        value = getattr(message, attr, None)
        if isinstance(value, str):
            headers[header] = value
    command = getattr(message, "command", None)
    op = getattr(command, "op", None) or getattr(message, "op", None)
    if isinstance(op, str):
        headers[s.OP_HEADER] = op
    return headers


async def publish(bus: Bus, subject: str, message: Message, msg_id: str | None = None) -> None:
    """Publish durably (JetStream) through the broker (so the trace context travels in the
    headers) and wait for the stream's acknowledgement. ``msg_id`` de-duplicates within the
    stream's window. A body over ``OFFLOAD_BYTES`` goes to the object store."""
    data = message.encode()
    headers = work_headers(message)
    if msg_id:
        headers[s.MSG_ID_HEADER] = msg_id
    if len(data) > OFFLOAD_BYTES:
        name = f"{s.token(msg_id) if msg_id else uuid.uuid4().hex}"
        await bus.payloads.put(name, data)
        headers[s.PAYLOAD_REF_HEADER] = name
        data = b""
    await bus.broker.publish(
        data, subject, headers=headers, stream=stream_of(subject), timeout=PUBLISH_TIMEOUT_S
    )


async def load_payload(bus: Bus, headers: Mapping[str, Any]) -> bytes | None:
    """The offloaded body a message refers to, or None when it carries its body inline."""
    name = headers.get(s.PAYLOAD_REF_HEADER) if headers else None
    if not name:
        return None
    buffer = io.BytesIO()
    try:
        await bus.payloads.get(str(name), writeinto=buffer)
    except ObjectNotFoundError:
        raise LookupError(f"offloaded payload {name!r} is missing") from None
    return buffer.getvalue()


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
        await kv.update(
            request_id,
            record.model_copy(update={"queue_state": state}).encode(),
            last=entry.revision,
        )
    except KeyWrongLastSequenceError:
        pass


async def consumer_depth(bus: Bus, stream: str, consumer: str) -> int | None:
    """Messages waiting for ``consumer`` (pending plus delivered-unacknowledged), or None when
    the consumer does not exist (yet)."""
    try:
        info = await bus.js.consumer_info(stream, consumer)
    except (NotFoundError, nats.errors.Error):
        return None
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
