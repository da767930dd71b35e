"""What every gateway route needs: the bus, the model registry, the future waiters, the caller's
tenant, and tenant-checked access to the state records (sessions, runs, samplers, checkpoints).

Another tenant's objects are reported as missing (404), never as forbidden.

Submissions (``submit_once``) and refusals (``fill_gap``) share KV ``ws_dedup``: one record per
dedup key (run + seq_id, sampler + seq_id, ...) holding the request id, or ``refused``, and a
``published`` mark once the stream has acknowledged the message. A retry finds the record and
publishes again until the mark is there; the stream drops the copies (``Nats-Msg-Id`` is the
dedup key), so a message is never lost to a failed publish and never queued twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from structlog.stdlib import BoundLogger

from services.gateway import metrics
from services.gateway.backpressure import SampleBackpressure
from services.gateway.futures import FutureIndex, FutureWaiters
from services.gateway.jwt_auth import digest_of
from services.gateway.quotas import Limits, Quotas
from services.gateway.settings import GatewaySettings
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath, record_key
from whetstone.errors import NotFound, Unauthorized, Unavailable, UserError, WhetstoneError
from whetstone.fate import Delivered
from whetstone.keys import key_id_of_hash, lookup_hash
from whetstone.messages import (
    CheckpointRecord,
    FutureRecord,
    Message,
    SamplingSessionRecord,
    SessionRecord,
    Skip,
    TrainingRunRecord,
    TrainRequest,
    utcnow,
)
from whetstone.models.registry import ModelRegistry


async def _no_body(msg: Any) -> None:
    """Key updates matter by their subject only (the key's hash); the record is never read."""
    return None


@dataclass
class Gateway:
    settings: GatewaySettings
    bus: b.Bus
    registry: ModelRegistry
    waiters: FutureWaiters
    log: BoundLogger
    # sha256(key) -> (tenant, expiry); an entry goes as soon as its key's record changes
    _tenants: dict[str, tuple[str, float]] = field(default_factory=dict)
    _key_watch: asyncio.Task[Any] | None = None
    _runs: dict[str, TrainingRunRecord] = field(default_factory=dict)
    _run_watch: asyncio.Task[Any] | None = None
    # key id -> the key's quotas, refreshed with its cached tenant (``quotas.py``)
    _key_limits: dict[str, Limits] = field(default_factory=dict)
    quotas: Quotas = field(init=False)
    backpressure: SampleBackpressure = field(init=False)

    def __post_init__(self) -> None:
        self.quotas = Quotas(
            self.bus, self.settings.inflight_retry_after_s, self.settings.runs_retry_after_s
        )
        self.backpressure = SampleBackpressure(
            self.bus, self.settings.sample_queue_limit, self.settings.sample_retry_after_s
        )

    async def tenant_of(self, key: str | None) -> str:
        if not key:
            raise Unauthorized("missing X-API-Key header")
        if self._key_watch is None:  # once, before anything is cached
            self._key_watch = asyncio.ensure_future(
                b.subscribe(
                    self.bus,
                    self._on_key_update,
                    f"$KV.{s.KEYS_BUCKET}.>",
                    decoder=_no_body,
                    title="API key changes",
                    no_reply=True,  # a KV put awaits its ack on the reply subject
                )
            )
        await self._key_watch
        digest = digest_of(self.settings, key)  # the key's hash, or the one its JWT names
        cached = self._tenants.get(digest)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        record = await lookup_hash(self.bus, digest)
        if record is None:
            raise Unauthorized("invalid API key")
        self._tenants[digest] = (record.tenant, time.monotonic() + self.settings.key_cache_s)
        self._key_limits[key_id_of_hash(digest)] = Limits.of(record, self._default_limits)
        return record.tenant

    @property
    def _default_limits(self) -> Limits:
        return Limits(self.settings.default_max_runs, self.settings.default_max_inflight)

    def caller_limits(self) -> Limits:
        """The quotas of the API key of the request being served (``caller_key_id``); the
        platform's defaults outside a request."""
        return self._key_limits.get(caller_key_id() or "", self._default_limits)

    async def admit_run(self, tenant: str, run_id: str) -> None:
        """Take one of the tenant's training-run slots for a new run, or raise ``RateLimited``
        (429). Called before anything of the run is recorded."""
        await self.quotas.admit_run(tenant, run_id, self.caller_limits())

    async def _on_key_update(self, _: None, msg: Delivered) -> None:
        """A key record changed (revoked, replaced, deleted): forget its cached tenant."""
        self._tenants.pop(msg.raw_message.subject.rsplit(".", 1)[-1], None)

    # ---------------------------------------------------------------- tenant-checked records

    async def session(self, tenant: str, session_id: str) -> SessionRecord:
        record = await b.kv_get(self.bus.kv[s.SESSIONS_BUCKET], s.token(session_id), SessionRecord)
        if record is None or record.tenant != tenant:
            raise NotFound(f"unknown session {session_id!r}")
        return record

    async def run(self, tenant: str, run_id: str) -> TrainingRunRecord:
        record = await self.run_record(run_id)
        if record is None or record.tenant != tenant:
            raise NotFound(f"unknown model_id {run_id!r}")
        return record

    async def run_record(self, run_id: str) -> TrainingRunRecord | None:
        """A run's record whoever owns it (for a published checkpoint's run); None if unknown."""
        if self._run_watch is None:  # once, before anything is cached
            self._run_watch = asyncio.ensure_future(
                b.subscribe(
                    self.bus,
                    self._on_run_update,
                    f"$KV.{s.RUNS_BUCKET}.>",
                    decoder=_no_body,
                    title="training run changes",
                    no_reply=True,  # a KV put awaits its ack on the reply subject
                )
            )
        await self._run_watch
        record = self._runs.get(run_id)  # changed only by unload_model: see _on_run_update
        if record is None:
            record = await b.kv_get(self.bus.kv[s.RUNS_BUCKET], s.token(run_id), TrainingRunRecord)
            if record is not None:
                self._runs[run_id] = record
        return record

    def remember_run(self, record: TrainingRunRecord) -> None:
        """This gateway's view of a run record that changed (``unload_model``)."""
        self._runs[record.run_id] = record

    async def _on_run_update(self, _: None, msg: Delivered) -> None:
        """A run record changed (another gateway unloaded it): read it again when next asked."""
        self._runs.pop(s.untoken(msg.raw_message.subject.rsplit(".", 1)[-1]), None)

    async def checkpoint(
        self, tenant: str, path: TinkerPath, *, published_ok: bool = False
    ) -> CheckpointRecord:
        """A checkpoint record: the tenant's own or, with ``published_ok`` (loading, sampling,
        copying, weights_info), a published one of any tenant. Anything else, and a checkpoint
        past its expiry that the scheduler has not deleted yet, is 404."""
        record = await b.kv_get(
            self.bus.kv[s.CHECKPOINTS_BUCKET], record_key(path), CheckpointRecord
        )
        if (
            record is None
            or (record.tenant != tenant and not (published_ok and record.public))
            or (record.expires_at is not None and record.expires_at <= utcnow())
        ):
            raise NotFound(f"unknown checkpoint {path}")
        return record

    async def sampler(self, tenant: str, sampler_id: str) -> SamplingSessionRecord:
        record = await b.kv_get(
            self.bus.kv[s.SAMPLERS_BUCKET], s.token(sampler_id), SamplingSessionRecord
        )
        if record is None or record.tenant != tenant:
            raise NotFound(f"unknown sampling session {sampler_id!r}")
        return record

    # ---------------------------------------------------------------- submissions

    async def submit_once(
        self,
        dedup_key: str,
        tenant: str,
        op: str,
        subject: str,
        message_for: Callable[[str], Message],
        index: Sequence[str] = (),
    ) -> str:
        """Accept a request exactly once per ``dedup_key`` (e.g. run + seq_id): a retried
        submission gets the first one's request id back. ``index``: the sessions and sampling
        sessions whose futures it counts among (``FutureIndex``).

        ``message_for(request_id)`` builds the bus message. It is published until the stream
        has acknowledged it once: a failed publish answers ``Unavailable`` (503, which the SDK
        retries) and the retry publishes again under the same ``Nats-Msg-Id``.
        """
        dedup = self.bus.kv[s.DEDUP_BUCKET]
        request_id = f"req-{uuid.uuid4().hex}"
        limits = self.caller_limits()
        # A quota: only a new submission takes a slot (``quotas.py``). A run's creation takes a
        # run slot instead (``admit_run``, checked before its record is written).
        if limits.max_inflight and subject != s.PLACE_SUBJECT:
            existing = await _kv_value(dedup, dedup_key)
            if existing is None:
                training = subject.startswith(s.TRAIN_PREFIX + ".")
                await self.quotas.admit_request(
                    tenant,
                    request_id,
                    limits,
                    exempt=(lambda: self._unblocks(dedup_key)) if training else None,
                )
                existing = await b.kv_create(dedup, dedup_key, request_id.encode())
                if existing is not None:  # a copy of it on another gateway won the record
                    await self.quotas.release_request(tenant, request_id)
        else:
            existing = await b.kv_create(dedup, dedup_key, request_id.encode())
        if existing is not None:
            request_id, published = parse_dedup(existing)
            if request_id == REFUSED:
                raise UserError(
                    f"this request ({dedup_key}) was refused before; resubmit with a new seq_id"
                )
            if published:
                return request_id  # accepted before; the first submission's future stands
        # The pending record is *created*, never overwritten, so it may race the publish: a worker
        # that finishes first has already written the final record and the create is a no-op.
        pending = FutureRecord(request_id=request_id, tenant=tenant, op=op)
        await self._publish_then_mark(
            dedup_key,
            request_id,
            subject,
            message_for(request_id),
            b.kv_create(self.bus.kv[s.FUTURES_BUCKET], request_id, pending.encode()),
            *(FutureIndex(self.bus).add(scope, request_id) for scope in index),
        )
        metrics.SUBMISSIONS.labels(op).inc()
        return request_id

    async def _unblocks(self, dedup_key: str) -> bool:
        """Whether a training request must be admitted over the in-flight quota, lest its run
        wedge: its successor (the run's next seq_id) has come already (accepted, or refused and
        filled), so that it fills the gap the run's later requests wait for; or the run's
        accepted requests just before it wait for a seq_id further down that has not come. The
        SDK posts the chunks of one ``forward_backward`` at once and their first one last, after
        all the others were accepted: refusing one while its siblings hold the tenant's slots
        would hold them all until the gap timeout failed them. Only ``UNBLOCK_WINDOW`` seq_ids
        down are looked at, so a client that leaves a gap on purpose gains little."""
        dedup = self.bus.kv[s.DEDUP_BUCKET]
        run, _, seq_text = dedup_key.rpartition(".")
        seq = int(seq_text)
        if await _kv_value(dedup, f"{run}.{seq + 1}") is not None:
            return True
        waiting_above = False
        for earlier in range(seq - 1, max(seq - 1 - UNBLOCK_WINDOW, 0), -1):
            value = await _kv_value(dedup, f"{run}.{earlier}")
            if value is None:  # not come: the pending ones above it cannot run
                return waiting_above
            request_id, _ = parse_dedup(value)
            if request_id == REFUSED:
                continue  # filled by a Skip
            record = await b.future_record(self.bus, request_id)
            if record is None or record.final:
                return False  # everything below has run: the run is not stuck
            waiting_above = True
        return False

    async def fill_gap(self, tenant: str, run_id: str, seq_id: int, reason: str) -> None:
        """Publish a ``Skip`` in place of a refused training request, unless that seq_id was
        already accepted: the client has used the seq_id, and the trainer runs in seq_id order.
        A refusal whose Skip was not acknowledged publishes it again."""
        dedup_key = train_dedup_key(run_id, seq_id)
        existing = await b.kv_create(self.bus.kv[s.DEDUP_BUCKET], dedup_key, REFUSED.encode())
        if existing is not None and parse_dedup(existing) != (REFUSED, False):
            return  # accepted (its own message fills the seq_id), or refused and filled
        skip = TrainRequest(
            request_id=f"skip-{uuid.uuid4().hex}",
            tenant=tenant,
            run_id=run_id,
            seq_id=seq_id,
            command=Skip(reason=reason),
        )
        await self._publish_then_mark(dedup_key, REFUSED, s.train_subject(run_id), skip)

    async def _publish_then_mark(
        self,
        dedup_key: str,
        value: str,
        subject: str,
        message: Message,
        *alongside: Awaitable[object],
    ) -> None:
        """Publish (with ``alongside`` KV writes, concurrently) and, once every one succeeded,
        mark the dedup record published. Any failure of the bus is a 503: the client retries."""
        results = await asyncio.gather(
            b.publish(self.bus, subject, message, msg_id=dedup_key),
            *alongside,
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, WhetstoneError):
                raise result  # e.g. a payload the bus layer refuses: the caller's to report
            if isinstance(result, BaseException):
                self.log.warning(
                    "publish failed",
                    subject=subject,
                    dedup_key=dedup_key,
                    error=f"{type(result).__name__}: {result}",
                )
                raise Unavailable(
                    "could not queue the request (the bus is unavailable); retry"
                ) from result
        try:
            await self.bus.kv[s.DEDUP_BUCKET].put(dedup_key, f"{value}{_PUBLISHED}".encode())
        except Exception as exc:  # published, not marked: a retry publishes a dropped copy
            raise Unavailable("could not record the request; retry") from exc


REFUSED = "refused"
UNBLOCK_WINDOW = 64  # seq_ids below a training request that ``Gateway._unblocks`` looks at
_PUBLISHED = " published"


async def _kv_value(kv: KeyValue, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):
        return None
    return None if entry.operation is not None else entry.value


def parse_dedup(value: bytes) -> tuple[str, bool]:
    """A ``ws_dedup`` value as ``(request id or "refused", published)``."""
    text = value.decode()
    return (text.removesuffix(_PUBLISHED), True) if text.endswith(_PUBLISHED) else (text, False)


def train_dedup_key(run_id: str, seq_id: int) -> str:
    """One training request per (run, seq_id): the key of its request id in KV ``ws_dedup``."""
    return f"{s.token(run_id)}.{seq_id}"


async def gateway(request: Request) -> Gateway:
    """FastAPI dependency: the gateway. Asynchronous on purpose: FastAPI runs a synchronous
    dependency in its thread pool, a thread hop on every request."""
    gw: Gateway = request.app.state.gateway
    return gw


# The id (``keys.key_id``, never the key) of the API key of the request being served, set by
# the ``tenant`` dependency: submissions stamp it on their bus messages so that usage names it.
# A context variable because every route already takes ``tenant``; each request runs in its own
# task, whose context the dependency and the route share.
_CALLER_KEY_ID: ContextVar[str | None] = ContextVar("caller_key_id", default=None)


def caller_key_id() -> str | None:
    """The API key id of the request being served (``None`` outside a request)."""
    return _CALLER_KEY_ID.get()


async def tenant(request: Request) -> str:
    """FastAPI dependency: the tenant of the request's ``X-API-Key`` (found by the app's
    authentication middleware before routing, or looked up here). Also records the key's id for
    ``caller_key_id``."""
    key = request.headers.get("x-api-key")
    gw = await gateway(request)
    _CALLER_KEY_ID.set(key_id_of_hash(digest_of(gw.settings, key)) if key else None)
    known = request.scope.get("state", {}).get("tenant")
    if isinstance(known, str):
        return known
    return await gw.tenant_of(key)
