"""Many runs in one pass, through a real TrainerWorker on a real nats-server and the built-in
model: ready forward/forward_backward requests of several tenants' runs go through one
base-model pass, and their optim_steps through one optimizer call
(``whetstone_trainer_pass_runs`` says how many runs each pass had, by op), and each run gets
what it gets with passes of one request (``pass_max_runs=1``): the same losses, outputs and
weights after optim_step (each run its own AdamParams), its own usage events once each, every
message acknowledged. A request that fails its checks fails alone (a forward_backward missing
its loss inputs, an optim_step with AdamParams the engine refuses); a pass that fails as it runs
(a custom loss erring on a value) has its requests rerun one by one, leaving no gradient twice.

To have every request of a phase ready before the executor looks, the test holds the worker's
executor lock while it submits them (the executor picks and runs a pass under that lock).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import torch
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from services.trainer.engine import TrainerEngine
from services.trainer.handlers import TrainerWorker
from tests.integration.helpers import eventually, fetch, put_pending, wait_final
from whetstone import bus as b
from whetstone import metrics
from whetstone import subjects as s
from whetstone.custom_loss import CustomLoss
from whetstone.messages import (
    AdamParams,
    AssignReply,
    AssignRun,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    FutureRecord,
    LoraConfig,
    OptimStep,
    OptimStepResult,
    TrainCommand,
    TrainingRunRecord,
    TrainRequest,
    UsageEvent,
)
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.tensors import Tensor

pytestmark = pytest.mark.timeout(90)

ADAM = AdamParams(learning_rate=1e-2)
# Each run's step: a and b share hyperparameters (one AdamW launch), c clips and decays.
STEPS = {
    "a": ADAM,
    "b": ADAM,
    "c": AdamParams(learning_rate=2e-2, weight_decay=0.01, grad_clip_norm=0.05),
}
# Logical runs: (tenant, LoRA config); each phase of a test makes its own copies of them.
RUNS = {
    "a": ("tenant-a", LoraConfig(rank=4, seed=11)),
    "b": ("tenant-b", LoraConfig(rank=8, seed=12, train_unembed=False)),
    "c": ("tenant-c", LoraConfig(rank=2, seed=13, train_attn=False)),
}
LABELS = {"service": "trainer", "model": BUILTIN_MODEL_NAME}
FB, STEP = "forward_backward", "optim_step"  # the ops of the passes


def pick_loss(logprobs: Any, index: Any) -> Any:
    """A server-side custom loss: minus the logprobs at ``index`` (an index past the end fails
    as the graph runs, not when the inputs are checked)."""
    return -logprobs.gather(0, index.long()).sum(), {}


def upload(fn: Any, ranks: dict[str, int]) -> CustomLoss:
    """What the gateway stores for ``create_custom_loss``: the SDK's own trace and encoding."""
    handle = trace_loss(fn, ranks, "session-1")  # type: ignore[arg-type]
    graph = encode_graph(handle).model_dump(mode="json")
    return CustomLoss(
        name=handle.name, inputs=[i.model_dump() for i in handle.inputs], nodes=graph["nodes"]
    )


PICK = upload(pick_loss, {"logprobs": 1, "index": 1})


def datums(seed: int, loss: str, index_past_end: bool = False) -> list[Datum]:
    rng = random.Random(seed)
    out = []
    for _ in range(2):
        seq = [rng.randrange(2000) for _ in range(rng.randint(5, 9))]
        n = len(seq) - 1
        inputs = {"target_tokens": Tensor.from_list(seq[1:], "int64")}
        if loss == "importance_sampling":
            inputs["logprobs"] = Tensor.from_list([-rng.uniform(5, 9) for _ in range(n)], "float32")
            inputs["advantages"] = Tensor.from_list([rng.choice([-1.0, 1.0])] * n, "float32")
        elif loss == "custom":
            index = [n + 100 if index_past_end else rng.randrange(n) for _ in range(n)]
            inputs["index"] = Tensor.from_list([float(i) for i in index], "float32")
        out.append(Datum(model_input=Tensor.from_list(seq[:-1], "int64"), loss_fn_inputs=inputs))
    return out


def fb(seed: int, loss: str, forward_only: bool = False, **kwargs: bool) -> ForwardBackward:
    custom = {"loss_fn_config": {"loss_id": "pick"}, "custom_loss": PICK}
    return ForwardBackward(
        data=datums(seed, loss, **kwargs),
        loss_fn=loss,
        forward_only=forward_only,
        **(custom if loss == "custom" else {}),
    )


