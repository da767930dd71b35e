"""Futures as clients see them: long-polling on KV ``ws_futures``.

One subscription to the bucket's subject (``$KV.ws_futures.>``, a FastStream subscriber of the
gateway's broker) serves every waiting ``retrieve_future`` of this gateway: a poller registers
for its request id, checks the current record, and sleeps until a worker writes the final
record or the poll window ends. No polling of the KV store, no per-request watcher. An update
that does not decode is the fate wrapper's to count and dead-letter; waiters are untouched.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from faststream.nats import NatsMessage

from services.gateway import metrics
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.errors import NotFound
from whetstone.fate import Delivered
from whetstone.messages import FutureRecord


async def _raw_body(msg: NatsMessage) -> bytes:
    return bytes(msg.body)


class FutureWaiters:
    def __init__(self, bus: b.Bus) -> None:
        self.bus = bus
        self._waiters: dict[str, list[asyncio.Future[FutureRecord]]] = defaultdict(list)

    async def start(self) -> None:
        await b.subscribe(
            self.bus,
            self._on_update,
            f"$KV.{s.FUTURES_BUCKET}.>",
            decoder=_raw_body,
            title="future updates",
            no_reply=True,  # never answer the writer: a KV put awaits its ack on the reply subject
        )

    async def _on_update(self, data: bytes, msg: Delivered) -> None:
        request_id = msg.raw_message.subject.rsplit(".", 1)[-1]
        waiters = self._waiters.get(request_id)
        if not waiters or not data:
            return
        record = FutureRecord.decode(data)
        if record.final:
            for fut in self._waiters.pop(request_id, []):
                if not fut.done():
                    fut.set_result(record)

    async def wait(self, request_id: str, tenant: str, timeout_s: float) -> FutureRecord:
        """The future's record: final as soon as it is, else the pending record after
        ``timeout_s``."""
        fut: asyncio.Future[FutureRecord] = asyncio.get_running_loop().create_future()
        self._waiters[request_id].append(fut)  # before reading, so no update slips between
        try:
            record = await b.future_record(self.bus, request_id)
            if record is None or record.tenant != tenant:
                raise NotFound(f"unknown request_id {request_id!r}")
            if record.final:
                return record
            metrics.LONG_POLLS.inc()
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except TimeoutError:
                return await b.future_record(self.bus, request_id) or record
            finally:
                metrics.LONG_POLLS.dec()
        finally:
            waiters = self._waiters.get(request_id)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[request_id]
