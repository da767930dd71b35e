"""The HPC-AI dialect: the ``hpcai`` 0.2.0 SDK (HPC-AI's fork of the Tinker SDK) on the Tinker
server's port (protocol.md §7).

**Which requests come here.** Every route of this router is an ``HpcaiRoute``: it matches only
requests that carry hpcai's marks (``User-Agent: AsyncHpcAI/...`` or ``HpcAI/...``, its
``X-Username`` header, or an ``X-HpcAI-*`` header), so a Tinker request on the same path falls
through to ``training.py``, ``sampling.py`` and ``rest.py``. ``/api/v1/forward`` exists only in
hpcai and matches whoever sends it. Endpoints whose body and answer are the same in both dialects
(``get_server_capabilities``, ``healthz``, ``telemetry``, ``unload_model``) are left to the Tinker
routes.

**What differs, and how it is bridged.**

* No sessions, no ``session_id``/``model_seq_id``/``seq_id``. ``create_model`` makes a run
  ``hpcai-<id>:train:0`` of its own (no session record: nothing expires it; ``unload_model``
  frees it). The id is derived from the request's ``X-Idempotency-Key``, so a retried creation
  finds its run and future again.
* **Ordering.** The trainer runs a run's requests in seq_id order, and hpcai sends none: the
  gateway hands them out, from a compare-and-set counter per run in KV ``ws_run_seq``, in arrival
  order. The SDK posts a run's next request only after the previous one was accepted, so arrival
  order is call order. Its ``X-Idempotency-Key`` (``<client>:<training client>:<index>``) stays
  the same over all of its retries: the seq_id given to a key is kept in ``ws_dedup``, so a retry
  gets the first submission's future. Requests are validated before they get a seq_id (a refused
  one spends none); one handed out to a request that then lost a race to its own retry is filled
  with a ``Skip``.
* Training bodies are JSON (``forward_backward_input``/``forward_input`` with TensorData JSON),
  ``optim_step`` has no weight decay or clipping, and results are JSON, never protobuf.
* Checkpoint paths are ``hpcai://<run>/<training|sampler>/<name>``, the same checkpoints as
  ``tinker://<run>/<weights|sampler_weights>/<name>``; either form is accepted.
* A pending future whose queue is paused answers **408** with ``queue_state`` ``in_queue`` (no
  capacity) or ``paused_rate_limit``: hpcai reads the queue state only from a 408 (a 200
  ``try_again`` carries none for it). An active pending future is a 200 ``try_again``.
* ``get_info``'s ``model_data.model_name`` is the base model's directory: hpcai's
  ``get_tokenizer`` loads its tokenizer from that field (tinker has ``tokenizer_id`` for it).
* ``asample`` carries the base model and adapter itself (no sampling session), and hpcai's own
  back-pressure header (``X-HpcAI-Sampling-Backpressure``): a full sampler answers 429, which it
  waits out and resubmits.
* REST: checkpoints carry ``checkpoint_path`` (not ``tinker_path``) and a bare name as
  ``checkpoint_id``; ``.../checkpoints/<name>/archive`` answers the checkpoint as a tar.gz.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import Scope

from services.gateway import metrics, rest, training
from services.gateway.context import Gateway, caller_key_id, gateway, tenant
from services.gateway.validation import check_lora, check_sample, validate_forward_backward
from services.gateway.wire import (
    forward_backward_output_json,
    model_input_from_json,
    sample_response_json,
    sampling_params_from_json,
    tensor_from_json,
)
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath, check_name
from whetstone.errors import NotFound, UserError
from whetstone.messages import (
    AdamParams,
    AdapterRef,
    CheckpointRecord,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    FutureRecord,
    LoadWeights,
    LoraConfig,
    OptimStep,
    SampleRequest,
    SampleResult,
    SaveWeights,
    TrainCommand,
    TrainingRunRecord,
)

SCHEME = "hpcai://"
HPCAI_ONLY_PATHS = frozenset({"/api/v1/forward"})
# hpcai's queue states: "in_queue" is Tinker's "paused_capacity".
QUEUE_STATES = {"paused_capacity": "in_queue", "paused_rate_limit": "paused_rate_limit"}


def is_hpcai(scope: Scope) -> bool:
    """Whether a request comes from the hpcai SDK (it names itself; tinker sends none of these)."""
    headers = Headers(scope=scope)
    agent = headers.get("user-agent", "")
    return (
        agent.startswith(("AsyncHpcAI/", "HpcAI/"))
        or "x-username" in headers
        or any(name.startswith("x-hpcai-") for name in headers.keys())
    )


class HpcaiRoute(APIRoute):
    """A route that only hpcai requests match; the rest fall through to the Tinker routes."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope.get("path") not in HPCAI_ONLY_PATHS:
            if not is_hpcai(scope):
                return Match.NONE, {}
        return super().matches(scope)


