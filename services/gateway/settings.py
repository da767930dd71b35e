"""Settings of the gateway."""

from __future__ import annotations

import secrets

from pydantic import Field, model_validator

from whetstone.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    long_poll_s: float = 25.0  # retrieve_future holds this long (the SDK times out at 45 s)
    max_num_samples: int = 128
    key_cache_s: float = 30.0  # an API key's tenant is cached this long (revocation lag)
    # Quotas of a tenant's key that sets none (``quotas.py``; 0: no limit): training runs at
    # once, and requests submitted but not finished. A submission over one gets 429 with
    # Retry-After of the matching delay (the SDK waits that long before it sends it again).
    default_max_runs: int = Field(0, ge=0)
    default_max_inflight: int = Field(0, ge=0)
    inflight_retry_after_s: float = 1.0
    runs_retry_after_s: float = 5.0
    # Back-pressure (``backpressure.py``): past this many sample requests queued or running for
    # one base model (0: no limit), asample gets 429 with Retry-After and the SDK resubmits.
    sample_queue_limit: int = Field(1024, ge=0)
    sample_retry_after_s: float = 1.0
    # The SDK sends forward_backward in chunks of about 5 MB of protobuf (protocol.md 4.6), and
    # asample prompts are far smaller; 16 MiB lets every SDK request through with room to spare
    # while a runaway body is refused (413) before it is held in memory.
    max_body_bytes: int = 16 * 1024 * 1024
    # The SDK's optional sampling features, announced in client/config and dynamic_config:
    # one retrieve_futures long poll per SamplingClient instead of one retrieve_future per
    # sample, server-allocated clone ids for unpickled SamplingClients, and cancel_future.
    sample_use_retrieve_futures: bool = True
    sample_join_sampling_session: bool = True
    sample_cancel_enabled: bool = True
    # Download URLs of external weights are signed (HMAC-SHA256) with this secret and served by
    # the gateway itself. Empty: a random one per process, so URLs die with the gateway; every
    # replica behind one address must be given the same secret.
    url_signing_secret: str = Field("", repr=False)
    download_url_ttl_s: int = 3600  # how long a signed download URL stays valid
    # The SDK's JWT exchange (``jwt_auth.py``; RestClient.whoami needs it): off by default.
    # JWTs are signed with ``jwt_secret`` (empty: a random one per process; replicas behind one
    # address must share it) and live ``jwt_ttl_s``.
    jwt_auth_enabled: bool = False
    jwt_secret: str = Field("", repr=False)
    jwt_ttl_s: int = Field(900, ge=120)

    @model_validator(mode="after")
    def _signing_secret(self) -> GatewaySettings:
        if not self.url_signing_secret:
            self.url_signing_secret = secrets.token_hex(32)
        if not self.jwt_secret:
            self.jwt_secret = secrets.token_hex(32)
        return self
