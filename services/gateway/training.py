"""Training endpoints of the Tinker API: create_model, get_info, forward_backward (protobuf),
optim_step, save_weights, save_weights_for_sampler, load_weights (both forms), unload_model.

Each submission is validated here (the caller learns of bad input at once, with a 400), then
published on the run's durable subject ``ws.train.<run>`` (create_model: on ``ws.ctl.place`` for
the scheduler) and answered with a future id; the gateway never waits for GPU work.

``load_weights`` comes in two forms. With ``model_id`` and ``seq_id`` (``load_state``) it is a
training request like any other, run in seq_id order. With ``session_id`` and ``model_seq_id``
(``create_training_client_from_state[_with_optimizer]``) it creates a run whose base model and
LoRA config are the checkpoint's, placed like ``create_model``; its first holder starts it from the
checkpoint, and that load is the run's seq 0. A tenant may load its own checkpoints and published
ones of any tenant. ``unload_model`` frees the run on its trainer (a snapshot keeps its state)
and refuses every later training request on it.

A training request's seq_id is spent by the client whether or not the gateway accepts it, and
the trainer runs a run's requests in seq_id order. So every refusal of a request whose run and
seq_id are known fills that seq_id with a ``Skip`` (``Gateway.fill_gap``): in the handlers
(``refused_in_order``), for bodies refused by their model (``fill_gap_of``, called by the app's
error handlers) and for endpoints the gateway does not serve (the app's catch-all).
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, Depends, Request
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from pydantic import BaseModel, ConfigDict, field_validator

from services.gateway.context import Gateway, caller_key_id, gateway, tenant, train_dedup_key
from services.gateway.custom_loss import with_custom_loss
from services.gateway.futures import FutureIndex
from services.gateway.validation import check_lora, validate_forward_backward
from services.gateway.wire import forward_backward_command, parse_forward_backward
from whetstone import audit
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath, check_name, store_key
from whetstone.errors import NotFound, Unavailable, UserError
from whetstone.messages import (
    AdamParams,
    AdapterRef,
    AssignReply,
    CheckpointRecord,
    FutureRecord,
    InitialWeights,
    LoadWeights,
    LoraConfig,
    OptimStep,
    PlaceRun,
    ReleaseRun,
    SamplingSessionRecord,
    SaveWeights,
    TrainCommand,
    TrainingRunRecord,
    TrainRequest,
    UnloadModelResult,
    utcnow,
)

router = APIRouter(prefix="/api/v1")


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OptimizerConfig(Body):
    type: str = "adamw"

    @field_validator("type")
    @classmethod
    def _adamw_only(cls, value: str) -> str:
        if value != "adamw":  # e.g. tinker's "dimuon": refused rather than silently AdamW
            raise ValueError(f"optimizer {value!r} is not supported; this server trains with adamw")
        return value


class CreateModelBody(Body):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: LoraConfig = LoraConfig()
    optimizer_config: OptimizerConfig | None = None
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
    if lora.seed is None:  # drawn here and recorded: any worker rebuilds the same first adapter
        lora = lora.model_copy(update={"seed": secrets.randbits(63)})
    run = TrainingRunRecord(
        run_id=f"{body.session_id}:train:{body.model_seq_id}",
        tenant=t,
        session_id=body.session_id,
        base_model=spec.name,
        lora=lora,
        user_metadata=body.user_metadata or {},
    )
    return _future(await _place(gw, t, run, "create_model"), run.run_id)


async def _place(gw: Gateway, t: str, run: TrainingRunRecord, op: str) -> str:
    """Record a new run and queue its placement (``ws.ctl.place``); the creation future's id.
    A retried creation finds its record and its future again."""
    await gw.admit_run(t, run.run_id)  # over the tenant's run quota: 429, nothing recorded
    runs = gw.bus.kv[s.RUNS_BUCKET]
    existing = await b.kv_create(runs, s.token(run.run_id), run.encode())
    if existing is not None:  # a retry: place the run as first recorded (its seed, its config)
        recorded = TrainingRunRecord.decode(existing)
        if recorded.tenant != t:
            raise UserError(f"model id {run.run_id!r} is taken")
        run = recorded
    request_id = await gw.submit_once(
        f"create.{s.token(run.run_id)}",
        t,
        op,
        s.PLACE_SUBJECT,
        lambda rid: PlaceRun(request_id=rid, run=run),
        index=(run.session_id,),
    )
    # After the placement is queued, on every try (a retry after a failure here records it then)
    await audit.record(
        gw.bus,
        "training_run_created",
        t,
        caller_key_id(),
        dedup_id=f"audit.created.{s.token(run.run_id)}",
        model_id=run.run_id,
        op=op,
    )
    return request_id


class LoadWeightsBody(Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None  # load_state: into this run, at seq_id
    seq_id: int | None = None
    session_id: str | None = None  # create-via-load: a new run <session_id>:train:<model_seq_id>
    model_seq_id: int | None = None
    base_model: str | None = None
    optimizer_config: OptimizerConfig | None = None
    user_metadata: dict[str, str] | None = None


@router.post("/load_weights")
async def load_weights(
    body: LoadWeightsBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    if body.model_id is not None:
        run = await gw.run(t, body.model_id)
        seq_id = body.seq_id if body.seq_id is not None else 0
        async with refused_in_order(gw, t, run, seq_id):
            _check_loaded(run)
            checkpoint = await _loadable(gw, t, body.path, body.optimizer)
            await _check_base_model(gw, checkpoint, run.base_model)
        command = LoadWeights(
            tinker_path=checkpoint.tinker_path,
            store_key=checkpoint.store_key,
            optimizer=body.optimizer,
        )
        return _future(await _submit(gw, t, run, seq_id, "load_weights", command), run.run_id)
    if body.session_id is None or body.model_seq_id is None:
        raise UserError("load_weights needs model_id and seq_id, or session_id and model_seq_id")
    await gw.session(t, body.session_id)
    checkpoint = await _loadable(gw, t, body.path, body.optimizer)
    source = await _check_base_model(gw, checkpoint, body.base_model)
    new = TrainingRunRecord(
        run_id=f"{body.session_id}:train:{body.model_seq_id}",
        tenant=t,
        session_id=body.session_id,
        base_model=source.base_model,
        lora=source.lora,
        user_metadata=body.user_metadata or {},
        initial=InitialWeights(
            tinker_path=checkpoint.tinker_path,
            store_key=checkpoint.store_key,
            optimizer=body.optimizer,
        ),
    )
    return _future(await _place(gw, t, new, "load_weights"), new.run_id)


async def _loadable(gw: Gateway, t: str, tinker_path: str, optimizer: bool) -> CheckpointRecord:
    """A checkpoint the tenant may load: its own, or a published one (else 404)."""
    path = TinkerPath.parse(tinker_path)
    if path.kind == "external":
        raise UserError(f"{tinker_path} is an export for download; load a weights checkpoint")
    if optimizer and path.kind != "training":
        raise UserError(f"{tinker_path} holds no optimizer state; load a tinker://.../weights/...")
    return await gw.checkpoint(t, path, published_ok=True)


async def _check_base_model(
    gw: Gateway, checkpoint: CheckpointRecord, base_model: str | None
) -> TrainingRunRecord:
    """The checkpoint's run; ``base_model`` (when given) must be the one it was trained on."""
    source = await gw.run_record(checkpoint.run_id)
    if source is None:
        raise NotFound(f"unknown checkpoint {checkpoint.tinker_path}")
    if base_model is not None and gw.registry.resolve(base_model).name != source.base_model:
        raise UserError(
            f"{checkpoint.tinker_path} was trained on {source.base_model}, not {base_model}"
        )
    return source


