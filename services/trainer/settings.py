"""Settings of a trainer worker."""

from __future__ import annotations

from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    base_model: str = BUILTIN_MODEL_NAME  # the one base model this worker holds
    device: str = ""  # empty: the registry entry's device
    torch_threads: int = 0  # intra-op threads for torch on CPU (0: torch's default)
    max_runs: int = 64  # LoRA adapters (with optimizer state) held at once
    heartbeat_interval_s: float = 1.0
    ack_wait_s: float = 600.0  # a request held in the reorder buffer stays unacknowledged this long
    fetch_batch: int = 64
    # A missing seq_id that holds later requests back this long fails them (the client spent
    # it on a call that never reached the run's queue).
    gap_timeout_s: float = 120.0
    # A run is snapshotted after every this many optim_steps (its requests are acknowledged only
    # then; a failover replays the ones since), and when it has had unacknowledged requests and
    # no work for snapshot_idle_s.
    snapshot_every_steps: int = 1
    snapshot_idle_s: float = 2.0
