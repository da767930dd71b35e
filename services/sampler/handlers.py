"""The sampler worker's bus side.

Pulls from the shared durable queue of its base model (``ws.sample.<base>``, consumer
``sampler-<base>``; every replica of that base model pulls from the same consumer, so load
balancing and failover come from JetStream). Each message's handler hands its request to the
``Batcher``, which adds it to the engine's continuous batch between two decode steps (tenants
taking turns, ``whetstone.fairness``) and returns its result when its last sequence finishes;
the handler then writes the future's result to KV ``ws_futures`` and publishes prefill, cached
prefill (prompt tokens the prefix cache served) and sample token usage on ``ws.usage.<tenant>``;
a request sampled with ``record_stability_info`` is first recorded in KV ``ws_stability``.
The message-fate wrapper acknowledges it after that, or fails the future on a user error.
Heartbeats on ``ws.ctl.heartbeat.sampler.<id>``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from faststream import AckPolicy
from faststream.nats import JStream, PullSub
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from services.sampler.engine import SamplerEngine
from services.sampler.settings import SamplerSettings
from whetstone import bus as b
from whetstone import metrics
from whetstone import subjects as s
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.errors import UserError
from whetstone.fairness import FairShare, Ready
from whetstone.fate import Delivered, consumer_config, decoder_for
from whetstone.messages import (
    FutureRecord,
    QueueState,
    RecordedSequence,
    SampleRequest,
    SampleResult,
    SessionRecord,
    StabilityRecord,
    UsageEvent,
    UsageMeter,
    WorkerHeartbeat,
    utcnow,
)
from whetstone.tasks import Offload, heartbeats, spawn


@dataclass
class Job:
    req: SampleRequest
    adapter_id: str | None
    fut: asyncio.Future[SampleResult]
    queued_at: float  # monotonic
    held_back: bool = False  # its future was told ``paused_rate_limit``


class ClientCancelled(Exception):
    """A running job whose client cancelled it (``cancel_future``): its record is final already."""


class Batcher:
    """Continuous batching: queued jobs join the engine between its steps and leave as they finish.

    Admission is fair across tenants (``whetstone.fairness``): jobs wait here in one queue per
    tenant, and between two steps the loop hands the engine the next ones by ``FairShare`` (a
    job costs the tokens it may fill: prompt plus ``num_samples * max_tokens``), only while the
    engine has no backlog of its own (``engine.num_waiting``). So one tenant's flood cannot line
    up in front of another tenant's requests, in the engine or here. A job passed over for other
    tenants' for ``hold_report_s`` is reported through ``on_state`` (``paused_rate_limit``), and
    again (``active``) once admitted.

    Each job is added on its own (validated alone, so a bad request fails only itself); while the
    engine has work the loop runs one ``engine.step()`` at a time on the torch thread and hands
    each finished result to its handler. If a step fails, every request in flight fails with it
    and the engine is reset.
    """

    def __init__(
        self,
        engine: SamplerEngine,
        torch: Offload,
        max_batch: int,
        on_state: Callable[[SampleRequest, QueueState], None] | None = None,
        hold_report_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self._torch = torch
        self.max_batch = max_batch  # jobs added per step at most
        self._on_state = on_state
        self.hold_report_s = hold_report_s
        self._queues: dict[str, deque[Job]] = {}  # tenant -> its jobs, in arrival order
        self._fair: FairShare[str] = FairShare()
        self._arrived = asyncio.Event()
        self._in_flight: dict[int, Job] = {}  # engine handle -> its job

    async def generate(self, req: SampleRequest, adapter_id: str | None) -> SampleResult:
        fut: asyncio.Future[SampleResult] = asyncio.get_running_loop().create_future()
        job = Job(req, adapter_id, fut, time.monotonic())
        self._queues.setdefault(req.tenant, deque()).append(job)
        self._arrived.set()
        return await fut

    def sessions(self) -> set[str]:
        """The sessions of the jobs waiting here or running in the engine."""
        jobs = [j for q in self._queues.values() for j in q] + list(self._in_flight.values())
        return {j.req.session_id for j in jobs if j.req.session_id}

    def running(self) -> list[Job]:
        """The jobs the engine holds that nobody has failed meanwhile. Failing one's future
        takes it out of the engine before the loop's next step."""
        return [j for j in self._in_flight.values() if not j.fut.done()]

    def drop_session(self, session_id: str, error: Exception) -> int:
        """Fail the jobs of ``session_id`` with ``error``, waiting here or running in the engine
        (the loop takes those out of the engine before its next step); how many there were."""
        dropped = 0
        for tenant, queue in self._queues.items():
            kept = deque(j for j in queue if j.req.session_id != session_id)
            for job in queue:
                if job.req.session_id == session_id and not job.fut.done():
                    job.fut.set_exception(error)
                    dropped += 1
            self._queues[tenant] = kept
        for job in self.running():
            if job.req.session_id == session_id:
                job.fut.set_exception(error)
                dropped += 1
        return dropped

    def _take(self, room: int) -> list[Job]:
        """Up to ``room`` queued jobs, the tenants' turns decided by ``FairShare``."""
        jobs: list[Job] = []
        while len(jobs) < room:
            for empty in [t for t, q in self._queues.items() if not q]:
                del self._queues[empty]
            ready = {t: Ready(t, _cost(q[0].req)) for t, q in self._queues.items()}
            tenant = self._fair.pick(ready)
            if tenant is None:
                break
            job = self._queues[tenant].popleft()
            if not job.fut.done():  # its handler is gone (cancelled): nothing to run
                jobs.append(job)
        return jobs

    def _report(self, admitted: list[Job]) -> None:
        """Tell the futures held back for other tenants' turns (and those let in again)."""
        if self._on_state is None:
            return
        for job in admitted:
            if job.held_back:
                self._on_state(job.req, "active")
        if not admitted:
            return
        now = time.monotonic()
        served = {job.req.tenant for job in admitted}
        for tenant, queue in self._queues.items():
            head = queue[0] if queue else None
            if head is None or head.held_back or not served - {tenant}:
                continue  # nothing waits, or it waits behind its own tenant's requests only
            if now - head.queued_at >= self.hold_report_s:
                head.held_back = True
                self._on_state(head.req, "paused_rate_limit")

    async def run(self) -> None:
        in_flight = self._in_flight
        while True:
            while not self.engine.has_work and not any(self._queues.values()):
                self._arrived.clear()
                await self._arrived.wait()
            jobs = self._take(self.max_batch if self.engine.num_waiting == 0 else 0)
            self._report(jobs)
            if jobs:
                added = await self._torch(self._add, [(j.req, j.adapter_id) for j in jobs])
                for job, handle in zip(jobs, added, strict=True):
                    if isinstance(handle, Exception):
                        job.fut.set_exception(handle)
                    else:
                        in_flight[handle] = job
            # Jobs failed meanwhile (an ended session) or whose handler is gone leave the engine
            # now: their rows and KV blocks go to others from the next step on.
            gone = {handle for handle, job in in_flight.items() if job.fut.done()}
            if gone:
                await self._torch(self.engine.cancel, gone)
                for handle in gone:
                    del in_flight[handle]
            if not self.engine.has_work:
                continue
            try:
                finished = await self._torch(self.engine.step)
            except Exception as exc:  # noqa: BLE001 - every handler learns, the loop carries on
                await self._torch(self.engine.abort)
                for job in in_flight.values():
                    if not job.fut.done():
                        job.fut.set_exception(exc)
                in_flight.clear()
                continue
            for handle, result in finished:
                done = in_flight.pop(handle, None)
                if done is not None and not done.fut.done():
                    done.fut.set_result(result)

    def _add(self, jobs: list[tuple[SampleRequest, str | None]]) -> list[int | Exception]:
        """Add each job to the engine (on the torch thread): its handle, or why it was refused."""
        out: list[int | Exception] = []
        for req, adapter_id in jobs:
            try:
                out.append(self.engine.add(req, adapter_id))
            except Exception as exc:  # noqa: BLE001 - handed to the request's handler
                out.append(exc)
        return out


