"""The model registry: which base models this deployment serves, and how, by name and directory.

A Tinker client names its base model (``create_lora_training_client(base_model=...)``); the
gateway resolves that name here before anything is scheduled, so an unknown model fails fast as
a user error (:class:`whetstone.errors.UnknownModel`) instead of deep inside a worker. Workers
resolve the same name to the Hugging Face directory they load, in the dtype and on the device the
registry names; billing reads each model's prices from it.

A :class:`ModelSpec` is the few facts the control plane needs without loading weights: where the
model lives, its context length and vocabulary size (to validate token ids and lengths early),
the largest LoRA rank it accepts, the dtype and device its weights load in, and its prices.
Nothing here imports torch: dtypes and devices are plain strings that ``whetstone_ml`` turns into
torch objects on the workers.

The registry is operator configuration: a TOML file (``WHETSTONE_MODELS_FILE``, documented in
``deploy/models.example.toml``) lists the served models; the built-in tiny model is served too
unless the file says ``builtin = false``. Every mistake in that file (an unknown key, a missing
directory, a bad dtype, a name served twice) raises :class:`RegistryError` at start-up, naming the
file and the entry.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import get_args

from whetstone.errors import UnknownModel
from whetstone.messages import Meter
from whetstone.models.builtin import (
    BUILTIN_MODEL_NAME,
    CONTEXT_LENGTH,
    VOCAB_SIZE,
    builtin_model_dir,
)

DEFAULT_MAX_LORA_RANK = 64
DEFAULT_DEVICE = "cpu"
DTYPES = ("float32", "bfloat16", "float16")
# The sampler's generation engines: Whetstone's own (services/sampler/engine.py) or vLLM
# (services/sampler/vllm_engine.py, run by the interpreter of scripts/setup-vllm's venv).
ENGINES = ("whetstone", "vllm")
METERS: tuple[str, ...] = get_args(Meter)
# A torch device string, checked without torch: a device type and an optional index.
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")

_ENTRY_KEYS = {
    "name",
    "path",
    "dtype",
    "device",
    "context_length",
    "max_lora_rank",
    "prices",
    "engine",
}
_BUILTIN_KEYS = {"dtype", "device", "max_lora_rank", "prices", "engine"}
_TOP_KEYS = {"builtin", "models"}


class RegistryError(ValueError):
    """The models file (or a spec built in code) is wrong: a deployment mistake, never a user's."""


def device_type(device: str) -> str:
    """``"cuda"`` for ``"cuda:1"``: the part of a device string that decides the default dtype."""
    return device.split(":", 1)[0]


def default_dtype(device: str) -> str:
    """bfloat16 on CUDA (what the Qwen3 weights are trained in), float32 everywhere else."""
    return "bfloat16" if device_type(device) == "cuda" else "float32"


@dataclass(frozen=True)
class ModelSpec:
    """One servable base model.

    ``name`` is what clients send; ``path`` the Hugging Face directory (config, tokenizer,
    safetensors); ``context_length`` the most tokens in one sequence; ``vocab_size`` the number
    of token ids; ``max_lora_rank`` the largest adapter rank we accept; ``arch`` the HF
    ``model_type``; ``dtype`` the base weights' dtype (one of ``DTYPES``) and ``device`` the torch
    device string the workers load them on; ``prices`` USD per million tokens for each meter, or
    ``None`` when billing's default table prices the model; ``engine`` the sampler's generation
    engine (one of ``ENGINES``).
    """

    name: str
    path: Path
    context_length: int
    vocab_size: int
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    arch: str = "qwen3"
    dtype: str = "float32"
    device: str = DEFAULT_DEVICE
    prices: Mapping[str, float] | None = field(default=None, hash=False)
    engine: str = "whetstone"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise RegistryError(
                f"model {self.name!r}: engine {self.engine!r} is not one of {list(ENGINES)}"
            )
        if self.dtype not in DTYPES:
            raise RegistryError(f"model {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")
        if not _DEVICE.match(self.device):
            raise RegistryError(f"model {self.name!r}: {self.device!r} is not a device string")

    @classmethod
    def from_dir(
        cls,
        name: str,
        path: Path,
        *,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        device: str = DEFAULT_DEVICE,
        dtype: str | None = None,
        context_length: int | None = None,
        prices: Mapping[str, float] | None = None,
        engine: str = "whetstone",
    ) -> ModelSpec:
        """Read the spec from ``path/config.json`` (no weights are loaded).

        ``dtype`` defaults to :func:`default_dtype` of ``device``; ``context_length`` to the
        config's ``max_position_embeddings`` and may only lower it. A missing directory raises
        ``FileNotFoundError``: it is a deployment mistake, not a client's, so it must not surface
        as a user error.
        """
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        limit = int(config["max_position_embeddings"])
        if context_length is not None and context_length > limit:
            raise RegistryError(
                f"model {name!r}: context_length {context_length} exceeds the model's "
                f"max_position_embeddings {limit}"
            )
        return cls(
            name=name,
            path=path,
            context_length=context_length or limit,
            vocab_size=int(config["vocab_size"]),
            max_lora_rank=max_lora_rank,
            arch=str(config.get("model_type", "qwen3")),
            dtype=dtype or default_dtype(device),
            device=device,
            prices=prices,
            engine=engine,
        )

    @property
    def is_builtin(self) -> bool:
        """Whether this is the generated tiny model (which a worker may have to generate)."""
        return self.name == BUILTIN_MODEL_NAME

    def on_device(self, device: str, dtype: str | None = None) -> ModelSpec:
        """This spec placed on ``device`` (a worker's override of the registry's device).

        The dtype stays unless given, or unless the device changes type (``cuda`` -> ``cpu``):
        then it becomes that device's default, so a CPU override never runs a model in bfloat16
        it was only configured with for the GPU.
        """
        if dtype is None:
            same_type = device_type(device) == device_type(self.device)
            dtype = self.dtype if same_type else default_dtype(device)
        return replace(self, device=device, dtype=dtype)


