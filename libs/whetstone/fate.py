"""Message fate, decided once (architecture.md §3.1): every consumer of every service runs under
this FastStream middleware, and handlers only return or raise.

| what happened                        | fate                                                  |
|--------------------------------------|-------------------------------------------------------|
| body does not decode / validate      | ``term``; a copy in the dead-letter stream; counted;  |
|                                      | logged with subject and size, never the payload       |
| handler raised ``UserError``         | the future fails with ``category: "user"``; ``ack``   |
| handler raised anything else         | ``nak`` with back-off, up to ``MAX_DELIVER`` tries;   |
|                                      | then the dead-letter stream, the future fails with    |
|                                      | ``category: "server"``, and ``term``                  |
| handler returned                     | ``ack``, unless it held the message (``hold``)        |

Core NATS messages (heartbeats, request/reply) have no acknowledgement: a failure is counted and
logged (an undecodable one also copied to the dead-letter stream), and the service carries on.
No exception leaves this wrapper, so no message can stop a service.

The one place that keeps a message unacknowledged after its handler returns is the trainer's
``seq_id`` reorder buffer (a request waiting for an earlier one): its handler calls ``hold(msg)``
and settles the message itself later, through ``MessageFate.settle``, with the same rules.

Batch subscribers (``PullSub(batch=True)``: billing's usage events, where per-message handling
cost more than the events' whole insert) get one wrapper call per fetched batch: a batch whose
handler returns is acknowledged whole unless held (the holder then settles each message, e.g.
``settle(single(raw), exc)``); a handler that raises leaves every message for redelivery.

The futures a failing message belongs to are found from its headers (``Ws-Request-Id``,
``Ws-Tenant``, ``Ws-Op``, set by ``bus.publish``), so even an undecodable request fails its
future instead of leaving the client waiting.

Dead letters (``ws.dlq.<subject>`` in stream ``WS_DEADLETTER``) keep the original headers and
body plus the error, the delivery count and the original subject; ``deadletter.py`` lists and
replays them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
import structlog
from faststream import BaseMiddleware
from faststream._internal.context import Context
from faststream.nats import NatsMessage
from faststream.nats.message import NatsBatchMessage
from faststream.nats.message import NatsMessage as _NatsMessageClass
from nats.aio.msg import Msg
from nats.js import api
from opentelemetry import propagate, trace

from whetstone import metrics
from whetstone import subjects as s
from whetstone.errors import UserError, WhetstoneError
from whetstone.messages import FutureRecord
from whetstone.observability import bind_work, tracer_provider

if TYPE_CHECKING:
    from whetstone.bus import Bus

MAX_DELIVER = 5  # tries of a message whose handler fails with a server error
BACKOFF_S = (0.5, 2.0, 5.0, 15.0, 30.0)  # nak delay after the n-th failed try

log = structlog.get_logger("fate")

Undecodable = (pydantic.ValidationError, json.JSONDecodeError, UnicodeDecodeError, LookupError)


def consumer_config(ack_wait_s: float, **extra: Any) -> api.ConsumerConfig:
    """A durable pull consumer's configuration: explicit acks, and the server's own give-up
    count one past ours, so the wrapper always sees the last try and dead-letters it."""
    return api.ConsumerConfig(
        ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait_s, max_deliver=MAX_DELIVER + 1, **extra
    )


def decoder_for(model: type[pydantic.BaseModel]) -> Callable[[NatsMessage], Awaitable[Any]]:
    """A FastStream decoder that validates the raw JSON body as ``model`` (pydantic's JSON mode,
    so tensors' base64 bytes decode as bytes)."""

    async def decode(msg: NatsMessage) -> Any:
        return model.model_validate_json(msg.body)

    return decode


class _MessageField(Context):
    """FastStream's ``Context("message")`` with an asynchronous ``use``: fast_depends runs a
    custom field's synchronous ``use`` in a worker thread, so every message paid a thread hop
    (and the GIL hand-offs with it) just to be handed to its handler."""

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return super().use(**kwargs)


# The message being handled, for handlers that settle or hold it: ``msg: Delivered``.
Delivered = Annotated[_NatsMessageClass, _MessageField("message")]
# The batch being handled, for a batch subscriber's handler: ``batch: DeliveredBatch``.
DeliveredBatch = Annotated[NatsBatchMessage, _MessageField("message")]


def single(raw: Msg) -> NatsMessage:
    """One message of a batch as the wrapper settles it (``MessageFate.settle``)."""
    return _NatsMessageClass(raw_message=raw, body=raw.data, headers=dict(raw.headers or {}))


def hold(msg: NatsMessage | NatsBatchMessage) -> None:
    """Leave ``msg`` (or a batch) unacknowledged when its handler returns; its holder settles
    it later."""
    setattr(msg, "ws_held", True)  # noqa: B010 - an attribute of our own on FastStream's object


def _held(msg: NatsMessage | NatsBatchMessage) -> bool:
    return bool(getattr(msg, "ws_held", False))


def queue_label(subject: str) -> str:
    """A bounded label for a subject (per-run subjects would explode metric cardinality)."""
    parts = subject.split(".")
    return ".".join(parts[:3] if parts[:2] == ["ws", "ctl"] else parts[:2])


def _deliveries(msg: NatsMessage) -> int:
    try:
        return int(msg.raw_message.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - not a JetStream message
        return 1


def _is_jetstream(msg: NatsMessage) -> bool:
    return bool(msg.raw_message.reply and msg.raw_message.reply.startswith("$JS.ACK"))


class MessageFate:
    """The broker middleware (a factory: FastStream makes one scope per message)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.bus: Bus | None = None  # set by ``bus.connect`` once the connection exists

    def __call__(self, msg: Any, /, *, context: Any) -> _FateScope:
        return _FateScope(msg, context=context, fate=self)

    # ------------------------------------------------------------ the rules

    async def settle(
        self, msg: NatsMessage, exc: BaseException | None, *, final: bool = False
    ) -> None:
        """Give ``msg`` its fate after its handling ended with ``exc`` (None: success).
        ``final``: no retry is possible (the trainer retried in place already)."""
        subject = msg.raw_message.subject
        label = queue_label(subject)
        headers = msg.headers or {}
        op = str(headers.get(s.OP_HEADER, label))
        if exc is None:
            if not msg.committed:
                await msg.ack()
            metrics.MESSAGES.labels(self.service, label, "ack").inc()
            return
        if isinstance(exc, Undecodable):
            log.warning(
                "message undecodable; terminated",
                subject=subject,
                size=len(msg.raw_message.data or b""),
                error_type=type(exc).__name__,
            )
            metrics.MESSAGES.labels(self.service, label, "term").inc()
            metrics.ERRORS.labels(self.service, op, "decode").inc()
            await self.fail_from_headers(headers, "the request could not be decoded", "server")
            await self.dead_letter(msg, exc, _deliveries(msg))
            await msg.reject()
            return
        if isinstance(exc, UserError):
            metrics.MESSAGES.labels(self.service, label, "ack").inc()
            metrics.ERRORS.labels(self.service, op, "user").inc()
            await self.fail_from_headers(headers, exc.message, "user")
            await msg.ack()
            return
        deliveries = _deliveries(msg)
        metrics.ERRORS.labels(self.service, op, "server").inc()
        if final or deliveries >= MAX_DELIVER:
            log.error(
                "message failed for good; dead-lettered",
                subject=subject,
                deliveries=deliveries,
                exc_info=exc,
            )
            await self.dead_letter(msg, exc, deliveries)
            message = exc.message if isinstance(exc, WhetstoneError) else f"internal error: {exc}"
            await self.fail_from_headers(headers, message, "server")
            metrics.MESSAGES.labels(self.service, label, "dead_letter").inc()
            await msg.reject()
            return
        delay = BACKOFF_S[min(deliveries, len(BACKOFF_S)) - 1]
        log.warning(
            "message failed; redelivering",
            subject=subject,
            deliveries=deliveries,
            delay_s=delay,
            exc_info=exc,
        )
        metrics.MESSAGES.labels(self.service, label, "nak").inc()
        await msg.nack(delay=delay)

    async def fail_from_headers(
        self, headers: Mapping[str, Any], error: str, category: str
    ) -> None:
        """Fail the future a message belongs to, if its headers name one that is still pending."""
        from whetstone import bus as b

        request_id, tenant = headers.get(s.REQUEST_ID_HEADER), headers.get(s.TENANT_HEADER)
        if self.bus is None or not request_id or not tenant:
            return
        record = await b.future_record(self.bus, str(request_id))
        if record is not None and (record.final or record.tenant != tenant):
            return
        pending = record or FutureRecord(
            request_id=str(request_id),
            tenant=str(tenant),
            op=str(headers.get(s.OP_HEADER, "unknown")),
        )
        await b.fail_future(self.bus, pending, error, category)

    async def dead_letter(self, msg: NatsMessage, exc: BaseException, deliveries: int) -> None:
        """Keep the message (headers and body as published) in ``WS_DEADLETTER``."""
        if self.bus is None:
            return
        raw = msg.raw_message
        headers = {k: str(v) for k, v in (raw.headers or {}).items() if not k.startswith("Nats-")}
        headers.update(
            {
                s.DLQ_SUBJECT_HEADER: raw.subject,
                s.DLQ_DELIVERIES_HEADER: str(deliveries),
                s.DLQ_ERROR_HEADER: f"{type(exc).__name__}: {exc}"[:512],
            }
        )
        await self.bus.js.publish(
            s.deadletter_subject(raw.subject),
            raw.data or b"",
            headers=headers,
            stream=s.DEADLETTER_STREAM,
        )
        metrics.DEAD_LETTERS.labels(self.service, queue_label(raw.subject)).inc()


class _FateScope(BaseMiddleware):
    def __init__(self, msg: Any, /, *, context: Any, fate: MessageFate) -> None:
        super().__init__(msg, context=context)
        self.fate = fate

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any) -> Any:
        if isinstance(msg, NatsBatchMessage):
            return await self._consume_batch(call_next, msg)
        headers = msg.headers or {}
        subject = msg.raw_message.subject
        bind_work(
            request_id=headers.get(s.REQUEST_ID_HEADER),
            run_id=headers.get(s.RUN_HEADER),
            tenant=headers.get(s.TENANT_HEADER),
            subject=subject,
        )
        jetstream = _is_jetstream(msg)
        if jetstream:
            self._record_queue_wait(msg)
        started = time.perf_counter()
        op = str(headers.get(s.OP_HEADER, queue_label(subject)))
        metrics.IN_FLIGHT.labels(self.fate.service, op).inc()
        try:
            if jetstream and self.fate.bus is not None:
                from whetstone import bus as b

                body = await b.load_payload(self.fate.bus, headers)
                if body is not None:
                    msg.body = body
            result = await call_next(msg)
        except Exception as exc:  # noqa: BLE001 - the wrapper decides every failure's fate
            if jetstream:
                await self._safely(self.fate.settle(msg, exc))
            else:
                await self._safely(self._core_failure(msg, exc))
            return None
        finally:
            metrics.IN_FLIGHT.labels(self.fate.service, op).dec()
        if jetstream and not _held(msg):
            await self._safely(self.fate.settle(msg, None))
        if not jetstream:
            metrics.MESSAGES.labels(self.fate.service, queue_label(subject), "ok").inc()
        if not _held(msg):  # a held message's work is timed where it runs (the trainer)
            metrics.REQUEST_LATENCY.labels(
                self.fate.service, op, str(headers.get(s.MODEL_HEADER, ""))
            ).observe(time.perf_counter() - started)
        return result

    async def _consume_batch(
        self, call_next: Callable[[Any], Awaitable[Any]], batch: NatsBatchMessage
    ) -> Any:
        """A batch subscriber's fetch (see the module docstring)."""
        try:
            result = await call_next(batch)
        except Exception:  # noqa: BLE001 - redelivered, as any server error
            subject = batch.raw_message[0].subject if batch.raw_message else "?"
            log.exception("batch handler failed; redelivered", subject=subject)
            await self._safely(batch.nack(delay=BACKOFF_S[0]))
            return None
        if not _held(batch):
            await self._safely(batch.ack())
        return result

    async def _core_failure(self, msg: Any, exc: BaseException) -> None:
        subject = msg.raw_message.subject
        kind = "decode" if isinstance(exc, Undecodable) else "server"
        metrics.MESSAGES.labels(self.fate.service, queue_label(subject), kind).inc()
        metrics.ERRORS.labels(self.fate.service, queue_label(subject), kind).inc()
        if kind == "decode":
            log.warning(
                "message undecodable; dead-lettered",
                subject=subject,
                size=len(msg.raw_message.data or b""),
                error_type=type(exc).__name__,
            )
            await self.fate.dead_letter(msg, exc, 1)
        else:
            log.error("handler failed", subject=subject, exc_info=exc)

    async def _safely(self, settling: Awaitable[None]) -> None:
        try:
            await settling
        except Exception:  # noqa: BLE001 - the bus is down: the message will be redelivered
            log.exception("could not settle a message; it will be redelivered")

    def _record_queue_wait(self, msg: Any) -> None:
        """The time the message waited in its stream, as a span of the request's trace and as
        a histogram per queue."""
        try:
            published: datetime = msg.raw_message.metadata.timestamp
        except Exception:  # noqa: BLE001 - no metadata: nothing to record
            return
        now = datetime.now(UTC)
        wait_s = max(0.0, (now - published).total_seconds())
        subject = msg.raw_message.subject
        headers = msg.headers or {}
        metrics.QUEUE_WAIT.labels(
            self.fate.service, queue_label(subject), str(headers.get(s.MODEL_HEADER, ""))
        ).observe(wait_s)
        parent = propagate.extract(dict(headers))
        tracer = tracer_provider(self.fate.service).get_tracer("whetstone.bus")
        span = tracer.start_span(
            f"queued {queue_label(subject)}",
            context=parent,
            start_time=int(published.timestamp() * 1e9),
            kind=trace.SpanKind.INTERNAL,
            attributes={"messaging.destination.name": subject, "whetstone.queue_wait_s": wait_s},
        )
        span.end(end_time=int(now.timestamp() * 1e9))