def _ended(session_id: str) -> UserError:
    return UserError(
        f"session {session_id} has ended (its heartbeats stopped, or it was closed): "
        "its sampling was cancelled"
    )


def _stability(req: SampleRequest, result: SampleResult) -> StabilityRecord:
    return StabilityRecord(
        request_id=req.request_id,
        tenant=req.tenant,
        session_id=req.session_id,
        sampler_id=req.sampler_id,
        adapter=req.adapter.tinker_path if req.adapter else None,
        params=req.params,
        prompt=req.prompt,
        sequences=[
            RecordedSequence(tokens=seq.tokens, logprobs=seq.logprobs) for seq in result.sequences
        ],
    )


def _cost(req: SampleRequest) -> float:
    """What a job may cost the engine, in tokens: its prompt and every token it may sample."""
    return float(req.prompt.numel + req.num_samples * req.params.max_tokens)


class SamplerWorker:
    def __init__(
        self,
        settings: SamplerSettings,
        bus: b.Bus,
        engine: SamplerEngine,
        store: LocalCheckpointStore,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.store = store
        self.log = log
        self._torch = Offload("torch")
        self._queue_states: dict[str, asyncio.Task[None]] = {}  # request id -> its last word
        self.batcher = Batcher(
            engine,
            self._torch,
            settings.max_batch_requests,
            on_state=self._tell_queue_state,
            hold_report_s=settings.fair_share_report_s,
        )

    def _tell_queue_state(self, req: SampleRequest, state: QueueState) -> None:
        """A request held back for other tenants' turns, or let in again: its future says so
        (in order: a request's second word waits for its first)."""
        before = self._queue_states.get(req.request_id)

        async def tell() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            try:
                await b.set_queue_state(self.bus, req.request_id, state)
            finally:
                if self._queue_states.get(req.request_id) is task:
                    del self._queue_states[req.request_id]

        task = spawn(tell(), self.log, "queue state")
        self._queue_states[req.request_id] = task

    async def declare(self) -> None:
        base = self.settings.base_model
        await b.subscribe(
            self.bus,
            self.handle_sample,
            s.sample_subject(base),
            stream=JStream(s.SAMPLE_STREAM, declare=False),
            durable=s.sample_consumer(base),
            pull_sub=PullSub(batch_size=self.settings.max_batch_requests, timeout=1.0),
            config=consumer_config(self.settings.ack_wait_s, max_ack_pending=10_000),
            ack_policy=AckPolicy.MANUAL,
            decoder=decoder_for(SampleRequest),
            title=f"sample requests for {base}",
        )

    async def start(self) -> None:
        spawn(self.batcher.run(), self.log, "batcher")
        spawn(self._drop_ended_sessions(), self.log, "session sweep")
        subject = s.heartbeat_subject("sampler", self.settings.worker_id)
        spawn(
            heartbeats(self.bus, subject, self._beat, self.settings.heartbeat_interval_s, self.log),
            self.log,
            "heartbeat",
        )
        self.log.info(
            "sampler ready", worker=self.settings.worker_id, base_model=self.settings.base_model
        )

    def _beat(self) -> WorkerHeartbeat:
        metrics.ADAPTERS.labels("sampler", self.settings.base_model).set(len(self.engine._adapters))
        return WorkerHeartbeat(
            worker_id=self.settings.worker_id,
            role="sampler",
            base_models=[self.settings.base_model],
        )

    async def handle_sample(self, req: SampleRequest, msg: Delivered) -> None:
        # A request its client cancelled while it waited in the queue never runs.
        record, revision = await self._future(req.request_id)
        if record is not None and record.final:
            return
        if req.session_id and await self._session_ended(req.session_id):
            raise _ended(req.session_id)
        pending = FutureRecord(
            request_id=req.request_id,
            tenant=req.tenant,
            op="sample",
            enqueued_at=b.enqueued_at(msg),
            started_at=utcnow(),
        )
        try:
            result = await self.batcher.generate(req, await self._adapter(req))
        except ClientCancelled:
            return  # its record says so already; nothing ran to the end, nothing is billed
        await self._finish(req, pending, result, revision)

    async def _session_ended(self, session_id: str) -> bool:
        """Whether the session has ended: marked finished (by its client, or by the scheduler
        once its heartbeats stopped), or silent for ``session_ttl_s`` (the scheduler's rule; it
        sweeps only sessions with training runs, and a sampling-only session has none)."""
        kv = self.bus.kv[s.SESSIONS_BUCKET]
        record = await b.kv_get(kv, s.token(session_id), SessionRecord)
        if record is None:
            return False
        silent_s = (utcnow() - record.last_heartbeat_at).total_seconds()
        return record.finished or silent_s > self.settings.session_ttl_s

    async def _drop_ended_sessions(self) -> None:
        """Every ``session_check_s``: fail the sampling of sessions that have ended, queued or
        running, and take the running samples their clients cancelled (``cancel_future`` made
        their records final) out of the engine. Either leaves the engine before its next step,
        unbilled."""
        while True:
            await asyncio.sleep(self.settings.session_check_s)
            for session_id in self.batcher.sessions():
                if await self._session_ended(session_id):
                    dropped = self.batcher.drop_session(session_id, _ended(session_id))
                    self.log.info("sampling cancelled", session=session_id, requests=dropped)
            running = self.batcher.running()
            records = await asyncio.gather(
                *(b.future_record(self.bus, job.req.request_id) for job in running)
            )
            for job, record in zip(running, records, strict=True):
                if record is not None and record.final and not job.fut.done():
                    job.fut.set_exception(ClientCancelled(job.req.request_id))
                    self.log.info("cancelled sample stopped", request_id=job.req.request_id)

    async def _future(self, request_id: str) -> tuple[FutureRecord | None, int | None]:
        """The request's future record and its KV revision (None, None before the gateway's
        pending record lands: it is written alongside the publish)."""
        try:
            entry = await self.bus.kv[s.FUTURES_BUCKET].get(request_id)
        except (KeyNotFoundError, NotFoundError):
            return None, None
        if entry.value is None or entry.operation is not None:
            return None, None
        return FutureRecord.decode(entry.value), entry.revision

    async def _write_result(self, final: FutureRecord, revision: int | None) -> bool:
        """Write the final record unless the future was cancelled meanwhile (compare-and-set on
        the revision read before the work); False when it was, so nothing is billed."""
        kv = self.bus.kv[s.FUTURES_BUCKET]
        while True:
            try:
                if revision is None:
                    await kv.create(final.request_id, final.encode())
                else:
                    await kv.update(final.request_id, final.encode(), last=revision)
                return True
            except KeyWrongLastSequenceError:
                record, revision = await self._future(final.request_id)
                if record is not None and record.final:
                    return record.status == "done"  # a copy finished first: its usage ids match

    async def _adapter(self, req: SampleRequest) -> str | None:
        if req.adapter is None:
            return None
        directory = self.store.path(req.adapter.store_key)
        if not directory.is_dir():
            raise UserError(f"sampler weights {req.adapter.tinker_path} not found")
        await self._torch(self.engine.ensure_adapter, req.adapter.store_key, directory)
        return req.adapter.store_key

    async def _finish(
        self, req: SampleRequest, pending: FutureRecord, result: SampleResult, revision: int | None
    ) -> None:
        cached = result.prompt_cache_hit_tokens
        usage: dict[UsageMeter, int] = {
            "prefill_tokens": req.prompt.numel - cached,
            "sample_tokens": sum(seq.tokens.numel for seq in result.sequences),
        }
        if cached:
            usage["cached_prefill_tokens"] = cached
        events = [
            UsageEvent.of(
                req.request_id,
                req.tenant,
                req.base_model,
                meter,
                tokens,
                session_id=req.session_id,
                sampler_id=req.sampler_id,
                api_key_id=req.api_key_id,
                operation="sample",
            )
            for meter, tokens in usage.items()
        ]
        for meter, tokens in usage.items():
            metrics.TOKENS.labels("sampler", meter, req.base_model).inc(tokens)
        if req.record_stability_info:  # before the result: a client that sees it may train on it
            await b.kv_put(self.bus.kv[s.STABILITY_BUCKET], req.request_id, _stability(req, result))
        # The result, then its usage (none for a request cancelled meanwhile), both before the
        # wrapper acknowledges the request.
        final = pending.model_copy(
            update={
                "status": "done",
                "result": result,
                "finished_at": utcnow(),
                "trace": b.trace_carrier(),
            }
        )
        if await self._write_result(final, revision):
            await b.publish_usage(self.bus, events)
