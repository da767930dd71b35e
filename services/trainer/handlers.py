"""The trainer worker's bus side: assignments, per-run queues, results, usage, heartbeats.

Consumes ``ws.ctl.assign.<worker>`` (request/reply from the scheduler) and, for every run placed
here, the run's durable queue ``ws.train.<run>`` through the run's own pull consumer. Writes
future results to KV ``ws_futures``, checkpoint records to ``ws_checkpoints``, and publishes
``ws.usage.<tenant>`` events and ``ws.ctl.heartbeat.trainer.<worker>``.

A request is acknowledged only after its result and usage are written, so a crash replays it.
Torch work runs on one dedicated thread; the event loop stays free for I/O and heartbeats.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from nats.js import api

from services.trainer.engine import TrainerEngine
from services.trainer.reorder import ReorderBuffer
from services.trainer.settings import TrainerSettings
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.tasks import Offload, heartbeats, spawn
from whetstone.checkpoints import LocalCheckpointStore, TinkerPath, check_name, record_key, store_key
from whetstone.errors import UserError, WhetstoneError
from whetstone.messages import (
    AssignReply,
    AssignRun,
    CheckpointRecord,
    CreateModelResult,
    ForwardBackward,
    FutureRecord,
    Meter,
    OptimStep,
    Result,
    SaveWeights,
    SaveWeightsResult,
    Skip,
    TrainRequest,
    UsageEvent,
    WorkerHeartbeat,
)


class TrainerWorker:
    def __init__(self, settings: TrainerSettings, bus: b.Bus, engine: TrainerEngine,
                 store: LocalCheckpointStore, log) -> None:
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.store = store
        self.log = log
        self._torch = Offload("torch")
        self.pumps: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        await self.bus.nc.subscribe(s.assign_subject(self.settings.worker_id), cb=self.handle_assign)
        subject = s.heartbeat_subject("trainer", self.settings.worker_id)
        spawn(heartbeats(self.bus, subject, self._beat, self.settings.heartbeat_interval_s, self.log),
              self.log, "heartbeat")
        self.log.info("trainer ready", worker=self.settings.worker_id, base_model=self.settings.base_model)

    def _beat(self) -> WorkerHeartbeat:
        return WorkerHeartbeat(worker_id=self.settings.worker_id, role="trainer",
                               base_models=[self.settings.base_model], runs=sorted(self.pumps),
                               max_runs=self.settings.max_runs)

    # ------------------------------------------------------------ assignment

    async def handle_assign(self, msg: Msg) -> None:
        assign = AssignRun.decode(msg.data)
        run = assign.run
        pending = FutureRecord(request_id=assign.request_id, tenant=run.tenant, op="create_model")
        try:
            if not self.engine.has_run(run.run_id):
                await self._torch(self.engine.create_run, run.run_id, run.lora)
            if run.run_id not in self.pumps:
                self.pumps[run.run_id] = spawn(self._pump(run.run_id), self.log, f"pump {run.run_id}")
            await b.finish_future(self.bus, pending, CreateModelResult(model_id=run.run_id))
            reply = AssignReply(ok=True)
        except UserError as exc:
            await b.fail_future(self.bus, pending, exc.message, exc.category)
            reply = AssignReply(ok=True)  # placed and answered: the user's error is final
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which retries
            self.log.exception("assignment failed", run=run.run_id)
            reply = AssignReply(ok=False, error=str(exc))
        await msg.respond(reply.encode())

    # ------------------------------------------------------------ the run's queue

    async def _pump(self, run_id: str) -> None:
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_s,
            max_ack_pending=10_000,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        sub = await self.bus.js.pull_subscribe(
            s.train_subject(run_id), durable=s.train_consumer(run_id), stream=s.TRAIN_STREAM, config=config
        )
        buffer: ReorderBuffer[tuple[TrainRequest, Msg]] = ReorderBuffer(next_seq=1)
        while True:
            msgs = await b.fetch(sub, self.settings.fetch_batch, 1.0, self.log)
            if not msgs:
                continue
            for msg in msgs:
                req = TrainRequest.decode(msg.data)
                if req.seq_id < buffer.next_seq:
                    await msg.ack()  # a redelivery of a request that already ran
                elif not buffer.push(req.seq_id, (req, msg)):
                    # A redelivery of a request held for an earlier seq_id: it must stay
                    # unacknowledged (an ack would delete it from the work queue before it ran).
                    await msg.in_progress()
            for req, msg in buffer.pop_ready():
                await self._execute(req)
                await msg.ack()

    async def _execute(self, req: TrainRequest) -> None:
        cmd = req.command
        if isinstance(cmd, Skip):
            return  # a refused submission's seq_id: nothing to run, nobody waiting
        op = "forward" if isinstance(cmd, ForwardBackward) and cmd.forward_only else cmd.op
        pending = FutureRecord(request_id=req.request_id, tenant=req.tenant, op=op)
        try:
            result: Result
            if isinstance(cmd, ForwardBackward):
                result = await self._torch(self.engine.forward_backward, req.run_id, cmd)
            elif isinstance(cmd, OptimStep):
                result = await self._torch(self.engine.optim_step, req.run_id, cmd.adam)
            else:
                result = await self._save(req, cmd)
        except WhetstoneError as exc:
            await b.fail_future(self.bus, pending, exc.message, exc.category)
            return
        except Exception as exc:  # noqa: BLE001 - a bug must fail one future, not the worker
            self.log.exception("request failed", run=req.run_id, seq_id=req.seq_id)
            await b.fail_future(self.bus, pending, f"internal error: {exc}", "server")
            return
        writes = [b.finish_future(self.bus, pending, result)]
        if isinstance(cmd, ForwardBackward):
            meter: Meter = "prefill_tokens" if cmd.forward_only else "train_tokens"
            writes.append(self._usage(req, meter, self.engine.num_tokens(cmd)))
        await asyncio.gather(*writes)  # both land before the caller acknowledges the request

    async def _usage(self, req: TrainRequest, meter: Meter, tokens: int) -> None:
        event = UsageEvent.of(req.request_id, req.tenant, self.settings.base_model, meter, tokens, req.run_id)
        await b.publish_usage(self.bus, [event])

    async def _save(self, req: TrainRequest, cmd: SaveWeights) -> SaveWeightsResult:
        path = TinkerPath(req.run_id, cmd.kind, check_name(cmd.name))
        key = store_key(req.tenant, path)
        if cmd.kind == "training" and not cmd.overwrite and self.store.exists(key):
            raise UserError(f"checkpoint {path} already exists; save with overwrite=True to replace it")
        staged = self.store.staging(key)
        save = self.engine.save_state if cmd.kind == "training" else self.engine.save_sampler
        size = await self._torch(save, req.run_id, staged)
        self.store.commit(staged, key)
        if cmd.sampler_id is None:  # ephemeral sampler weights are not listed as checkpoints
            record = CheckpointRecord(tinker_path=str(path), run_id=req.run_id, tenant=req.tenant,
                                      kind=cmd.kind, name=cmd.name, store_key=key, size_bytes=size)
            await b.kv_put(self.bus.kv[s.CHECKPOINTS_BUCKET], record_key(path), record)
        return SaveWeightsResult(kind=cmd.kind, path=str(path), sampler_id=cmd.sampler_id)