def _check_loaded(run: TrainingRunRecord) -> None:
    if run.copied_from is not None:
        raise UserError(
            f"model {run.run_id} holds a copy of {run.copied_from} (copy_weights) and cannot be "
            "trained on; create a training client from its checkpoint to train"
        )
    if run.unloaded_at is not None:
        raise UserError(
            f"model {run.run_id} was unloaded (unload_model); create a training client from one "
            "of its checkpoints to continue"
        )


@router.post("/unload_model")
async def unload_model(
    body: ModelIdBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    """Free the run on its trainer now (the trainer snapshots what ran, so its state is kept)
    and refuse its later requests. Done in the request: a failure is a 503 the client retries."""
    run = await gw.run(t, body.model_id)
    if run.unloaded_at is None:
        run = run.model_copy(update={"unloaded_at": utcnow()})
        await b.kv_put(gw.bus.kv[s.RUNS_BUCKET], s.token(run.run_id), run)
        gw.remember_run(run)
        await audit.record(gw.bus, "training_run_unloaded", t, caller_key_id(), model_id=run.run_id)
    placements = gw.bus.kv[s.PLACEMENTS_BUCKET]
    try:
        entry = await placements.get(s.token(run.run_id))
    except (KeyNotFoundError, NotFoundError):
        entry = None
    worker_id = (entry.value or b"").decode() if entry is not None else ""
    if entry is not None and worker_id:
        reply = await gw.bus.broker.request(
            ReleaseRun(run_id=run.run_id).encode(),
            s.release_subject(worker_id),
            headers={"content-type": "application/json"},
            timeout=30.0,
        )
        if not AssignReply.decode(reply.body).ok:
            raise Unavailable(f"the trainer could not unload {run.run_id}; retry")
        try:
            await placements.delete(s.token(run.run_id), last=entry.revision)
        except KeyWrongLastSequenceError:
            pass  # placed again meanwhile (a sweep): that placement stands
    record = FutureRecord(
        request_id=f"req-{uuid.uuid4().hex}",
        tenant=t,
        op="unload_model",
        status="done",
        result=UnloadModelResult(model_id=run.run_id),
        finished_at=utcnow(),
    )
    await b.kv_put(gw.bus.kv[s.FUTURES_BUCKET], record.request_id, record)
    await FutureIndex(gw.bus).add(run.session_id, record.request_id)
    return _future(record.request_id, run.run_id)


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
        command = SaveWeights(kind="sampler", name=name, overwrite=True, sampler_id=sampler_id)
        request_id = await _submit(gw, t, run, body.seq_id, "save_weights", command)
        # Recorded once accepted (a refusal, a 429 included, leaves no sampling session), before
        # the answer: the client learns the session's id only from the future's result.
        await b.kv_put(gw.bus.kv[s.SAMPLERS_BUCKET], s.token(sampler_id), record)
        return _future(request_id, run.run_id)
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
        if seq_id >= 1 and run.unloaded_at is None:  # an unloaded run's queue stays empty
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
    if run.unloaded_at is not None:
        return False  # refused anyway; its queue stays empty, so no trainer takes it back
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
    _check_loaded(run)  # before any Skip: an unloaded run's queue stays empty
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
            index=(run.session_id,),
        )
