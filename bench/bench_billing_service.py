"""Billing's whole ingest path (P6): usage events waiting on the bus -> billed and acknowledged.

Run:  .venv/bin/python bench/bench_billing_service.py [N_EVENTS] [--profile FILE]   (default 200000)
      .venv/bin/python bench/bench_billing_service.py 100000 --set batch_size=5000   (a setting)

Starts a real nats-server, publishes N synthetic usage events (the ledger bench's mix, encoded
as the workers encode them) to the durable usage stream while billing is down (not timed), then
starts the billing service in this process (its schema first) and times it from the start of
its consumers until every event is written to the embedded ClickHouse engine and acknowledged
(nothing pending nor unacknowledged on the consumer), and until the first 99 % were. That is what
``bench_billing.py`` leaves out: the bus delivery, FastStream's handler and middlewares,
decoding, and the acknowledgements. ``--profile FILE`` writes a cProfile of the timed part (the
event loop's thread; read it with ``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_billing import Synthetic, as_events  # noqa: E402

from services.billing.handlers import BillingService  # noqa: E402
from services.billing.ledger import Ledger  # noqa: E402
from services.billing.prices import DEFAULT_PRICE_TABLE  # noqa: E402
from services.billing.settings import BillingSettings  # noqa: E402
from whetstone import bus as b  # noqa: E402
from whetstone import subjects as s  # noqa: E402
from whetstone.messages import UsageReportQuery  # noqa: E402
from whetstone.nats_server import start_nats  # noqa: E402
from whetstone.observability import configure_logging  # noqa: E402


async def publish(bus: b.Bus, n: int) -> int:
    """N events on the usage stream, as ``bus.publish_usage`` sends them; returns their tokens."""
    synthetic, tokens, step = Synthetic(n), 0, 10_000
    for start in range(0, n, step):
        events = as_events(synthetic.columns(start, min(step, n - start)))
        tokens += sum(e.tokens for e in events)
        acks = [
            bus.js.publish(
                s.usage_subject(e.tenant), e.encode(), headers={"Nats-Msg-Id": e.event_id}
            )
            for e in events
        ]
        await asyncio.gather(*acks)
    return tokens


async def outstanding(bus: b.Bus, n: int) -> int:
    """Events not yet acknowledged (pending or delivered and unacknowledged)."""
    try:
        info = await bus.js.consumer_info(s.USAGE_STREAM, s.BILLING_CONSUMER)
    except Exception:  # noqa: BLE001 - not created yet
        return n
    return (info.num_pending or 0) + (info.num_ack_pending or 0)


async def main(n: int, profile: str | None, overrides: dict[str, str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-billing-service-"))
    server = start_nats(root)
    try:
        settings = BillingSettings(nats_url=server.url, state_dir=root / "billing", **overrides)  # type: ignore[arg-type]
        log = configure_logging("bench", "WARNING")
        print(
            f"batch_size={settings.batch_size} flush_interval_s={settings.flush_interval_s} "
            f"fetch_size={settings.fetch_size} fetch_timeout_s={settings.fetch_timeout_s}"
        )
        bus = await b.connect(server.url, "billing", service="billing")
        t = time.perf_counter()
        tokens = await publish(bus, n)
        print(f"published {n} events in {time.perf_counter() - t:.1f} s (not timed)")
        ledger = Ledger.connect(settings.dsn(), settings.recent_ids)
        billing = BillingService(settings, bus, ledger, DEFAULT_PRICE_TABLE, log)
        await billing.declare()
        await billing.prepare()  # schema and flusher first: the clock runs from the first fetch
        await billing.start()
        profiler = cProfile.Profile() if profile else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        await bus.broker.start()
        t99 = None
        while (left := await outstanding(bus, n)) > 0:
            if t99 is None and left <= n // 100:
                t99 = time.perf_counter() - t
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t
        t99 = elapsed if t99 is None else t99
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        billed = ledger.report(UsageReportQuery(), DEFAULT_PRICE_TABLE)
        ok = sum(r.tokens for r in billed.rows) == tokens
        print(f"billing service ingest: {n} events in {elapsed:.2f} s = {n / elapsed:,.0f} ev/s")
        print(f"  the first 99 %: {t99:.2f} s = {0.99 * n / t99:,.0f} ev/s")
        print(f"tokens billed == tokens published: {ok}")
        await bus.close()
        ledger.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("n", nargs="?", type=int, default=200_000, help="events to ingest")
    ap.add_argument("--profile", default=None, help="write a cProfile of the timed part here")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a billing setting, e.g. batch_size=5000 (repeatable)",
    )
    args = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    asyncio.run(main(args.n, args.profile, overrides))
