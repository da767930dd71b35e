"""The sampler's continuous-batching ``Batcher`` over a real engine: requests arriving at
different times are served as each alone would be, and a bad request fails only itself."""

from __future__ import annotations

import asyncio

import pytest

from services.sampler.engine import SamplerEngine
from services.sampler.handlers import Batcher
from whetstone.errors import UserError
from whetstone.messages import SampleRequest, SamplingParams
from whetstone.tasks import Offload
from whetstone.tensors import Tensor
from whetstone_ml.builtin import ensure_builtin_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> SamplerEngine:
    return SamplerEngine(ensure_builtin_model(tmp_path_factory.mktemp("models")), block_size=4)


def request(prompt: list[int], **params: object) -> SampleRequest:
    return SampleRequest(
        request_id="r",
        tenant="t",
        base_model="tiny",
        prompt=Tensor.from_list(prompt, "int64"),
        num_samples=2,
        params=SamplingParams.model_construct(stop_on_eos=False, **params),
    )


async def test_batcher_serves_late_arrivals_and_isolates_bad_requests(engine):
    good = [
        request([1, 2, 3, 4, 5], max_tokens=12, temperature=1.0, seed=1),
        request([9, 8, 7], max_tokens=5, temperature=0.0),
        request(list(range(10, 30)), max_tokens=8, temperature=0.7, seed=3, top_k=10),
    ]
    alone = [engine.generate([(r, None)])[0] for r in good]
    batcher = Batcher(engine, Offload("torch-test"), max_batch=8)
    loop = asyncio.create_task(batcher.run())
    try:
        first = asyncio.create_task(batcher.generate(good[0], None))
        await asyncio.sleep(0.05)  # the first request is decoding when the others arrive
        bad = asyncio.create_task(batcher.generate(request([1], max_tokens=2, top_p=0.0), None))
        rest = [asyncio.create_task(batcher.generate(r, None)) for r in good[1:]]
        results = await asyncio.wait_for(asyncio.gather(first, *rest), 60)
        with pytest.raises(UserError):
            await bad
    finally:
        loop.cancel()
    for got, expected in zip(results, alone, strict=True):
        assert [s.tokens.to_numpy().tolist() for s in got.sequences] == [
            s.tokens.to_numpy().tolist() for s in expected.sequences
        ]
    assert not engine.has_work
