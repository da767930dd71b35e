"""Shared fixtures: a real nats-server on a free port, a bus connection, and the whole platform
(``whetstone up``'s code path: NATS plus the five services as child processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from whetstone import bus as b
from whetstone.nats_server import start_nats
from whetstone.platform import Platform, start_platform

os.environ.setdefault("TINKER_TELEMETRY", "0")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model, generated once per test session (deterministic, a few seconds)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def nats_url(tmp_path: Path):
    server = start_nats(tmp_path / "state")
    yield server.url
    server.stop()


@pytest.fixture
async def bus(nats_url: str):
    connection = await b.connect(nats_url, "test")
    await (
        connection.broker.start()
    )  # subscribers declared later (services in-process) start at once
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    state = tmp_path_factory.mktemp("platform")
    running: Platform = start_platform(state, port=0, models_dir=models_dir)
    yield running
    running.stop()
