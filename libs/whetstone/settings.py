"""Settings every service shares. Each service's ``settings.py`` extends ``ServiceSettings``;
``__main__`` reads them once (from ``WHETSTONE_*`` environment variables) and passes them down."""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from whetstone.checkpoints import LocalCheckpointStore
from whetstone.models.registry import ModelRegistry, load_registry


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WHETSTONE_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    state_dir: Path = Path(".whetstone")
    models_dir: Path = Path.home() / ".cache" / "whetstone" / "models"
    # The operator's TOML registry of served base models (deploy/models.example.toml); None:
    # only the built-in model, on the CPU.
    models_file: Path | None = None
    log_level: str = "INFO"
    worker_id: str = ""  # filled in by the worker services when empty
    # The HTTP port of /metrics, /livez and /readyz of a bus service (0: any free port, logged).
    metrics_port: int = 0

    @field_validator("models_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # ``WHETSTONE_MODELS_FILE=`` (set but empty) means no file, not the current directory.
        return None if value == "" else value

    @property
    def checkpoints_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    def checkpoint_store(self) -> LocalCheckpointStore:
        return LocalCheckpointStore(self.checkpoints_dir)

    def registry(self) -> ModelRegistry:
        """The served base models; a bad models file raises ``RegistryError`` (at start-up)."""
        return load_registry(self.models_dir, self.models_file)
