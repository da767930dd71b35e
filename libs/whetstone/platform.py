"""The embedded deployment: one machine, one command (``whetstone up``).

Starts a JetStream ``nats-server`` (data under the state directory), generates the built-in
model if needed, starts the five services as child processes (logs under ``<state>/logs``),
registers an API key for the ``default`` tenant, waits until the gateway answers and a trainer
and a sampler are heartbeating, and writes ``<state>/platform.json`` (base URL, NATS URL, key)
for ``whetstone keys`` / ``whetstone usage`` and for tests. ``stop()`` ends every child cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.keys import create_key, new_key
from whetstone.models.builtin import ensure_builtin_model
from whetstone.nats_server import NatsServer, start_nats

SERVICES = ("billing", "scheduler", "trainer", "sampler", "gateway")
DEFAULT_TENANT = "default"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Platform:
    state_dir: Path
    nats: NatsServer
    base_url: str
    api_key: str
    children: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every service (gateway first, billing last so it drains), then NATS."""
        for name in reversed(SERVICES):
            proc = self.children.get(name)
            if proc and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.nats.stop()
        (self.state_dir / "platform.json").unlink(missing_ok=True)

    def check_children(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.state_dir / 'logs' / (name + '.log')}")


def start_platform(state_dir: Path, port: int = 8000, models_dir: Path | None = None,
                   ready_timeout_s: float = 180.0, extra_env: dict[str, str] | None = None) -> Platform:
    state_dir = state_dir.resolve()
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    models_dir = (models_dir or Path.home() / ".cache" / "whetstone" / "models").resolve()
    ensure_builtin_model(models_dir)  # once here, so the services do not race to build it
    nats = start_nats(state_dir)
    port = port or free_port()
    platform = Platform(state_dir, nats, f"http://127.0.0.1:{port}", _api_key(state_dir))
    env = {**os.environ, **(extra_env or {}),
           "WHETSTONE_NATS_URL": nats.url, "WHETSTONE_STATE_DIR": str(state_dir),
           "WHETSTONE_MODELS_DIR": str(models_dir), "WHETSTONE_PORT": str(port)}
    try:
        for name in SERVICES:
            with open(state_dir / "logs" / f"{name}.log", "ab") as log:  # the child keeps its own copy
                platform.children[name] = subprocess.Popen(
                    [sys.executable, "-m", f"services.{name}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                )
        asyncio.run(_register_key_and_wait(platform, ready_timeout_s))
    except BaseException:
        platform.stop()
        raise
    (state_dir / "platform.json").write_text(json.dumps(
        {"base_url": platform.base_url, "nats_url": nats.url, "api_key": platform.api_key,
         "pids": {"nats-server": nats.process.pid, **{n: p.pid for n, p in platform.children.items()}}},
        indent=2))
    return platform


def _api_key(state_dir: Path) -> str:
    """The default tenant's key, kept (mode 0600) so that restarts print the same one."""
    path = state_dir / "api_key"
    if path.exists():
        return path.read_text().strip()
    key = new_key()
    path.write_text(key)
    path.chmod(0o600)
    return key


async def _register_key_and_wait(platform: Platform, timeout_s: float) -> None:
    bus = await b.connect(platform.nats_url, "whetstone-up")
    try:
        await create_key(bus, DEFAULT_TENANT, platform.api_key)
        seen: set[str] = set()

        async def on_beat(msg) -> None:
            seen.add(msg.subject.split(".")[3])  # ws.ctl.heartbeat.<role>.<worker>

        sub = await bus.nc.subscribe(f"{s.HEARTBEAT_PREFIX}.>", cb=on_beat)
        deadline = time.monotonic() + timeout_s
        while True:
            platform.check_children()
            if {"trainer", "sampler"} <= seen and await asyncio.to_thread(_healthy, platform.base_url):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"platform not ready after {timeout_s:.0f} s; logs in {platform.state_dir / 'logs'}")
            await asyncio.sleep(0.2)
        await sub.unsubscribe()
    finally:
        await bus.close()


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/api/v1/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def read_platform(state_dir: Path) -> dict:
    path = state_dir / "platform.json"
    if not path.exists():
        raise FileNotFoundError(f"no running platform under {state_dir} (start one with `whetstone up`)")
    return json.loads(path.read_text())
