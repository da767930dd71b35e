"""Failover, expiry and the standby scheduler on a real nats-server, with real TrainerWorkers and
Schedulers in the test's event loop.

* A worker that dies mid-run (its tasks and consumers cut off, nothing handed back: what SIGKILL
  leaves behind) loses its run to a second worker, which restores the snapshot, replays the
  requests the dead one ran but never acknowledged, and ends with weights equal, bit for bit, to
  an undisturbed in-process engine's; every request is billed once.
* A session whose heartbeats stop is ended, its run unloaded with its snapshot kept; a later
  request loads the run from the snapshot and training carries on exactly.
* A standby scheduler takes the lease over from one that died and places the waiting run.

Every wait is on observable state (futures, KV, heartbeats) with a timeout.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from services.scheduler.handlers import Scheduler
from services.scheduler.settings import SchedulerSettings
from services.trainer.engine import TrainerEngine
from tests.integration.helpers import eventually, put_pending, wait_final
from tests.integration.test_trainer_worker import ADAM, LORA, TENANT, fb, submit, tokens_of
from whetstone import bus as b
from whetstone import subjects as s
from whetstone import tasks
from whetstone.messages import (
    OptimStep,
    PlaceRun,
    RunProgress,
    SessionRecord,
    TrainingRunRecord,
    UsageEvent,
    utcnow,
)
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(120)


async def start_scheduler(bus: b.Bus, nats_url: str, tmp_path: Path, log, **overrides):
    settings = SchedulerSettings(
        nats_url=nats_url,
        state_dir=tmp_path,
        worker_timeout_s=1.0,
        sweep_interval_s=0.2,
        retry_interval_s=0.2,
        lease_ttl_s=1.0,
        **overrides,
    )
    before = tasks.running()
    scheduler = Scheduler(settings, bus, log)
    await scheduler.declare()
    await scheduler.start()
    return scheduler, tasks.running() - before


async def create_run(bus: b.Bus, run_id: str) -> TrainingRunRecord:
    """What the gateway writes for create_model: the session, the run, then the placement
    request."""
    session_id = run_id.split(":")[0]
    await b.kv_put(
        bus.kv[s.SESSIONS_BUCKET],
        s.token(session_id),
        SessionRecord(session_id=session_id, tenant=TENANT),
    )
    run = TrainingRunRecord(
        run_id=run_id,
        tenant=TENANT,
        session_id=session_id,
        base_model=BUILTIN_MODEL_NAME,
        lora=LORA,
    )
    await b.kv_put(bus.kv[s.RUNS_BUCKET], s.token(run_id), run)
    request_id = f"create-{s.token(run_id)}"
    await put_pending(bus, request_id, TENANT, "create_model")
    await b.publish(bus, s.PLACE_SUBJECT, PlaceRun(request_id=request_id, run=run))
    assert (await wait_final(bus, request_id)).status == "done"
    return run


async def placed_on(bus: b.Bus, run_id: str) -> str | None:
    try:
        entry = await bus.kv[s.PLACEMENTS_BUCKET].get(s.token(run_id))
    except Exception:  # noqa: BLE001 - deleted or never placed
        return None
    return (entry.value or b"").decode() or None


async def crash(worker, worker_tasks: set[asyncio.Task]) -> None:
    """What SIGKILL leaves: no heartbeat, no executor, no consumer; nothing acknowledged or
    handed back."""
    for task in worker_tasks:
        task.cancel()
    await asyncio.wait(worker_tasks, timeout=5)
    for queue in worker.runs.values():
        await queue.subscriber.stop()


def reference(builtin_model: Path, run_id: str, steps: int) -> dict[str, torch.Tensor]:
    """The same requests on an undisturbed in-process engine."""
    engine = TrainerEngine(builtin_model)
    engine.create_run(run_id, LORA)
    for _ in range(steps):
        engine.forward_backward(run_id, fb())
        engine.optim_step(run_id, ADAM)
    return engine.runs[run_id].adapter.state_dict()


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


async def train_tokens_billed(bus: b.Bus, run_id: str) -> tuple[int, int]:
    """(train tokens, events) in the usage stream for ``run_id`` (the stream de-duplicates a
    re-published event by its id, as billing does)."""
    sub = await bus.js.pull_subscribe(
        s.usage_subject(TENANT), durable="test-usage-failover", stream=s.USAGE_STREAM
    )
    total = events = 0
    try:
        while True:
            try:
                batch = await sub.fetch(100, timeout=0.5)
            except Exception:  # noqa: BLE001 - nothing more
                break
            for msg in batch:
                event = UsageEvent.decode(msg.data)
                if event.run_id == run_id and event.meter == "train_tokens":
                    total += event.tokens
                    events += 1
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return total, events


async def test_a_dead_workers_run_moves_and_ends_with_an_undisturbed_runs_weights(
    bus: b.Bus, start_trainer, nats_url: str, tmp_path: Path, log, builtin_model: Path
) -> None:
    await start_scheduler(bus, nats_url, tmp_path, log)
    before = tasks.running()
    # A long idle time: the forward_backward that ran before the crash stays unacknowledged.
    w1 = await start_trainer("w1", heartbeat_interval_s=0.2, snapshot_idle_s=60.0)
    w1_tasks = tasks.running() - before
    run_id = "sess-fo:train:0"
    await create_run(bus, run_id)
    assert await placed_on(bus, run_id) == "w1"

    steps, seq, rids = 4, 1, []
    for _ in range(2):  # two whole steps on w1, each snapshotted and acknowledged
        rids += [
            await submit(bus, run_id, seq, fb()),
            await submit(bus, run_id, seq + 1, OptimStep(adam=ADAM)),
        ]
        seq += 2
    for rid in rids:
        assert (await wait_final(bus, rid)).status == "done"
    fb_rid = await submit(bus, run_id, seq, fb())  # runs on w1, then w1 dies before its step
    assert (await wait_final(bus, fb_rid)).status == "done"
    writes: list[bytes] = []

    async def on_write(msg) -> None:
        writes.append(msg.data)

    await bus.nc.subscribe(f"$KV.{s.FUTURES_BUCKET}.{fb_rid}", cb=on_write)
    await crash(w1, w1_tasks)
    rids += [fb_rid, await submit(bus, run_id, seq + 1, OptimStep(adam=ADAM))]
    seq += 2

    w2 = await start_trainer("w2", heartbeat_interval_s=0.2)

    async def moved() -> bool:
        return await placed_on(bus, run_id) == "w2" and run_id in w2.runs

    await eventually(moved, timeout_s=15, what="the run moved to w2")
    for _ in range(steps - 3):
        rids += [
            await submit(bus, run_id, seq, fb()),
            await submit(bus, run_id, seq + 1, OptimStep(adam=ADAM)),
        ]
        seq += 2
    for rid in rids:
        assert (await wait_final(bus, rid, timeout_s=30)).status == "done"
    await eventually(lambda: asyncio.sleep(0, bool(writes)), what="seq 5 ran again on w2")

    assert_same_weights(
        w2.engine.runs[run_id].adapter.state_dict(), reference(builtin_model, run_id, steps)
    )
    total, events = await train_tokens_billed(bus, run_id)
    assert (total, events) == (steps * tokens_of(fb()), steps)  # the replay billed nothing more


async def test_an_expired_session_is_unloaded_and_its_run_loads_again_from_its_snapshot(
    bus: b.Bus, start_trainer, nats_url: str, tmp_path: Path, log, builtin_model: Path
) -> None:
    await start_scheduler(bus, nats_url, tmp_path, log, session_ttl_s=1.0)
    w1 = await start_trainer("w1", heartbeat_interval_s=0.2)
    run_id = "sess-exp:train:0"
    await create_run(bus, run_id)
    rids = [await submit(bus, run_id, 1, fb()), await submit(bus, run_id, 2, OptimStep(adam=ADAM))]
    for rid in rids:
        assert (await wait_final(bus, rid)).status == "done"

    # No heartbeat since: the session ends, the run leaves the worker, its snapshot stays.
    async def unloaded() -> bool:
        session = await b.kv_get(bus.kv[s.SESSIONS_BUCKET], s.token("sess-exp"), SessionRecord)
        return (
            session is not None
            and session.finished
            and run_id not in w1.runs
            and not w1.engine.has_run(run_id)
            and await placed_on(bus, run_id) is None
        )

    await eventually(unloaded, timeout_s=10, what="the expired session's run unloaded")
    progress = await b.kv_get(bus.kv[s.RUN_PROGRESS_BUCKET], s.token(run_id), RunProgress)
    assert progress is not None and progress.next_seq_id == 3 and progress.step == 1
    assert w1.store.exists(progress.snapshot_key or "")

    # A later request loads the run from its snapshot, and training carries on exactly.
    rids = [await submit(bus, run_id, 3, fb()), await submit(bus, run_id, 4, OptimStep(adam=ADAM))]
    for rid in rids:
        assert (await wait_final(bus, rid, timeout_s=20)).status == "done"
    assert await placed_on(bus, run_id) == "w1"
    assert_same_weights(
        w1.engine.runs[run_id].adapter.state_dict(), reference(builtin_model, run_id, 2)
    )


async def test_a_session_that_finishes_frees_its_workers_slot(
    bus: b.Bus, start_trainer, nats_url: str, tmp_path: Path, log
) -> None:
    await start_scheduler(bus, nats_url, tmp_path, log)
    w1 = await start_trainer("w1", heartbeat_interval_s=0.2, max_runs=1)
    await create_run(bus, "sess-f1:train:0")
    session = SessionRecord(session_id="sess-f1", tenant=TENANT, finished=True)
    await b.kv_put(bus.kv[s.SESSIONS_BUCKET], s.token("sess-f1"), session)
    await create_run(bus, "sess-f2:train:0")  # waits for the only slot, then takes it
    assert set(w1.runs) == {"sess-f2:train:0"}


async def test_a_standby_scheduler_takes_over_from_a_dead_one(
    bus: b.Bus, start_trainer, nats_url: str, tmp_path: Path, log
) -> None:
    active, active_tasks = await start_scheduler(bus, nats_url, tmp_path, log)
    standby, _ = await start_scheduler(bus, nats_url, tmp_path, log, worker_id="s2")
    assert active.lease.leader and not standby.lease.leader
    for task in active_tasks:  # s1 dies: no renewal, no sweeps, no placements
        task.cancel()
    await active._place_sub.stop()
    await start_trainer("w1", heartbeat_interval_s=0.2)
    run_id = "sess-sb:train:0"
    await create_run(bus, run_id)  # placed by s2 once s1's lease lapsed
    assert standby.lease.leader
    assert await placed_on(bus, run_id) == "w1"
    session = await b.kv_get(bus.kv[s.SESSIONS_BUCKET], s.token("sess-sb"), SessionRecord)
    assert session is not None and utcnow() - session.last_heartbeat_at < timedelta(minutes=1)
