"""The committed AsyncAPI document (docs/asyncapi.yaml) is the one FastStream generates from the
services' subscriber declarations today: a changed subject, consumer or payload without a
regenerated document fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "asyncapi.yaml"


def test_the_committed_document_matches_the_code() -> None:
    check = subprocess.run(
        [sys.executable, "scripts/asyncapi.py", "--check", str(DOC)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr


def test_the_document_names_every_consumed_subject_and_its_payload() -> None:
    doc = yaml.safe_load(DOC.read_text())
    addresses = {ch["address"] for ch in doc["channels"].values()}
    assert {
        "ws.ctl.place",
        "ws.usage.>",
        "ws.ctl.billing.report",
        "ws.ctl.heartbeat.trainer.*",
        "$KV.ws_futures.>",
    } <= addresses
    assert any(a.startswith("ws.train.") for a in addresses)
    assert any(a.startswith("ws.sample.") for a in addresses)
    assert {
        "TrainRequest",
        "SampleRequest",
        "PlaceRun",
        "UsageEvent",
        "AssignRun",
        "WorkerHeartbeat",
    } <= set(doc["components"]["schemas"])
