"""The embedded deployment: one machine, one command (``whetstone up``).

Owns, for one state directory:

* the lock: ``<state>/whetstone.lock``, ``flock``-ed by the running ``whetstone up`` for its
  whole life and holding its pid and URL, so a second ``up`` on the same directory stops at once
  and ``whetstone down`` / ``usage`` / ``status`` know whether a platform runs there. The kernel
  drops the lock when its holder dies, however it dies, so it never goes stale;
* the start-up: the gateway port is checked first, then the built-in model is generated if
  needed, a JetStream ``nats-server`` (data under the state directory) and the five services
  start as child processes (logs under ``<state>/logs``), the default tenant's key is registered,
  and ``start_platform`` returns once the gateway answers and a trainer and a sampler heartbeat;
* the children's lives: each one gets SIGTERM from the kernel when ``whetstone up`` dies
  (``die_with_parent``); once up, a child that dies is reported and restarted with a back-off
  (``supervise``); ``stop()`` ends every child cleanly;
* ``<state>/platform.json`` (base URL, NATS URL, key, pids, restarts) for the CLI and tests.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nats.aio.msg import Msg

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.keys import new_key, register_key
from whetstone.models.builtin import (
    BUILTIN_MODEL_NAME,
    builtin_model_dir,
    ensure_builtin_model_in_subprocess,
)
from whetstone.models.registry import load_registry
from whetstone.nats_server import NatsServer, die_with_parent, start_nats

SERVICES = ("billing", "scheduler", "trainer", "sampler", "gateway")
DEFAULT_TENANT = "default"
LOCK_FILE = "whetstone.lock"
PLATFORM_FILE = "platform.json"
RESTART_BASE_S = 1.0  # first restart after this long, doubling per quick death ...
RESTART_MAX_S = 30.0  # ... up to this
STABLE_S = 60.0  # a child that ran this long starts its back-off afresh when it dies
# The interpreter of a sampler whose base model the registry serves on vLLM (engine = "vllm"):
# WHETSTONE_VLLM_PYTHON, else the virtual environment scripts/setup-vllm builds in the project.
VLLM_PYTHON_ENV = "WHETSTONE_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"

Progress = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


# ---------------------------------------------------------------- the state directory's lock


@dataclass(frozen=True)
class Holder:
    """Who holds a state directory: the ``whetstone up`` process and what it recorded."""

    pid: int | None
    base_url: str | None


class AlreadyRunning(RuntimeError):
    def __init__(self, state_dir: Path, holder: Holder) -> None:
        self.holder = holder
        super().__init__(
            f"already running under {state_dir}: pid {holder.pid or '?'}, "
            f"URL {holder.base_url or '?'} (stop it with `whetstone down`)"
        )


class PortInUse(RuntimeError):
    pass


class StateLock:
    """An exclusive ``flock`` on ``<state>/whetstone.lock``, its holder's details inside."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path = path
        self._handle: IO[str] | None = handle

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LOCK_FILE
        # Opened without truncating: if another process holds it, its details are in there.
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(state_dir, _read_holder(path)) from None
            raise
        lock = cls(path, handle)
        lock.record(pid=os.getpid())
        return lock

    def record(self, **details: Any) -> None:
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps(details))
        self._handle.flush()

    def release(self) -> None:
        if self._handle is not None:
            self.record()  # empty: nothing left that could be mistaken for a holder
            self._handle.close()  # closing drops the flock
            self._handle = None


def _read_holder(path: Path) -> Holder:
    for _ in range(20):  # the holder may be rewriting it this very moment
        try:
            details = json.loads(path.read_text() or "{}")
            return Holder(details.get("pid"), details.get("base_url"))
        except (OSError, json.JSONDecodeError):
            time.sleep(0.01)
    return Holder(None, None)


def lock_holder(state_dir: Path) -> Holder | None:
    """The ``whetstone up`` running on ``state_dir``, or None when none runs there."""
    path = state_dir / LOCK_FILE
    if not path.exists():
        return None
    with open(path) as handle:
        try:  # a shared lock only for the test; it never blocks an exclusive holder for long
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return _read_holder(path)
            raise
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise ``PortInUse`` naming ``port`` when something listens there already."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} is in use (choose another with --port N, "
                    "or --port 0 for any free port)"
                ) from None
            raise


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def restart_delay_s(quick_deaths: int) -> float:
    """Back-off before restarting a child that died ``quick_deaths`` times in a row (1, 2, ...)."""
    return min(RESTART_MAX_S, RESTART_BASE_S * 2 ** max(0, quick_deaths - 1))


# ---------------------------------------------------------------- the running platform


@dataclass
class Child:
    """One supervised service process."""

    name: str
    process: subprocess.Popen[bytes]
    started_at: float
    restarts: int = 0  # how often it was restarted, in all
    quick_deaths: int = 0  # deaths in a row that came sooner than STABLE_S after a start
    restart_at: float | None = None  # set while it is dead and waiting for its restart


