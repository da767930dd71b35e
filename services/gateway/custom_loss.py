"""Server-side custom losses at the edge: ``create_custom_loss`` (protocol.md §3.2) and the
``loss_id`` of a ``forward_backward`` with ``loss_fn="custom"``.

``create_custom_loss`` checks the uploaded graph by the contract's rules
(``whetstone.custom_loss``: a whitelist of operations, bounded size; a graph that breaks one is
refused with 400), stores it as a ``CustomLossRecord`` in KV ``ws_custom_losses`` under
``<session>:loss:<custom_loss_seq_id>`` and answers a future that is already done with
``{"loss_id"}``: nothing waits for a worker. A retried upload gets the same id back; another loss
under a used seq_id is refused.

``with_custom_loss`` resolves a forward_backward's ``loss_id`` into the stored loss, which the
command then carries to the trainer whole. Another tenant's id is unknown, another session's is
refused, and each datum's inputs are checked against the ranks the loss declared.
"""

from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.gateway.context import Gateway, gateway, tenant
from services.gateway.validation import user_error
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.custom_loss import CustomLoss, LossInput, LossNode
from whetstone.errors import UserError
from whetstone.messages import (
    CreateCustomLossResult,
    CustomLossRecord,
    ForwardBackward,
    FutureRecord,
    TrainingRunRecord,
)

router = APIRouter(prefix="/api/v1")


class GraphBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: Literal[1] = 1
    nodes: list[LossNode]


class CreateCustomLossBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_id: str
    custom_loss_seq_id: int = Field(ge=0)
    name: str
    inputs: list[LossInput]
    graph: GraphBody


@router.post("/create_custom_loss")
async def create_custom_loss(
    body: CreateCustomLossBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    await gw.session(t, body.session_id)
    try:
        loss = CustomLoss(name=body.name, inputs=body.inputs, nodes=body.graph.nodes)
    except ValidationError as exc:
        raise user_error(exc, "custom loss") from None
    loss_id = f"{body.session_id}:loss:{body.custom_loss_seq_id}"
    record = CustomLossRecord(loss_id=loss_id, tenant=t, session_id=body.session_id, loss=loss)
    bucket = gw.bus.kv[s.CUSTOM_LOSSES_BUCKET]
    existing = await b.kv_create(bucket, s.token(loss_id), record.encode())
    if existing is not None:
        stored = CustomLossRecord.decode(existing)
        if stored.tenant != t or stored.loss != loss:
            raise UserError(
                f"custom_loss_seq_id {body.custom_loss_seq_id} of session {body.session_id} "
                "already names another loss"
            )
    request_id = f"req-{uuid.uuid4().hex}"
    done = FutureRecord(request_id=request_id, tenant=t, op="create_custom_loss")
    await b.finish_future(gw.bus, done, CreateCustomLossResult(loss_id=loss_id))
    return {"request_id": request_id}


async def with_custom_loss(
    gw: Gateway, t: str, run: TrainingRunRecord, command: ForwardBackward
) -> ForwardBackward:
    """``command`` carrying the custom loss its ``loss_id`` names (unchanged for a built-in)."""
    if command.loss_fn != "custom":
        return command
    loss_id = command.loss_fn_config.get("loss_id")
    if not isinstance(loss_id, str):
        raise UserError(
            "loss_fn 'custom' needs loss_fn_config['loss_id'], the id create_custom_loss returned"
        )
    record = await b.kv_get(gw.bus.kv[s.CUSTOM_LOSSES_BUCKET], s.token(loss_id), CustomLossRecord)
    if record is None or record.tenant != t:
        raise UserError(f"unknown loss_id {loss_id!r}")
    if record.session_id != run.session_id:
        raise UserError(
            f"loss {loss_id!r} was created in another session; only its session's runs use it"
        )
    _check_inputs(record.loss, command)
    return command.model_copy(update={"custom_loss": record.loss})


def _check_inputs(loss: CustomLoss, command: ForwardBackward) -> None:
    """Every datum holds each input the loss reads, at its declared rank (the SDK's
    ``check_loss_inputs``; a rank-0 input arrives as one element, protobuf has no 0-d shape)."""
    for i, datum in enumerate(command.data):
        for key in dict.fromkeys(["target_tokens", *loss.input_names]):
            tensor = datum.loss_fn_inputs.get(key)
            if tensor is None:
                raise UserError(
                    f"datum {i} has no loss_fn_inputs[{key!r}], which loss {loss.name!r} takes"
                )
            rank, shape = loss.rank_of(key), tensor.shape
            ok = (len(shape) <= 1 and tensor.numel == 1) if rank == 0 else len(shape) == rank
            if not ok:
                raise UserError(
                    f"datum {i} loss_fn_inputs[{key!r}] has shape {list(shape)}, but loss "
                    f"{loss.name!r} declared rank {rank}"
                )
