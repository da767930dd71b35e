"""Billing service (``python -m services.billing``) on a real nats-server and the embedded
ClickHouse engine: usage events waiting in the durable queue before billing starts are billed once
it starts, a re-published event counts once (whether JetStream's Nats-Msg-Id window catches it or
not, and across a restart), and reports come by request/reply on ``ws.ctl.billing.report``,
filtered by API key id; ``whetstone status`` and the REST run info (an in-process gateway) show
each run's cost so far from those reports.

Billing runs as a child process, as in ``whetstone up``: chdb hosts one data directory per
process, and the ledger unit tests already hold one in the pytest process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import nats.errors
import pytest

from services.billing.prices import DEFAULT_PRICE_TABLE
from tests.integration.gateway_app import client, running_gateway
from tests.integration.helpers import eventually
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.keys import create_key
from whetstone.messages import (
    LoraConfig,
    Meter,
    TrainingRunRecord,
    UsageEvent,
    UsageReport,
    UsageReportQuery,
)
from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.status import StatusCollector

pytestmark = pytest.mark.timeout(60)  # a hang fails fast, with every thread's stack

REPO = Path(__file__).resolve().parents[2]
TENANT = "tenant-a"


@pytest.fixture
def billing(nats_url: str, tmp_path: Path) -> Iterator:
    """``start()`` launches the billing service (same state directory every time); ``stop()``
    ends it."""
    procs: list[subprocess.Popen] = []
    env = {
        **os.environ,
        "WHETSTONE_NATS_URL": nats_url,
        "WHETSTONE_STATE_DIR": str(tmp_path / "billing"),
        "WHETSTONE_LOG_LEVEL": "WARNING",
    }

    class Billing:
        def start(self) -> None:
            log = open(tmp_path / "billing.log", "ab")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "services.billing"],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

        def stop(self) -> None:
            proc = procs[-1]
            proc.terminate()
            proc.wait(10)

    yield Billing()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def usage(
    request_id: str,
    meter: Meter,
    tokens: int,
    run_id: str = "sess-1:train:0",
    api_key_id: str | None = None,
) -> UsageEvent:
    return UsageEvent.of(
        request_id, TENANT, BUILTIN_MODEL_NAME, meter, tokens, run_id, api_key_id=api_key_id
    )


async def report(
    bus: b.Bus, timeout_s: float = 20.0, **filters: str
) -> dict[str, tuple[int, Decimal]]:
    """TENANT's report as meter -> (tokens, cost), retried until billing answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    query = UsageReportQuery(tenant=TENANT, **filters)  # type: ignore[arg-type]
    while True:
        try:
            reply = await bus.nc.request(s.USAGE_REPORT_SUBJECT, query.encode(), timeout=5)
            break
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):  # starting up
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
    rep = UsageReport.decode(reply.data)
    assert rep.error is None
    assert all(r.tenant == TENANT and r.base_model == BUILTIN_MODEL_NAME for r in rep.rows)
    return {r.meter: (r.tokens, r.cost_usd) for r in rep.rows}


async def all_ingested(bus: b.Bus) -> bool:
    """Billing acknowledges only after the insert: nothing pending means everything is in
    ClickHouse."""
    try:
        info = await bus.js.consumer_info(s.USAGE_STREAM, s.BILLING_CONSUMER)
    except Exception:  # noqa: BLE001 - not created yet
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0


def cost(meter: Meter, tokens: int) -> Decimal:
    return DEFAULT_PRICE_TABLE.cost(BUILTIN_MODEL_NAME, meter, tokens)


