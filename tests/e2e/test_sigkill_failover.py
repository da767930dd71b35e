"""SIGKILL, the failure that hands nothing back, against real processes and the real SDK.

* The trainer is killed in the middle of a training loop; the platform's supervisor restarts it
  under the same worker id, it restores the run's snapshot and replays what was not yet covered:
  the SDK's loop finishes with no error, the saved sampler weights equal those of the same loop
  run undisturbed (float32 on the CPU), and the ledger bills each train token once.
* With a second trainer worker running, the one that holds a run is killed and not restarted:
  the scheduler moves the run to the other worker, which ends it with the same weights.
* The active scheduler is killed with a standby running: the standby takes the lease over and
  places the next run.

Waits are on observable state (futures, log lines, KV), each with a timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types

from tests.e2e.test_sft_loop import make_key
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath, store_key
from whetstone.cli import request_usage_report
from whetstone.messages import UsageReportQuery
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(420)

SEQS = [[5, 17, 99, 250, 3, 41, 7], [60, 61, 62, 63, 64, 65], [1000, 2, 300, 4, 1500, 6]]
STEPS = 8
T = TypeVar("T")
TOKENS_PER_STEP = sum(len(seq) - 1 for seq in SEQS)


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def train(platform, tenant: str, kill=None) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The loop: STEPS pipelined forward_backward + optim_step calls (``kill(step, training)``
    runs after each submission), then sampler weights saved; returns those weights."""
    service = tinker.ServiceClient(base_url=platform.base_url, api_key=make_key(platform, tenant))
    training = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=4, seed=7
    ).result()
    batch = [datum(seq) for seq in SEQS]
    calls = []
    for step in range(STEPS):
        calls.append(
            (
                training.forward_backward(batch, "cross_entropy"),
                training.optim_step(types.AdamParams(learning_rate=1e-2)),
            )
        )
        if kill is not None:
            kill(step, training)
    results = [(fb.result(timeout=240), opt.result(timeout=240)) for fb, opt in calls]
    assert len(results) == STEPS and all(fb.metrics["loss:sum"] > 0 for fb, _ in results)
    path = training.save_weights_for_sampler("final").result(timeout=120).path
    key = store_key(tenant, TinkerPath.parse(path))
    return load_file(str(platform.state_dir / "checkpoints" / key / "adapter_model.safetensors"))


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want[name]), name


def train_tokens(platform, tenant: str) -> int:  # type: ignore[no-untyped-def]
    report = asyncio.run(request_usage_report(platform.nats_url, UsageReportQuery(tenant=tenant)))
    assert report.error is None
    return sum(r.tokens for r in report.rows if r.meter == "train_tokens")


def assert_billed_once(platform, tenant: str) -> None:  # type: ignore[no-untyped-def]
    want = STEPS * TOKENS_PER_STEP
    deadline = time.monotonic() + 30
    while train_tokens(platform, tenant) < want and time.monotonic() < deadline:
        time.sleep(0.3)
    assert train_tokens(platform, tenant) == want


def wait_for_log(path: Path, text: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and text in path.read_text()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path} after {timeout_s} s")
        time.sleep(0.1)


@contextmanager
def extra(platform, name: str, service: str) -> Iterator[subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    """One more process of ``service`` beside the platform's, with its own id and log."""
    log_path = platform.log_path(name)
    with open(log_path, "ab") as log:
        env = {**platform.env, "WHETSTONE_WORKER_ID": name, "WHETSTONE_METRICS_PORT": "0"}
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=env, stdout=log, stderr=log
        )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def supervised(platform, work: Callable[[], T]) -> T:  # type: ignore[no-untyped-def]
    """Run ``work`` in a thread while this (main) thread supervises the platform, as
    ``whetstone up`` does: a child restarted from a thread would die with that thread."""
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(work())
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():
        platform.supervise()
        thread.join(0.1)
    if failed:
        raise failed[0]
    return done[0]


def revive(platform, name: str, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    """Restart ``name`` if a test before left it dead, and wait for its restart."""
    deadline = time.monotonic() + timeout_s
    while platform.children[name].poll() is not None:
        assert time.monotonic() < deadline, f"{name} was not restarted"
        platform.supervise()
        time.sleep(0.1)


def placement_of(platform, run_id: str) -> str:  # type: ignore[no-untyped-def]
    async def read() -> str:
        bus = await b.connect(platform.nats_url, "test-placements")
        try:
            entry = await bus.kv[s.PLACEMENTS_BUCKET].get(s.token(run_id))
            return (entry.value or b"").decode()
        finally:
            await bus.close()

    return asyncio.run(read())


@pytest.fixture(scope="module")
def undisturbed(platform) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return train(platform, "calm")


def test_a_sigkilled_trainer_restarts_and_its_run_ends_with_undisturbed_weights(
    platform,  # type: ignore[no-untyped-def]
    undisturbed: dict[str, torch.Tensor],
) -> None:
    old_pid = platform.children["trainer"].pid

    def kill(step: int, _) -> None:  # type: ignore[no-untyped-def]
        if step == 3:
            os.kill(old_pid, signal.SIGKILL)

    weights = supervised(platform, lambda: train(platform, "sigkill", kill))
    assert platform.children["trainer"].pid != old_pid  # it really died and came back
    assert "run taken back after a restart" in platform.log_path("trainer").read_text()
    assert_same_weights(weights, undisturbed)
    assert_billed_once(platform, "sigkill")


def test_a_second_worker_takes_over_the_run_of_a_sigkilled_one(
    platform,  # type: ignore[no-untyped-def]
    undisturbed: dict[str, torch.Tensor],
) -> None:
    revive(platform, "trainer")
    with extra(platform, "trainer-b", "trainer") as other:
        wait_for_log(platform.log_path("trainer-b"), "trainer ready")
        killed: list[str] = []

        def kill(step: int, training) -> None:  # type: ignore[no-untyped-def]
            if step != 3:
                return
            holder = placement_of(platform, training.model_id)
            victim = other if holder == "trainer-b" else platform.children["trainer"]
            killed.append(holder)
            victim.send_signal(signal.SIGKILL)  # and nobody restarts it

        weights = train(platform, "takeover", kill)
        assert killed, "the holder was never killed: the test proves nothing"
        scheduler_log = platform.log_path("scheduler").read_text()
        assert "moving run" in scheduler_log  # the scheduler moved it: no restart took it back
    assert_same_weights(weights, undisturbed)
    assert_billed_once(platform, "takeover")


def test_a_sigkilled_scheduler_is_replaced_by_its_standby(platform) -> None:  # type: ignore[no-untyped-def]
    revive(platform, "trainer")  # the test before may have killed it
    with extra(platform, "scheduler-b", "scheduler"):
        wait_for_log(platform.log_path("scheduler-b"), "scheduler on standby")
        platform.children["scheduler"].send_signal(signal.SIGKILL)
        service = tinker.ServiceClient(
            base_url=platform.base_url, api_key=make_key(platform, "standby")
        )
        training = service.create_lora_training_client(
            base_model=BUILTIN_MODEL_NAME, rank=4, seed=7
        ).result(timeout=120)
        result = training.forward_backward([datum(SEQS[0])], "cross_entropy").result(timeout=120)
        assert result.metrics["loss:sum"] > 0
        assert "scheduler active" in platform.log_path("scheduler-b").read_text()