router = APIRouter(prefix="/api/v1", route_class=HpcaiRoute)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateModelBody(Body):
    base_model: str
    lora_config: LoraConfig = LoraConfig()


class ModelIdBody(Body):
    model_id: str


class ForwardBackwardBody(Body):
    model_id: str
    forward_backward_input: dict[str, object]


class ForwardBody(Body):
    model_id: str
    forward_input: dict[str, object]


class OptimStepBody(Body):
    model_id: str
    adam_params: AdamParams


class PathBody(Body):
    model_id: str
    path: str


class SampleBody(Body):
    num_samples: int = 1
    prompt: dict[str, object]
    sampling_params: dict[str, object] = {}
    base_model: str | None = None
    model_path: str | None = None
    prompt_logprobs: bool = False


class RetrieveFutureBody(Body):
    request_id: str


def _future(request_id: str, model_id: str | None = None) -> dict[str, object]:
    return {"request_id": request_id, **({"model_id": model_id} if model_id else {})}


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------- paths


def tinker_path(path: str) -> TinkerPath:
    """An ``hpcai://<run>/<training|sampler>/<name>`` (or ``tinker://...``) path."""
    if path.startswith(SCHEME):
        parts = path[len(SCHEME) :].split("/")
        if len(parts) == 3 and parts[0] and parts[1] in ("training", "sampler") and parts[2]:
            return TinkerPath(
                parts[0], "training" if parts[1] == "training" else "sampler", parts[2]
            )
        raise UserError(
            f"malformed checkpoint path {path!r}; expected hpcai://<run>/<training|sampler>/<name>"
        )
    return TinkerPath.parse(path)


def hpcai_path(path: str) -> str:
    """The hpcai form of a ``tinker://`` path."""
    parsed = TinkerPath.parse(path)
    return f"{SCHEME}{parsed.run_id}/{parsed.kind}/{parsed.name}"


# ---------------------------------------------------------------- ordering


async def _next_seq_id(gw: Gateway, run_id: str) -> int:
    """The run's next seq_id: a compare-and-set counter (gateways may be replicated)."""
    kv = gw.bus.kv[s.RUN_SEQ_BUCKET]
    key = s.token(run_id)
    while True:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            if await b.kv_create(kv, key, b"2") is None:
                return 1
            continue
        seq_id = int(entry.value or b"1")
        try:
            await kv.update(key, str(seq_id + 1).encode(), last=entry.revision)
            return seq_id
        except KeyWrongLastSequenceError:
            continue


async def _seq_id_for(gw: Gateway, t: str, run: TrainingRunRecord, request: Request) -> int:
    """The seq_id of this request: the one its idempotency key got before, or the next one."""
    key = request.headers.get("x-idempotency-key")
    if not key:
        return await _next_seq_id(gw, run.run_id)
    dedup = gw.bus.kv[s.DEDUP_BUCKET]
    dedup_key = f"hpcai.{s.token(run.run_id)}.{_digest(t, key)[:32]}"
    try:
        return int((await dedup.get(dedup_key)).value or b"0")
    except KeyNotFoundError:
        pass
    seq_id = await _next_seq_id(gw, run.run_id)
    existing = await b.kv_create(dedup, dedup_key, str(seq_id).encode())
    if existing is None:
        return seq_id
    # A retry of this very request took a seq_id first: ours would hold the run back.
    await gw.fill_gap(t, run.run_id, seq_id, "duplicate of an accepted hpcai request")
    return int(existing)


async def _submit(
    gw: Gateway, t: str, run: TrainingRunRecord, request: Request, op: str, command: TrainCommand
) -> dict[str, object]:
    training._check_loaded(run)  # before a seq_id is spent
    seq_id = await _seq_id_for(gw, t, run, request)
    return _future(await training._submit(gw, t, run, seq_id, op, command), run.run_id)