async def test_usage_waits_for_billing_and_counts_once(bus: b.Bus, billing) -> None:
    train, prefill = usage("req-1", "train_tokens", 100), usage("req-2", "prefill_tokens", 40)
    # Published while billing is down: the durable queue holds them.
    await b.publish(bus, s.usage_subject(TENANT), train, msg_id=train.event_id)
    await b.publish(
        bus, s.usage_subject(TENANT), train, msg_id=train.event_id
    )  # JetStream drops this one
    await b.publish(
        bus, s.usage_subject(TENANT), train, msg_id="outside-the-dedup-window"
    )  # this one reaches billing
    await b.publish(bus, s.usage_subject(TENANT), prefill, msg_id=prefill.event_id)

    billing.start()
    await report(bus)  # answering: schema ready, ingest started
    await eventually(lambda: all_ingested(bus), timeout_s=20.0, what="the queued events ingested")
    assert await report(bus) == {
        "train_tokens": (100, cost("train_tokens", 100)),
        "prefill_tokens": (40, cost("prefill_tokens", 40)),
    }

    # Billing down again; a redelivery of an old event arrives with new usage; billing restarts.
    billing.stop()
    sample = usage("req-3", "sample_tokens", 7)
    await b.publish(bus, s.usage_subject(TENANT), sample, msg_id=sample.event_id)
    await b.publish(bus, s.usage_subject(TENANT), train, msg_id="redelivered-after-a-crash")
    billing.start()
    await report(bus)
    await eventually(
        lambda: all_ingested(bus), timeout_s=20.0, what="the events of the restart ingested"
    )
    totals = await report(bus)
    assert {m: t for m, (t, _) in totals.items()} == {
        "train_tokens": 100,
        "prefill_tokens": 40,
        "sample_tokens": 7,
    }


async def test_reports_filter_by_api_key_and_status_shows_each_runs_cost(
    bus: b.Bus, nats_url: str, billing, models_dir: Path, log
) -> None:
    run_a, run_b = "sess-a:train:0", "sess-b:train:0"
    for run_id in (run_a, run_b):
        record = TrainingRunRecord(
            run_id=run_id,
            tenant=TENANT,
            session_id=run_id.split(":")[0],
            base_model=BUILTIN_MODEL_NAME,
            lora=LoraConfig(rank=4),
        )
        await b.kv_put(bus.kv[s.RUNS_BUCKET], s.token(run_id), record)
    events = [
        usage("req-a1", "train_tokens", 300, run_a, api_key_id="key-a"),
        usage("req-a2", "train_tokens", 20, run_a, api_key_id="key-a"),
        usage("req-a3", "checkpoint_bytes", 4096, run_a, api_key_id="key-a"),
        usage("req-b1", "train_tokens", 55, run_b, api_key_id="key-b"),
    ]
    await b.publish_usage(bus, events)
    # An undecodable event among them (billing decodes a fetch at once): dead-lettered alone.
    await bus.js.publish(s.usage_subject(TENANT), b'{"event_id": "broken"}')
    mine, theirs = await create_key(bus, TENANT), await create_key(bus, "tenant-b")
    async with running_gateway(nats_url, models_dir, log) as app:
        async with client(app, mine) as http:
            info = await http.get(f"/api/v1/training_runs/{run_a}")
        assert info.status_code == 200 and "usage" not in info.json()  # billing not answering
    billing.start()
    await report(bus)
    await eventually(lambda: all_ingested(bus), timeout_s=20.0, what="the events ingested")

    assert await report(bus, api_key_id="key-a") == {
        "train_tokens": (320, cost("train_tokens", 320)),
        "checkpoint_bytes": (4096, cost("checkpoint_bytes", 4096)),
    }
    assert await report(bus, api_key_id="key-b") == {"train_tokens": (55, cost("train_tokens", 55))}
    assert await report(bus, api_key_id="no-such-key") == {}
    dead = await bus.js.get_last_msg(
        s.DEADLETTER_STREAM, s.deadletter_subject(s.usage_subject(TENANT))
    )
    assert dead.data == b'{"event_id": "broken"}'

    # The status view asks billing, as ``whetstone status`` does: a run's tokens (token meters
    # only) and its cost over every meter.
    collector = await StatusCollector.open(nats_url)
    try:
        snap = await collector.snapshot()
    finally:
        await collector.close()
    assert not snap.problems, snap.problems
    shown = {r.run_id: (r.tokens, r.cost_usd) for r in snap.runs}
    assert shown == {
        run_a: (320, cost("train_tokens", 320) + cost("checkpoint_bytes", 4096)),
        run_b: (55, cost("train_tokens", 55)),
    }

    # The REST run info carries the same cost, for the run's owner only.
    async with running_gateway(nats_url, models_dir, log) as app:
        async with client(app, mine) as http:
            info = (await http.get(f"/api/v1/training_runs/{run_a}")).json()
        async with client(app, theirs) as http:
            assert (await http.get(f"/api/v1/training_runs/{run_a}")).status_code == 404
    assert info["training_run_id"] == run_a
    assert info["usage"]["tokens"] == 320
    assert Decimal(info["usage"]["cost_usd"]) == shown[run_a][1]
    assert info["usage"]["meters"]["checkpoint_bytes"]["quantity"] == 4096
