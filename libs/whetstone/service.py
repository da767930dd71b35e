"""Running a bus service (trainer, sampler, scheduler, billing) as a FastStream application.

``serve`` wraps the service's broker in an ``AsgiFastStream`` app served by uvicorn on the
service's metrics port, with three HTTP routes beside the consumers:

* ``/metrics``: Prometheus text (``whetstone.metrics`` plus FastStream's own series);
* ``/livez``: 200 while the process and its event loop run;
* ``/readyz``: 200 once the service has started its consumers and NATS is connected, 503 while
  it starts, drains or is disconnected.

On SIGTERM or SIGINT (uvicorn's handlers) the app's shutdown hook runs the service's ``stop``
(stop taking work, finish or nak what it holds), then the broker stops its subscribers, waiting
for in-flight handlers up to its graceful timeout, and drains the connection. The process then
exits 0, and unacknowledged work is redelivered to another replica.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Awaitable, Callable

import structlog
import uvicorn
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.types import Scope
from prometheus_client import make_asgi_app

from whetstone import metrics
from whetstone.bus import Bus
from whetstone.observability import shutdown_tracing

Hook = Callable[[], Awaitable[None]]


class Readiness:
    """Ready once started, not ready while draining; NATS must be connected either way."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.bus.nc.is_connected


def _gpu_memory(service: str) -> None:
    torch = sys.modules.get("torch")  # only processes that already use torch report GPU memory
    if torch is None or not torch.cuda.is_available():
        return
    for index in range(torch.cuda.device_count()):
        metrics.GPU_MEMORY.labels(service, f"cuda:{index}").set(torch.cuda.memory_allocated(index))


def build_app(
    bus: Bus, readiness: Readiness, on_start: Hook | None = None, on_stop: Hook | None = None
) -> AsgiFastStream:
    prometheus = make_asgi_app(metrics.REGISTRY)

    async def scrape(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        _gpu_memory(bus.service)
        await prometheus(scope, receive, send)

    @get(include_in_schema=False)
    async def livez(scope: Scope) -> AsgiResponse:
        return AsgiResponse(b"ok", 200)

    @get(include_in_schema=False)
    async def readyz(scope: Scope) -> AsgiResponse:
        return AsgiResponse(b"ready", 200) if readiness.ready else AsgiResponse(b"not ready", 503)

    async def started() -> None:
        if on_start is not None:
            await on_start()
        readiness.started = True

    async def stopping() -> None:
        readiness.draining = True
        if on_stop is not None:
            await on_stop()

    return AsgiFastStream(
        bus.broker,
        asgi_routes=[("/metrics", scrape), ("/livez", livez), ("/readyz", readyz)],
        after_startup=[started],
        on_shutdown=[stopping],
        logger=None,
    )


async def serve(
    bus: Bus,
    port: int,
    log: structlog.stdlib.BoundLogger,
    *,
    host: str = "127.0.0.1",
    on_start: Hook | None = None,
    on_stop: Hook | None = None,
) -> None:
    """Run the service until SIGTERM/SIGINT. ``port`` 0 takes any free port (logged)."""
    readiness = Readiness(bus)
    app = build_app(bus, readiness, on_start, on_stop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise SystemExit(
            f"{bus.service}: cannot listen on {host}:{port} ({exc.strerror})"
        ) from None
    bound = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="on"
        )
    )
    log.info("metrics and health", url=f"http://{host}:{bound}/metrics")
    try:
        await server.serve(sockets=[sock])
    finally:
        shutdown_tracing()
        log.info("stopped")