# ---------------------------------------------------------------- training


@router.post("/create_model")
async def create_model(
    body: CreateModelBody,
    request: Request,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    spec = gw.registry.resolve(body.base_model)
    check_lora(body.lora_config, spec)
    key = request.headers.get("x-idempotency-key")
    session_id = f"hpcai-{_digest(t, key)[:16] if key else uuid.uuid4().hex[:16]}"
    run = TrainingRunRecord(
        run_id=f"{session_id}:train:0",
        tenant=t,
        session_id=session_id,
        base_model=spec.name,
        lora=body.lora_config,
    )
    return _future(await training._place(gw, t, run, "create_model"), run.run_id)


@router.post("/get_info")
async def get_info(
    body: ModelIdBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    run = await gw.run(t, body.model_id)
    spec = gw.registry.resolve(run.base_model)
    tokenizer = str(spec.path) if spec.path.is_dir() else spec.name
    return {
        "type": "get_info",
        "model_id": run.run_id,
        "model_data": {"arch": spec.arch, "model_name": tokenizer},
        "is_lora": True,
        "lora_rank": run.lora.rank,
        "model_name": spec.name,
    }


def forward_backward_from_json(body: Mapping[str, object], forward_only: bool) -> ForwardBackward:
    """hpcai's ``ForwardBackwardInput`` JSON (``data``, ``loss_fn``) as the trainer's command."""
    data, loss_fn = body.get("data"), body.get("loss_fn")
    if not isinstance(data, list):
        raise UserError("forward_backward_input needs a 'data' list")
    if not isinstance(loss_fn, str):
        raise UserError("forward_backward_input needs a 'loss_fn' name")
    datums = []
    for i, datum in enumerate(data):
        model_input = datum.get("model_input") if isinstance(datum, Mapping) else None
        inputs = datum.get("loss_fn_inputs", {}) if isinstance(datum, Mapping) else None
        if not isinstance(model_input, Mapping) or not isinstance(inputs, Mapping):
            raise UserError(f"data[{i}] needs a 'model_input' and 'loss_fn_inputs' object")
        tensors = {}
        for name, value in inputs.items():
            try:
                if not isinstance(value, Mapping):
                    raise UserError("not a TensorData object")
                tensors[str(name)] = tensor_from_json(value)
            except UserError as exc:
                raise UserError(f"data[{i}].loss_fn_inputs[{name!r}]: {exc.message}") from exc
        datums.append(Datum(model_input=model_input_from_json(model_input), loss_fn_inputs=tensors))
    return ForwardBackward(data=datums, loss_fn=loss_fn, forward_only=forward_only)


async def _forward_backward(
    gw: Gateway, t: str, request: Request, model_id: str, body: dict[str, object], forward: bool
) -> dict[str, object]:
    run = await gw.run(t, model_id)
    command = forward_backward_from_json(body, forward_only=forward)
    validate_forward_backward(command, gw.registry.resolve(run.base_model))
    return await _submit(gw, t, run, request, "forward" if forward else "forward_backward", command)


@router.post("/forward_backward")
async def forward_backward(
    body: ForwardBackwardBody,
    request: Request,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    return await _forward_backward(
        gw, t, request, body.model_id, body.forward_backward_input, forward=False
    )


@router.post("/forward")
async def forward(
    body: ForwardBody, request: Request, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    return await _forward_backward(gw, t, request, body.model_id, body.forward_input, forward=True)


@router.post("/optim_step")
async def optim_step(
    body: OptimStepBody, request: Request, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    run = await gw.run(t, body.model_id)
    return await _submit(gw, t, run, request, "optim_step", OptimStep(adam=body.adam_params))


@router.post("/save_weights")
async def save_weights(
    body: PathBody, request: Request, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    run = await gw.run(t, body.model_id)
    command = SaveWeights(kind="training", name=check_name(body.path))
    return await _submit(gw, t, run, request, "save_weights", command)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(
    body: PathBody, request: Request, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    run = await gw.run(t, body.model_id)
    command = SaveWeights(kind="sampler", name=check_name(body.path), overwrite=True)
    return await _submit(gw, t, run, request, "save_weights", command)


@router.post("/load_weights")
async def load_weights(
    body: PathBody, request: Request, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    """``load_state``: the weights only (hpcai has no ``load_state_with_optimizer``)."""
    run = await gw.run(t, body.model_id)
    checkpoint = await training._loadable(gw, t, str(tinker_path(body.path)), optimizer=False)
    source = await training._check_base_model(gw, checkpoint, run.base_model)
    if _targets(source.lora) != _targets(run.lora):
        # hpcai's create_training_client_from_state makes the new run with its default targets
        raise UserError(
            f"{body.path} holds a LoRA adapter of {_targets(source.lora)}, this run's is "
            f"{_targets(run.lora)}; create the training client with the same LoRA settings"
        )
    command = LoadWeights(
        tinker_path=checkpoint.tinker_path, store_key=checkpoint.store_key, optimizer=False
    )
    return await _submit(gw, t, run, request, "load_weights", command)


def _targets(lora: LoraConfig) -> str:
    modules = [m for m in ("attn", "mlp", "unembed") if getattr(lora, f"train_{m}")]
    return f"rank {lora.rank} on {'+'.join(modules)}"


# ---------------------------------------------------------------- sampling


@router.post("/asample")
async def asample(
    body: SampleBody, request: Request, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    """A sample without a sampling session: the base model and adapter come with every request."""
    adapter: AdapterRef | None = None
    if body.model_path:
        checkpoint = await _sampler_weights(gw, t, tinker_path(body.model_path))
        source = await training._check_base_model(gw, checkpoint, body.base_model)
        adapter = AdapterRef(tinker_path=checkpoint.tinker_path, store_key=checkpoint.store_key)
        base_model = source.base_model
    elif body.base_model:
        base_model = gw.registry.resolve(body.base_model).name
    else:
        raise UserError("asample needs model_path or base_model")
    spec = gw.registry.resolve(base_model)
    prompt = model_input_from_json(body.prompt)
    params = sampling_params_from_json(body.sampling_params)
    check_sample(prompt.to_numpy(), params, spec)
    if not 1 <= body.num_samples <= gw.settings.max_num_samples:
        raise UserError(f"num_samples must be in 1..{gw.settings.max_num_samples}")
    sample = SampleRequest(
        request_id="",
        tenant=t,
        base_model=spec.name,
        adapter=adapter,
        prompt=prompt,
        num_samples=body.num_samples,
        params=params,
        prompt_logprobs=body.prompt_logprobs,
        api_key_id=caller_key_id(),
    )
    # A full sampler: 429 before anything is recorded (hpcai announces that it waits and
    # resubmits); the SDK keeps the idempotency key over the resubmissions of one call.
    announced = request.headers.get("x-hpcai-sampling-backpressure") == "1"
    await gw.backpressure.admit(spec.name, announced=announced)
    key = request.headers.get("x-idempotency-key") or uuid.uuid4().hex
    request_id = await gw.submit_once(
        f"hpcai-sample.{_digest(t, key)[:32]}",
        t,
        "sample",
        s.sample_subject(spec.name),
        lambda rid: sample.model_copy(update={"request_id": rid}),
    )
    return _future(request_id)


async def _sampler_weights(gw: Gateway, t: str, path: TinkerPath) -> CheckpointRecord:
    if path.kind != "sampler":
        raise UserError(
            f"{hpcai_path(str(path))} is a training checkpoint; sample from a sampler checkpoint "
            "(save_weights_for_sampler)"
        )
    return await gw.checkpoint(t, path, published_ok=True)


# ---------------------------------------------------------------- futures


@router.post("/retrieve_future")
async def retrieve_future(
    body: RetrieveFutureBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> Response:
    record = await gw.waiters.wait(body.request_id, t, gw.settings.long_poll_s)
    if record.final:
        metrics.FUTURES_COMPLETED.labels(record.op, record.status).inc()
    return future_response(record)


def future_response(record: FutureRecord) -> Response:
    """A future as hpcai reads it: JSON always, hpcai:// paths, and paused queues as 408."""
    if record.status == "pending":
        pending = {
            "type": "try_again",
            "request_id": record.request_id,
            "queue_state": QUEUE_STATES.get(record.queue_state, record.queue_state),
            "queue_state_reason": None,
        }
        return JSONResponse(pending, status_code=200 if record.queue_state == "active" else 408)
    if record.status == "failed":
        return JSONResponse({"error": record.error, "category": record.category or "unknown"})
    result = record.result
    if isinstance(result, ForwardBackwardResult):
        return JSONResponse(forward_backward_output_json(result))
    if isinstance(result, SampleResult):
        return JSONResponse(sample_response_json(result))
    assert result is not None, "a done future holds its result"
    fields = result.model_dump(mode="json", exclude_none=True)
    op = fields["op"]
    out: dict[str, object] = {"type": op}
    if op == "save_weights" and fields.get("kind") == "sampler":
        out["type"] = "save_weights_for_sampler"
    if "path" in fields:
        out["path"] = hpcai_path(fields["path"])
    for key in ("model_id", "metrics"):
        if key in fields:
            out[key] = fields[key]
    return JSONResponse(out)


# ---------------------------------------------------------------- REST


def checkpoint_json(record: CheckpointRecord) -> dict[str, object]:
    return {
        "checkpoint_id": record.name,
        "checkpoint_type": record.kind,
        "time": record.created_at.isoformat(),
        "checkpoint_path": hpcai_path(record.tinker_path),
    }


def _listed(records: list[CheckpointRecord]) -> list[CheckpointRecord]:
    """hpcai knows training and sampler checkpoints only (not Tinker's exports)."""
    return [c for c in records if c.kind in ("training", "sampler")]


async def run_json(gw: Gateway, run: TrainingRunRecord) -> dict[str, object]:
    out = await rest.run_json(gw, run)
    checkpoints = _listed(await rest.run_checkpoints(gw, run.run_id))
    for field, kind in (("last_checkpoint", "training"), ("last_sampler_checkpoint", "sampler")):
        of_kind = [c for c in checkpoints if c.kind == kind]
        out.pop(field, None)
        if of_kind:
            out[field] = checkpoint_json(of_kind[-1])
    return out


@router.get("/training_runs")
async def list_training_runs(
    limit: int = rest.Limit,
    offset: int = rest.Offset,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    runs = [r for r, _ in await rest.records(gw, s.RUNS_BUCKET, TrainingRunRecord)]
    mine = sorted(
        (r for r in runs if r.tenant == t), key=lambda r: (r.created_at, r.run_id), reverse=True
    )
    return {
        "training_runs": [await run_json(gw, r) for r in mine[offset : offset + limit]],
        "cursor": rest.cursor(offset, limit, len(mine)),
    }


@router.get("/training_runs/{run_id}")
async def get_training_run(
    run_id: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    return await run_json(gw, await gw.run(t, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(
    run_id: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    await gw.run(t, run_id)
    checkpoints = _listed(await rest.run_checkpoints(gw, run_id))
    return {"checkpoints": [checkpoint_json(c) for c in checkpoints]}


async def _named_checkpoint(gw: Gateway, t: str, run_id: str, name: str) -> CheckpointRecord:
    """hpcai names a checkpoint by its name alone: the run's training or sampler one."""
    await gw.run(t, run_id)
    found = [c for c in _listed(await rest.run_checkpoints(gw, run_id)) if c.name == name]
    if not found:
        raise NotFound(f"unknown checkpoint {name!r} of {run_id}")
    if len(found) > 1:
        raise UserError(
            f"{name!r} names both a training and a sampler checkpoint of {run_id}; "
            "use its tinker:// path (DELETE .../checkpoints/<weights|sampler_weights>/<name>)"
        )
    return found[0]


@router.delete("/training_runs/{run_id}/checkpoints/{name}", status_code=204)
async def delete_checkpoint(
    run_id: str, name: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> Response:
    record = await _named_checkpoint(gw, t, run_id, name)
    checkpoint_id = TinkerPath.parse(record.tinker_path).checkpoint_id
    return await rest.delete_checkpoint(run_id, checkpoint_id, t, gw)


@router.get("/training_runs/{run_id}/checkpoints/{name}/archive")
async def checkpoint_archive(
    run_id: str, name: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> Response:
    record = await _named_checkpoint(gw, t, run_id, name)
    directory = gw.settings.checkpoint_store().path(record.store_key)
    if not directory.is_dir():
        raise NotFound(f"checkpoint {hpcai_path(record.tinker_path)} has no files")
    archive = await asyncio.to_thread(_tar_gz, directory, name)
    return Response(archive, media_type="application/gzip")


def _tar_gz(directory: Path, name: str) -> bytes:
    """The checkpoint's files under ``<name>/`` in one gzipped tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=name)
    return buffer.getvalue()
