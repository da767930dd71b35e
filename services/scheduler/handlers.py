"""The scheduler's bus side.

Consumes worker heartbeats (``ws.ctl.heartbeat.>``) and the durable placement queue
``ws.ctl.place`` (consumer ``scheduler``). For each new run it picks a live trainer worker that
serves the run's base model, records the placement in KV ``ws_placements`` and asks the worker
to take the run (``ws.ctl.assign.<worker>``). While no worker has room the request stays in the
queue and its future reports ``paused_capacity``; a heartbeat that brings room wakes it.
"""

from __future__ import annotations

import asyncio
import time

import nats.errors
from nats.aio.msg import Msg
from nats.js import api

from services.scheduler.placement import Placement
from services.scheduler.settings import SchedulerSettings
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.tasks import spawn
from whetstone.messages import AssignReply, AssignRun, PlaceRun, WorkerHeartbeat


class Scheduler:
    def __init__(self, settings: SchedulerSettings, bus: b.Bus, log) -> None:
        self.settings = settings
        self.bus = bus
        self.log = log
        self.placement = Placement(settings.worker_timeout_s)
        self._capacity = asyncio.Event()  # set when a heartbeat brings room for waiting runs

    async def start(self) -> None:
        await self.bus.nc.subscribe(f"{s.HEARTBEAT_PREFIX}.trainer.*", cb=self.handle_heartbeat)
        spawn(self._place_loop(), self.log, "placement")
        self.log.info("scheduler ready")

    async def handle_heartbeat(self, msg: Msg) -> None:
        if self.placement.observe(WorkerHeartbeat.decode(msg.data)):
            self._capacity.set()

    async def _place_loop(self) -> None:
        """Runs that cannot be placed wait here, unacknowledged (kept alive with in-progress
        acks), and are tried again as soon as a heartbeat brings capacity, not on a timer."""
        ack_wait_s = 120.0
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait_s)
        sub = await self.bus.js.pull_subscribe(
            s.PLACE_SUBJECT, durable=s.SCHEDULER_CONSUMER, stream=s.CONTROL_STREAM, config=config
        )
        waiting: dict[str, tuple[PlaceRun, Msg]] = {}
        last_keepalive = last_retry = time.monotonic()
        while True:
            fresh = await b.fetch(sub, 16, self.settings.poll_interval_s if waiting else 1.0, self.log)
            # Retry on new capacity, and now and then anyway (a worker that did not answer).
            retry = self._capacity.is_set() or time.monotonic() - last_retry > self.settings.retry_interval_s
            self._capacity.clear()
            if retry:
                last_retry = time.monotonic()
            todo = [(PlaceRun.decode(m.data), m) for m in fresh] + (list(waiting.values()) if retry else [])
            for request, msg in todo:
                if await self.place(request):
                    await msg.ack()
                    waiting.pop(request.request_id, None)
                else:
                    waiting[request.request_id] = (request, msg)
            if waiting and time.monotonic() - last_keepalive > ack_wait_s / 4:
                await asyncio.gather(*(m.in_progress() for _, m in waiting.values()))
                last_keepalive = time.monotonic()

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
            reply_msg = await self.bus.nc.request(
                s.assign_subject(worker_id), AssignRun(request_id=request.request_id, run=run).encode(),
                timeout=self.settings.assign_timeout_s,
            )
            reply = AssignReply.decode(reply_msg.data)
        except nats.errors.Error as exc:
            self.log.warning("assignment unanswered", run=run.run_id, worker=worker_id, error=str(exc))
            self.placement.release(worker_id, run.run_id)
            return False
        if not reply.ok:
            self.log.warning("assignment refused", run=run.run_id, worker=worker_id, error=reply.error)
            self.placement.release(worker_id, run.run_id)
        self.log.info("run placed", run=run.run_id, worker=worker_id, ok=reply.ok)
        return reply.ok
