"""The gateway's billing routes: usage and cost over HTTP, Tinker's billing routes, the finance
page and monthly invoices. Billing computes every number (request/reply on
``ws.ctl.billing.report``); this module only asks, checks who may see what, and presents.

Who sees what. An admin key (``whetstone keys create --admin``) sees every tenant; any other key
sees only its own tenant's usage, whatever filter it sends. The finance page and the invoices need
an admin key. Browsers authenticate with HTTP Basic (any user name, the API key as password), so
the page works without a client; scripts send ``X-API-Key``.

Routes:

* ``GET /api/v1/billing/usage/events?starting_on&ending_before`` and
  ``GET /api/v1/billing/usage/checkpoints/current``: Tinker's, what ``tinker billing usage`` and
  ``tinker billing checkpoint-storage`` call (AdminClient). Hourly rows; the tenant is the
  Tinker project, the API key id the user. ``forward_tokens`` are reported as ``training``.
* ``GET /billing/usage``: the report with every filter and grouping, as JSON or CSV.
* ``GET /billing/runs/{run_id}/cost``: a run's (or sampler's) cost so far, while it runs
  (``run_usage``, which the REST run info also shows).
* ``GET /billing/``: the finance page; ``GET /billing/invoice?tenant&month``: a statement, CSV or
  a printable page. Charts use Chart.js, vendored in ``billing_assets`` (no CDN at run time).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import nats.errors
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from nats.js.errors import NoKeysError

from services.gateway.context import Gateway, gateway
from services.gateway.jwt_auth import digest_of
from whetstone import bus as b
from whetstone import reports
from whetstone import subjects as s
from whetstone.errors import Unauthorized, Unavailable, UserError
from whetstone.keys import key_id_of_hash, lookup_hash
from whetstone.messages import (
    PRICE_UNITS,
    CheckpointRecord,
    SessionRecord,
    UsageMeter,
    UsageReport,
    UsageReportQuery,
    UsageRow,
)

ASSETS = Path(__file__).resolve().parent / "billing_assets"
REPORT_TIMEOUT_S = 30.0
RUN_INFO_TIMEOUT_S = 2.0  # run info answers without its cost rather than wait longer for billing
MAX_TINKER_WINDOW = timedelta(days=14)
REALM = 'Basic realm="Whetstone billing", charset="UTF-8"'

router = APIRouter()


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool
    key_id: str

    def tenant_filter(self, asked: str | None) -> str | None:
        """The tenant a query may cover: any (or all) for an admin, its own for anyone else."""
        return asked if self.admin else self.tenant


def _key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("basic "):
        try:
            key = base64.b64decode(auth[6:]).decode().partition(":")[2]
        except ValueError:
            return None
    return key or None


async def caller(request: Request, gw: Gateway = Depends(gateway)) -> Caller:
    """FastAPI dependency: who asks. The key record is read on every call (these routes are
    rare), so a revoked key or a changed admin flag applies at once."""
    key = _key_of(request)
    if not key:
        raise Unauthorized("an API key is needed (X-API-Key, or the password of HTTP Basic)")
    digest = digest_of(gw.settings, key)  # the key's hash, or the one its JWT names
    record = await lookup_hash(gw.bus, digest)
    if record is None:
        raise Unauthorized("invalid API key")
    return Caller(record.tenant, record.admin, key_id_of_hash(digest))


async def page_caller(request: Request, gw: Gateway = Depends(gateway)) -> Caller | Response:
    """The page's and invoices' dependency: an admin, or the answer to send instead (a 401 that
    makes a browser ask for the key, or a 403)."""
    try:
        who = await caller(request, gw)
    except Unauthorized as exc:
        body = {"error": exc.message, "category": "user", "detail": exc.message}
        return JSONResponse(body, status_code=401, headers={"www-authenticate": REALM})
    if not who.admin:
        message = "this needs an admin key (whetstone keys create --admin)"
        return JSONResponse({"error": message, "category": "user"}, status_code=403)
    return who


async def ask_billing(
    gw: Gateway, query: UsageReportQuery, timeout_s: float = REPORT_TIMEOUT_S
) -> UsageReport:
    try:
        reply = await gw.bus.nc.request(s.USAGE_REPORT_SUBJECT, query.encode(), timeout=timeout_s)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
        raise Unavailable("billing is not answering; retry") from exc
    report = UsageReport.decode(reply.data)
    if report.error:
        raise UserError(report.error)
    return report


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


# ---------------------------------------------------------------- Tinker's billing routes

_TINKER_TYPE: dict[UsageMeter, dict[str, object]] = {
    "train_tokens": {"type": "training"},
    "forward_tokens": {"type": "training"},
    "prefill_tokens": {"type": "sampling_prefill", "cached": False},
    "cached_prefill_tokens": {"type": "sampling_prefill", "cached": True},
    "sample_tokens": {"type": "sampling_sample"},
    "checkpoints": {"type": "checkpoint"},
}


@router.get("/api/v1/billing/usage/events")
async def tinker_usage_events(
    starting_on: datetime,
    ending_before: datetime,
    who: Caller = Depends(caller),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    since, until = _utc(starting_on), _utc(ending_before)
    for name, ts in (("starting_on", since), ("ending_before", until)):
        if ts.minute or ts.second or ts.microsecond:
            raise UserError(f"{name} must be aligned to a UTC hour, got {ts.isoformat()}")
    if since > datetime.now(UTC):
        raise UserError("starting_on must not be in the future")
    if not since < until <= since + MAX_TINKER_WINDOW:
        raise UserError("ending_before must be after starting_on, at most 14 days later")
    query = UsageReportQuery(
        tenant=who.tenant_filter(None),
        since=since,
        until=until,
        group_by=["hour", "tenant", "model", "meter", "session", "key"],
    )
    rows = [r for r in (await ask_billing(gw, query)).rows if r.meter in _TINKER_TYPE]
    rows.sort(key=lambda r: (r.bucket_start or since, -r.tokens))
    sessions: dict[str, object] = {}
    for session_id in sorted({r.session_id for r in rows if r.session_id}):
        record = await b.kv_get(gw.bus.kv[s.SESSIONS_BUCKET], s.token(session_id), SessionRecord)
        metadata = record.user_metadata if record is not None else None
        sessions[session_id] = {"user_metadata": metadata or None}
    return {"data": [_tinker_event(r) for r in rows], "sessions": sessions}


def _tinker_event(row: UsageRow) -> dict[str, object]:
    assert row.meter is not None and row.bucket_start is not None
    info = dict(_TINKER_TYPE[row.meter])
    tokens = PRICE_UNITS[row.meter][1] == "1M tokens"
    info["token_count" if tokens else "count"] = row.tokens
    return {
        "bucket_start": row.bucket_start.isoformat(),
        "bucket_end": (row.bucket_start + timedelta(hours=1)).isoformat(),
        "base_model": row.base_model,
        "user_id": row.api_key_id,
        "session_id": row.session_id,
        "project_id": row.tenant,
        # The SDK's types are floats; the exact amounts are on /billing/usage.
        "estimated_cost_usd": float(row.cost_usd) if tokens else None,
        "effective_rate_usd_per_million_tokens": (
            float(row.unit_price_usd) if tokens and row.unit_price_usd is not None else None
        ),
        "event_info": info,
    }


@router.get("/api/v1/billing/usage/checkpoints/current")
async def tinker_checkpoint_storage(
    project_id: str | None = None,
    who: Caller = Depends(caller),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    """Checkpoints stored now, per tenant (the Tinker project), from the checkpoint records."""
    kv = gw.bus.kv[s.CHECKPOINTS_BUCKET]
    try:
        keys = await kv.keys()
    except NoKeysError:
        keys = []
    per_tenant: dict[str, list[int]] = {}
    wanted = who.tenant_filter(project_id)
    for k in keys:
        record = await b.kv_get(kv, k, CheckpointRecord)
        if record is None or (wanted is not None and record.tenant != wanted):
            continue
        count_bytes = per_tenant.setdefault(record.tenant, [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += record.size_bytes
    return {
        "effective_rate_usd_per_gigabyte_month": None,
        "data": [
            {
                "project_id": tenant,
                "checkpoint_count": count,
                "size_bytes": size,
                "size_gigabytes": size / 1e9,
                "estimated_monthly_cost_usd": None,
            }
            for tenant, (count, size) in sorted(per_tenant.items())
        ],
    }


# ---------------------------------------------------------------- reports over HTTP


def _query(
    who: Caller,
    tenant: str | None,
    key: str | None,
    model: str | None,
    run: str | None,
    session: str | None,
    meter: str | None,
    since: datetime | None,
    until: datetime | None,
    group_by: str,
) -> UsageReportQuery:
    return UsageReportQuery.model_validate(
        {
            "tenant": who.tenant_filter(tenant),
            "api_key_id": key,
            "base_model": model,
            "run_id": run,
            "session_id": session,
            "meter": meter,
            "since": since,
            "until": until,
            "group_by": [g.strip() for g in group_by.split(",") if g.strip()],
        }
    )


@router.get("/billing/usage")
async def usage(
    tenant: str | None = None,
    key: str | None = None,
    model: str | None = None,
    run: str | None = None,
    session: str | None = None,
    meter: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: str = "tenant,model,meter",
    format: Literal["json", "csv"] = "json",
    who: Caller = Depends(caller),
    gw: Gateway = Depends(gateway),
) -> Response:
    query = _query(who, tenant, key, model, run, session, meter, since, until, group_by)
    report = await ask_billing(gw, query)
    if format == "csv":
        return Response(
            reports.to_csv(report, query.group_by),
            media_type="text/csv",
            headers={"content-disposition": 'attachment; filename="usage.csv"'},
        )
    return Response(report.model_dump_json(exclude_none=True), media_type="application/json")


async def run_usage(
    gw: Gateway, tenant: str | None, run_id: str, timeout_s: float = REPORT_TIMEOUT_S
) -> reports.RunCost:
    """What a training run (or sampler) of ``tenant`` (``None``: any) has cost so far: tokens,
    exact cost, and both per meter, as billing has ingested them (seconds behind the work).
    ``Unavailable`` when billing does not answer within ``timeout_s``."""
    query = UsageReportQuery(tenant=tenant, run_id=run_id, group_by=["meter"])
    return reports.cost_of((await ask_billing(gw, query, timeout_s)).rows)


async def run_usage_json(gw: Gateway, tenant: str, run_id: str) -> dict[str, object] | None:
    """``run_usage`` for a run's info (REST ``GET /training_runs/{id}``): its JSON, or ``None``
    while billing is not answering (the run info must not wait on billing)."""
    try:
        return (await run_usage(gw, tenant, run_id, RUN_INFO_TIMEOUT_S)).as_json()
    except Unavailable:
        return None


@router.get("/billing/runs/{run_id:path}/cost")
async def run_cost(
    run_id: str, who: Caller = Depends(caller), gw: Gateway = Depends(gateway)
) -> JSONResponse:
    """What a training run (or sampler) has cost so far, per meter and in total."""
    cost = await run_usage(gw, who.tenant_filter(None), run_id)
    return JSONResponse({"run_id": run_id, **cost.as_json()})


# ---------------------------------------------------------------- the finance page


def _page(name: str, **values: str) -> str:
    text = (ASSETS / name).read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    return text


def _script_json(value: object) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@router.get("/billing/")
async def finance_page(
    tenant: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    who: Caller | Response = Depends(page_caller),
    gw: Gateway = Depends(gateway),
) -> Response:
    if isinstance(who, Response):
        return who
    until = _utc(until) if until else _next_midnight(datetime.now(UTC))
    since = _utc(since) if since else until - timedelta(days=30)
    base = {"tenant": tenant or None, "since": since, "until": until}
    by_day = await ask_billing(
        gw, UsageReportQuery.model_validate({**base, "group_by": ["day", "tenant", "model"]})
    )
    table = await ask_billing(gw, UsageReportQuery.model_validate(base))
    runs = await ask_billing(
        gw, UsageReportQuery.model_validate({**base, "group_by": ["tenant", "run", "meter"]})
    )
    data = {
        "daily": [_json_row(r) for r in by_day.rows],
        "table": [_json_row(r) for r in table.rows],
        "runs": _run_rows(runs),
        "total_cost_usd": str(table.total_cost_usd),
        "total_tokens": sum(r.tokens for r in table.rows),
    }
    csv_query = f"since={since.isoformat()}&until={until.isoformat()}" + (
        f"&tenant={tenant}" if tenant else ""
    )
    return HTMLResponse(
        _page(
            "usage.html",
            DATA=_script_json(data),
            TENANT=html.escape(tenant or ""),
            SINCE=since.date().isoformat(),
            UNTIL=until.date().isoformat(),
            CSV=html.escape("/billing/usage?format=csv&" + _url_escape(csv_query)),
        )
    )


def _run_rows(report: UsageReport) -> list[dict[str, object]]:
    """Each training run's tokens and cost so far (as ``run_usage`` counts them), per tenant."""
    by_run: dict[tuple[str, str], list[UsageRow]] = {}
    for row in report.rows:
        if row.run_id and row.tenant:
            by_run.setdefault((row.tenant, row.run_id), []).append(row)
    rows: list[dict[str, object]] = []
    for (tenant, run_id), group in sorted(by_run.items()):
        cost = reports.cost_of(group)
        rows.append(
            {
                "tenant": tenant,
                "run_id": run_id,
                "tokens": cost.tokens,
                "cost_usd": str(cost.cost_usd),
            }
        )
    return rows


