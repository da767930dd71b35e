"""Scheduler on a real nats-server: a create_model request waits in the durable placement queue
while no trainer worker exists (its future reports ``paused_capacity``), and is placed as soon as
a real TrainerWorker starts heartbeating (the create_model future completes, ``ws_placements``
names the worker). Prints the time from the worker's first heartbeat to the completed future
(benchmark P8; not asserted)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.scheduler.handlers import Scheduler
from services.scheduler.settings import SchedulerSettings
from tests.integration.helpers import eventually, put_pending, wait_final
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.messages import (
    CreateModelResult,
    FutureRecord,
    LoraConfig,
    PlaceRun,
    TrainingRunRecord,
)
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(60)  # a hang fails fast, with every thread's stack

TENANT = "tenant-a"


async def test_a_run_waits_for_capacity_then_lands_on_the_first_worker(
    bus: b.Bus, spawned: None, start_trainer, nats_url: str, tmp_path: Path, log
) -> None:
    settings = SchedulerSettings(nats_url=nats_url, state_dir=tmp_path)
    scheduler = Scheduler(settings, bus, log)
    await scheduler.declare()
    await scheduler.start()

    run_id = "sess-1:train:0"
    run = TrainingRunRecord(
        run_id=run_id,
        tenant=TENANT,
        session_id="sess-1",
        base_model=BUILTIN_MODEL_NAME,
        lora=LoraConfig(rank=4, seed=1),
    )
    request_id = "req-create-1"
    await put_pending(bus, request_id, TENANT, "create_model")
    await b.publish(
        bus,
        s.PLACE_SUBJECT,
        PlaceRun(request_id=request_id, run=run),
        msg_id=f"create.{s.token(run_id)}",
    )

    async def paused() -> bool:
        record = await b.future_record(bus, request_id)
        return record is not None and record.queue_state == "paused_capacity"

    await eventually(paused, timeout_s=2.0, what="queue_state paused_capacity without a worker")
    await asyncio.sleep(1.0)  # several placement retries later, still waiting, still paused
    record = await b.future_record(bus, request_id)
    assert (record.status, record.queue_state) == ("pending", "paused_capacity")

    # Timestamps straight from the bus: the first heartbeat, and the final record's KV write.
    first_beat: list[float] = []
    done_at: list[float] = []

    async def on_beat(msg) -> None:
        first_beat.append(time.perf_counter())

    async def on_future(msg) -> None:
        if msg.data and FutureRecord.decode(msg.data).final:
            done_at.append(time.perf_counter())

    await bus.nc.subscribe(s.heartbeat_subject("trainer", "w1"), cb=on_beat)
    await bus.nc.subscribe(f"$KV.{s.FUTURES_BUCKET}.{request_id}", cb=on_future)
    await bus.nc.flush()

    await start_trainer("w1")
    final = await wait_final(bus, request_id, timeout_s=10.0)
    assert final.status == "done"
    assert final.result == CreateModelResult(model_id=run_id)
    entry = await bus.kv[s.PLACEMENTS_BUCKET].get(s.token(run_id))
    assert entry.value == b"w1"

    async def placement_acked() -> bool:
        info = await bus.js.consumer_info(s.CONTROL_STREAM, s.SCHEDULER_CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(placement_acked, what="the PlaceRun acknowledged")
    await eventually(
        lambda: asyncio.sleep(0, bool(done_at)), what="the final record seen on the bus"
    )
    latency_ms = (done_at[0] - first_beat[0]) * 1000
    print(
        f"\nP8 (worker's first heartbeat -> queued create_model done): {latency_ms:.1f} ms "
        f"(target <= 25 ms)"
    )
