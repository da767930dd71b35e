"""Billing ledger throughput (P6): ingestion rate and report latency on the embedded engine.

Run:  .venv/bin/python bench/bench_billing.py [N_EVENTS] [--dir DIR]     (default N = 200000)
      .venv/bin/python bench/bench_billing.py 10000000                   (P6: a month, 10M events)
      .venv/bin/python bench/bench_billing.py 10000000 --ab 1000000      (and the A/B table first)

Inserts N synthetic usage events (100 tenants, 3 base models, 3 meters, 1000 sessions each with one
API key, model and run, spread over one month in arrival order) through ``Ledger.insert_columns``
in batches of ``--batch`` (default 200k); each insert also feeds the hourly and daily roll-ups
(materialized views). The events are built column by column with numpy, batch by batch (not timed),
so 10M take a minute and fit in memory. Then it times a month's report (read from the daily
roll-up), one tenant's, the monthly statement's query (model x meter x price), a report the
roll-ups cannot answer (a window off the hour: the raw events with ``FINAL``), and a reconciliation
of one day; and checks that the reports count each token once after a batch was inserted again. A
fresh temporary data directory is used (and removed) unless --dir is given.

``--ab N`` first measures the ingest variants side by side, each in a child process of its own
(one chdb engine per process) over the same N events, in wall seconds and in process CPU seconds
(``time.process_time``, which counts the engine's threads and is what other load on a shared
machine disturbs least): the previous release (views without GROUP BY, 10k-event inserts of
``UsageEvent`` objects), then each change alone and together, and the alternatives not taken.
``--ab-baseline REV[,REV]`` adds first each git revision's own ledger and bench, running its chosen
variant (exported from git to a temporary directory), to compare old code with new side by side.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.billing.ledger import (  # noqa: E402
    COLUMNS,
    DAILY,
    DATABASE,
    HOURLY,
    INSERT_SETTINGS,
    TABLE,
    Ledger,
    UsageColumns,
)
from services.billing.prices import DEFAULT_PRICE_TABLE  # noqa: E402
from whetstone.messages import Meter, UsageEvent, UsageReportQuery  # noqa: E402

BATCH = 200_000
MONTH_START = datetime(2025, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2025, 4, 1, tzinfo=UTC)
METERS: tuple[Meter, ...] = ("train_tokens", "prefill_tokens", "sample_tokens")
MODELS = ("whetstone/tiny-qwen3", "Qwen/Qwen3-8B", "Qwen/Qwen3-32B")
_START_MS = int(MONTH_START.timestamp() * 1000)
_SPAN_MS = int((MONTH_END - MONTH_START).total_seconds() * 1000)


@dataclass
class Synthetic:
    """The bench's events: ``n`` of them over the month, in arrival order or at random times."""

    n: int
    in_order: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def columns(self, start: int, count: int) -> UsageColumns:
        """Events ``start .. start + count`` (three meters per request). A session belongs to one
        tenant, API key and base model, as in the service."""
        rng, i = self._rng, np.arange(start, start + count)
        session = rng.integers(0, 1000, count)
        if self.in_order:  # a live ledger receives events as they happen, a second of jitter
            at = _START_MS + i * (_SPAN_MS // self.n) + rng.integers(0, 1000, count)
        else:
            at = _START_MS + rng.integers(0, _SPAN_MS, count)
        request = [f"req-{r}" for r in (i // 3).tolist()]
        meter = [METERS[m] for m in (i % 3).tolist()]
        sess = [f"sess-{s}" for s in session.tolist()]
        return UsageColumns(
            event_id=[f"{r}:{m}" for r, m in zip(request, meter, strict=True)],
            request_id=request,
            tenant=[f"tenant-{s:03d}" for s in (session % 100).tolist()],
            base_model=[MODELS[m] for m in (session % 3).tolist()],
            meter=meter,
            tokens=rng.integers(1, 4096, count).tolist(),
            run_id=[f"{s}:train:0" for s in sess],
            occurred_at_ms=at.tolist(),
            session_id=sess,
            sampler_id=[""] * count,
            api_key_id=[f"key-{s:03d}" for s in (session % 200).tolist()],
            operation=[""] * count,
        )


_OPTIONAL = {"run_id", "session_id", "sampler_id", "api_key_id", "operation"}
_REQUIRED = {"event_id", "request_id", "tenant", "base_model", "meter", "tokens"}


def as_events(batch: UsageColumns) -> list[UsageEvent]:
    """The same events as objects, as billing decodes them (``model_construct``: no validation)."""
    return [
        UsageEvent.model_construct(
            **{k: v or None for k, v in zip(COLUMNS, row, strict=True) if k in _OPTIONAL},
            **{k: v for k, v in zip(COLUMNS, row, strict=True) if k in _REQUIRED},
            occurred_at=datetime.fromtimestamp(row[7] / 1000, UTC),
        )
        for row in zip(*batch.columns(), strict=True)
    ]


# ---------------------------------------------------------------- the A/B of ingest variants

# name -> (schema version, batch size, insert settings, how: columns|events|arrow, in order, extra)
VARIANTS: dict[str, tuple[int, int, dict[str, int], str, bool, str]] = {
    "before: views per event, 10k inserts of objects": (3, 10_000, {}, "events", True, ""),
    "200k inserts only": (3, 200_000, {}, "columns", True, ""),
    "+ views sum each insert (migration 4)": (4, 200_000, {}, "columns", True, ""),
    "+ optimize_on_insert=0": (4, 200_000, {"optimize_on_insert": 0}, "columns", True, ""),
    "+ parallel_view_processing=1 (chosen)": (4, 200_000, INSERT_SETTINGS, "columns", True, ""),
    "chosen, 50k inserts": (4, 50_000, INSERT_SETTINGS, "columns", True, ""),
    "chosen, inserting UsageEvent objects": (4, 200_000, INSERT_SETTINGS, "events", True, ""),
    "chosen, events at random times": (4, 200_000, INSERT_SETTINGS, "columns", False, ""),
    "alt: Arrow insert (insert_arrow)": (4, 200_000, INSERT_SETTINGS, "arrow", True, ""),
    "alt: daily view fed by the hourly (cascade)": (
        4,
        200_000,
        INSERT_SETTINGS,
        "columns",
        True,
        "cascade",
    ),
    "alt: no daily view (month from the hourly)": (
        4,
        200_000,
        INSERT_SETTINGS,
        "columns",
        True,
        "no-daily",
    ),
}


def _arrow_insert(ledger: Ledger, batch: UsageColumns) -> None:
    import pyarrow as pa  # a dependency of chdb, used only by this alternative

    low_cardinality = {"tenant", "base_model", "meter", "operation"}
    arrays = []
    for name, column in zip(COLUMNS, batch.columns(), strict=True):
        if name == "tokens":
            arrays.append(pa.array(column, pa.uint64()))
        elif name == "occurred_at":
            arrays.append(pa.array(column, pa.int64()).cast(pa.timestamp("ms", "UTC")))
        else:
            array = pa.array(column, pa.string())
            arrays.append(array.dictionary_encode() if name in low_cardinality else array)
    table = pa.Table.from_arrays(arrays, names=list(COLUMNS))
    ledger._client.insert_arrow(TABLE, table, database=DATABASE, settings=ledger.insert_settings)


def run_variant(name: str, n: int) -> dict[str, object]:
    """One variant in this process: ingest ``n`` events, then the month report's latency."""
    version, batch_size, settings, how, in_order, extra = VARIANTS[name]
    data_dir = tempfile.mkdtemp(prefix="bench-billing-ab-")
    ledger = Ledger.connect(f"chdb://{data_dir}")
    ledger.insert_settings = dict(settings)
    ledger.ensure_schema(upto=version)
    month_source = DAILY
    if extra == "cascade":
        daily_from_hourly = (
            f"SELECT tenant, toDateTime(toStartOfDay(bucket), 'UTC') AS bucket, base_model, meter,"
            f" api_key_id, session_id, run_id, sampler_id, sum(quantity) AS quantity,"
            f" sum(events) AS events FROM {DATABASE}.{HOURLY} GROUP BY ALL"
        )
        ledger._client.command(f"DROP VIEW {DATABASE}.{DAILY}_mv")
        ledger._client.command(
            f"CREATE MATERIALIZED VIEW {DATABASE}.{DAILY}_mv TO {DATABASE}.{DAILY} "
            f"AS {daily_from_hourly}"
        )
    elif extra == "no-daily":
        ledger._client.command(f"DROP VIEW {DATABASE}.{DAILY}_mv")
        month_source = HOURLY
    events = Synthetic(n, in_order)
    wall = cpu = 0.0
    for start in range(0, n, batch_size):
        batch = events.columns(start, min(batch_size, n - start))
        objects = as_events(batch) if how == "events" else []
        w, c = time.perf_counter(), time.process_time()
        if how == "events":
            ledger.insert(objects)
        elif how == "arrow":
            _arrow_insert(ledger, batch)
        else:
            ledger.insert_columns(batch)
        wall += time.perf_counter() - w
        cpu += time.process_time() - c
    month_sql = (
        f"SELECT tenant, base_model, meter, sum(quantity) FROM {DATABASE}.{month_source} "
        f"WHERE bucket >= toDateTime({int(MONTH_START.timestamp())}, 'UTC') "
        f"AND bucket < toDateTime({int(MONTH_END.timestamp())}, 'UTC') GROUP BY ALL"
    )
    times = []
    for _ in range(3):
        t = time.perf_counter()
        ledger._client.query(month_sql)
        times.append((time.perf_counter() - t) * 1000)
    ledger.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    return {"wall": wall, "cpu": cpu, "n": n, "month_ms": statistics.median(times)}


CHOSEN = "+ parallel_view_processing=1 (chosen)"


def _baseline_tree(revision: str) -> Path:
    """The repository's ``services`` and ``bench`` at ``revision``, exported to a temporary
    directory (read from git, the working tree untouched); its bench runs the baseline rows."""
    root = Path(__file__).resolve().parents[1]
    tree = Path(tempfile.mkdtemp(prefix="bench-billing-baseline-"))
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", revision, "services", "bench"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def ab(n: int, repeats: int, only: list[str], baselines: list[str]) -> None:
    """Each variant ``repeats`` times, the rounds interleaved (load that comes and goes hits every
    variant alike); the medians. Each of ``baselines`` (git revisions) adds a first row: that
    revision's ledger running its chosen variant, so old and new code share one sitting."""
    names = [v for v in VARIANTS if not only or any(o in v for o in only)]
    trees = [(rev, _baseline_tree(rev)) for rev in baselines]
    rows = [(f"{rev}: chosen", tree / "bench" / "bench_billing.py", CHOSEN) for rev, tree in trees]
    rows += [(name, Path(__file__), name) for name in names]
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in rows}
    for _ in range(repeats):
        for label, script, name in rows:
            out = subprocess.run(
                [sys.executable, str(script), str(n), "--variant", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
    for _, tree in trees:
        shutil.rmtree(tree, ignore_errors=True)
    print(f"\nA/B of ledger ingest variants, {n:,} events each, median of {repeats}")
    print(f"{'variant':<48}{'ev/s wall':>12}{'ev/CPU-s':>12}{'month ms':>10}{'vs first':>10}")
    print("-" * 92)
    base_cpu = None
    for name, rs in runs.items():
        wall = statistics.median(n / r["wall"] for r in rs)
        cpu = statistics.median(n / r["cpu"] for r in rs)
        month_ms = statistics.median(r["month_ms"] for r in rs)
        base_cpu = base_cpu or cpu
        print(f"{name:<48}{wall:>12,.0f}{cpu:>12,.0f}{month_ms:>10.0f}{cpu / base_cpu:>9.2f}x")


# ---------------------------------------------------------------- the P6 run


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}/{statistics.median(values):.1f}/{max(values):.1f}"


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
    ap.add_argument("--batch", type=int, default=BATCH, help="events per insert")
    ap.add_argument("--random-times", action="store_true", help="events at random times")
    ap.add_argument("--ab", type=int, default=0, help="first, the A/B of variants over N events")
    ap.add_argument("--ab-repeats", type=int, default=1, help="rounds of the A/B (medians)")
    ap.add_argument("--ab-only", default="", help="comma-separated parts of variant names")
    ap.add_argument(
        "--ab-baseline",
        default="",
        help="git revisions, comma-separated: their chosen variant first",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the ingest, print the top")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one A/B child
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.n)))
        return
    started, load = datetime.now(UTC), os.getloadavg()
    print(f"started {started:%Y-%m-%d %H:%M} UTC, load average {load[0]:.1f} {load[1]:.1f}")
    if args.ab:
        only = [o for o in args.ab_only.split(",") if o]
        ab(args.ab, args.ab_repeats, only, [r for r in args.ab_baseline.split(",") if r])
        if not args.n:
            return

    data_dir = args.dir or tempfile.mkdtemp(prefix="bench-billing-")
    ledger = Ledger.connect(f"chdb://{Path(data_dir).resolve()}")
    ledger.ensure_schema()

    synthetic = Synthetic(args.n, in_order=not args.random_times)
    build_s, expected = 0.0, 0
    batch_s: list[float] = []
    cpu_s = 0.0
    first = last = None
    profiler = cProfile.Profile() if args.profile else None
    load_during = []
    for i in range(0, args.n, args.batch):
        t = time.perf_counter()
        batch = synthetic.columns(i, min(args.batch, args.n - i))
        build_s += time.perf_counter() - t
        expected += sum(batch.tokens)
        first, last = first or batch, batch
        if profiler:
            profiler.enable()
        t, c = time.perf_counter(), time.process_time()
        ledger.insert_columns(batch)
        batch_s.append(time.perf_counter() - t)
        cpu_s += time.process_time() - c
        if profiler:
            profiler.disable()
        load_during.append(os.getloadavg()[0])
    assert first is not None and last is not None
    if profiler:
        print("\ningest profile (the insert calls' thread; the engine's merges run beside it):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(8)
    # Redeliver the last batch (what a billing restart does): dropped before the roll-ups.
    t = time.perf_counter()
    ledger.insert_columns(last)
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
    ledger.insert_columns(first)
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
    starts = range(0, n_events, args.batch)
    per_batch = [min(args.batch, n_events - i) / s for i, s in zip(starts, batch_s, strict=True)]
    order = "random times" if args.random_times else "arrival order"
    print(f"\nbilling ledger bench: {args.n} events ({order}), batches of {args.batch}")
    print(f"(building the event columns took {build_s:.2f} s, not counted below)\n")
    print(f"{'measure':<48}{'value':>20}")
    print("-" * 68)
    rows = [
        ("ingest: total time (wall / process CPU)", f"{ingest_s:.2f} / {cpu_s:.2f} s"),
        ("ingest: rate, overall", f"{rate:,.0f} ev/s"),
        ("ingest: rate per process CPU second", f"{n_events / cpu_s:,.0f} ev/s"),
        ("ingest: rate, median batch", f"{statistics.median(per_batch):,.0f} ev/s"),
        ("ingest: rate, slowest batch", f"{min(per_batch):,.0f} ev/s"),
        ("load average during ingest (min/median/max)", _spread(load_during)),
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
