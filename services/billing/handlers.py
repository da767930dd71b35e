"""Billing's bus side.

Consumes the durable ``ws.usage.>`` queue (consumer ``billing``) in batches (FastStream's batch
mode: one handler call per fetch, where one per event cost ten times the events' insert). The
fetch is decoded in one pydantic call (``decode_events``); the handler only buffers it (held
unacknowledged, ``fate.hold``); a flusher writes the buffer to ClickHouse in one insert (up to
``batch_size`` events, at least every ``flush_interval_s``) and only then acknowledges its
messages. An undecodable event is dead-lettered alone; its batch-mates are
billed. ClickHouse being down leaves the events waiting in the stream, and a redelivered event
is deduplicated by ``event_id`` in the ledger. Answers usage reports on
``ws.ctl.billing.report`` (request/reply).

At start-up the ledger's schema is created and migrated, and the roll-ups are reconciled with the
raw events over the last ``reconcile_days`` days; the reconciliation repeats every
``reconcile_interval_s`` (see ``ledger.py`` for why duplicates can reach the roll-ups at all).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta

import structlog
from faststream import AckPolicy
from faststream.nats import JStream, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.aio.msg import Msg
from pydantic import TypeAdapter, ValidationError

from services.billing.ledger import Ledger
from services.billing.prices import PriceTable
from services.billing.settings import BillingSettings
from whetstone import bus as b
from whetstone import metrics
from whetstone import subjects as s
from whetstone.errors import WhetstoneError
from whetstone.fate import DeliveredBatch, consumer_config, decoder_for, hold, single
from whetstone.messages import UsageEvent, UsageReport, UsageReportQuery
from whetstone.tasks import Offload, spawn

# Short, because a fetch can be lost in the client (Python 3.11's ``asyncio.wait_for`` may drop
# a message that lands as a fetch times out, e.g. while a long insert holds the loop): its
# events come back after this long. A held event waits for its flush far less than this (at most
# ``flush_interval_s``, less once ``batch_size`` events wait, plus one insert of under a second),
# and a copy redelivered meanwhile is dropped by the ledger's recent ids.
USAGE_ACK_WAIT_S = 10.0
_EVENTS = TypeAdapter(list[UsageEvent])


def decode_events(bodies: Sequence[bytes]) -> list[UsageEvent | None]:
    """The events of message bodies, in one pydantic call over them as a JSON array (a third of
    the time of one call each); when that fails, each alone, ``None`` for the bad ones. The
    count check catches a body that is several JSON values (it would shift its neighbours)."""
    try:
        events: list[UsageEvent | None] = list(
            _EVENTS.validate_json(b"[" + b",".join(bodies) + b"]")
        )
        if len(events) == len(bodies):
            return events
    except ValidationError:
        pass
    decoded: list[UsageEvent | None] = []
    for body in bodies:
        try:
            decoded.append(UsageEvent.model_validate_json(body))
        except ValidationError:
            decoded.append(None)
    return decoded


async def _decode_batch(batch: NatsBatchMessage) -> list[UsageEvent | None]:
    """The batch subscriber's decoder; it never raises (a bad body decodes to ``None``)."""
    return decode_events([m.data for m in batch.raw_message])


