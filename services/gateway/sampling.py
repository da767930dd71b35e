"""Sampling endpoints of the Tinker API: create_sampling_session, samplers/{id}, asample.

A sampling session names a base model and, optionally, LoRA sampler weights (a checkpoint of one
of the tenant's runs). ``asample`` validates the prompt and publishes the request on the base
model's shared queue ``ws.sample.<base>``; any sampler replica of that model serves it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from services.gateway.context import Gateway, caller_key_id, gateway, tenant
from services.gateway.validation import check_sample
from services.gateway.wire import model_input_from_json, sampling_params_from_json
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath
from whetstone.errors import NotFound, UserError
from whetstone.messages import AdapterRef, SampleRequest, SamplingSessionRecord

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
    body: SampleBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    sampler = await gw.sampler(t, body.sampling_session_id)
    spec = gw.registry.resolve(sampler.base_model)
    prompt = model_input_from_json(body.prompt)
    params = sampling_params_from_json(body.sampling_params)
    check_sample(prompt.to_numpy(), params, spec)
    if body.num_samples > gw.settings.max_num_samples:
        raise UserError(f"num_samples must be in 1..{gw.settings.max_num_samples}")
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
        sampler_id=sampler.sampler_id,
        session_id=sampler.session_id,
        api_key_id=caller_key_id(),
    )
    request_id = await gw.submit_once(
        f"{s.token(sampler.sampler_id)}.{body.seq_id}",
        t,
        "sample",
        s.sample_subject(spec.name),
        lambda rid: request.model_copy(update={"request_id": rid}),
    )
    return {
        "request_id": request_id,
        "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)],
    }
