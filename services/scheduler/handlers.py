"""The scheduler's bus side.

Consumes worker heartbeats (``ws.ctl.heartbeat.trainer.*``, core NATS) and the durable placement
queue ``ws.ctl.place`` (consumer ``scheduler``). For each new run it picks a live trainer worker
that serves the run's base model, records the placement in KV ``ws_placements`` and asks the
worker to take the run (``ws.ctl.assign.<worker>``, request/reply).

While no worker has room, the request is held unacknowledged (``fate.hold``, kept alive with
in-progress acks) and its future reports ``paused_capacity``; a heartbeat that brings room wakes
the retry loop at once, and a timer retries now and then anyway (a worker that did not answer).

Every ``sweep_interval_s`` (and at once when a worker starts draining) the active scheduler
brings placements in line with the bus (``sweep.py``): it moves the runs of workers that died or
drain (``ws.ctl.assign.<worker>``), unloads the runs of sessions that finished or whose
heartbeats stopped ``session_ttl_s`` ago (``ws.ctl.release.<worker>``, marking an expired
session finished in ``ws_sessions``), places again an unloaded run whose queue has requests, and
publishes the queue depth per base model (``whetstone_queue_depth``; the time runs waited for
room goes to ``whetstone_queue_wait_seconds``). Every ``checkpoint_sweep_interval_s`` it deletes
the checkpoints whose TTL has passed: their record in KV ``ws_checkpoints`` (compare-and-set, so
a checkpoint saved again or given a new TTL meanwhile stays) and then their files.

Replicas: only the holder of the lease in KV ``ws_scheduler`` (``lease.py``) consumes
``ws.ctl.place`` and sweeps; the others listen to heartbeats (so they know the workers when they
take over) and renew their claim. A replica that takes over recreates the placement consumer, so
the requests its dead predecessor held come back at once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import nats.errors
import structlog
from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from services.scheduler.lease import LeaderLease
from services.scheduler.placement import Placement
from services.scheduler.settings import SchedulerSettings
from services.scheduler.sweep import (
    Action,
    Assign,
    Discard,
    Expire,
    Load,
    Move,
    Unload,
    expired_checkpoints,
    plan,
)
from whetstone import audit, metrics
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.fate import Delivered, consumer_config, decoder_for, hold
from whetstone.messages import (
    AssignReply,
    AssignRun,
    CheckpointRecord,
    Message,
    PlaceRun,
    ReleaseRun,
    SessionRecord,
    TrainingRunRecord,
    WorkerHeartbeat,
    utcnow,
)
from whetstone.tasks import spawn

PLACE_ACK_WAIT_S = 120.0


class Scheduler:
    def __init__(
        self, settings: SchedulerSettings, bus: b.Bus, log: structlog.stdlib.BoundLogger
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.log = log
        self.placement = Placement(settings.worker_timeout_s)
        holder = settings.worker_id or "scheduler"
        self.lease = LeaderLease(bus.kv.get(s.SCHEDULER_BUCKET), holder, settings.lease_ttl_s)
        self._capacity = asyncio.Event()  # set when a heartbeat brings room for waiting runs
        self._sweep_now = asyncio.Event()  # set when a worker starts draining
        self._waiting: dict[str, tuple[PlaceRun, NatsMessage, float]] = {}
        self._runs: dict[str, TrainingRunRecord] = {}  # run records never change
        self._models: set[str] = set()  # base models whose queue depth is published
        self._place_sub: object | None = None
        self.store = settings.checkpoint_store()
        self._checkpoints_swept_at = 0.0  # monotonic

    async def declare(self) -> None:
        await b.subscribe(
            self.bus,
            self.handle_heartbeat,
            f"{s.HEARTBEAT_PREFIX}.trainer.*",
            decoder=decoder_for(WorkerHeartbeat),
            title="trainer heartbeats",
            no_reply=True,  # never answer the writer: a KV put awaits its ack on the reply subject
        )
        self._place_sub = await b.subscribe(
            self.bus,
            self.handle_place,
            s.PLACE_SUBJECT,
            stream=JStream(s.CONTROL_STREAM, declare=False),
            durable=s.SCHEDULER_CONSUMER,
            pull_sub=PullSub(batch_size=16, timeout=1.0),
            config=consumer_config(PLACE_ACK_WAIT_S),
            ack_policy=AckPolicy.MANUAL,
            decoder=decoder_for(PlaceRun),
            title="run placement",  # consumed by the active replica only
        )

    async def start(self) -> None:
        if await self.lease.tick():
            await self._lead()
        else:
            await self._place_sub.stop()  # type: ignore[union-attr]
            self.log.info("scheduler on standby", holder=self.lease.holder)
        spawn(self._lease_loop(), self.log, "leader lease")
        spawn(self._retry_loop(), self.log, "placement retries")
        spawn(self._sweep_loop(), self.log, "placement sweeps")
        self.log.info("scheduler ready", leader=self.lease.leader)

    async def stop(self) -> None:
        """Hand waiting requests back to the stream at once and give the lease up, so that a
        standby takes over without waiting for it to lapse."""
        await self._follow()
        await self.lease.give_up()

    # ------------------------------------------------------------ leadership

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_ttl_s / 3)
            was = self.lease.leader
            try:
                now = await self.lease.tick()
            except (nats.errors.Error, TimeoutError) as exc:  # NATS away: not the leader then
                self.log.warning("lease not renewed", error=str(exc))
                now = self.lease.leader = False
            if now and not was:
                await self._lead()
            elif was and not now:
                self.log.warning("lease lost; on standby")
                await self._follow()

    async def _lead(self) -> None:
        """Become the active replica: take the placement queue over from any predecessor."""
        await self._place_sub.stop()  # type: ignore[union-attr]
        try:  # what a dead predecessor held comes back now, not after its ack wait
            await self.bus.js.delete_consumer(s.CONTROL_STREAM, s.SCHEDULER_CONSUMER)
        except NotFoundError:
            pass
        await self._place_sub.start()  # type: ignore[union-attr]
        self._sweep_now.set()
        self.log.info("scheduler active", holder=self.lease.holder)

    async def _follow(self) -> None:
        await self._place_sub.stop()  # type: ignore[union-attr]
        waiting, self._waiting = self._waiting, {}
        await asyncio.gather(*(m.nack() for _, m, _ in waiting.values()), return_exceptions=True)

    # ------------------------------------------------------------ placement requests

    async def handle_heartbeat(self, beat: WorkerHeartbeat) -> None:
        if self.placement.observe(beat):
            self._capacity.set()  # the retry loop places waiting runs first, then wakes the sweep

    async def handle_place(self, request: PlaceRun, msg: Delivered) -> None:
        hold(msg)
        if not self.lease.leader:  # pulled in the moment before a standby stopped pulling
            await msg.nack()
            return
        if await self.place(request):
            await self.bus.fate.settle(msg, None)
        else:  # waits for capacity, unacknowledged: a restart of ours loses nothing
            self._waiting[request.request_id] = (request, msg, time.monotonic())

    async def _retry_loop(self) -> None:
        last_keepalive = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._capacity.wait(), self.settings.retry_interval_s)
            except TimeoutError:
                pass
            woken = self._capacity.is_set()
            self._capacity.clear()
            for request_id, (request, msg, since) in list(self._waiting.items()):
                if self.lease.leader and await self.place(request):
                    self._waiting.pop(request_id, None)
                    await self.bus.fate.settle(msg, None)
                    metrics.QUEUE_WAIT.labels(
                        "scheduler", "capacity", request.run.base_model
                    ).observe(time.monotonic() - since)
            if woken:  # new capacity: runs of dead workers may now move (after the queue)
                self._sweep_now.set()
            if self._waiting and time.monotonic() - last_keepalive > PLACE_ACK_WAIT_S / 4:
                await asyncio.gather(*(m.in_progress() for _, m, _ in self._waiting.values()))
                last_keepalive = time.monotonic()

    async def place(self, request: PlaceRun) -> bool:
        """Place one run; False when it must wait (no capacity, or the worker did not answer)."""
        run = request.run
        placements = self.bus.kv[s.PLACEMENTS_BUCKET]
        chosen = self.placement.choose(run.base_model) or ""
        # One round trip on the common path: the record is created naming the chosen worker.
        entry = await b.kv_create(placements, s.token(run.run_id), chosen.encode())
        worker_id = entry.decode() if entry is not None else chosen
        if not worker_id or not self.placement.is_live(worker_id):
            worker_id = chosen
            if not worker_id:
                await b.set_queue_state(self.bus, request.request_id, "paused_capacity")
                return False
            await placements.put(s.token(run.run_id), worker_id.encode())
        return await self._assign(run, worker_id, request.request_id)

    async def _assign(self, run: TrainingRunRecord, worker_id: str, request_id: str | None) -> bool:
        self.placement.reserve(worker_id, run.run_id)
        message = AssignRun(request_id=request_id, run=run)
        reply = await self._ask(s.assign_subject(worker_id), message, run.run_id, worker_id)
        if not reply.ok:
            self.placement.release(worker_id, run.run_id)
        self.log.info("run placed", run=run.run_id, worker=worker_id, ok=reply.ok)
        return reply.ok

    async def _ask(
        self, subject: str, message: Message, run_id: str, worker_id: str
    ) -> AssignReply:
        """A request/reply to a worker; an unanswered one counts as refused."""
        try:
            reply_msg = await self.bus.broker.request(  # through the broker: traced
                message.encode(),
                subject,
                headers={"content-type": "application/json"},
                timeout=self.settings.assign_timeout_s,
            )
            reply = AssignReply.decode(reply_msg.body)
        except (nats.errors.Error, TimeoutError) as exc:
            reply = AssignReply(ok=False, error=f"unanswered: {exc}")
        if not reply.ok:
            self.log.warning("worker refused", subject=subject, run=run_id, error=reply.error)
        return reply

    # ------------------------------------------------------------ sweeps

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._sweep_now.wait(), self.settings.sweep_interval_s)
            except TimeoutError:
                pass
            self._sweep_now.clear()
            if not self.lease.leader:
                continue
            try:
                await self.sweep()
                if (
                    time.monotonic() - self._checkpoints_swept_at
                    >= self.settings.checkpoint_sweep_interval_s
                ):
                    self._checkpoints_swept_at = time.monotonic()
                    await self.expire_checkpoints()
            except (nats.errors.Error, TimeoutError) as exc:  # NATS away: the next sweep retries
                self.log.warning("sweep failed", error=str(exc))

    async def expire_checkpoints(self, wall_now: datetime | None = None) -> int:
        """Delete every checkpoint whose TTL has passed (at ``wall_now``, default now): its
        record (compare-and-set), then its files. Returns how many went."""
        kv = self.bus.kv[s.CHECKPOINTS_BUCKET]
        deleted = 0
        checkpoints = await b.kv_records(self.bus, s.CHECKPOINTS_BUCKET, CheckpointRecord)
        for action in expired_checkpoints(checkpoints, wall_now or utcnow()):
            try:
                await kv.delete(action.key, last=action.revision)
            except KeyWrongLastSequenceError:
                continue  # saved again or given a new TTL meanwhile: the next sweep looks again
            await asyncio.to_thread(self.store.delete, action.record.store_key)
            deleted += 1
            self.log.info("checkpoint expired", checkpoint=action.record.tinker_path)
            await audit.record(
                self.bus,
                "checkpoint_deleted",
                action.record.tenant,
                model_id=action.record.run_id,
                tinker_path=action.record.tinker_path,
                reason="expired",
            )
        return deleted

    async def sweep(self) -> None:
        """One pass of ``sweep.plan`` over the bus's current state, and its actions."""
        placements = await self._placements()
        queued = await self._queued()
        runs = {r: run for r in set(placements) | set(queued) if (run := await self._run(r))}
        sessions: dict[str, SessionRecord] = {}
        for session_id in {run.session_id for run in runs.values()}:
            record = await b.kv_get(
                self.bus.kv[s.SESSIONS_BUCKET], s.token(session_id), SessionRecord
            )
            if record is not None:
                sessions[session_id] = record
        self._publish_depths(runs, queued)
        actions = plan(
            placements,
            runs,
            sessions,
            queued,
            self.placement,
            time.monotonic(),
            utcnow(),
            self.settings.session_ttl_s,
        )
        for action in actions:
            if not self.lease.leader:
                return
            await self._act(action)

    async def _act(self, action: Action) -> None:
        placements = self.bus.kv[s.PLACEMENTS_BUCKET]
        if isinstance(action, Expire):
            await self._expire(action.session_id)
        elif isinstance(action, Unload):
            run_id = action.run.run_id
            if not action.worker_gone:
                release = ReleaseRun(run_id=run_id)
                subject = s.release_subject(action.worker_id)
                if not (await self._ask(subject, release, run_id, action.worker_id)).ok:
                    return
            await _delete(placements, s.token(run_id), action.revision)
            self.placement.release(action.worker_id, run_id)
            self.log.info("run unloaded", run=run_id, worker=action.worker_id)
        elif isinstance(action, Move | Load):
            run = action.run
            target = self.placement.choose(run.base_model)
            if target is None:
                self.log.warning("no worker to take the run", run=run.run_id)
                return
            try:
                if isinstance(action, Move):
                    await placements.update(
                        s.token(run.run_id), target.encode(), last=action.revision
                    )
                else:
                    await placements.create(s.token(run.run_id), target.encode())
            except KeyWrongLastSequenceError:
                return  # placed meanwhile (a placement request): the next sweep looks again
            self.log.info(
                "moving run" if isinstance(action, Move) else "loading run",
                run=run.run_id,
                worker=target,
            )
            await self._assign(run, target, None)
        elif isinstance(action, Assign):
            await self._assign(action.run, action.worker_id, None)
        elif isinstance(action, Discard):
            entry = await placements.get(s.token(action.run_id))
            if (entry.value or b"").decode() not in ("", action.worker_id):
                release = ReleaseRun(run_id=action.run_id, discard=True)
                subject = s.release_subject(action.worker_id)
                await self._ask(subject, release, action.run_id, action.worker_id)

    async def _expire(self, session_id: str) -> None:
        """Mark a silent session finished (compare-and-set: a heartbeat that lands first wins)."""
        kv = self.bus.kv[s.SESSIONS_BUCKET]
        try:
            entry = await kv.get(s.token(session_id))
        except NotFoundError:
            return
        record = SessionRecord.decode(entry.value or b"")
        silent_s = (utcnow() - record.last_heartbeat_at).total_seconds()
        if record.finished or silent_s <= self.settings.session_ttl_s:
            return
        ended = record.model_copy(update={"finished": True})
        try:
            await kv.update(s.token(session_id), ended.encode(), last=entry.revision)
        except KeyWrongLastSequenceError:
            return
        self.log.info("session expired", session=session_id, silent_s=round(silent_s, 1))

    async def _placements(self) -> dict[str, tuple[str, int]]:
        kv = self.bus.kv[s.PLACEMENTS_BUCKET]
        try:
            keys = await kv.keys()
        except Exception:  # noqa: BLE001 - NoKeysError: nothing placed
            return {}
        out: dict[str, tuple[str, int]] = {}
        for key in keys:
            try:
                entry = await kv.get(key)
            except NotFoundError:
                continue
            out[s.untoken(key)] = ((entry.value or b"").decode(), entry.revision or 0)
        return out

    async def _queued(self) -> dict[str, int]:
        """Requests waiting (or held, unacknowledged) per run, from the train stream."""
        info = await self.bus.js.stream_info(s.TRAIN_STREAM, subjects_filter=f"{s.TRAIN_PREFIX}.>")
        counts = info.state.subjects or {}
        prefix = f"{s.TRAIN_PREFIX}."
        return {s.untoken(subj[len(prefix) :]): n for subj, n in counts.items()}

    async def _run(self, run_id: str) -> TrainingRunRecord | None:
        run = self._runs.get(run_id)
        if run is None:
            run = await b.kv_get(self.bus.kv[s.RUNS_BUCKET], s.token(run_id), TrainingRunRecord)
            if run is not None:
                self._runs[run_id] = run
        return run

    def _publish_depths(self, runs: dict[str, TrainingRunRecord], queued: dict[str, int]) -> None:
        train: dict[str, int] = dict.fromkeys(self._models, 0)
        place: dict[str, int] = dict.fromkeys(self._models, 0)
        for run_id, count in queued.items():
            if run_id in runs:
                model = runs[run_id].base_model
                train[model] = train.get(model, 0) + count
        for request, _, _ in self._waiting.values():
            model = request.run.base_model
            place[model] = place.get(model, 0) + 1
        for model in set(train) | set(place):
            metrics.QUEUE_DEPTH.labels("scheduler", "train", model).set(train.get(model, 0))
            metrics.QUEUE_DEPTH.labels("scheduler", "capacity", model).set(place.get(model, 0))
        self._models |= set(train) | set(place)


async def _delete(kv: object, key: str, revision: int) -> None:
    try:
        await kv.delete(key, last=revision)  # type: ignore[attr-defined]
    except KeyWrongLastSequenceError:
        pass  # placed again meanwhile: that placement stands
