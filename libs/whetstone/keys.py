"""API keys: ``tml-`` followed by 43 random url-safe characters, stored only as a SHA-256 hash
(KV ``ws_api_keys``), each mapped to one tenant."""

from __future__ import annotations

import hashlib
import secrets

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.messages import ApiKeyRecord

KEY_PREFIX = "tml-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(bus: b.Bus, tenant: str, key: str | None = None) -> str:
    """Mint (or register a given) key for ``tenant``; returns the plaintext key, shown once."""
    if not tenant or len(tenant) > 128:
        raise ValueError("tenant name must be 1-128 characters")
    key = key or new_key()
    record = ApiKeyRecord(tenant=tenant, key_prefix=key[:8])
    await b.kv_put(bus.kv[s.KEYS_BUCKET], key_hash(key), record)
    return key


async def lookup_key(bus: b.Bus, key: str) -> ApiKeyRecord | None:
    record = await b.kv_get(bus.kv[s.KEYS_BUCKET], key_hash(key), ApiKeyRecord)
    return None if record is None or record.revoked else record
