"""Billing ledger throughput: ingestion rate and report latency on the embedded engine (chdb).

Run:  .venv/bin/python bench/bench_billing.py [N_EVENTS] [--dir DIR]     (default N = 200000)

Inserts N synthetic usage events (100 tenants, 3 base models, 3 meters, spread over one month)
in batches of 10k, the way the billing handler batches bus messages, then times a month's
report for all tenants and for one tenant, with ``FINAL`` deduplication as in production, both
before and after forcing a merge (reports must be correct and fast while parts are unmerged).
A fresh temporary data directory is used (and removed) unless --dir is given.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.billing.ledger import DATABASE, TABLE, Ledger  # noqa: E402
from services.billing.prices import DEFAULT_PRICE_TABLE  # noqa: E402
from whetstone.messages import Meter, UsageEvent, UsageReportQuery  # noqa: E402

BATCH = 10_000
MONTH_START = datetime(2025, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2025, 4, 1, tzinfo=UTC)
METERS: tuple[Meter, ...] = ("train_tokens", "prefill_tokens", "sample_tokens")
MODELS = ("whetstone/tiny-qwen3", "Qwen/Qwen3-8B", "Qwen/Qwen3-32B")


def make_events(n: int, seed: int = 0) -> list[UsageEvent]:
    rng = random.Random(seed)
    span_ms = int((MONTH_END - MONTH_START).total_seconds() * 1000)
    events = []
    for i in range(n):
        meter = METERS[i % 3]
        rid = f"req-{i // 3}"
        events.append(
            UsageEvent(
                event_id=f"{rid}:{meter}",
                request_id=rid,
                tenant=f"tenant-{rng.randrange(100):03d}",
                base_model=rng.choice(MODELS),
                meter=meter,
                tokens=rng.randrange(1, 4096),
                run_id=f"sess-{rng.randrange(1000)}:train:0",
                occurred_at=MONTH_START + timedelta(milliseconds=rng.randrange(span_ms)),
            )
        )
    return events


def time_report(
    ledger: Ledger, query: UsageReportQuery, repeats: int = 5
) -> tuple[float, float, int]:
    """Median and max latency in ms over ``repeats`` runs, and the row count."""
    times, rows = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        rows = len(ledger.report(query, DEFAULT_PRICE_TABLE).rows)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), max(times), rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("n", nargs="?", type=int, default=200_000, help="events to insert")
    ap.add_argument("--dir", default=None, help="chdb data directory (default: a fresh temp dir)")
    args = ap.parse_args()

    data_dir = args.dir or tempfile.mkdtemp(prefix="bench-billing-")
    ledger = Ledger.connect(f"chdb://{Path(data_dir).resolve()}")
    ledger.ensure_schema()

    t = time.perf_counter()
    events = make_events(args.n)
    build_s = time.perf_counter() - t

    batch_s: list[float] = []
    for i in range(0, len(events), BATCH):
        t = time.perf_counter()
        ledger.insert(events[i : i + BATCH])
        batch_s.append(time.perf_counter() - t)
    # Redeliver the first batch: reports must not change, and we see what duplicates cost.
    t = time.perf_counter()
    ledger.insert(events[:BATCH])
    dup_s = time.perf_counter() - t

    month = UsageReportQuery(since=MONTH_START, until=MONTH_END)
    one = UsageReportQuery(tenant="tenant-007", since=MONTH_START, until=MONTH_END)
    all_unmerged = time_report(ledger, month)
    one_unmerged = time_report(ledger, one)
    total = sum(r.tokens for r in ledger.report(month, DEFAULT_PRICE_TABLE).rows)
    expected = sum(e.tokens for e in events)

    ledger._client.command(f"OPTIMIZE TABLE {DATABASE}.{TABLE} FINAL")  # bench-only peek inside
    all_merged = time_report(ledger, month)
    one_merged = time_report(ledger, one)

    ingest_s = sum(batch_s)
    rate = len(events) / ingest_s if ingest_s else float("nan")
    starts = range(0, len(events), BATCH)
    per_batch = [len(events[i : i + BATCH]) / s for i, s in zip(starts, batch_s, strict=True)]
    print(f"\nbilling ledger bench: {args.n} events, batches of {BATCH}, chdb at {data_dir}")
    print(f"(building the UsageEvent objects took {build_s:.2f} s, not counted below)\n")
    print(f"{'measure':<48}{'value':>20}")
    print("-" * 68)
    rows = [
        ("ingest: total time", f"{ingest_s:.2f} s"),
        ("ingest: rate, overall", f"{rate:,.0f} ev/s"),
        ("ingest: rate, median batch", f"{statistics.median(per_batch):,.0f} ev/s"),
        ("ingest: rate, slowest batch", f"{min(per_batch):,.0f} ev/s"),
        ("re-insert of one duplicate batch", f"{dup_s * 1000:.0f} ms"),
        (
            "month report, all tenants, unmerged (p50/max)",
            f"{all_unmerged[0]:.1f}/{all_unmerged[1]:.1f} ms",
        ),
        (
            "month report, one tenant, unmerged (p50/max)",
            f"{one_unmerged[0]:.1f}/{one_unmerged[1]:.1f} ms",
        ),
        (
            "month report, all tenants, merged (p50/max)",
            f"{all_merged[0]:.1f}/{all_merged[1]:.1f} ms",
        ),
        (
            "month report, one tenant, merged (p50/max)",
            f"{one_merged[0]:.1f}/{one_merged[1]:.1f} ms",
        ),
        ("report rows (all tenants / one tenant)", f"{all_merged[2]} / {one_merged[2]}"),
        ("tokens reported == tokens sent (dups once)", str(total == expected)),
    ]
    for name, value in rows:
        print(f"{name:<48}{value:>20}")
    ledger.close()
    if args.dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
