"""The gateway's HTTP application: the Tinker API (tinker 0.38, see the wire protocol notes).

This module holds the app factory, the error mapping (the one place where Whetstone's exceptions
become HTTP statuses and Tinker error bodies), the bootstrap and session endpoints, and
``retrieve_future``. Training and sampling endpoints live in ``training.py`` and ``sampling.py``.

Around the routes: the body limit (``limits.py``, 413), HTTP metrics (``metrics.py``, served at
``/metrics``), OpenTelemetry spans per request, and the probes ``/livez`` (the process answers)
and ``/readyz`` (connected to NATS). None of these need an API key; no header is ever logged.
Every other request needs a valid API key, checked before routing (``ApiKeyFirst``: 401).
An unrouted ``/api/v1/*`` POST is answered 404 after filling the seq_id it may have spent.
The REST routes (runs, checkpoints, sessions, keys, downloads) live in ``rest.py``.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats.errors
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.trace import TracerProvider
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.stdlib import BoundLogger

from services.gateway import (
    audit_log,
    billing,
    custom_loss,
    hpcai,
    metrics,
    rest,
    sampling,
    session_search,
    traces,
    training,
)
from services.gateway.context import Gateway, gateway, tenant
from services.gateway.futures import FutureWaiters
from services.gateway.jwt_auth import INVALID_TOKEN, InvalidToken
from services.gateway.limits import BodyLimit
from services.gateway.settings import GatewaySettings
from services.gateway.validation import describe
from services.gateway.wire import (
    encode_forward_backward_output,
    encode_sample_response,
    forward_backward_output_json,
    sample_response_json,
)
from whetstone import bus as b
from whetstone import observability
from whetstone import subjects as s
from whetstone.errors import NotFound, RateLimited, Unavailable, WhetstoneError
from whetstone.messages import (
    CreateCustomLossResult,
    CreateModelResult,
    ForwardBackwardResult,
    FutureRecord,
    LoadWeightsResult,
    OptimStepResult,
    SampleResult,
    SaveWeightsResult,
    SessionRecord,
    UnloadModelResult,
    utcnow,
)

PROTOBUF = "application/x-protobuf"
router = APIRouter(prefix="/api/v1")


# Paths that answer without an API key and are left out of metrics and traces.
PROBE_PATHS = frozenset({"/metrics", "/livez", "/readyz", "/api/v1/healthz"})
# Paths that check their own credential: the finance page (HTTP Basic, so browsers get a login
# prompt) and signed download URLs (the signature is the credential, ``rest.py``).
SELF_AUTHENTICATED = ("/billing/", rest.DOWNLOADS_PREFIX)


class ApiKeyFirst:
    """Authentication before routing: any other request without a valid ``X-API-Key`` gets 401
    with a Tinker error body, whatever its path (an unknown path never tells a wrong key "Not
    Found"). The tenant found is left in the request's state for the ``tenant`` dependency.
    Pure ASGI middleware, like the body limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path in PROBE_PATHS or path.startswith(SELF_AUTHENTICATED):
            await self.app(scope, receive, send)
            return
        key = Headers(scope=scope).get("x-api-key")
        gw: Gateway | None = getattr(scope["app"].state, "gateway", None)
        try:
            if gw is None:
                raise Unavailable("the gateway is starting; retry")
            try:
                scope.setdefault("state", {})["tenant"] = await gw.tenant_of(key)
            except nats.errors.Error as exc:
                raise Unavailable("the bus is unavailable; retry") from exc
        except WhetstoneError as exc:
            metrics.REFUSALS.labels(type(exc).__name__, exc.category).inc()
            body = {"error": exc.message, "category": exc.category, "detail": exc.message}
            # A bad JWT: the SDK fetches a new one and replays the request (jwt_auth.py).
            headers = {"www-authenticate": INVALID_TOKEN} if isinstance(exc, InvalidToken) else {}
            answer = JSONResponse(body, status_code=exc.http_status, headers=headers)
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(settings: GatewaySettings, log: BoundLogger) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus = await b.connect(settings.nats_url, "gateway", service="gateway")
        waiters = FutureWaiters(bus)
        await waiters.start()
        await bus.broker.start()  # the gateway's one consumer: the futures bucket's updates
        app.state.gateway = Gateway(settings, bus, settings.registry(), waiters, log)
        log.info("gateway ready", url=f"http://{settings.host}:{settings.port}")
        yield
        await bus.close()

    app = FastAPI(title="Whetstone", lifespan=lifespan)
    app.include_router(probes)
    app.include_router(hpcai.router)  # only hpcai requests match it; the rest fall through
    app.include_router(router)
    app.include_router(training.router)
    app.include_router(sampling.router)
    app.include_router(billing.router)
    app.include_router(traces.router)  # before rest's session routes
    app.include_router(traces.downloads)  # before rest's downloads: a more specific path
    app.include_router(session_search.router)
    app.include_router(audit_log.router)
    app.include_router(rest.router)
    app.include_router(rest.downloads)
    app.include_router(custom_loss.router)
    app.include_router(unrouted)  # last: it matches every POST that no route above matched
    # Added last, runs first: metrics see every answer, the 413s of the body limit and the 401s
    # of authentication included.
    app.add_middleware(ApiKeyFirst)
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(metrics.HttpMetrics, skip_paths=PROBE_PATHS)
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_tracer_provider(),
        excluded_urls=",".join(sorted(PROBE_PATHS)),
        http_capture_headers_sanitize_fields=["x-api-key", "authorization", "cookie"],
        # One server span per request: the ASGI layer's extra spans for every body chunk read
        # and every response message sent tripled the gateway's span count and said nothing.
        exclude_spans=["receive", "send"],
    )

    def refusal(status: int, error: str, category: str, reason: str) -> JSONResponse:
        # Every 4xx carries a body: the SDK treats an empty 400 as a proxy rejection and retries.
        metrics.REFUSALS.labels(reason, category).inc()
        return JSONResponse(
            {"error": error, "category": category, "detail": error}, status_code=status
        )

    async def fill_gap_of(request: Request, body: object, reason: str) -> JSONResponse | None:
        """Fill the seq_id a refused JSON body spent; a 503 when the bus cannot take the Skip."""
        try:
            await training.fill_gap_of(
                await gateway(request), request.headers.get("x-api-key"), body, reason
            )
        except Unavailable as exc:
            return refusal(exc.http_status, exc.message, exc.category, type(exc).__name__)
        return None

    @app.exception_handler(WhetstoneError)
    async def whetstone_error(request: Request, exc: WhetstoneError) -> JSONResponse:
        if exc.http_status >= 500:
            log.warning(
                "request failed", path=request.url.path, status=exc.http_status, error=exc.message
            )
        answer = refusal(exc.http_status, exc.message, exc.category, type(exc).__name__)
        if isinstance(exc, RateLimited):  # the SDK waits this long, then sends it again
            answer.headers["Retry-After"] = f"{max(1, math.ceil(exc.retry_after_s))}"
        return answer

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = f"invalid request: {describe(exc.errors())}"
        return await fill_gap_of(request, exc.body, error) or refusal(
            400, error, "user", "RequestValidationError"
        )

    @app.exception_handler(ValidationError)
    async def invalid_value(request: Request, exc: ValidationError) -> JSONResponse:
        return refusal(400, f"invalid request: {describe(exc.errors())}", "user", "ValidationError")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        category = "user" if exc.status_code < 500 else "server"
        return refusal(exc.status_code, str(exc.detail), category, f"http_{exc.status_code}")

    @app.exception_handler(nats.errors.Error)
    async def bus_unavailable(request: Request, exc: nats.errors.Error) -> JSONResponse:
        log.warning("bus unavailable", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        return refusal(503, "the bus is unavailable; retry", "server", "bus_unavailable")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error",
            path=request.url.path,
            error=f"{type(exc).__name__}: {exc}",
            exc_info=exc,
        )
        return refusal(500, "internal server error", "server", "internal")

    return app


