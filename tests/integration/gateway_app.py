"""An in-process gateway for integration tests: ``create_app`` on the test's real nats-server,
its lifespan run in the test's event loop, driven through httpx's ASGI transport (no socket)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.types import Datum, ForwardBackwardInput, ForwardBackwardRequest, ModelInput, TensorData

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from whetstone.models.builtin import BUILTIN_MODEL_NAME

PROTOBUF = "application/x-protobuf"
SEQS = [[5, 17, 99, 250, 3, 41, 7], [60, 61, 62, 63, 64]]


@asynccontextmanager
async def running_gateway(
    nats_url: str, models_dir: Path, log: object, **overrides: object
) -> AsyncIterator[FastAPI]:
    settings = GatewaySettings(
        nats_url=nats_url, models_dir=models_dir, long_poll_s=2.0, **overrides
    )  # type: ignore[arg-type]
    app = create_app(settings, log)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        yield app


def client(app: FastAPI, key: str | None) -> httpx.AsyncClient:
    headers = {"X-API-Key": key} if key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers=headers,
        timeout=30.0,
    )


def fb_body(model_id: str, seq_id: int, seqs: list[list[int]] = SEQS) -> bytes:
    """A cross-entropy forward_backward body as tinker 0.38 encodes it."""
    data = [
        Datum(
            model_input=ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": TensorData.from_numpy(np.asarray(seq[1:]))},
        )
        for seq in seqs
    ]
    request = ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


async def create_run(http: httpx.AsyncClient, model_seq_id: int = 0) -> tuple[str, str]:
    """A session and a LoRA training run through the gateway: ``(run_id, create future id)``."""
    session = (await http.post("/api/v1/create_session", json={"tags": []})).json()["session_id"]
    answer = await http.post(
        "/api/v1/create_model",
        json={
            "session_id": session,
            "model_seq_id": model_seq_id,
            "base_model": BUILTIN_MODEL_NAME,
            "lora_config": {"rank": 4, "seed": 7},
        },
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["model_id"], answer.json()["request_id"]


async def result_of(
    http: httpx.AsyncClient,
    request_id: str,
    timeout_s: float = 60.0,
    accept: str = "application/json",
) -> httpx.Response:
    """Long-poll ``retrieve_future`` until the future is final; its last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        answer = await http.post(
            "/api/v1/retrieve_future", json={"request_id": request_id}, headers={"accept": accept}
        )
        assert answer.status_code == 200, answer.text
        if (
            PROTOBUF in answer.headers.get("content-type", "")
            or answer.json().get("type") != "try_again"
        ):
            return answer
        if loop.time() > deadline:
            raise TimeoutError(f"future {request_id} still pending")
