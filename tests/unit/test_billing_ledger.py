"""The usage ledger on the embedded ClickHouse engine (chdb), plus the price table.

chdb hosts one engine path per process, so the whole module shares one data directory and one
``Ledger``; each test writes under its own tenant names (``uuid``) and reports only those, so tests
stay independent without reopening the engine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.billing.ledger import Ledger
from services.billing.prices import DEFAULT_PRICE_TABLE, Price, PriceTable
from whetstone.errors import UserError
from whetstone.messages import Meter, UsageEvent, UsageReportQuery

T0 = datetime(2025, 3, 1, tzinfo=UTC)
TINY = "whetstone/tiny-qwen3"
BIG = "Qwen/Qwen3-8B"
PRICES = PriceTable(
    default=Price(train_tokens=1.0, prefill_tokens=1.0, sample_tokens=1.0),
    models={
        TINY: Price(train_tokens=0.40, prefill_tokens=0.10, sample_tokens=0.30),
        BIG: Price(train_tokens=4.0, prefill_tokens=1.0, sample_tokens=3.0),
    },
)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    path = tmp_path_factory.mktemp("chdb")
    led = Ledger.connect(f"chdb://{path}")
    led.ensure_schema()
    led.ensure_schema()  # idempotent
    yield led
    led.close()


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def event(
    tenant: str,
    meter: Meter = "train_tokens",
    tokens: int = 100,
    base_model: str = TINY,
    request_id: str | None = None,
    at: datetime = T0,
) -> UsageEvent:
    rid = request_id or uuid.uuid4().hex
    return UsageEvent(
        event_id=f"{rid}:{meter}",
        request_id=rid,
        tenant=tenant,
        base_model=base_model,
        meter=meter,
        tokens=tokens,
        run_id="s:train:0",
        occurred_at=at,
    )


def totals(ledger: Ledger, **query: object) -> dict[tuple[str, str, str], int]:
    report = ledger.report(UsageReportQuery.model_validate(query), PRICES)
    return {(r.tenant, r.base_model, r.meter): r.tokens for r in report.rows}


def test_report_sums_per_tenant_model_meter(ledger: Ledger) -> None:
    a = tenant()
    events = [
        event(a, "train_tokens", 100),
        event(a, "train_tokens", 50),
        event(a, "prefill_tokens", 7),
        event(a, "sample_tokens", 11, base_model=BIG),
        event(a, "sample_tokens", 1, base_model=BIG),
    ]
    assert ledger.insert(events) == 5
    report = ledger.report(UsageReportQuery(tenant=a), PRICES)
    assert [(r.base_model, r.meter, r.tokens) for r in report.rows] == [
        (BIG, "sample_tokens", 12),
        (TINY, "prefill_tokens", 7),
        (TINY, "train_tokens", 150),
    ]
    assert report.error is None


def test_duplicate_event_ids_count_once(ledger: Ledger) -> None:
    a = tenant()
    first = event(a, "sample_tokens", 40, request_id="req-1")
    other = event(a, "sample_tokens", 2, request_id="req-2")
    ledger.insert([first, first, other])  # duplicate inside one batch
    ledger.insert([first])  # redelivered later, in a separate insert (a separate part)
    ledger.insert([first.model_copy(), other])
    assert totals(ledger, tenant=a) == {(a, TINY, "sample_tokens"): 42}


def test_same_request_different_meters_are_distinct(ledger: Ledger) -> None:
    a = tenant()
    ledger.insert(
        [
            event(a, "prefill_tokens", 5, request_id="r"),
            event(a, "sample_tokens", 9, request_id="r"),
        ]
    )
    assert totals(ledger, tenant=a) == {
        (a, TINY, "prefill_tokens"): 5,
        (a, TINY, "sample_tokens"): 9,
    }


def test_tenant_filter_isolates_tenants(ledger: Ledger) -> None:
    a, b = tenant(), tenant()
    ledger.insert([event(a, tokens=10), event(b, tokens=20), event(b, tokens=1)])
    assert totals(ledger, tenant=a) == {(a, TINY, "train_tokens"): 10}
    assert totals(ledger, tenant=b) == {(b, TINY, "train_tokens"): 21}
    assert totals(ledger, tenant="no-such-tenant") == {}
    # A hostile tenant string is a bound value, not SQL.
    assert totals(ledger, tenant=f"{a}' OR 1=1 --") == {}
    everyone = totals(ledger)
    assert everyone[(a, TINY, "train_tokens")] == 10
    assert everyone[(b, TINY, "train_tokens")] == 21


def test_time_window_is_half_open(ledger: Ledger) -> None:
    a = tenant()
    ms = timedelta(milliseconds=1)
    ledger.insert(
        [
            event(a, tokens=1, at=T0 - ms),  # before since
            event(a, tokens=10, at=T0),  # exactly since: included
            event(a, tokens=100, at=T0 + timedelta(days=30) - ms),  # last ms: included
            event(a, tokens=1000, at=T0 + timedelta(days=30)),  # exactly until: excluded
        ]
    )
    key = (a, TINY, "train_tokens")
    until = T0 + timedelta(days=30)
    assert totals(ledger, tenant=a, since=T0, until=until) == {key: 110}
    assert totals(ledger, tenant=a, since=T0) == {key: 1110}
    assert totals(ledger, tenant=a, until=T0) == {key: 1}
    # Same instant in another zone: the window is absolute time, not wall-clock.
    est = timezone(timedelta(hours=-5))
    assert totals(ledger, tenant=a, since=T0.astimezone(est), until=until.astimezone(est)) == {
        key: 110
    }


def test_empty_window_is_a_user_error(ledger: Ledger) -> None:
    with pytest.raises(UserError):
        ledger.report(UsageReportQuery(since=T0, until=T0), PRICES)


def test_cost_from_price_table(ledger: Ledger) -> None:
    a = tenant()
    ledger.insert(
        [
            event(a, "train_tokens", 2_000_000),
            event(a, "sample_tokens", 500_000, base_model=BIG),
            event(a, "prefill_tokens", 1_000_000, base_model="unlisted/model"),
        ]
    )
    cost = {
        (r.base_model, r.meter): r.cost_usd
        for r in ledger.report(UsageReportQuery(tenant=a), PRICES).rows
    }
    assert cost[(TINY, "train_tokens")] == pytest.approx(0.80)
    assert cost[(BIG, "sample_tokens")] == pytest.approx(1.50)
    assert cost[("unlisted/model", "prefill_tokens")] == pytest.approx(1.0)  # default price


def test_empty_report(ledger: Ledger) -> None:
    assert ledger.insert([]) == 0
    report = ledger.report(UsageReportQuery(tenant=tenant()), PRICES)
    assert report.rows == [] and report.error is None
    assert (
        ledger.report(
            UsageReportQuery(
                since=datetime(1990, 1, 1, tzinfo=UTC),
                until=datetime(1990, 2, 1, tzinfo=UTC),
            ),
            PRICES,
        ).rows
        == []
    )


def test_ingest_20k_events_in_one_batch(ledger: Ledger) -> None:
    a = tenant()
    meters: tuple[Meter, ...] = ("train_tokens", "prefill_tokens", "sample_tokens")
    events = [event(a, meters[i % 3], 3, request_id=f"bulk-{i}") for i in range(20_000)]
    assert ledger.insert(events) == 20_000
    got = totals(ledger, tenant=a)
    assert sum(got.values()) == 60_000
    assert len(got) == 3


def test_connect_rejects_unknown_dsn() -> None:
    with pytest.raises(UserError):
        Ledger.connect("postgres://x")
    with pytest.raises(UserError):
        Ledger.connect("chdb://relative/path")


# ---------------------------------------------------------------- prices


def test_price_table_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(PRICES.to_dict()))
    loaded = PriceTable.from_json(path)
    assert loaded == PriceTable.from_dict(PRICES.to_dict())
    assert loaded.cost_usd(BIG, "train_tokens", 1_000_000) == pytest.approx(4.0)
    assert loaded.cost_usd("other", "sample_tokens", 1_000_000) == pytest.approx(1.0)


def test_default_table_prices_builtin_model() -> None:
    assert DEFAULT_PRICE_TABLE.cost_usd(TINY, "train_tokens", 1_000_000) == pytest.approx(0.40)
    assert DEFAULT_PRICE_TABLE.cost_usd(TINY, "prefill_tokens", 1_000_000) == pytest.approx(0.10)
    assert DEFAULT_PRICE_TABLE.cost_usd(TINY, "sample_tokens", 1_000_000) == pytest.approx(0.30)


@pytest.mark.parametrize(
    "bad",
    [
        {"models": {}},
        {"default": {"train_tokens": 1, "prefill_tokens": 1}},
        {"default": {"train_tokens": -1, "prefill_tokens": 1, "sample_tokens": 1}},
        {"default": {"train_tokens": 1, "prefill_tokens": 1, "sample_tokens": 1, "gpu_hours": 1}},
        {"default": {"train_tokens": 1, "prefill_tokens": 1, "sample_tokens": 1}, "extra": 1},
    ],
)
def test_price_table_rejects_bad_config(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PriceTable.from_dict(bad)
