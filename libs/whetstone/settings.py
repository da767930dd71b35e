"""Settings every service shares. Each service's ``settings.py`` extends ``ServiceSettings``;
``__main__`` reads them once (from ``WHETSTONE_*`` environment variables) and passes them down."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from whetstone.checkpoints import LocalCheckpointStore
from whetstone.models.registry import ModelRegistry, default_registry


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WHETSTONE_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    state_dir: Path = Path(".whetstone")
    models_dir: Path = Path.home() / ".cache" / "whetstone" / "models"
    log_level: str = "INFO"
    worker_id: str = ""  # filled in by the worker services when empty

    @property
    def checkpoints_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    def checkpoint_store(self) -> LocalCheckpointStore:
        return LocalCheckpointStore(self.checkpoints_dir)

    def registry(self) -> ModelRegistry:
        return default_registry(self.models_dir)
