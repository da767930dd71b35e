"""The Tinker REST routes (protocol.md §3.4): training runs, checkpoints, sessions, the caller's
API key, ``save_weights_external`` and the signed download URLs of external weights.

Plain JSON, no futures, in the SDK's exact shapes (``tinker.types``: TrainingRun, Checkpoint,
Cursor, ...). Everything is read from the state buckets (``ws_runs``, ``ws_sessions``,
``ws_samplers``, ``ws_checkpoints``) and filtered by the caller's tenant: another tenant's run,
checkpoint or session is 404. A published checkpoint is readable by every tenant (weights_info,
copy_weights, loading and sampling through ``Gateway.checkpoint(published_ok=True)``), as in
Tinker; only its owner may change or delete it.

Route matching: run ids contain ``:`` and checkpoint ids a ``/`` (``weights/<name>``), so a
checkpoint id is matched by its own pattern (``{checkpoint_id:checkpoint}``), which keeps the
``/publish``, ``/ttl`` and ``/external_weights_urls`` suffixes apart.

Downloads: ``external_weights_urls`` answers one URL per file, ``/downloads/<run>/<name>/<file>
?expires=&sig=``, signed with HMAC-SHA256 under the gateway's ``url_signing_secret``; the gateway
streams the file to whoever holds the URL until it expires (a tampered or expired one is 403).
That route needs no API key (``urllib`` sends none): the signature is the credential.

Listings scan their bucket and filter by tenant: simple, and linear in the number of records.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from nats.js.errors import KeyWrongLastSequenceError
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor

from services.gateway import jwt_auth
from services.gateway.billing import run_usage_json
from services.gateway.context import Gateway, caller_key_id, gateway, tenant
from services.gateway.training import _submit, refused_in_order
from whetstone import audit
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.checkpoints import TinkerPath, check_name, check_ttl, expiry, record_key, store_key
from whetstone.errors import NotFound, Unauthorized, UserError, WhetstoneError
from whetstone.keys import key_hash, key_id, key_id_of_hash, lookup_key, revoke_key
from whetstone.messages import (
    CheckpointRecord,
    Message,
    SamplingSessionRecord,
    SaveWeights,
    SessionRecord,
    TrainingRunRecord,
    utcnow,
)

DOWNLOADS_PREFIX = "/downloads/"
MAX_PAGE = 1000  # the CLI pages by 1000


class CheckpointIdConvertor(Convertor[str]):
    """``<weights|sampler_weights|external_weights>/<name>``: one slash, never a suffix."""

    regex = r"(?:weights|sampler_weights|external_weights)/[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("checkpoint", CheckpointIdConvertor())

router = APIRouter(prefix="/api/v1")
downloads = APIRouter(prefix=DOWNLOADS_PREFIX.rstrip("/"))
CHECKPOINT = "/training_runs/{run_id}/checkpoints/{checkpoint_id:checkpoint}"

Limit = Query(20, ge=1, le=MAX_PAGE)
Offset = Query(0, ge=0)
AccessScope = Literal["owned", "accessible"]

R = TypeVar("R", bound=Message)


# ---------------------------------------------------------------- reading the buckets


async def records(
    gw: Gateway, bucket: str, cls: type[R], pattern: str = ">"
) -> list[tuple[R, int]]:
    """Every record of ``bucket`` under the key pattern, with its revision."""
    return list((await b.kv_records(gw.bus, bucket, cls, pattern)).values())


def live(record: CheckpointRecord, now: datetime) -> bool:
    """Not past its expiry (the scheduler deletes expired ones; until then they are hidden)."""
    return record.expires_at is None or record.expires_at > now


async def run_checkpoints(gw: Gateway, run_id: str) -> list[CheckpointRecord]:
    """A run's live checkpoints, oldest first."""
    now = utcnow()
    found = await records(gw, s.CHECKPOINTS_BUCKET, CheckpointRecord, f"{s.token(run_id)}.>")
    return sorted((r for r, _ in found if live(r, now)), key=lambda r: r.created_at)


