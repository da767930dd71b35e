"""The bus under stress, against a platform of real processes:

* garbage on every subject a service consumes: every service keeps serving (a training run,
  sampling, placement and the usage report all work afterwards), and each piece of garbage lands
  in the dead-letter stream, where an operator can read it with its original subject;
* a forward_backward chunk near the SDK's largest (about 5 MB) travels through the object store
  (its bus message would pass the server's limit) and trains;
* the workers' metrics move after a short run."""

from __future__ import annotations

import asyncio
import json

import httpx
import nats.errors
import numpy as np
import pytest
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.cli import request_usage_report
from whetstone.messages import UsageReportQuery
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(300)

GARBAGE = [b"", b"\x00\xff not json", b'{"request_id": "x"}', b"[1, 2, 3]"]


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def train_step(training: tinker.TrainingClient) -> float:
    result = training.forward_backward(
        [datum([5, 17, 99, 250, 3, 41, 7])], "cross_entropy"
    ).result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    return result.metrics["loss:sum"]


async def trainer_worker_id(bus: b.Bus) -> str:
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def on_beat(msg) -> None:  # type: ignore[no-untyped-def]
        await seen.put(s.untoken(msg.subject.split(".")[-1]))

    sub = await bus.nc.subscribe(f"{s.HEARTBEAT_PREFIX}.trainer.*", cb=on_beat)
    try:
        return await asyncio.wait_for(seen.get(), 10)
    finally:
        await sub.unsubscribe()


async def spray(nats_url: str, run_id: str) -> set[str]:
    """Publish GARBAGE on every consumed subject; returns the subjects used."""
    bus = await b.connect(nats_url, "test-garbage")
    try:
        worker = await trainer_worker_id(bus)
        durable = [
            s.train_subject(run_id),
            s.sample_subject(BUILTIN_MODEL_NAME),
            s.PLACE_SUBJECT,
            s.usage_subject("default"),
        ]
        core = [
            s.assign_subject(worker),
            s.heartbeat_subject("trainer", "garbage-worker"),
            s.USAGE_REPORT_SUBJECT,
        ]
        for subject in durable:
            for body in GARBAGE:
                await bus.js.publish(subject, body, headers={"content-type": "application/json"})
        for subject in core:
            for body in GARBAGE:
                try:  # request/reply subjects get a request; no answer is fine
                    await bus.nc.request(subject, body, timeout=0.5)
                except nats.errors.Error:
                    pass
        await bus.kv[s.FUTURES_BUCKET].put("garbage-future", b"\x00garbage")  # the gateway watches
        await bus.nc.flush()
        return set(durable + core)
    finally:
        await bus.close()


async def dead_lettered_subjects(
    nats_url: str, want: set[str], timeout_s: float = 30.0
) -> set[str]:
    bus = await b.connect(nats_url, "test-dlq")
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            info = await bus.js.stream_info(s.DEADLETTER_STREAM)
            found: set[str] = set()
            for seq in range(info.state.first_seq or 1, (info.state.last_seq or 0) + 1):
                try:
                    msg = await bus.js.get_msg(s.DEADLETTER_STREAM, seq)
                except Exception:  # noqa: BLE001 - a gap in the sequence
                    continue
                found.add(msg.headers[s.DLQ_SUBJECT_HEADER])
            if want <= found or loop.time() > deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await bus.close()


