"""Usage reports as people read them: a text table, CSV, and the columns both show.

Shared by the ``whetstone usage`` command and the gateway's billing routes, so a report reads the
same everywhere. Money is printed from the ``Decimal`` exactly as billing computed it (CSV) or
rounded for the eye (table); the report's total is the exact sum of its rows. ``run_costs`` reads
a report grouped by run and meter as each run's cost so far (``whetstone status``, run info).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from whetstone.messages import PRICE_UNITS, GroupBy, UsageMeter, UsageReport, UsageRow

# Grouping -> (column header, UsageRow field)
COLUMNS: dict[GroupBy, tuple[str, str]] = {
    "hour": ("hour (UTC)", "bucket_start"),
    "day": ("day (UTC)", "bucket_start"),
    "month": ("month (UTC)", "bucket_start"),
    "tenant": ("tenant", "tenant"),
    "model": ("base model", "base_model"),
    "meter": ("meter", "meter"),
    "run": ("run", "run_id"),
    "sampler": ("sampler", "sampler_id"),
    "session": ("session", "session_id"),
    "key": ("API key id", "api_key_id"),
    "price": ("unit price (USD)", "unit_price_usd"),
}
_TIME_FORMAT: dict[GroupBy, str] = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d", "month": "%Y-%m"}


def columns(group_by: Sequence[GroupBy]) -> list[GroupBy]:
    """The grouping columns in display order: time first, then the rest as asked."""
    ordered = list(dict.fromkeys(group_by))
    time = [g for g in ordered if g in _TIME_FORMAT][:1]
    dims = [g for g in ordered if g not in _TIME_FORMAT and g != "price"]
    price: list[GroupBy] = ["price"] if "price" in ordered else []
    return [*time, *dims, *price]


def cell(row: UsageRow, group: GroupBy) -> str:
    value = getattr(row, COLUMNS[group][1])
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime(_TIME_FORMAT.get(group, "%Y-%m-%dT%H:%M:%SZ"))
    return str(value)


def to_table(report: UsageReport, group_by: Sequence[GroupBy]) -> str:
    cols = columns(group_by)
    header = [COLUMNS[g][0] for g in cols] + ["quantity", "cost (USD)"]
    body = [
        [cell(r, g) for g in cols] + [f"{r.tokens:,}", f"{r.cost_usd:.6f}"] for r in report.rows
    ]
    total = ["total"] + [""] * (len(cols) - 1) if cols else []
    total += [f"{sum(r.tokens for r in report.rows):,}", f"{report.total_cost_usd:.6f}"]
    widths = [max(len(line[i]) for line in [header, *body, total]) for i in range(len(header))]
    numeric = len(cols)

    def fmt(line: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if i >= numeric else v.ljust(w)
            for i, (v, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body), rule, fmt(total)])


def to_csv(report: UsageReport, group_by: Sequence[GroupBy]) -> str:
    """One line per row: the grouping columns, quantity, events, unit price and exact cost."""
    cols = columns(group_by)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = [COLUMNS[g][1] for g in cols if g != "price"]
    writer.writerow([*fields, "quantity", "events", "unit_price_usd", "cost_usd"])
    for r in report.rows:
        values = []
        for g in cols:
            if g == "price":
                continue
            v = getattr(r, COLUMNS[g][1])
            values.append(v.isoformat() if isinstance(v, datetime) else "" if v is None else v)
        unit = "" if r.unit_price_usd is None else str(r.unit_price_usd)
        writer.writerow([*values, r.tokens, r.events, unit, str(r.cost_usd)])
    return out.getvalue()


# ---------------------------------------------------------------- live cost per run

# Meters counted in tokens (the others count checkpoints and bytes).
TOKEN_METERS: frozenset[UsageMeter] = frozenset(
    m for m, (_, unit) in PRICE_UNITS.items() if unit == "1M tokens"
)
RUN_COST_GROUPING: list[GroupBy] = ["run", "meter"]


@dataclass(frozen=True)
class RunCost:
    """A training run's usage so far: ``tokens`` over the token meters, ``cost_usd`` over every
    meter, and each meter's quantity and cost."""

    tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    meters: dict[UsageMeter, tuple[int, Decimal]] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        """Money as exact strings, as every billing route answers."""
        return {
            "tokens": self.tokens,
            "cost_usd": str(self.cost_usd),
            "meters": {m: {"quantity": q, "cost_usd": str(c)} for m, (q, c) in self.meters.items()},
        }


def cost_of(rows: Iterable[UsageRow]) -> RunCost:
    """The rows' quantities and costs added up per meter."""
    meters: dict[UsageMeter, tuple[int, Decimal]] = {}
    for row in rows:
        if row.meter is not None:
            quantity, cost = meters.get(row.meter, (0, Decimal(0)))
            meters[row.meter] = (quantity + row.tokens, cost + row.cost_usd)
    return RunCost(
        tokens=sum(q for m, (q, _) in meters.items() if m in TOKEN_METERS),
        cost_usd=sum((c for _, c in meters.values()), Decimal(0)),
        meters=meters,
    )


def run_costs(report: UsageReport) -> dict[str, RunCost]:
    """Per run id, the cost of a report grouped by ``RUN_COST_GROUPING`` (rows without a run,
    i.e. sampling, are left out)."""
    by_run: dict[str, list[UsageRow]] = {}
    for row in report.rows:
        if row.run_id is not None:
            by_run.setdefault(row.run_id, []).append(row)
    return {run_id: cost_of(rows) for run_id, rows in by_run.items()}