def _tracer_provider() -> TracerProvider:
    """The gateway's tracer provider (``service.name`` whetstone-gateway)."""
    return observability.tracer_provider("gateway")


# ---------------------------------------------------------------- probes and metrics

probes = APIRouter()


@probes.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    gw: Gateway | None = getattr(request.app.state, "gateway", None)
    if gw is None or not gw.bus.nc.is_connected:
        return JSONResponse({"status": "not ready", "nats": "disconnected"}, status_code=503)
    return JSONResponse({"status": "ready", "nats": "connected"})


@probes.get("/metrics")
async def prometheus_metrics() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


# ---------------------------------------------------------------- endpoints not served

unrouted = APIRouter()


@unrouted.post("/api/v1/{path:path}", include_in_schema=False)
async def unsupported(path: str, request: Request, gw: Gateway = Depends(gateway)) -> Response:
    """A Tinker endpoint this server does not serve. A training call
    spent a seq_id all the same: fill it, so that the run's later requests still run."""
    endpoint = f"/api/v1/{path}"
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    await training.fill_gap_of(
        gw, request.headers.get("x-api-key"), body, f"unsupported endpoint {endpoint}"
    )
    raise NotFound(f"endpoint {endpoint} is not supported by this server")


# ---------------------------------------------------------------- bootstrap and service


