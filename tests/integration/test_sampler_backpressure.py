"""The sampler through the real SDK and a real nats-server: an in-process gateway on a local port
(uvicorn) and a real ``SamplerWorker`` (the built-in model on the CPU).

* every sampling option of protocol.md 5.8-5.9 in one ``sample`` call of the unmodified SDK, and
  ``record_stability_info`` keeping the sequences in KV ``ws_stability`` under their ids;
* a repeated prompt served from the prefix cache: ``prompt_cache_hit_tokens`` in the SDK's
  response and ``cached_prefill_tokens`` on the bill;
* back-pressure: a sampler whose admission queue is full makes the gateway answer ``asample``
  with 429 and ``Retry-After``; the SDK resubmits the same seq_id, and every sample comes back
  exactly once (none lost, none failed);
* sampling queued for a session whose heartbeats stopped is dropped: its futures fail with a
  message that says so, and nothing of it is billed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import tinker
import uvicorn
from nats.js.errors import KeyNotFoundError, NotFoundError
from tinker import types

from services.gateway import metrics
from services.sampler.engine import SamplerEngine
from services.sampler.handlers import Batcher, SamplerWorker
from services.sampler.settings import SamplerSettings
from tests.integration.gateway_app import PROTOBUF, client, result_of, running_gateway
from tests.integration.helpers import eventually
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.errors import UserError
from whetstone.keys import create_key
from whetstone.messages import (
    SampleRequest,
    SamplingParams,
    StabilityRecord,
    UsageEvent,
)
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.models.registry import default_registry
from whetstone.tasks import Offload
from whetstone.tensors import Tensor

pytestmark = pytest.mark.timeout(180)

PROMPT = [5, 17, 99, 250, 3, 41, 7, 60, 61, 62]


@asynccontextmanager
async def serving(app) -> AsyncIterator[str]:
    """``app`` on uvicorn on a free local port, in this event loop: its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def raw_kv(bus: b.Bus, bucket: str, key: str) -> bytes | None:
    try:
        return (await bus.kv[bucket].get(key)).value
    except (KeyNotFoundError, NotFoundError):
        return None


async def start_sampler(
    bus: b.Bus, nats_url: str, tmp_path: Path, models_dir: Path, log, **settings: object
) -> SamplerWorker:
    config = SamplerSettings(
        nats_url=nats_url, state_dir=tmp_path, models_dir=models_dir, **settings
    )  # type: ignore[arg-type]
    config.worker_id = "sampler-test"
    engine = SamplerEngine.from_spec(default_registry(models_dir).resolve(BUILTIN_MODEL_NAME))
    worker = SamplerWorker(config, bus, engine, LocalCheckpointStore(tmp_path / "ck"), log)
    await worker.declare()
    await worker.start()
    return worker


def sample_every_option(base_url: str, key: str) -> types.SampleResponse:
    """One SDK ``sample`` asking for everything (blocking: run it in a thread)."""
    service = tinker.ServiceClient(base_url=base_url, api_key=key)
    try:
        sampler = service.create_sampling_client(
            base_model=BUILTIN_MODEL_NAME, record_stability_info=True
        ).result()
        target = np.full((len(PROMPT) - 1, 2), -1, dtype=np.int64)
        target[:, 0] = PROMPT[1:]
        return sampler.sample(
            types.ModelInput.from_ints(PROMPT),
            num_samples=2,
            sampling_params=types.SamplingParams(max_tokens=4, temperature=0.8, top_k=20, seed=4),
            include_prompt_logprobs=True,
            topk_prompt_logprobs=3,
            topk_sample_logprobs=2,
            target_prompt_logprobs=types.TensorData.from_numpy(target),
            prompt_alt_tokens_k=2,
            prompt_logprobs_last_n=4,
        ).result()
    finally:
        service.close("success").result()