@dataclass
class Platform:
    state_dir: Path
    nats: NatsServer
    base_url: str
    api_key: str
    env: dict[str, str] = field(default_factory=dict, repr=False)
    lock: StateLock | None = None
    progress: Progress = _quiet
    services: dict[str, Child] = field(default_factory=dict)
    pythons: dict[str, str] = field(default_factory=dict)  # service -> interpreter, if not ours
    nats_restarts: int = 0
    stopping: bool = False

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def children(self) -> dict[str, subprocess.Popen[bytes]]:
        return {name: child.process for name, child in self.services.items()}

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        with open(self.log_path(name), "ab") as log:  # the child keeps its own copy
            return subprocess.Popen(
                [self.pythons.get(name, sys.executable), "-m", f"services.{name}"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Spawned from the main thread only (start-up and supervise), so the fork is safe.
                preexec_fn=die_with_parent(),  # noqa: PLW1509
            )

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every service (gateway first, billing last so it drains), then NATS; release
        the state directory."""
        self.stopping = True
        for name in reversed(SERVICES):
            child = self.services.get(name)
            if child and child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + timeout_s
        for child in self.services.values():
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.nats.stop()
        (self.state_dir / PLATFORM_FILE).unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release()

    def check_children(self) -> None:
        """Raise when a service has died (used while starting, when a death is fatal)."""
        if self.nats.process.poll() is not None:
            raise RuntimeError(
                f"nats-server exited with {self.nats.process.returncode}; "
                f"see {self.state_dir / 'nats.log'}"
            )
        for name, child in self.services.items():
            if child.process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {child.process.returncode}; see {self.log_path(name)}"
                )

    def supervise(self, now: float | None = None) -> None:
        """Report children that died and restart each after its back-off; call it often."""
        if self.stopping:
            return
        now = time.monotonic() if now is None else now
        if self.nats.process.poll() is not None:
            self._restart_nats()
        changed = False
        for name, child in self.services.items():
            code = child.process.poll()
            if code is None:
                continue
            if child.restart_at is None:
                stable = now - child.started_at >= STABLE_S
                child.quick_deaths = 1 if stable else child.quick_deaths + 1
                child.restart_at = now + restart_delay_s(child.quick_deaths)
                self.progress(
                    f"{name} (pid {child.process.pid}) exited with {_exit_text(code)}; "
                    f"log: {self.log_path(name)}; restarting in "
                    f"{child.restart_at - now:.0f} s"
                )
            elif now >= child.restart_at:
                child.process = self.spawn(name)
                child.started_at, child.restart_at = now, None
                child.restarts += 1
                changed = True
                self.progress(
                    f"{name} restarted (pid {child.process.pid}, restart {child.restarts})"
                )
        if changed:
            self.write_info()

    def _restart_nats(self) -> None:
        code = self.nats.process.returncode
        self.progress(
            f"nats-server exited with {_exit_text(code)}; log: "
            f"{self.state_dir / 'nats.log'}; restarting on port {self.nats.port}"
        )
        self.nats = start_nats(self.state_dir, port=self.nats.port, tied_to_parent=True)
        self.nats_restarts += 1
        self.write_info()

    def write_info(self) -> None:
        pids = {
            "nats-server": self.nats.process.pid,
            **{name: child.process.pid for name, child in self.services.items()},
        }
        restarts = {
            "nats-server": self.nats_restarts,
            **{name: child.restarts for name, child in self.services.items()},
        }
        info = {
            "base_url": self.base_url,
            "nats_url": self.nats_url,
            "api_key": self.api_key,
            "up_pid": os.getpid(),
            "pids": pids,
            "restarts": restarts,
        }
        path = self.state_dir / PLATFORM_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(path)  # readers never see half a file


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"code {code}"


def start_platform(
    state_dir: Path,
    port: int = 8000,
    models_dir: Path | None = None,
    ready_timeout_s: float = 180.0,
    extra_env: dict[str, str] | None = None,
    *,
    models_file: Path | None = None,
    progress: Progress = _quiet,
) -> Platform:
    """Start everything and return once it serves. Raises ``AlreadyRunning`` when another
    ``whetstone up`` holds ``state_dir``, ``PortInUse``, ``FileNotFoundError`` for a missing
    ``models_file``, and ``RuntimeError`` / ``TimeoutError`` when a child fails to start.

    Call it from a thread that outlives the platform (the children die with it)."""
    state_dir = state_dir.resolve()
    lock = StateLock.acquire(state_dir)  # first: a second `up` must change nothing
    try:
        if models_file is not None:
            models_file = models_file.resolve()
            if not models_file.is_file():
                raise FileNotFoundError(f"models file {models_file} does not exist")
        if port:
            check_port_free(port)
        port = port or free_port()
        base_url = f"http://127.0.0.1:{port}"
        lock.record(pid=os.getpid(), base_url=base_url, state_dir=str(state_dir))
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        models_dir = (models_dir or Path.home() / ".cache" / "whetstone" / "models").resolve()
        if not builtin_model_dir(models_dir).is_dir():
            progress(f"generating built-in model under {models_dir} ...")
        # Once here, so the services do not race to build it; in a child, so no torch here.
        ensure_builtin_model_in_subprocess(models_dir)
        progress("starting nats-server ...")
        nats = start_nats(state_dir, tied_to_parent=True)
    except BaseException:
        lock.release()
        raise
    env = {
        **os.environ,
        **(extra_env or {}),
        "WHETSTONE_NATS_URL": nats.url,
        "WHETSTONE_STATE_DIR": str(state_dir),
        "WHETSTONE_MODELS_DIR": str(models_dir),
        "WHETSTONE_PORT": str(port),
    }
    if models_file is not None:
        env["WHETSTONE_MODELS_FILE"] = str(models_file)
    platform = Platform(state_dir, nats, base_url, _saved_key(state_dir), env, lock, progress)
    try:
        platform.pythons = service_pythons(env, models_dir, models_file)
        for name in SERVICES:
            progress(f"starting {name} ...")
            platform.services[name] = Child(name, platform.spawn(name), time.monotonic())
        asyncio.run(_register_key_and_wait(platform, ready_timeout_s))
        platform.write_info()
    except BaseException:
        platform.stop()
        raise
    return platform


def service_pythons(
    env: dict[str, str], models_dir: Path, models_file: Path | None
) -> dict[str, str]:
    """The interpreters of the services that do not run on ours: the sampler, when the registry
    serves its base model on vLLM (which lives in a virtual environment of its own, since it pins
    other torch and transformers versions). A bad models file raises ``RegistryError``, a missing
    vLLM interpreter ``RuntimeError``: both before any service starts."""
    base_model = env.get("WHETSTONE_BASE_MODEL") or BUILTIN_MODEL_NAME
    if models_file is None and env.get("WHETSTONE_MODELS_FILE"):
        models_file = Path(env["WHETSTONE_MODELS_FILE"])
    spec = load_registry(models_dir, models_file).resolve(base_model)
    if spec.engine != "vllm":
        return {}
    python = Path(env.get(VLLM_PYTHON_ENV) or DEFAULT_VLLM_PYTHON)
    if not os.access(python, os.X_OK):
        raise RuntimeError(
            f"base model {spec.name!r} is served on vLLM, but {python} is no interpreter: "
            f"run scripts/setup-vllm, or point {VLLM_PYTHON_ENV} at a Python with vLLM"
        )
    return {"sampler": str(python)}


def _saved_key(state_dir: Path, replace: bool = False) -> str:
    """The default tenant's key, kept (mode 0600) so that restarts print the same one."""
    path = state_dir / "api_key"
    if path.exists() and not replace:
        return path.read_text().strip()
    key = new_key()
    path.write_text(key)
    path.chmod(0o600)
    return key


async def _register_key_and_wait(platform: Platform, timeout_s: float) -> None:
    bus = await b.connect(platform.nats_url, "whetstone-up")
    try:
        record = await register_key(bus, DEFAULT_TENANT, platform.api_key)
        if record.revoked or record.tenant != DEFAULT_TENANT:
            platform.progress("the saved default key was revoked; minting a new one")
            platform.api_key = _saved_key(platform.state_dir, replace=True)
            await register_key(bus, DEFAULT_TENANT, platform.api_key)
        seen: set[str] = set()

        async def on_beat(msg: Msg) -> None:
            role = msg.subject.split(".")[3]  # ws.ctl.heartbeat.<role>.<worker>
            if role not in seen:
                seen.add(role)
                platform.progress(f"  {role} is heartbeating")

        sub = await bus.nc.subscribe(f"{s.HEARTBEAT_PREFIX}.>", cb=on_beat)
        platform.progress("waiting for trainer, sampler, gateway ...")
        deadline = time.monotonic() + timeout_s
        gateway_up = False
        while True:
            platform.check_children()
            if not gateway_up and await asyncio.to_thread(_healthy, platform.base_url):
                gateway_up = True
                platform.progress(f"  gateway is serving on {platform.base_url}")
            if gateway_up and {"trainer", "sampler"} <= seen:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"platform not ready after {timeout_s:.0f} s; "
                    f"logs in {platform.state_dir / 'logs'}"
                )
            await asyncio.sleep(0.2)
        await sub.unsubscribe()
    finally:
        await bus.close()


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/api/v1/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def read_platform(state_dir: Path) -> dict[str, Any]:
    path = state_dir / PLATFORM_FILE
    if not path.exists() or lock_holder(state_dir) is None:
        raise FileNotFoundError(
            f"no running platform under {state_dir} (start one with `whetstone up`)"
        )
    info: dict[str, Any] = json.loads(path.read_text())
    return info
