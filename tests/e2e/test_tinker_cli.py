"""The real ``tinker`` CLI (``python -m tinker.cli -f json ...``) against a platform of real
processes: run list and info, checkpoint list, info, set-ttl, delete and download (external
weights, and a training checkpoint, which the CLI exports through a training session of its
own), billing usage. ``TINKER_BASE_URL`` and ``TINKER_API_KEY`` are set as the SDK reads them.

One module-scoped platform; the tests run in file order on one tenant's run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tinker
from tinker import types

from whetstone.models.builtin import BUILTIN_MODEL_NAME

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def cli(platform, *args: str, ok: bool = True, cwd: Path | None = None) -> dict:  # type: ignore[no-untyped-def]
    env = {**os.environ, "TINKER_BASE_URL": platform.base_url, "TINKER_API_KEY": platform.api_key}
    done = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "-f", "json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )
    assert (done.returncode == 0) == ok, done.stderr + done.stdout
    if not ok:
        return {"stderr": done.stderr + done.stdout}
    return json.loads(done.stdout) if done.stdout.strip() else {}  # set-ttl prints nothing


@pytest.fixture(scope="module")
def trained(platform):
    """A run trained one step, with a training and a sampler checkpoint."""
    service = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    training = service.create_lora_training_client(base_model=BUILTIN_MODEL_NAME, rank=4).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 17, 99, 250, 3]),
        loss_fn_inputs={"target_tokens": [17, 99, 250, 3, 41]},
    )
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state = training.save_state("step-1").result().path
    sampler = training.save_weights_for_sampler("step-1").result().path
    yield training, state, sampler
    service.close("success").result()


def test_run_list_and_info(platform, trained) -> None:
    training, state, sampler = trained
    runs = cli(platform, "run", "list")["runs"]
    assert [r["training_run_id"] for r in runs] == [training.model_id]
    info = cli(platform, "run", "info", training.model_id)
    assert info["base_model"] == BUILTIN_MODEL_NAME and info["lora_rank"] == 4
    assert info["last_checkpoint"]["tinker_path"] == state
    assert info["last_sampler_checkpoint"]["tinker_path"] == sampler
    missing = cli(platform, "run", "info", "sess-nobody:train:0", ok=False)
    assert "not found" in missing["stderr"].lower() or "404" in missing["stderr"]


def test_checkpoint_list_and_info(platform, trained) -> None:
    training, state, sampler = trained
    listed = cli(platform, "checkpoint", "list")["checkpoints"]
    assert {c["tinker_path"] for c in listed} == {state, sampler}
    of_run = cli(platform, "checkpoint", "list", "--run-id", training.model_id)
    assert of_run["run_id"] == training.model_id
    assert {(c["checkpoint_type"], c["tinker_path"]) for c in of_run["checkpoints"]} == {
        ("training", state),
        ("sampler", sampler),
    }
    info = cli(platform, "checkpoint", "info", state)
    assert info["tinker_path"] == state and info["checkpoint_type"] == "training"
    assert info["is_lora"] is True and info["lora_rank"] == 4 and info["size_bytes"] > 0


def test_checkpoint_set_ttl_and_remove_it(platform, trained) -> None:
    _, state, _ = trained
    cli(platform, "checkpoint", "set-ttl", state, "--ttl", "7200")
    expires = datetime.fromisoformat(cli(platform, "checkpoint", "info", state)["expires_at"])
    assert timedelta(hours=1, minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=2)
    cli(platform, "checkpoint", "set-ttl", state, "--ttl", "60", ok=False)  # under one hour
    cli(platform, "checkpoint", "set-ttl", state, "--remove")
    assert cli(platform, "checkpoint", "info", state)["expires_at"] is None


def test_checkpoint_download_of_external_weights_and_of_a_training_checkpoint(
    platform, trained, tmp_path: Path
) -> None:
    training, state, _ = trained
    external = training.save_weights_external("export").result().path
    done = cli(platform, "checkpoint", "download", external, "--output", str(tmp_path))
    target = Path(done["destination"])
    assert PEFT_FILES <= {p.name for p in target.iterdir()}
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["r"] == 4 and done["file_size_bytes"] > 0

    # A training checkpoint: the CLI loads it into a run of its own, exports it as temporary
    # external weights, downloads them and deletes the export.
    done = cli(platform, "checkpoint", "download", state, "--output", str(tmp_path))
    from_state = Path(done["destination"])
    assert PEFT_FILES <= {p.name for p in from_state.iterdir()}
    # The same weights: the export of the loaded checkpoint equals the run's own export.
    assert (from_state / "adapter_model.safetensors").read_bytes() == (
        target / "adapter_model.safetensors"
    ).read_bytes()
    remaining = {c["tinker_path"] for c in cli(platform, "checkpoint", "list")["checkpoints"]}
    assert not any(p.endswith("/external_weights/download") for p in remaining)


def test_checkpoint_delete(platform, trained) -> None:
    training, state, sampler = trained
    done = cli(platform, "checkpoint", "delete", sampler, "--yes")
    assert done == {"deleted_count": 1, "failed": []}
    listed = cli(platform, "checkpoint", "list", "--run-id", training.model_id)["checkpoints"]
    assert sampler not in {c["tinker_path"] for c in listed} and state in {
        c["tinker_path"] for c in listed
    }
    again = cli(platform, "checkpoint", "delete", sampler, "--yes")
    assert again["deleted_count"] == 0 and len(again["failed"]) == 1


def test_billing_usage(platform, trained) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start, end = (hour - timedelta(hours=1)).isoformat(), (hour + timedelta(hours=1)).isoformat()
    deadline = time.monotonic() + 60
    while True:  # usage reaches the ledger a moment after the work
        rows = cli(platform, "billing", "usage", start, end)["data"]
        if any(row["event_info"]["type"] == "training" for row in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(1)