def checkpoint_json(record: CheckpointRecord) -> dict[str, object]:
    path = TinkerPath.parse(record.tinker_path)
    out: dict[str, object] = {
        "checkpoint_id": path.checkpoint_id,
        "checkpoint_type": record.kind,
        "time": record.created_at.isoformat(),
        "tinker_path": record.tinker_path,
        "size_bytes": record.size_bytes,
        "public": record.public,
    }
    if record.expires_at is not None:
        out["expires_at"] = record.expires_at.isoformat()
    return out


async def run_json(gw: Gateway, run: TrainingRunRecord) -> dict[str, object]:
    checkpoints = await run_checkpoints(gw, run.run_id)
    last = {kind: [c for c in checkpoints if c.kind == kind] for kind in ("training", "sampler")}
    out: dict[str, object] = {
        "training_run_id": run.run_id,
        "base_model": run.base_model,
        "model_owner": run.tenant,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora.rank,
        # Not tracked per request: its creation or its latest checkpoint, whichever is later.
        "last_request_time": max(
            [run.created_at, *(c.created_at for c in checkpoints)]
        ).isoformat(),
        "user_metadata": run.user_metadata or None,
    }
    if last["training"]:
        out["last_checkpoint"] = checkpoint_json(last["training"][-1])
    if last["sampler"]:
        out["last_sampler_checkpoint"] = checkpoint_json(last["sampler"][-1])
    return {k: v for k, v in out.items() if v is not None}


def cursor(offset: int, limit: int, total: int) -> dict[str, int]:
    return {"offset": offset, "limit": limit, "total_count": total}


async def owned_checkpoint(gw: Gateway, t: str, run_id: str, checkpoint_id: str) -> TinkerPath:
    """The path of a checkpoint route, after checking that the caller owns the run."""
    await gw.run(t, run_id)
    return TinkerPath.of_checkpoint_id(run_id, checkpoint_id)


class Unchanged(WhetstoneError):
    """A compare-and-set lost to a concurrent change: 503, which the SDK retries."""

    http_status = 503


async def update_checkpoint(gw: Gateway, t: str, path: TinkerPath, **changes: object) -> None:
    """Change fields of the caller's checkpoint (compare-and-set: a concurrent change or
    expiry is not overwritten; the client's retry applies it again)."""
    kv = gw.bus.kv[s.CHECKPOINTS_BUCKET]
    await gw.checkpoint(t, path)
    entry = await kv.get(record_key(path))
    record = CheckpointRecord.decode(entry.value or b"")
    try:
        await kv.update(
            record_key(path), record.model_copy(update=changes).encode(), last=entry.revision
        )
    except KeyWrongLastSequenceError as exc:
        raise Unchanged(f"checkpoint {path} changed meanwhile; retry") from exc


# ---------------------------------------------------------------- training runs


@router.get("/training_runs")
async def list_training_runs(
    limit: int = Limit,
    offset: int = Offset,
    access_scope: AccessScope = "owned",
    project_id: str | None = None,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    runs = [r for r, _ in await records(gw, s.RUNS_BUCKET, TrainingRunRecord)]
    readable: set[str] = set()  # "accessible": also the runs with a checkpoint published
    if access_scope == "accessible":
        now = utcnow()
        found = await records(gw, s.CHECKPOINTS_BUCKET, CheckpointRecord)
        readable = {c.run_id for c, _ in found if c.public and live(c, now)}
    mine = [r for r in runs if r.tenant == t or r.run_id in readable]
    if project_id is not None:
        sessions = {
            r.session_id
            for r, _ in await records(gw, s.SESSIONS_BUCKET, SessionRecord)
            if r.tenant == t and r.project_id == project_id
        }
        mine = [r for r in mine if r.session_id in sessions]
    mine.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)  # newest first
    page = mine[offset : offset + limit]
    return {
        "training_runs": [await run_json(gw, r) for r in page],
        "cursor": cursor(offset, limit, len(mine)),
    }


