"""Background tasks that must never die silently.

A service's loops (queue pumps, heartbeats) run as asyncio tasks; an exception escaping one would
otherwise be logged only when the task is garbage-collected while the service limps on. Here the
failure is logged and the process exits, so its supervisor (``whetstone up``, Kubernetes)
notices and restarts it; unacknowledged work is redelivered.
"""

from __future__ import annotations

import asyncio
import os
from typing import Coroutine

_running: set[asyncio.Task] = set()


def spawn(coro: Coroutine, log, name: str) -> asyncio.Task:
    task = asyncio.create_task(coro, name=name)
    _running.add(task)  # keep a reference: the loop holds tasks only weakly

    def done(t: asyncio.Task) -> None:
        _running.discard(t)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            log.error("background task failed; exiting", task=name, exc_info=exc)
            os._exit(1)

    task.add_done_callback(done)
    return task