def test_garbage_on_every_subject_leaves_every_service_serving(platform) -> None:
    service = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    training = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=4, seed=0
    ).result()
    first = train_step(training)

    used = asyncio.run(spray(platform.nats_url, training.model_id))

    # Every service still works: the same run trains on, a new run is placed, sampling answers,
    # and billing reports.
    later = [train_step(training) for _ in range(3)]
    assert later[-1] < first
    other = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=4, seed=1
    ).result()
    train_step(other)
    sampler = training.save_weights_and_get_sampling_client().result()
    out = sampler.sample(
        types.ModelInput.from_ints([5, 17, 99]),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=4),
    ).result()
    assert len(out.sequences) == 1
    report = asyncio.run(
        request_usage_report(platform.nats_url, UsageReportQuery(tenant="default"))
    )
    assert report.error is None and any(r.meter == "train_tokens" for r in report.rows)
    for name, proc in platform.children.items():
        assert proc.poll() is None, f"{name} exited"

    found = asyncio.run(dead_lettered_subjects(platform.nats_url, used))
    assert used <= found, f"not dead-lettered: {used - found}"


def test_a_chunk_near_the_sdks_largest_trains(platform) -> None:
    """One datum whose N x K cross-entropy targets make a ~5 MB chunk: as a bus message (JSON,
    base64 tensors) it passes the server's 8 MB limit less headroom, so it goes through the
    object store, and the trainer runs it."""
    service = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    training = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=4, seed=0
    ).result()
    n, k = 1000, 400  # targets int64 (3.2 MB) and weights float32 (1.6 MB): 4.8 MB
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2000, size=n).tolist()
    targets = rng.integers(0, 2000, size=(n, k))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(targets),
            "weights": types.TensorData.from_numpy(np.ones((n, k), np.float32)),
        },
    )
    result = training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert np.isfinite(result.metrics["loss:sum"]) and result.metrics["loss:sum"] > 0
    assert len(result.loss_fn_outputs) == 1

    async def offloaded() -> int:
        bus = await b.connect(platform.nats_url, "test-payloads")
        try:
            return len([o async for o in _objects(bus)])
        finally:
            await bus.close()

    assert asyncio.run(offloaded()) >= 1  # the chunk really went through the object store


async def _objects(bus: b.Bus):  # type: ignore[no-untyped-def]
    for info in await bus.payloads.list():
        yield info


def _metrics_urls(platform) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Each worker's metrics URL, from its start-up line (``WHETSTONE_METRICS_PORT`` is 0)."""
    urls = {}
    for name in ("trainer", "sampler", "scheduler", "billing"):
        for line in (platform.state_dir / "logs" / f"{name}.log").read_text().splitlines():
            if '"metrics and health"' in line:
                urls[name] = json.loads(line)["url"]  # the latest start wins
    return urls


def _sample_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_the_workers_metrics_move_after_a_short_run(platform) -> None:
    urls = _metrics_urls(platform)
    assert set(urls) == {"trainer", "sampler", "scheduler", "billing"}
    before = httpx.get(urls["trainer"], timeout=10).text
    service = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    training = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=4, seed=2
    ).result()
    for _ in range(3):
        train_step(training)
    sampler = training.save_weights_and_get_sampling_client().result()
    sampler.sample(
        types.ModelInput.from_ints([5, 17, 99]),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=4),
    ).result()

    after = httpx.get(urls["trainer"], timeout=10).text
    metric, labels = "whetstone_tokens_total", {"service": "trainer", "meter": "train_tokens"}
    trained = _sample_value(after, metric, **labels) - _sample_value(before, metric, **labels)
    assert trained >= 18
    assert _sample_value(after, "whetstone_requests_total", service="trainer", op="optim_step") >= 3
    assert _sample_value(after, "whetstone_queue_wait_seconds_count", service="trainer") > 0
    assert _sample_value(after, "whetstone_adapters_resident", service="trainer") >= 1
    sampler_metrics = httpx.get(urls["sampler"], timeout=10).text
    sampled = {"service": "sampler", "meter": "sample_tokens"}
    assert _sample_value(sampler_metrics, "whetstone_tokens_total", **sampled) >= 1
    for name in ("scheduler", "billing"):
        ready = httpx.get(urls[name].replace("/metrics", "/readyz"), timeout=10)
        assert ready.status_code == 200, name
        assert httpx.get(urls[name].replace("/metrics", "/livez"), timeout=10).status_code == 200
