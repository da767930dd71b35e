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
from tinker import types

from services.sampler.engine import SamplerEngine
from services.sampler.handlers import SamplerWorker
from services.sampler.settings import SamplerSettings
from tests.integration.gateway_app import running_gateway
from tests.integration.helpers import eventually
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.keys import create_key
from whetstone.messages import StabilityRecord, UsageEvent
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.models.registry import default_registry

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
