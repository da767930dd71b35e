"""Helpers for integration tests: act like a gateway (pending future first, then the message)
and wait for what a service writes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats.errors

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.messages import FutureRecord


async def fetch(sub, batch: int, timeout_s: float) -> list:
    """Pull up to ``batch`` messages from a raw pull subscription; [] when none came in time."""
    try:
        return await sub.fetch(batch, timeout=timeout_s)
    except (TimeoutError, nats.errors.TimeoutError):
        return []


async def put_pending(bus: b.Bus, request_id: str, tenant: str, op: str) -> FutureRecord:
    """What the gateway writes before it publishes a request."""
    pending = FutureRecord(request_id=request_id, tenant=tenant, op=op)
    await b.kv_put(bus.kv[s.FUTURES_BUCKET], request_id, pending)
    return pending


async def wait_final(bus: b.Bus, request_id: str, timeout_s: float = 30.0) -> FutureRecord:
    deadline = time.monotonic() + timeout_s
    while True:
        record = await b.future_record(bus, request_id)
        if record is not None and record.final:
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"future {request_id} still {record}")
        await asyncio.sleep(0.01)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {timeout_s} s: {what}")
        await asyncio.sleep(0.02)
