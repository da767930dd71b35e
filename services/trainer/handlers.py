"""The trainer worker's bus side: assignments, releases, per-run queues, snapshots, heartbeats.

Consumes ``ws.ctl.assign.<worker>`` and ``ws.ctl.release.<worker>`` (request/reply from the
scheduler) and, for every run held here, the run's durable queue ``ws.train.<run>`` through the
run's own pull consumer, a FastStream subscriber created when the run arrives (``open_run``) and
stopped when it leaves. Writes future results to KV ``ws_futures``, checkpoint records to
``ws_checkpoints``, each run's position to ``ws_run_progress`` and its snapshots to the
checkpoint store, and publishes ``ws.usage.<tenant>`` events and
``ws.ctl.heartbeat.trainer.<worker>``.

Snapshots and acknowledgements (architecture.md §3.3). A request's message is acknowledged only
once a snapshot (``snapshots.py``) covers it; the run's ``RunProgress`` in KV names the snapshot
and the seq_id after the last request in it. A forward, a save, a Skip or a failure leaves the
state as the snapshot has it, so it moves the position on and is acknowledged at once; a
``forward_backward`` or an ``optim_step`` waits for the next snapshot, taken after every
``snapshot_every_steps``-th step and when a run with unacknowledged requests has been idle
``snapshot_idle_s`` (with its gradient); a ``load_weights`` replaces the whole state and is
snapshotted at once (a run created from a checkpoint, ``TrainingRunRecord.initial``, starts from
it, and that load is its seq 0; a fresh run's adapter is drawn from the seed in its record, so
until its state first moves the record rebuilds it and no snapshot is taken). Results and usage
are written as each request runs, so a holder that dies loses nothing: the next one loads the
snapshot, acknowledges redelivered seq_ids below its position and replays the rest, reproducing
the same weights; replayed usage events keep their ids, so nothing is billed twice. Positions
are written with a compare-and-set: a holder that lost the run finds out at its next write,
hands its messages back and drops it. A worker taking a run recreates its durable consumer, so
what a dead holder had taken comes again at once, not after the ack wait.

The reorder buffer is the one place where a message outlives its handler unacknowledged: a
run's handler only puts the request in the run's ``seq_id`` buffer and holds the message
(``fate.hold``); the worker's executor loop runs every run's ready requests in order, with the
tenants taking turns (``whetstone.fairness``; a request passed over for others' turns reports
``paused_rate_limit``), and settles each message with the same rules as the fate wrapper
(``MessageFate.settle``) once a snapshot covers it (a failed request's future fails at once).

Many runs in one pass (``passes.py``): when the request whose turn it is is a forward or
forward_backward, or an optim_step, the next turns' requests join it while each is of the same
kind, of another run (one request per run), up to ``pass_max_runs`` runs (and, for forwards,
the engine's ``micro_batch_tokens``). Forwards and forward_backwards go through the base model
together (``TrainerEngine.forward_backward_many``: each run its own adapter, loss, outputs and
gradient); optim_steps through one optimizer call (``TrainerEngine.optim_step_many``: each run
its own moments, step count and AdamParams). Each request is then settled as a lone request is:
its own future, usage event (same id; a step bills nothing), metrics and snapshot rule (a step
waits for a snapshot). A request that fails its checks fails alone; a pass that fails as it
runs has its requests run again one by one, with the retries of a lone request (a failed
forward_backward pass leaves no gradient). ``pass_max_runs=1`` runs one request at a time;
``whetstone_trainer_pass_runs`` counts the runs of each pass, by ``op``.

A server error is retried in place (a nak would let later seq_ids run first), then
dead-lettered. A gap that stays open ``gap_timeout_s`` fails the waiting requests. Torch work
runs on one dedicated thread; the event loop stays free for I/O and heartbeats. (Past 600
lines: the buffer, the snapshots that release its messages and the run's ownership are one
protocol, read best in one place, and so are the passes that run its requests; the snapshot
files themselves live in ``snapshots.py``, the choice of a pass's requests in ``passes.py``,
the fair-sharing policy in ``whetstone.fairness``.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.trainer.engine import TrainerEngine
from services.trainer.passes import plan_pass
from services.trainer.reorder import ReorderBuffer
from services.trainer.settings import TrainerSettings
from services.trainer.snapshots import load_snapshot, parse_progress, save_snapshot, snapshot_key
from whetstone import bus as b
from whetstone import metrics
from whetstone import subjects as s
from whetstone.checkpoints import (
    LocalCheckpointStore,
    TinkerPath,
    check_name,
    expiry,
    record_key,
    store_key,
)
from whetstone.errors import UserError, WhetstoneError
from whetstone.fairness import FairShare, Ready
from whetstone.fate import BACKOFF_S, MAX_DELIVER, Delivered, consumer_config, decoder_for, hold
from whetstone.messages import (
    AssignReply,
    AssignRun,
    CheckpointRecord,
    CreateModelResult,
    ForwardBackward,
    FutureRecord,
    LoadWeights,
    LoadWeightsResult,
    Operation,
    OptimStep,
    QueueState,
    ReleaseRun,
    Result,
    RunProgress,
    SaveWeights,
    SaveWeightsResult,
    Skip,
    TrainingRunRecord,
    TrainRequest,
    UsageEvent,
    UsageMeter,
    WorkerHeartbeat,
    utcnow,
)
from whetstone.observability import bind_work, tracer_provider
from whetstone.tasks import Offload, heartbeats, spawn

FAIR_ROUND = 64  # ready requests run between two passes of the loop's housekeeping


@dataclass
class Held:
    req: TrainRequest
    msg: NatsMessage
    trace: Any  # the OpenTelemetry context of the message's delivery
    ready_since: float | None = None  # monotonic: first passed over for another tenant's turn
    held_back: bool = False  # its future was told ``paused_rate_limit`` (fair sharing)


class LostRun(RuntimeError):
    """The run's position was written by another worker: it holds the run now."""


