"""``whetstone`` as an operator runs it, with real processes: one ``whetstone up`` serves the
module's tests in order (refusals, keys, status, a restarted trainer, ``down``, usage after the
stop); a second one is SIGKILLed to prove that no child outlives it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.messages import UsageEvent, WorkerHeartbeat

READY_TIMEOUT_S = 120.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie still answers kill(0)
    return stat.exists() and stat.read_text().rsplit(") ", 1)[-1][0] != "Z"


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "whetstone.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ.copy(),
    )


@dataclass
class Up:
    """A running ``whetstone up`` and everything it printed so far."""

    process: subprocess.Popen[str]
    state: Path
    lines: list[str] = field(default_factory=list)

    @property
    def info(self) -> dict:
        return json.loads((self.state / "platform.json").read_text())

    def output(self) -> str:
        return "\n".join(self.lines)


def start_up(state: Path, models_dir: Path, port: int = 0) -> Up:
    env = {**os.environ, "WHETSTONE_MODELS_DIR": str(models_dir)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "whetstone.cli",
            "up",
            "--state-dir",
            str(state),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    up = Up(proc, state)
    assert proc.stdout is not None
    stream = proc.stdout
    threading.Thread(
        target=lambda: up.lines.extend(line.rstrip() for line in stream), daemon=True
    ).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (state / "platform.json").exists():
        assert proc.poll() is None, up.output()
        assert time.monotonic() < deadline, "whetstone up did not become ready"
        time.sleep(0.2)
    return up


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Up]:
    running = start_up(tmp_path_factory.mktemp("operator") / "state", models_dir)
    yield running
    if running.process.poll() is None:
        running.process.terminate()
        running.process.wait(60)


def test_up_reports_progress_then_ready(up: Up) -> None:
    wait_for(lambda: any("Ctrl-C" in line for line in up.lines), 10, "the ready banner")
    out = up.output()
    steps = [
        "starting nats-server",
        "starting billing",
        "starting gateway",
        "waiting for trainer, sampler",
        "gateway is serving",
        "up and ready",
    ]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), out
    assert up.info["base_url"] in out and up.info["api_key"] in out


def test_second_up_refuses_and_changes_nothing(up: Up) -> None:
    before = (up.state / "platform.json").read_text()
    again = cli("up", "--state-dir", str(up.state), "--port", "0", timeout_s=20)
    assert again.returncode == 1
    assert f"already running, pid {up.process.pid}, URL {up.info['base_url']}" in again.stderr
    assert (up.state / "platform.json").read_text() == before
    assert all(alive(pid) for pid in up.info["pids"].values())


def test_port_in_use_and_missing_models_file_stop_before_anything_starts(
    up: Up, tmp_path: Path
) -> None:
    port = up.info["base_url"].rsplit(":", 1)[-1]
    taken = cli("up", "--state-dir", str(tmp_path / "a"), "--port", port, timeout_s=20)
    assert taken.returncode == 1 and f"port {port} is in use" in taken.stderr
    assert not (tmp_path / "a" / "nats").exists()  # nothing was started
    missing = cli(
        "up",
        "--state-dir",
        str(tmp_path / "b"),
        "--port",
        "0",
        "--models",
        str(tmp_path / "no-such.json"),
        timeout_s=20,
    )
    assert missing.returncode == 1 and "no-such.json does not exist" in missing.stderr
    assert not (tmp_path / "b" / "nats").exists()


def test_revoked_key_is_refused_on_the_next_request(up: Up) -> None:
    state = ["--state-dir", str(up.state)]
    created = cli("keys", "create", "--tenant", "alice", *state)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    url = f"{up.info['base_url']}/api/v1/create_session"
    body = {"tags": [], "user_metadata": {}}
    with httpx.Client(timeout=30) as http:
        for _ in range(2):  # the second one is answered from the gateway's key cache
            assert http.post(url, json=body, headers={"X-API-Key": key}).status_code == 200
        listed = cli("keys", "list", *state)
        assert listed.returncode == 0 and key not in listed.stdout
        alice = [line for line in listed.stdout.splitlines() if line.startswith("alice")]
        assert len(alice) == 1 and key[:8] in alice[0] and alice[0].endswith("no")

        revoked = cli("keys", "revoke", key[:8], *state)
        assert revoked.returncode == 0, revoked.stderr
        assert http.post(url, json=body, headers={"X-API-Key": key}).status_code == 401
        default = http.post(url, json=body, headers={"X-API-Key": up.info["api_key"]})
        assert default.status_code == 200  # other keys are untouched
    listed = cli("keys", "list", *state)
    assert [line for line in listed.stdout.splitlines() if line.startswith("alice")][0].endswith(
        "yes"
    )
    assert cli("keys", "revoke", "tml-none", *state).returncode == 1


def test_status_once_prints_workers_and_queues(up: Up) -> None:
    status = cli("status", "--once", "--state-dir", str(up.state), timeout_s=30)
    assert status.returncode == 0, status.stderr
    for expected in ("workers (2)", "trainer", "sampler", "queues", "WS_USAGE", "billing"):
        assert expected in status.stdout, status.stdout


def test_dlq_lists_and_replays_a_dead_letter(up: Up) -> None:
    async def publish_garbage() -> None:
        bus = await b.connect(up.info["nats_url"], "test-dlq")
        try:
            await bus.js.publish(s.PLACE_SUBJECT, b"\x00garbage", headers={"X-Test": "dlq"})
        finally:
            await bus.close()

    asyncio.run(publish_garbage())

    def listed() -> str:
        return cli("dlq", "list", "--state-dir", str(up.state)).stdout

    wait_for(lambda: s.PLACE_SUBJECT in listed(), 20, "the garbage dead-lettered")
    row = next(line for line in listed().splitlines() if s.PLACE_SUBJECT in line)
    seq = row.split()[0]
    replayed = cli("dlq", "replay", seq, "--state-dir", str(up.state))
    assert replayed.returncode == 0 and f"replayed {seq} to {s.PLACE_SUBJECT}" in replayed.stdout
    # Still garbage: the scheduler dead-letters it again, under a new sequence number.
    wait_for(
        lambda: any(
            s.PLACE_SUBJECT in line and line.split()[0] != seq for line in listed().splitlines()[1:]
        ),
        20,
        "the replay dead-lettered",
    )
    missing = cli("dlq", "replay", "999999", "--state-dir", str(up.state))
    assert missing.returncode == 1 and "no dead letter 999999" in missing.stderr


def test_killed_trainer_is_restarted_and_the_platform_serves(up: Up) -> None:
    old_pid = up.info["pids"]["trainer"]
    killed_at = datetime.now(UTC)
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: up.info["pids"]["trainer"] != old_pid, 20, "a new trainer pid")
    new_pid = up.info["pids"]["trainer"]
    assert alive(new_pid) and up.info["restarts"]["trainer"] == 1
    out = up.output()
    assert f"trainer (pid {old_pid}) exited with code -9 (SIGKILL)" in out
    assert str(up.state / "logs" / "trainer.log") in out

    async def new_trainer_beats() -> WorkerHeartbeat:
        bus = await b.connect(up.info["nats_url"], "test-restart")
        beats: asyncio.Queue[WorkerHeartbeat] = asyncio.Queue()

        async def on_beat(msg) -> None:
            await beats.put(WorkerHeartbeat.decode(msg.data))

        await bus.nc.subscribe(f"{s.HEARTBEAT_PREFIX}.trainer.*", cb=on_beat)
        try:
            while True:
                beat = await asyncio.wait_for(beats.get(), 25)
                if beat.sent_at > killed_at:
                    return beat
        finally:
            await bus.close()

    asyncio.run(new_trainer_beats())
    assert alive(new_pid)
    health = httpx.get(f"{up.info['base_url']}/api/v1/healthz", timeout=10)
    assert health.json() == {"status": "ok"}


def test_down_stops_it_and_usage_is_read_after_the_stop(up: Up) -> None:
    state = ["--state-dir", str(up.state)]
    event = UsageEvent.of(
        "req-operator-test", "ledger-test", "whetstone/tiny-qwen3", "train_tokens", 123
    )

    async def publish() -> None:
        bus = await b.connect(up.info["nats_url"], "test-usage")
        try:
            await b.publish_usage(bus, [event])
        finally:
            await bus.close()

    asyncio.run(publish())

    def rows() -> list[dict]:
        report = cli("usage", "--tenant", "ledger-test", "--json", *state)
        assert report.returncode == 0, report.stderr
        return json.loads(report.stdout)["rows"]

    wait_for(lambda: bool(rows()), 20, "billing to record the event")
    online = rows()
    assert online[0]["tokens"] == 123

    pids = list(up.info["pids"].values())
    down = cli("down", *state)
    assert down.returncode == 0 and "stopped." in down.stdout, down.stderr
    assert up.process.wait(10) == 0  # `down` waited for it: it has exited already
    assert not any(alive(pid) for pid in pids)
    assert not (up.state / "platform.json").exists()

    offline = cli("usage", "--tenant", "ledger-test", "--json", *state)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["rows"] == online
    assert "no platform running" in offline.stderr
    table = cli("usage", *state)
    assert "ledger-test" in table.stdout and "123" in table.stdout

    again = cli("down", *state)
    assert again.returncode == 1 and "no platform is running" in again.stderr


def test_no_child_outlives_a_killed_up(tmp_path: Path, models_dir: Path) -> None:
    up = start_up(tmp_path / "state", models_dir)
    pids = list(up.info["pids"].values())
    assert len(pids) == 6 and all(alive(pid) for pid in pids)
    up.process.kill()
    up.process.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "every child to die with it")
    gone = cli("down", "--state-dir", str(tmp_path / "state"))
    assert gone.returncode == 1  # the lock died with its holder: nothing runs there now
