"""The message-fate wrapper on a real nats-server: what happens to a message whose handler
returns, raises a user error, raises anything else, or that cannot be decoded; and the trainer's
held messages (its seq_id gap timing out, and a drain handing held requests back).
"""

from __future__ import annotations

import asyncio

import pytest
from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub

from tests.integration.helpers import eventually, put_pending, wait_final
from tests.integration.test_trainer_worker import ADAM, LORA, assign, fb, submit
from whetstone import bus as b
from whetstone import fate
from whetstone import subjects as s
from whetstone.errors import UserError
from whetstone.fate import consumer_config, decoder_for
from whetstone.messages import OptimStep, TrainingRunRecord, TrainRequest
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(60)

TENANT = "tenant-a"
SUBJECT = s.train_subject("fate-test:train:0")


async def dead_letters(bus: b.Bus) -> list:
    """Every message in the dead-letter stream, oldest first (read without consuming)."""
    info = await bus.js.stream_info(s.DEADLETTER_STREAM)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            found.append(await bus.js.get_msg(s.DEADLETTER_STREAM, seq))
        except Exception:  # noqa: BLE001 - a gap in the sequence
            continue
    return found


def request(request_id: str, seq_id: int) -> TrainRequest:
    return TrainRequest(
        request_id=request_id,
        tenant=TENANT,
        run_id="fate-test:train:0",
        seq_id=seq_id,
        command=OptimStep(adam=ADAM),
    )


async def test_each_outcome_gets_its_fate(
    bus: b.Bus, spawned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fate, "BACKOFF_S", (0.05, 0.05, 0.05, 0.05, 0.05))
    tries: dict[int, int] = {}

    async def handler(req: TrainRequest, msg: NatsMessage) -> None:
        tries[req.seq_id] = tries.get(req.seq_id, 0) + 1
        if req.seq_id == 2:
            raise UserError("seq 2 is wrong")
        if req.seq_id == 3:
            raise RuntimeError("a bug")
        if req.seq_id == 4 and tries[4] < 3:
            raise ConnectionError("flaky")

    await b.subscribe(
        bus,
        handler,
        SUBJECT,
        stream=JStream(s.TRAIN_STREAM, declare=False),
        durable="fate-test",
        pull_sub=PullSub(batch_size=8, timeout=0.2),
        config=consumer_config(30),
        ack_policy=AckPolicy.MANUAL,
        decoder=decoder_for(TrainRequest),
        persistent=False,
    )
    for seq in (1, 2, 3, 4):
        await put_pending(bus, f"r{seq}", TENANT, "optim_step")
        await b.publish(bus, SUBJECT, request(f"r{seq}", seq))
    # Garbage that names a pending future in its headers: the future fails, nothing hangs.
    await put_pending(bus, "r-garbage", TENANT, "optim_step")
    await bus.js.publish(
        SUBJECT,
        b"\x00not json",
        headers={
            s.REQUEST_ID_HEADER: "r-garbage",
            s.TENANT_HEADER: TENANT,
            "content-type": "application/json",
        },
    )

    user = await wait_final(bus, "r2")
    assert (user.status, user.category, user.error) == ("failed", "user", "seq 2 is wrong")
    server = await wait_final(bus, "r3")
    assert (server.status, server.category) == ("failed", "server")
    garbage = await wait_final(bus, "r-garbage")
    assert (garbage.status, garbage.category) == ("failed", "server")

    async def settled() -> bool:
        info = await bus.js.consumer_info(s.TRAIN_STREAM, "fate-test")
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(settled, what="every message acknowledged or terminated")
    assert tries == {1: 1, 2: 1, 3: fate.MAX_DELIVER, 4: 3}  # user errors are never retried
    assert (await b.future_record(bus, "r1")).status == "pending"  # the handler wrote nothing
    letters = await dead_letters(bus)
    assert [m.headers[s.DLQ_SUBJECT_HEADER] for m in letters] == [SUBJECT, SUBJECT]
    by_request = {m.headers.get(s.REQUEST_ID_HEADER): m for m in letters}
    assert set(by_request) == {"r3", "r-garbage"}
    assert by_request["r3"].headers[s.DLQ_DELIVERIES_HEADER] == str(fate.MAX_DELIVER)
    assert "a bug" in by_request["r3"].headers[s.DLQ_ERROR_HEADER]
    assert TrainRequest.decode(by_request["r3"].data).seq_id == 3  # the body as published
    assert by_request["r-garbage"].data == b"\x00not json"


