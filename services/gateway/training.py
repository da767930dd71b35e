"""Training endpoints of the Tinker API: create_model, get_info, forward_backward (protobuf),
optim_step, save_weights, save_weights_for_sampler.

Each submission is validated here (the caller learns of bad input at once, with a 400), then
published on the run's durable subject ``ws.train.<run>`` (create_model: on ``ws.ctl.place`` for
the scheduler) and answered with a future id; the gateway never waits for GPU work.

A training request's seq_id is spent by the client whether or not the gateway accepts it, and
the trainer runs a run's requests in seq_id order. So every refusal of a request whose run and
seq_id are known fills that seq_id with a ``Skip`` (``Gateway.fill_gap``): in the handlers
(``refused_in_order``), for bodies refused by their model (``fill_gap_of``, called by the app's
error handlers) and for endpoints the gateway does not serve (the app's catch-all).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from services.gateway.context import Gateway, caller_key_id, gateway, tenant, train_dedup_key
from services.gateway.custom_loss import with_custom_loss
from services.gateway.validation import check_lora, validate_forward_backward
from services.gateway.wire import forward_backward_command, parse_forward_backward
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath, check_name, store_key
from whetstone.errors import UserError
from whetstone.messages import (
    AdamParams,
    AdapterRef,
    LoraConfig,
    OptimStep,
    PlaceRun,
    SamplingSessionRecord,
    SaveWeights,
    TrainCommand,
    TrainingRunRecord,
    TrainRequest,
)

router = APIRouter(prefix="/api/v1")


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateModelBody(Body):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: LoraConfig = LoraConfig()
    user_metadata: dict[str, str] | None = None


class ModelIdBody(Body):
    model_id: str


class OptimStepBody(Body):
    model_id: str
    seq_id: int
    adam_params: AdamParams


class SaveWeightsBody(Body):
    model_id: str
    seq_id: int
    path: str | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None
    sampling_session_seq_id: int | None = None
    type: Literal["save_weights", "save_weights_for_sampler"] | None = None


def _future(request_id: str, model_id: str | None = None) -> dict[str, object]:
    return {"request_id": request_id, **({"model_id": model_id} if model_id else {})}


@router.post("/create_model")
async def create_model(
    body: CreateModelBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    await gw.session(t, body.session_id)
    spec = gw.registry.resolve(body.base_model)
    lora = body.lora_config  # its own rules held when the body was read
    check_lora(lora, spec)
    run_id = f"{body.session_id}:train:{body.model_seq_id}"
    run = TrainingRunRecord(
        run_id=run_id,
        tenant=t,
        session_id=body.session_id,
        base_model=spec.name,
        lora=lora,
        user_metadata=body.user_metadata or {},
    )
    await gw.admit_run(t, run_id)  # over the tenant's run quota: 429, nothing recorded
    runs = gw.bus.kv[s.RUNS_BUCKET]
    existing = await b.kv_create(runs, s.token(run_id), run.encode())
    if existing is not None and TrainingRunRecord.decode(existing).tenant != t:
        raise UserError(f"model id {run_id!r} is taken")
    request_id = await gw.submit_once(
        f"create.{s.token(run_id)}",
        t,
        "create_model",
        s.PLACE_SUBJECT,
        lambda rid: PlaceRun(request_id=rid, run=run),
    )
    return _future(request_id, run_id)


@router.post("/get_info")
async def get_info(
    body: ModelIdBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    run = await gw.run(t, body.model_id)
    spec = gw.registry.resolve(run.base_model)
    return {
        "type": "get_info",
        "model_id": run.run_id,
        "model_data": {"arch": spec.arch, "model_name": spec.name, "tokenizer_id": str(spec.path)},
        "is_lora": True,
        "lora_rank": run.lora.rank,
        "model_name": spec.name,
        "optimizer_config": {"type": "adamw"},
    }


@router.post("/forward_backward")
async def forward_backward(
    request: Request, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    body = await request.body()
    if "json" in request.headers.get("content-type", ""):
        message = (
            "forward_backward takes a protobuf ForwardBackwardRequest (application/x-protobuf)"
        )
        await fill_gap_of(gw, request.headers.get("x-api-key"), _json_or_none(body), message)
        raise UserError(message)
    # Undecodable bytes name no run: nothing to fill. From here on the run and seq_id are known.
    proto = parse_forward_backward(body, request.headers.get("content-encoding"))
    run = await gw.run(t, proto.model_id)
    async with refused_in_order(gw, t, run, proto.seq_id):
        command = await with_custom_loss(gw, t, run, forward_backward_command(proto))
        validate_forward_backward(command, gw.registry.resolve(run.base_model))
    op = "forward" if command.forward_only else "forward_backward"
    return _future(await _submit(gw, t, run, proto.seq_id, op, command), run.run_id)


@router.post("/optim_step")
async def optim_step(
    body: OptimStepBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    run = await gw.run(t, body.model_id)  # adam_params obeyed AdamParams' rules when read
    command = OptimStep(adam=body.adam_params)
    return _future(await _submit(gw, t, run, body.seq_id, "optim_step", command), run.run_id)


@router.post("/save_weights")
async def save_weights(
    body: SaveWeightsBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    run = await gw.run(t, body.model_id)
    async with refused_in_order(gw, t, run, body.seq_id):
        name = check_name(body.path or "")
    command = SaveWeights(
        kind="training", name=name, overwrite=body.overwrite, ttl_seconds=body.ttl_seconds
    )
    return _future(await _submit(gw, t, run, body.seq_id, "save_weights", command), run.run_id)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(
    body: SaveWeightsBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    run = await gw.run(t, body.model_id)
    if body.path is not None:
        async with refused_in_order(gw, t, run, body.seq_id):
            name = check_name(body.path)
        command = SaveWeights(
            kind="sampler", name=name, overwrite=True, ttl_seconds=body.ttl_seconds
        )
    elif body.sampling_session_seq_id is not None:
        # Ephemeral form: the result is a sampling session over the weights saved now.
        sampler_id = f"{run.session_id}:sample:{body.sampling_session_seq_id}"
        name = f"ephemeral-{body.sampling_session_seq_id}"
        path = TinkerPath(run.run_id, "sampler", name)
        record = SamplingSessionRecord(
            sampler_id=sampler_id,
            tenant=t,
            session_id=run.session_id,
            base_model=run.base_model,
            adapter=AdapterRef(tinker_path=str(path), store_key=store_key(t, path)),
        )
        await b.kv_put(gw.bus.kv[s.SAMPLERS_BUCKET], s.token(sampler_id), record)
        command = SaveWeights(kind="sampler", name=name, overwrite=True, sampler_id=sampler_id)
    else:
        async with refused_in_order(gw, t, run, body.seq_id):
            raise UserError("save_weights_for_sampler needs 'path' or 'sampling_session_seq_id'")
    return _future(await _submit(gw, t, run, body.seq_id, "save_weights", command), run.run_id)


@asynccontextmanager
async def refused_in_order(
    gw: Gateway, t: str, run: TrainingRunRecord, seq_id: int
) -> AsyncIterator[None]:
    """Validation of a training request: when it refuses the request, the request's seq_id is
    filled (``Gateway.fill_gap``) so that the run's later requests still run."""
    try:
        yield
    except UserError as exc:
        if seq_id >= 1:
            await gw.fill_gap(t, run.run_id, seq_id, exc.message)
        raise


