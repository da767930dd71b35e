"""Settings of the billing service."""

from __future__ import annotations

from pathlib import Path

from whetstone.settings import ServiceSettings


class BillingSettings(ServiceSettings):
    clickhouse_dsn: str = ""  # empty: the embedded engine under <state_dir>/clickhouse
    prices_file: Path | None = None  # JSON price table; empty: the built-in defaults
    batch_size: int = 5000  # events per ClickHouse insert
    fetch_timeout_s: float = 0.5
    recent_ids: int = 1_000_000  # event ids remembered to drop duplicates before the roll-ups
    reconcile_interval_s: float = 3600.0  # roll-ups checked against the raw events this often
    reconcile_days: int = 2  # over the last this many UTC days (and at start-up)

    def dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{(self.state_dir / 'clickhouse').resolve()}"