@dataclass
class RunQueue:
    run: TrainingRunRecord
    subscriber: Any
    progress: RunProgress  # as last written (the snapshot in force)
    revision: int  # of ``progress`` in KV, for the compare-and-set of the next write
    buffer: ReorderBuffer[Held] = field(default_factory=ReorderBuffer)
    # Requests that ran since the snapshot, with their outcome: acknowledged by the next one.
    unacked: list[tuple[Held, BaseException | None]] = field(default_factory=list)
    ran_through: int = 1  # the seq_id after the last request that ran
    dirty: bool = False  # a gradient or a step that the snapshot does not hold
    steps_since_snapshot: int = 0
    last_ran_at: float = 0.0  # monotonic


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
        self._opening: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._fair: FairShare[str] = FairShare()  # which run's ready request goes next
        self._executing = asyncio.Lock()  # held while a request runs or a run changes hands
        self._draining = False
        self._tracer = tracer_provider("trainer").get_tracer("whetstone.trainer")

    async def declare(self) -> None:
        await b.subscribe(
            self.bus,
            self.handle_assign,
            s.assign_subject(self.settings.worker_id),
            decoder=decoder_for(AssignRun),
            title="run assignments",
        )
        await b.subscribe(
            self.bus,
            self.handle_release,
            s.release_subject(self.settings.worker_id),
            decoder=decoder_for(ReleaseRun),
            title="run releases",
        )

    async def start(self) -> None:
        # Heartbeats first: the scheduler must see this worker alive while it takes its runs
        # back, or it would move them elsewhere meanwhile.
        subject = s.heartbeat_subject("trainer", self.settings.worker_id)
        spawn(
            heartbeats(self.bus, subject, self._beat, self.settings.heartbeat_interval_s, self.log),
            self.log,
            "heartbeat",
        )
        await self._rebind_placed_runs()
        spawn(self._execute_loop(), self.log, "executor")
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
            draining=self._draining,
        )

    # ------------------------------------------------------------ assignment and release

    async def handle_assign(self, assign: AssignRun) -> bytes:
        run = assign.run
        rid = assign.request_id  # None: a run that moves here, with no future to complete
        op = "load_weights" if run.initial else "create_model"
        pending = FutureRecord(request_id=rid or "", tenant=run.tenant, op=op)

        async def created() -> None:
            if rid:
                await b.finish_future(self.bus, pending, _created(run))

        try:
            await self.open_run(run, created)
            reply = AssignReply(ok=True)
        except UserError as exc:
            if rid:
                await b.fail_future(self.bus, pending, exc.message, exc.category)
            reply = AssignReply(ok=rid is not None, error=exc.message)  # a user's error is final
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which retries
            self.log.exception("assignment failed", run=run.run_id)
            reply = AssignReply(ok=False, error=str(exc))
        return reply.encode()

    async def handle_release(self, release: ReleaseRun) -> bytes:
        try:
            await self.close_run(release.run_id, discard=release.discard)
            reply = AssignReply(ok=True)
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which retries
            self.log.exception("release failed", run=release.run_id)
            reply = AssignReply(ok=False, error=str(exc))
        return reply.encode()

    async def open_run(
        self, run: TrainingRunRecord, claimed: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Hold ``run``: restore its snapshot (a new run: build it from its record, seeded, or
        write its first snapshot), claim its position, and consume its queue from the first
        unacknowledged request. ``claimed`` runs once the position is claimed, before the
        subscription (which the creation future need not wait for)."""
        async with self._opening.setdefault(run.run_id, asyncio.Lock()):
            if self._draining:
                raise RuntimeError("worker is draining")
            if run.run_id in self.runs:
                if claimed is not None:
                    await claimed()
                return
            kv = self.bus.kv[s.RUN_PROGRESS_BUCKET]
            progress, revision = await self._read_progress(run.run_id)
            if self.engine.has_run(run.run_id):  # a leftover: the snapshot is the truth
                await self._torch(self.engine.drop_run, run.run_id)
            if progress is not None and progress.snapshot_key:
                if not self.store.exists(progress.snapshot_key):
                    raise RuntimeError(f"snapshot {progress.snapshot_key} of {run.run_id} is gone")
                directory = self.store.path(progress.snapshot_key)
                await self._torch(load_snapshot, self.engine, run.run_id, run.lora, directory)
                claim = progress.model_copy(update={"holder": self.settings.worker_id})
            else:  # new, or never changed since: its initial state is rebuilt
                await self._start_run(run)
                next_seq = progress.next_seq_id if progress else 1
                # A seeded fresh adapter is rebuilt exactly from the run's record, so no snapshot
                # is needed until its state moves (and none delays create_model); a run without
                # a seed, or created from a checkpoint (which may later expire), is pinned by one.
                seeded = run.initial is None and run.lora.seed is not None
                claim = RunProgress(
                    run_id=run.run_id,
                    next_seq_id=next_seq,
                    snapshot_key=None if seeded else await self._write_snapshot(run, next_seq),
                    holder=self.settings.worker_id,
                )
            try:
                if revision is None:
                    revision = await kv.create(s.token(run.run_id), claim.encode())
                else:
                    revision = await kv.update(s.token(run.run_id), claim.encode(), last=revision)
            except KeyWrongLastSequenceError:
                await self._torch(self.engine.drop_run, run.run_id)
                raise RuntimeError(f"{run.run_id} is being taken by another worker") from None
            await self._reset_consumer(run.run_id)
            queue = RunQueue(run, None, claim, revision, ReorderBuffer(claim.next_seq_id))
            queue.ran_through = claim.next_seq_id
            self.runs[run.run_id] = queue
            if claimed is not None:  # the run is held: its requests wait on the stream meanwhile
                await claimed()
            try:
                queue.subscriber = await self.subscribe_run(run.run_id)
            except BaseException:  # not held after all: a retried assignment starts afresh
                self.runs.pop(run.run_id, None)
                await self._torch(self.engine.drop_run, run.run_id)
                raise

    async def _start_run(self, run: TrainingRunRecord) -> None:
        """A new run's state: a fresh adapter, or a checkpoint's (create-via-load, which is the
        run's seq 0: its first request is seq_id 1)."""
        if run.initial is None:
            await self._torch(self.engine.create_run, run.run_id, run.lora)
            return
        directory = self._checkpoint_dir(run.initial.store_key, run.initial.tinker_path)
        await self._torch(self.engine.load_state, run.run_id, directory, run.initial.optimizer)

    def _checkpoint_dir(self, key: str, tinker_path: str) -> Path:
        if not self.store.exists(key):
            raise UserError(f"checkpoint {tinker_path} no longer exists")
        return self.store.path(key)

    async def _read_progress(self, run_id: str) -> tuple[RunProgress | None, int | None]:
        """The run's position and its revision; (None, None) for a run that never ran."""
        try:
            entry = await self.bus.kv[s.RUN_PROGRESS_BUCKET].get(s.token(run_id))
        except NotFoundError:
            return None, None
        return parse_progress(run_id, entry.value), entry.revision

    async def _reset_consumer(self, run_id: str) -> None:
        """Recreate the run's durable consumer (the subscriber makes it again): whatever a
        previous holder had taken and not acknowledged is delivered again at once."""
        try:
            await self.bus.js.delete_consumer(s.TRAIN_STREAM, s.train_consumer(run_id))
        except NotFoundError:
            pass

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

    async def close_run(self, run_id: str, *, discard: bool = False) -> None:
        """Unload ``run_id``: stop its consumer, snapshot what ran (its messages are then
        acknowledged; with ``discard`` nothing is written and they go back), hand back what
        waits in its buffer, and free its adapter and optimizer state."""
        queue = self.runs.get(run_id)
        if queue is None:
            return
        if queue.subscriber is not None:
            await queue.subscriber.stop()
        async with self._executing:
            if self.runs.get(run_id) is not queue:
                return
            waiting = [i.msg for i in queue.buffer.clear()]
            if discard:
                waiting += [i.msg for i, _ in queue.unacked]
                queue.unacked.clear()
            elif queue.unacked or queue.dirty:
                await self._commit(queue)
            del self.runs[run_id]
            await self._torch(self.engine.drop_run, run_id)
        await asyncio.gather(*(m.nack() for m in waiting), return_exceptions=True)
        self.log.info("run released", run=run_id, discarded=discard)

    async def _rebind_placed_runs(self) -> None:
        """A restarted worker takes back the runs placed on it (same worker id): their queues
        still hold every unacknowledged request, their snapshots the state before them."""
        placements = self.bus.kv[s.PLACEMENTS_BUCKET]
        try:
            keys = await placements.keys()
        except Exception:  # noqa: BLE001 - NoKeysError: nothing placed anywhere yet
            return
        for key in keys:
            try:
                entry = await placements.get(key)
            except NotFoundError:
                continue
            if (entry.value or b"").decode() != self.settings.worker_id:
                continue
            run = await b.kv_get(self.bus.kv[s.RUNS_BUCKET], key, TrainingRunRecord)
            if run is not None and run.base_model == self.settings.base_model:
                try:
                    await self.open_run(run)
                except RuntimeError as exc:
                    self.log.warning("run not taken back", run=run.run_id, error=str(exc))
                    continue
                self.log.info("run taken back after a restart", run=run.run_id)

    # ------------------------------------------------------------ the run's queue

    async def handle_train(self, req: TrainRequest, msg: Delivered) -> None:
        queue = self.runs.get(req.run_id)
        if queue is None:
            raise RuntimeError(f"run {req.run_id} is not held here")  # nak: redelivered
        buffer = queue.buffer
        if req.seq_id < buffer.next_seq:
            ran = [n for n, (i, _) in enumerate(queue.unacked) if i.req.seq_id == req.seq_id]
            same = all(queue.unacked[n][0].req.request_id == req.request_id for n in ran)
            if req.seq_id >= queue.progress.next_seq_id and same:
                # A redelivery of a request that ran (or runs now) and waits for a snapshot:
                # this delivery stays unacknowledged too.
                hold(msg)
                for n in ran:
                    item, outcome = queue.unacked[n]
                    queue.unacked[n] = (Held(req, msg, item.trace), outcome)
                await msg.in_progress()
                return
            await self._late(req)  # already covered by a snapshot, or another copy: ack
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
            await self._run_ready()
            for queue in list(self.runs.values()):
                if queue.buffer.gap_open_s(now) > self.settings.gap_timeout_s:
                    await self._fail_gap(queue)
                idle_s = time.monotonic() - queue.last_ran_at
                if queue.unacked and idle_s > self.settings.snapshot_idle_s:
                    async with self._executing:
                        if self.runs.get(queue.run.run_id) is queue and not self._draining:
                            await self._commit_or_lose(queue)
            if now - last_keepalive > self.settings.ack_wait_s / 3:
                held = [i.msg for q in self.runs.values() for i in q.buffer.held()]
                held += [i.msg for q in self.runs.values() for i, _ in q.unacked]
                await asyncio.gather(*(m.in_progress() for m in held), return_exceptions=True)
                last_keepalive = now

    async def _run_ready(self) -> None:
        """Run the runs' ready requests, the next one always from the tenant whose turn it is
        (``whetstone.fairness``: one tenant's flood does not starve another's), up to
        ``FAIR_ROUND`` passes; then the loop's housekeeping, and round again. A pass is one
        request, or several runs' forward/forward_backward requests, or optim_steps, run
        together (``_pick_pass``)."""
        for _ in range(FAIR_ROUND):
            async with self._executing:  # picked and run with no run changing hands between
                if self._draining:
                    return
                ready, members = self._pick_pass()
                if not members:
                    return
                await self._report_turns(ready, members)
                if len(members) == 1:
                    await self._run_one(*members[0])
                else:
                    await self._run_pass(members)
        self._wake.set()  # more may be ready

    def _pick_pass(self) -> tuple[dict[str, Ready], list[tuple[RunQueue, Held]]]:
        """The ready heads, and the requests of the next pass taken off their buffers: the one
        whose turn it is, joined by the next turns' requests while they can share its pass
        (``passes.plan_pass``: one request per run, of one kind, up to ``pass_max_runs`` runs
        and the engine's ``micro_batch_tokens``)."""
        heads = {k: head for k, q in self.runs.items() if (head := q.buffer.peek()) is not None}
        ready = {k: Ready(self.runs[k].run.tenant, self._cost(h.req)) for k, h in heads.items()}
        after = {
            k: Ready(self.runs[k].run.tenant, self._cost(following.req))
            for k in heads
            if (following := self.runs[k].buffer.peek_after()) is not None
        }
        planned = plan_pass(
            self._fair,
            ready,
            lambda run_id: _pass_kind(heads[run_id].req),
            max_runs=self.settings.pass_max_runs,
            budget_tokens=self.engine.micro_batch_tokens,
            after=after,
        )
        return ready, [(self.runs[run_id], self._pop(run_id)) for run_id in planned]

    def _pop(self, run_id: str) -> Held:
        item = self.runs[run_id].buffer.pop_next()
        assert item is not None  # peeked just now, nothing ran in between
        return item

    def _cost(self, req: TrainRequest) -> float:
        """A request's share of the worker, for fair sharing: its tokens (a step or a save: 1)."""
        cmd = req.command
        return float(self.engine.num_tokens(cmd)) if isinstance(cmd, ForwardBackward) else 1.0

    async def _report_turns(
        self, ready: dict[str, Ready], members: list[tuple[RunQueue, Held]]
    ) -> None:
        """Futures of ready requests passed over for other tenants' turns for
        ``fair_share_report_s`` report ``paused_rate_limit``; ``active`` again when they run."""
        for _, item in members:
            if item.held_back:
                await self._tell_state(item.req.request_id, "active")
        tenants = {queue.run.tenant for queue, _ in members}
        now = time.monotonic()
        for run_id, turn in ready.items():
            if turn.tenant in tenants:
                continue
            head = self.runs[run_id].buffer.peek()
            if head is None or head.held_back:
                continue
            head.ready_since = head.ready_since or now
            if now - head.ready_since >= self.settings.fair_share_report_s:
                head.held_back = True
                await self._tell_state(head.req.request_id, "paused_rate_limit")

    async def _tell_state(self, request_id: str, state: QueueState) -> None:
        try:
            await b.set_queue_state(self.bus, request_id, state)
        except Exception as exc:  # noqa: BLE001 - a hint to the client, not worth failing for
            self.log.warning("queue state not written", request_id=request_id, error=str(exc))

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
        async with self._executing:
            for item in items:
                await self._fail_now(item, error)
                queue.unacked.append((item, error))
                queue.ran_through = item.req.seq_id + 1
            if self.runs.get(queue.run.run_id) is queue and not queue.dirty:
                await self._commit_or_lose(queue)

    async def _run_one(self, queue: RunQueue, item: Held) -> None:
        req = item.req
        token = otel_context.attach(item.trace)
        bind_work(request_id=req.request_id, run_id=req.run_id, tenant=req.tenant)
        op = _op(req)
        try:
            with self._tracer.start_as_current_span(
                f"execute {op}",
                attributes={"whetstone.run_id": req.run_id, "whetstone.seq_id": req.seq_id},
            ):
                enqueued_at = b.enqueued_at(item.msg)
                outcome = await self._with_retries(req, lambda: self._execute(req, enqueued_at))
                await self._ran(queue, item, outcome)
        finally:
            otel_context.detach(token)

    async def _run_pass(self, members: list[tuple[RunQueue, Held]]) -> None:
        """Several runs' requests of one kind through one engine call (forward/forward_backward:
        ``TrainerEngine.forward_backward_many``; optim_step: ``TrainerEngine.optim_step_many``),
        each then settled as ``_run_one`` settles a lone request: its own future, usage event,
        metrics and snapshot rule. A request that fails its checks fails alone; if the pass
        itself fails (a custom loss erring on a value, a server error), its requests run one by
        one, as a lone request is retried in place (a failed forward_backward pass left every
        gradient as it was)."""
        kind = _pass_kind(members[0][1].req)
        spans = [
            self._tracer.start_span(
                f"execute {_op(item.req)}",
                context=item.trace,
                attributes={
                    "whetstone.run_id": item.req.run_id,
                    "whetstone.seq_id": item.req.seq_id,
                    "whetstone.pass_runs": len(members),
                },
            )
            for _, item in members
        ]
        pending = [self._pending(item.req, b.enqueued_at(item.msg)) for _, item in members]
        work: Callable[[], Sequence[Result | WhetstoneError]]
        if kind == "optim_step":
            steps = [(item.req.run_id, _optim_step(item.req).adam) for _, item in members]
            work = partial(self.engine.optim_step_many, steps)
        else:
            calls = [(item.req.run_id, _forward_backward(item.req)) for _, item in members]
            work = partial(self.engine.forward_backward_many, calls)
        for _, item in members:
            metrics.IN_FLIGHT.labels("trainer", _op(item.req)).inc()
        started = time.perf_counter()
        results: Sequence[Result | WhetstoneError] | None = None
        try:
            results = await self._torch(work)
        except Exception as exc:  # noqa: BLE001 - each request is rerun alone, with retries
            self.log.warning("pass failed; its requests run one by one", error=str(exc))
        finally:
            for _, item in members:
                metrics.IN_FLIGHT.labels("trainer", _op(item.req)).dec()
        if results is None:
            for span in spans:
                span.set_attribute("whetstone.pass_failed", True)
                span.end()
            for queue, item in members:
                await self._run_one(queue, item)
            return
        ran = sum(not isinstance(r, WhetstoneError) for r in results)
        if ran:
            metrics.PASS_RUNS.labels("trainer", self.settings.base_model, kind).observe(ran)
        for (queue, item), record, result, span in zip(
            members, pending, results, spans, strict=True
        ):
            req = item.req
            token = otel_context.attach(trace.set_span_in_context(span, item.trace))
            bind_work(request_id=req.request_id, run_id=req.run_id, tenant=req.tenant)
            try:
                outcome: BaseException | None
                if isinstance(result, WhetstoneError):
                    outcome = result  # failed its checks: the pass ran without it
                else:
                    outcome = await self._with_retries(
                        req, partial(self._record, req, record, result), started
                    )
                await self._ran(queue, item, outcome)
            finally:
                span.end()
                otel_context.detach(token)

    async def _ran(self, queue: RunQueue, item: Held, outcome: BaseException | None) -> None:
        """Book a request that ran (``outcome``: None, or the error that ended it): its future
        fails at once on an error; its message is acknowledged by the snapshot that covers it,
        taken now unless the state moved since the last (or after a load, or every
        ``snapshot_every_steps``-th step)."""
        req = item.req
        if outcome is not None:
            await self._fail_now(item, outcome)
        elif isinstance(req.command, OptimStep):
            queue.dirty = True
            queue.steps_since_snapshot += 1
        elif isinstance(req.command, ForwardBackward) and not req.command.forward_only:
            queue.dirty = True
        elif isinstance(req.command, LoadWeights):
            queue.dirty = True
        queue.unacked.append((item, outcome))
        queue.ran_through = req.seq_id + 1
        queue.last_ran_at = time.monotonic()
        stepped = queue.steps_since_snapshot >= self.settings.snapshot_every_steps
        # A load replaces the whole state: snapshot it at once, so the checkpoint it came from
        # may go.
        loaded = isinstance(req.command, LoadWeights)
        if not queue.dirty or loaded or (isinstance(req.command, OptimStep) and stepped):
            await self._commit_or_lose(queue)

    async def _fail_now(self, item: Held, error: BaseException) -> None:
        """Fail the request's future at once; its message waits for the next snapshot."""
        if isinstance(error, UserError):
            message, category = error.message, "user"
        else:
            message = (
                error.message if isinstance(error, WhetstoneError) else f"internal error: {error}"
            )
            category = "server"
        await self.bus.fate.fail_from_headers(item.msg.headers or {}, message, category)

    # ------------------------------------------------------------ snapshots

    async def _write_snapshot(self, run: TrainingRunRecord, next_seq: int) -> str:
        key = snapshot_key(run.tenant, run.run_id, next_seq)
        staged = self.store.staging(key)
        await self._torch(save_snapshot, self.engine, run.run_id, staged)
        self.store.commit(staged, key)
        return key

    async def _commit_or_lose(self, queue: RunQueue) -> None:
        try:
            await self._commit(queue)
        except LostRun:
            self.log.warning("run taken by another worker; dropping it", run=queue.run.run_id)
            if queue.subscriber is not None:
                await queue.subscriber.stop()
            back = [i.msg for i in queue.buffer.clear()] + [i.msg for i, _ in queue.unacked]
            queue.unacked.clear()
            self.runs.pop(queue.run.run_id, None)
            await self._torch(self.engine.drop_run, queue.run.run_id)
            await asyncio.gather(*(m.nack() for m in back), return_exceptions=True)

    async def _commit(self, queue: RunQueue) -> None:
        """Make a snapshot cover every request that ran (a new one when the state moved since
        the last), record the run's position, then acknowledge those requests."""
        run = queue.run
        key = queue.progress.snapshot_key
        if queue.dirty:
            key = await self._write_snapshot(run, queue.ran_through)
        step = self.engine.runs[run.run_id].step
        progress = RunProgress(
            run_id=run.run_id,
            next_seq_id=queue.ran_through,
            snapshot_key=key,
            step=step,
            holder=self.settings.worker_id,
        )
        kv = self.bus.kv[s.RUN_PROGRESS_BUCKET]
        try:
            revision = await kv.update(s.token(run.run_id), progress.encode(), last=queue.revision)
        except KeyWrongLastSequenceError:
            if key != queue.progress.snapshot_key and key is not None:
                self.store.delete(key)
            raise LostRun(run.run_id) from None
        old_key = queue.progress.snapshot_key
        queue.progress, queue.revision = progress, revision
        queue.dirty, queue.steps_since_snapshot = False, 0
        if old_key and old_key != key:
            self.store.delete(old_key)
        done, queue.unacked = queue.unacked, []
        for item, outcome in done:
            await self.bus.fate.settle(item.msg, outcome, final=outcome is not None)

    # ------------------------------------------------------------ executing one request

    async def _with_retries(
        self, req: TrainRequest, work: Callable[[], Awaitable[None]], started_s: float | None = None
    ) -> BaseException | None:
        """Run ``work`` (``req``'s execution, or the writes of a result a pass computed); None on
        success, else the error that ends it (a user error at once, a server error after
        ``MAX_DELIVER`` tries in place). ``started_s``: when its pass began, for the latency."""
        for attempt in range(1, MAX_DELIVER + 1):
            started = time.perf_counter() if started_s is None else started_s
            metrics.IN_FLIGHT.labels("trainer", _op(req)).inc()
            try:
                await work()
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

    def _pending(self, req: TrainRequest, enqueued_at: datetime | None) -> FutureRecord:
        """The request's future as it starts running (its result is written over it)."""
        return FutureRecord(
            request_id=req.request_id,
            tenant=req.tenant,
            op=_op(req),
            enqueued_at=enqueued_at,
            started_at=utcnow(),
        )

    async def _execute(self, req: TrainRequest, enqueued_at: datetime | None = None) -> None:
        cmd = req.command
        if isinstance(cmd, Skip):
            return  # a refused submission's seq_id: nothing to run, nobody waiting
        pending = self._pending(req, enqueued_at)
        result: Result
        saved_bytes = 0
        if isinstance(cmd, ForwardBackward):
            result = await self._torch(self.engine.forward_backward, req.run_id, cmd)
            metrics.PASS_RUNS.labels("trainer", self.settings.base_model, _pass_kind(req)).observe(
                1
            )
        elif isinstance(cmd, OptimStep):
            result = await self._torch(self.engine.optim_step, req.run_id, cmd.adam)
            metrics.PASS_RUNS.labels("trainer", self.settings.base_model, _pass_kind(req)).observe(
                1
            )
        elif isinstance(cmd, LoadWeights):
            directory = self._checkpoint_dir(cmd.store_key, cmd.tinker_path)
            await self._torch(self.engine.load_state, req.run_id, directory, cmd.optimizer)
            result = LoadWeightsResult(path=cmd.tinker_path, model_id=req.run_id)
        else:
            result, saved_bytes = await self._save(req, cmd)
        await self._record(req, pending, result, saved_bytes)

    async def _record(
        self, req: TrainRequest, pending: FutureRecord, result: Result, saved_bytes: int = 0
    ) -> None:
        """Write the request's result and its usage event; both land before its message is
        acknowledged."""
        cmd = req.command
        writes = [b.finish_future(self.bus, pending, result)]
        if isinstance(cmd, ForwardBackward):
            meter: UsageMeter = "forward_tokens" if cmd.forward_only else "train_tokens"
            tokens = self.engine.num_tokens(cmd)
            metrics.TOKENS.labels("trainer", meter, self.settings.base_model).inc(tokens)
            writes.append(self._usage(req, {meter: tokens}))
        elif isinstance(cmd, SaveWeights) and cmd.sampler_id is None:
            # A listed checkpoint: counted and measured (priced at zero by default).
            writes.append(self._usage(req, {"checkpoints": 1, "checkpoint_bytes": saved_bytes}))
        await asyncio.gather(*writes)

    async def _usage(self, req: TrainRequest, amounts: dict[UsageMeter, int]) -> None:
        events = [
            UsageEvent.of(
                req.request_id,
                req.tenant,
                self.settings.base_model,
                meter,
                amount,
                req.run_id,
                api_key_id=req.api_key_id,
                operation=_USAGE_OPERATION.get(_op(req)),
            )
            for meter, amount in amounts.items()
        ]
        await b.publish_usage(self.bus, events)

    async def _save(self, req: TrainRequest, cmd: SaveWeights) -> tuple[SaveWeightsResult, int]:
        """Save, list the checkpoint (unless ephemeral); the result and the bytes written."""
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
                expires_at=expiry(cmd.ttl_seconds),
            )
            await b.kv_put(self.bus.kv[s.CHECKPOINTS_BUCKET], record_key(path), record)
        result = SaveWeightsResult(
            kind=cmd.kind, path=str(path), sampler_id=cmd.sampler_id, size_bytes=size
        )
        return result, size

    # ------------------------------------------------------------ shutdown

    async def stop(self) -> None:
        """Stop taking work, let the request that runs now finish, snapshot what ran (so it is
        acknowledged) and hand every request still waiting back to its queue at once (nak), for
        this worker restarted or another one. Heartbeats say ``draining`` from here on."""
        self._draining = True
        await asyncio.gather(
            *(q.subscriber.stop() for q in self.runs.values() if q.subscriber),
            return_exceptions=True,
        )
        back: list[NatsMessage] = []
        async with self._executing:
            for queue in list(self.runs.values()):
                back += [i.msg for i in queue.buffer.clear()]
                if not (queue.unacked or queue.dirty):
                    continue
                try:
                    await self._commit(queue)
                except Exception:  # noqa: BLE001 - replayed from the last snapshot instead
                    self.log.exception("no snapshot at shutdown", run=queue.run.run_id)
                    back += [i.msg for i, _ in queue.unacked]
        await asyncio.gather(*(m.nack() for m in back), return_exceptions=True)
        self.log.info("trainer drained", handed_back=len(back))


def _created(run: TrainingRunRecord) -> Result:
    """The result of a run's creation future: create_model's, or create-via-load's."""
    if run.initial is not None:
        return LoadWeightsResult(path=run.initial.tinker_path, model_id=run.run_id)
    return CreateModelResult(model_id=run.run_id)


_USAGE_OPERATION: dict[str, Operation] = {
    "forward": "forward",
    "forward_backward": "forward_backward",
    "save_weights": "save_weights",
}


def _pass_kind(req: TrainRequest) -> str | None:
    """The kind of pass ``req`` may share with other runs' requests (None: it runs alone)."""
    if isinstance(req.command, ForwardBackward):
        return "forward_backward"  # forwards too: one base-model pass
    return "optim_step" if isinstance(req.command, OptimStep) else None


def _forward_backward(req: TrainRequest) -> ForwardBackward:
    assert isinstance(req.command, ForwardBackward)  # a pass is of one kind (``_pick_pass``)
    return req.command


def _optim_step(req: TrainRequest) -> OptimStep:
    assert isinstance(req.command, OptimStep)  # a pass is of one kind (``_pick_pass``)
    return req.command


def _op(req: TrainRequest) -> str:
    cmd = req.command
    return "forward" if isinstance(cmd, ForwardBackward) and cmd.forward_only else cmd.op
