"""The sampler worker's bus side.

Pulls from the shared durable queue of its base model (``ws.sample.<base>``, consumer
``sampler-<base>``; every replica of that base model pulls from the same consumer, so load
balancing and failover come from JetStream). Each message's handler waits for its request's
turn in the ``Batcher``, which decodes together every request that is queued when the engine
becomes free; the handler then writes the future's result to KV ``ws_futures`` and publishes
prefill and sample token usage on ``ws.usage.<tenant>``. The message-fate wrapper acknowledges it
after that, or fails the future on a user error. Heartbeats on ``ws.ctl.heartbeat.sampler.<id>``.
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
    """Runs queued generation jobs together: whatever is waiting when the engine is free forms
    the next batch. A user error in a batch re-runs its jobs one by one, so one bad request does
    not fail its batch-mates."""

    def __init__(self, engine: SamplerEngine, torch: Offload, max_batch: int) -> None:
        self.engine = engine
        self._torch = torch
        self.max_batch = max_batch
        self._queue: asyncio.Queue[Job] = asyncio.Queue()

    async def generate(self, req: SampleRequest, adapter_id: str | None) -> SampleResult:
        fut: asyncio.Future[SampleResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((req, adapter_id, fut))
        return await fut

    async def run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            await asyncio.sleep(0)  # let the other handlers of the same fetch enqueue theirs
            while not self._queue.empty() and len(jobs) < self.max_batch:
                jobs.append(self._queue.get_nowait())
            try:
                results = await self._torch(self.engine.generate, [(r, a) for r, a, _ in jobs])
                for (_, _, fut), result in zip(jobs, results, strict=True):  # one per job
                    fut.set_result(result)
            except UserError:
                for req, adapter_id, fut in jobs:
                    await self._one(req, adapter_id, fut)
            except Exception as exc:  # noqa: BLE001 - every handler learns, the loop carries on
                for _, _, fut in jobs:
                    if not fut.done():
                        fut.set_exception(exc)

    async def _one(
        self, req: SampleRequest, adapter_id: str | None, fut: asyncio.Future[SampleResult]
    ) -> None:
        try:
            fut.set_result((await self._torch(self.engine.generate, [(req, adapter_id)]))[0])
        except Exception as exc:  # noqa: BLE001 - handed to the request's handler
            fut.set_exception(exc)


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
            UsageEvent.of(req.request_id, req.tenant, req.base_model, meter, tokens)
            for meter, tokens in usage.items()
        ]
        for meter, tokens in usage.items():
            metrics.TOKENS.labels("sampler", meter, req.base_model).inc(tokens)
        # Result and usage land together, before the wrapper acknowledges the request.
        await asyncio.gather(
            b.finish_future(self.bus, pending, result), b.publish_usage(self.bus, events)
        )
