"""Many runs in one pass, end to end: three tenants, each with its own API key and the unmodified
tinker SDK, train their own LoRA runs at the same time on a whole platform (real processes, as
``whetstone up`` starts them); each one's loss falls, and the trainer's own metrics endpoint
shows passes that held more than one run (``whetstone_trainer_pass_runs``).

Each client's thread pipelines every step as the SDK's examples do (``forward_backward`` and
``optim_step`` posted before either result is awaited). The threads meet at a barrier before
every step, so the three runs' requests reach the trainer together; should a round still see
only passes of one run (the machine's scheduling is not ours to fix), the clients train another
round, up to ``ROUNDS``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from whetstone import bus as b
from whetstone.keys import create_key
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(300)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sft.py"
TENANTS = ("pass-alice", "pass-bob", "pass-carol")
STEPS = 4  # per round
ROUNDS = 3


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("sft_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_key(platform: Any, tenant: str) -> str:
    async def mint() -> str:
        bus = await b.connect(platform.nats_url, "test-keys")
        try:
            return await create_key(bus, tenant)
        finally:
            await bus.close()

    return asyncio.run(mint())


def trainer_metrics_url(platform: Any) -> str:
    """The trainer's metrics URL, from its start-up line (``WHETSTONE_METRICS_PORT`` is 0)."""
    url = ""
    for line in platform.log_path("trainer").read_text().splitlines():
        if '"metrics and health"' in line:
            url = json.loads(line)["url"]  # the latest start wins
    assert url, "the trainer logged no metrics URL"
    return url


def joined(url: str) -> dict[str, float]:
    """For each op, the runs that joined a pass of another so far (runs in passes, less the
    passes), from the trainer's /metrics: above 0 once a pass held more than one run."""
    got: dict[str, float] = {}
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            op = sample.labels.get("op", "")
            if sample.name == "whetstone_trainer_pass_runs_sum":
                got[op] = got.get(op, 0.0) + sample.value
            elif sample.name == "whetstone_trainer_pass_runs_count":
                got[op] = got.get(op, 0.0) - sample.value
    return got


class Client:
    """One tenant's run and its SFT data: the same small batch every step, so its loss falls
    within a few steps."""

    def __init__(self, platform: Any, tenant: str, index: int, example: Any) -> None:
        self.service = tinker.ServiceClient(
            base_url=platform.base_url, api_key=make_key(platform, tenant)
        )
        self.training = self.service.create_lora_training_client(
            base_model=BUILTIN_MODEL_NAME, rank=8, seed=index
        ).result()
        tokenizer = self.training.get_tokenizer()
        pairs = example.make_examples()[index * 8 : index * 8 + 8]
        self.batch = [example.make_datum(tokenizer, q, a) for q, a in pairs]
        self.weights = sum(sum(d.loss_fn_inputs["weights"].data) for d in self.batch)
        self.losses: list[float] = []

    def train(self, steps: int, barrier: threading.Barrier) -> None:
        adam = types.AdamParams(learning_rate=1e-2)
        for _ in range(steps):
            barrier.wait(timeout=60)  # every client's step starts together
            fwd_bwd = self.training.forward_backward(self.batch, "cross_entropy")
            step = self.training.optim_step(adam)
            result = fwd_bwd.result()
            step.result()
            self.losses.append(result.metrics["loss:sum"] / self.weights)


def test_tenants_training_at_once_share_the_trainers_passes(platform) -> None:
    example = load_example()
    url = trainer_metrics_url(platform)
    clients = [Client(platform, tenant, n, example) for n, tenant in enumerate(TENANTS)]
    before = joined(url)
    shared: dict[str, float] = {}
    with ThreadPoolExecutor(len(clients)) as pool:
        for _ in range(ROUNDS):
            barrier = threading.Barrier(len(clients))
            for done in [pool.submit(c.train, STEPS, barrier) for c in clients]:
                done.result()
            shared = {op: n - before.get(op, 0.0) for op, n in joined(url).items()}
            if any(n > 0 for n in shared.values()):
                break
    for client in clients:
        client.service.close("success").result()

    assert any(n > 0 for n in shared.values()), (before, shared)
    for tenant, client in zip(TENANTS, clients, strict=True):
        losses = client.losses
        assert all(math.isfinite(x) for x in losses), (tenant, losses)
        assert losses[-1] < 0.8 * losses[0], (tenant, losses)