async def test_every_sampling_option_through_the_sdk(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, tmp_path: Path, log
) -> None:
    key = await create_key(bus, "features")
    await start_sampler(bus, nats_url, tmp_path, models_dir, log)
    async with running_gateway(nats_url, models_dir, log) as app, serving(app) as base_url:
        response = await asyncio.wait_for(
            asyncio.to_thread(sample_every_option, base_url, key), 120
        )
    n = len(PROMPT)
    assert len(response.sequences) == 2
    for seq in response.sequences:
        assert len(seq.tokens) == 4 and seq.logprobs is not None
        assert seq.topk_logprobs is not None and len(seq.topk_logprobs) == 4
        for row, token, logprob in zip(seq.topk_logprobs, seq.tokens, seq.logprobs, strict=True):
            assert row is not None and len(row) == 2
            assert row[0][1] >= row[1][1]
            if token in dict(row):  # the sampled token's logprob is the same number
                assert dict(row)[token] == pytest.approx(logprob, abs=1e-6)
    plp = response.prompt_logprobs
    assert plp is not None and plp[: n - 4] == [None] * (n - 4)
    assert all(v is not None for v in plp[n - 4 :])
    topk = response.topk_prompt_logprobs
    assert topk is not None and topk[: n - 4] == [None] * (n - 4)
    assert all(row is not None and len(row) == 3 for row in topk[n - 4 :])
    target = response.target_prompt_logprobs
    assert target is not None
    scored = target.to_numpy()
    assert scored.shape == (n - 1, 2) and (scored[:, 1] == 0.0).all()
    # the target ids are the prompt itself: the same numbers as the prompt logprobs
    np.testing.assert_allclose(scored[n - 5 :, 0], plp[n - 4 :], atol=1e-6)
    assert response.prompt_alt_tokens is not None
    assert response.prompt_alt_tokens.tokens.to_numpy().shape == (n - 1, 2)
    assert response.prompt_cache_hit_tokens == 0

    # record_stability_info: both sequences kept under the request id of their sequence ids
    request_id, _, index = response.sequences[1].sequence_id.rpartition(":")
    assert index == "1"
    record = await b.kv_get(bus.kv[s.STABILITY_BUCKET], request_id, StabilityRecord)
    assert record is not None and record.tenant == "features"
    assert record.prompt.to_numpy().tolist() == PROMPT
    for kept, seq in zip(record.sequences, response.sequences, strict=True):
        assert kept.tokens.to_numpy().tolist() == seq.tokens
        np.testing.assert_allclose(kept.logprobs.to_numpy(), seq.logprobs, atol=0)


def sample_twice(base_url: str, key: str, prompt: list[int]) -> list[types.SampleResponse]:
    service = tinker.ServiceClient(base_url=base_url, api_key=key)
    try:
        sampler = service.create_sampling_client(base_model=BUILTIN_MODEL_NAME).result()
        params = types.SamplingParams(max_tokens=3, temperature=0.0)
        prompt_input = types.ModelInput.from_ints(prompt)
        return [sampler.sample(prompt_input, 2, params).result() for _ in range(2)]
    finally:
        service.close("success").result()


async def usage_of(bus: b.Bus, tenant: str) -> list[UsageEvent]:
    info = await bus.js.stream_info(s.USAGE_STREAM)
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        event = UsageEvent.decode((await bus.js.get_msg(s.USAGE_STREAM, seq)).data)
        if event.tenant == tenant:
            events.append(event)
    return events


async def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_billed_as_cached(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, tmp_path: Path, log
) -> None:
    key = await create_key(bus, "cached")
    await start_sampler(bus, nats_url, tmp_path, models_dir, log)
    prompt = list(range(100, 140))  # 40 tokens: two full 16-token blocks before the last token
    async with running_gateway(nats_url, models_dir, log) as app, serving(app) as base_url:
        call = asyncio.to_thread(sample_twice, base_url, key, prompt)
        first, second = await asyncio.wait_for(call, 120)
    assert first.prompt_cache_hit_tokens == 0 and second.prompt_cache_hit_tokens == 32
    assert [q.tokens for q in first.sequences] == [q.tokens for q in second.sequences]

    async def billed() -> bool:
        return len(await usage_of(bus, "cached")) == 5  # 2 + 3 meters

    await eventually(billed, what="both requests' usage")
    by_meter: dict[str, list[int]] = {}
    for event in await usage_of(bus, "cached"):
        by_meter.setdefault(event.meter, []).append(event.tokens)
    assert sorted(by_meter["prefill_tokens"]) == [8, 40]
    assert by_meter["cached_prefill_tokens"] == [32]
    assert by_meter["sample_tokens"] == [6, 6]


# ---------------------------------------------------------------- back-pressure


async def sampling_session(http) -> tuple[str, str]:
    session = (await http.post("/api/v1/create_session", json={"tags": []})).json()["session_id"]
    answer = await http.post(
        "/api/v1/create_sampling_session",
        json={
            "session_id": session,
            "sampling_session_seq_id": 0,
            "base_model": BUILTIN_MODEL_NAME,
        },
    )
    assert answer.status_code == 200, answer.text
    return session, answer.json()["sampling_session_id"]


def asample_body(sampler_id: str, seq_id: int) -> dict[str, object]:
    return {
        "sampling_session_id": sampler_id,
        "seq_id": seq_id,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 2, "seed": 1},
    }


