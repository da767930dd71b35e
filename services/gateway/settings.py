"""Settings of the gateway."""

from __future__ import annotations

from whetstone.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    long_poll_s: float = 25.0  # retrieve_future holds this long (the SDK times out at 45 s)
    max_num_samples: int = 128
    key_cache_s: float = 30.0  # an API key's tenant is cached this long (revocation lag)
    # The SDK sends forward_backward in chunks of about 5 MB of protobuf (protocol.md 4.6), and
    # asample prompts are far smaller; 16 MiB lets every SDK request through with room to spare
    # while a runaway body is refused (413) before it is held in memory.
    max_body_bytes: int = 16 * 1024 * 1024
