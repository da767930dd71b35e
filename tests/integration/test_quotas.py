"""Quotas and fair sharing on a real nats-server, with an in-process gateway and real trainer
and sampler workers (built-in model, CPU), and the real tinker SDK where it says so.

* Over a tenant's in-flight quota a submission gets 429 with ``Retry-After`` and a JSON body,
  and nothing is consumed: no dedup record, no message (no ``Skip`` either: the same seq_id
  comes back), no usage; the request that unblocks its run's waiting successors is admitted
  over the limit; the retry of the refused one is accepted once in-flight work drained.
* Over the run quota ``create_model`` gets 429 and records nothing; a session that finishes
  frees its slot, and ``set_limits`` applies from the key's next request.
* The unmodified SDK behind a quota of one request in flight: its optim_step, posted while the
  forward_backward runs, is refused and retried until it goes through; the loop finishes and
  every token is billed once.
* An ``asample`` over the quota gets 429, and its retry with the same seq_id (what the SDK
  sends) runs once the sampler has drained the first; each request is billed once.
* A second tenant is served while the first floods the worker (completion order observed on
  the futures bucket, no sleeps), and the flood's futures held back report
  ``paused_rate_limit``.
* The count is shared by gateways and outlives them; the CLI sets a key's quotas.
* Slow, with ``whetstone up``'s real processes and a platform default quota
  (``WHETSTONE_DEFAULT_MAX_INFLIGHT``): the SDK's flood of samples is held to three in flight
  and resent, another tenant is served meanwhile, and billing counts every sample once.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import tinker
import uvicorn
from nats.js.errors import KeyNotFoundError, NotFoundError
from tinker import types

from services.gateway import metrics
from services.gateway.context import train_dedup_key
from services.sampler.engine import SamplerEngine
from services.sampler.handlers import SamplerWorker
from services.sampler.settings import SamplerSettings
from services.scheduler.handlers import Scheduler
from services.scheduler.settings import SchedulerSettings
from tests.integration.gateway_app import (
    PROTOBUF,
    client,
    create_run,
    fb_body,
    result_of,
    running_gateway,
)
from tests.integration.helpers import eventually
from tests.integration.test_gateway_submissions import assign, train_messages
from whetstone import bus as b
from whetstone import cli
from whetstone import subjects as s
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.cli import request_usage_report
from whetstone.keys import create_key, lookup_key, set_limits
from whetstone.messages import FutureRecord, UsageReportQuery
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.models.registry import default_registry
from whetstone.platform import start_platform

pytestmark = pytest.mark.timeout(180)  # a hang fails fast, with every thread's stack


async def post_fb(http: httpx.AsyncClient, run_id: str, seq_id: int) -> httpx.Response:
    return await http.post(
        "/api/v1/forward_backward",
        content=fb_body(run_id, seq_id),
        headers={"content-type": PROTOBUF},
    )


async def usage_messages(bus: b.Bus, tenant: str) -> int:
    """Usage events stored for ``tenant`` (no billing consumer runs here: they stay)."""
    subject = s.usage_subject(tenant)
    info = await bus.js.stream_info(s.USAGE_STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_over_the_inflight_quota_a_submission_gets_429_and_consumes_nothing(
    bus: b.Bus, nats_url: str, models_dir: Path, log, start_trainer
) -> None:
    await start_trainer("w1")
    key = await create_key(bus, "busy", max_inflight=2)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        # No trainer holds the run yet: seq 1 and 2 stay in flight, two of two (a run's
        # creation takes a run slot, not one of these).
        run_id, create_request_id = await create_run(http)
        waiting = [await post_fb(http, run_id, seq) for seq in (1, 2)]
        assert [w.status_code for w in waiting] == [200, 200], waiting[-1].text

        refused = await post_fb(http, run_id, 3)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["category"] == "user" and "in flight" in refused.json()["error"]
        # Nothing consumed: no dedup record for seq 3 and no message for it (no Skip either:
        # it would turn the SDK's retry of seq 3 into a refusal), nothing billed.
        assert await raw(bus, s.DEDUP_BUCKET, train_dedup_key(run_id, 3)) is None
        assert await train_messages(bus, run_id) == 2

        # The run lands on the trainer, its work drains, and the same seq_id (as the SDK sends
        # it again) is accepted.
        await assign(bus, "w1", run_id, create_request_id)
        for answer in waiting:
            await result_of(http, answer.json()["request_id"], accept=PROTOBUF)
        retried = await post_fb(http, run_id, 3)
        assert retried.status_code == 200, retried.text
        await result_of(http, retried.json()["request_id"], accept=PROTOBUF)

        # The SDK's chunked forward_backward: chunks 2..4 of a call at seq 4 posted first, the
        # first chunk last. Two take the slots; the third and the first are admitted over the
        # limit, since the accepted ones cannot run without them (no wedged run).
        chunks = [await post_fb(http, run_id, seq) for seq in (5, 6, 7)]
        chunks.append(await post_fb(http, run_id, 4))
        assert [c.status_code for c in chunks] == [200] * 4, [c.text for c in chunks]
        for answer in chunks:
            done = await result_of(http, answer.json()["request_id"], accept=PROTOBUF)
            assert PROTOBUF in done.headers["content-type"]

        # seven forward_backwards ran, each billed once; the refused attempt billed nothing
        async def billed_seven() -> bool:
            return await usage_messages(bus, "busy") == 7

        await eventually(billed_seven, what="one usage event per forward_backward")


async def test_over_the_run_quota_create_model_gets_429_until_a_session_finishes(
    bus: b.Bus, nats_url: str, models_dir: Path, log
) -> None:
    key = await create_key(bus, "small", max_runs=1)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        first_run, _ = await create_run(http)
        second = await new_run_body(http)
        refused = await http.post("/api/v1/create_model", json=second)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert "training runs" in refused.json()["error"]
        second_run = f"{second['session_id']}:train:0"
        assert await raw(bus, s.RUNS_BUCKET, s.token(second_run)) is None  # nothing recorded

        # the first session finishes: its run's slot is free
        first_session = first_run.split(":train:")[0]
        assert (await http.post(f"/api/v1/sessions/{first_session}/finish", json={})).is_success
        answer = await http.post("/api/v1/create_model", json=second)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_id"] == second_run

        # a third run is over the limit of one, until the operator raises it: the gateway
        # applies the new limit from the key's next request on
        third = await new_run_body(http)
        assert (await http.post("/api/v1/create_model", json=third)).status_code == 429
        await set_limits(bus, key, max_runs=2)

        async def accepted() -> bool:
            return (await http.post("/api/v1/create_model", json=third)).status_code == 200

        await eventually(accepted, what="create_model under the raised limit")
        assert await app.state.gateway.quotas.in_use("small", "runs") >= 2


async def new_run_body(http: httpx.AsyncClient) -> dict[str, object]:
    session = (await http.post("/api/v1/create_session", json={})).json()["session_id"]
    return {"session_id": session, "model_seq_id": 0, "base_model": BUILTIN_MODEL_NAME}


async def raw(bus: b.Bus, bucket: str, key: str) -> bytes | None:
    try:
        entry = await bus.kv[bucket].get(key)
    except (KeyNotFoundError, NotFoundError):
        return None
    return entry.value


class FinishOrder:
    """Every future that turns final, in order, from the futures bucket's change feed."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.states: dict[str, set[str]] = {}

    async def on_update(self, msg) -> None:  # a core NATS message of $KV.ws_futures.<id>
        if not msg.data:
            return
        record = FutureRecord.decode(msg.data)
        self.states.setdefault(record.request_id, set()).add(record.queue_state)
        if record.final and record.request_id not in self.done:
            self.done.append(record.request_id)


