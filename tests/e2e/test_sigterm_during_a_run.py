"""SIGTERM to the trainer in the middle of a training loop loses nothing: the trainer finishes
the request it is running, hands the ones it holds back to the run's queue and exits; the
platform's supervisor restarts it under the same worker id, it takes the run back from its
placement, and the SDK's loop completes every call with no error. Each request ran once: the
ledger's train tokens equal the tokens sent.

(The trainer snapshots what ran before it exits, so the restart continues from those weights;
SIGKILL, which leaves no time for that, is tests/e2e/test_sigkill_failover.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
import tinker
from tinker import types

from whetstone.cli import request_usage_report
from whetstone.messages import UsageReportQuery
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(300)

SEQS = [[5, 17, 99, 250, 3, 41, 7], [60, 61, 62, 63, 64, 65], [1000, 2, 300, 4, 1500, 6]]


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def train_tokens(platform) -> int:  # type: ignore[no-untyped-def]
    query = UsageReportQuery(tenant="sigterm")
    report = asyncio.run(request_usage_report(platform.nats_url, query))
    assert report.error is None
    return sum(r.tokens for r in report.rows if r.meter == "train_tokens")


def test_sigterm_to_the_trainer_mid_run_loses_no_request(platform) -> None:
    from tests.e2e.test_sft_loop import make_key

    key = make_key(platform, "sigterm")
    service = tinker.ServiceClient(base_url=platform.base_url, api_key=key)
    training = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=4, seed=0
    ).result()
    batch = [datum(seq) for seq in SEQS]
    tokens_per_step = sum(len(seq) - 1 for seq in SEQS)

    stop = threading.Event()

    def supervise() -> None:  # what `whetstone up`'s loop does
        while not stop.is_set():
            platform.supervise()
            time.sleep(0.1)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    old_pid = platform.children["trainer"].pid
    steps = 12
    try:
        calls = []
        for step in range(steps):
            calls.append(
                (
                    training.forward_backward(batch, "cross_entropy"),
                    training.optim_step(types.AdamParams(learning_rate=1e-3)),
                )
            )
            if step == 4:
                os.kill(old_pid, signal.SIGTERM)
        results = [(fb.result(timeout=180), opt.result(timeout=180)) for fb, opt in calls]
    finally:
        stop.set()
        supervisor.join(5)
    assert len(results) == steps and all(fb.metrics["loss:sum"] > 0 for fb, _ in results)
    assert platform.children["trainer"].pid != old_pid  # it really was stopped and restarted
    log = (platform.state_dir / "logs" / "trainer.log").read_text()
    assert "trainer drained" in log  # the SIGTERM path ran: held requests handed back

    deadline = time.monotonic() + 30
    while train_tokens(platform) < steps * tokens_per_step and time.monotonic() < deadline:
        time.sleep(0.3)
    assert train_tokens(platform) == steps * tokens_per_step
