"""Futures as clients see them: long-polling on KV ``ws_futures``, and which futures belong to
which session and sampling session (``FutureIndex``, KV ``ws_future_index``).

One subscription to the bucket's subject (``$KV.ws_futures.>``, a FastStream subscriber of the
gateway's broker) serves every waiting ``retrieve_future`` of this gateway: a poller registers
for its request id, checks the current record, and sleeps until a worker writes the final
record or the poll window ends. No polling of the KV store, no per-request watcher. An update
that does not decode is the fate wrapper's to count and dead-letter; waiters are untouched.
``wait_any`` does the same for many ids at once (``retrieve_futures``' long poll).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence

from faststream.nats import NatsMessage
from nats.js.errors import KeyNotFoundError, NotFoundError

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

    async def wait_any(self, request_ids: Sequence[str], timeout_s: float) -> None:
        """Return once any of ``request_ids`` has a final record written, or after
        ``timeout_s``. The caller reads the records (they may have been final already)."""
        if not request_ids:
            await asyncio.sleep(timeout_s)
            return
        fut: asyncio.Future[FutureRecord] = asyncio.get_running_loop().create_future()
        for request_id in request_ids:
            self._waiters[request_id].append(fut)
        metrics.LONG_POLLS.inc()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            pass
        finally:
            metrics.LONG_POLLS.dec()
            for request_id in request_ids:
                waiters = self._waiters.get(request_id)
                if waiters and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._waiters[request_id]


class FutureIndex:
    """Which futures belong to a scope (a session id, or a sampling session and clone): KV
    ``ws_future_index`` under ``<scope token>.<request id>``, expiring with the futures. Written
    by the gateway when it accepts a request; read by the trace export and ``retrieve_futures``.

    A scope is listed from the bucket's stream state (one ``stream_info`` filtered by subject),
    not with a KV watch, whose end-of-data marker can arrive before the entries (nats-py) and
    would hide a completion from ``retrieve_futures`` for good. So entries are removed by purging
    their subject outright, leaving no delete marker behind to list.
    """

    def __init__(self, bus: b.Bus) -> None:
        self.bus = bus
        self.kv = bus.kv[s.FUTURE_INDEX_BUCKET]
        self.futures = bus.kv[s.FUTURES_BUCKET]
        self._stream = f"KV_{s.FUTURE_INDEX_BUCKET}"
        self._prefix = f"$KV.{s.FUTURE_INDEX_BUCKET}."

    async def add(self, scope: str, request_id: str) -> None:
        await self.kv.put(f"{s.token(scope)}.{request_id}", b"")

    async def remove(self, scope: str, request_id: str) -> None:
        subject = f"{self._prefix}{s.token(scope)}.{request_id}"
        await self.bus.js.purge_stream(self._stream, subject=subject)

    async def request_ids(self, scope: str) -> list[str]:
        head = f"{self._prefix}{s.token(scope)}."
        info = await self.bus.js.stream_info(self._stream, subjects_filter=f"{head}*")
        return sorted(subject[len(head) :] for subject in info.state.subjects or {})

    async def records(self, request_ids: Sequence[str]) -> list[tuple[FutureRecord, int]]:
        """The futures' records with their KV revisions (expired ones left out)."""
        entries = await asyncio.gather(*(self._entry(rid) for rid in request_ids))
        return [entry for entry in entries if entry is not None]

    async def _entry(self, request_id: str) -> tuple[FutureRecord, int] | None:
        try:
            entry = await self.futures.get(request_id)
        except (KeyNotFoundError, NotFoundError):
            return None
        if entry.value is None or entry.operation is not None:
            return None
        return FutureRecord.decode(entry.value), int(entry.revision or 0)

    async def last_revision(self) -> int:
        """The futures bucket's latest revision: every record at or below it is readable now."""
        info = await self.futures.status()
        return int(info.stream_info.state.last_seq)
