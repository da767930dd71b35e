"""Gateway: ``python -m services.gateway``. Serves the Tinker HTTP API on uvicorn."""

from __future__ import annotations

import uvicorn

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from whetstone.observability import configure_logging


def main() -> None:
    settings = GatewaySettings()
    log = configure_logging("gateway", settings.log_level)
    app = create_app(settings, log)
    # Long polls are held open; do not let them delay a shutdown.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        # libuv's event loop and the C HTTP parser: less CPU per request than asyncio's loop
        # with h11, and CPU is what bounds one gateway's futures per second (bench/RESULTS.md).
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
