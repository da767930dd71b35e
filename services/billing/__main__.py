"""Billing service: ``python -m services.billing``. The one writer of the usage ledger."""

from __future__ import annotations

import asyncio

from services.billing.handlers import BillingService
from services.billing.ledger import Ledger
from services.billing.prices import DEFAULT_PRICE_TABLE, PriceTable
from services.billing.settings import BillingSettings
from whetstone import bus as b
from whetstone.observability import configure_logging


async def main() -> None:
    settings = BillingSettings()
    log = configure_logging("billing", settings.log_level)
    prices = PriceTable.from_json(settings.prices_file) if settings.prices_file else DEFAULT_PRICE_TABLE
    ledger = Ledger.connect(settings.dsn())
    bus = await b.connect(settings.nats_url, "billing")
    await BillingService(settings, bus, ledger, prices, log).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
