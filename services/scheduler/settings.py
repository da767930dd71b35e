"""Settings of the scheduler."""

from __future__ import annotations

from whetstone.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    worker_timeout_s: float = 5.0  # a worker is live while its last heartbeat is this recent
    assign_timeout_s: float = 60.0  # creating an adapter on a busy worker may take a while
    poll_interval_s: float = 0.05  # how often new requests are pulled while others wait
    retry_interval_s: float = 2.0  # waiting runs are retried at least this often
    sweep_interval_s: float = 1.0  # placements are checked against the bus this often
    # A session whose heartbeats stopped this long ago is ended and its runs unloaded (the SDK
    # beats every 10 s); the runs' snapshots stay, and a request to one loads it again.
    session_ttl_s: float = 600.0
    # Checkpoints past their TTL are deleted (record and files) by a sweep this often.
    checkpoint_sweep_interval_s: float = 60.0
    # The active replica renews its lease every third of this; a standby takes over once the
    # lease has not been renewed for this long.
    lease_ttl_s: float = 6.0
