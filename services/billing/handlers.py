"""Billing's bus side.

Consumes the durable ``ws.usage.>`` queue (consumer ``billing``) in batches: one ClickHouse insert
per batch, acknowledged only after the insert, so ClickHouse being down leaves events waiting in
the stream and a redelivered batch is deduplicated by ``event_id`` in the ledger. Answers usage
reports on ``ws.ctl.billing.report`` (request/reply).
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from nats.js import api

from services.billing.ledger import Ledger
from services.billing.prices import PriceTable
from services.billing.settings import BillingSettings
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.tasks import Offload, spawn
from whetstone.errors import WhetstoneError
from whetstone.messages import UsageEvent, UsageReport, UsageReportQuery


class BillingService:
    def __init__(self, settings: BillingSettings, bus: b.Bus, ledger: Ledger, prices: PriceTable, log) -> None:
        self.settings = settings
        self.bus = bus
        self.ledger = ledger
        self.prices = prices
        self.log = log
        # chdb is synchronous and single-process: every ledger call runs on this one thread.
        self._db = Offload("clickhouse")

    async def start(self) -> None:
        await self._db(self.ledger.ensure_schema)
        await self.bus.nc.subscribe(s.USAGE_REPORT_SUBJECT, cb=self.handle_report)
        spawn(self._ingest(), self.log, "ingest")
        self.log.info("billing ready")

    async def _ingest(self) -> None:
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60.0, max_ack_pending=50_000)
        sub = await self.bus.js.pull_subscribe(
            f"{s.USAGE_PREFIX}.>", durable=s.BILLING_CONSUMER, stream=s.USAGE_STREAM, config=config
        )
        while True:
            msgs = await b.fetch(sub, self.settings.batch_size, self.settings.fetch_timeout_s, self.log)
            if not msgs:
                continue
            events = [UsageEvent.decode(m.data) for m in msgs]
            try:
                await self._db(self.ledger.insert, events)
            except Exception:  # noqa: BLE001 - leave them unacknowledged: redelivered later
                self.log.exception("usage insert failed; events will be redelivered", count=len(events))
                await asyncio.sleep(1.0)
                continue
            await asyncio.gather(*(m.ack() for m in msgs))

    async def handle_report(self, msg: Msg) -> None:
        try:
            query = UsageReportQuery.decode(msg.data)
            report = await self._db(self.ledger.report, query, self.prices)
        except WhetstoneError as exc:
            report = UsageReport(rows=[], error=exc.message)
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason, billing carries on
            self.log.exception("usage report failed")
            report = UsageReport(rows=[], error=f"report failed: {exc}")
        await msg.respond(report.encode())
