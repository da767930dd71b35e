"""Settings of a sampler worker."""

from __future__ import annotations

from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.settings import ServiceSettings


class SamplerSettings(ServiceSettings):
    base_model: str = BUILTIN_MODEL_NAME
    device: str = ""  # empty: the registry entry's device
    torch_threads: int = 0  # intra-op threads for torch on CPU (0: torch's default)
    max_batch_requests: int = 32  # sample requests decoded together in one batch
    max_adapters: int = 32  # LoRA adapters kept loaded (least recently used evicted)
    # Full prompt blocks kept for later requests (None: half the KV cache; 0: no prefix cache).
    prefix_cache_blocks: int | None = None
    ack_wait_s: float = 300.0
    heartbeat_interval_s: float = 1.0
    # How often queued and running sampling is checked against its sessions: an ended one's is
    # cancelled, as is that of a session whose heartbeats stopped session_ttl_s ago.
    session_check_s: float = 2.0
    session_ttl_s: float = 600.0
    # A request passed over for other tenants' this long (fair sharing) reports paused_rate_limit.
    fair_share_report_s: float = 1.0
