"""What every gateway route needs: the bus, the model registry, the future waiters, the caller's
tenant, and tenant-checked access to the state records (sessions, runs, samplers).

Another tenant's objects are reported as missing (404), never as forbidden.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request

from services.gateway.futures import FutureWaiters
from services.gateway.settings import GatewaySettings
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.errors import NotFound, Unauthorized, UserError
from whetstone.keys import lookup_key
from whetstone.messages import (
    FutureRecord,
    SamplingSessionRecord,
    SessionRecord,
    Skip,
    TrainingRunRecord,
    TrainRequest,
)
from whetstone.models.registry import ModelRegistry


@dataclass
class Gateway:
    settings: GatewaySettings
    bus: b.Bus
    registry: ModelRegistry
    waiters: FutureWaiters
    log: object
    _tenants: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (tenant, expiry)
    _runs: dict[str, TrainingRunRecord] = field(default_factory=dict)

    async def tenant_of(self, key: str | None) -> str:
        if not key:
            raise Unauthorized("missing X-API-Key header")
        cached = self._tenants.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        record = await lookup_key(self.bus, key)
        if record is None:
            raise Unauthorized("invalid API key")
        self._tenants[key] = (record.tenant, time.monotonic() + self.settings.key_cache_s)
        return record.tenant

    # ---------------------------------------------------------------- tenant-checked records

    async def session(self, tenant: str, session_id: str) -> SessionRecord:
        record = await b.kv_get(self.bus.kv[s.SESSIONS_BUCKET], s.token(session_id), SessionRecord)
        if record is None or record.tenant != tenant:
            raise NotFound(f"unknown session {session_id!r}")
        return record

    async def run(self, tenant: str, run_id: str) -> TrainingRunRecord:
        record = self._runs.get(run_id)  # run records never change once created
        if record is None:
            record = await b.kv_get(self.bus.kv[s.RUNS_BUCKET], s.token(run_id), TrainingRunRecord)
            if record is not None:
                self._runs[run_id] = record
        if record is None or record.tenant != tenant:
            raise NotFound(f"unknown model_id {run_id!r}")
        return record

    async def sampler(self, tenant: str, sampler_id: str) -> SamplingSessionRecord:
        record = await b.kv_get(self.bus.kv[s.SAMPLERS_BUCKET], s.token(sampler_id), SamplingSessionRecord)
        if record is None or record.tenant != tenant:
            raise NotFound(f"unknown sampling session {sampler_id!r}")
        return record

    # ---------------------------------------------------------------- submissions

    async def submit_once(self, dedup_key: str, tenant: str, op: str, subject: str, message_for) -> str:
        """Accept a request exactly once per ``dedup_key`` (e.g. run + seq_id): a retried
        submission gets the first one's request id back and publishes nothing new.

        ``message_for(request_id)`` builds the bus message.
        """
        request_id = f"req-{uuid.uuid4().hex}"
        existing = await b.kv_create(self.bus.kv[s.DEDUP_BUCKET], dedup_key, request_id.encode())
        if existing == b"refused":
            raise UserError(f"this request ({dedup_key}) was refused before; resubmit with a new seq_id")
        if existing is not None:
            request_id = existing.decode()
            if await b.future_record(self.bus, request_id) is not None:
                return request_id  # accepted before; the first submission's future stands
        # The pending record is *created*, never overwritten, so it may race the publish: a worker
        # that finishes first has already written the final record and the create is a no-op.
        pending = FutureRecord(request_id=request_id, tenant=tenant, op=op)
        await asyncio.gather(
            b.kv_create(self.bus.kv[s.FUTURES_BUCKET], request_id, pending.encode()),
            b.publish(self.bus, subject, message_for(request_id), msg_id=dedup_key),
        )
        return request_id

    async def fill_gap(self, tenant: str, run_id: str, seq_id: int, reason: str) -> None:
        """Publish a ``Skip`` in place of a refused training request, unless that seq_id was
        already accepted: the client has used the seq_id, and the trainer runs in seq_id order."""
        dedup_key = train_dedup_key(run_id, seq_id)
        if await b.kv_create(self.bus.kv[s.DEDUP_BUCKET], dedup_key, b"refused") is None:
            skip = TrainRequest(request_id=f"skip-{uuid.uuid4().hex}", tenant=tenant, run_id=run_id,
                                seq_id=seq_id, command=Skip(reason=reason))
            await b.publish(self.bus, s.train_subject(run_id), skip, msg_id=dedup_key)


def train_dedup_key(run_id: str, seq_id: int) -> str:
    """One training request per (run, seq_id): the key of its request id in KV ``ws_dedup``."""
    return f"{s.token(run_id)}.{seq_id}"


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def tenant(request: Request) -> str:
    """FastAPI dependency: the tenant of the request's ``X-API-Key``."""
    return await gateway(request).tenant_of(request.headers.get("x-api-key"))
