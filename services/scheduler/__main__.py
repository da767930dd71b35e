"""Scheduler: ``python -m services.scheduler``. Places training runs on trainer workers."""

from __future__ import annotations

import asyncio

from services.scheduler.handlers import Scheduler
from services.scheduler.settings import SchedulerSettings
from whetstone import bus as b
from whetstone.observability import configure_logging


async def main() -> None:
    settings = SchedulerSettings()
    log = configure_logging("scheduler", settings.log_level)
    bus = await b.connect(settings.nats_url, "scheduler")
    await Scheduler(settings, bus, log).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