async def fill_gap_of(gw: Gateway, api_key: str | None, body: object, reason: str) -> bool:
    """Fill the seq_id of a refused request, known only by its JSON ``body``: when the body
    names a run of the key's tenant (``model_id``) and a ``seq_id``. Returns whether it did;
    a body that names no such run has no gap to fill."""
    if not isinstance(body, Mapping):
        return False
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    if (
        not isinstance(model_id, str)
        or not isinstance(seq_id, int)
        or isinstance(seq_id, bool)
        or seq_id < 1
    ):
        return False
    try:
        t = await gw.tenant_of(api_key)
        run = await gw.run(t, model_id)
    except UserError:
        return False
    await gw.fill_gap(t, run.run_id, seq_id, reason)
    return True


def _json_or_none(body: bytes) -> object:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


async def _submit(
    gw: Gateway, t: str, run: TrainingRunRecord, seq_id: int, op: str, command: TrainCommand
) -> str:
    if seq_id < 1:
        raise UserError(f"seq_id must be >= 1, got {seq_id}")
    key = caller_key_id()
    async with refused_in_order(gw, t, run, seq_id):  # e.g. a seq_id that was refused before
        return await gw.submit_once(
            train_dedup_key(run.run_id, seq_id),
            t,
            op,
            s.train_subject(run.run_id),
            lambda rid: TrainRequest(
                request_id=rid,
                tenant=t,
                run_id=run.run_id,
                seq_id=seq_id,
                command=command,
                api_key_id=key,
            ),
        )