BACKPRESSURE = {"X-Tinker-Sampling-Backpressure": "1"}


async def test_a_full_sampler_queue_answers_429_with_retry_after_and_keeps_nothing(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, tmp_path: Path, log
) -> None:
    key = await create_key(bus, "full")
    gateway = running_gateway(nats_url, models_dir, log, sample_queue_limit=2)
    async with gateway as app, client(app, key) as http:
        _, sampler_id = await sampling_session(http)
        # no sampler runs: the first two wait in the queue, the third finds it full
        accepted = []
        for seq_id in (0, 1):
            answer = await http.post(
                "/api/v1/asample", json=asample_body(sampler_id, seq_id), headers=BACKPRESSURE
            )
            assert answer.status_code == 200, answer.text
            accepted.append(answer.json()["request_id"])
        await asyncio.sleep(0.15)  # past the gateway's depth cache: the stream's own count
        refused = await http.post(
            "/api/v1/asample", json=asample_body(sampler_id, 2), headers=BACKPRESSURE
        )
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "full" in refused.json()["error"]
        assert await raw_kv(bus, s.DEDUP_BUCKET, f"{s.token(sampler_id)}.2") is None
        # a client that does not resubmit on 429 is queued regardless
        plain = await http.post("/api/v1/asample", json=asample_body(sampler_id, 3))
        assert plain.status_code == 200, plain.text
        accepted.append(plain.json()["request_id"])
        await start_sampler(bus, nats_url, tmp_path, models_dir, log)
        for request_id in accepted:
            done = await result_of(http, request_id, accept=PROTOBUF)
            assert PROTOBUF in done.headers["content-type"]
        # the refused seq_id, sent again once there is room, runs: the finished requests leave
        # the queue's count when the sampler acknowledges them, just after their results, so
        # resend as the SDK does while the answer is still 429
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            again = await http.post(
                "/api/v1/asample", json=asample_body(sampler_id, 2), headers=BACKPRESSURE
            )
            if again.status_code != 429 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        assert again.status_code == 200, again.text
        await result_of(http, again.json()["request_id"], accept=PROTOBUF)


def sample_many(base_url: str, key: str, count: int) -> list[types.SampleResponse]:
    """``count`` samples in flight at once from one SDK client (blocking)."""
    service = tinker.ServiceClient(base_url=base_url, api_key=key)
    try:
        sampler = service.create_sampling_client(base_model=BUILTIN_MODEL_NAME).result()
        params = types.SamplingParams(max_tokens=2, temperature=0.0)
        futures = [
            sampler.sample(types.ModelInput.from_ints([7, 8, 9 + i]), 1, params)
            for i in range(count)
        ]
        return [f.result(timeout=90) for f in futures]
    finally:
        service.close("success").result()


async def test_the_sdk_resubmits_on_429_and_every_sample_comes_back_once(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, tmp_path: Path, log
) -> None:
    key = await create_key(bus, "burst")
    refusals = metrics.REFUSALS.labels("RateLimited", "user")
    before = refusals._value.get()
    gateway = running_gateway(nats_url, models_dir, log, sample_queue_limit=2)
    async with gateway as app, serving(app) as base_url:
        call = asyncio.ensure_future(asyncio.to_thread(sample_many, base_url, key, 6))

        async def refused() -> bool:
            return refusals._value.get() > before

        await eventually(refused, timeout_s=20, what="an asample refused with 429")
        await start_sampler(bus, nats_url, tmp_path, models_dir, log)
        responses = await asyncio.wait_for(call, 120)
    assert [len(r.sequences[0].tokens) for r in responses] == [2] * 6

    async def billed() -> bool:
        return len(await usage_of(bus, "burst")) >= 12

    await eventually(billed, what="six requests' prefill and sample tokens")
    events = await usage_of(bus, "burst")
    assert len(events) == 12 and len({e.event_id for e in events}) == 12  # each billed once


# ---------------------------------------------------------------- sessions that went silent


