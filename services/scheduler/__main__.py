"""Scheduler: ``python -m services.scheduler``. Places training runs on trainer workers; start
several for a standby (one is active at a time, see ``handlers.py``)."""

from __future__ import annotations

import asyncio
import os
import socket

from services.scheduler.handlers import Scheduler
from services.scheduler.settings import SchedulerSettings
from whetstone import bus as b
from whetstone.observability import configure_logging
from whetstone.service import serve


async def main() -> None:
    settings = SchedulerSettings()
    # Unique per process: a restarted replica competes for the lease like any standby.
    settings.worker_id = settings.worker_id or f"scheduler-{socket.gethostname()}-{os.getpid()}"
    log = configure_logging("scheduler", settings.log_level)
    bus = await b.connect(settings.nats_url, "scheduler", service="scheduler")
    scheduler = Scheduler(settings, bus, log)
    await scheduler.declare()
    await serve(bus, settings.metrics_port, log, on_start=scheduler.start, on_stop=scheduler.stop)


if __name__ == "__main__":
    asyncio.run(main())