def builtin_spec(
    models_dir: Path,
    *,
    device: str = DEFAULT_DEVICE,
    dtype: str | None = None,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
    prices: Mapping[str, float] | None = None,
    engine: str = "whetstone",
) -> ModelSpec:
    """The built-in model's spec under ``models_dir``; it need not be generated yet.

    Its sizes come from its ``config.json`` when the directory exists, else from the constants in
    :mod:`whetstone.models.builtin` (the same numbers): the registry never generates a model.
    """
    path = builtin_model_dir(models_dir)
    if (path / "config.json").is_file():
        return ModelSpec.from_dir(
            BUILTIN_MODEL_NAME,
            path,
            max_lora_rank=max_lora_rank,
            device=device,
            dtype=dtype,
            prices=prices,
            engine=engine,
        )
    return ModelSpec(
        BUILTIN_MODEL_NAME,
        path,
        CONTEXT_LENGTH,
        VOCAB_SIZE,
        max_lora_rank,
        dtype=dtype or default_dtype(device),
        device=device,
        prices=prices,
        engine=engine,
    )


class ModelRegistry:
    """Specs by name. Resolves a client's ``base_model`` given as a name or a directory path."""

    def __init__(self, specs: list[ModelSpec] | None = None) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs or []:
            self.register(spec)

    def register(self, spec: ModelSpec) -> None:
        """Add ``spec``; a name served twice is a configuration bug, so it raises ``RegistryError``
        (a ``ValueError``)."""
        if spec.name in self._specs:
            raise RegistryError(f"base model {spec.name!r} registered twice")
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


def default_registry(models_dir: Path) -> ModelRegistry:
    """A registry serving only the built-in tiny Qwen3 under ``models_dir``, on the CPU."""
    return ModelRegistry([builtin_spec(models_dir)])


def load_registry(models_dir: Path, models_file: Path | None = None) -> ModelRegistry:
    """The registry of ``models_file`` (see :func:`parse_models_file`), or the default one."""
    if models_file is None:
        return default_registry(models_dir)
    return parse_models_file(Path(models_file), models_dir)


# ------------------------------------------------------------------------ the models file