async def test_sampling_queued_for_a_silent_session_is_cancelled(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, tmp_path: Path, log
) -> None:
    key = await create_key(bus, "silent")
    async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
        silent, silent_sampler = await sampling_session(http)
        queued = []
        for seq_id in range(3):
            answer = await http.post("/api/v1/asample", json=asample_body(silent_sampler, seq_id))
            queued.append(answer.json()["request_id"])
        await asyncio.sleep(1.2)  # no heartbeat: the session is silent past its TTL
        live, live_sampler = await sampling_session(http)

        async def heartbeats() -> None:  # the live session's client, beating as the SDK does
            while True:
                await http.post("/api/v1/session_heartbeat", json={"session_id": live})
                await asyncio.sleep(0.2)

        beating = asyncio.ensure_future(heartbeats())
        answer = await http.post("/api/v1/asample", json=asample_body(live_sampler, 0))
        served = answer.json()["request_id"]
        await start_sampler(bus, nats_url, tmp_path, models_dir, log, session_ttl_s=1.0)
        for request_id in queued:
            failed = (await result_of(http, request_id)).json()
            assert failed["category"] == "user", failed
            assert f"session {silent} has ended" in failed["error"]
            assert "cancelled" in failed["error"]
        done = await result_of(http, served, accept=PROTOBUF)  # a live session's runs
        assert PROTOBUF in done.headers["content-type"]
        beating.cancel()

    async def billed() -> bool:
        return len(await usage_of(bus, "silent")) == 2

    await eventually(billed, what="the live session's request billed")
    assert {e.request_id for e in await usage_of(bus, "silent")} == {served}


async def test_the_batcher_drops_the_queued_jobs_of_an_ended_session() -> None:
    """Jobs waiting in the Batcher's queues (not handed to the engine) of one session fail with
    the error given; another session's stay queued. The loop is not running: nothing is taken."""
    batcher = Batcher(engine=None, torch=None, max_batch=4)  # type: ignore[arg-type]

    def req(session: str, i: int) -> SampleRequest:
        return SampleRequest(
            request_id=f"{session}-{i}",
            tenant="t" if i % 2 else "u",
            base_model="tiny",
            prompt=Tensor.from_list([1, 2], "int64"),
            params=SamplingParams(max_tokens=1),
            session_id=session,
        )

    waiting = [
        asyncio.ensure_future(batcher.generate(req(session, i), None))
        for session in ("gone", "live")
        for i in range(3)
    ]
    await asyncio.sleep(0)
    assert batcher.sessions() == {"gone", "live"}
    assert batcher.drop_session("gone", UserError("session gone has ended")) == 3
    await asyncio.sleep(0)
    for fut in waiting[:3]:
        with pytest.raises(UserError, match="has ended"):
            fut.result()
    assert not any(fut.done() for fut in waiting[3:])
    assert batcher.sessions() == {"live"}
    for fut in waiting[3:]:
        fut.cancel()


async def test_the_batcher_takes_an_ended_sessions_running_jobs_out_of_the_engine(
    models_dir: Path,
) -> None:
    """A job of an ended session that the engine is already decoding fails with the error given,
    leaves the engine before its next step (its rows and KV blocks free again) and never yields a
    result; the other session's job, decoded beside it, completes as if alone."""
    engine = SamplerEngine.from_spec(default_registry(models_dir).resolve(BUILTIN_MODEL_NAME))
    free_blocks = engine.cache.allocator.num_free - len(engine.prefix)
    batcher = Batcher(engine=engine, torch=Offload("test-torch"), max_batch=4)

    def req(session: str, max_tokens: int) -> SampleRequest:
        return SampleRequest(
            request_id=session,
            tenant="t",
            base_model="tiny",
            prompt=Tensor.from_list([5, 6, 7], "int64"),
            num_samples=2,
            params=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=3),
            session_id=session,
        )

    loop = asyncio.ensure_future(batcher.run())
    try:
        gone = asyncio.ensure_future(batcher.generate(req("gone", 2000), None))
        live = asyncio.ensure_future(batcher.generate(req("live", 40), None))

        async def decoding() -> bool:
            return len(engine._running) == 4

        await eventually(decoding, what="both jobs decoding in the engine")
        assert batcher.sessions() == {"gone", "live"}
        assert batcher.drop_session("gone", UserError("session gone has ended")) == 1
        with pytest.raises(UserError, match="has ended"):
            await gone

        async def taken_out() -> bool:
            return all(q.req.request.request_id != "gone" for q in engine._running)

        await eventually(taken_out, timeout_s=2, what="the ended session's rows out of the engine")
        result = await asyncio.wait_for(live, 60)

        async def idle() -> bool:
            return not engine.has_work

        await eventually(idle, what="the engine idle once the live job is done")
    finally:
        loop.cancel()
    assert batcher.sessions() == set()
    assert engine.cache.allocator.num_free - len(engine.prefix) == free_blocks
    [alone] = engine.generate([(req("live", 40), None)])
    for got, want in zip(result.sequences, alone.sequences, strict=True):
        assert got.tokens.to_numpy().tolist() == want.tokens.to_numpy().tolist()