async def test_a_seq_id_gap_that_stays_open_fails_the_waiting_requests(
    bus: b.Bus, start_trainer
) -> None:
    await start_trainer("w1", gap_timeout_s=0.5)
    run_id = "sess-gap:train:0"
    await assign(bus, "w1", run_id)
    rid3 = await submit(bus, run_id, 3, fb())
    rid2 = await submit(bus, run_id, 2, OptimStep(adam=ADAM))  # seq 1 never comes
    for rid in (rid2, rid3):
        record = await wait_final(bus, rid, timeout_s=10)
        assert (record.status, record.category) == ("failed", "user")
        assert "seq_id 1" in (record.error or "") and "never reached" in (record.error or "")
    rid4 = await submit(bus, run_id, 4, fb())  # the run carries on after the gap
    assert (await wait_final(bus, rid4)).status == "done"


async def test_a_draining_trainer_hands_held_requests_back_and_its_restart_runs_them(
    bus: b.Bus, start_trainer
) -> None:
    worker = await start_trainer("w1")
    run_id = "sess-drain:train:0"
    await assign(bus, "w1", run_id)
    # The records the gateway and the scheduler keep, from which a restarted worker rebinds.
    run = TrainingRunRecord(
        run_id=run_id,
        tenant=TENANT,
        session_id="sess-drain",
        base_model=BUILTIN_MODEL_NAME,
        lora=LORA,
    )
    await b.kv_put(bus.kv[s.RUNS_BUCKET], s.token(run_id), run)
    await bus.kv[s.PLACEMENTS_BUCKET].put(s.token(run_id), b"w1")
    rid2 = await submit(bus, run_id, 2, OptimStep(adam=ADAM))
    rid3 = await submit(bus, run_id, 3, fb())
    await eventually(
        lambda: asyncio.sleep(0, len(worker.runs[run_id].buffer) == 2),
        what="seq 2 and 3 held for seq 1",
    )
    await worker.stop()  # SIGTERM's path: nothing held is lost, nothing ran
    info = await bus.js.consumer_info(s.TRAIN_STREAM, s.train_consumer(run_id))
    assert info.num_pending + info.num_ack_pending + info.num_redelivered >= 2
    assert (await b.future_record(bus, rid2)).status == "pending"

    await start_trainer("w1")  # the same worker restarted: it takes its placed run back
    rid1 = await submit(bus, run_id, 1, fb())
    for rid in (rid1, rid2, rid3):
        assert (await wait_final(bus, rid)).status == "done"


async def test_an_operator_lists_and_replays_a_dead_letter(
    bus: b.Bus, spawned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from whetstone.deadletter import list_dead_letters, replay

    monkeypatch.setattr(fate, "BACKOFF_S", (0.05, 0.05, 0.05, 0.05, 0.05))
    broken = {"yes": True}
    ran: list[int] = []

    async def handler(req: TrainRequest, msg: NatsMessage) -> None:
        if broken["yes"]:
            raise RuntimeError("the database is down")
        ran.append(req.seq_id)

    await b.subscribe(
        bus,
        handler,
        SUBJECT,
        stream=JStream(s.TRAIN_STREAM, declare=False),
        durable="replay-test",
        pull_sub=PullSub(batch_size=8, timeout=0.2),
        config=consumer_config(30),
        ack_policy=AckPolicy.MANUAL,
        decoder=decoder_for(TrainRequest),
        persistent=False,
    )
    await put_pending(bus, "r7", TENANT, "optim_step")
    await b.publish(bus, SUBJECT, request("r7", 7))
    assert (await wait_final(bus, "r7")).category == "server"

    [letter] = await list_dead_letters(bus)
    assert (letter.subject, letter.request_id) == (SUBJECT, "r7")
    assert letter.deliveries == fate.MAX_DELIVER
    assert "the database is down" in letter.error

    broken["yes"] = False  # the operator fixed the cause; replay the request
    assert await replay(bus, letter.seq) == SUBJECT
    await eventually(lambda: asyncio.sleep(0, ran == [7]), what="the replayed request ran")
    assert await list_dead_letters(bus) == []
