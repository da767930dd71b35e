"""``whetstone status`` gathering against a real nats-server: heartbeats, runs and placements
from KV, consumer depths and the last dead letters with their headers."""

from __future__ import annotations

import asyncio

from nats.js import api

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.messages import LoraConfig, TrainingRunRecord, WorkerHeartbeat
from whetstone.status import StatusCollector

RUN = "sess-9:train:0"


async def test_collector_reads_every_part(bus: b.Bus, nats_url: str) -> None:
    run = TrainingRunRecord(
        run_id=RUN, tenant="alice", session_id="sess-9", base_model="m", lora=LoraConfig(rank=8)
    )
    await b.kv_put(bus.kv[s.RUNS_BUCKET], s.token(RUN), run)
    await bus.kv[s.PLACEMENTS_BUCKET].put(s.token(RUN), b"trainer-x")
    await bus.js.add_consumer(
        s.TRAIN_STREAM,
        api.ConsumerConfig(
            durable_name=s.train_consumer(RUN),
            filter_subject=s.train_subject(RUN),
            ack_policy=api.AckPolicy.EXPLICIT,
        ),
    )
    for n in range(3):
        await bus.js.publish(s.train_subject(RUN), f"request {n}".encode())
    for n in range(7):
        await bus.js.publish(
            s.deadletter_subject(f"ws.sample.x{n}"), b"bad", headers={"Ws-Error": f"boom {n}"}
        )

    collector = await StatusCollector.open(nats_url, "http://gateway")
    try:
        beat = WorkerHeartbeat(
            worker_id="trainer-x", role="trainer", base_models=["m"], runs=[RUN], max_runs=4
        )

        async def beating() -> None:  # as a worker does: the collector may subscribe late
            while True:
                await bus.nc.publish(s.heartbeat_subject("trainer", "trainer-x"), beat.encode())
                await asyncio.sleep(0.1)

        beats = asyncio.create_task(beating())
        try:
            await collector.wait_for_workers(["trainer"], timeout_s=5)
        finally:
            beats.cancel()
        snap = await collector.snapshot()
    finally:
        await collector.close()

    assert [(w.worker_id, w.runs, w.max_runs) for w in snap.workers] == [("trainer-x", 1, 4)]
    assert [(r.run_id, r.worker, r.queued) for r in snap.runs] == [(RUN, "trainer-x", 3)]
    train = [q for q in snap.queues if q.stream == s.TRAIN_STREAM]
    assert [(q.label, q.pending, q.ack_pending) for q in train] == [(RUN, 3, 0)]
    assert snap.dead_letters is not None and len(snap.dead_letters) == 5  # the last five
    newest = snap.dead_letters[0]
    assert newest.subject == s.deadletter_subject("ws.sample.x6")
    assert newest.headers["Ws-Error"] == "boom 6" and newest.at is not None
    # No billing service runs here: the runs' costs are the one part the collector cannot read,
    # and it says so instead of failing the snapshot.
    assert snap.problems == ("run costs: billing did not answer (NoRespondersError())",)
    assert snap.runs[0].cost_usd is None
