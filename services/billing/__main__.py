"""Billing service: ``python -m services.billing``. The one writer of the usage ledger."""

from __future__ import annotations

import asyncio

from services.billing.handlers import BillingService
from services.billing.ledger import Ledger
from services.billing.prices import DEFAULT_PRICE_TABLE, PriceTable
from services.billing.settings import BillingSettings
from whetstone import bus as b
from whetstone.observability import configure_logging
from whetstone.service import serve


async def main() -> None:
    settings = BillingSettings()
    log = configure_logging("billing", settings.log_level)
    base = (
        PriceTable.from_json(settings.prices_file) if settings.prices_file else DEFAULT_PRICE_TABLE
    )
    prices = PriceTable.from_registry(settings.registry(), base=base)
    ledger = Ledger.connect(settings.dsn(), settings.recent_ids)
    bus = await b.connect(settings.nats_url, "billing", service="billing")
    billing = BillingService(settings, bus, ledger, prices, log)
    await billing.declare()
    await billing.prepare()  # before serve starts the consumers
    await serve(bus, settings.metrics_port, log, on_start=billing.start, on_stop=billing.stop)


if __name__ == "__main__":
    asyncio.run(main())
