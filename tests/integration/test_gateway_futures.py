"""FutureWaiters (the gateway's ``retrieve_future`` long-poll) on a real nats-server: a waiter
wakes as soon as a worker writes the final record to KV ``ws_futures``, returns the (re-read)
pending record when the poll window ends, and never reveals another tenant's future."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gateway.futures import FutureWaiters
from tests.integration.helpers import put_pending
from whetstone import bus as b
from whetstone.errors import NotFound
from whetstone.messages import OptimStepResult

pytestmark = pytest.mark.timeout(60)  # a hang fails fast, with every thread's stack

TENANT = "tenant-a"


@pytest.fixture
async def waiters(bus: b.Bus) -> FutureWaiters:
    w = FutureWaiters(bus)
    await w.start()
    return w


async def test_a_waiter_returns_as_soon_as_the_result_lands(
    bus: b.Bus, waiters: FutureWaiters
) -> None:
    pending = await put_pending(bus, "req-1", TENANT, "optim_step")
    start = time.perf_counter()
    polls = [asyncio.create_task(waiters.wait("req-1", TENANT, timeout_s=10.0)) for _ in range(2)]
    await asyncio.sleep(0.2)
    assert not any(p.done() for p in polls)
    await b.set_queue_state(bus, "req-1", "paused_capacity")  # a non-final update wakes nobody
    await asyncio.sleep(0.1)
    assert not any(p.done() for p in polls)
    await b.finish_future(bus, pending, OptimStepResult(metrics={"grad_norm:mean": 1.5}))
    records = await asyncio.wait_for(asyncio.gather(*polls), 2.0)
    elapsed = time.perf_counter() - start
    for record in records:  # both pollers of the same future are woken
        assert record.status == "done"
        assert record.result == OptimStepResult(metrics={"grad_norm:mean": 1.5})
    assert elapsed < 2.0  # far inside the 10 s poll window
    assert waiters._waiters == {}  # no registrations left behind

    # A future that is already final answers at once.
    start = time.perf_counter()
    record = await waiters.wait("req-1", TENANT, timeout_s=10.0)
    assert record.status == "done" and time.perf_counter() - start < 0.5


async def test_a_waiter_returns_the_pending_record_after_the_timeout(
    bus: b.Bus, waiters: FutureWaiters
) -> None:
    await put_pending(bus, "req-2", TENANT, "forward_backward")
    poll = asyncio.create_task(waiters.wait("req-2", TENANT, timeout_s=0.5))
    await asyncio.sleep(0.1)
    await b.set_queue_state(bus, "req-2", "paused_capacity")
    start = time.perf_counter()
    record = await poll
    assert time.perf_counter() - start >= 0.3
    assert record.status == "pending"
    assert record.queue_state == "paused_capacity"  # re-read at the end of the window, not stale
    assert waiters._waiters == {}


async def test_another_tenants_future_is_not_found(bus: b.Bus, waiters: FutureWaiters) -> None:
    await put_pending(bus, "req-3", TENANT, "sample")
    with pytest.raises(NotFound):
        await waiters.wait("req-3", "tenant-b", timeout_s=5.0)
    with pytest.raises(NotFound):
        await waiters.wait("req-never-submitted", TENANT, timeout_s=5.0)
    assert waiters._waiters == {}
