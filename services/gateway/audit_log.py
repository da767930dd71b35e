"""``GET /api/v1/audit?event_type=&day=`` (``AdminClient.get_audit_log``; the deprecated
``RestClient.get_audit_log`` calls it too): the platform's audit log for one UTC day.

Admin keys only (``whetstone keys create --admin``, the operator's): any other key gets 403, as
Tinker answers a caller without the admin role. An admin sees every tenant's events, each naming
its tenant and acting key id in ``event_details``. ``event_type`` is one of Tinker's filters
(``whetstone.audit.EVENT_TYPES``); ``day`` an ISO date, today by default. Entries are Tinker's
``AuditLogEntry``, oldest first; checkpoint events also carry the deprecated ``model_id`` and
``tinker_path`` fields.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Literal

from fastapi import APIRouter, Depends

from services.gateway.billing import Caller, caller
from services.gateway.context import Gateway, gateway
from whetstone import audit
from whetstone.errors import UserError

router = APIRouter(prefix="/api/v1")


class Forbidden(UserError):
    """The key is valid but may not do this."""

    http_status = 403


@router.get("/audit")
async def audit_log(
    event_type: Literal["all", "checkpoints", "projects", "teams", "organizations"] = "all",
    day: date | None = None,
    who: Caller = Depends(caller),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    if not who.admin:
        raise Forbidden("the audit log needs an admin key (whetstone keys create --admin)")
    entries = []
    for event in await audit.read_day(gw.bus, day or datetime.now(UTC).date(), event_type):
        details: dict[str, object] = {
            "tenant": event.tenant,
            "api_key_id": event.api_key_id,
            **event.details,
        }
        entry: dict[str, object] = {
            "timestamp": event.at.isoformat(),
            "event": event.event,
            "event_details": {k: v for k, v in details.items() if v is not None},
        }
        if event.event.startswith("checkpoint_"):
            entry["model_id"] = event.details.get("model_id")
            entry["tinker_path"] = event.details.get("tinker_path")
        entries.append(entry)
    return {"entries": entries}
