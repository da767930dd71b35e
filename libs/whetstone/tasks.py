"""Background work of the services: supervised tasks, the offload thread, heartbeats.

Tasks must never die silently.

A service's loops (queue pumps, heartbeats) run as asyncio tasks; an exception escaping one would
otherwise be logged only when the task is garbage-collected while the service limps on. Here the
failure is logged and the process exits, so its supervisor (``whetstone up``, Kubernetes)
notices and restarts it; unacknowledged work is redelivered.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, TypeVarTuple

import nats.errors
import structlog

from whetstone.bus import Bus
from whetstone.messages import WorkerHeartbeat

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_running: set[asyncio.Task[Any]] = set()


def spawn(
    coro: Coroutine[Any, Any, T], log: structlog.stdlib.BoundLogger, name: str
) -> asyncio.Task[T]:
    task = asyncio.create_task(coro, name=name)
    _running.add(task)  # keep a reference: the loop holds tasks only weakly

    def done(t: asyncio.Task[T]) -> None:
        _running.discard(t)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            log.error("background task failed; exiting", task=name, exc_info=exc)
            os._exit(1)

    task.add_done_callback(done)
    return task


class Offload:
    """One dedicated thread for blocking work (torch, chdb): the event loop stays free for I/O
    and heartbeats, and the work itself is serialised, as the engines require."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def __call__(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


async def heartbeats(
    bus: Bus,
    subject: str,
    beat: Callable[[], WorkerHeartbeat],
    interval_s: float,
    log: structlog.stdlib.BoundLogger,
) -> None:
    """Publish ``beat()`` every ``interval_s`` on core NATS (liveness, not worth persisting)."""
    while True:
        try:
            await bus.nc.publish(subject, beat().encode())
        except nats.errors.Error as exc:  # reconnecting: the next beat will go through
            log.warning("heartbeat not sent", error=str(exc))
        await asyncio.sleep(interval_s)


def running() -> set[asyncio.Task[Any]]:
    """The background tasks alive now (tests stop the services they started in-process)."""
    return set(_running)