@pytest.mark.parametrize("pass_max_runs", [1, 8], ids=["one-at-a-time", "passes"])
async def test_a_second_tenant_is_served_while_the_first_floods(
    bus: b.Bus, nats_url: str, models_dir: Path, log, start_trainer, pass_max_runs: int
) -> None:
    """Requests run one at a time take turns by tenant; with passes, the quiet tenant's
    requests join the flood's passes instead, just as early."""
    worker = await start_trainer("w1", fair_share_report_s=0.0, pass_max_runs=pass_max_runs)
    order = FinishOrder()
    watch = await bus.nc.subscribe(f"$KV.{s.FUTURES_BUCKET}.>", cb=order.on_update)
    flood_key = await create_key(bus, "flood")
    quiet_key = await create_key(bus, "quiet")
    async with (
        running_gateway(nats_url, models_dir, log) as app,
        client(app, flood_key) as flood,
        client(app, quiet_key) as quiet,
    ):
        flood_run, flood_create = await create_run(flood)
        quiet_run, quiet_create = await create_run(quiet)
        await assign(bus, "w1", flood_run, flood_create)
        await assign(bus, "w1", quiet_run, quiet_create)
        # The flood: 30 requests queued on the worker, held for their seq_id 1.
        answers = [await post_fb(flood, flood_run, seq) for seq in range(2, 32)]
        worker_run = worker.runs[flood_run]

        async def all_held() -> bool:
            return len(worker_run.buffer) == 30

        await eventually(all_held, what="the flood held by the trainer")
        # The other tenant's request is queued behind it (its seq 2 held for its seq 1 too),
        # then both runs' first requests let everything go at once.
        quiet_answers = [await post_fb(quiet, quiet_run, 2)]
        answers.insert(0, await post_fb(flood, flood_run, 1))
        quiet_answers.insert(0, await post_fb(quiet, quiet_run, 1))
        flood_ids = {a.json()["request_id"] for a in answers}
        quiet_ids = [a.json()["request_id"] for a in quiet_answers]
        for request_id in quiet_ids:
            done = await result_of(quiet, request_id, accept=PROTOBUF)
            assert PROTOBUF in done.headers["content-type"]
        for answer in answers:
            await result_of(flood, answer.json()["request_id"], accept=PROTOBUF)

        async def all_seen() -> bool:
            return set(order.done) >= flood_ids | set(quiet_ids)

        await eventually(all_seen, what="every result on the futures feed")
        last_quiet = max(order.done.index(r) for r in quiet_ids)
        flood_done_before = sum(1 for r in order.done[:last_quiet] if r in flood_ids)
        # Tenants take turns: the quiet tenant's two requests ran among the first few of the 31
        # flood requests that were ready with them; in arrival order they would come after all.
        assert flood_done_before <= 6, (flood_done_before, order.done)
        if pass_max_runs == 1:
            # Flood requests passed over for the quiet tenant's turn said so while they waited.
            held = [r for r in flood_ids if "paused_rate_limit" in order.states.get(r, set())]
            assert held, order.states
    await watch.unsubscribe()


