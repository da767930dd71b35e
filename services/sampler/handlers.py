"""The sampler worker's bus side.

Pulls from the shared durable queue of its base model (``ws.sample.<base>``, consumer
``sampler-<base>``; every replica of that base model pulls from the same consumer, so load
balancing and failover come from JetStream). Each message's handler hands its request to the
``Batcher``, which adds it to the engine's continuous batch between two decode steps and returns
its result when its last sequence finishes; the handler then writes the future's result to KV
``ws_futures`` and publishes prefill and sample token usage on ``ws.usage.<tenant>``. The
message-fate wrapper acknowledges it after that, or fails the future on a user error. Heartbeats
on ``ws.ctl.heartbeat.sampler.<id>``.
"""

from __future__ import annotations

import asyncio

import structlog
from faststream import AckPolicy
from faststream.nats import JStream, PullSub

from services.sampler.engine import SamplerEngine
from services.sampler.settings import SamplerSettings
from whetstone import bus as b
from whetstone import metrics
from whetstone import subjects as s
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.errors import UserError
from whetstone.fate import Delivered, consumer_config, decoder_for
from whetstone.messages import (
    FutureRecord,
    Meter,
    SampleRequest,
    SampleResult,
    UsageEvent,
    WorkerHeartbeat,
)
from whetstone.tasks import Offload, heartbeats, spawn

Job = tuple[SampleRequest, str | None, "asyncio.Future[SampleResult]"]


class Batcher:
    """Continuous batching: queued jobs join the engine between its steps and leave as they finish.

    Each job is added on its own (validated alone, so a bad request fails only itself); while the
    engine has work the loop runs one ``engine.step()`` at a time on the torch thread and hands
    each finished result to its handler. If a step fails, every request in flight fails with it
    and the engine is reset.
    """

    def __init__(self, engine: SamplerEngine, torch: Offload, max_batch: int) -> None:
        self.engine = engine
        self._torch = torch
        self.max_batch = max_batch  # jobs added per step at most
        self._queue: asyncio.Queue[Job] = asyncio.Queue()

    async def generate(self, req: SampleRequest, adapter_id: str | None) -> SampleResult:
        fut: asyncio.Future[SampleResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((req, adapter_id, fut))
        return await fut

    async def run(self) -> None:
        in_flight: dict[int, asyncio.Future[SampleResult]] = {}
        while True:
            jobs = [] if self.engine.has_work else [await self._queue.get()]
            while not self._queue.empty() and len(jobs) < self.max_batch:
                jobs.append(self._queue.get_nowait())
            if jobs:
                added = await self._torch(self._add, [(r, a) for r, a, _ in jobs])
                for (_, _, fut), handle in zip(jobs, added, strict=True):
                    if isinstance(handle, Exception):
                        fut.set_exception(handle)
                    else:
                        in_flight[handle] = fut
            try:
                finished = await self._torch(self.engine.step)
            except Exception as exc:  # noqa: BLE001 - every handler learns, the loop carries on
                await self._torch(self.engine.abort)
                for fut in in_flight.values():
                    fut.set_exception(exc)
                in_flight.clear()
                continue
            for handle, result in finished:
                in_flight.pop(handle).set_result(result)

    def _add(self, jobs: list[tuple[SampleRequest, str | None]]) -> list[int | Exception]:
        """Add each job to the engine (on the torch thread): its handle, or why it was refused."""
        out: list[int | Exception] = []
        for req, adapter_id in jobs:
            try:
                out.append(self.engine.add(req, adapter_id))
            except Exception as exc:  # noqa: BLE001 - handed to the request's handler
                out.append(exc)
        return out


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
        self.batcher = Batcher(engine, self._torch, settings.max_batch_requests)

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
        result = await self.batcher.generate(req, await self._adapter(req))
        await self._finish(req, result)

    async def _adapter(self, req: SampleRequest) -> str | None:
        if req.adapter is None:
            return None
        directory = self.store.path(req.adapter.store_key)
        if not directory.is_dir():
            raise UserError(f"sampler weights {req.adapter.tinker_path} not found")
        await self._torch(self.engine.ensure_adapter, req.adapter.store_key, directory)
        return req.adapter.store_key

    async def _finish(self, req: SampleRequest, result: SampleResult) -> None:
        pending = FutureRecord(request_id=req.request_id, tenant=req.tenant, op="sample")
        usage: dict[Meter, int] = {
            "prefill_tokens": req.prompt.numel,
            "sample_tokens": sum(seq.tokens.numel for seq in result.sequences),
        }
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
        # Result and usage land together, before the wrapper acknowledges the request.
        await asyncio.gather(
            b.finish_future(self.bus, pending, result), b.publish_usage(self.bus, events)
        )
