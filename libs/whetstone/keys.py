"""API keys: ``tml-`` followed by 43 random url-safe characters, stored only as a SHA-256 hash
(KV ``ws_api_keys``), each mapped to one tenant.

Owns minting, lookup, listing and revocation. A key may be an admin key (``admin``): it reads
every tenant's usage, invoices and the finance page; a tenant's key sees only its own usage. A
key's id (``key_id``, the first characters of its hash) names it in usage events and reports
without revealing it. A revoked key keeps its record (``revoked``), so
listings still show it and it can never be looked up again; gateways drop it from their caches
when they see the record change on ``$KV.ws_api_keys.<hash>``. A key may carry quotas
(``max_runs``, ``max_inflight``, changed by ``set_limits``), which the gateway enforces
(``services/gateway/quotas.py``). Every creation, revocation and change of limits is written to
the audit log (``audit.py``).
"""

from __future__ import annotations

import hashlib
import secrets

from nats.js.errors import NoKeysError

from whetstone import audit
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.errors import NotFound, UserError
from whetstone.messages import ApiKeyRecord

KEY_PREFIX = "tml-"
PREFIX_CHARS = 8  # how much of a key its record keeps, to recognise it in listings
KEY_ID_CHARS = 16  # how much of a key's hash names it in usage events


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """The id of ``key`` in usage events and reports (``key_id_of_hash`` of its hash)."""
    return key_id_of_hash(key_hash(key))


def key_id_of_hash(digest: str) -> str:
    return digest[:KEY_ID_CHARS]


async def create_key(
    bus: b.Bus,
    tenant: str,
    key: str | None = None,
    *,
    admin: bool = False,
    max_runs: int | None = None,
    max_inflight: int | None = None,
) -> str:
    """Mint (or register a given) key for ``tenant``; returns the plaintext key, shown once.
    ``max_runs``/``max_inflight``: the key's quotas (None: the platform's default, 0: none)."""
    if not tenant or len(tenant) > 128:
        raise ValueError("tenant name must be 1-128 characters")
    key = key or new_key()
    record = ApiKeyRecord(
        tenant=tenant,
        key_prefix=key[:PREFIX_CHARS],
        admin=admin,
        max_runs=max_runs,
        max_inflight=max_inflight,
    )
    await b.kv_put(bus.kv[s.KEYS_BUCKET], key_hash(key), record)
    await audit.record(bus, "api_key_created", tenant, key_id=key_id(key), admin=str(admin).lower())
    return key


async def register_key(bus: b.Bus, tenant: str, key: str) -> ApiKeyRecord:
    """Register ``key`` for ``tenant`` unless it is known already; return its record as stored.

    Unlike ``create_key`` this never overwrites: a key that was revoked stays revoked.
    """
    record = ApiKeyRecord(tenant=tenant, key_prefix=key[:PREFIX_CHARS])
    existing = await b.kv_create(bus.kv[s.KEYS_BUCKET], key_hash(key), record.encode())
    if existing is not None:
        return ApiKeyRecord.decode(existing)
    await audit.record(bus, "api_key_created", tenant, key_id=key_id(key), admin="false")
    return record


async def lookup_key(bus: b.Bus, key: str) -> ApiKeyRecord | None:
    return await lookup_hash(bus, key_hash(key))


async def lookup_hash(bus: b.Bus, digest: str) -> ApiKeyRecord | None:
    """The record of the key whose hash is ``digest``, unless revoked."""
    record = await b.kv_get(bus.kv[s.KEYS_BUCKET], digest, ApiKeyRecord)
    return None if record is None or record.revoked else record


async def list_keys(bus: b.Bus) -> list[tuple[str, ApiKeyRecord]]:
    """Every key record as (hash, record), oldest first; revoked ones included."""
    kv = bus.kv[s.KEYS_BUCKET]
    try:
        hashes = await kv.keys()
    except NoKeysError:
        return []
    found = [(h, await b.kv_get(kv, h, ApiKeyRecord)) for h in hashes]
    records = [(h, r) for h, r in found if r is not None]
    return sorted(records, key=lambda item: (item[1].created_at, item[1].tenant))


async def revoke_key(
    bus: b.Bus, prefix_or_key: str, *, by_key_id: str | None = None
) -> ApiKeyRecord:
    """Revoke one key, named by the whole key or by its listed prefix; return its new record.
    ``by_key_id``: the key that asked (the audit log's actor; None: the operator).

    A prefix that matches several keys is refused (pass the whole key then).
    """
    digest, record = await _find_key(bus, prefix_or_key, "revoke")
    revoked = record.model_copy(update={"revoked": True})
    await b.kv_put(bus.kv[s.KEYS_BUCKET], digest, revoked)
    await audit.record(
        bus, "api_key_revoked", record.tenant, by_key_id, key_id=key_id_of_hash(digest)
    )
    return revoked


UNSET = -1  # ``set_limits``: leave this quota as it is


async def set_limits(
    bus: b.Bus,
    prefix_or_key: str,
    *,
    max_runs: int | None = UNSET,
    max_inflight: int | None = UNSET,
) -> ApiKeyRecord:
    """Change a key's quotas (None: back to the platform's default, 0: no limit, ``UNSET``:
    unchanged); return its new record. Gateways apply them from the key's next request on."""
    digest, record = await _find_key(bus, prefix_or_key, "change")
    update = {
        name: value
        for name, value in (("max_runs", max_runs), ("max_inflight", max_inflight))
        if value != UNSET
    }
    changed = ApiKeyRecord.model_validate({**record.model_dump(), **update})
    await b.kv_put(bus.kv[s.KEYS_BUCKET], digest, changed)
    await audit.record(
        bus,
        "api_key_limits_changed",
        record.tenant,
        key_id=key_id_of_hash(digest),
        max_runs=str(changed.max_runs),
        max_inflight=str(changed.max_inflight),
    )
    return changed


async def _find_key(bus: b.Bus, prefix_or_key: str, verb: str) -> tuple[str, ApiKeyRecord]:
    """One key's (hash, record), named by the whole key or by its listed prefix."""
    kv = bus.kv[s.KEYS_BUCKET]
    if len(prefix_or_key) > PREFIX_CHARS:  # a whole key: find it by its hash
        digest = key_hash(prefix_or_key)
        record = await b.kv_get(kv, digest, ApiKeyRecord)
        if record is None:
            raise NotFound("no such API key")
        matches = [(digest, record)]
    else:
        matches = [(h, r) for h, r in await list_keys(bus) if r.key_prefix == prefix_or_key]
        if not matches:
            raise NotFound(f"no API key with prefix {prefix_or_key!r} (see `whetstone keys list`)")
        if len(matches) > 1:
            raise UserError(
                f"{len(matches)} keys have prefix {prefix_or_key!r}; "
                f"pass the whole key to {verb} one"
            )
    return matches[0]