@router.post("/client/config")
async def client_config(gw: Gateway = Depends(gateway)) -> dict[str, object]:
    return {
        "sample_use_retrieve_futures": gw.settings.sample_use_retrieve_futures,
        "sample_join_sampling_session": gw.settings.sample_join_sampling_session,
        # create_custom_loss uploads the traced loss; the trainer runs it (custom_loss.py).
        "custom_loss_server_side": True,
        "pjwt_auth_enabled": gw.settings.jwt_auth_enabled,
    }


@router.post("/client/dynamic_config")
async def client_dynamic_config(gw: Gateway = Depends(gateway)) -> dict[str, object]:
    return {"sample_cancel_enabled": gw.settings.sample_cancel_enabled}


@router.post("/telemetry")
async def telemetry() -> dict[str, str]:
    return {"status": "accepted"}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def get_server_capabilities(gw: Gateway = Depends(gateway)) -> dict[str, object]:
    return {
        "supported_models": [
            {
                "model_name": spec.name,
                "max_context_length": spec.context_length,
                "trainable": True,
                "sampleable": True,
            }
            for spec in gw.registry.specs()
        ]
    }


# ---------------------------------------------------------------- sessions


class CreateSessionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tags: list[str] = []
    user_metadata: dict[str, str] = {}
    project_id: str | None = Field(None, max_length=256)
    display_name: str | None = Field(None, max_length=256)


class SessionIdBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_id: str


