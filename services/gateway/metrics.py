"""The gateway's Prometheus metrics and the ASGI middleware that records the HTTP ones.

Served at ``/metrics`` on the gateway's own port, from prometheus-client's default registry, so
the platform-wide series of ``whetstone.metrics`` appear beside these. ``operation`` is the
route's path template (``/api/v1/forward_backward``), never the raw path: run ids and unknown
paths cannot blow up the label set (a path no route matches is ``unrouted``).

* ``whetstone_gateway_http_requests_total{operation,status}`` and
  ``whetstone_gateway_http_request_duration_seconds{operation,status}``: every HTTP request;
* ``whetstone_gateway_http_requests_in_flight``: requests being answered now;
* ``whetstone_gateway_submissions_total{op}``: requests queued on the bus;
* ``whetstone_gateway_refusals_total{reason,category}``: error answers, by exception class;
* ``whetstone_gateway_futures_completed_total{op,status}``: final futures handed to clients;
* ``whetstone_gateway_long_polls_waiting``: ``retrieve_future`` calls holding for a result.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from whetstone.metrics import LATENCY_BUCKETS_S

# Long polls hold for up to ~25 s: the shared latency buckets reach past that.
HTTP_BUCKETS_S = LATENCY_BUCKETS_S
UNROUTED = "unrouted"

HTTP_REQUESTS = Counter(
    "whetstone_gateway_http_requests_total",
    "HTTP requests answered, by route and status",
    ["operation", "status"],
)
HTTP_LATENCY = Histogram(
    "whetstone_gateway_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["operation", "status"],
    buckets=HTTP_BUCKETS_S,
)
HTTP_IN_FLIGHT = Gauge("whetstone_gateway_http_requests_in_flight", "HTTP requests being answered")
SUBMISSIONS = Counter(
    "whetstone_gateway_submissions_total",
    "Requests queued on the bus, per operation",
    ["op"],
)
REFUSALS = Counter(
    "whetstone_gateway_refusals_total",
    "Error answers, by reason (exception) and category",
    ["reason", "category"],
)
FUTURES_COMPLETED = Counter(
    "whetstone_gateway_futures_completed_total",
    "Final futures returned by retrieve_future",
    ["op", "status"],
)
LONG_POLLS = Gauge("whetstone_gateway_long_polls_waiting", "retrieve_future calls waiting now")


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format, with its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class HttpMetrics:
    """Pure ASGI middleware: counts, times and gauges every HTTP request by route and status.

    The route is read from the scope after the app ran (the router records the matched route
    there), so the label is the template, whatever the path held."""

    def __init__(self, app: ASGIApp, skip_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.skip_paths = skip_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.skip_paths:
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets when the app raises before answering

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            HTTP_IN_FLIGHT.dec()
            route = scope.get("route")
            operation = getattr(route, "path", None) or UNROUTED
            HTTP_REQUESTS.labels(operation, str(status)).inc()
            HTTP_LATENCY.labels(operation, str(status)).observe(time.perf_counter() - start)
