"""Billing ledger throughput (P6): ingestion rate and report latency on the embedded engine.

Run:  .venv/bin/python bench/bench_billing.py [N_EVENTS] [--dir DIR]     (default N = 200000)
      .venv/bin/python bench/bench_billing.py 10000000                   (P6: a month, 10M events)

Inserts N synthetic usage events (100 tenants, 3 base models, 3 meters, 1000 runs, 200 API keys,
spread over one month) in batches of 10k, the way the billing handler batches bus messages; each
insert also feeds the hourly and daily roll-ups (materialized views). The events are built batch
by batch (not counted in the ingest time), so 10M fit in memory. Then it times a month's report
(read from the daily roll-up), one tenant's, the monthly statement's query (model x meter x
price), a report the roll-ups cannot answer (a window off the hour: the raw events with
``FINAL``), and a reconciliation of one day; and checks that the reports count each token once
after a batch was inserted again. A fresh temporary data directory is used (and removed) unless
--dir is given.
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


def make_events(start: int, n: int, rng: random.Random) -> list[UsageEvent]:
    """Events ``start .. start + n`` (three meters per request). A session belongs to one
    tenant, API key and base model, as in the service; ``model_construct`` skips validation,
    so building 10M events takes a minute rather than five."""
    span_ms = int((MONTH_END - MONTH_START).total_seconds() * 1000)
    events = []
    for i in range(start, start + n):
        meter = METERS[i % 3]
        rid = f"req-{i // 3}"
        s = rng.randrange(1000)
        session = f"sess-{s}"
        events.append(
            UsageEvent.model_construct(
                event_id=f"{rid}:{meter}",
                request_id=rid,
                tenant=f"tenant-{s % 100:03d}",
                base_model=MODELS[s % 3],
                meter=meter,
                tokens=rng.randrange(1, 4096),
                run_id=f"{session}:train:0",
                session_id=session,
                sampler_id=None,
                api_key_id=f"key-{s % 200:03d}",
                operation=None,
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

    rng = random.Random(0)
    build_s, expected = 0.0, 0
    batch_s: list[float] = []
    first: list[UsageEvent] = []
    last: list[UsageEvent] = []
    for i in range(0, args.n, BATCH):
        t = time.perf_counter()
        batch = make_events(i, min(BATCH, args.n - i), rng)
        build_s += time.perf_counter() - t
        expected += sum(e.tokens for e in batch)
        first, last = first or batch, batch
        t = time.perf_counter()
        ledger.insert(batch)
        batch_s.append(time.perf_counter() - t)
    # Redeliver the last batch (what a billing restart does): dropped before the roll-ups.
    t = time.perf_counter()
    ledger.insert(last)
    dup_s = time.perf_counter() - t

    month = UsageReportQuery(since=MONTH_START, until=MONTH_END)
    one = UsageReportQuery(tenant="tenant-007", since=MONTH_START, until=MONTH_END)
    statement = UsageReportQuery(
        tenant="tenant-007",
        since=MONTH_START,
        until=MONTH_END,
        group_by=["model", "meter", "price"],
    )
    off_hour = UsageReportQuery(
        tenant="tenant-007", since=MONTH_START + timedelta(minutes=1), until=MONTH_END
    )
    all_unmerged = time_report(ledger, month)
    one_unmerged = time_report(ledger, one)
    statement_t = time_report(ledger, statement)
    raw_t = time_report(ledger, off_hour, repeats=3)
    total = sum(r.tokens for r in ledger.report(month, DEFAULT_PRICE_TABLE).rows)
    t = time.perf_counter()
    corrections = ledger.reconcile(MONTH_START, MONTH_START + timedelta(days=1))
    reconcile_s = time.perf_counter() - t
    # The first batch again, long after its ids left the recent window (at 10M events): the raw
    # table still counts it once, the roll-ups twice until a reconciliation of the month.
    ledger.insert(first)
    stale = sum(r.tokens for r in ledger.report(month, DEFAULT_PRICE_TABLE).rows)
    t = time.perf_counter()
    ledger.reconcile(MONTH_START, MONTH_END)
    month_reconcile_s = time.perf_counter() - t
    healed = sum(r.tokens for r in ledger.report(month, DEFAULT_PRICE_TABLE).rows)

    ledger._client.command(f"OPTIMIZE TABLE {DATABASE}.{TABLE} FINAL")  # bench-only peek inside
    all_merged = time_report(ledger, month)
    one_merged = time_report(ledger, one)
    n_events = args.n

    ingest_s = sum(batch_s)
    rate = n_events / ingest_s if ingest_s else float("nan")
    starts = range(0, n_events, BATCH)
    per_batch = [min(BATCH, n_events - i) / s for i, s in zip(starts, batch_s, strict=True)]
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
        ("monthly statement query (p50/max)", f"{statement_t[0]:.1f}/{statement_t[1]:.1f} ms"),
        ("one tenant, window off the hour: raw (p50/max)", f"{raw_t[0]:.0f}/{raw_t[1]:.0f} ms"),
        ("reconcile one day (corrections)", f"{reconcile_s * 1000:.0f} ms ({corrections})"),
        ("report rows (all tenants / one tenant)", f"{all_merged[2]} / {one_merged[2]}"),
        ("tokens reported == tokens sent (dups once)", str(total == expected)),
        ("an old duplicate batch: roll-ups before reconcile", str(stale == expected)),
        ("reconcile the month, then equal", f"{month_reconcile_s:.1f} s, {healed == expected}"),
    ]
    for name, value in rows:
        print(f"{name:<48}{value:>20}")
    ledger.close()
    if args.dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
