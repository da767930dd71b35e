"""The usage ledger: usage events in ClickHouse, their hourly and daily roll-ups, and reports.

Billing is the one writer per database (architecture.md §1). The ledger stores facts (quantities
per event), never money: ``report`` prices them with a ``PriceTable`` at read time, in ``Decimal``.

Tables (database ``whetstone``, created and migrated by ``ensure_schema`` at every start-up; the
applied steps are recorded in ``schema_migrations``, so a later release adds steps, never edits
one):

* ``usage_events``: one row per event, the truth. A ``ReplacingMergeTree`` whose sorting key ends
  in ``event_id`` (``<request_id>:<meter>``); raw reads use ``FINAL``, so a duplicate never counts
  twice, merged or not. No partition key: ``FINAL`` deduplicates only within a partition, and a
  re-emitted event whose ``occurred_at`` moved across a month would otherwise count twice.
* ``usage_hourly`` and ``usage_daily``: ``SummingMergeTree`` roll-ups per UTC hour and day and per
  (tenant, base model, meter, API key, session, run, sampler), filled by materialized views on
  every insert into ``usage_events``; since migration 4 each view sums the insert (GROUP BY), so
  it writes a row per key and bucket rather than per event. Reports whose window and grouping
  align with a roll-up read it (a month over ten million events is ~90k daily rows), the rest
  read the raw table.

Exactly once in the roll-ups. A materialized view sees every insert, duplicates included, so the
ledger drops duplicates before inserting: within the batch, and against the ids it inserted
recently (at least ``recent_ids``, loaded back from the table at start-up), which covers
redelivery and replays. A duplicate older than that still counts once in ``usage_events``;
``reconcile`` compares the roll-ups with the raw table over a window and writes the difference
as correction rows (quantities are signed for this), which billing runs at start-up and
periodically. Migration 3 uses the same function to back-fill roll-ups of existing events.

One client for both deployments. ``Ledger.connect`` takes ``chdb:///abs/path`` (the embedded
engine, the default for ``whetstone up`` and tests) or ``http://host:port`` (a ClickHouse
server); clickhouse-connect speaks the same SQL to both.

Threading. The client is synchronous. chdb runs in-process, allows ONE process per data
directory and one engine path per process; clickhouse-connect serialises calls on one client. The
async service calls the ledger from one worker thread, never on the event loop.

Every user-supplied value reaches SQL as a bound query parameter (``{name:Type}``), never by
string formatting; only constant fragments chosen from fixed tables are formatted in. Time bounds
travel as epoch milliseconds: clickhouse-connect formats bound ``datetime`` values to whole
seconds in the server's time zone, which would shift and truncate the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import chain

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from services.billing.prices import UNITS, PriceTable
from whetstone.errors import Unavailable, UserError
from whetstone.messages import GroupBy, UsageEvent, UsageReport, UsageReportQuery, UsageRow

DATABASE = "whetstone"
TABLE = "usage_events"
HOURLY = "usage_hourly"
DAILY = "usage_daily"
COLUMNS: tuple[str, ...] = (
    "event_id",
    "request_id",
    "tenant",
    "base_model",
    "meter",
    "tokens",
    "run_id",
    "occurred_at",
    "session_id",
    "sampler_id",
    "api_key_id",
    "operation",
)
# The types ``insert`` declares for COLUMNS, so that clickhouse-connect neither asks the table for
# them (a query per insert) nor builds LowCardinality dictionaries in Python: ClickHouse converts
# a Native ``String`` column to the table's ``LowCardinality(String)`` as it reads the block.
_INSERT_TYPES: tuple[str, ...] = (
    "String",
    "String",
    "String",
    "String",
    "String",
    "UInt64",
    "String",
    "DateTime64(3, 'UTC')",
    "String",
    "String",
    "String",
    "String",
)
# The roll-ups' dimensions besides the bucket, and the report grouping that names each.
ROLLUP_DIMS: tuple[str, ...] = (
    "tenant",
    "base_model",
    "meter",
    "api_key_id",
    "session_id",
    "run_id",
    "sampler_id",
)
DIM_OF: dict[GroupBy, str] = {
    "tenant": "tenant",
    "model": "base_model",
    "meter": "meter",
    "key": "api_key_id",
    "session": "session_id",
    "run": "run_id",
    "sampler": "sampler_id",
}
DEFAULT_RECENT_IDS = 1_000_000
# Settings of every usage insert (query-level, so a ClickHouse server takes them too):
# * ``optimize_on_insert = 0``: the engine does not collapse equal keys of the block while writing
#   it (half the engine's work per insert, measured in bench_billing.py). Nothing to collapse:
#   the ledger drops duplicate ids before it inserts, the views sum each insert (migration 4), and
#   every read sums or uses ``FINAL`` anyway; merges collapse what remains.
# * ``parallel_view_processing = 1``: the two roll-up views are fed concurrently, on two cores.
INSERT_SETTINGS: dict[str, int] = {"optimize_on_insert": 0, "parallel_view_processing": 1}

_DIMS = ", ".join(ROLLUP_DIMS)
_ROLLUP_COLUMNS = """
    tenant      LowCardinality(String),
    bucket      DateTime('UTC'),
    base_model  LowCardinality(String),
    meter       LowCardinality(String),
    api_key_id  String,
    session_id  String,
    run_id      String,
    sampler_id  String,
    quantity    Int64,
    events      Int64
