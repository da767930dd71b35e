"""The SDK's JWT exchange (protocol.md §2.1), behind the gateway setting ``jwt_auth_enabled``
(off by default): ``client/config`` then answers ``pjwt_auth_enabled: true``, the SDK trades its
API key for a short-lived JWT at ``POST /api/v1/auth/token`` (the route is in ``rest.py``) and
sends that JWT as its ``X-API-Key`` on every later request, refreshing it at half its life.
``RestClient.whoami`` reads the caller's identity from the JWT's claims.

A JWT is HMAC-SHA256-signed with ``jwt_secret`` (PyJWT) and lives ``jwt_ttl_s``. Its claims:
``sub`` (``tml:user:<key id>``), ``org_id`` (the tenant), ``email`` (empty: keys name no
person), ``iat``/``exp``, ``iss`` and ``kh``, the SHA-256 of the API key it was issued for.
The gateway resolves a JWT to that key's record exactly as it does the key itself
(``Gateway.digest_of``): so a revoked key's JWTs stop at once, and quotas and usage are the
key's. A bad, forged or expired JWT gets 401 with ``WWW-Authenticate: Bearer
error="invalid_token"``, which makes the SDK fetch a new one and replay the request. Only an
API key, never a JWT, can be exchanged, so a JWT cannot renew itself.
"""

from __future__ import annotations

import time

import jwt

from services.gateway.settings import GatewaySettings
from whetstone.errors import Unauthorized
from whetstone.keys import key_hash, key_id_of_hash

ISSUER = "whetstone"
ALGORITHM = "HS256"
INVALID_TOKEN = 'Bearer error="invalid_token"'


class InvalidToken(Unauthorized):
    """A JWT that is not (or no longer) valid: the SDK replaces it and replays the request."""


def is_jwt(credential: str) -> bool:
    return credential.startswith("eyJ")


def issue(settings: GatewaySettings, digest: str, tenant: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": f"tml:user:{key_id_of_hash(digest)}",
        "org_id": tenant,
        "email": "",
        "kh": digest,
        "iat": now,
        "exp": now + settings.jwt_ttl_s,
    }
    return jwt.encode(claims, settings.jwt_secret, algorithm=ALGORITHM)


def digest_of(settings: GatewaySettings, credential: str) -> str:
    """The key hash a credential stands for: the key's own, or the one a valid JWT names."""
    if not (settings.jwt_auth_enabled and is_jwt(credential)):
        return key_hash(credential)
    try:
        claims = jwt.decode(
            credential,
            settings.jwt_secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "iss", "kh"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"invalid token: {exc}") from exc
    digest = claims["kh"]
    if not isinstance(digest, str):
        raise InvalidToken("invalid token: no key")
    return digest
