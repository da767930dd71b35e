"""Billing's bus side.

Consumes the durable ``ws.usage.>`` queue (consumer ``billing``). Each event's handler only
buffers it (held unacknowledged, ``fate.hold``); a flusher writes the buffer to ClickHouse in one
insert per batch and only then acknowledges its messages. ClickHouse being down leaves the events
waiting in the stream, and a redelivered event is deduplicated by ``event_id`` in the ledger.
Per-message handlers (rather than FastStream's batch mode) keep one undecodable event from
terminating its batch-mates. Answers usage reports on ``ws.ctl.billing.report`` (request/reply).

At start-up the ledger's schema is created and migrated, and the roll-ups are reconciled with the
raw events over the last ``reconcile_days`` days; the reconciliation repeats every
``reconcile_interval_s`` (see ``ledger.py`` for why duplicates can reach the roll-ups at all).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time, timedelta

import structlog
from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub

from services.billing.ledger import Ledger
from services.billing.prices import PriceTable
from services.billing.settings import BillingSettings
from whetstone import bus as b
from whetstone import metrics
from whetstone import subjects as s
from whetstone.errors import WhetstoneError
from whetstone.fate import consumer_config, decoder_for, hold
from whetstone.messages import UsageEvent, UsageReport, UsageReportQuery
from whetstone.tasks import Offload, spawn

USAGE_ACK_WAIT_S = 60.0


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
        self._buffer: list[tuple[UsageEvent, NatsMessage]] = []
        self._full = asyncio.Event()

    async def declare(self) -> None:
        await b.subscribe(
            self.bus,
            self.handle_usage,
            f"{s.USAGE_PREFIX}.>",
            stream=JStream(s.USAGE_STREAM, declare=False),
            durable=s.BILLING_CONSUMER,
            pull_sub=PullSub(
                batch_size=min(self.settings.batch_size, 1000),
                timeout=self.settings.fetch_timeout_s,
            ),
            config=consumer_config(USAGE_ACK_WAIT_S, max_ack_pending=50_000),
            ack_policy=AckPolicy.MANUAL,
            decoder=decoder_for(UsageEvent),
            title="usage events",
        )
        await b.subscribe(
            self.bus,
            self.handle_report,
            s.USAGE_REPORT_SUBJECT,
            decoder=decoder_for(UsageReportQuery),
            title="usage reports",
        )

    async def start(self) -> None:
        applied = await self._db(self.ledger.ensure_schema)
        if applied:
            self.log.info("ledger schema migrated", steps=applied)
        await self.reconcile()
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

    async def handle_usage(self, event: UsageEvent, msg: NatsMessage) -> None:
        hold(msg)  # acknowledged by the flusher once the insert is written
        self._buffer.append((event, msg))
        if len(self._buffer) >= self.settings.batch_size:
            self._full.set()

    async def _flush_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._full.wait(), self.settings.fetch_timeout_s)
            except TimeoutError:
                pass
            self._full.clear()
            await self.flush()

    async def flush(self) -> None:
        batch, self._buffer = (
            self._buffer[: self.settings.batch_size],
            self._buffer[self.settings.batch_size :],
        )
        if not batch:
            return
        try:
            await self._db(self.ledger.insert, [event for event, _ in batch])
        except Exception:  # noqa: BLE001 - left unacknowledged: redelivered after ack_wait
            self.log.exception("usage insert failed; events will be redelivered", count=len(batch))
            await asyncio.gather(*(m.nack(delay=1.0) for _, m in batch), return_exceptions=True)
            return
        for event, _ in batch:
            metrics.TOKENS.labels("billing", event.meter, event.base_model).inc(event.tokens)
        await asyncio.gather(*(self.bus.fate.settle(m, None) for _, m in batch))

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