"""
_BUCKET = {
    HOURLY: "toDateTime(toStartOfHour(occurred_at), 'UTC')",
    DAILY: "toDateTime(toStartOfDay(occurred_at), 'UTC')",
}


def _rollup_query(table: str) -> str:
    """The view's query since migration 4: each insert's events summed per roll-up key, so the
    view writes one row per key and bucket, not one per event."""
    return (
        f"SELECT tenant, {_BUCKET[table]} AS bucket, base_model, meter, api_key_id, session_id, "
        f"run_id, sampler_id, toInt64(sum(tokens)) AS quantity, toInt64(count()) AS events "
        f"FROM {DATABASE}.{TABLE} GROUP BY tenant, bucket, {_DIMS.removeprefix('tenant, ')}"
    )


def _rollup(table: str) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {DATABASE}.{table} ({_ROLLUP_COLUMNS}) "
        f"ENGINE = SummingMergeTree((quantity, events)) "
        f"ORDER BY (tenant, bucket, base_model, meter, api_key_id, session_id, run_id, sampler_id)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.{table}_mv TO {DATABASE}.{table} AS "
        f"SELECT tenant, {_BUCKET[table]} AS bucket, base_model, meter, api_key_id, session_id, "
        f"run_id, sampler_id, toInt64(tokens) AS quantity, toInt64(1) AS events "
        f"FROM {DATABASE}.{TABLE}",
    ]


# ``inserted_at`` is the ReplacingMergeTree version: of two copies of one event the later insert
# wins. Copies are identical in practice (deterministic ids), so this only makes the choice stable.
MIGRATIONS: tuple[tuple[str, list[str]], ...] = (
    (
        "usage events",
        [
            f"""CREATE TABLE IF NOT EXISTS {DATABASE}.{TABLE}
            (
                event_id    String,
                request_id  String,
                tenant      LowCardinality(String),
                base_model  LowCardinality(String),
                meter       LowCardinality(String),
                tokens      UInt64,
                run_id      String,
                occurred_at DateTime64(3, 'UTC'),
                inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree(inserted_at)
            ORDER BY (tenant, base_model, meter, event_id)"""
        ],
    ),
    (
        "attribution: session, sampler, API key, operation",
        [
            f"ALTER TABLE {DATABASE}.{TABLE} "
            "ADD COLUMN IF NOT EXISTS session_id String DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS sampler_id String DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS api_key_id String DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS operation LowCardinality(String) DEFAULT ''"
        ],
    ),
    ("hourly and daily roll-ups", [*_rollup(HOURLY), *_rollup(DAILY)]),
    (
        "roll-up views sum each insert",
        [f"ALTER TABLE {DATABASE}.{t}_mv MODIFY QUERY {_rollup_query(t)}" for t in (HOURLY, DAILY)],
    ),
)

_MIGRATIONS_TABLE = f"""CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations
(
    version    UInt32,
    name       String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree ORDER BY version"""


def _utc(ts: datetime) -> datetime:
    """Aware UTC datetime; a naive one is taken to be UTC already (what every producer sends)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _epoch_ms(ts: datetime) -> int:
    """Whole milliseconds since the epoch, exactly (truncated, as ``DateTime64(3)`` stores)."""
    return ((ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)) - _EPOCH) // _MS


def _aligned(ts: datetime | None, grain: str) -> bool:
    if ts is None:
        return True
    t = _utc(ts)
    on_hour = t.minute == 0 and t.second == 0 and t.microsecond == 0
    return on_hour and (grain == "hour" or t.hour == 0)


def _period(bucket: str, changes: Sequence[datetime]) -> str:
    """SQL for the start of the price period that holds ``bucket``: the latest price change at
    or before it, or the epoch. The dates are the operator's price table, never user input."""
    if not changes:
        return "toDateTime(0, 'UTC')"
    starts = [f"toDateTime({int(d.timestamp())}, 'UTC')" for d in reversed(changes)]
    arms = [f"{bucket} >= {start}, {start}" for start in starts]
    return f"multiIf({', '.join(arms)}, toDateTime(0, 'UTC'))"


@dataclass
class UsageColumns:
    """Usage events column by column (``COLUMNS``' order, absent values as ``""``, times as epoch
    milliseconds): what ``insert_columns`` writes, and what a producer of many events (the
    benchmark, a bulk import) builds without an object per event."""

    event_id: list[str]
    request_id: list[str]
    tenant: list[str]
    base_model: list[str]
    meter: list[str]
    tokens: list[int]
    run_id: list[str]
    occurred_at_ms: list[int]
    session_id: list[str]
    sampler_id: list[str]
    api_key_id: list[str]
    operation: list[str]

    @classmethod
    def of(cls, events: Sequence[UsageEvent]) -> UsageColumns:
        return cls(
            event_id=[e.event_id for e in events],
            request_id=[e.request_id for e in events],
            tenant=[e.tenant for e in events],
            base_model=[e.base_model for e in events],
            meter=[e.meter for e in events],
            tokens=[e.tokens for e in events],
            run_id=[e.run_id or "" for e in events],
            occurred_at_ms=[_epoch_ms(e.occurred_at) for e in events],
            session_id=[e.session_id or "" for e in events],
            sampler_id=[e.sampler_id or "" for e in events],
            api_key_id=[e.api_key_id or "" for e in events],
            operation=[e.operation or "" for e in events],
        )

    def __len__(self) -> int:
        return len(self.event_id)

    def columns(self) -> list[list[str] | list[int]]:
        return [getattr(self, f.name) for f in fields(self)]

    def take(self, rows: Sequence[int]) -> UsageColumns:
        return UsageColumns(*([column[i] for i in rows] for column in self.columns()))  # type: ignore[arg-type]


@dataclass
class _Group:
    tokens: int = 0
    events: int = 0
    cost: Decimal = Decimal(0)
    unit_prices: set[Decimal] = field(default_factory=set)


class Ledger:
    """Usage events in, usage reports out, over one clickhouse-connect client.

    Synchronous by design (see the module docstring): call it from a thread.
    """

    def __init__(
        self,
        client: Client,
        recent_ids: int = DEFAULT_RECENT_IDS,
        insert_settings: dict[str, int] | None = None,
    ) -> None:
        self._client = client
        self._recent_limit = recent_ids
        self.insert_settings = dict(INSERT_SETTINGS if insert_settings is None else insert_settings)
        # The ids inserted recently: a set to look up, and the inserts' ids oldest first, to
        # forget whole inserts once the newer ones hold ``recent_ids``.
        self._recent: set[str] = set()
        self._recent_order: deque[list[str]] = deque()
        self._recent_count = 0

    @classmethod
    def connect(cls, dsn: str, recent_ids: int = DEFAULT_RECENT_IDS) -> Ledger:
        """Open ``chdb:///abs/path`` (embedded) or ``http(s)://host:port`` (server).

        No default database is selected on the connection: ``whetstone`` may not exist until
        ``ensure_schema`` runs, so every statement names it explicitly.
        """
        if dsn.startswith("chdb:"):
            path = dsn.removeprefix("chdb://")
            if not path.startswith("/"):
                raise UserError(
                    f"chdb DSN must name an absolute directory (chdb:///abs/path), got {dsn!r}"
                )
        elif not dsn.startswith(("http://", "https://")):
            raise UserError(
                f"ledger DSN must be chdb:///abs/path or http(s)://host:port, got {dsn!r}"
            )
        try:
            client = clickhouse_connect.get_client(dsn=dsn)
        except OperationalError as e:
            raise Unavailable(f"cannot reach ClickHouse at {dsn}: {e}") from e
        return cls(client, recent_ids)

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- schema

    def ensure_schema(self, upto: int | None = None) -> list[str]:
        """Create and migrate the schema; safe at every start-up. Returns the steps applied now.
        ``upto`` stops after that version (an older release's schema, for tests and benchmarks).

        Each step's statements are idempotent (``IF NOT EXISTS``), so a step interrupted before
        its version was recorded runs again harmlessly; the roll-ups are back-filled by
        ``reconcile``, which writes only differences.
        """
        self._command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
        self._command(_MIGRATIONS_TABLE)
        done = {int(v) for (v,) in self._query(f"SELECT version FROM {DATABASE}.schema_migrations")}
        applied: list[str] = []
        for version, (name, statements) in enumerate(MIGRATIONS[:upto], start=1):
            if version in done:
                continue
            for sql in statements:
                self._command(sql)
            if name == "hourly and daily roll-ups":
                self.reconcile()
            self._client.insert(
                "schema_migrations",
                [[version, name]],
                column_names=["version", "name"],
                database=DATABASE,
            )
            applied.append(name)
        self._load_recent_ids()
        return applied

    def schema_version(self) -> int:
        rows = self._query(f"SELECT max(version) FROM {DATABASE}.schema_migrations")
        return int(rows[0][0]) if rows else 0

    def _load_recent_ids(self) -> None:
        rows = self._query(
            f"SELECT event_id FROM {DATABASE}.{TABLE} ORDER BY inserted_at DESC LIMIT {{n:UInt64}}",
            {"n": self._recent_limit},
        )
        ids = [event_id for (event_id,) in reversed(rows)]
        self._recent_order, self._recent, self._recent_count = deque([ids]), set(ids), len(ids)

    # ---------------------------------------------------------------- writing

    def insert(self, events: Sequence[UsageEvent]) -> int:
        """Write the events not seen before in ONE insert; return how many rows were written.

        One insert per batch matters: each insert writes a part in each of the three tables
        (~16 ms under chdb however small, and each part is merged again later), so billing
        gathers a large batch of bus messages (``BillingSettings.batch_size``), inserts, then
        acknowledges them.
        """
        return self.insert_columns(UsageColumns.of(events)) if events else 0

    def insert_columns(self, batch: UsageColumns) -> int:
        """``insert`` for events given column by column; the same deduplication by id.

        The usual batch is all new: its ids go into the recent set in one ``update``, and the set
        growing by the batch's length proves every id new and distinct (one hash and one probe
        per id, the real ids compared, no false positive possible). Otherwise each id is checked
        in turn: at once when the first id was seen (a redelivery), else after the set is rebuilt
        from the inserts' id lists (an id repeated, or seen further into the batch; rare).
        """
        if not len(batch):
            return 0
        recent = self._recent
        if batch.event_id[0] not in recent:  # else most likely a redelivery: check id by id
            before = len(recent)
            recent.update(batch.event_id)
            if len(recent) - before == len(batch):
                try:
                    self._write(batch)
                except BaseException:
                    recent.difference_update(batch.event_id)  # not written: not seen
                    raise
                self._remember(batch.event_id)
                return len(batch)
            self._recent = recent = set(chain.from_iterable(self._recent_order))
        seen: set[str] = set()
        keep = []
        for i, event_id in enumerate(batch.event_id):
            if event_id not in recent and event_id not in seen:
                seen.add(event_id)
                keep.append(i)
        if not keep:
            return 0
        fresh = batch.take(keep)
        self._write(fresh)
        recent |= seen
        self._remember(fresh.event_id)
        return len(fresh)

    def _write(self, batch: UsageColumns) -> None:
        # Column by column (what the Native format sends) with declared types: no per-row lists,
        # no type query, no conversion in the client. (Arrow costs the same here: bench_billing.)
        try:
            self._client.insert(
                TABLE,
                batch.columns(),
                column_names=list(COLUMNS),
                column_type_names=list(_INSERT_TYPES),
                column_oriented=True,
                database=DATABASE,
                settings=self.insert_settings,
            )
        except (OperationalError, ClickHouseError) as e:
            raise Unavailable(f"usage insert failed: {e}") from e

    def _remember(self, ordered: list[str]) -> None:
        """Keep this insert's ids (already in the recent set) and forget whole old inserts once
        the newer ones hold ``recent_ids``."""
        self._recent_order.append(list(ordered))  # a copy: the caller may reuse its batch
        self._recent_count += len(ordered)
        while (
            len(self._recent_order) > 1
            and self._recent_count - len(self._recent_order[0]) >= self._recent_limit
        ):
            oldest = self._recent_order.popleft()
            self._recent_count -= len(oldest)
            self._recent.difference_update(oldest)

    def reconcile(self, since: datetime | None = None, until: datetime | None = None) -> int:
        """Make the roll-ups equal the raw table over ``[since, until)`` (UTC days; open bounds
        allowed) by writing correction rows; returns how many were written."""
        if not (_aligned(since, "day") and _aligned(until, "day")):
            raise UserError("reconcile windows must start and end at UTC midnights")
        written = 0
        for table in (HOURLY, DAILY):
            raw_where, params = self._window("occurred_at", since, until)
            rollup_where, _ = self._window("bucket", since, until)
            # Read the differences, then write them: one statement would do, but the written rows
            # are not reported by every engine, and the count is the reconciliation's result.
            diff = self._query(
                f"""SELECT {_DIMS}, bucket, r.quantity - h.quantity, r.events - h.events
                FROM (
                    SELECT {_DIMS}, {_BUCKET[table]} AS bucket,
                           toInt64(sum(tokens)) AS quantity, toInt64(count()) AS events
                    FROM {DATABASE}.{TABLE} FINAL WHERE 1 = 1{raw_where}
                    GROUP BY {_DIMS}, bucket
                ) AS r
                FULL OUTER JOIN (
                    SELECT {_DIMS}, bucket, sum(quantity) AS quantity, sum(events) AS events
                    FROM {DATABASE}.{table} WHERE 1 = 1{rollup_where}
                    GROUP BY {_DIMS}, bucket
                ) AS h USING ({_DIMS}, bucket)
                WHERE r.quantity != h.quantity OR r.events != h.events""",
                params,
            )
            if diff:
                columns = [*ROLLUP_DIMS, "bucket", "quantity", "events"]
                try:
                    self._client.insert(table, diff, column_names=columns, database=DATABASE)
                except (OperationalError, ClickHouseError) as e:
                    raise Unavailable(f"roll-up correction failed: {e}") from e
            written += len(diff)
        return written

    # ---------------------------------------------------------------- reading

    def report(self, query: UsageReportQuery, prices: PriceTable) -> UsageReport:
        """Quantities and exact costs over ``[since, until)``, filtered and grouped as asked.

        Each bucket (an hour or a day) is priced with the price in effect at its start, so a
        price change on a date applies from that date on. Rows are sorted by time bucket, then
        tenant, base model, meter and the other dimensions.
        """
        if query.since is not None and query.until is not None and query.since >= query.until:
            raise UserError(
                f"empty time window: since {query.since} is not before until {query.until}"
            )
        group_by = list(dict.fromkeys(query.group_by))
        source = self._source(query, group_by)
        dims = [DIM_OF[g] for g in group_by if g in DIM_OF]
        sql_dims = list(dict.fromkeys([*dims, "base_model", "meter"]))
        if source == TABLE:
            bucket = _BUCKET[HOURLY]
            quantity, events = "sum(tokens)", "count()"
            table, time_column = f"{DATABASE}.{TABLE} FINAL", "occurred_at"
        else:
            bucket, quantity, events = "bucket", "sum(quantity)", "sum(events)"
            table, time_column = f"{DATABASE}.{source}", "bucket"
        where, params = self._filters(query, time_column)
        time_grain = next((g for g in group_by if g in ("hour", "day", "month")), None)
        # The time column each SQL row carries: the asked-for bucket (prices are constant within
        # an hour or a day), or, for a month or no time at all, the start of the price period
        # (the last price change at or before the bucket), so that SQL returns few rows.
        if time_grain == "hour":
            when = bucket
        elif time_grain == "day":
            when = f"toDateTime(toStartOfDay({bucket}), 'UTC')"
        else:
            when = _period(bucket, prices.change_dates())
        columns = [*sql_dims, f"{when} AS w"]
        if time_grain == "month":
            columns.append(f"toDateTime(toStartOfMonth({bucket}), 'UTC') AS m")
        keys = [*sql_dims, "w", *(["m"] if time_grain == "month" else [])]
        sql = (
            f"SELECT {', '.join(columns)}, {quantity} AS q, {events} AS e "
            f"FROM {table} WHERE 1 = 1{where} GROUP BY {', '.join(keys)}"
        )
        groups: dict[tuple[object, ...], _Group] = {}
        for row in self._query(sql, params):
            values = dict(zip(sql_dims, row[: len(sql_dims)], strict=True))
            at, q, e = _utc(row[len(sql_dims)]), int(row[-2]), int(row[-1])
            if q == 0 and e == 0:
                continue  # a reconciled-away group
            b_start = _utc(row[-3]) if time_grain == "month" else at
            meter, model = values["meter"], values["base_model"]
            unit_price = prices.price_for(model, at).per_unit(meter)
            key = (
                b_start if time_grain else None,
                *(values[d] for d in dims),
                unit_price if "price" in group_by else None,
            )
            g = groups.setdefault(key, _Group())
            g.tokens += q
            g.events += e
            g.cost += unit_price * q / UNITS[meter]
            g.unit_prices.add(unit_price)
        rows = [self._row(key, dims, g) for key, g in sorted(groups.items(), key=_sort_key)]
        return UsageReport(rows=rows, total_cost_usd=sum((r.cost_usd for r in rows), Decimal(0)))

    @staticmethod
    def _row(key: tuple[object, ...], dims: list[str], g: _Group) -> UsageRow:
        named = {d: (v or None) for d, v in zip(dims, key[1:-1], strict=True)}
        return UsageRow.model_validate(
            {
                **named,
                "bucket_start": key[0],
                "tokens": g.tokens,
                "events": g.events,
                "cost_usd": g.cost,
                "unit_price_usd": next(iter(g.unit_prices)) if len(g.unit_prices) == 1 else None,
            }
        )

    @staticmethod
    def _source(query: UsageReportQuery, group_by: list[GroupBy]) -> str:
        """The coarsest table that answers exactly: daily, hourly or the raw events."""
        if "hour" not in group_by and all(_aligned(t, "day") for t in (query.since, query.until)):
            return DAILY
        if all(_aligned(t, "hour") for t in (query.since, query.until)):
            return HOURLY
        return TABLE

    def _filters(self, query: UsageReportQuery, time_column: str) -> tuple[str, dict[str, object]]:
        where, params = self._window(time_column, query.since, query.until)
        for name, column in (
            ("tenant", "tenant"),
            ("api_key_id", "api_key_id"),
            ("base_model", "base_model"),
            ("session_id", "session_id"),
            ("meter", "meter"),
        ):
            value = getattr(query, name)
            if value is not None:
                where += f" AND {column} = {{{name}:String}}"
                params[name] = value
        if query.run_id is not None:
            where += " AND (run_id = {run_id:String} OR sampler_id = {run_id:String})"
            params["run_id"] = query.run_id
        return where, params

    @staticmethod
    def _window(
        column: str, since: datetime | None, until: datetime | None
    ) -> tuple[str, dict[str, object]]:
        where: str = ""
        params: dict[str, object] = {}
        if since is not None:
            where += f" AND {column} >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC')"
            params["since_ms"] = _epoch_ms(since)
        if until is not None:
            where += f" AND {column} < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC')"
            params["until_ms"] = _epoch_ms(until)
        return where, params

    # ---------------------------------------------------------------- the client

    def _query(self, sql: str, params: dict[str, object] | None = None) -> Sequence[Sequence]:
        try:
            return self._client.query(sql, parameters=params or {}).result_rows
        except (OperationalError, ClickHouseError) as e:
            raise Unavailable(f"ClickHouse query failed: {e}") from e

    def _command(self, sql: str, params: dict[str, object] | None = None) -> None:
        try:
            self._client.command(sql, parameters=params or None)
        except (OperationalError, ClickHouseError) as e:
            raise Unavailable(f"ClickHouse command failed: {e}") from e


def _sort_key(item: tuple[tuple[object, ...], _Group]) -> tuple[object, ...]:
    key = item[0]
    return (key[0] or datetime.min.replace(tzinfo=UTC), *(str(v or "") for v in key[1:]))
