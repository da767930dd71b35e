"""Sampling endpoints of the Tinker API: create_sampling_session, samplers/{id}, asample, and
the session poller's ``retrieve_futures``, ``cancel_future`` and ``join_sampling_session``.

A sampling session names a base model and, optionally, LoRA sampler weights (a checkpoint of one
of the tenant's runs). ``asample`` validates the prompt and publishes the request on the base
model's shared queue ``ws.sample.<base>``; any sampler replica of that model serves it. While
that queue is full it answers 429 with Retry-After instead (``backpressure.py``).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Header
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from pydantic import BaseModel, ConfigDict

from services.gateway.backpressure import BACKPRESSURE_HEADER
from services.gateway.context import Gateway, caller_key_id, gateway, tenant
from services.gateway.futures import FutureIndex
from services.gateway.validation import check_sample
from services.gateway.wire import (
    model_input_from_json,
    sampling_params_from_json,
    target_prompt_logprobs_from_json,
)
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath
from whetstone.errors import NotFound, UserError
from whetstone.messages import (
    AdapterRef,
    FutureRecord,
    SampleRequest,
    SamplingSessionRecord,
    utcnow,
)

router = APIRouter(prefix="/api/v1")


class CreateSamplingSessionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_id: str
    sampling_session_seq_id: int
    model_path: str | None = None
    base_model: str | None = None


class SampleBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sampling_session_id: str
    seq_id: int
    num_samples: int = 1
    prompt: dict[str, object]
    sampling_params: dict[str, object]
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    target_prompt_logprobs: dict[str, object] | None = None
    prompt_alt_tokens_k: int = 0
    record_stability_info: bool | None = None


@router.post("/create_sampling_session")
async def create_sampling_session(
    body: CreateSamplingSessionBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    await gw.session(t, body.session_id)
    adapter: AdapterRef | None = None
    if body.model_path:
        path = TinkerPath.parse(body.model_path)
        if path.kind != "sampler":
            raise UserError(
                f"{body.model_path} is a training checkpoint; sample from sampler_weights"
            )
        # The tenant's own sampler weights, or anyone's published ones.
        checkpoint = await gw.checkpoint(t, path, published_ok=True)
        run = await gw.run_record(checkpoint.run_id)
        if run is None:
            raise NotFound(f"unknown checkpoint {body.model_path}")
        adapter = AdapterRef(tinker_path=checkpoint.tinker_path, store_key=checkpoint.store_key)
        base_model = run.base_model
        if body.base_model and gw.registry.resolve(body.base_model).name != base_model:
            raise UserError(f"{body.model_path} was trained on {base_model}, not {body.base_model}")
    elif body.base_model:
        base_model = gw.registry.resolve(body.base_model).name
    else:
        raise UserError("create_sampling_session needs model_path or base_model")
    sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
    record = SamplingSessionRecord(
        sampler_id=sampler_id,
        tenant=t,
        session_id=body.session_id,
        base_model=base_model,
        adapter=adapter,
    )
    await b.kv_put(gw.bus.kv[s.SAMPLERS_BUCKET], s.token(sampler_id), record)
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.get("/samplers/{sampler_id}")
async def get_sampler(
    sampler_id: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    record = await gw.sampler(t, sampler_id)
    return {
        "sampler_id": record.sampler_id,
        "base_model": record.base_model,
        "model_path": record.adapter.tinker_path if record.adapter else None,
    }


@router.post("/asample")
async def asample(
    body: SampleBody,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
    backpressure: str | None = Header(None, alias=BACKPRESSURE_HEADER),
) -> dict[str, object]:
    sampler = await gw.sampler(t, body.sampling_session_id)
    spec = gw.registry.resolve(sampler.base_model)
    prompt = model_input_from_json(body.prompt)
    params = sampling_params_from_json(body.sampling_params)
    check_sample(prompt.to_numpy(), params, spec)
    if body.num_samples > gw.settings.max_num_samples:
        raise UserError(f"num_samples must be in 1..{gw.settings.max_num_samples}")
    target = (
        target_prompt_logprobs_from_json(body.target_prompt_logprobs)
        if body.target_prompt_logprobs is not None
        else None
    )
    # Built (and so validated by SampleRequest's rules) before anything is recorded.
    request = SampleRequest(
        request_id="",
        tenant=t,
        base_model=spec.name,
        adapter=sampler.adapter,
        prompt=prompt,
        num_samples=body.num_samples,
        params=params,
        prompt_logprobs=body.prompt_logprobs,
        topk_prompt_logprobs=body.topk_prompt_logprobs,
        topk_sample_logprobs=body.topk_sample_logprobs,
        prompt_logprobs_last_n=body.prompt_logprobs_last_n,
        target_prompt_logprobs=target[0] if target else None,
        target_prompt_csr=target[1] if target else False,
        prompt_alt_tokens_k=body.prompt_alt_tokens_k,
        record_stability_info=bool(body.record_stability_info),
        sampler_id=sampler.sampler_id,
        session_id=sampler.session_id,
        api_key_id=caller_key_id(),
    )
    # A full sampler: 429 before anything is recorded; the SDK resubmits the same seq_id.
    await gw.backpressure.admit(spec.name, announced=backpressure == "1")
    request_id = await gw.submit_once(
        f"{s.token(sampler.sampler_id)}.{body.seq_id}",
        t,
        "sample",
        s.sample_subject(spec.name),
        lambda rid: request.model_copy(update={"request_id": rid}),
        index=(sampler.session_id, clone_scope(sampler.sampler_id, body.seq_id)),
    )
    return {
        "request_id": request_id,
        "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)],
    }


# ---------------------------------------------------------------- session poller, cancel, join

CLONE_SEQ_BLOCK = 1_000_000_000  # a cloned SamplingClient's seq_ids start at clone id x this
RECHECK_S = 2.0  # a long poll with nothing pending looks again this often (new submissions)


def clone_scope(sampler_id: str, seq_id: int) -> str:
    """The ``FutureIndex`` scope of one SamplingClient copy: its sampling session and clone id
    (``seq_id // 1e9``, as the SDK numbers them)."""
    return f"{sampler_id}#{seq_id // CLONE_SEQ_BLOCK}"


class FuturesTarget(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: int = 0


class RetrieveFuturesBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    target: FuturesTarget
    prev_cursor: int = 0
    timeout: float | None = None
    retrieved_request_ids: list[str] = []


@router.post("/retrieve_futures")
async def retrieve_futures(
    body: RetrieveFuturesBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    """The sampling session's futures that finished or failed since ``prev_cursor``; a long
    poll (up to ``long_poll_s``) until there is one, unless ``timeout`` says otherwise (0: ack
    only). The cursor is the futures bucket's revision: a record's final write has a revision
    above every earlier write, so "final at a revision in (prev_cursor, cursor]" reports each
    completion exactly once. ``retrieved_request_ids`` leave the session's index."""
    if body.target.type != "sampling_session":
        raise UserError(f"retrieve_futures serves sampling sessions, not {body.target.type!r}")
    sampler = await gw.sampler(t, body.target.sampling_session_id)
    scope = clone_scope(sampler.sampler_id, body.target.cloned_sampler_id * CLONE_SEQ_BLOCK)
    index = FutureIndex(gw.bus)
    await asyncio.gather(*(index.remove(scope, rid) for rid in body.retrieved_request_ids))
    hold_s = gw.settings.long_poll_s if body.timeout is None else body.timeout
    deadline = time.monotonic() + max(0.0, min(hold_s, gw.settings.long_poll_s))
    while True:
        cursor = await index.last_revision()  # before the reads: nothing at or below is missed
        records = await index.records(await index.request_ids(scope))
        completions = [
            {
                "state": "finished" if record.status == "done" else "failed",
                "request_id": record.request_id,
            }
            for record, revision in records
            if record.final and body.prev_cursor < revision <= cursor
        ]
        remaining = deadline - time.monotonic()
        if completions or remaining <= 0:
            return {"completions": completions, "cursor": max(cursor, body.prev_cursor)}
        pending = [record.request_id for record, _ in records if not record.final]
        await gw.waiters.wait_any(pending, min(remaining, RECHECK_S))


class CancelFutureBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str


@router.post("/cancel_future")
async def cancel_future(
    body: CancelFutureBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    """Cancel a sample: its future fails (``category: "user"``) at once, so a sampler that has
    not started it never runs it, and one that has does not write or bill its result (both
    compare the record's revision). A future that is already final stays as it is."""
    kv = gw.bus.kv[s.FUTURES_BUCKET]
    while True:
        try:
            entry = await kv.get(body.request_id)
        except (KeyNotFoundError, NotFoundError):
            entry = None
        record = FutureRecord.decode(entry.value) if entry and entry.value else None
        if entry is None or record is None or record.tenant != t:
            raise NotFound(f"unknown request_id {body.request_id!r}")
        if record.op != "sample":
            raise UserError("only sampling requests can be cancelled")
        if record.final:
            return {}
        cancelled = record.model_copy(
            update={
                "status": "failed",
                "error": "cancelled by the client",
                "category": "user",
                "finished_at": utcnow(),
            }
        )
        try:
            await kv.update(body.request_id, cancelled.encode(), last=entry.revision)
            return {}
        except KeyWrongLastSequenceError:
            continue  # written meanwhile (its result, most likely): look again


class JoinSamplingSessionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sampling_session_id: str


@router.post("/join_sampling_session")
async def join_sampling_session(
    body: JoinSamplingSessionBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    """A clone id for an unpickled SamplingClient: 1, 2, ... per sampling session (the original
    client is 0), counted on the session's record with a compare-and-set."""
    await gw.sampler(t, body.sampling_session_id)
    kv = gw.bus.kv[s.SAMPLERS_BUCKET]
    key = s.token(body.sampling_session_id)
    while True:
        entry = await kv.get(key)
        record = SamplingSessionRecord.decode(entry.value or b"")
        joined = record.model_copy(update={"clients": record.clients + 1})
        try:
            await kv.update(key, joined.encode(), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue
        return {"type": "join_sampling_session", "client_counter": joined.clients}
