"""`whetstone up` as a user runs it: it prints the base URL and a key, serves, and on SIGTERM or
Ctrl-C (SIGINT) stops NATS and every service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][0] != "Z"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_and_stops_every_child(
    tmp_path: Path, models_dir: Path, stop_signal: signal.Signals
) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "WHETSTONE_MODELS_DIR": str(models_dir)}
    up = subprocess.Popen(
        [sys.executable, "-m", "whetstone.cli", "--state-dir", str(state), "up", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (state / "platform.json").exists():
            assert up.poll() is None, up.stdout.read()
            assert time.monotonic() < deadline, "whetstone up did not become ready"
            time.sleep(0.2)
        info = json.loads((state / "platform.json").read_text())
        assert info["api_key"].startswith("tml-")
        health = httpx.get(f"{info['base_url']}/api/v1/healthz", timeout=10)
        assert health.json() == {"status": "ok"}
        pids = list(info["pids"].values())  # NATS and the five services
        assert len(pids) == 6
        assert all(alive(pid) for pid in pids)

        up.send_signal(stop_signal)
        out, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0, out
    assert info["base_url"] in out and info["api_key"] in out and "stopped." in out
    assert not any(alive(pid) for pid in pids)
    assert not (state / "platform.json").exists()
