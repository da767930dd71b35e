"""Settings of the scheduler."""

from __future__ import annotations

from whetstone.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    worker_timeout_s: float = 5.0  # a worker is live while its last heartbeat is this recent
    assign_timeout_s: float = 60.0  # creating an adapter on a busy worker may take a while
    retry_delay_s: float = 0.5  # placement retry while no worker has room