@asynccontextmanager
async def serving(app) -> AsyncIterator[str]:
    """``app`` on uvicorn on a free local port, in this event loop: its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def sft_steps(base_url: str, key: str, steps: int) -> list[float]:
    """A small SFT loop with the unmodified SDK (blocking: run it in a thread). Each step posts
    its optim_step while the forward_backward still runs, as the SDK always does; then it
    samples from the trained weights (``save_weights_and_get_sampling_client``)."""
    service = tinker.ServiceClient(base_url=base_url, api_key=key)
    try:
        training = service.create_lora_training_client(
            base_model=BUILTIN_MODEL_NAME, rank=4, seed=3
        ).result()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([5, 17, 99, 250, 3, 41]),
            loss_fn_inputs={"target_tokens": [17, 99, 250, 3, 41, 7]},
        )
        losses = []
        for _ in range(steps):
            fwd_bwd = training.forward_backward([datum] * 32, "cross_entropy")
            step = training.optim_step(types.AdamParams(learning_rate=1e-2))
            losses.append(fwd_bwd.result().metrics["loss:sum"])
            step.result()
        sampler = training.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints([5, 17, 99])
        sampled = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3)).result()
        assert len(sampled.sequences) == 1
        return losses
    finally:
        service.close("success").result()


async def test_the_sdk_retries_429_until_its_work_drains_and_is_billed_once(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, tmp_path: Path, log, start_trainer
) -> None:
    scheduler = Scheduler(SchedulerSettings(nats_url=nats_url, state_dir=tmp_path), bus, log)
    await scheduler.declare()
    await scheduler.start()
    await start_trainer("w1")
    await start_sampler(nats_url, models_dir, tmp_path, bus, log)
    key = await create_key(bus, "one-at-a-time", max_inflight=1)
    refusals = metrics.REFUSALS.labels("RateLimited", "user")
    refused_before = refusals._value.get()
    async with running_gateway(nats_url, models_dir, log) as app, serving(app) as base_url:
        losses = await asyncio.wait_for(asyncio.to_thread(sft_steps, base_url, key, 3), 150)
    assert losses[-1] < losses[0]
    # optim_steps posted while their forward_backward ran were refused, retried and accepted
    assert refusals._value.get() - refused_before >= 1
    # three forward_backwards and a sample (prefill and sample tokens) billed once each,
    # nothing for the refused attempts

    async def billed() -> bool:
        return await usage_messages(bus, "one-at-a-time") == 5

    await eventually(billed, what="one usage event per forward_backward")


async def start_sampler(nats_url: str, models_dir: Path, tmp_path: Path, bus: b.Bus, log) -> None:
    """A real sampler worker (built-in model, CPU) on the trainer's checkpoint store."""
    settings = SamplerSettings(nats_url=nats_url, state_dir=tmp_path, models_dir=models_dir)
    engine = SamplerEngine.from_spec(default_registry(models_dir).resolve(BUILTIN_MODEL_NAME))
    worker = SamplerWorker(
        settings, bus, engine, LocalCheckpointStore(tmp_path / "checkpoints"), log
    )
    await worker.declare()
    await worker.start()