def missing_inputs() -> ForwardBackward:
    """importance_sampling without its ``logprobs`` and ``advantages``: fails its checks."""
    cmd = fb(7, "cross_entropy")
    return cmd.model_copy(update={"loss_fn": "importance_sampling"})


Counts = dict[str, tuple[float, float, float]]


def passes() -> Counts:
    """For each op: (passes, runs in them, passes of one run) so far, from the trainer's
    metrics."""
    got = {}
    for op in (FB, STEP):
        labels = {**LABELS, "op": op}
        count = metrics.REGISTRY.get_sample_value("whetstone_trainer_pass_runs_count", labels)
        total = metrics.REGISTRY.get_sample_value("whetstone_trainer_pass_runs_sum", labels)
        alone = metrics.REGISTRY.get_sample_value(
            "whetstone_trainer_pass_runs_bucket", {**labels, "le": "1.0"}
        )
        got[op] = (count or 0.0, total or 0.0, alone or 0.0)
    return got


def since(before: Counts) -> Counts:
    now = passes()
    return {
        op: (now[op][0] - was[0], now[op][1] - was[1], now[op][2] - was[2])
        for op, was in before.items()
    }


async def assign(bus: b.Bus, worker_id: str, run_id: str, logical: str) -> None:
    tenant, lora = RUNS[logical]
    run = TrainingRunRecord(
        run_id=run_id,
        tenant=tenant,
        session_id=run_id.split(":")[0],
        base_model=BUILTIN_MODEL_NAME,
        lora=lora,
    )
    request_id = f"create-{s.token(run_id)}"
    await put_pending(bus, request_id, tenant, "create_model")
    reply = await bus.nc.request(
        s.assign_subject(worker_id), AssignRun(request_id=request_id, run=run).encode(), timeout=30
    )
    assert AssignReply.decode(reply.data).ok


async def submit(bus: b.Bus, run_id: str, seq_id: int, command: TrainCommand) -> str:
    tenant = RUNS[run_id.split("-")[1].split(":")[0]][0]
    request_id = f"req-{s.token(run_id)}-{seq_id}"
    forward = isinstance(command, ForwardBackward) and command.forward_only
    await put_pending(bus, request_id, tenant, "forward" if forward else command.op)
    request = TrainRequest(
        request_id=request_id, tenant=tenant, run_id=run_id, seq_id=seq_id, command=command
    )
    await b.publish(bus, s.train_subject(run_id), request, msg_id=f"{s.token(run_id)}.{seq_id}")
    return request_id


@asynccontextmanager
async def all_ready(
    worker: TrainerWorker, heads: list[str], planted: dict[str, TrainCommand] | None = None
) -> Any:
    """Hold the executor while the block submits, until each run of ``heads`` has its next
    request in its buffer: then the executor sees them all at once. ``planted``: commands put
    in place of some runs' next requests where the worker holds them, for what the contract
    would refuse before it got there."""
    async with worker._executing:
        yield
        await eventually(
            lambda: _all_held(worker, heads), what="every request in the reorder buffers"
        )
        for run_id, command in (planted or {}).items():
            head = worker.runs[run_id].buffer.peek()
            assert head is not None
            head.req = head.req.model_copy(update={"command": command})


async def _all_held(worker: TrainerWorker, heads: list[str]) -> bool:
    return all(worker.runs[run_id].buffer.peek() is not None for run_id in heads)


async def usage_of(bus: b.Bus, run_ids: set[str]) -> list[tuple[UsageEvent, str]]:
    """Every usage event of ``run_ids`` on the USAGE stream (with its Nats-Msg-Id), taken off
    it (a work queue: what the test acknowledges is gone for the next call)."""
    sub = await bus.js.pull_subscribe(
        f"{s.USAGE_PREFIX}.>", durable="test-usage", stream=s.USAGE_STREAM
    )
    got: list[tuple[UsageEvent, str]] = []
    try:
        while batch := await fetch(sub, 100, 0.5):
            for msg in batch:
                event = UsageEvent.decode(msg.data)
                if event.run_id in run_ids:
                    got.append((event, (msg.headers or {}).get(s.MSG_ID_HEADER, "")))
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return got


async def nothing_left_unacked(bus: b.Bus, run_ids: list[str]) -> bool:
    for run_id in run_ids:
        info = await bus.js.consumer_info(s.TRAIN_STREAM, s.train_consumer(run_id))
        if info.num_pending or info.num_ack_pending:
            return False
    return True


def weights(worker: TrainerWorker | TrainerEngine, run_id: str) -> list[torch.Tensor]:
    engine = worker.engine if isinstance(worker, TrainerWorker) else worker
    return [p.detach().clone() for p in engine.runs[run_id].adapter.parameters()]


