"""Checkpoint naming and the checkpoint store.

A checkpoint is named by its Tinker path ``tinker://<run>/<weights|sampler_weights|external_weights>/<name>``
(``external``: PEFT-format weights exported for download) and
stored under a store key ``<tenant>/<run>/<kind>/<name>`` (each part ``token()``-encoded). The
store is a directory in the embedded deployment; the key is what would address an object in an
S3-compatible bucket in production, so only ``LocalCheckpointStore`` changes there.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from whetstone.errors import UserError
from whetstone.subjects import token

Kind = Literal["training", "sampler", "external"]
_PATH_KIND: dict[str, Kind] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
_KIND_PATH: dict[Kind, str] = {v: k for k, v in _PATH_KIND.items()}
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: Kind
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{_KIND_PATH[self.kind]}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{_KIND_PATH[self.kind]}/{self.name}"

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        for scheme in ("tinker://", "hpcai://"):
            if path.startswith(scheme):
                parts = path[len(scheme) :].split("/")
                if len(parts) == 3 and parts[1] in _PATH_KIND and parts[0] and parts[2]:
                    return cls(parts[0], _PATH_KIND[parts[1]], parts[2])
        raise UserError(
            f"malformed checkpoint path {path!r}; expected "
            "tinker://<run>/<weights|sampler_weights|external_weights>/<name>"
        )

    @classmethod
    def of_checkpoint_id(cls, run_id: str, checkpoint_id: str) -> TinkerPath:
        """The path of a REST route's ``{run_id}`` and ``{checkpoint_id}`` (``<kind>/<name>``)."""
        return cls.parse(f"tinker://{run_id}/{checkpoint_id}")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-'"
        )
    return name


# Tinker's bounds on a checkpoint's time to live: one hour to ten years.
MIN_TTL_S = 3600
MAX_TTL_S = 10 * 365 * 24 * 3600


def expiry(ttl_seconds: int | None, now: datetime | None = None) -> datetime | None:
    """When a checkpoint saved (or given a TTL) at ``now`` expires; None: never."""
    if ttl_seconds is None:
        return None
    return (now or datetime.now(UTC)) + timedelta(seconds=ttl_seconds)


def check_ttl(ttl_seconds: int | None) -> int | None:
    if ttl_seconds is not None and not MIN_TTL_S <= ttl_seconds <= MAX_TTL_S:
        raise UserError(
            f"ttl_seconds must be between {MIN_TTL_S} (1 hour) and {MAX_TTL_S} (10 years), "
            f"or null for no expiry; got {ttl_seconds}"
        )
    return ttl_seconds


def store_key(tenant: str, path: TinkerPath) -> str:
    return "/".join((token(tenant), token(path.run_id), path.kind, token(path.name)))


def record_key(path: TinkerPath) -> str:
    """The KV key of a checkpoint record (``.``-separated tokens, so runs can be listed by
    prefix)."""
    return f"{token(path.run_id)}.{path.kind}.{token(path.name)}"


class LocalCheckpointStore:
    """Checkpoints as directories under ``root``; writes land atomically (temp dir + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_dir()

    def staging(self, key: str) -> Path:
        tmp = self.root / ".staging" / key.replace("/", "_")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, staged: Path, key: str) -> None:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)

    def delete(self, key: str) -> None:
        shutil.rmtree(self.path(key), ignore_errors=True)

    def files(self, key: str) -> list[str]:
        """The checkpoint's files, as paths relative to its directory, sorted."""
        root = self.path(key)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def copy(self, source: str, key: str) -> None:
        """A copy of checkpoint ``source`` under ``key``, sharing its bytes (hard links) where
        the file system allows."""
        staged = self.staging(key)
        shutil.rmtree(staged)
        shutil.copytree(self.path(source), staged, copy_function=_link_or_copy)
        self.commit(staged, key)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
