"""Server-side custom losses end to end: the unmodified tinker SDK's ``create_custom_loss``
uploads a traced loss to a platform of real processes, ``forward_backward_custom`` with its
handle runs it on the trainer in one request, and the answer equals the SDK's client-side path
(a plain callable: a forward, the loss and its gradient on the client, a weighted cross-entropy
backward) for the same loss on the same weights. A few steps with the uploaded loss lower it.
Tenants and sessions cannot use each other's losses, and a graph off the whitelist is refused
when it is created."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import tinker
import torch
from tinker import types

from whetstone import bus as b
from whetstone.keys import create_key
from whetstone.models.builtin import BUILTIN_MODEL_NAME

SEQS = [[5, 17, 99, 250, 3, 41, 7, 12], [60, 61, 62, 63, 64, 65], [9, 8, 7, 6, 5, 4, 3]]
RANKS: dict[str, types.CustomLossInputRank] = {"logprobs": 1, "weights": 1, "scale": 0}


def weighted_square(logprobs, weights, scale):
    """A loss no built-in computes: sum(w * lp^2) * scale - mean(lp), with two metrics."""
    loss = (weights * logprobs**2).sum() * scale - logprobs.mean()
    return loss, {"custom/mean_lp:mean": logprobs.mean(), "custom/weight:sum": weights.sum()}


def client_side(data: list[types.Datum], logprobs_list: list[torch.Tensor]):
    """The same loss as a plain callable, which the SDK always runs client-side."""
    total = torch.zeros(())
    mean_lp, weight = 0.0, 0.0
    for datum, lp in zip(data, logprobs_list, strict=True):
        weights = datum.loss_fn_inputs["weights"].to_torch()
        scale = datum.loss_fn_inputs["scale"].to_torch()
        loss, metrics = weighted_square(lp, weights, scale)
        total = total + loss
        mean_lp += float(metrics["custom/mean_lp:mean"].detach()) / len(data)
        weight += float(metrics["custom/weight:sum"].detach())
    return total, {"custom/mean_lp:mean": mean_lp, "custom/weight:sum": weight}


def make_data() -> list[types.Datum]:
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={
                "target_tokens": types.TensorData(
                    data=seq[1:], dtype="int64", shape=[len(seq) - 1]
                ),
                "weights": types.TensorData(
                    data=[1.0 + 0.5 * (i % 2) for i in range(len(seq) - 1)],
                    dtype="float32",
                    shape=[len(seq) - 1],
                ),
                "scale": types.TensorData(data=[0.1], dtype="float32", shape=[]),
            },
        )
        for seq in SEQS
    ]


def key_of(platform, tenant: str) -> str:
    async def mint() -> str:
        bus = await b.connect(platform.nats_url, "test-keys")
        try:
            return await create_key(bus, tenant)
        finally:
            await bus.close()

    return asyncio.run(mint())


@pytest.fixture(scope="module")
def service(platform):
    client = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def uploaded(service):
    handle = service.create_custom_loss(weighted_square, RANKS).result()
    training = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=8, seed=3
    ).result()
    return handle, training


def test_the_loss_is_uploaded(uploaded) -> None:
    handle, _ = uploaded
    assert handle.loss_id is not None  # the client config said custom_loss_server_side
    assert handle.loss_id.endswith(":loss:0")


def test_server_side_equals_the_client_side_path_and_learns(uploaded) -> None:
    handle, training = uploaded
    data = make_data()
    server = training.forward_backward_custom(data, handle).result()
    local = training.forward_backward_custom(data, client_side).result()  # same weights
    assert "surrogate_loss:sum" in local.metrics and "surrogate_loss:sum" not in server.metrics
    assert server.metrics["loss:sum"] == pytest.approx(local.metrics["loss:sum"], abs=1e-4)
    for key in ("custom/mean_lp:mean", "custom/weight:sum"):
        assert server.metrics[key] == pytest.approx(local.metrics[key], abs=1e-4)
    assert server.metrics["custom/weight:sum"] == pytest.approx(
        sum(sum(d.loss_fn_inputs["weights"].data) for d in data)
    )
    for ours, theirs in zip(server.loss_fn_outputs, local.loss_fn_outputs, strict=True):
        assert ours["logprobs"].data == pytest.approx(theirs["logprobs"].data, abs=1e-4)
    assert "elementwise_loss" not in server.loss_fn_outputs[0]

    losses = [server.metrics["loss:sum"]]
    training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    for _ in range(4):
        step = training.forward_backward_custom(data, handle)
        training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        losses.append(step.result().metrics["loss:sum"])
    assert losses[-1] < losses[0] - 0.05, losses


def test_another_session_or_tenant_cannot_use_the_loss(platform, uploaded) -> None:
    handle, _ = uploaded
    data = make_data()
    other_session = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    other_tenant = tinker.ServiceClient(base_url=platform.base_url, api_key=key_of(platform, "eve"))
    try:
        for client, match in ((other_session, "another session"), (other_tenant, "unknown loss")):
            training = client.create_lora_training_client(
                base_model=BUILTIN_MODEL_NAME, rank=4
            ).result()
            with pytest.raises(tinker.BadRequestError, match=match):
                training.forward_backward(data, "custom", {"loss_id": handle.loss_id}).result()
            with pytest.raises(ValueError, match="only be used by clients of that session"):
                training.forward_backward_custom(data, handle)  # the SDK's own check
    finally:
        other_session.close("success").result()
        other_tenant.close("success").result()


def test_a_loss_goes_only_into_the_callers_own_sessions(platform, service) -> None:
    """``create_custom_loss`` names its session: another tenant's session is unknown (404)."""
    body = {
        "session_id": service.holder.get_session_id(),
        "custom_loss_seq_id": 99,
        "name": "total",
        "inputs": [{"name": "logprobs", "rank": 1}],
        "graph": {
            "format": 1,
            "nodes": [
                {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
                {"op": "call_method", "name": "s", "target": "sum", "args": [{"ref": "logprobs"}]},
                {
                    "op": "output",
                    "name": "output",
                    "target": "output",
                    "args": [{"tuple": [{"ref": "s"}, {"dict": {}}]}],
                },
            ],
        },
    }
    url = f"{platform.base_url}/api/v1/create_custom_loss"
    eve = httpx.post(url, json=body, headers={"X-API-Key": key_of(platform, "eve")})
    assert eve.status_code == 404 and "unknown session" in eve.json()["error"]
    owner = httpx.post(url, json=body, headers={"X-API-Key": platform.api_key})
    assert owner.status_code == 200 and owner.json()["request_id"]
    body["graph"]["nodes"][1]["target"] = "tolist"  # leaves torch
    refused = httpx.post(
        url, json={**body, "custom_loss_seq_id": 100}, headers={"X-API-Key": platform.api_key}
    )
    assert (
        refused.status_code == 400 and "method 'tolist' is not allowed" in refused.json()["error"]
    )


def cumulative(logprobs):
    return torch.cumprod(logprobs, dim=0).sum(), {}


def test_a_graph_off_the_whitelist_is_refused_at_create_time(service) -> None:
    with pytest.raises(tinker.BadRequestError, match="'torch.cumprod' is not allowed"):
        service.create_custom_loss(cumulative, {"logprobs": 1}).result()


def vector_loss(logprobs):
    return logprobs * 2, {}  # the SDK's tracer cannot know the shape; the trainer can


def test_a_loss_that_fails_on_the_trainer_fails_its_future_as_the_users(service, uploaded) -> None:
    handle, training = uploaded
    vector = service.create_custom_loss(vector_loss, {"logprobs": 1}).result()
    with pytest.raises(tinker.RequestFailedError, match="scalar floating-point loss") as failed:
        training.forward_backward_custom(make_data(), vector).result()
    assert failed.value.category == tinker.types.RequestErrorCategory.User
    # Inputs the loss declared but the datum lacks: refused by the gateway (the SDK checks them
    # too, so a raw forward_backward naming the loss is what reaches the server).
    data = make_data()
    del data[0].loss_fn_inputs["scale"]
    with pytest.raises(tinker.BadRequestError, match=r"no loss_fn_inputs\['scale'\]"):
        training.forward_backward(data, "custom", {"loss_id": handle.loss_id}).result()
    assert "loss:sum" in training.forward_backward_custom(make_data(), handle).result().metrics
