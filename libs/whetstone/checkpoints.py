"""Checkpoint naming and the checkpoint store.

A checkpoint is named by its Tinker path ``tinker://<run>/<weights|sampler_weights>/<name>`` and
stored under a store key ``<tenant>/<run>/<kind>/<name>`` (each part ``token()``-encoded). The
store is a directory in the embedded deployment; the key is what would address an object in an
S3-compatible bucket in production, so only ``LocalCheckpointStore`` changes there.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from whetstone.errors import UserError
from whetstone.subjects import token

Kind = Literal["training", "sampler"]
_PATH_KIND: dict[str, Kind] = {"weights": "training", "sampler_weights": "sampler"}
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
            f"malformed checkpoint path {path!r}; expected tinker://<run>/<weights|sampler_weights>/<name>"
        )


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-'"
        )
    return name


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
