"""Settings of the billing service."""

from __future__ import annotations

from pathlib import Path

from whetstone.settings import ServiceSettings


class BillingSettings(ServiceSettings):
    clickhouse_dsn: str = ""  # empty: the embedded engine under <state_dir>/clickhouse
    prices_file: Path | None = None  # JSON price table; empty: the built-in defaults
    # Events are buffered until ``batch_size`` of them or ``flush_interval_s`` since the last
    # flush, whichever comes first, then written in one insert: each insert writes a part in three
    # tables, so fewer, larger inserts cost the engine less per event (bench/RESULTS.md, P6).
    batch_size: int = 50_000  # events per ClickHouse insert, at most
    flush_interval_s: float = 1.0
    fetch_size: int = 10_000  # messages asked for per pull request
    fetch_timeout_s: float = 0.5
    recent_ids: int = 1_000_000  # event ids remembered to drop duplicates before the roll-ups
    reconcile_interval_s: float = 3600.0  # roll-ups checked against the raw events this often
    reconcile_days: int = 2  # over the last this many UTC days (and at start-up)

    def dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{(self.state_dir / 'clickhouse').resolve()}"