async def test_an_asample_over_the_quota_gets_429_and_its_retry_with_the_same_seq_id_runs(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, tmp_path: Path, log
) -> None:
    key = await create_key(bus, "sampling", max_inflight=1)
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        session = (await http.post("/api/v1/create_session", json={})).json()["session_id"]
        answer = await http.post(
            "/api/v1/create_sampling_session",
            json={
                "session_id": session,
                "sampling_session_seq_id": 0,
                "base_model": BUILTIN_MODEL_NAME,
            },
        )
        sampler_id = answer.json()["sampling_session_id"]

        def body(seq_id: int) -> dict[str, object]:
            return {
                "sampling_session_id": sampler_id,
                "seq_id": seq_id,
                "num_samples": 1,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                "sampling_params": {"max_tokens": 3, "seed": 1},
            }

        # no sampler yet: the first request waits in the queue, in flight
        first = await http.post("/api/v1/asample", json=body(0))
        assert first.status_code == 200, first.text
        refused = await http.post("/api/v1/asample", json=body(1))
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert await raw(bus, s.DEDUP_BUCKET, f"{s.token(sampler_id)}.1") is None

        await start_sampler(nats_url, models_dir, tmp_path, bus, log)
        await result_of(http, first.json()["request_id"], accept=PROTOBUF)

        # the SDK sends the refused request again with the same seq_id: it runs now
        retried = await http.post("/api/v1/asample", json=body(1))
        assert retried.status_code == 200, retried.text
        done = await result_of(http, retried.json()["request_id"], accept=PROTOBUF)
        assert PROTOBUF in done.headers["content-type"]

        async def billed() -> bool:  # prefill and sample tokens of two requests, once each
            return await usage_messages(bus, "sampling") == 4

        await eventually(billed, what="two requests' usage, once")


