"""The SDK's JWT exchange (``services/gateway/jwt_auth.py``), with ``jwt_auth_enabled``: the real
tinker ``RestClient`` trades its key for a JWT, sends it on every request and reads ``whoami``
from it; forged, expired and revoked tokens are refused with the header that makes the SDK
fetch a new one. A gateway on uvicorn on a free port, on the test's real nats-server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jwt
import pytest
import tinker

from tests.integration.gateway_app import client, running_gateway
from tests.integration.helpers import eventually
from tests.integration.test_quotas import serving
from whetstone import bus as b
from whetstone.keys import create_key, key_hash, key_id, revoke_key

pytestmark = pytest.mark.timeout(120)


async def test_the_sdk_exchanges_its_key_for_a_jwt_and_whoami_reads_it(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, log, tmp_path: Path
) -> None:
    alice, bob = await create_key(bus, "alice"), await create_key(bus, "bob")
    async with (
        running_gateway(
            nats_url, models_dir, log, state_dir=tmp_path, jwt_auth_enabled=True, jwt_ttl_s=600
        ) as app,
        serving(app) as base_url,
    ):
        async with client(app, alice) as a:
            session = (await a.post("/api/v1/create_session", json={})).json()["session_id"]

        def with_the_sdk() -> tuple[tinker.types.WhoamiResponse, list[str], list[str]]:
            rest = tinker.RestClient(base_url=base_url, api_key=alice)  # every request by JWT
            me = rest.whoami().result()
            sessions = rest.list_sessions().result().sessions
            runs = [r.training_run_id for r in rest.list_training_runs().result().training_runs]
            return me, sessions, runs

        me, sessions, runs = await asyncio.to_thread(with_the_sdk)
        assert me.org_urn == "tml:organization:alice" and me.email is None
        assert me.user_urn == f"tml:user:{key_id(alice)}"
        assert sessions == [session] and runs == []

        async with client(app, alice) as a, client(app, bob) as other:
            token = (await a.post("/api/v1/auth/token", json={})).json()["jwt"]
            claims = jwt.decode(token, options={"verify_signature": False})
            assert claims["org_id"] == "alice" and claims["exp"] - claims["iat"] == 600
            bobs = (await other.post("/api/v1/auth/token", json={})).json()["jwt"]
        async with client(app, token) as by_token, client(app, bobs) as bob_by_token:
            assert (await by_token.get("/api/v1/sessions")).json()["sessions"] == sessions
            assert (await bob_by_token.get("/api/v1/sessions")).json()["sessions"] == []
            found = await bob_by_token.get(f"/api/v1/sessions/{sessions[0]}")
            assert found.status_code == 404  # another tenant's session, by JWT too
            again = await by_token.post("/api/v1/auth/token", json={})
            assert again.status_code == 401  # a JWT cannot renew itself

        secret = app.state.gateway.settings.jwt_secret
        now = int(time.time())
        good = {"iss": "whetstone", "kh": key_hash(alice), "iat": now, "exp": now + 600}
        invalid = [
            jwt.encode(good, "n" * 40, algorithm="HS256"),  # forged: another secret
            jwt.encode({**good, "iat": now - 700, "exp": now - 100}, secret, algorithm="HS256"),
            jwt.encode({k: v for k, v in good.items() if k != "kh"}, secret, algorithm="HS256"),
            token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),  # tampered
        ]
        for bad in invalid:  # refused, with the header that makes the SDK fetch a new JWT
            async with client(app, bad) as refused:
                answer = await refused.get("/api/v1/training_runs")
                assert answer.status_code == 401 and answer.json()["category"] == "user"
                assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        unknown = jwt.encode({**good, "kh": key_hash("tml-unknown")}, secret, algorithm="HS256")
        async with client(app, unknown) as refused:
            answer = await refused.get("/api/v1/training_runs")
            assert answer.status_code == 401 and "invalid API key" in answer.json()["error"]
        async with client(app, jwt.encode(good, secret, algorithm="HS256")) as minted:
            assert (await minted.get("/api/v1/sessions")).json()["sessions"] == sessions

        # A revoked key's JWTs stop working as soon as the gateway sees the revocation.
        await revoke_key(bus, alice)
        async with client(app, token) as by_token:

            async def refused() -> bool:
                return (await by_token.get("/api/v1/sessions")).status_code == 401

            await eventually(refused)


async def test_without_the_setting_there_is_no_exchange_and_jwts_are_no_keys(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, log, tmp_path: Path
) -> None:
    key = await create_key(bus, "alice")
    async with running_gateway(nats_url, models_dir, log, state_dir=tmp_path) as app:
        async with client(app, key) as http:
            config = (await http.post("/api/v1/client/config", json={})).json()
            assert config["pjwt_auth_enabled"] is False
            assert (await http.post("/api/v1/auth/token", json={})).status_code == 404
        secret = app.state.gateway.settings.jwt_secret
        now = int(time.time())
        claims = {"iss": "whetstone", "kh": key_hash(key), "iat": now, "exp": now + 600}
        async with client(app, jwt.encode(claims, secret, algorithm="HS256")) as by_token:
            assert (await by_token.get("/api/v1/sessions")).status_code == 401
