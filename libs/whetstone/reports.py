"""Usage reports as people read them: a text table, CSV, and the columns both show.

Shared by the ``whetstone usage`` command and the gateway's billing routes, so a report reads the
same everywhere. Money is printed from the ``Decimal`` exactly as billing computed it (CSV) or
rounded for the eye (table); the report's total is the exact sum of its rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import datetime

from whetstone.messages import GroupBy, UsageReport, UsageRow

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
