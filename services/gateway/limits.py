"""The request-body limit of the gateway: a body over ``GatewaySettings.max_body_bytes`` gets
HTTP 413 with a Tinker error body, before the gateway holds it in memory.

A declared ``Content-Length`` over the limit is refused without reading anything; a body sent
without one (chunked) is counted as it streams in and refused at the first byte past the limit.
This is pure ASGI middleware: it sits in front of routing and body parsing, so no route can
forget it.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway import metrics


class BodyTooLarge(Exception):
    """Raised into the app by the counting ``receive``; the middleware answers 413 itself."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send, declared)
            return
        received = 0
        over = False
        answered = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if over:
                return  # the app's own answer to its aborted read (e.g. a 400): ours replaces it
            answered = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise  # the app's own failure; a limit hit was wrapped by the framework
        if over and not answered:
            await self._refuse(send, received)

    async def _refuse(self, send: Send, size: int) -> None:
        message = (
            f"request body too large: {size} bytes or more, the gateway accepts at most "
            f"{self.max_body_bytes}"
        )
        metrics.REFUSALS.labels("body_too_large", "user").inc()
        body = json.dumps({"error": message, "category": "user", "detail": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
