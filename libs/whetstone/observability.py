"""Logs and traces for every service, configured once.

Logs: structlog, JSON lines when stderr is not a terminal. Every line carries the service name
and whatever the message-fate wrapper and the gateway bind for the work at hand (request id,
run id, tenant; see ``bind_work``), plus the current OpenTelemetry trace id. API keys and bearer
tokens are masked in every value before rendering, so no key reaches a log file.

Traces: OpenTelemetry, configured by the standard environment variables, which ``whetstone up``
passes to its children:

* ``OTEL_TRACES_EXPORTER``: ``otlp`` (default when an endpoint is set), ``console`` or ``none``;
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: where to send;
* ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (default) or ``grpc``.

With none of them set nothing is exported (spans are still created, so trace ids appear in logs
and travel between services). Each service reports its own ``service.name``
(``whetstone-gateway``, ``whetstone-trainer``, ...).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

# A Tinker key (tml-...) or any bearer token, wherever it appears in a logged value.
_SECRET = re.compile(r"(tml-)[A-Za-z0-9_\-]{6,}|(Bearer\s+)[A-Za-z0-9_.\-]{6,}")
_SECRET_KEYS = {"api_key", "x-api-key", "authorization", "key", "token"}


def _mask(value: str) -> str:
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2)) + "***", value)


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask keys and tokens in every string value."""
    for name, value in list(event.items()):
        if name.lower() in _SECRET_KEYS and value:
            event[name] = "***"
        elif isinstance(value, str):
            event[name] = _mask(value)
    return event


def add_trace_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event.setdefault("trace_id", format(span.trace_id, "032x"))
    return event


class _RedactingFilter(logging.Filter):
    """The same masking for the standard-library loggers (uvicorn, FastStream, nats-py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _mask(record.msg)
        if record.args:
            record.args = tuple(_mask(a) if isinstance(a, str) else a for a in record.args)
        return True


def configure_logging(service: str, level: str = "INFO") -> structlog.stdlib.BoundLogger:
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_trace_id,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {service} %(name)s %(levelname)s %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactingFilter())
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger(service=service)  # type: ignore[no-any-return]


def bind_work(**fields: str | int | None) -> None:
    """Bind the ids of the work at hand (request id, run id, tenant) to every log line of the
    current task; ``None`` values are skipped."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in fields.items() if v is not None})


# ---------------------------------------------------------------- tracing

_providers: dict[str, TracerProvider] = {}
_extra_exporters: list[SpanExporter] = []


def _exporter_from_env(env: Mapping[str, str]) -> SpanExporter | None:
    names = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not names:
        names = "otlp" if endpoint else "none"
    name = names.split(",")[0].strip()
    if name in ("none", ""):
        return None
    if name == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported (otlp, console, none)")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()  # endpoint, headers and TLS from the OTEL_* variables
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http()


def add_span_exporter(exporter: SpanExporter) -> None:
    """Export every provider's spans also to ``exporter`` (tests use an in-memory one)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    _extra_exporters.append(exporter)
    for provider in _providers.values():
        provider.add_span_processor(SimpleSpanProcessor(exporter))


def tracer_provider(service: str, env: Mapping[str, str] | None = None) -> TracerProvider:
    """The tracer provider of ``service`` (one per service name in this process, so tests can
    run several services in one process, each with its own ``service.name``)."""
    name = f"whetstone-{service}"
    provider = _providers.get(name)
    if provider is not None:
        return provider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    exporter = _exporter_from_env(os.environ if env is None else env)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for extra in _extra_exporters:
        provider.add_span_processor(SimpleSpanProcessor(extra))
    _providers[name] = provider
    return provider


def shutdown_tracing() -> None:
    """Flush and close every provider (on a service's shutdown)."""
    for provider in _providers.values():
        provider.shutdown()
