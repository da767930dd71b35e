"""The usage ledger on the embedded ClickHouse engine (chdb), plus the price table.

chdb hosts one engine path per process, so the whole module shares one data directory and one
``Ledger``; each test writes under its own tenant names (``uuid``) and reports only those, so tests
stay independent without reopening the engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import OperationalError

from services.billing.ledger import HOURLY, Ledger, UsageColumns
from services.billing.prices import DEFAULT_PRICE_TABLE, Price, PriceTable
from whetstone.errors import Unavailable, UserError
from whetstone.messages import Meter, UsageEvent, UsageMeter, UsageReport, UsageReportQuery

REPO = Path(__file__).resolve().parents[2]
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
    assert cost[(TINY, "train_tokens")] == Decimal("0.80")
    assert cost[(BIG, "sample_tokens")] == Decimal("1.50")
    assert cost[("unlisted/model", "prefill_tokens")] == Decimal("1.0")  # default price


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
    assert loaded.cost(BIG, "train_tokens", 1_000_000) == Decimal(4)
    assert loaded.cost("other", "sample_tokens", 1_000_000) == Decimal(1)


def test_default_table_prices_builtin_model() -> None:
    assert DEFAULT_PRICE_TABLE.cost(TINY, "train_tokens", 1_000_000) == Decimal("0.40")
    assert DEFAULT_PRICE_TABLE.cost(TINY, "prefill_tokens", 1_000_000) == Decimal("0.10")
    assert DEFAULT_PRICE_TABLE.cost(TINY, "sample_tokens", 1_000_000) == Decimal("0.30")
    assert DEFAULT_PRICE_TABLE.cost(TINY, "checkpoints", 7) == 0  # free unless configured


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


# ---------------------------------------------------------------- roll-ups, grouping, exact money


def attributed(
    tenant: str, meter: UsageMeter, tokens: int, at: datetime, **fields: str
) -> UsageEvent:
    rid = uuid.uuid4().hex
    return UsageEvent.of(
        rid, tenant, fields.pop("base_model", TINY), meter, tokens, **fields
    ).model_copy(update={"occurred_at": at})


def test_rollups_and_raw_events_give_the_same_report(ledger: Ledger) -> None:
    a = tenant()
    events = [
        attributed(a, "train_tokens", 10 + i, T0 + timedelta(minutes=37 * i), run_id="s1:train:0")
        for i in range(120)  # three days and a bit, 37 minutes apart
    ]
    ledger.insert(events)
    since, until = T0, T0 + timedelta(days=4)
    daily = UsageReportQuery(tenant=a, since=since, until=until, group_by=["day"])
    hourly = daily.model_copy(update={"group_by": ["hour"]})
    raw = daily.model_copy(update={"since": since - timedelta(milliseconds=1)})
    assert Ledger._source(daily, daily.group_by) == "usage_daily"
    assert Ledger._source(hourly, hourly.group_by) == "usage_hourly"
    assert Ledger._source(raw, raw.group_by) == "usage_events"
    by_day = {r.bucket_start: r.tokens for r in ledger.report(daily, PRICES).rows}
    assert by_day == {r.bucket_start: r.tokens for r in ledger.report(raw, PRICES).rows}
    by_hour = ledger.report(hourly, PRICES).rows
    assert sum(r.tokens for r in by_hour) == sum(by_day.values()) == sum(e.tokens for e in events)
    assert len(by_hour) == len({e.occurred_at.replace(minute=0) for e in events})
    assert all(r.events >= 1 and r.tenant is None for r in by_hour)


def test_a_duplicate_older_than_the_recent_ids_is_reconciled(ledger: Ledger) -> None:
    a = tenant()
    day = T0 + timedelta(days=40)
    forgetful = Ledger(ledger._client, recent_ids=1)  # same tables, remembers one id
    first = attributed(a, "sample_tokens", 30, day + timedelta(hours=3))
    forgetful.insert([first])
    forgetful.insert([attributed(a, "sample_tokens", 5, day + timedelta(hours=4))])
    forgetful.insert([first])  # forgotten: reaches the table and its roll-ups again
    window = {"tenant": a, "since": day, "until": day + timedelta(days=1)}
    # A window off the hour reads the raw events, which count it once.
    exact = totals(ledger, tenant=a, since=day, until=day + timedelta(days=1, milliseconds=1))
    assert exact == {(a, TINY, "sample_tokens"): 35}
    assert totals(ledger, **window) == {(a, TINY, "sample_tokens"): 65}  # the roll-up twice
    assert ledger.reconcile(day, day + timedelta(days=1)) == 2  # one hourly, one daily row
    assert totals(ledger, **window) == {(a, TINY, "sample_tokens"): 35}
    assert ledger.reconcile(day, day + timedelta(days=1)) == 0


def test_filters_and_groupings(ledger: Ledger) -> None:
    a = tenant()
    at = T0 + timedelta(days=60)
    ledger.insert(
        [
            attributed(a, "train_tokens", 100, at, run_id="s1:train:0", api_key_id="k1"),
            attributed(a, "forward_tokens", 20, at, run_id="s1:train:0", api_key_id="k1"),
            attributed(a, "train_tokens", 7, at, run_id="s2:train:0", api_key_id="k2"),
            attributed(
                a,
                "prefill_tokens",
                3,
                at,
                sampler_id="s2:sample:0",
                session_id="s2",
                api_key_id="k2",
                base_model=BIG,
            ),
            attributed(a, "checkpoints", 1, at, run_id="s1:train:0", api_key_id="k1"),
            attributed(a, "checkpoint_bytes", 4096, at, run_id="s1:train:0", api_key_id="k1"),
        ]
    )

    def report(**q: object) -> list[tuple[object, ...]]:
        rows = ledger.report(UsageReportQuery(tenant=a, **q), PRICES).rows  # type: ignore[arg-type]
        return [
            tuple(
                v
                for v in r.model_dump(exclude={"cost_usd", "unit_price_usd", "events"}).values()
                if v is not None
            )
            for r in rows
        ]

    # The sampling event has no run: its group comes first, with no run named.
    assert report(group_by=["run"]) == [(3,), ("s1:train:0", 4217), ("s2:train:0", 7)]
    assert report(group_by=["key", "meter"], api_key_id="k2") == [
        ("prefill_tokens", "k2", 3),
        ("train_tokens", "k2", 7),
    ]
    assert report(group_by=["session"]) == [("s1", 4217), ("s2", 10)]  # from the run ids
    assert report(group_by=["sampler"], run_id="s2:sample:0") == [("s2:sample:0", 3)]
    assert report(group_by=["model"], base_model=BIG) == [(BIG, 3)]
    assert report(group_by=["month"], meter="checkpoints") == [(at.replace(day=1), 1)]
    free = ledger.report(UsageReportQuery(tenant=a, group_by=["meter"]), PRICES).rows
    assert {r.meter: r.cost_usd for r in free}["checkpoint_bytes"] == 0


def test_prices_apply_from_their_date_and_money_is_exact(ledger: Ledger) -> None:
    a = tenant()
    day = datetime(2025, 7, 1, tzinfo=UTC)
    prices = PriceTable.from_dict(
        json.loads(
            """{"default": {"train_tokens": 1, "prefill_tokens": 1, "sample_tokens": 1},
                "models": {"whetstone/tiny-qwen3": [
                  {"from": "2025-07-02", "train_tokens": 0.3, "prefill_tokens": 1,
                   "sample_tokens": 1},
                  {"from": "2020-01-01", "train_tokens": 0.1, "prefill_tokens": 1,
                   "sample_tokens": 1}]}}""",
            parse_float=Decimal,
        )
    )
    # 0.1 and 0.3 have no exact float: a float sum would drift, Decimal must not.
    ledger.insert(
        [attributed(a, "train_tokens", 333_333, day + timedelta(minutes=i)) for i in range(30)]
    )
    ledger.insert(
        [attributed(a, "train_tokens", 1, day + timedelta(days=1, hours=i)) for i in range(10)]
    )
    report = ledger.report(UsageReportQuery(tenant=a, group_by=["price"]), prices)
    assert [(r.unit_price_usd, r.tokens) for r in report.rows] == [
        (Decimal("0.1"), 9_999_990),
        (Decimal("0.3"), 10),
    ]
    expected = Decimal("0.1") * 9_999_990 / 10**6 + Decimal("0.3") * 10 / 10**6
    assert report.total_cost_usd == expected == Decimal("1.000002")
    single = ledger.report(UsageReportQuery(tenant=a), prices)
    assert single.rows[0].unit_price_usd is None  # two prices in one row
    assert single.total_cost_usd == expected
    assert UsageReport.decode(single.encode()).total_cost_usd == expected  # exact over the wire


def test_schema_migrates_from_the_first_release(tmp_path: Path) -> None:
    """A ledger made by the first schema (one table, no roll-ups) gains the new columns and
    roll-ups back-filled from its events. Runs in a child: one chdb engine per process."""
    script = f"""
