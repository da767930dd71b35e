"""Fixtures for integration tests: services started in the test's own event loop on the real
nats-server of ``nats_url``/``bus`` (see ``tests/conftest.py``). Helpers live in ``helpers.py``.

Services spawn background tasks (``whetstone.tasks.spawn``) that live forever; ``spawned``
cancels the ones started during a test before the bus closes under them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from services.trainer.engine import TrainerEngine
from services.trainer.handlers import TrainerWorker
from services.trainer.settings import TrainerSettings
from whetstone import bus as b
from whetstone import tasks
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.observability import configure_logging
from whetstone_ml.builtin import ensure_builtin_model

StartTrainer = Callable[..., Awaitable[TrainerWorker]]


@pytest.fixture(scope="session")
def builtin_model(models_dir: Path) -> Path:
    return ensure_builtin_model(models_dir)


@pytest.fixture(scope="session")
def log():
    return configure_logging("test", "WARNING")


@pytest.fixture
async def spawned(bus: b.Bus) -> AsyncIterator[None]:
    """Cancel every background task and drop every subscription made during the test, before
    ``bus`` is closed."""
    before = tasks.running()
    subs_before = set(bus.nc._subs)
    yield
    pending = tasks.running() - before
    while pending:
        # Cancel again until they end: on Python 3.11 ``asyncio.wait_for`` (inside nats-py's
        # fetch) can swallow a cancellation that races a completing fetch, and the pump loops on.
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    # A pull subscription whose last fetch timed out keeps an unconsumed status message, and
    # drain (``Bus.close``) then waits its full 30 s timeout for it: unsubscribe them first.
    for subscriber in list(bus.broker.subscribers):  # the services' FastStream consumers
        try:
            await subscriber.stop()
        except Exception:  # noqa: BLE001 - already stopped
            pass
    for sid, sub in list(bus.nc._subs.items()):
        if sid not in subs_before:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - already gone (a FastStream subscriber stopped)
                pass


@pytest.fixture
async def start_trainer(
    bus: b.Bus,
    spawned: None,
    nats_url: str,
    tmp_path: Path,
    models_dir: Path,
    builtin_model: Path,
    log,
) -> AsyncIterator[StartTrainer]:
    """Start a real ``TrainerWorker`` on ``bus`` over the built-in model (CPU)."""
    workers: list[TrainerWorker] = []

    async def start(worker_id: str = "w1", **overrides) -> TrainerWorker:
        settings = TrainerSettings(
            worker_id=worker_id,
            nats_url=nats_url,
            state_dir=tmp_path,
            models_dir=models_dir,
            **overrides,
        )
        engine = TrainerEngine(builtin_model)
        store = LocalCheckpointStore(tmp_path / "checkpoints")
        worker = TrainerWorker(settings, bus, engine, store, log)
        await worker.declare()
        await worker.start()
        workers.append(worker)
        return worker

    yield start  # ``spawned`` cancels the workers' pumps and heartbeats