@router.get("/training_runs/{run_id}")
async def get_training_run(
    run_id: str,
    access_scope: AccessScope = "owned",
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    run = await gw.run_record(run_id)
    if run is None or (run.tenant != t and not await _has_published(gw, run, access_scope)):
        raise NotFound(f"unknown training run {run_id!r}")
    info = await run_json(gw, run)
    if run.tenant == t:  # its cost so far, for its owner (absent while billing is not answering)
        usage = await run_usage_json(gw, t, run.run_id)
        if usage is not None:
            info["usage"] = usage
    return info


async def _has_published(gw: Gateway, run: TrainingRunRecord, scope: AccessScope) -> bool:
    return scope == "accessible" and any(c.public for c in await run_checkpoints(gw, run.run_id))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_run_checkpoints(
    run_id: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    await gw.run(t, run_id)
    checkpoints = await run_checkpoints(gw, run_id)
    return {
        "checkpoints": [checkpoint_json(c) for c in checkpoints],
        "cursor": cursor(0, len(checkpoints), len(checkpoints)),
    }


@router.get("/checkpoints")
async def list_user_checkpoints(
    limit: int = Query(100, ge=1, le=MAX_PAGE),
    offset: int = Offset,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    now = utcnow()
    found = await records(gw, s.CHECKPOINTS_BUCKET, CheckpointRecord)
    mine = [r for r, _ in found if r.tenant == t and live(r, now)]
    mine.sort(key=lambda r: (r.created_at, r.tinker_path), reverse=True)  # newest first
    return {
        "checkpoints": [checkpoint_json(c) for c in mine[offset : offset + limit]],
        "cursor": cursor(offset, limit, len(mine)),
    }


# ---------------------------------------------------------------- one checkpoint


@router.delete(CHECKPOINT, status_code=204)
async def delete_checkpoint(
    run_id: str, checkpoint_id: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> Response:
    path = await owned_checkpoint(gw, t, run_id, checkpoint_id)
    record = await gw.checkpoint(t, path)
    await gw.bus.kv[s.CHECKPOINTS_BUCKET].delete(record_key(path))
    await asyncio.to_thread(gw.settings.checkpoint_store().delete, record.store_key)
    await _audit(gw, "checkpoint_deleted", t, path)
    return Response(status_code=204)


@router.post(CHECKPOINT + "/publish", status_code=204)
async def publish_checkpoint(
    run_id: str, checkpoint_id: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> Response:
    # Publishing twice is not an error: a 409 would be retried by the SDK for five minutes.
    path = await owned_checkpoint(gw, t, run_id, checkpoint_id)
    await update_checkpoint(gw, t, path, public=True)
    await _audit(gw, "checkpoint_published", t, path)
    return Response(status_code=204)


@router.delete(CHECKPOINT + "/publish", status_code=204)
async def unpublish_checkpoint(
    run_id: str, checkpoint_id: str, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> Response:
    path = await owned_checkpoint(gw, t, run_id, checkpoint_id)
    await update_checkpoint(gw, t, path, public=False)
    await _audit(gw, "checkpoint_unpublished", t, path)
    return Response(status_code=204)


class TtlBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ttl_seconds: int | None


@router.put(CHECKPOINT + "/ttl", status_code=204)
async def set_checkpoint_ttl(
    run_id: str,
    checkpoint_id: str,
    body: TtlBody,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> Response:
    path = await owned_checkpoint(gw, t, run_id, checkpoint_id)
    await update_checkpoint(gw, t, path, expires_at=expiry(check_ttl(body.ttl_seconds)))
    ttl = "none" if body.ttl_seconds is None else str(body.ttl_seconds)
    await _audit(gw, "checkpoint_ttl_set", t, path, ttl_seconds=ttl)
    return Response(status_code=204)


async def _audit(gw: Gateway, event: str, t: str, path: TinkerPath, **details: str) -> None:
    """A checkpoint event in the audit log (Tinker's entries name ``model_id`` and the path)."""
    await audit.record(
        gw.bus, event, t, caller_key_id(), model_id=path.run_id, tinker_path=str(path), **details
    )


@router.get(CHECKPOINT + "/external_weights_urls")
async def external_weights_urls(
    run_id: str,
    checkpoint_id: str,
    request: Request,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    path = await owned_checkpoint(gw, t, run_id, checkpoint_id)
    if path.kind != "external":
        raise UserError(f"{path} is not external weights (tinker://<run>/external_weights/<name>)")
    record = await gw.checkpoint(t, path)
    files = await asyncio.to_thread(gw.settings.checkpoint_store().files, record.store_key)
    expires = int(time.time()) + gw.settings.download_url_ttl_s
    base = str(request.base_url).rstrip("/")
    secret = gw.settings.url_signing_secret
    return {
        "urls": {f: base + signed_url(secret, path, f, expires) for f in files},
        "expires": datetime.fromtimestamp(expires, UTC).isoformat(),
    }


def signature(secret: str, path: TinkerPath, file: str, expires: int) -> str:
    message = f"{path}\n{file}\n{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_url(secret: str, path: TinkerPath, file: str, expires: int) -> str:
    """The gateway-relative download URL of one file of external weights."""
    sig = signature(secret, path, file, expires)
    return (
        f"{DOWNLOADS_PREFIX}{quote(path.run_id, safe=':')}/{quote(path.name)}/{quote(file)}"
        f"?expires={expires}&sig={sig}"
    )


@downloads.get("/{run_id}/{name}/{file:path}")
async def download(
    run_id: str, name: str, file: str, expires: int, sig: str, gw: Gateway = Depends(gateway)
) -> Response:
    """One file of external weights, for whoever holds an unexpired signed URL."""
    path = TinkerPath(run_id, "external", name)
    expected = signature(gw.settings.url_signing_secret, path, file, expires)
    if not hmac.compare_digest(expected, sig) or expires < time.time():
        return _forbidden("the download URL is expired or invalid; ask for new URLs")
    record = await b.kv_get(gw.bus.kv[s.CHECKPOINTS_BUCKET], record_key(path), CheckpointRecord)
    if record is None or not live(record, utcnow()):
        raise NotFound(f"unknown checkpoint {path}")
    root = gw.settings.checkpoint_store().path(record.store_key).resolve()
    target = (root / file).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise NotFound(f"{path} has no file {file!r}")
    return FileResponse(target, media_type="application/octet-stream")


def _forbidden(message: str) -> Response:
    return JSONResponse({"error": message, "category": "user", "detail": message}, status_code=403)


# ---------------------------------------------------------------- weights: info, copy, export


class WeightsInfoBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tinker_path: str


@router.post("/weights_info")
async def weights_info(
    body: WeightsInfoBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    record = await gw.checkpoint(t, TinkerPath.parse(body.tinker_path), published_ok=True)
    run = await gw.run_record(record.run_id)
    if run is None:
        raise NotFound(f"unknown checkpoint {body.tinker_path}")
    return {
        "base_model": run.base_model,
        "optimizer_config": {"type": "adamw"},
        "is_lora": True,
        "lora_rank": run.lora.rank,
        "train_unembed": run.lora.train_unembed,
        "train_mlp": run.lora.train_mlp,
        "train_attn": run.lora.train_attn,
    }


class CopyWeightsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source_path: str
    destination_project_id: str | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    ttl_seconds: int | None = None


@router.post("/copy_weights")
async def copy_weights(
    body: CopyWeightsBody,
    request: Request,
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    """Copy a checkpoint (the caller's or a published one) into a new run of the caller's: in
    a session of theirs (``session_id`` + ``model_seq_id``) or in a new session of project
    ``destination_project_id``. The files are hard links: no bytes are duplicated."""
    source = TinkerPath.parse(body.source_path)
    check_ttl(body.ttl_seconds)
    record = await gw.checkpoint(t, source, published_ok=True)
    source_run = await gw.run_record(record.run_id)
    if source_run is None:
        raise NotFound(f"unknown checkpoint {body.source_path}")
    if body.session_id is not None and body.model_seq_id is not None:
        session = await gw.session(t, body.session_id)
    elif body.destination_project_id:
        session = SessionRecord(
            session_id=f"copy-{uuid.uuid4().hex[:16]}",
            tenant=t,
            finished=True,  # nothing runs in it
            project_id=body.destination_project_id,
        )
    else:
        raise UserError("copy_weights needs destination_project_id, or session_id and model_seq_id")
    run_id = f"{session.session_id}:train:{body.model_seq_id or 0}"
    target = TinkerPath(run_id, source.kind, source.name)
    # The SDK keeps one idempotency key across all its retries: a retry gets the first copy.
    idempotency = request.headers.get("x-idempotency-key")
    if idempotency:
        dedup_key = f"copy.{s.token(t)}.{s.token(idempotency)}"
        done = await b.kv_create(gw.bus.kv[s.DEDUP_BUCKET], dedup_key, str(target).encode())
        if done is not None:
            return {"tinker_path": done.decode()}
    if body.session_id is None:
        await b.kv_put(gw.bus.kv[s.SESSIONS_BUCKET], s.token(session.session_id), session)
    now = utcnow()
    run = source_run.model_copy(  # holds the copy only: never trained, never placed
        update={
            "run_id": run_id,
            "tenant": t,
            "session_id": session.session_id,
            "created_at": now,
            "unloaded_at": now,
            "copied_from": str(source),
            "initial": None,
        }
    )
    existing = await b.kv_create(gw.bus.kv[s.RUNS_BUCKET], s.token(run_id), run.encode())
    if existing is not None:
        raise UserError(f"model id {run_id!r} is taken; copy into a new model_seq_id")
    key = store_key(t, target)
    await asyncio.to_thread(gw.settings.checkpoint_store().copy, record.store_key, key)
    copy = CheckpointRecord(
        tinker_path=str(target),
        run_id=run_id,
        tenant=t,
        kind=record.kind,
        name=record.name,
        store_key=key,
        size_bytes=record.size_bytes,
        expires_at=expiry(body.ttl_seconds),
    )
    await b.kv_put(gw.bus.kv[s.CHECKPOINTS_BUCKET], record_key(target), copy)
    await _audit(gw, "checkpoint_copied", t, target, source=str(source))
    return {"tinker_path": str(target)}


class SaveWeightsExternalBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model_id: str
    path: str
    seq_id: int
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


@router.post("/save_weights_external")
async def save_weights_external(
    body: SaveWeightsExternalBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> dict[str, object]:
    """A future: the trainer writes the run's adapter as PEFT files (``adapter_config.json``,
    ``adapter_model.safetensors``) under ``tinker://<run>/external_weights/<name>``."""
    run = await gw.run(t, body.model_id)
    async with refused_in_order(gw, t, run, body.seq_id):
        name = check_name(body.path)
        ttl = check_ttl(body.ttl_seconds)
        if body.age_encryption_recipients:
            raise UserError("age encryption of external weights is not supported by this server")
    command = SaveWeights(kind="external", name=name, overwrite=True, ttl_seconds=ttl)
    request_id = await _submit(gw, t, run, body.seq_id, "save_weights", command)
    return {"request_id": request_id, "model_id": run.run_id}


# ---------------------------------------------------------------- sessions


@router.get("/sessions")
async def list_sessions(
    limit: int = Limit,
    offset: int = Offset,
    access_scope: AccessScope = "owned",
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    found = await records(gw, s.SESSIONS_BUCKET, SessionRecord)
    mine = sorted(
        (r for r, _ in found if r.tenant == t),
        key=lambda r: (r.created_at, r.session_id),
        reverse=True,
    )
    return {"sessions": [r.session_id for r in mine[offset : offset + limit]]}


@router.get("/sessions/{session_id}")
async def get_session(
    session_id: str,
    access_scope: AccessScope = "owned",
    t: str = Depends(tenant),
    gw: Gateway = Depends(gateway),
) -> dict[str, object]:
    session = await gw.session(t, session_id)
    runs = await records(gw, s.RUNS_BUCKET, TrainingRunRecord)
    samplers = await records(gw, s.SAMPLERS_BUCKET, SamplingSessionRecord)
    return {
        "training_run_ids": _by_seq(r.run_id for r, _ in runs if r.session_id == session_id),
        "sampler_ids": _by_seq(r.sampler_id for r, _ in samplers if r.session_id == session_id),
        "user_metadata": session.user_metadata,
        **({"display_name": session.display_name} if session.display_name else {}),
    }


def _by_seq(ids: Iterable[str]) -> list[str]:
    """``<session>:<kind>:<n>`` ids in order of ``n``."""

    def n(item: str) -> tuple[int, str]:
        match = re.search(r":(\d+)$", item)
        return (int(match.group(1)) if match else -1, item)

    return sorted(ids, key=n)


class ProjectBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    project_id: str = Field(min_length=1, max_length=256)


@router.put("/sessions/{session_id}/project", status_code=204)
async def assign_session_project(
    session_id: str, body: ProjectBody, t: str = Depends(tenant), gw: Gateway = Depends(gateway)
) -> Response:
    session = await gw.session(t, session_id)
    updated = session.model_copy(update={"project_id": body.project_id})
    await b.kv_put(gw.bus.kv[s.SESSIONS_BUCKET], s.token(session_id), updated)
    await audit.record(
        gw.bus,
        "session_project_assigned",
        t,
        caller_key_id(),
        session_id=session_id,
        project_id=body.project_id,
    )
    return Response(status_code=204)


# ---------------------------------------------------------------- the caller's API key


@router.get("/auth/apikey/me")
async def get_own_key(request: Request, gw: Gateway = Depends(gateway)) -> dict[str, object]:
    """What ``tinker auth login`` checks: the key's id, name and owner (the tenant)."""
    key = request.headers.get("x-api-key") or ""
    record = await lookup_key(gw.bus, key)
    if record is None:  # revoked since the middleware looked
        raise NotFound("no such API key")
    return {
        "key_id": int(key_id_of_hash(key_hash(key)), 16),
        "name": record.key_prefix,
        "note": "",
        "details": {"org_details": {"name": record.tenant}, "user_details": {"email": ""}},
    }


@router.delete("/auth/apikey/me", status_code=204)
async def revoke_own_key(request: Request, gw: Gateway = Depends(gateway)) -> Response:
    """``tinker auth logout``: revoke the calling key, and only it."""
    key = request.headers.get("x-api-key") or ""
    await revoke_key(gw.bus, key, by_key_id=key_id(key))
    return Response(status_code=204)


@router.post("/auth/token")
async def auth_token(request: Request, gw: Gateway = Depends(gateway)) -> dict[str, str]:
    """The SDK's JWT exchange (``jwt_auth.py``), when ``jwt_auth_enabled``: an API key for a
    short-lived JWT of the same key."""
    if not gw.settings.jwt_auth_enabled:
        raise NotFound("JWT auth is not enabled on this server")
    key = request.headers.get("x-api-key") or ""
    if jwt_auth.is_jwt(key):
        raise Unauthorized("exchange an API key, not a token")
    record = await lookup_key(gw.bus, key)
    if record is None:
        raise Unauthorized("invalid API key")
    return {"jwt": jwt_auth.issue(gw.settings, key_hash(key), record.tenant)}