def parse_models_file(path: Path, models_dir: Path) -> ModelRegistry:
    """Read the operator's TOML models file; every mistake raises ``RegistryError``.

    Layout (``deploy/models.example.toml`` is the documented example)::

        builtin = true            # or false, or a [builtin] table: dtype, device, max_lora_rank,
                                  # prices, engine
        [[models]]
        name = "Qwen/Qwen3-8B"    # what clients send as base_model
        path = "/srv/models/Qwen3-8B"   # relative paths are relative to this file
        device = "cuda"           # default "cpu"
        dtype = "bfloat16"        # float32 | bfloat16 | float16; default by device
        context_length = 32768    # default: config.json's max_position_embeddings
        max_lora_rank = 64
        prices = { train_tokens = 0.40, prefill_tokens = 0.10, sample_tokens = 0.30 }
        engine = "whetstone"      # the sampler's engine: whetstone | vllm
    """
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path}: models file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: not valid TOML: {exc}") from None
    _no_unknown_keys(data, _TOP_KEYS, path, "the top level")

    specs: list[ModelSpec] = []
    builtin = data.get("builtin", True)
    if isinstance(builtin, bool):
        if builtin:
            specs.append(builtin_spec(models_dir))
    elif isinstance(builtin, dict):
        where = "[builtin]"
        _no_unknown_keys(builtin, _BUILTIN_KEYS, path, where)
        device = _device(builtin, path, where)
        specs.append(
            _checked(
                path,
                where,
                lambda: builtin_spec(
                    models_dir,
                    device=device,
                    dtype=_dtype(builtin, path, where),
                    max_lora_rank=_rank(builtin, path, where),
                    prices=_prices(builtin, path, where),
                    engine=_engine(builtin, path, where),
                ),
            )
        )
    else:
        raise RegistryError(f"{path}: 'builtin' must be true, false or a table")

    entries = data.get("models", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RegistryError(f"{path}: 'models' must be an array of tables ([[models]])")
    for index, entry in enumerate(entries):
        specs.append(_entry_spec(entry, index, path))

    registry = ModelRegistry()
    for spec in specs:
        if spec.name in registry.names():
            raise RegistryError(f"{path}: base model {spec.name!r} is listed twice")
        registry.register(spec)
    return registry


def _entry_spec(entry: dict[str, object], index: int, path: Path) -> ModelSpec:
    """One ``[[models]]`` table as a spec, after checking every key."""
    name = entry.get("name")
    where = f"models[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")
    _no_unknown_keys(entry, _ENTRY_KEYS, path, where)
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"{path}: {where}: 'name' must be a non-empty string")
    raw_dir = entry.get("path")
    if not isinstance(raw_dir, str) or not raw_dir:
        raise RegistryError(f"{path}: {where}: 'path' (a Hugging Face directory) is required")
    model_dir = Path(raw_dir).expanduser()
    if not model_dir.is_absolute():
        model_dir = path.parent / model_dir
    if not model_dir.is_dir():
        raise RegistryError(f"{path}: {where}: model directory {str(model_dir)!r} does not exist")
    if not (model_dir / "config.json").is_file():
        raise RegistryError(f"{path}: {where}: {str(model_dir)!r} holds no config.json")
    context_length = _positive_int(entry, "context_length", path, where)
    device = _device(entry, path, where)
    dtype = _dtype(entry, path, where)
    rank = _rank(entry, path, where)
    prices = _prices(entry, path, where)
    engine = _engine(entry, path, where)
    return _checked(
        path,
        where,
        lambda: ModelSpec.from_dir(
            name,
            model_dir,
            max_lora_rank=rank,
            device=device,
            dtype=dtype,
            context_length=context_length,
            prices=prices,
            engine=engine,
        ),
    )


def _checked(path: Path, where: str, build: Callable[[], ModelSpec]) -> ModelSpec:
    """``build()``, with a bad config.json or a spec's own check reported against the entry."""
    try:
        return build()
    except RegistryError as exc:
        raise RegistryError(f"{path}: {where}: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise RegistryError(f"{path}: {where}: unreadable config.json ({exc!r})") from None


def _no_unknown_keys(table: Mapping[str, object], known: set[str], path: Path, where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise RegistryError(f"{path}: {where}: unknown keys {unknown}; known: {sorted(known)}")


def _positive_int(table: Mapping[str, object], key: str, path: Path, where: str) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RegistryError(f"{path}: {where}: {key!r} must be a positive integer, got {value!r}")
    return value


def _device(table: Mapping[str, object], path: Path, where: str) -> str:
    device = table.get("device", DEFAULT_DEVICE)
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise RegistryError(
            f"{path}: {where}: device {device!r} is not a device string (cpu, cuda, cuda:1, ...)"
        )
    return device


def _dtype(table: Mapping[str, object], path: Path, where: str) -> str | None:
    dtype = table.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise RegistryError(f"{path}: {where}: dtype {dtype!r} is not one of {list(DTYPES)}")
    return dtype if isinstance(dtype, str) else None


def _engine(table: Mapping[str, object], path: Path, where: str) -> str:
    engine = table.get("engine", "whetstone")
    if engine not in ENGINES:
        raise RegistryError(
            f"{path}: {where}: engine {engine!r} is not one of {list(ENGINES)} "
            "(vllm needs scripts/setup-vllm)"
        )
    return str(engine)


def _rank(table: Mapping[str, object], path: Path, where: str) -> int:
    return _positive_int(table, "max_lora_rank", path, where) or DEFAULT_MAX_LORA_RANK


def _prices(table: Mapping[str, object], path: Path, where: str) -> dict[str, float] | None:
    prices = table.get("prices")
    if prices is None:
        return None
    if not isinstance(prices, dict):
        raise RegistryError(f"{path}: {where}: 'prices' must be a table of meter -> USD per 1M")
    unknown, missing = sorted(set(prices) - set(METERS)), sorted(set(METERS) - set(prices))
    if unknown or missing:
        raise RegistryError(
            f"{path}: {where}: prices need exactly {list(METERS)}; "
            f"unknown {unknown}, missing {missing}"
        )
    out: dict[str, float] = {}
    for meter in METERS:
        value = prices[meter]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise RegistryError(
                f"{path}: {where}: price of {meter} must be a number >= 0, got {value!r}"
            )
        out[meter] = float(value)
    return out
