"""Checkpoint TTLs and external weights, without a server: Tinker's TTL bounds, the sweep's
choice of expired checkpoints, external-weights paths and the download URL signature."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.gateway.rest import signature, signed_url
from services.scheduler.sweep import expired_checkpoints
from whetstone.checkpoints import MAX_TTL_S, MIN_TTL_S, TinkerPath, check_ttl, expiry
from whetstone.errors import UserError
from whetstone.messages import CheckpointRecord

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def record(name: str, expires_at: datetime | None) -> CheckpointRecord:
    return CheckpointRecord(
        tinker_path=f"tinker://sess-a:train:0/weights/{name}",
        run_id="sess-a:train:0",
        tenant="alice",
        kind="training",
        name=name,
        store_key=f"k/{name}",
        size_bytes=1,
        expires_at=expires_at,
    )


def test_ttl_bounds_are_tinkers() -> None:
    assert check_ttl(None) is None and check_ttl(MIN_TTL_S) == MIN_TTL_S
    assert check_ttl(MAX_TTL_S) == MAX_TTL_S
    for bad in (0, MIN_TTL_S - 1, MAX_TTL_S + 1, -5):
        with pytest.raises(UserError, match="ttl_seconds"):
            check_ttl(bad)
    assert expiry(None, NOW) is None
    assert expiry(3600, NOW) == NOW + timedelta(hours=1)


def test_only_checkpoints_past_their_expiry_are_deleted_oldest_first() -> None:
    checkpoints = {
        "never": (record("never", None), 1),
        "later": (record("later", NOW + timedelta(seconds=1)), 2),
        "now": (record("now", NOW), 3),
        "long-ago": (record("long-ago", NOW - timedelta(days=3)), 4),
    }
    actions = expired_checkpoints(checkpoints, NOW)
    assert [(a.key, a.revision) for a in actions] == [("long-ago", 4), ("now", 3)]
    assert expired_checkpoints(checkpoints, NOW - timedelta(days=4)) == []


def test_external_weights_paths_parse_and_print() -> None:
    path = TinkerPath.parse("tinker://sess-a:train:0/external_weights/final")
    assert path.kind == "external" and path.checkpoint_id == "external_weights/final"
    assert str(path) == "tinker://sess-a:train:0/external_weights/final"
    assert TinkerPath.of_checkpoint_id("sess-a:train:0", "external_weights/final") == path
    with pytest.raises(UserError):
        TinkerPath.of_checkpoint_id("sess-a:train:0", "weights/a/publish")


def test_a_download_signature_covers_the_checkpoint_the_file_and_the_expiry() -> None:
    path = TinkerPath("sess-a:train:0", "external", "final")
    sig = signature("secret", path, "adapter_config.json", 100)
    assert sig == signature("secret", path, "adapter_config.json", 100)
    for other in (
        signature("other secret", path, "adapter_config.json", 100),
        signature(
            "secret", TinkerPath("sess-b:train:0", "external", "final"), "adapter_config.json", 100
        ),
        signature("secret", path, "adapter_model.safetensors", 100),
        signature("secret", path, "adapter_config.json", 101),
    ):
        assert other != sig
    url = signed_url("secret", path, "adapter_config.json", 100)
    assert url == f"/downloads/sess-a:train:0/final/adapter_config.json?expires=100&sig={sig}"
