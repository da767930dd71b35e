"""Settings of a trainer worker."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    base_model: str = BUILTIN_MODEL_NAME  # the one base model this worker holds
    device: str = ""  # empty: the registry entry's device
    torch_threads: int = 0  # intra-op threads for torch on CPU (0: torch's default)
    max_runs: int = 64  # LoRA adapters (with optimizer state) held at once
    # The most tokens one forward/backward pass takes; a larger forward_backward is split into
    # micro-batches of whole datums with gradient accumulation (halved on out-of-memory).
    micro_batch_tokens: int = Field(default=16_384, ge=1)
    # The most runs whose ready forward/forward_backward requests go through one base-model pass
    # together (each its own adapter, loss and results), within micro_batch_tokens, and whose
    # ready optim_steps go through one optimizer call; 1: one request per pass.
    pass_max_runs: int = Field(default=8, ge=1)
    compile: bool = True  # torch.compile each decoder layer (CUDA only; CPU always runs eagerly)
    # Activation checkpointing of each decoder layer: GEMM and attention outputs kept, pointwise
    # work recomputed ("selective"), the whole layer recomputed ("full"), or nothing ("none").
    checkpointing: Literal["none", "selective", "full"] = "selective"
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
    # A ready request passed over this long for other tenants' turns (fair sharing,
    # ``whetstone.fairness``) has its future report paused_rate_limit until it runs.
    fair_share_report_s: float = 1.0
