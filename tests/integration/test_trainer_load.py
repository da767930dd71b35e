"""Loading checkpoints on a real TrainerWorker (real nats-server, the built-in model on the CPU):
``LoadWeights`` runs in the run's seq_id order and makes the run's state exactly the saved one
(adapter, AdamW moments and step), snapshotted at once; a run created from a checkpoint
(``TrainingRunRecord.initial``) starts from it, its creation future answers a load result, and
its first request is seq_id 1; a checkpoint that is gone fails the load as a user error while
the run carries on."""

from __future__ import annotations

import pytest
import torch

from tests.integration.helpers import eventually, put_pending, wait_final
from tests.integration.test_trainer_worker import ADAM, LORA, TENANT, assign, fb, submit
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath, store_key
from whetstone.messages import (
    AssignReply,
    AssignRun,
    InitialWeights,
    LoadWeights,
    LoadWeightsResult,
    OptimStep,
    RunProgress,
    SaveWeights,
    TrainingRunRecord,
)
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(120)

TOKENS = torch.tensor([[5, 17, 99, 250, 3, 41, 7, 60, 61]])


async def progress(bus: b.Bus, run_id: str) -> RunProgress:
    entry = await bus.kv[s.RUN_PROGRESS_BUCKET].get(s.token(run_id))
    return RunProgress.decode(entry.value or b"")


async def test_load_restores_the_saved_state_in_order_and_seeds_new_runs(
    bus: b.Bus, start_trainer
) -> None:
    worker = await start_trainer("w1")
    engine = worker.engine
    run_a = "sess-load:train:0"
    await assign(bus, "w1", run_a)
    await submit(bus, run_a, 1, fb())
    await submit(bus, run_a, 2, OptimStep(adam=ADAM))
    saved = await submit(bus, run_a, 3, SaveWeights(kind="training", name="s"))
    assert (await wait_final(bus, saved)).status == "done"
    logits_saved = engine.forward_logits(run_a, TOKENS)
    moments = {
        k: v.clone() for k, v in engine.runs[run_a].optimizer.state_dict()["state"][0].items()
    }
    step_saved = engine.runs[run_a].step
    await submit(bus, run_a, 4, fb())
    stepped = await submit(bus, run_a, 5, OptimStep(adam=ADAM))
    assert (await wait_final(bus, stepped)).status == "done"
    assert not torch.equal(engine.forward_logits(run_a, TOKENS), logits_saved)

    path = TinkerPath(run_a, "training", "s")
    key = store_key(TENANT, path)
    load = LoadWeights(tinker_path=str(path), store_key=key, optimizer=True)
    loaded = await wait_final(bus, await submit(bus, run_a, 6, load))
    assert loaded.result == LoadWeightsResult(path=str(path), model_id=run_a)
    assert torch.equal(engine.forward_logits(run_a, TOKENS), logits_saved)  # bit for bit
    assert engine.runs[run_a].step == step_saved
    state = engine.runs[run_a].optimizer.state_dict()["state"][0]
    assert all(torch.equal(state[k], v) for k, v in moments.items())
    # The load replaced the state: a snapshot covers it at once, so it is acknowledged.
    await eventually(lambda: _next_seq(bus, run_a, 7), what="a snapshot after the load")

    # A run created from the checkpoint starts from it; the load was its seq 0.
    run_b = "sess-load:train:1"
    record = TrainingRunRecord(
        run_id=run_b,
        tenant=TENANT,
        session_id="sess-load",
        base_model=BUILTIN_MODEL_NAME,
        lora=LORA,
        initial=InitialWeights(tinker_path=str(path), store_key=key, optimizer=True),
    )
    await put_pending(bus, "create-b", TENANT, "load_weights")
    reply = await bus.nc.request(
        s.assign_subject("w1"), AssignRun(request_id="create-b", run=record).encode(), timeout=30
    )
    assert AssignReply.decode(reply.data).ok
    created = await b.future_record(bus, "create-b")
    assert created is not None and created.result == LoadWeightsResult(
        path=str(path), model_id=run_b
    )
    assert torch.equal(engine.forward_logits(run_b, TOKENS), logits_saved)
    assert engine.runs[run_b].step == step_saved
    assert (await progress(bus, run_b)).next_seq_id == 1
    first = await wait_final(bus, await submit(bus, run_b, 1, fb(forward_only=True)))
    assert first.status == "done"

    # A checkpoint deleted meanwhile: the load fails as the user's error; the run goes on.
    worker.store.delete(key)
    gone = await wait_final(bus, await submit(bus, run_a, 7, load))
    assert gone.status == "failed" and gone.category == "user"
    assert "no longer exists" in (gone.error or "")
    after = await wait_final(bus, await submit(bus, run_a, 8, fb(forward_only=True)))
    assert after.status == "done"


async def _next_seq(bus: b.Bus, run_id: str, expected: int) -> bool:
    return (await progress(bus, run_id)).next_seq_id == expected