class BillingService:
    def __init__(
        self,
        settings: BillingSettings,
        bus: b.Bus,
        ledger: Ledger,
        prices: PriceTable,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.ledger = ledger
        self.prices = prices
        self.log = log
        # chdb is synchronous and single-process: every ledger call runs on this one thread.
        self._db = Offload("clickhouse")
        self._buffer: list[tuple[UsageEvent | None, Msg]] = []
        self._full = asyncio.Event()

    async def declare(self) -> None:
        await b.subscribe(
            self.bus,
            self.handle_usage,
            f"{s.USAGE_PREFIX}.>",
            stream=JStream(s.USAGE_STREAM, declare=False),
            durable=s.BILLING_CONSUMER,
            pull_sub=PullSub(
                batch_size=self.settings.fetch_size,
                timeout=self.settings.fetch_timeout_s,
                batch=True,
            ),
            # Room for the batch being written and the next one filling meanwhile.
            config=consumer_config(
                USAGE_ACK_WAIT_S,
                max_ack_pending=2 * self.settings.batch_size + self.settings.fetch_size,
            ),
            ack_policy=AckPolicy.MANUAL,
            decoder=_decode_batch,
            title="usage events",
        )
        await b.subscribe(
            self.bus,
            self.handle_report,
            s.USAGE_REPORT_SUBJECT,
            decoder=decoder_for(UsageReportQuery),
            title="usage reports",
        )

    async def prepare(self) -> None:
        """Create and migrate the schema and reconcile the roll-ups. Run before the consumers
        start: a report answered or a batch written earlier would meet no tables."""
        applied = await self._db(self.ledger.ensure_schema)
        if applied:
            self.log.info("ledger schema migrated", steps=applied)
        await self.reconcile()

    async def start(self) -> None:
        spawn(self._flush_loop(), self.log, "ledger flush")
        spawn(self._reconcile_loop(), self.log, "ledger reconciliation")
        self.log.info("billing ready")

    async def reconcile(self) -> None:
        today = datetime.combine(datetime.now(UTC).date(), time(), UTC)
        since = today - timedelta(days=self.settings.reconcile_days - 1)
        try:
            corrections = await self._db(self.ledger.reconcile, since, None)
        except WhetstoneError as exc:  # ClickHouse down: the next round tries again
            self.log.warning("reconciliation failed", error=exc.message)
            return
        if corrections:
            self.log.info("roll-ups corrected from the raw events", rows=corrections)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_s)
            await self.reconcile()

    async def handle_usage(self, events: list[UsageEvent | None], batch: DeliveredBatch) -> None:
        """One fetch of usage events (``None``: a body that is no event)."""
        hold(batch)  # each message acknowledged by the flusher once its insert is written
        self._buffer.extend(zip(events, batch.raw_message, strict=True))
        if len(self._buffer) >= self.settings.batch_size:
            self._full.set()

    async def _flush_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._full.wait(), self.settings.flush_interval_s)
            except TimeoutError:
                pass
            self._full.clear()
            await self.flush()
            if len(self._buffer) >= self.settings.batch_size:
                self._full.set()  # a full batch arrived during the insert: write it now

    async def flush(self) -> None:
        batch, self._buffer = (
            self._buffer[: self.settings.batch_size],
            self._buffer[self.settings.batch_size :],
        )
        if not batch:
            return
        events = [e for e, _ in batch if e is not None]
        try:
            await self._db(self.ledger.insert, events)
        except Exception:  # noqa: BLE001 - left unacknowledged: redelivered after ack_wait
            self.log.exception("usage insert failed; events will be redelivered", count=len(batch))
            await asyncio.gather(*(m.nak(delay=1.0) for _, m in batch), return_exceptions=True)
            return
        tokens: dict[tuple[str, str], int] = {}
        for e in events:
            tokens[(e.meter, e.base_model)] = tokens.get((e.meter, e.base_model), 0) + e.tokens
        for (meter, model), n in tokens.items():
            metrics.TOKENS.labels("billing", meter, model).inc(n)
        for event, m in batch:
            if event is None:  # dead-lettered and terminated, as any undecodable message
                try:
                    UsageEvent.model_validate_json(m.data)
                except ValidationError as exc:
                    await self.bus.fate.settle(single(m), exc)
            else:
                await m.ack()  # a publish into the client's buffer: no round trip to wait for
        metrics.MESSAGES.labels("billing", "ws.usage", "ack").inc(len(events))

    async def stop(self) -> None:
        """Write what is buffered before the broker stops (what fails is redelivered)."""
        while self._buffer:
            before = len(self._buffer)
            await self.flush()
            if len(self._buffer) >= before:
                break

    async def handle_report(self, query: UsageReportQuery) -> bytes:
        try:
            report = await self._db(self.ledger.report, query, self.prices)
        except WhetstoneError as exc:
            report = UsageReport(rows=[], error=exc.message)
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason, billing carries on
            self.log.exception("usage report failed")
            report = UsageReport(rows=[], error=f"report failed: {exc}")
        return report.encode()
