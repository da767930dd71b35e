"""The sampler worker's bus side.

Pulls from the shared durable queue of its base model (``ws.sample.<base>``, consumer
``sampler-<base>``; every replica of that base model pulls from the same consumer, so load
balancing and failover come from JetStream), decodes a batch of requests together, writes each
future's result to KV ``ws_futures``, publishes prefill and sample token usage on
``ws.usage.<tenant>``, and only then acknowledges. Heartbeats on ``ws.ctl.heartbeat.sampler.<id>``.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from nats.js import api

from services.sampler.engine import SamplerEngine
from services.sampler.settings import SamplerSettings
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.tasks import Offload, heartbeats, spawn
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.errors import UserError, WhetstoneError
from whetstone.messages import FutureRecord, Meter, SampleRequest, SampleResult, UsageEvent, WorkerHeartbeat


class SamplerWorker:
    def __init__(self, settings: SamplerSettings, bus: b.Bus, engine: SamplerEngine,
                 store: LocalCheckpointStore, log) -> None:
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.store = store
        self.log = log
        self._torch = Offload("torch")

    async def start(self) -> None:
        spawn(self._pump(self.settings.base_model), self.log, "pump")
        subject = s.heartbeat_subject("sampler", self.settings.worker_id)
        spawn(heartbeats(self.bus, subject, self._beat, self.settings.heartbeat_interval_s, self.log),
              self.log, "heartbeat")
        self.log.info("sampler ready", worker=self.settings.worker_id, base_model=self.settings.base_model)


    def _beat(self) -> WorkerHeartbeat:
        return WorkerHeartbeat(worker_id=self.settings.worker_id, role="sampler",
                               base_models=[self.settings.base_model])

    async def _pump(self, base_model: str) -> None:
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.settings.ack_wait_s,
                                    max_ack_pending=10_000)
        sub = await self.bus.js.pull_subscribe(
            s.sample_subject(base_model), durable=s.sample_consumer(base_model), stream=s.SAMPLE_STREAM,
            config=config,
        )
        while True:
            msgs = await b.fetch(sub, self.settings.max_batch_requests, 1.0, self.log)
            if not msgs:
                continue
            await self._run_batch(msgs)

    async def _run_batch(self, msgs: list[Msg]) -> None:
        jobs: list[tuple[SampleRequest, str | None, Msg]] = []
        for msg in msgs:
            req = SampleRequest.decode(msg.data)
            try:
                adapter_id = await self._adapter(req)
            except WhetstoneError as exc:
                await self._fail(req, exc)
                await msg.ack()
                continue
            jobs.append((req, adapter_id, msg))
        if not jobs:
            return
        try:
            results = await self._torch(self.engine.generate, [(r, a) for r, a, _ in jobs])
            outcomes: list[SampleResult | WhetstoneError] = list(results)
        except UserError:
            # One bad request must not fail its batch-mates: run them one by one to isolate it.
            outcomes = [await self._generate_one(r, a) for r, a, _ in jobs]
        for (req, _, msg), outcome in zip(jobs, outcomes):
            if isinstance(outcome, WhetstoneError):
                await self._fail(req, outcome)
            else:
                await self._finish(req, outcome)
            await msg.ack()

    async def _generate_one(self, req: SampleRequest, adapter_id: str | None) -> SampleResult | WhetstoneError:
        try:
            return (await self._torch(self.engine.generate, [(req, adapter_id)]))[0]
        except WhetstoneError as exc:
            return exc

    async def _adapter(self, req: SampleRequest) -> str | None:
        if req.adapter is None:
            return None
        directory = self.store.path(req.adapter.store_key)
        if not directory.is_dir():
            raise UserError(f"sampler weights {req.adapter.tinker_path} not found")
        await self._torch(self.engine.ensure_adapter, req.adapter.store_key, directory)
        return req.adapter.store_key

    async def _fail(self, req: SampleRequest, exc: WhetstoneError) -> None:
        pending = FutureRecord(request_id=req.request_id, tenant=req.tenant, op="sample")
        await b.fail_future(self.bus, pending, exc.message, exc.category)

    async def _finish(self, req: SampleRequest, result: SampleResult) -> None:
        pending = FutureRecord(request_id=req.request_id, tenant=req.tenant, op="sample")
        usage: dict[Meter, int] = {
            "prefill_tokens": req.prompt.numel,
            "sample_tokens": sum(seq.tokens.numel for seq in result.sequences),
        }
        events = [UsageEvent.of(req.request_id, req.tenant, req.base_model, meter, tokens)
                  for meter, tokens in usage.items()]
        # Result and usage land together, before the caller acknowledges the request.
        await asyncio.gather(b.finish_future(self.bus, pending, result), b.publish_usage(self.bus, events))