def _url_escape(query: str) -> str:
    return "&".join(
        "=".join(quote(part, safe="") for part in pair.split("=", 1)) for pair in query.split("&")
    )


def _json_row(row: UsageRow) -> dict[str, object]:
    return row.model_dump(mode="json", exclude_none=True)


def _next_midnight(ts: datetime) -> datetime:
    return ts.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


@router.get("/billing/assets/{name}")
async def asset(name: str) -> FileResponse:
    path = ASSETS / name
    if name not in {"chart.umd.min.js", "usage.js", "billing.css"} or not path.is_file():
        raise UserError(f"no asset {name!r}")
    return FileResponse(path, headers={"cache-control": "max-age=86400"})


# ---------------------------------------------------------------- invoices


@router.get("/billing/invoice")
async def invoice(
    tenant: str,
    month: str = Query(pattern=r"^\d{4}-\d{2}$"),
    format: Literal["html", "csv"] = "html",
    who: Caller | Response = Depends(page_caller),
    gw: Gateway = Depends(gateway),
) -> Response:
    """A tenant's statement for a calendar month (UTC): one line per base model, meter and unit
    price; the total is the exact sum of the lines, and the amount due that total in cents."""
    if isinstance(who, Response):
        return who
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    query = UsageReportQuery(
        tenant=tenant, since=start, until=end, group_by=["model", "meter", "price"]
    )
    report = await ask_billing(gw, query)
    due = report.total_cost_usd.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    if format == "csv":
        body = reports.to_csv(report, query.group_by) + f"total,,,,{report.total_cost_usd}\n"
        return Response(
            body,
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="invoice-{tenant}-{month}.csv"'},
        )
    lines = "\n".join(
        "<tr>"
        f"<td>{html.escape(r.base_model or '-')}</td><td>{html.escape(r.meter or '-')}</td>"
        f'<td class="n">{r.tokens:,}</td>'
        f"<td>{html.escape(PRICE_UNITS[r.meter][1]) if r.meter else ''}</td>"
        f'<td class="n">{r.unit_price_usd if r.unit_price_usd is not None else "-"}</td>'
        f'<td class="n" data-exact="{r.cost_usd}">{r.cost_usd:.6f}</td>'
        "</tr>"
        for r in report.rows
    )
    return HTMLResponse(
        _page(
            "invoice.html",
            TENANT=html.escape(tenant),
            MONTH=html.escape(month),
            PERIOD=f"{start.date().isoformat()} to {(end - timedelta(days=1)).date().isoformat()}",
            LINES=lines,
            TOTAL=str(report.total_cost_usd),
            DUE=f"{due:,.2f}",
            ISSUED=datetime.now(UTC).date().isoformat(),
        )
    )
