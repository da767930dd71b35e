"""The model registry: which base models this deployment serves, by name and by directory.

A Tinker client names its base model (``create_lora_training_client(base_model=...)``); the
gateway resolves that name here before anything is scheduled, so an unknown model fails fast as
a user error (:class:`whetstone.errors.UnknownModel`) instead of deep inside a worker. Workers
resolve the same name to the Hugging Face directory they load.

A :class:`ModelSpec` is the few facts the control plane needs without loading weights: where the
model lives, its context length and vocabulary size (to validate token ids and lengths early),
and the largest LoRA rank it accepts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from whetstone.errors import UnknownModel
from whetstone.models.builtin import BUILTIN_MODEL_NAME, ensure_builtin_model

DEFAULT_MAX_LORA_RANK = 64


@dataclass(frozen=True)
class ModelSpec:
    """One servable base model.

    ``name`` is what clients send; ``path`` the Hugging Face directory (config, tokenizer,
    safetensors); ``context_length`` the most tokens in one sequence; ``vocab_size`` the number
    of token ids; ``max_lora_rank`` the largest adapter rank we accept; ``arch`` the HF
    ``model_type``.
    """

    name: str
    path: Path
    context_length: int
    vocab_size: int
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    arch: str = "qwen3"

    @classmethod
    def from_dir(
        cls, name: str, path: Path, *, max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    ) -> ModelSpec:
        """Read the spec from ``path/config.json`` (no weights are loaded).

        A missing directory raises ``FileNotFoundError``: it is a deployment mistake, not a
        client's, so it must not surface as a user error.
        """
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        return cls(
            name=name,
            path=path,
            context_length=int(config["max_position_embeddings"]),
            vocab_size=int(config["vocab_size"]),
            max_lora_rank=max_lora_rank,
            arch=str(config.get("model_type", "qwen3")),
        )


class ModelRegistry:
    """Specs by name. Resolves a client's ``base_model`` given as a name or a directory path."""

    def __init__(self, specs: list[ModelSpec] | None = None) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs or []:
            self.register(spec)

    def register(self, spec: ModelSpec) -> None:
        """Add ``spec``; a name served twice is a configuration bug, so it raises ``ValueError``."""
        if spec.name in self._specs:
            raise ValueError(f"base model {spec.name!r} registered twice")
        self._specs[spec.name] = spec

    def resolve(self, name_or_path: str) -> ModelSpec:
        """The spec registered as ``name_or_path``, or whose directory it names.

        Paths compare after ``resolve()`` so that relative paths, ``~`` and symlinks all match the
        served directory; a path we do not serve is as unknown as a wrong name.
        """
        spec = self._specs.get(name_or_path)
        if spec is not None:
            return spec
        try:
            wanted = Path(name_or_path).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            wanted = None
        if wanted is not None:
            for spec in self._specs.values():
                if spec.path.expanduser().resolve() == wanted:
                    return spec
        served = ", ".join(sorted(self._specs)) or "none"
        raise UnknownModel(f"unknown base model {name_or_path!r}; served: {served}")

    def __contains__(self, name_or_path: object) -> bool:
        if not isinstance(name_or_path, str):
            return False
        try:
            self.resolve(name_or_path)
        except UnknownModel:
            return False
        return True

    def names(self) -> list[str]:
        """Registered names, sorted (what the gateway lists as supported models)."""
        return sorted(self._specs)

    def specs(self) -> list[ModelSpec]:
        """Registered specs, sorted by name."""
        return [self._specs[name] for name in self.names()]


def default_registry(cache_dir: Path) -> ModelRegistry:
    """A registry serving only the built-in tiny Qwen3, generating it under ``cache_dir``."""
    path = ensure_builtin_model(cache_dir)
    return ModelRegistry([ModelSpec.from_dir(BUILTIN_MODEL_NAME, path)])


def load_registry(cache_dir: Path, extra: Mapping[str, Path] | None = None) -> ModelRegistry:
    """The default registry plus ``extra`` models (name -> local HF directory) from settings."""
    registry = default_registry(cache_dir)
    for name, path in (extra or {}).items():
        registry.register(ModelSpec.from_dir(name, Path(path)))
    return registry
