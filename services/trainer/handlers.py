"""The trainer worker's bus side: assignments, per-run queues, results, usage, heartbeats.

Consumes ``ws.ctl.assign.<worker>`` (request/reply from the scheduler) and, for every run placed
here, the run's durable queue ``ws.train.<run>`` through the run's own pull consumer, a FastStream
subscriber created when the run arrives (``open_run``) and stopped when it leaves. Writes future
results to KV ``ws_futures``, checkpoint records to ``ws_checkpoints``, and publishes
``ws.usage.<tenant>`` events and ``ws.ctl.heartbeat.trainer.<worker>``.

A run's next seq_id is kept in KV ``ws_run_progress`` (written before each ack), so that a
restarted holder neither waits for seq_ids that already ran nor runs them again.

The reorder buffer is the one place where a message outlives its handler unacknowledged: a
run's handler only puts the request in the run's ``seq_id`` buffer and holds the message
(``fate.hold``); the worker's executor loop runs every run's ready requests in order and settles
each message with the same rules as the fate wrapper (``MessageFate.settle``) once its result
and usage are written. A server error is retried in place (a nak would let later seq_ids run
first), then dead-lettered. A gap that stays open ``gap_timeout_s`` fails the waiting requests.
Torch work runs on one dedicated thread; the event loop stays free for I/O and heartbeats.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub
from opentelemetry import context as otel_context

from services.trainer.engine import TrainerEngine
from services.trainer.reorder import ReorderBuffer
from services.trainer.settings import TrainerSettings
from whetstone import bus as b
from whetstone import metrics
from whetstone import subjects as s
from whetstone.checkpoints import (
    LocalCheckpointStore,
    TinkerPath,
    check_name,
    record_key,
    store_key,
)
from whetstone.errors import UserError
from whetstone.fate import BACKOFF_S, MAX_DELIVER, Delivered, consumer_config, decoder_for, hold
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
    TrainingRunRecord,
    TrainRequest,
    WorkerHeartbeat,
)
from whetstone.observability import bind_work, tracer_provider
from whetstone.tasks import Offload, heartbeats, spawn


@dataclass
class Held:
    req: TrainRequest
    msg: NatsMessage
    trace: Any  # the OpenTelemetry context of the message's delivery


@dataclass
class RunQueue:
    run: TrainingRunRecord
    subscriber: Any
    buffer: ReorderBuffer[Held] = field(default_factory=ReorderBuffer)


class TrainerWorker:
    def __init__(
        self,
        settings: TrainerSettings,
        bus: b.Bus,
        engine: TrainerEngine,
        store: LocalCheckpointStore,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.store = store
        self.log = log
        self._torch = Offload("torch")
        self.runs: dict[str, RunQueue] = {}
        self._wake = asyncio.Event()
        self._executing = asyncio.Lock()  # held while a request runs; stop() waits for it
        self._draining = False
        self._tracer = tracer_provider("trainer").get_tracer("whetstone.trainer")

    @property
    def pumps(self) -> dict[str, RunQueue]:  # the runs held here (name kept for the tests)
        return self.runs

    async def declare(self) -> None:
        await b.subscribe(
            self.bus,
            self.handle_assign,
            s.assign_subject(self.settings.worker_id),
            decoder=decoder_for(AssignRun),
            title="run assignments",
        )

    async def start(self) -> None:
        await self._rebind_placed_runs()
        spawn(self._execute_loop(), self.log, "executor")
        subject = s.heartbeat_subject("trainer", self.settings.worker_id)
        spawn(
            heartbeats(self.bus, subject, self._beat, self.settings.heartbeat_interval_s, self.log),
            self.log,
            "heartbeat",
        )
        self.log.info(
            "trainer ready", worker=self.settings.worker_id, base_model=self.settings.base_model
        )

    def _beat(self) -> WorkerHeartbeat:
        metrics.ADAPTERS.labels("trainer", self.settings.base_model).set(len(self.runs))
        return WorkerHeartbeat(
            worker_id=self.settings.worker_id,
            role="trainer",
            base_models=[self.settings.base_model],
            runs=sorted(self.runs),
            max_runs=self.settings.max_runs,
        )

    # ------------------------------------------------------------ assignment

    async def handle_assign(self, assign: AssignRun) -> bytes:
        run = assign.run
        pending = FutureRecord(request_id=assign.request_id, tenant=run.tenant, op="create_model")
        try:
            await self.open_run(run)
            await b.finish_future(self.bus, pending, CreateModelResult(model_id=run.run_id))
            reply = AssignReply(ok=True)
        except UserError as exc:
            await b.fail_future(self.bus, pending, exc.message, exc.category)
            reply = AssignReply(ok=True)  # placed and answered: the user's error is final
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which retries
            self.log.exception("assignment failed", run=run.run_id)
            reply = AssignReply(ok=False, error=str(exc))
        return reply.encode()

    async def open_run(self, run: TrainingRunRecord) -> None:
        """Hold ``run``: its adapter and optimizer state, and its queue's consumer."""
        if self._draining:
            raise RuntimeError("worker is draining")
        if not self.engine.has_run(run.run_id):
            await self._torch(self.engine.create_run, run.run_id, run.lora)
        if run.run_id in self.runs:
            return
        queue = self.runs[run.run_id] = RunQueue(run, None)
        queue.buffer = ReorderBuffer(next_seq=await self._progress(run.run_id))
        queue.subscriber = await self.subscribe_run(run.run_id)

    async def subscribe_run(self, run_id: str) -> Any:
        """The run's own durable pull consumer, a FastStream subscriber made at run time."""
        return await b.subscribe(
            self.bus,
            self.handle_train,
            s.train_subject(run_id),
            stream=JStream(s.TRAIN_STREAM, declare=False),
            durable=s.train_consumer(run_id),
            pull_sub=PullSub(batch_size=self.settings.fetch_batch, timeout=1.0),
            config=consumer_config(self.settings.ack_wait_s, max_ack_pending=10_000),
            ack_policy=AckPolicy.MANUAL,
            decoder=decoder_for(TrainRequest),
            persistent=False,
            title="one training run's requests, in seq_id order",
        )

    async def _progress(self, run_id: str) -> int:
        """The next seq_id of ``run_id``: 1 for a new run, else where its last holder stopped."""
        try:
            entry = await self.bus.kv[s.RUN_PROGRESS_BUCKET].get(s.token(run_id))
        except Exception:  # noqa: BLE001 - KeyNotFoundError: the run never ran a request
            return 1
        return int((entry.value or b"1").decode())

    async def _rebind_placed_runs(self) -> None:
        """A restarted worker takes back the runs placed on it (same worker id): their queues
        still hold every unacknowledged request."""
        placements = self.bus.kv[s.PLACEMENTS_BUCKET]
        try:
            keys = await placements.keys()
        except Exception:  # noqa: BLE001 - NoKeysError: nothing placed anywhere yet
            return
        for key in keys:
            entry = await placements.get(key)
            if (entry.value or b"").decode() != self.settings.worker_id:
                continue
            run = await b.kv_get(self.bus.kv[s.RUNS_BUCKET], key, TrainingRunRecord)
            if run is not None and run.base_model == self.settings.base_model:
                await self.open_run(run)
                self.log.info("run taken back after a restart", run=run.run_id)

    # ------------------------------------------------------------ the run's queue

    async def handle_train(self, req: TrainRequest, msg: Delivered) -> None:
        queue = self.runs.get(req.run_id)
        if queue is None:
            raise RuntimeError(f"run {req.run_id} is not held here")  # nak: redelivered
        buffer = queue.buffer
        if req.seq_id < buffer.next_seq:
            await self._late(req)  # a redelivery of a request that already ran: ack
            return
        item = Held(req, msg, otel_context.get_current())
        hold(msg)
        if buffer.replace(req.seq_id, item):
            # A redelivery of a request still waiting for an earlier seq_id: it must stay
            # unacknowledged (an ack would delete it from the work queue before it ran).
            await msg.in_progress()
            return
        buffer.push(req.seq_id, item, time.monotonic())
        self._wake.set()

    async def _late(self, req: TrainRequest) -> None:
        record = await b.future_record(self.bus, req.request_id)
        if record is not None and not record.final and not isinstance(req.command, Skip):
            raise UserError(
                f"seq_id {req.seq_id} arrived after the run moved past it "
                f"(its gap timed out after {self.settings.gap_timeout_s:.0f} s)"
            )

    async def _execute_loop(self) -> None:
        last_keepalive = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                pass
            self._wake.clear()
            now = time.monotonic()
            for queue in list(self.runs.values()):
                for item in queue.buffer.pop_ready():
                    if self._draining:  # handed back: it runs after the restart, in order
                        await item.msg.nack()
                        continue
                    async with self._executing:
                        await self._run_one(item)
                if queue.buffer.gap_open_s(now) > self.settings.gap_timeout_s:
                    await self._fail_gap(queue)
            if now - last_keepalive > self.settings.ack_wait_s / 3:
                held = [i.msg for q in self.runs.values() for i in q.buffer.held()]
                await asyncio.gather(*(m.in_progress() for m in held), return_exceptions=True)
                last_keepalive = now

    async def _fail_gap(self, queue: RunQueue) -> None:
        missing = queue.buffer.next_seq
        items = queue.buffer.skip_gap()
        seqs = ", ".join(str(i.req.seq_id) for i in items)
        self.log.warning("seq_id gap timed out", run=queue.run.run_id, missing=missing, failed=seqs)
        error = UserError(
            f"request seq_id {missing} of {queue.run.run_id} never reached the trainer within "
            f"{self.settings.gap_timeout_s:.0f} s, so the requests after it ({seqs}) cannot run "
            "in order; resubmit them"
        )
        await asyncio.gather(*(self.bus.fate.settle(i.msg, error) for i in items))

    async def _run_one(self, item: Held) -> None:
        req = item.req
        token = otel_context.attach(item.trace)
        bind_work(request_id=req.request_id, run_id=req.run_id, tenant=req.tenant)
        op = _op(req)
        try:
            with self._tracer.start_as_current_span(
                f"execute {op}",
                attributes={"whetstone.run_id": req.run_id, "whetstone.seq_id": req.seq_id},
            ):
                outcome = await self._with_retries(req)
                # Before the ack: a restarted holder must not wait for seq_ids that ran.
                await self.bus.kv[s.RUN_PROGRESS_BUCKET].put(
                    s.token(req.run_id), str(req.seq_id + 1).encode()
                )
                await self.bus.fate.settle(item.msg, outcome, final=outcome is not None)
        finally:
            otel_context.detach(token)

    async def _with_retries(self, req: TrainRequest) -> BaseException | None:
        """Run ``req``; None on success, else the error that ends it (a user error at once, a
        server error after ``MAX_DELIVER`` tries in place)."""
        for attempt in range(1, MAX_DELIVER + 1):
            started = time.perf_counter()
            metrics.IN_FLIGHT.labels("trainer", _op(req)).inc()
            try:
                await self._execute(req)
                metrics.REQUESTS.labels("trainer", _op(req), self.settings.base_model).inc()
                metrics.REQUEST_LATENCY.labels(
                    "trainer", _op(req), self.settings.base_model
                ).observe(time.perf_counter() - started)
                return None
            except UserError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - retried, then dead-lettered
                self.log.exception("request failed", attempt=attempt, seq_id=req.seq_id)
                if attempt == MAX_DELIVER or self._draining:
                    return exc
                await asyncio.sleep(BACKOFF_S[attempt - 1])
            finally:
                metrics.IN_FLIGHT.labels("trainer", _op(req)).dec()
        raise AssertionError("unreachable")

    async def _execute(self, req: TrainRequest) -> None:
        cmd = req.command
        if isinstance(cmd, Skip):
            return  # a refused submission's seq_id: nothing to run, nobody waiting
        pending = FutureRecord(request_id=req.request_id, tenant=req.tenant, op=_op(req))
        result: Result
        if isinstance(cmd, ForwardBackward):
            result = await self._torch(self.engine.forward_backward, req.run_id, cmd)
        elif isinstance(cmd, OptimStep):
            result = await self._torch(self.engine.optim_step, req.run_id, cmd.adam)
        else:
            result = await self._save(req, cmd)
        writes = [b.finish_future(self.bus, pending, result)]
        if isinstance(cmd, ForwardBackward):
            meter: Meter = "prefill_tokens" if cmd.forward_only else "train_tokens"
            tokens = self.engine.num_tokens(cmd)
            metrics.TOKENS.labels("trainer", meter, self.settings.base_model).inc(tokens)
            writes.append(self._usage(req, meter, tokens))
        await asyncio.gather(*writes)  # both land before the message is acknowledged

    async def _usage(self, req: TrainRequest, meter: Meter, tokens: int) -> None:
        from whetstone.messages import UsageEvent

        event = UsageEvent.of(
            req.request_id, req.tenant, self.settings.base_model, meter, tokens, req.run_id
        )
        await b.publish_usage(self.bus, [event])

    async def _save(self, req: TrainRequest, cmd: SaveWeights) -> SaveWeightsResult:
        path = TinkerPath(req.run_id, cmd.kind, check_name(cmd.name))
        key = store_key(req.tenant, path)
        if cmd.kind == "training" and not cmd.overwrite and self.store.exists(key):
            raise UserError(
                f"checkpoint {path} already exists; save with overwrite=True to replace it"
            )
        staged = self.store.staging(key)
        save = self.engine.save_state if cmd.kind == "training" else self.engine.save_sampler
        size = await self._torch(save, req.run_id, staged)
        self.store.commit(staged, key)
        if cmd.sampler_id is None:  # ephemeral sampler weights are not listed as checkpoints
            record = CheckpointRecord(
                tinker_path=str(path),
                run_id=req.run_id,
                tenant=req.tenant,
                kind=cmd.kind,
                name=cmd.name,
                store_key=key,
                size_bytes=size,
            )
            await b.kv_put(self.bus.kv[s.CHECKPOINTS_BUCKET], record_key(path), record)
        return SaveWeightsResult(kind=cmd.kind, path=str(path), sampler_id=cmd.sampler_id)

    # ------------------------------------------------------------ shutdown

    async def stop(self) -> None:
        """Stop taking work, let the request that runs now finish, and hand every held request
        back to its queue at once (nak), for this worker restarted or another one."""
        self._draining = True
        await asyncio.gather(
            *(q.subscriber.stop() for q in self.runs.values() if q.subscriber),
            return_exceptions=True,
        )
        async with self._executing:
            held = [i.msg for q in self.runs.values() for i in q.buffer.clear()]
        await asyncio.gather(*(m.nack() for m in held), return_exceptions=True)
        self.log.info("trainer drained", handed_back=len(held))


def _op(req: TrainRequest) -> str:
    cmd = req.command
    return "forward" if isinstance(cmd, ForwardBackward) and cmd.forward_only else cmd.op
