"""The gateway's HTTP application: the Tinker API (tinker 0.38, see the wire protocol notes).

This module holds the app factory, the error mapping (the one place where Whetstone's exceptions
become HTTP statuses and Tinker error bodies), the bootstrap and session endpoints, and
``retrieve_future``. Training and sampling endpoints live in ``training.py`` and ``sampling.py``.
"""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from services.gateway import sampling, training
from services.gateway.context import Gateway, gateway, tenant
from services.gateway.futures import FutureWaiters
from services.gateway.settings import GatewaySettings
from services.gateway.wire import (
    encode_forward_backward_output,
    encode_sample_response,
    forward_backward_output_json,
    sample_response_json,
)
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.errors import WhetstoneError
from whetstone.messages import (
    CreateModelResult,
    ForwardBackwardResult,
    FutureRecord,
    OptimStepResult,
    SampleResult,
    SaveWeightsResult,
    SessionRecord,
    utcnow,
)

PROTOBUF = "application/x-protobuf"
router = APIRouter(prefix="/api/v1")


def create_app(settings: GatewaySettings, log) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        bus = await b.connect(settings.nats_url, "gateway")
        waiters = FutureWaiters(bus)
        await waiters.start()
        app.state.gateway = Gateway(settings, bus, settings.registry(), waiters, log)
        log.info("gateway ready", url=f"http://{settings.host}:{settings.port}")
        yield
        await bus.close()

    app = FastAPI(title="Whetstone", lifespan=lifespan)
    app.include_router(router)
    app.include_router(training.router)
    app.include_router(sampling.router)

    @app.exception_handler(WhetstoneError)
    async def whetstone_error(request: Request, exc: WhetstoneError) -> JSONResponse:
        # Every 4xx carries a body: the SDK treats an empty 400 as a proxy rejection and retries.
        return JSONResponse({"error": exc.message, "category": exc.category, "detail": exc.message},
                            status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {detail}", "category": "user", "detail": detail},
                            status_code=400)

    return app




# ---------------------------------------------------------------- bootstrap and service


@router.post("/client/config")
async def client_config() -> dict:
    return {}


@router.post("/client/dynamic_config")
async def client_dynamic_config() -> dict:
    return {}


@router.post("/telemetry")
async def telemetry() -> dict:
    return {"status": "accepted"}


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def get_server_capabilities(gw: Gateway = Depends(gateway)) -> dict:
    return {"supported_models": [
        {"model_name": spec.name, "max_context_length": spec.context_length, "trainable": True, "sampleable": True}
        for spec in gw.registry.specs()
    ]}


# ---------------------------------------------------------------- sessions


class CreateSessionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tags: list[str] = []
    user_metadata: dict[str, str] = {}


class SessionIdBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_id: str


@router.post("/create_session")
async def create_session(body: CreateSessionBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)) -> dict:
    session_id = f"sess-{uuid.uuid4().hex[:16]}"
    record = SessionRecord(session_id=session_id, tenant=t, tags=body.tags, user_metadata=body.user_metadata)
    await b.kv_put(gw.bus.kv[s.SESSIONS_BUCKET], s.token(session_id), record)
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
async def session_heartbeat(body: SessionIdBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)) -> Response:
    record = await gw.session(t, body.session_id)
    if record.finished:  # 410 tells the SDK to stop heartbeating for good
        return JSONResponse({"error": "session finished", "category": "user"}, status_code=410)
    await b.kv_put(gw.bus.kv[s.SESSIONS_BUCKET], s.token(record.session_id),
                   record.model_copy(update={"last_heartbeat_at": utcnow()}))
    return JSONResponse({"type": "session_heartbeat"})


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)) -> dict:
    record = await gw.session(t, session_id)
    await b.kv_put(gw.bus.kv[s.SESSIONS_BUCKET], s.token(session_id), record.model_copy(update={"finished": True}))
    return {}


# ---------------------------------------------------------------- futures


class RetrieveFutureBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str
    allow_metadata_only: bool = False


@router.post("/retrieve_future")
async def retrieve_future(body: RetrieveFutureBody, request: Request, t: str = Depends(tenant),
                          gw: Gateway = Depends(gateway)) -> Response:
    record = await gw.waiters.wait(body.request_id, t, gw.settings.long_poll_s)
    wants_proto = PROTOBUF in request.headers.get("accept", "")
    return future_response(record, wants_proto)


def future_response(record: FutureRecord, wants_proto: bool) -> Response:
    """A future as the SDK expects it: try_again while pending, ``{"error","category"}`` on
    failure, protobuf for forward_backward and sample results, JSON for the rest."""
    if record.status == "pending":
        return JSONResponse({"type": "try_again", "request_id": record.request_id,
                             "queue_state": record.queue_state, "queue_state_reason": None})
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
    if isinstance(result, OptimStepResult):
        return JSONResponse({"type": "optim_step", "metrics": result.metrics})
    if isinstance(result, SaveWeightsResult):
        if result.kind == "training":
            return JSONResponse({"type": "save_weights", "path": result.path})
        body = {"type": "save_weights_for_sampler", "path": result.path}
        if result.sampler_id:
            body["sampling_session_id"] = result.sampler_id
        return JSONResponse(body)
    raise AssertionError(f"unhandled result type {type(result).__name__}")
