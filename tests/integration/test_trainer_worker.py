"""TrainerWorker on a real nats-server and the built-in model: assignment by request/reply (as
the scheduler does it), a run's requests executed in seq_id order whatever order they arrive in,
Skip filling gaps, user errors failing one future only, usage events with deterministic ids, and
nothing left unacknowledged.

Every request is published the way the gateway publishes it: pending future first, then the
message on ``ws.train.<run>`` with ``Nats-Msg-Id = <run token>.<seq_id>``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from services.trainer.engine import TrainerEngine
from tests.integration.helpers import eventually, fetch, put_pending, wait_final
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.messages import (
    AdamParams,
    AssignReply,
    AssignRun,
    CreateModelResult,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoraConfig,
    OptimStep,
    OptimStepResult,
    Skip,
    TrainCommand,
    TrainingRunRecord,
    TrainRequest,
    UsageEvent,
)
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.tensors import Tensor

pytestmark = pytest.mark.timeout(60)  # a hang fails fast, with every thread's stack

TENANT = "tenant-a"
LORA = LoraConfig(rank=4, seed=1234)
ADAM = AdamParams(learning_rate=1e-2)
SEQS = [[5, 17, 99, 250, 3, 41, 7], [60, 61, 62, 63, 64], [1000, 2, 300, 4, 1500, 6, 70, 8, 9]]


def datum(seq: list[int]) -> Datum:
    return Datum(
        model_input=Tensor.from_list(seq[:-1], "int64"),
        loss_fn_inputs={"target_tokens": Tensor.from_list(seq[1:], "int64")},
    )


def fb(forward_only: bool = False) -> ForwardBackward:
    return ForwardBackward(
        data=[datum(q) for q in SEQS], loss_fn="cross_entropy", forward_only=forward_only
    )


def tokens_of(cmd: ForwardBackward) -> int:
    return sum(d.model_input.numel for d in cmd.data)


async def assign(bus: b.Bus, worker_id: str, run_id: str) -> None:
    """Ask the worker to take the run exactly as the scheduler does, and check its create_model
    future."""
    run = TrainingRunRecord(
        run_id=run_id,
        tenant=TENANT,
        session_id=run_id.split(":")[0],
        base_model=BUILTIN_MODEL_NAME,
        lora=LORA,
    )
    request_id = f"create-{s.token(run_id)}"
    await put_pending(bus, request_id, TENANT, "create_model")
    reply = await bus.nc.request(
        s.assign_subject(worker_id), AssignRun(request_id=request_id, run=run).encode(), timeout=30
    )
    assert AssignReply.decode(reply.data).ok
    record = await b.future_record(bus, request_id)
    assert record is not None and record.status == "done"
    assert record.result == CreateModelResult(model_id=run_id)


async def submit(bus: b.Bus, run_id: str, seq_id: int, command: TrainCommand) -> str:
    request_id = f"req-{s.token(run_id)}-{seq_id}"
    if not isinstance(command, Skip):  # a Skip has no future: nobody waits for it
        op = (
            "forward"
            if isinstance(command, ForwardBackward) and command.forward_only
            else command.op
        )
        await put_pending(bus, request_id, TENANT, op)
    request = TrainRequest(
        request_id=request_id, tenant=TENANT, run_id=run_id, seq_id=seq_id, command=command
    )
    await b.publish(bus, s.train_subject(run_id), request, msg_id=f"{s.token(run_id)}.{seq_id}")
    return request_id


async def usage_events(
    bus: b.Bus, count: int, timeout_s: float = 10.0
) -> list[tuple[UsageEvent, str]]:
    """Read ``count`` usage events of TENANT (with their Nats-Msg-Id) off the USAGE stream."""
    sub = await bus.js.pull_subscribe(
        s.usage_subject(TENANT), durable="test-usage", stream=s.USAGE_STREAM
    )
    got: list[tuple[UsageEvent, str]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while len(got) < count and loop.time() < deadline:
            for msg in await fetch(sub, count, 0.5):
                got.append(
                    (UsageEvent.decode(msg.data), (msg.headers or {}).get(s.MSG_ID_HEADER, ""))
                )
                await msg.ack()
        assert not await fetch(sub, 10, 0.3), "more usage events than expected"
    finally:
        await sub.unsubscribe()  # a pull subscription left behind can stall the bus's drain
    return got


async def nothing_left_unacked(bus: b.Bus, run_id: str) -> bool:
    info = await bus.js.consumer_info(s.TRAIN_STREAM, s.train_consumer(run_id))
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_out_of_order_requests_run_in_seq_order_like_an_in_process_engine(
    bus: b.Bus, start_trainer, builtin_model: Path
) -> None:
    run_id = "sess-1:train:0"
    await start_trainer("w1")
    await assign(bus, "w1", run_id)

    # optim_step and the forward arrive before the forward_backward they depend on.
    train, step, forward = fb(), OptimStep(adam=ADAM), fb(forward_only=True)
    rid3 = await submit(bus, run_id, 3, forward)
    rid2 = await submit(bus, run_id, 2, step)
    await asyncio.sleep(0.5)
    for rid in (rid2, rid3):  # held in the reorder buffer: seq 1 has not run
        record = await b.future_record(bus, rid)
        assert record is not None and record.status == "pending"
    rid1 = await submit(bus, run_id, 1, train)
    r1, r2, r3 = [await wait_final(bus, rid) for rid in (rid1, rid2, rid3)]
    assert (r1.status, r2.status, r3.status) == ("done", "done", "done")
    assert isinstance(r1.result, ForwardBackwardResult) and isinstance(
        r3.result, ForwardBackwardResult
    )
    assert isinstance(r2.result, OptimStepResult)
    assert r3.op == "forward" and r1.op == "forward_backward"

    # The same commands in seq order on a separate in-process engine with the same LoRA seed.
    ref = TrainerEngine(builtin_model)
    ref.create_run(run_id, LORA)
    e1, e2, e3 = (
        ref.forward_backward(run_id, train),
        ref.optim_step(run_id, ADAM),
        ref.forward_backward(run_id, forward),
    )
    assert r1.result.metrics["loss:sum"] == pytest.approx(e1.metrics["loss:sum"], abs=1e-5)
    assert r2.result.metrics["grad_norm:mean"] == pytest.approx(
        e2.metrics["grad_norm:mean"], rel=1e-5
    )
    assert r3.result.metrics["loss:sum"] == pytest.approx(e3.metrics["loss:sum"], abs=1e-5)
    for got, want in zip(r3.result.outputs, e3.outputs, strict=True):
        np.testing.assert_allclose(
            got["logprobs"].to_numpy(), want["logprobs"].to_numpy(), atol=1e-5
        )
    # The step moved the weights, so running seq 3 before seq 2 could not have matched.
    assert abs(e3.metrics["loss:sum"] - e1.metrics["loss:sum"]) > 1e-3

    events = await usage_events(bus, 2)
    by_id = {e.event_id: (e, msg_id) for e, msg_id in events}
    assert set(by_id) == {f"{rid1}:train_tokens", f"{rid3}:forward_tokens"}  # optim_step is free
    for event_id, (event, msg_id) in by_id.items():
        assert msg_id == event_id  # JetStream dedups a re-publish of the same event
        assert (event.tenant, event.run_id, event.base_model) == (
            TENANT,
            run_id,
            BUILTIN_MODEL_NAME,
        )
        assert event.tokens == tokens_of(train)
    await eventually(lambda: nothing_left_unacked(bus, run_id), what="every request acknowledged")


async def test_skip_fills_a_gap_and_a_user_error_fails_only_its_future(
    bus: b.Bus, start_trainer
) -> None:
    run_id = "sess-2:train:0"
    await start_trainer("w1")
    await assign(bus, "w1", run_id)

    bad = ForwardBackward(
        data=[
            Datum(
                model_input=Tensor.from_list([1, 2, 3], "int64"),
                loss_fn_inputs={"target_tokens": Tensor.from_list([2, 3], "int64")},
            )
        ],
        loss_fn="cross_entropy",
    )
    good = fb()
    rid4 = await submit(bus, run_id, 4, good)
    rid3 = await submit(bus, run_id, 3, bad)
    rid2 = await submit(bus, run_id, 2, fb(forward_only=True))
    await submit(bus, run_id, 1, Skip(reason="refused by the gateway"))

    r2, r3, r4 = [await wait_final(bus, rid) for rid in (rid2, rid3, rid4)]
    assert r2.status == "done"  # seq 1 was a Skip: seq 2 did not wait for it
    assert (r3.status, r3.category) == ("failed", "user")
    assert "target_tokens" in (r3.error or "")
    assert r4.status == "done" and isinstance(r4.result, ForwardBackwardResult)

    # A second copy of seq 4 (another publish, another request id) is acknowledged, not run
    # again, and its future says why instead of hanging.
    dup = TrainRequest(request_id="req-dup", tenant=TENANT, run_id=run_id, seq_id=4, command=good)
    await put_pending(bus, "req-dup", TENANT, "forward_backward")
    await b.publish(bus, s.train_subject(run_id), dup, msg_id="another-msg-id")
    await eventually(lambda: nothing_left_unacked(bus, run_id), what="every request acknowledged")
    dup_record = await b.future_record(bus, "req-dup")
    assert (dup_record.status, dup_record.category, dup_record.result) == ("failed", "user", None)
    assert "moved past it" in (dup_record.error or "")

    events = await usage_events(bus, 2)  # the failed request and the Skip bill nothing
    assert {e.event_id for e, _ in events} == {f"{rid2}:forward_tokens", f"{rid4}:train_tokens"}


async def test_a_held_request_stays_unacknowledged_after_redelivery(
    bus: b.Bus, start_trainer
) -> None:
    """The reorder buffer's promise: held requests stay unacknowledged, so a crash loses nothing.
    With a short ack wait, the held seq 2 is redelivered while seq 1 is missing."""
    run_id = "sess-3:train:0"
    await start_trainer("w1", ack_wait_s=0.5)
    await assign(bus, "w1", run_id)
    await submit(bus, run_id, 2, fb(forward_only=True))
    await asyncio.sleep(2.0)  # past the ack wait: the server redelivers seq 2 to the pump
    info = await bus.js.consumer_info(s.TRAIN_STREAM, s.train_consumer(run_id))
    stream = await bus.js.stream_info(s.TRAIN_STREAM)
    assert info.delivered.consumer_seq >= 2, "seq 2 was never redelivered: the test proves nothing"
    assert (await b.future_record(bus, f"req-{s.token(run_id)}-2")).status == "pending"
    assert stream.state.messages == 1, (
        "seq 2 was acknowledged (deleted from the stream) before it ran"
    )
    assert info.num_ack_pending == 1
