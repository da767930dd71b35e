"""A training client kept across a restart of ``whetstone up`` carries on with its run: two steps,
``whetstone down``, ``whetstone up`` again on the same state dir and port, then three more steps
from the same client object, each answered (no error, no endless ``try_again``), with the loss
falling over the five."""

from __future__ import annotations

from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.e2e.test_cli_operator import cli, start_up
from tests.e2e.test_sigterm_during_a_run import SEQS, datum
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(420)

STEP_TIMEOUT_S = 120.0


def test_training_client_kept_across_a_restart_carries_on(tmp_path: Path, models_dir: Path) -> None:
    state = tmp_path / "state"
    up = start_up(state, models_dir)
    try:
        base_url, api_key = up.info["base_url"], up.info["api_key"]
        port = int(base_url.rsplit(":", 1)[-1])
        service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
        training = service.create_lora_training_client(
            base_model=BUILTIN_MODEL_NAME, rank=4, seed=0
        ).result(timeout=STEP_TIMEOUT_S)
        batch = [datum(seq) for seq in SEQS]

        def step() -> float:
            fb = training.forward_backward(batch, "cross_entropy")
            opt = training.optim_step(types.AdamParams(learning_rate=1e-2))
            loss = fb.result(timeout=STEP_TIMEOUT_S).metrics["loss:sum"]
            opt.result(timeout=STEP_TIMEOUT_S)
            return loss

        losses = [step() for _ in range(2)]

        down = cli("down", "--state-dir", str(state))
        assert down.returncode == 0 and "stopped." in down.stdout, down.stderr
        assert up.process.wait(30) == 0, up.output()
        assert not (state / "platform.json").exists()

        up = start_up(state, models_dir, port=port)
        assert up.info["base_url"] == base_url and up.info["api_key"] == api_key

        losses += [step() for _ in range(3)]
    finally:
        if up.process.poll() is None:
            up.process.terminate()
            up.process.wait(60)
    assert len(losses) == 5 and all(loss > 0 for loss in losses)
    # Falling at every step, the first step after the restart included: the run went on from the
    # weights and optimizer state it had (a fresh adapter would start again near losses[0]).
    assert all(after < before for before, after in zip(losses, losses[1:], strict=False)), losses
