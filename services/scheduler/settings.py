"""Settings of the scheduler."""

from __future__ import annotations

from whetstone.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    worker_timeout_s: float = 5.0  # a worker is live while its last heartbeat is this recent
    assign_timeout_s: float = 60.0  # creating an adapter on a busy worker may take a while
    poll_interval_s: float = 0.05  # how often new requests are pulled while others wait
    retry_interval_s: float = 2.0  # waiting runs are retried at least this often
