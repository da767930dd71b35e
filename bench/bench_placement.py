"""Benchmark P8: queued work starting once capacity appears.

Each trial starts a fresh nats-server and scheduler, queues one create_model while no trainer
exists (its future reports ``paused_capacity``), then starts a real ``TrainerWorker`` on the
built-in model and times from that worker's first heartbeat on the bus to the create_model
future's final record on the bus. Prints every trial and the median and p90.

    .venv/bin/python bench/bench_placement.py [trials]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from services.scheduler.handlers import Scheduler
from services.scheduler.settings import SchedulerSettings
from services.trainer.engine import TrainerEngine
from services.trainer.handlers import TrainerWorker
from services.trainer.settings import TrainerSettings
from whetstone import bus as b
from whetstone import subjects as s
from whetstone import tasks
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.messages import FutureRecord, LoraConfig, PlaceRun, TrainingRunRecord
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.nats_server import start_nats
from whetstone.observability import configure_logging
from whetstone_ml.builtin import ensure_builtin_model

TENANT = "tenant-bench"


async def _until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def trial(root: Path, models: Path, model_dir: Path, log) -> float:
    """One trial's latency in ms, from the worker's first heartbeat to the future's last write."""
    server = start_nats(root / "nats")
    bus = await b.connect(server.url, "bench")
    before = tasks.running()
    worker: TrainerWorker | None = None
    try:
        await bus.broker.start()
        scheduler = Scheduler(SchedulerSettings(nats_url=server.url, state_dir=root), bus, log)
        await scheduler.declare()
        await scheduler.start()
        run = TrainingRunRecord(
            run_id="sess-1:train:0",
            tenant=TENANT,
            session_id="sess-1",
            base_model=BUILTIN_MODEL_NAME,
            lora=LoraConfig(rank=4, seed=1),
        )
        request_id = "req-create-1"
        pending = FutureRecord(request_id=request_id, tenant=TENANT, op="create_model")
        await b.kv_put(bus.kv[s.FUTURES_BUCKET], request_id, pending)
        await b.publish(bus, s.PLACE_SUBJECT, PlaceRun(request_id=request_id, run=run))

        async def paused() -> bool:
            record = await b.future_record(bus, request_id)
            return record is not None and record.queue_state == "paused_capacity"

        await _until(paused)
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
        settings = TrainerSettings(
            worker_id="w1", nats_url=server.url, state_dir=root, models_dir=models
        )
        engine = TrainerEngine(model_dir)
        worker = TrainerWorker(settings, bus, engine, LocalCheckpointStore(root / "ckpt"), log)
        await worker.declare()
        await worker.start()
        await _until(lambda: asyncio.sleep(0, bool(done_at and first_beat)))
        return (done_at[0] - first_beat[0]) * 1000
    finally:
        if worker is not None:
            await worker.stop()
        for task in tasks.running() - before:
            task.cancel()
        await asyncio.sleep(0.05)
        await bus.close()
        server.stop()


async def main(trials: int) -> None:
    log = configure_logging("bench", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        model_dir = ensure_builtin_model(models)
        times = []
        for i in range(trials):
            ms = await trial(Path(tmp) / f"t{i}", models, model_dir, log)
            times.append(ms)
            print(f"trial {i + 1}: {ms:.1f} ms", flush=True)
    times.sort()
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    print(f"P8 over {trials} trials: median {statistics.median(times):.1f} ms, p90 {p90:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 15))