@router.post("/create_session")
async def create_session(
    body: CreateSessionBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    session_id = f"sess-{uuid.uuid4().hex[:16]}"
    record = SessionRecord(
        session_id=session_id,
        tenant=t,
        tags=body.tags,
        user_metadata=body.user_metadata,
        project_id=body.project_id or None,
        display_name=body.display_name or None,
    )
    await b.kv_put(gw.bus.kv[s.SESSIONS_BUCKET], s.token(session_id), record)
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
async def session_heartbeat(
    body: SessionIdBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> Response:
    record = await gw.session(t, body.session_id)
    if record.finished:  # 410 tells the SDK to stop heartbeating for good
        return JSONResponse({"error": "session finished", "category": "user"}, status_code=410)
    await b.kv_put(
        gw.bus.kv[s.SESSIONS_BUCKET],
        s.token(record.session_id),
        record.model_copy(update={"last_heartbeat_at": utcnow()}),
    )
    return JSONResponse({"type": "session_heartbeat"})


FINISH_REASONS = ("success", "errored", "interrupted")  # what tinker's close() sends


class FinishReason(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(max_length=64)


class FinishSessionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reason: FinishReason | None = None


@router.post("/sessions/{session_id}/finish")
async def finish_session(
    session_id: str,
    body: FinishSessionBody | None = None,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    record = await gw.session(t, session_id)
    reason = body.reason.type if body is not None and body.reason is not None else None
    reason = reason if reason in FINISH_REASONS else None  # kept only when Tinker knows it
    await b.kv_put(
        gw.bus.kv[s.SESSIONS_BUCKET],
        s.token(session_id),
        record.model_copy(update={"finished": True, "finish_reason": reason}),
    )
    return {}


# ---------------------------------------------------------------- futures


class RetrieveFutureBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str
    allow_metadata_only: bool = False


@router.post("/retrieve_future")
async def retrieve_future(
    body: RetrieveFutureBody,
    request: Request,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> Response:
    record = await gw.waiters.wait(body.request_id, t, gw.settings.long_poll_s)
    wants_proto = PROTOBUF in request.headers.get("accept", "")
    if not record.final:
        return future_response(record, wants_proto)
    metrics.FUTURES_COMPLETED.labels(record.op, record.status).inc()
    # The result's way back belongs to the request's trace (the worker's span wrote ``trace``);
    # this poll's own HTTP span is linked to it.
    here = trace.get_current_span().get_span_context()
    with (
        _tracer_provider()
        .get_tracer("whetstone.gateway")
        .start_as_current_span(
            f"deliver {record.op}",
            context=propagate.extract(record.trace),
            links=[trace.Link(here)] if here.is_valid else None,
            attributes={
                "whetstone.request_id": record.request_id,
                "whetstone.status": record.status,
            },
        )
    ):
        return future_response(record, wants_proto)


def future_response(record: FutureRecord, wants_proto: bool) -> Response:
    """A future as the SDK expects it: try_again while pending, ``{"error","category"}`` on
    failure, protobuf for forward_backward and sample results, JSON for the rest."""
    if record.status == "pending":
        return JSONResponse(
            {
                "type": "try_again",
                "request_id": record.request_id,
                "queue_state": record.queue_state,
                "queue_state_reason": None,
            }
        )
    if record.status == "failed":
        return JSONResponse({"error": record.error, "category": record.category or "unknown"})
    result = record.result
    if isinstance(result, ForwardBackwardResult):
        if wants_proto:
            return Response(encode_forward_backward_output(result), media_type=PROTOBUF)
        return JSONResponse(forward_backward_output_json(result))
    if isinstance(result, SampleResult):
        if wants_proto:
            return Response(encode_sample_response(result), media_type=PROTOBUF)
        return JSONResponse(sample_response_json(result))
    if isinstance(result, CreateModelResult):
        return JSONResponse({"type": "create_model", "model_id": result.model_id})
    if isinstance(result, LoadWeightsResult):
        return JSONResponse(
            {"type": "load_weights", "path": result.path, "model_id": result.model_id}
        )
    if isinstance(result, UnloadModelResult):
        return JSONResponse({"type": "unload_model", "model_id": result.model_id})
    if isinstance(result, OptimStepResult):
        return JSONResponse({"type": "optim_step", "metrics": result.metrics})
    if isinstance(result, CreateCustomLossResult):
        return JSONResponse({"type": "create_custom_loss", "loss_id": result.loss_id})
    if isinstance(result, SaveWeightsResult):
        if result.kind == "training":
            return JSONResponse({"type": "save_weights", "path": result.path})
        if result.kind == "external":
            external: dict[str, object] = {"type": "save_weights_external", "path": result.path}
            if result.size_bytes is not None:
                external["size_bytes"] = result.size_bytes
            return JSONResponse(external)
        body = {"type": "save_weights_for_sampler", "path": result.path}
        if result.sampler_id:
            body["sampling_session_id"] = result.sampler_id
        return JSONResponse(body)
    raise AssertionError(f"unhandled result type {type(result).__name__}")
