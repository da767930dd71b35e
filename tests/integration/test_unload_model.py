"""``unload_model`` on a real nats-server with two in-process gateways (replicas behind one
address): the unload answers a done future naming the model, and every gateway refuses the
run's later requests at once (a cached run record is dropped when the record changes), without
queueing anything for it (an empty queue keeps the scheduler from placing it again). The
trainer's side (the run released and snapshotted) is exercised end to end in
``tests/e2e/test_conformance_sdk.py::test_unload_model_frees_the_run``."""

from __future__ import annotations

import pytest

from tests.integration.gateway_app import client, create_run, running_gateway
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.keys import create_key

pytestmark = pytest.mark.timeout(60)

TENANT = "tenant-u"
STEP = {"adam_params": {"learning_rate": 1e-3}, "type": "optim_step"}


async def queued(bus: b.Bus, run_id: str) -> int:
    info = await bus.js.stream_info(s.TRAIN_STREAM, subjects_filter=s.train_subject(run_id))
    return sum((info.state.subjects or {}).values())


async def test_an_unloaded_run_is_refused_by_every_gateway(
    bus: b.Bus, spawned: None, nats_url: str, models_dir, builtin_model, log
) -> None:
    key = await create_key(bus, TENANT)
    async with (
        running_gateway(nats_url, models_dir, log) as first,
        running_gateway(nats_url, models_dir, log) as second,
        client(first, key) as one,
        client(second, key) as two,
    ):
        run_id, _ = await create_run(one)
        info = await one.post("/api/v1/get_info", json={"model_id": run_id})
        assert info.status_code == 200  # the first gateway holds the run record now
        other = await create_key(bus, "tenant-other")
        async with client(second, other) as stranger:
            refused = await stranger.post("/api/v1/unload_model", json={"model_id": run_id})
            assert refused.status_code == 404

        answer = await two.post("/api/v1/unload_model", json={"model_id": run_id})
        assert answer.status_code == 200 and answer.json()["model_id"] == run_id
        result = await two.post(
            "/api/v1/retrieve_future", json={"request_id": answer.json()["request_id"]}
        )
        assert result.json() == {"type": "unload_model", "model_id": run_id}

        for http in (one, two):
            step = await http.post(
                "/api/v1/optim_step", json={"model_id": run_id, "seq_id": 1, **STEP}
            )
            assert step.status_code == 400 and "unloaded" in step.json()["error"]
            assert step.json()["category"] == "user"
            bad = await http.post(
                "/api/v1/optim_step",
                json={"model_id": run_id, "seq_id": 2, "adam_params": {"beta1": 5.0}},
            )
            assert bad.status_code == 400  # refused by the body's rules: still no Skip queued
        assert await queued(bus, run_id) == 0
        again = await one.post("/api/v1/unload_model", json={"model_id": run_id})
        assert again.status_code == 200  # unloading twice is fine
