"""The usage ledger: token-usage events in ClickHouse, and the reports finance reads from them.

Billing is the one writer per database (architecture.md §1). The ledger stores facts (tokens per
event), never money: ``report`` prices aggregated tokens with a ``PriceTable`` at read time.

Exactly-once billing. The bus delivers at least once, so the same ``UsageEvent`` (same
``event_id`` = ``<request_id>:<meter>``) may be inserted more than once, in the same batch or in
batches hours apart. ``usage_events`` is a ``ReplacingMergeTree`` whose sorting key ends in
``event_id``; merges eventually keep one row per key, and until they do, every report reads with
``FINAL``, which deduplicates at query time. So a duplicate never counts twice, merged or not.
The table deliberately has no partition key: ``FINAL`` only deduplicates within a partition, and a
re-emitted event whose ``occurred_at`` moved across a month boundary would otherwise count twice.

One client for both deployments. ``Ledger.connect`` takes ``chdb:///abs/path`` (the embedded
engine, the default for ``whetstone up`` and tests) or ``http://host:port`` (a ClickHouse
server); clickhouse-connect speaks the same SQL to both.

Threading. The client is synchronous. chdb runs in-process, allows ONE process per data
directory (a second process fails to lock it) and one engine path per process; clickhouse-connect
serialises calls on one client with a lock. The async service must therefore call the ledger from
a worker thread (``asyncio.to_thread`` or a one-thread executor), never on the event loop, and
only one billing process may open a given chdb directory.

Every user-supplied value reaches SQL as a bound query parameter (``{name:Type}``), never by
string formatting. Time bounds travel as epoch milliseconds: clickhouse-connect formats bound
``datetime`` values to whole seconds in the server's time zone (the host's zone under chdb),
which would shift and truncate the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError

from services.billing.prices import PriceTable
from whetstone.errors import Unavailable, UserError
from whetstone.messages import UsageEvent, UsageReport, UsageReportQuery, UsageRow

DATABASE = "whetstone"
TABLE = "usage_events"
COLUMNS: tuple[str, ...] = (
    "event_id",
    "request_id",
    "tenant",
    "base_model",
    "meter",
    "tokens",
    "run_id",
    "occurred_at",
)

_CREATE_DATABASE = f"CREATE DATABASE IF NOT EXISTS {DATABASE}"

# ``inserted_at`` is the ReplacingMergeTree version: of two copies of one event the later insert
# wins. Copies are identical in practice (deterministic ids), so this only makes the choice stable.
_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.{TABLE}
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
ORDER BY (tenant, base_model, meter, event_id)
"""

_REPORT_SELECT = f"""
SELECT tenant, base_model, meter, sum(tokens) AS tokens
FROM {DATABASE}.{TABLE} FINAL
WHERE 1 = 1{{filters}}
GROUP BY tenant, base_model, meter
ORDER BY tenant, base_model, meter
"""


def _utc(ts: datetime) -> datetime:
    """Aware UTC datetime; a naive one is taken to be UTC already (what every producer sends)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _epoch_ms(ts: datetime) -> int:
    return int(_utc(ts).timestamp() * 1000)


class Ledger:
    """Usage events in, usage reports out, over one clickhouse-connect client.

    Synchronous by design (see the module docstring): call it from a thread.
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    @classmethod
    def connect(cls, dsn: str) -> Ledger:
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
        return cls(client)

    def close(self) -> None:
        self._client.close()

    def ensure_schema(self) -> None:
        """Create the database and table if absent; safe to run at every start-up."""
        self._command(_CREATE_DATABASE)
        self._command(_CREATE_TABLE)

    def insert(self, events: Sequence[UsageEvent]) -> int:
        """Write ``events`` in ONE insert and return how many rows were sent.

        One insert per batch matters: each insert creates a part (and under chdb costs ~16 ms
        however small), so the handler should gather a batch of bus messages, insert, then ack.
        Duplicates are welcome here; reports drop them.
        """
        if not events:
            return 0
        rows = [
            [
                e.event_id,
                e.request_id,
                e.tenant,
                e.base_model,
                e.meter,
                e.tokens,
                e.run_id or "",
                _utc(e.occurred_at),
            ]
            for e in events
        ]
        try:
            self._client.insert(TABLE, rows, column_names=list(COLUMNS), database=DATABASE)
        except OperationalError as e:
            raise Unavailable(f"usage insert failed: {e}") from e
        return len(rows)

    def report(self, query: UsageReportQuery, prices: PriceTable) -> UsageReport:
        """Tokens and cost per (tenant, base_model, meter) within ``[since, until)``.

        ``tenant``, ``since`` and ``until`` are each optional; a missing bound is open. Rows come
        sorted by tenant, base model, meter. ``FINAL`` makes duplicates count once even before
        ClickHouse has merged them away.
        """
        if query.since is not None and query.until is not None and query.since >= query.until:
            raise UserError(
                f"empty time window: since {query.since} is not before until {query.until}"
            )
        # Only constant SQL fragments are chosen here; the values are bound parameters.
        filters: list[str] = []
        params: dict[str, str | int] = {}
        if query.tenant is not None:
            filters.append(" AND tenant = {tenant:String}")
            params["tenant"] = query.tenant
        if query.since is not None:
            filters.append(" AND occurred_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')")
            params["since_ms"] = _epoch_ms(query.since)
        if query.until is not None:
            filters.append(" AND occurred_at < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')")
            params["until_ms"] = _epoch_ms(query.until)
        sql = _REPORT_SELECT.format(filters="".join(filters))
        try:
            result = self._client.query(sql, parameters=params)
        except OperationalError as e:
            raise Unavailable(f"usage report failed: {e}") from e
        rows = [
            UsageRow(
                tenant=tenant,
                base_model=base_model,
                meter=meter,
                tokens=int(tokens),
                cost_usd=prices.cost_usd(base_model, meter, int(tokens)),
            )
            for tenant, base_model, meter, tokens in result.result_rows
        ]
        return UsageReport(rows=rows)

    def _command(self, sql: str) -> None:
        try:
            self._client.command(sql)
        except OperationalError as e:
            raise Unavailable(f"ClickHouse command failed: {e}") from e