import clickhouse_connect
from services.billing.ledger import MIGRATIONS, Ledger
from services.billing.prices import DEFAULT_PRICE_TABLE
from whetstone.messages import UsageReportQuery
client = clickhouse_connect.get_client(dsn="chdb://{tmp_path}")
client.command("CREATE DATABASE whetstone")
client.command(MIGRATIONS[0][1][0])
client.command("INSERT INTO whetstone.usage_events (event_id, request_id, tenant, base_model, "
               "meter, tokens, run_id, occurred_at) VALUES ('r:train_tokens', 'r', 'old', "
               "'whetstone/tiny-qwen3', 'train_tokens', 1000, 's:train:0', '2024-05-01 10:00:00')")
ledger = Ledger(client)
print(ledger.ensure_schema())
print(ledger.ensure_schema(), ledger.schema_version())
q = UsageReportQuery(tenant="old", since="2024-05-01T00:00:00Z", until="2024-05-02T00:00:00Z")
print(ledger._source(q, q.group_by), [r.tokens for r in ledger.report(q, DEFAULT_PRICE_TABLE).rows])
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.splitlines()
    assert out == [
        # The first step finds its table there already: recorded, nothing changed.
        "['usage events', 'attribution: session, sampler, API key, operation', "
        "'hourly and daily roll-ups', 'roll-up views sum each insert']",
        "[] 4",
        "usage_daily [1000]",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"default": []},
        {"default": [{"train_tokens": 1, "prefill_tokens": 1, "sample_tokens": 1}]},  # no date
        {
            "default": [
                {"from": "2025-01-01", "train_tokens": 1, "prefill_tokens": 1, "sample_tokens": 1},
                {"from": "2025-01-01", "train_tokens": 2, "prefill_tokens": 1, "sample_tokens": 1},
            ]
        },
        {"default": {"train_tokens": "x", "prefill_tokens": 1, "sample_tokens": 1}},
        {"default": {"train_tokens": "NaN", "prefill_tokens": 1, "sample_tokens": 1}},
    ],
)
def test_dated_price_tables_reject_mistakes(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PriceTable.from_dict(bad)


def test_forward_and_cached_prefill_default_to_the_prefill_price() -> None:
    price = Price.from_dict({"train_tokens": 3, "prefill_tokens": "0.25", "sample_tokens": 1})
    assert price.per_unit("forward_tokens") == price.per_unit("cached_prefill_tokens")
    assert price.per_unit("forward_tokens") == Decimal("0.25")
    assert price.per_unit("checkpoints") == price.per_unit("checkpoint_bytes") == 0


def test_columns_insert_drops_duplicates_like_events(ledger: Ledger) -> None:
    a = tenant()
    events = [event(a, tokens=7, request_id=f"col-{i}") for i in range(10)]
    batch = UsageColumns.of([*events, events[0]])  # a duplicate within the batch
    assert ledger.insert_columns(batch) == 10
    assert ledger.insert_columns(batch) == 0  # all recent
    assert ledger.insert(events[:3]) == 0  # the object path shares the recent ids
    assert totals(ledger, tenant=a) == {(a, TINY, "train_tokens"): 70}


def test_views_write_one_row_per_key_and_bucket_per_insert(ledger: Ledger) -> None:
    """Migration 4: the roll-up views sum each insert, so 50 events of one session in one hour
    become one hourly row (not 50 rows left for merges to sum)."""
    a = tenant()
    at = T0 + timedelta(days=60)
    ledger.insert([event(a, tokens=2, at=at + timedelta(seconds=i)) for i in range(50)])
    rows = ledger._client.query(
        f"SELECT count(), sum(quantity), sum(events) FROM whetstone.{HOURLY} "
        "WHERE tenant = {t:String}",
        parameters={"t": a},
    ).result_rows
    assert [tuple(r) for r in rows] == [(1, 100, 50)]


def test_schema_migrates_from_views_per_event(tmp_path: Path) -> None:
    """A ledger of the previous release (views writing a row per event) keeps its roll-ups and
    gets the summing views; its old rows and the new ones report together. A child process:
    one chdb engine per process."""
    script = f"""
from datetime import datetime, timezone
from services.billing.ledger import HOURLY, Ledger
from services.billing.prices import DEFAULT_PRICE_TABLE
from whetstone.messages import UsageEvent, UsageReportQuery
ledger = Ledger.connect("chdb://{tmp_path}")
at = datetime(2025, 3, 1, 10, tzinfo=timezone.utc)
def ev(i):
    e = UsageEvent.of(f"r{{i}}", "old", "whetstone/tiny-qwen3", "train_tokens", 10, "s:train:0")
    return e.model_copy(update={{"occurred_at": at}})
print(ledger.ensure_schema(upto=3))
ledger._client.command("SYSTEM STOP MERGES")  # the rows as the views wrote them
ledger.insert([ev(i) for i in range(4)])
print(ledger.ensure_schema(), ledger.schema_version())
ledger.insert([ev(i) for i in range(10)])
rows = ledger._client.query(f"SELECT count() FROM whetstone.{{HOURLY}}").result_rows
q = UsageReportQuery(tenant="old", since="2025-03-01T00:00:00Z", until="2025-03-02T00:00:00Z")
print(rows[0][0], [(r.tokens, r.events) for r in ledger.report(q, DEFAULT_PRICE_TABLE).rows])
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.splitlines()
    assert out == [
        "['usage events', 'attribution: session, sampler, API key, operation', "
        "'hourly and daily roll-ups']",
        "['roll-up views sum each insert'] 4",
        "5 [(100, 10)]",  # four rows from the old views, one from the new; each token once
    ]


class _RecordingClient:
    """A stand-in for clickhouse-connect's client: records each usage insert's event ids, and
    fails the inserts numbered in ``failing`` (from 1) as an unreachable server does."""

    def __init__(self, failing: frozenset[int] = frozenset()) -> None:
        self.inserted: list[list[str]] = []
        self.failing = failing
        self.calls = 0

    def insert(self, table: str, data: list[list[object]], **_: object) -> None:
        self.calls += 1
        if self.calls in self.failing:
            raise OperationalError("connection refused")
        self.inserted.append([str(v) for v in data[0]])  # event_id, column-oriented


def _ids(*ids: str) -> UsageColumns:
    return UsageColumns.of([event("t", request_id=i) for i in ids])


def test_recent_ids_drop_duplicates_within_and_across_inserts() -> None:
    client = _RecordingClient()
    led = Ledger(client, recent_ids=100)  # type: ignore[arg-type]
    assert led.insert_columns(_ids("a", "b", "a", "c", "b")) == 3  # repeats within one insert
    assert led.insert_columns(_ids("d", "a", "e", "d")) == 2  # one seen before, one repeated
    assert led.insert_columns(_ids("a", "b", "c", "d", "e")) == 0  # a redelivery of all
    assert led.insert_columns(_ids("b", "g", "g")) == 1  # a redelivery carrying a new id
    assert led.insert_columns(_ids("f")) == 1  # the fast path still works after the slow one
    assert led.insert_columns(_ids("g", "f")) == 0
    assert client.inserted == [
        ["a:train_tokens", "b:train_tokens", "c:train_tokens"],
        ["d:train_tokens", "e:train_tokens"],
        ["g:train_tokens"],
        ["f:train_tokens"],
    ]


class _Colliding(str):
    """An id whose hash equals every other's: the worst case of a hash-based filter."""

    def __hash__(self) -> int:
        return 0


def test_distinct_ids_with_equal_hashes_are_all_kept() -> None:
    client = _RecordingClient()
    led = Ledger(client)  # type: ignore[arg-type]
    batch = _ids("x", "y")
    batch.event_id = [_Colliding(i) for i in batch.event_id]
    assert led.insert_columns(batch) == 2
    again = _ids("z", "x")
    again.event_id = [_Colliding(i) for i in again.event_id]
    assert led.insert_columns(again) == 1  # z is new although its hash is x's; x is not
    assert client.inserted == [["x:train_tokens", "y:train_tokens"], ["z:train_tokens"]]


def test_a_failed_insert_leaves_its_ids_unseen() -> None:
    """The ids enter the recent set before the insert (the fast path); an insert that fails
    takes them out again, so the redelivered batch is written, not dropped as a duplicate."""
    client = _RecordingClient(failing=frozenset({1, 3}))
    led = Ledger(client)  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        led.insert_columns(_ids("a", "b"))  # all new: the fast path
    assert led.insert_columns(_ids("c")) == 1
    with pytest.raises(Unavailable):
        led.insert_columns(_ids("c", "d"))  # one seen: the slow path
    assert led.insert_columns(_ids("a", "b", "c", "d")) == 3
    assert client.inserted == [
        ["c:train_tokens"],
        ["a:train_tokens", "b:train_tokens", "d:train_tokens"],
    ]


def test_recent_ids_forget_whole_inserts_oldest_first() -> None:
    client = _RecordingClient()
    led = Ledger(client, recent_ids=3)  # type: ignore[arg-type]
    led.insert_columns(_ids("a", "b"))
    led.insert_columns(_ids("c", "d"))  # the newer insert alone does not hold 3 ids: a, b kept
    assert led.insert_columns(_ids("a", "c")) == 0
    led.insert_columns(_ids("e"))  # c, d, e hold 3: a and b forgotten together
    assert led.insert_columns(_ids("a", "b", "c", "d", "e")) == 2
    assert client.inserted[-1] == ["a:train_tokens", "b:train_tokens"]
