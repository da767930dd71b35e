"""The scheduler's bus side.

Consumes worker heartbeats (``ws.ctl.heartbeat.trainer.*``, core NATS) and the durable placement
queue ``ws.ctl.place`` (consumer ``scheduler``). For each new run it picks a live trainer worker
that serves the run's base model, records the placement in KV ``ws_placements`` and asks the
worker to take the run (``ws.ctl.assign.<worker>``, request/reply).

While no worker has room, the request is held unacknowledged (``fate.hold``, kept alive with
in-progress acks) and its future reports ``paused_capacity``; a heartbeat that brings room wakes
the retry loop at once, and a timer retries now and then anyway (a worker that did not answer).
"""

from __future__ import annotations

import asyncio
import time

import nats.errors
import structlog
from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub

from services.scheduler.placement import Placement
from services.scheduler.settings import SchedulerSettings
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.fate import consumer_config, decoder_for, hold
from whetstone.messages import AssignReply, AssignRun, PlaceRun, WorkerHeartbeat
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
        self._capacity = asyncio.Event()  # set when a heartbeat brings room for waiting runs
        self._waiting: dict[str, tuple[PlaceRun, NatsMessage]] = {}

    async def declare(self) -> None:
        await b.subscribe(
            self.bus,
            self.handle_heartbeat,
            f"{s.HEARTBEAT_PREFIX}.trainer.*",
            decoder=decoder_for(WorkerHeartbeat),
            title="trainer heartbeats",
            no_reply=True,  # never answer the writer: a KV put awaits its ack on the reply subject
        )
        await b.subscribe(
            self.bus,
            self.handle_place,
            s.PLACE_SUBJECT,
            stream=JStream(s.CONTROL_STREAM, declare=False),
            durable=s.SCHEDULER_CONSUMER,
            pull_sub=PullSub(batch_size=16, timeout=1.0),
            config=consumer_config(PLACE_ACK_WAIT_S),
            ack_policy=AckPolicy.MANUAL,
            decoder=decoder_for(PlaceRun),
            title="run placement",
        )

    async def start(self) -> None:
        spawn(self._retry_loop(), self.log, "placement retries")
        self.log.info("scheduler ready")

    async def handle_heartbeat(self, beat: WorkerHeartbeat) -> None:
        if self.placement.observe(beat):
            self._capacity.set()

    async def handle_place(self, request: PlaceRun, msg: NatsMessage) -> None:
        if not await self.place(request):
            hold(msg)  # waits for capacity, unacknowledged: a restart of ours loses nothing
            self._waiting[request.request_id] = (request, msg)

    async def _retry_loop(self) -> None:
        last_keepalive = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._capacity.wait(), self.settings.retry_interval_s)
            except TimeoutError:
                pass
            self._capacity.clear()
            for request_id, (request, msg) in list(self._waiting.items()):
                if await self.place(request):
                    self._waiting.pop(request_id, None)
                    await self.bus.fate.settle(msg, None)
            if self._waiting and time.monotonic() - last_keepalive > PLACE_ACK_WAIT_S / 4:
                await asyncio.gather(*(m.in_progress() for _, m in self._waiting.values()))
                last_keepalive = time.monotonic()

    async def stop(self) -> None:
        """Hand waiting requests back to the stream at once (a standby scheduler takes them)."""
        waiting, self._waiting = self._waiting, {}
        await asyncio.gather(*(m.nack() for _, m in waiting.values()), return_exceptions=True)

    async def place(self, request: PlaceRun) -> bool:
        """Place one run; False when it must wait (no capacity, or the worker did not answer)."""
        run = request.run
        placements = self.bus.kv[s.PLACEMENTS_BUCKET]
        entry = await b.kv_create(placements, s.token(run.run_id), b"")
        worker_id = entry.decode() if entry else ""
        if not worker_id or not self.placement.is_live(worker_id):
            worker_id = self.placement.choose(run.base_model) or ""
            if not worker_id:
                await b.set_queue_state(self.bus, request.request_id, "paused_capacity")
                return False
            await placements.put(s.token(run.run_id), worker_id.encode())
        self.placement.reserve(worker_id, run.run_id)
        try:
            reply_msg = await self.bus.broker.request(  # through the broker: traced
                AssignRun(request_id=request.request_id, run=run).encode(),
                s.assign_subject(worker_id),
                headers={"content-type": "application/json"},
                timeout=self.settings.assign_timeout_s,
            )
            reply = AssignReply.decode(reply_msg.body)
        except (nats.errors.Error, TimeoutError) as exc:
            self.log.warning(
                "assignment unanswered", run=run.run_id, worker=worker_id, error=str(exc)
            )
            self.placement.release(worker_id, run.run_id)
            return False
        if not reply.ok:
            self.log.warning(
                "assignment refused", run=run.run_id, worker=worker_id, error=reply.error
            )
            self.placement.release(worker_id, run.run_id)
        self.log.info("run placed", run=run.run_id, worker=worker_id, ok=reply.ok)
        return reply.ok