async def test_the_cli_sets_a_keys_quotas(
    bus: b.Bus, nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def whetstone_keys(*argv: str) -> str:
        args = cli._parser().parse_args(["keys", *argv])
        assert await cli._keys(nats_url, args) == 0
        return capsys.readouterr().out

    key = (await whetstone_keys("create", "--tenant", "ops", "--max-runs", "2")).strip()
    record = await lookup_key(bus, key)
    assert record is not None and (record.max_runs, record.max_inflight) == (2, None)
    said = await whetstone_keys("set-limits", key[:8], "--max-inflight", "0")
    assert "max runs 2, max in flight no limit" in said
    record = await lookup_key(bus, key)
    assert record is not None and (record.max_runs, record.max_inflight) == (2, 0)
    await whetstone_keys("set-limits", key, "--max-runs", "default")
    listed = [line for line in (await whetstone_keys("list")).splitlines() if key[:8] in line]
    assert len(listed) == 1 and "default" in listed[0] and "none" in listed[0]
    with pytest.raises(SystemExit):  # argparse refuses a negative quota
        cli._parser().parse_args(["keys", "set-limits", key, "--max-runs", "-1"])


async def test_the_count_is_shared_by_gateways_and_outlives_them(
    bus: b.Bus, nats_url: str, models_dir: Path, log
) -> None:
    key = await create_key(bus, "two-doors", max_inflight=2)
    async with running_gateway(nats_url, models_dir, log) as one, client(one, key) as http:
        run_id, _ = await create_run(http)  # no trainer: seq 1 and 2 stay in flight
        assert [(await post_fb(http, run_id, seq)).status_code for seq in (1, 2)] == [200, 200]
    # the first gateway is gone; a new one (or any replica) sees the same two in flight
    async with (
        running_gateway(nats_url, models_dir, log) as two,
        running_gateway(nats_url, models_dir, log) as three,
        client(two, key) as http_two,
        client(three, key) as http_three,
    ):
        assert (await post_fb(http_two, run_id, 3)).status_code == 429
        assert (await post_fb(http_three, run_id, 3)).status_code == 429
        # another run of the tenant is created (that takes a run slot), but its first request
        # is refused too: the quota is the tenant's, not the run's
        other_run, _ = await create_run(http_three)
        answer = await post_fb(http_three, other_run, 1)
        assert answer.status_code == 429, answer.text
        # save_weights_and_get_sampling_client's save, refused: it leaves no sampling session
        save = await http_three.post(
            "/api/v1/save_weights_for_sampler",
            json={"model_id": other_run, "seq_id": 1, "sampling_session_seq_id": 5},
        )
        assert save.status_code == 429, save.text
        sampler_id = f"{other_run.split(':train:')[0]}:sample:5"
        assert await raw(bus, s.SAMPLERS_BUCKET, s.token(sampler_id)) is None
        assert (await http_three.get(f"/api/v1/samplers/{sampler_id}")).status_code == 404


# ---------------------------------------------------------------- the whole platform


@pytest.fixture(scope="module")
def limited_platform(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """``whetstone up``'s processes with a platform default of three requests in flight per
    tenant (a key without quotas of its own gets it) and held-back futures reported at once."""
    running = start_platform(
        tmp_path_factory.mktemp("limited"),
        port=0,
        models_dir=models_dir,
        extra_env={"WHETSTONE_DEFAULT_MAX_INFLIGHT": "3", "WHETSTONE_FAIR_SHARE_REPORT_S": "0"},
    )
    yield running
    running.stop()


@pytest.mark.slow  # its own platform: half a minute or more to start on two cores
def test_real_processes_a_flooding_tenant_is_limited_and_billed_once_another_served(
    limited_platform,
) -> None:
    platform = limited_platform

    async def keys() -> tuple[str, str]:
        bus_ = await b.connect(platform.nats_url, "test-keys")
        try:  # the flooder has the platform default, the other tenant no limit of its own
            return await create_key(bus_, "flooder"), await create_key(
                bus_, "patient", max_inflight=0
            )
        finally:
            await bus_.close()

    flooder_key, patient_key = asyncio.run(keys())
    prompt = types.ModelInput.from_ints([5, 17, 99, 250, 3])
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    flooder = tinker.ServiceClient(base_url=platform.base_url, api_key=flooder_key)
    patient = tinker.ServiceClient(base_url=platform.base_url, api_key=patient_key)
    try:
        flood_client = flooder.create_sampling_client(base_model=BUILTIN_MODEL_NAME).result()
        patient_client = patient.create_sampling_client(base_model=BUILTIN_MODEL_NAME).result()
        finished: list[str] = []
        flood = [flood_client.sample(prompt, 1, params).future() for _ in range(12)]
        for future in flood:
            future.add_done_callback(lambda _: finished.append("flooder"))
        mine = patient_client.sample(prompt, 1, params).future()
        mine.add_done_callback(lambda _: finished.append("patient"))
        assert len(mine.result(timeout=120).sequences) == 1
        assert all(len(f.result(timeout=120).sequences) == 1 for f in flood)
    finally:
        flooder.close("success").result()
        patient.close("success").result()
    # three of twelve at a time: the flood was refused (429) and resent by the SDK, and the
    # other tenant's request did not wait for the end of it
    refused = httpx.get(f"{platform.base_url}/metrics").text
    assert re.search(r'refusals_total\{category="user",reason="RateLimited"\} [1-9]', refused)
    assert finished.index("patient") < len(finished) - 1, finished

    def prefill_billed(tenant: str) -> int | None:
        report = asyncio.run(
            request_usage_report(platform.nats_url, UsageReportQuery(tenant=tenant))
        )
        rows = [r.tokens for r in report.rows if r.meter == "prefill_tokens"]
        return rows[0] if rows else None

    deadline = time.monotonic() + 60
    while prefill_billed("flooder") != 12 * prompt.length and time.monotonic() < deadline:
        time.sleep(0.5)  # billing consumes the usage stream on its own schedule
    assert prefill_billed("flooder") == 12 * prompt.length  # each sample once, refusals never