def assert_same_result(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    assert got.metrics.keys() == want.metrics.keys()
    for key in got.metrics:
        assert got.metrics[key] == pytest.approx(want.metrics[key], abs=1e-5, rel=1e-5), key
    for x, y in zip(getattr(got, "outputs", []), getattr(want, "outputs", []), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_allclose(x[key].to_numpy(), y[key].to_numpy(), atol=1e-5)


def assert_same_weights(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def rounds() -> Iterator[tuple[str, int, TrainCommand]]:
    """Each run's requests: a forward_backward (each run its own loss), a step, a forward."""
    losses = {"a": "cross_entropy", "b": "importance_sampling", "c": "custom"}
    for n, logical in enumerate(RUNS):
        yield logical, 1, fb(100 + n, losses[logical])
    for logical in RUNS:
        yield logical, 2, OptimStep(adam=STEPS[logical])
    for n, logical in enumerate(RUNS):
        yield logical, 3, fb(200 + n, losses[logical], forward_only=True)


async def train(
    bus: b.Bus, worker: TrainerWorker, phase: str
) -> tuple[dict[str, list[FutureRecord]], dict[str, list[torch.Tensor]]]:
    """Every run of RUNS through ``rounds`` on ``worker``; each run's futures and weights."""
    run_ids = {logical: f"{phase}-{logical}:train:0" for logical in RUNS}
    for logical, run_id in run_ids.items():
        await assign(bus, worker.settings.worker_id, run_id, logical)
    requests: dict[str, list[str]] = {logical: [] for logical in RUNS}
    plan = list(rounds())
    for seq_id in (1, 2, 3):
        batch = [(logical, cmd) for logical, n, cmd in plan if n == seq_id]
        async with all_ready(worker, list(run_ids.values())):
            for logical, cmd in batch:
                requests[logical].append(await submit(bus, run_ids[logical], seq_id, cmd))
        for logical, _ in batch:
            await wait_final(bus, requests[logical][-1])
    records = {
        logical: [await wait_final(bus, rid) for rid in rids] for logical, rids in requests.items()
    }
    assert all(r.status == "done" for rs in records.values() for r in rs), records
    ids = list(run_ids.values())
    await eventually(lambda: nothing_left_unacked(bus, ids), what="every request acknowledged")

    # Usage: one event per forward and forward_backward, with its own id, run and tenant.
    events = await usage_of(bus, set(ids))
    expected = {
        f"{rid}:{'train_tokens' if n == 0 else 'forward_tokens'}"
        for rids in requests.values()
        for n, rid in enumerate(rids)
        if n != 1  # the optim_step is free
    }
    assert sorted(e.event_id for e, _ in events) == sorted(expected)  # each once
    for event, msg_id in events:
        logical = event.run_id.split("-")[1].split(":")[0]
        assert msg_id == event.event_id and event.tenant == RUNS[logical][0]
        seq = 1 if event.meter == "train_tokens" else 3
        cmd = next(c for name, n, c in plan if name == logical and n == seq)
        assert isinstance(cmd, ForwardBackward)
        assert event.tokens == sum(d.model_input.numel for d in cmd.data)
    return records, {logical: weights(worker, run_id) for logical, run_id in run_ids.items()}


async def test_runs_of_three_tenants_train_in_one_pass_as_they_would_apart(
    bus: b.Bus, start_trainer
) -> None:
    apart = await start_trainer("apart", pass_max_runs=1)
    before = passes()
    records_apart, weights_apart = await train(bus, apart, "apart")
    # two rounds of three passes of one run, and three steps alone
    assert since(before) == {FB: (6.0, 6.0, 6.0), STEP: (3.0, 3.0, 3.0)}

    together = await start_trainer("together")  # pass_max_runs defaults to 8
    before = passes()
    records_together, weights_together = await train(bus, together, "together")
    # the forward_backwards, then the forwards; the three steps in one optimizer call
    assert since(before) == {FB: (2.0, 6.0, 0.0), STEP: (1.0, 3.0, 0.0)}

    for logical in RUNS:
        for got, want in zip(records_together[logical], records_apart[logical], strict=True):
            assert isinstance(got.result, ForwardBackwardResult | OptimStepResult)
            assert_same_result(got.result, want.result)
        assert_same_weights(weights_together[logical], weights_apart[logical])
    # Not vacuous: each run trained (its step moved its weights, so its losses differ).
    for logical, (first, _, forward) in records_together.items():
        assert isinstance(first.result, ForwardBackwardResult)
        assert isinstance(forward.result, ForwardBackwardResult)
        assert first.result.outputs and forward.result.outputs, logical
    for _, step, _ in records_together.values():
        assert isinstance(step.result, OptimStepResult)
        assert step.result.metrics["grad_norm:mean"] > 0
    clipped = records_together["c"][1].result
    assert isinstance(clipped, OptimStepResult)  # c's step clipped its gradient
    assert clipped.metrics["grad_norm:mean"] > STEPS["c"].grad_clip_norm


async def test_a_bad_request_fails_alone_and_a_failing_pass_reruns_one_by_one(
    bus: b.Bus, start_trainer, builtin_model
) -> None:
    worker = await start_trainer("w1")
    run_ids = {logical: f"bad-{logical}:train:0" for logical in RUNS}
    for logical, run_id in run_ids.items():
        await assign(bus, "w1", run_id, logical)
    heads = list(run_ids.values())
    plan = {
        # seq 1: b's request fails its checks, a and c share the pass.
        1: {"a": fb(1, "cross_entropy"), "b": missing_inputs(), "c": fb(2, "custom")},
        # seq 2: c's custom loss fails as the pass runs: a and b run again, alone.
        2: {
            "a": fb(3, "cross_entropy"),
            "b": fb(4, "importance_sampling"),
            "c": fb(5, "custom", index_past_end=True),
        },
        # seq 3: b's step has betas the engine refuses; a's and c's step in one call.
        3: {logical: OptimStep(adam=STEPS[logical]) for logical in RUNS},
    }
    # The contract refuses such AdamParams at the gateway and when the trainer decodes the
    # message, so the test puts b's step in place where the worker holds it, to reach the
    # engine's own check as the step pass runs.
    bad_step = OptimStep(adam=ADAM).model_copy(
        update={"adam": ADAM.model_copy(update={"beta1": 1.0})}
    )
    planted = {3: {run_ids["b"]: bad_step}}
    records: dict[int, dict[str, FutureRecord]] = {}
    counted: dict[int, Counts] = {}
    for seq_id, commands in plan.items():
        before = passes()
        async with all_ready(worker, heads, planted.get(seq_id)):
            rids = {k: await submit(bus, run_ids[k], seq_id, cmd) for k, cmd in commands.items()}
        records[seq_id] = {k: await wait_final(bus, rid) for k, rid in rids.items()}
        counted[seq_id] = since(before)

    nothing = (0.0, 0.0, 0.0)
    assert (records[1]["b"].status, records[1]["b"].category) == ("failed", "user")
    assert "logprobs" in (records[1]["b"].error or "")
    assert counted[1] == {FB: (1.0, 2.0, 0.0), STEP: nothing}  # a and c in one pass
    assert (records[2]["c"].status, records[2]["c"].category) == ("failed", "user")
    assert "gather" in (records[2]["c"].error or "")
    # the joint pass failed: a and b ran alone
    assert counted[2] == {FB: (2.0, 2.0, 2.0), STEP: nothing}
    assert (records[3]["b"].status, records[3]["b"].category) == ("failed", "user")
    assert "betas" in (records[3]["b"].error or "")
    assert counted[3] == {FB: nothing, STEP: (1.0, 2.0, 0.0)}  # a's and c's steps together
    failed = {(1, "b"), (2, "c"), (3, "b")}
    for seq_id, by_run in records.items():
        for logical, record in by_run.items():
            assert record.status == ("failed" if (seq_id, logical) in failed else "done")

    # The same requests, each in a pass of its own on an in-process engine (failed ones left
    # out): the same results, and the same weights after the step (the failed pass left no
    # gradient behind, or a's and b's would have counted twice; b's refused step moved nothing).
    reference = TrainerEngine(builtin_model)
    for logical, run_id in run_ids.items():
        reference.create_run(run_id, RUNS[logical][1])
        for seq_id, commands in plan.items():
            record, cmd = records[seq_id][logical], commands[logical]
            if (seq_id, logical) in failed:
                continue
            if isinstance(cmd, OptimStep):
                want: Any = reference.optim_step(run_id, cmd.adam)
            else:
                assert isinstance(cmd, ForwardBackward)
                want = reference.forward_backward(run_id, cmd)
            assert_same_result(record.result, want)
        assert_same_weights(weights(worker, run_id), weights(reference, run_id))
    await eventually(lambda: nothing_left_unacked(bus, heads), what="every request acknowledged")
    events = await usage_of(bus, set(heads))
    billed = [(1, "a"), (1, "c"), (2, "a"), (2, "b")]  # the failed requests bill nothing
    assert sorted(e.event_id for e, _ in events) == sorted(
        f"req-{s.token(run_ids[logical])}-{seq_id}:train_tokens" for seq_id, logical in billed
    )
