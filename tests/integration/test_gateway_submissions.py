"""Submissions through an in-process gateway on a real nats-server, with a real trainer worker
(built-in model, CPU): a failed publish answers 503 and its retry publishes, so the request is
queued exactly once and runs once; and every refused training request fills its seq_id, so the
run's later requests still run."""

from __future__ import annotations

from pathlib import Path

import nats.errors
import pytest
from tinker.proto import tinker_public_pb2 as pb

from services.gateway.context import parse_dedup, train_dedup_key
from tests.integration.gateway_app import (
    PROTOBUF,
    client,
    create_run,
    fb_body,
    result_of,
    running_gateway,
)
from tests.integration.helpers import eventually
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.keys import create_key
from whetstone.messages import AssignReply, AssignRun, Message, TrainingRunRecord

pytestmark = pytest.mark.timeout(120)  # a hang fails fast, with every thread's stack

TENANT = "tenant-a"


async def train_messages(bus: b.Bus, run_id: str) -> int:
    """Messages stored on the run's subject (work-queue stream: until the trainer acks them)."""
    subject = s.train_subject(run_id)
    info = await bus.js.stream_info(s.TRAIN_STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def assign(bus: b.Bus, worker_id: str, run_id: str, create_request_id: str) -> None:
    """Hand the run to the worker as the scheduler does (no scheduler runs in these tests)."""
    run = await b.kv_get(bus.kv[s.RUNS_BUCKET], s.token(run_id), TrainingRunRecord)
    assert run is not None
    reply = await bus.nc.request(
        s.assign_subject(worker_id),
        AssignRun(request_id=create_request_id, run=run).encode(),
        timeout=30,
    )
    assert AssignReply.decode(reply.data).ok


@pytest.mark.parametrize("lost", ["before_the_stream", "the_ack"])
async def test_a_failed_publish_answers_503_and_the_retry_queues_it_exactly_once(
    bus: b.Bus,
    nats_url: str,
    models_dir: Path,
    builtin_model: Path,
    log,
    start_trainer,
    monkeypatch: pytest.MonkeyPatch,
    lost: str,
) -> None:
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        run_id, create_request_id = await create_run(http)
        real_publish = b.publish
        train_publishes: list[str] = []

        async def flaky_publish(
            bus_: b.Bus, subject: str, message: Message, msg_id: str | None = None
        ) -> None:
            if not subject.startswith(s.TRAIN_PREFIX):
                return await real_publish(bus_, subject, message, msg_id=msg_id)
            train_publishes.append(subject)
            if len(train_publishes) == 1 and lost == "before_the_stream":
                raise nats.errors.NoRespondersError
            await real_publish(bus_, subject, message, msg_id=msg_id)
            if len(train_publishes) == 1 and lost == "the_ack":  # stored, but we never heard
                raise nats.errors.TimeoutError

        monkeypatch.setattr(b, "publish", flaky_publish)
        body, headers = fb_body(run_id, 1), {"content-type": PROTOBUF}

        first = await http.post("/api/v1/forward_backward", content=body, headers=headers)
        assert first.status_code == 503, first.text  # the SDK retries 5xx
        assert first.json()["category"] == "server" and "retry" in first.json()["error"]
        assert await train_messages(bus, run_id) == (1 if lost == "the_ack" else 0)

        retry = await http.post("/api/v1/forward_backward", content=body, headers=headers)
        assert retry.status_code == 200, retry.text
        request_id = retry.json()["request_id"]
        assert len(train_publishes) == 2  # the retry published again...
        assert await train_messages(bus, run_id) == 1  # ...and the stream holds it once
        dedup = await bus.kv[s.DEDUP_BUCKET].get(train_dedup_key(run_id, 1))
        assert dedup.value is not None and parse_dedup(dedup.value) == (request_id, True)

        again = await http.post("/api/v1/forward_backward", content=body, headers=headers)
        assert again.json()["request_id"] == request_id
        assert len(train_publishes) == 2  # accepted and acknowledged: no publish at all

        await start_trainer("w1")
        await assign(bus, "w1", run_id, create_request_id)
        result = await result_of(http, request_id, accept=PROTOBUF)
        assert PROTOBUF in result.headers["content-type"]  # a ForwardBackwardOutput: it ran
        consumer = s.train_consumer(run_id)

        async def acknowledged() -> bool:  # the result is written first, the ack follows
            info = await bus.js.consumer_info(s.TRAIN_STREAM, consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(acknowledged, what="the trainer acknowledged the request")
        info = await bus.js.consumer_info(s.TRAIN_STREAM, consumer)
        assert info.delivered.consumer_seq == 1  # one message was ever delivered: it ran once


async def test_every_refused_training_request_fills_its_seq_id(
    bus: b.Bus, nats_url: str, models_dir: Path, builtin_model: Path, log, start_trainer
) -> None:
    key = await create_key(bus, TENANT)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        run_id, create_request_id = await create_run(http)
        await start_trainer("w1")
        await assign(bus, "w1", run_id, create_request_id)
        proto = {"content-type": PROTOBUF}

        # seq 1: a load_state of a checkpoint that does not exist
        answer = await http.post(
            "/api/v1/load_weights",
            json={
                "model_id": run_id,
                "seq_id": 1,
                "path": f"tinker://{run_id}/weights/x",
                "optimizer": False,
                "type": "load_weights",
            },
        )
        assert answer.status_code == 404
        assert "unknown checkpoint" in answer.json()["error"]
        assert answer.json()["category"] == "user"
        # seq 2: AdamParams out of range (refused by the contract model itself)
        answer = await http.post(
            "/api/v1/optim_step",
            json={
                "model_id": run_id,
                "seq_id": 2,
                "adam_params": {"learning_rate": 1e-3, "beta1": 1.0},
            },
        )
        assert answer.status_code == 400 and answer.json()["category"] == "user"
        assert "beta1" in answer.json()["error"]
        # seq 3: protobuf that parses (model_id and seq_id readable) but does not translate
        bad = pb.ForwardBackwardRequest.FromString(fb_body(run_id, 3))
        bad.data[0].loss_fn_inputs["target_tokens"].dtype = pb.DTYPE_UNSPECIFIED
        answer = await http.post(
            "/api/v1/forward_backward", content=bad.SerializeToString(), headers=proto
        )
        assert answer.status_code == 400 and "dtype" in answer.json()["error"]
        # seq 4: forward_backward sent as JSON
        answer = await http.post("/api/v1/forward_backward", json={"model_id": run_id, "seq_id": 4})
        assert answer.status_code == 400 and "protobuf" in answer.json()["error"]
        # seq 5: a checkpoint name the store refuses
        answer = await http.post(
            "/api/v1/save_weights",
            json={"model_id": run_id, "seq_id": 5, "path": "../escape", "type": "save_weights"},
        )
        assert answer.status_code == 400 and "checkpoint name" in answer.json()["error"]
        # A refusal of a run that does not exist has no gap to fill, and publishes nothing.
        answer = await http.post(
            "/api/v1/no_such_endpoint", json={"model_id": "sess-x:train:0", "seq_id": 1}
        )
        assert answer.status_code == 404
        assert await train_messages(bus, "sess-x:train:0") == 0

        for seq_id in range(1, 6):
            entry = await bus.kv[s.DEDUP_BUCKET].get(train_dedup_key(run_id, seq_id))
            assert entry.value is not None and parse_dedup(entry.value) == ("refused", True)

        # seq 6 and 7 run: without the five Skips the trainer would wait for seq 1 forever.
        train = await http.post(
            "/api/v1/forward_backward", content=fb_body(run_id, 6), headers=proto
        )
        step = await http.post(
            "/api/v1/optim_step",
            json={"model_id": run_id, "seq_id": 7, "adam_params": {"learning_rate": 1e-3}},
        )
        assert train.status_code == 200 and step.status_code == 200, (train.text, step.text)
        result = await result_of(http, train.json()["request_id"], accept=PROTOBUF)
        assert PROTOBUF in result.headers["content-type"]
        stepped = (await result_of(http, step.json()["request_id"])).json()
        assert "error" not in stepped, stepped

        # Resubmitting a refused seq_id is refused again, and fills nothing twice.
        answer = await http.post(
            "/api/v1/optim_step",
            json={"model_id": run_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}},
        )
        assert answer.status_code == 400 and "refused before" in answer.json()["error"]
