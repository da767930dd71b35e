"""The REST routes (protocol.md §3.4) and authentication-first, on a real nats-server.

Two halves:

* In the test's event loop: the gateway (ASGI, through httpx), a real Scheduler and a real
  TrainerWorker on the built-in model. Authentication before routing, every route that names a
  run, checkpoint or session answering another tenant 404 (a published checkpoint readable by
  all, writable by its owner only), TTLs and their expiry by the scheduler's sweep.
* Against a platform of real processes (``platform`` fixture) through the real tinker
  ``RestClient``, ``ServiceClient`` and ``TrainingClient``: listings with pagination, run info,
  publish, TTL, delete, weights_info, copy_weights, sessions, the key's own routes, and
  ``save_weights_external`` with signed download URLs (a tampered or expired one is 403).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import tinker
from tinker import types

from services.gateway.context import parse_dedup, train_dedup_key
from tests.integration.gateway_app import client, create_run, result_of, running_gateway
from tests.integration.test_failover import start_scheduler
from whetstone import audit
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.keys import create_key, key_id, revoke_key, set_limits
from whetstone.messages import utcnow
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(180)


# ---------------------------------------------------------------- in-process gateway


async def save(http: httpx.AsyncClient, run_id: str, seq_id: int, kind: str, name: str) -> str:
    endpoint = "save_weights" if kind == "training" else "save_weights_for_sampler"
    answer = await http.post(
        f"/api/v1/{endpoint}",
        json={"model_id": run_id, "seq_id": seq_id, "path": name, "type": endpoint},
    )
    assert answer.status_code == 200, answer.text
    result = (await result_of(http, answer.json()["request_id"])).json()
    assert "error" not in result, result
    return str(result["path"])


async def test_every_route_answers_401_before_routing(
    bus: b.Bus, nats_url: str, models_dir: Path, log, tmp_path: Path
) -> None:
    key = await create_key(bus, "alice")
    async with running_gateway(nats_url, models_dir, log, state_dir=tmp_path) as app:
        for credential in (None, "tml-not-a-key"):
            async with client(app, credential) as http:
                for method, path in [
                    ("GET", "/api/v1/training_runs"),
                    ("GET", "/api/v1/checkpoints"),
                    ("DELETE", "/api/v1/training_runs/sess-a:train:0/checkpoints/weights/c"),
                    ("PUT", "/api/v1/training_runs/sess-a:train:0/checkpoints/weights/c/ttl"),
                    ("GET", "/api/v1/auth/apikey/me"),
                    ("POST", "/api/v1/auth/token"),
                    ("POST", "/api/v1/sessions/search"),
                    ("GET", "/api/v1/audit"),
                    ("POST", "/api/v1/create_session"),
                    ("POST", "/api/v1/no_such_endpoint"),  # unknown: still 401, not 404
                    ("GET", "/api/v1/no/such/route"),
                    ("GET", "/no-such-page"),
                ]:
                    answer = await http.request(method, path, json={})
                    assert answer.status_code == 401, (credential, method, path, answer.text)
                    assert answer.json()["category"] == "user" and answer.json()["error"]
            async with client(app, None) as http:  # the probes need no key
                assert (await http.get("/livez")).status_code == 200
                assert (await http.get("/api/v1/healthz")).json() == {"status": "ok"}
        async with client(app, key) as http:
            run_id, _ = await create_run(http)
            # An unknown endpoint with a valid key: 404, and the seq_id it spent is filled.
            answer = await http.post(
                "/api/v1/no_such_endpoint", json={"model_id": run_id, "seq_id": 1}
            )
            assert answer.status_code == 404 and answer.json()["category"] == "user"
            entry = await bus.kv[s.DEDUP_BUCKET].get(train_dedup_key(run_id, 1))
            assert entry.value is not None and parse_dedup(entry.value) == ("refused", True)


async def test_other_tenants_get_404_and_published_checkpoints_are_readable_by_all(
    bus: b.Bus,
    spawned: None,
    start_trainer,
    nats_url: str,
    models_dir: Path,
    log,
    tmp_path: Path,
) -> None:
    await start_trainer("w1", heartbeat_interval_s=0.2)
    await start_scheduler(bus, nats_url, tmp_path, log)
    alice, bob = await create_key(bus, "alice"), await create_key(bus, "bob")
    async with (
        running_gateway(nats_url, models_dir, log, state_dir=tmp_path) as app,
        client(app, alice) as a,
        client(app, bob) as other,
    ):
        run_id, created = await create_run(a)
        assert "error" not in (await result_of(a, created)).json()
        session_id = run_id.split(":")[0]
        weights = await save(a, run_id, 1, "training", "w")
        sampler = await save(a, run_id, 2, "sampler", "s")
        ckpt = f"/api/v1/training_runs/{run_id}/checkpoints"

        # Every route that names alice's run, checkpoints or session: 404 for bob.
        refused = [
            ("GET", f"/api/v1/training_runs/{run_id}", None),
            ("GET", f"/api/v1/training_runs/{run_id}?access_scope=accessible", None),
            ("GET", ckpt, None),
            ("DELETE", f"{ckpt}/weights/w", None),
            ("POST", f"{ckpt}/weights/w/publish", None),
            ("DELETE", f"{ckpt}/weights/w/publish", None),
            ("PUT", f"{ckpt}/weights/w/ttl", {"ttl_seconds": 7200}),
            ("GET", f"{ckpt}/external_weights/x/external_weights_urls", None),
            ("POST", "/api/v1/weights_info", {"tinker_path": weights}),
            (
                "POST",
                "/api/v1/copy_weights",
                {"source_path": weights, "destination_project_id": "p"},
            ),
            ("GET", f"/api/v1/sessions/{session_id}", None),
            ("PUT", f"/api/v1/sessions/{session_id}/project", {"project_id": "p"}),
            (
                "POST",
                "/api/v1/save_weights_external",
                {"model_id": run_id, "path": "e", "seq_id": 3},
            ),
        ]
        for method, path, body in refused:
            answer = await other.request(method, path, json=body)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["category"] == "user"
        assert (await other.get("/api/v1/training_runs")).json()["training_runs"] == []
        assert (await other.get("/api/v1/checkpoints")).json()["checkpoints"] == []
        assert (await other.get("/api/v1/sessions")).json() == {"sessions": []}
        bob_session = (await other.post("/api/v1/create_session", json={})).json()["session_id"]
        sample_from = {"session_id": bob_session, "sampling_session_seq_id": 0}
        answer = await other.post(
            "/api/v1/create_sampling_session", json={**sample_from, "model_path": sampler}
        )
        assert answer.status_code == 404, answer.text

        # Published: bob may read it (info, sampling, a copy of his own), never change it.
        for path in (weights, sampler):
            kind_name = path.split("/", 3)[3]
            assert (await a.post(f"{ckpt}/{kind_name}/publish")).status_code == 204
            assert (await a.post(f"{ckpt}/{kind_name}/publish")).status_code == 204  # idempotent
        accessible = (await other.get("/api/v1/training_runs?access_scope=accessible")).json()
        assert [r["training_run_id"] for r in accessible["training_runs"]] == [run_id]
        run = await other.get(f"/api/v1/training_runs/{run_id}?access_scope=accessible")
        assert types.TrainingRun.model_validate(run.json()).model_owner == "alice"
        owned = await other.get(f"/api/v1/training_runs/{run_id}?access_scope=owned")
        assert owned.status_code == 404
        info = types.WeightsInfoResponse.model_validate(
            (await other.post("/api/v1/weights_info", json={"tinker_path": weights})).json()
        )
        assert info.base_model == BUILTIN_MODEL_NAME and info.is_lora and info.lora_rank == 4
        answer = await other.post(
            "/api/v1/create_sampling_session", json={**sample_from, "model_path": sampler}
        )
        assert answer.status_code == 200, answer.text
        copied = await other.post(
            "/api/v1/copy_weights",
            json={"source_path": weights, "destination_project_id": "bobs"},
            headers={"X-Idempotency-Key": "copy-1"},
        )
        assert copied.status_code == 200, copied.text
        copy_path = types.CopyWeightsResponse.model_validate(copied.json()).tinker_path
        again = await other.post(
            "/api/v1/copy_weights",
            json={"source_path": weights, "destination_project_id": "bobs"},
            headers={"X-Idempotency-Key": "copy-1"},
        )
        assert again.json()["tinker_path"] == copy_path  # a retried copy is the same copy
        listed = types.CheckpointsListResponse.model_validate(
            (await other.get("/api/v1/checkpoints")).json()
        )
        assert [c.tinker_path for c in listed.checkpoints] == [copy_path]
        runs = (await other.get("/api/v1/training_runs?project_id=bobs")).json()
        assert [r["training_run_id"] for r in runs["training_runs"]] == [copy_path.split("/")[2]]
        for method, path, body in refused[3:7]:  # delete, publish, unpublish, ttl: still 404
            assert (await other.request(method, path, json=body)).status_code == 404
        assert (await a.delete(f"{ckpt}/weights/w/publish")).status_code == 204
        answer = await other.post("/api/v1/weights_info", json={"tinker_path": weights})
        assert answer.status_code == 404


async def test_ttl_is_set_and_expired_checkpoints_are_deleted_by_the_sweep(
    bus: b.Bus,
    spawned: None,
    start_trainer,
    nats_url: str,
    models_dir: Path,
    log,
    tmp_path: Path,
) -> None:
    await start_trainer("w1", heartbeat_interval_s=0.2)
    scheduler, _ = await start_scheduler(bus, nats_url, tmp_path, log)
    key = await create_key(bus, "alice")
    async with (
        running_gateway(nats_url, models_dir, log, state_dir=tmp_path) as app,
        client(app, key) as http,
    ):
        run_id, created = await create_run(http)
        assert "error" not in (await result_of(http, created)).json()
        await save(http, run_id, 1, "training", "keep")
        await save(http, run_id, 2, "training", "old")
        ckpt = f"/api/v1/training_runs/{run_id}/checkpoints"
        store = tmp_path / "checkpoints"
        files_of = {p.parent.name for p in store.rglob("*") if p.is_file() and "training" in str(p)}
        assert len(files_of) == 2

        for bad in (10, 11 * 365 * 24 * 3600, "soon"):
            answer = await http.put(f"{ckpt}/weights/old/ttl", json={"ttl_seconds": bad})
            assert answer.status_code == 400 and answer.json()["category"] == "user", bad
        assert (
            await http.put(f"{ckpt}/weights/old/ttl", json={"ttl_seconds": 3600})
        ).status_code == 204
        assert (
            await http.put(f"{ckpt}/weights/keep/ttl", json={"ttl_seconds": 7200})
        ).status_code == 204
        assert (
            await http.put(f"{ckpt}/weights/keep/ttl", json={"ttl_seconds": None})
        ).status_code == 204
        listed = types.CheckpointsListResponse.model_validate((await http.get(ckpt)).json())
        expiry = {c.checkpoint_id: c.expires_at for c in listed.checkpoints}
        assert expiry["weights/keep"] is None
        old_expiry = expiry["weights/old"]
        assert old_expiry is not None
        assert timedelta(minutes=59) < old_expiry - utcnow() <= timedelta(hours=1)

        assert await scheduler.expire_checkpoints() == 0  # nothing is due yet
        assert await scheduler.expire_checkpoints(utcnow() + timedelta(hours=2)) == 1
        (expired,) = [
            e
            for e in await audit.read_day(bus, utcnow().date(), "checkpoints")
            if e.details.get("reason") == "expired"
        ]
        assert expired.tenant == "alice" and expired.details["tinker_path"].endswith("/weights/old")
        assert expired.api_key_id is None  # the platform did it, no key
        listed = types.CheckpointsListResponse.model_validate((await http.get(ckpt)).json())
        assert [c.checkpoint_id for c in listed.checkpoints] == ["weights/keep"]
        user = (await http.get("/api/v1/checkpoints")).json()
        assert [c["checkpoint_id"] for c in user["checkpoints"]] == ["weights/keep"]
        remaining = {
            p.parent.name for p in store.rglob("*") if p.is_file() and "training" in str(p)
        }
        assert len(remaining) == 1 and remaining < files_of
        assert (await http.delete(f"{ckpt}/weights/old")).status_code == 404


async def test_audit_log_records_security_events_for_admin_keys_only(
    bus: b.Bus,
    spawned: None,
    start_trainer,
    nats_url: str,
    models_dir: Path,
    log,
    tmp_path: Path,
) -> None:
    await start_trainer("w1", heartbeat_interval_s=0.2)
    await start_scheduler(bus, nats_url, tmp_path, log)
    ops, alice = await create_key(bus, "ops", admin=True), await create_key(bus, "alice")
    async with (
        running_gateway(nats_url, models_dir, log, state_dir=tmp_path) as app,
        client(app, alice) as a,
        client(app, ops) as admin,
    ):
        run_id, created = await create_run(a)
        assert "error" not in (await result_of(a, created)).json()
        weights = await save(a, run_id, 1, "training", "w")
        ckpt = f"/api/v1/training_runs/{run_id}/checkpoints/weights/w"
        assert (await a.post(f"{ckpt}/publish")).status_code == 204
        assert (await a.delete(f"{ckpt}/publish")).status_code == 204
        assert (await a.put(f"{ckpt}/ttl", json={"ttl_seconds": 7200})).status_code == 204
        copied = await a.post(
            "/api/v1/copy_weights", json={"source_path": weights, "destination_project_id": "p"}
        )
        copy_path = copied.json()["tinker_path"]
        copy_run = copy_path.split("/")[2]
        # A copy holds weights; as in Tinker it cannot be trained on (and fills no queue).
        refused = await a.post(
            "/api/v1/optim_step",
            json={"model_id": copy_run, "seq_id": 1, "adam_params": {"learning_rate": 1e-4}},
        )
        assert refused.status_code == 400 and "cannot be trained" in refused.json()["error"]
        assert (await a.delete(ckpt)).status_code == 204
        session_id = run_id.split(":")[0]
        moved = await a.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": "q"})
        assert moved.status_code == 204
        answer = await a.post("/api/v1/unload_model", json={"model_id": run_id})
        assert answer.status_code == 200, answer.text
        await set_limits(bus, alice, max_runs=3)
        await revoke_key(bus, alice)

        # Only an admin key reads it; the others get 401 (no or a revoked key) or 403.
        bob = await create_key(bus, "bob")
        async with client(app, bob) as other, client(app, None) as anonymous:
            denied = await other.get("/api/v1/audit")
            assert denied.status_code == 403 and denied.json()["category"] == "user"
            assert (await anonymous.get("/api/v1/audit")).status_code == 401
        assert (await a.get("/api/v1/audit")).status_code == 401  # alice's key is revoked

        log_ = types.AuditLogResponse.model_validate((await admin.get("/api/v1/audit")).json())
        mine = [e for e in log_.entries if e.event_details.get("tenant") == "alice"]
        assert [e.event for e in mine] == [
            "api_key_created",
            "training_run_created",
            "checkpoint_published",
            "checkpoint_unpublished",
            "checkpoint_ttl_set",
            "checkpoint_copied",
            "checkpoint_deleted",
            "session_project_assigned",
            "training_run_unloaded",
            "api_key_limits_changed",
            "api_key_revoked",
        ]
        assert [e.timestamp for e in log_.entries] == sorted(e.timestamp for e in log_.entries)
        published = mine[2]
        assert published.tinker_path == weights and published.model_id == run_id
        assert published.event_details["api_key_id"] == key_id(alice)
        assert mine[4].event_details["ttl_seconds"] == "7200"
        assert mine[5].tinker_path == copy_path and mine[5].event_details["source"] == weights
        assert {e.event_details.get("tenant") for e in log_.entries} == {"alice", "ops", "bob"}

        checkpoints = (await admin.get("/api/v1/audit?event_type=checkpoints")).json()
        assert {e["event"] for e in checkpoints["entries"]} == {
            e.event for e in mine if e.event.startswith("checkpoint_")
        }
        keys = (await admin.get("/api/v1/audit", params={"event_type": "organizations"})).json()
        assert {e["event"] for e in keys["entries"]} == {
            "api_key_created",
            "api_key_limits_changed",
            "api_key_revoked",
        }
        assert (await admin.get("/api/v1/audit?event_type=teams")).json() == {"entries": []}
        yesterday = (utcnow() - timedelta(days=1)).date().isoformat()
        assert (await admin.get(f"/api/v1/audit?day={yesterday}")).json() == {"entries": []}
        for bad in ("event_type=runs", "day=yesterday"):
            answer = await admin.get(f"/api/v1/audit?{bad}")
            assert answer.status_code == 400 and answer.json()["category"] == "user", bad


async def test_sessions_search_filters_pages_and_never_finds_other_tenants(
    bus: b.Bus, spawned: None, nats_url: str, models_dir: Path, log, tmp_path: Path
) -> None:
    alice, bob = await create_key(bus, "alice"), await create_key(bus, "bob")
    async with (
        running_gateway(nats_url, models_dir, log, state_dir=tmp_path) as app,
        client(app, alice) as a,
        client(app, bob) as other,
    ):

        async def session(**body: object) -> str:
            answer = await a.post("/api/v1/create_session", json={"tags": [], **body})
            return str(answer.json()["session_id"])

        nightly = await session(display_name="Nightly SFT run", user_metadata={"team": "x"})
        adhoc = await session(display_name="ad-hoc", project_id="lab")
        done = await session(display_name="nightly eval")
        finished = await a.post(
            f"/api/v1/sessions/{done}/finish", json={"reason": {"type": "success"}}
        )
        assert finished.status_code == 200
        bobs = (await other.post("/api/v1/create_session", json={"tags": []})).json()["session_id"]

        async def search(
            http: httpx.AsyncClient = a, **body: object
        ) -> types.SessionSearchResponse:
            request = types.SessionSearchRequest.model_validate(body)
            answer = await http.post(
                "/api/v1/sessions/search", json=request.model_dump(mode="json", exclude_none=True)
            )
            assert answer.status_code == 200, answer.text
            return types.SessionSearchResponse.model_validate(answer.json())

        everything = await search()
        assert [x.session_id for x in everything.sessions] == [done, adhoc, nightly]  # newest first
        assert everything.next_cursor is None
        assert {x.owner for x in everything.sessions} == {"alice"}
        by_name = await search(display_name="NIGHTLY")
        assert [x.session_id for x in by_name.sessions] == [done, nightly]
        assert [x.session_id for x in (await search(display_name="sft nightly")).sessions] == [
            nightly
        ]
        either = await search(display_name="ad-hoc", session_id=nightly)
        assert [x.session_id for x in either.sessions] == [adhoc, nightly]
        lab = await search(project_ids=["lab"])
        assert [(x.session_id, x.project_id) for x in lab.sessions] == [(adhoc, "lab")]
        assert [x.session_id for x in (await search(user_metadata={"team": "x"})).sessions] == [
            nightly
        ]
        active = await search(statuses=[{"type": "active"}])
        assert [x.session_id for x in active.sessions] == [adhoc, nightly]
        success = await search(statuses=[{"type": "client_finished", "reasons": ["success"]}])
        assert [x.session_id for x in success.sessions] == [done]
        assert isinstance(success.sessions[0].status, types.ClientSessionFinished)
        assert (await search(statuses=[{"type": "failed"}])).sessions == []

        first = await search(limit=2)
        assert [x.session_id for x in first.sessions] == [done, adhoc]
        assert first.next_cursor is not None
        rest_ = await search(limit=2, cursor=first.next_cursor.model_dump(mode="json"))
        assert [x.session_id for x in rest_.sessions] == [nightly] and rest_.next_cursor is None

        # Another tenant's sessions are never found, by id, by owner or as "accessible".
        assert (await search(other, session_id=nightly)).sessions == []
        assert [
            x.session_id for x in (await search(other, owner={"type": "accessible"})).sessions
        ] == [bobs]
        assert (await search(owner={"type": "user", "owner_urns": ["bob"]})).sessions == []
        for bad in ({"limit": 0}, {"owner": {"type": "everyone"}}, {"unknown": 1}):
            answer = await a.post("/api/v1/sessions/search", json=bad)
            assert answer.status_code == 400 and answer.json()["category"] == "user", bad
        async with client(app, None) as anonymous:
            assert (await anonymous.post("/api/v1/sessions/search", json={})).status_code == 401


# ---------------------------------------------------------------- the real SDK, real processes


@pytest.fixture(scope="module")
def sdk(platform):
    """A service client with one trained-for-a-step run and two checkpoints of it."""
    service = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    training = service.create_lora_training_client(base_model=BUILTIN_MODEL_NAME, rank=4).result()
    saved = training.save_state("first").result().path
    sampler = training.save_weights_for_sampler("for-sampling").result().path
    rest = tinker.RestClient(base_url=platform.base_url, api_key=platform.api_key)
    yield service, training, rest, saved, sampler
    service.close("success").result()


def test_rest_client_lists_runs_and_checkpoints_with_pagination(sdk) -> None:
    service, training, rest, saved, sampler = sdk
    second = service.create_lora_training_client(base_model=BUILTIN_MODEL_NAME, rank=8).result()
    runs = rest.list_training_runs(limit=1).result()
    assert runs.cursor.total_count == 2 and runs.cursor.limit == 1 and len(runs.training_runs) == 1
    assert runs.training_runs[0].training_run_id == second.model_id  # newest first
    rest_page = rest.list_training_runs(limit=1, offset=1).result()
    assert [r.training_run_id for r in rest_page.training_runs] == [training.model_id]

    run = rest.get_training_run(training.model_id).result()
    assert run.base_model == BUILTIN_MODEL_NAME and run.is_lora and run.lora_rank == 4
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == saved
    assert run.last_sampler_checkpoint is not None
    assert run.last_sampler_checkpoint.tinker_path == sampler
    assert (
        rest.get_training_run_by_tinker_path(saved).result().training_run_id == run.training_run_id
    )

    listed = rest.list_checkpoints(training.model_id).result()
    assert {(c.checkpoint_type, c.tinker_path) for c in listed.checkpoints} == {
        ("training", saved),
        ("sampler", sampler),
    }
    assert all(c.size_bytes and c.size_bytes > 0 and not c.public for c in listed.checkpoints)
    first = rest.list_user_checkpoints(limit=1).result()
    assert first.cursor is not None and first.cursor.total_count == 2
    assert [c.tinker_path for c in first.checkpoints] == [sampler]  # newest first
    following = rest.list_user_checkpoints(limit=1, offset=1).result()
    assert [c.tinker_path for c in following.checkpoints] == [saved]


def test_rest_client_publishes_sets_ttl_reads_weights_info_and_deletes(sdk, platform) -> None:
    service, training, rest, saved, _ = sdk
    rest.publish_checkpoint_from_tinker_path(saved).result()
    (found,) = [
        c
        for c in rest.list_checkpoints(training.model_id).result().checkpoints
        if c.tinker_path == saved
    ]
    assert found.public
    rest.unpublish_checkpoint_from_tinker_path(saved).result()
    rest.set_checkpoint_ttl_from_tinker_path(saved, 86400).result()
    (found,) = [
        c
        for c in rest.list_checkpoints(training.model_id).result().checkpoints
        if c.tinker_path == saved
    ]
    assert found.expires_at is not None and not found.public
    rest.set_checkpoint_ttl_from_tinker_path(saved, None).result()

    info = rest.get_weights_info_by_tinker_path(saved).result()
    assert info.base_model == BUILTIN_MODEL_NAME and info.lora_rank == 4
    assert info.train_attn and info.train_mlp and info.train_unembed

    # A copy into a project of the caller's: a new run, its own listed checkpoint.
    copied = rest.copy_weights(saved, "proj-archive").result()
    assert copied != saved and copied.endswith("/weights/first")
    archive = rest.list_training_runs(project_id="proj-archive").result().training_runs
    assert [r.training_run_id for r in archive] == [copied.split("/")[2]]
    assert rest.get_weights_info_by_tinker_path(copied).result().lora_rank == 4
    rest.delete_checkpoint_from_tinker_path(copied).result()

    extra = training.save_state("to-delete").result().path
    rest.delete_checkpoint_from_tinker_path(extra).result()
    paths = [c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints]
    assert extra not in paths and saved in paths
    store = platform.state_dir / "checkpoints"
    assert not [p for p in store.rglob("*") if p.is_dir() and p.name.endswith(s.token("to-delete"))]
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(extra).result()


def test_rest_client_sessions_and_the_callers_key(sdk, platform) -> None:
    service, training, rest, _, _ = sdk
    session_id = training.model_id.split(":")[0]
    assert session_id in rest.list_sessions().result().sessions
    session = rest.get_session(session_id).result()
    assert training.model_id in session.training_run_ids
    rest.assign_session_project(session_id, "proj-x").result()
    in_project = rest.list_training_runs(project_id="proj-x").result()
    assert training.model_id in [r.training_run_id for r in in_project.training_runs]
    assert rest.list_training_runs(project_id="elsewhere").result().training_runs == []

    # The key's own routes (``tinker auth login`` / ``logout`` call them with plain httpx).
    async def mint() -> str:
        bus = await b.connect(platform.nats_url, "test-keys")
        try:
            return await create_key(bus, "carol")
        finally:
            await bus.close()

    key = asyncio.run(mint())
    me = httpx.get(f"{platform.base_url}/api/v1/auth/apikey/me", headers={"X-API-Key": key})
    assert me.status_code == 200, me.text
    body = me.json()
    assert isinstance(body["key_id"], int) and body["details"]["org_details"]["name"] == "carol"
    revoked = httpx.delete(f"{platform.base_url}/api/v1/auth/apikey/me", headers={"X-API-Key": key})
    assert revoked.status_code == 204
    after = httpx.get(f"{platform.base_url}/api/v1/training_runs", headers={"X-API-Key": key})
    assert after.status_code == 401 and after.json()["category"] == "user"


def test_external_weights_download_through_signed_urls(sdk) -> None:
    service, training, rest, _, _ = sdk
    external = training.save_weights_external("export", ttl_seconds=3600).result()
    assert external.path == f"tinker://{training.model_id}/external_weights/export"
    listed = rest.list_checkpoints(training.model_id).result().checkpoints
    (found,) = [c for c in listed if c.tinker_path == external.path]
    assert found.checkpoint_type == "external" and found.expires_at is not None

    urls = rest.get_external_weights_urls(external.path).result()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(urls.urls)
    assert urls.expires > utcnow()
    with urllib.request.urlopen(urls.urls["adapter_config.json"], timeout=30) as answer:
        config = json.loads(answer.read())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    with urllib.request.urlopen(urls.urls["adapter_model.safetensors"], timeout=30) as answer:
        assert int(answer.headers["Content-Length"]) > 0

    url = urlsplit(urls.urls["adapter_config.json"])
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    for changed in (
        {**query, "sig": "0" * 64},  # tampered signature
        {**query, "expires": str(int(query["expires"]) + 1)},  # a longer life, same signature
        {**query, "expires": "1"},  # long expired
    ):
        forged = url._replace(query=urlencode(changed)).geturl()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=30)
        assert refused.value.code == 403
    forged = url._replace(path=url.path.replace("adapter_config.json", "adapter_model.safetensors"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged.geturl(), timeout=30)  # another file under the same signature
    assert refused.value.code == 403


# ---------------------------------------------------------------- conformance: every method


def _mint(platform, tenant: str, admin: bool = False) -> str:
    async def mint() -> str:
        bus = await b.connect(platform.nats_url, "test-keys")
        try:
            return await create_key(bus, tenant, admin=admin)
        finally:
            await bus.close()

    return asyncio.run(mint())


def _public_methods(cls: type) -> set[str]:
    """The public methods of ``cls``, each deprecated ``<name>_async`` folded into ``<name>``."""
    names = {n for n, member in inspect.getmembers(cls, callable) if not n.startswith("_")}
    return {n.removesuffix("_async") if n.removesuffix("_async") in names else n for n in names}


def test_every_rest_client_method_works_against_whetstone(sdk, platform) -> None:
    """Enumerates ``RestClient``'s public methods (tinker 0.38) and runs one check per method
    through the real SDK; a method without a check fails the test, as does a failing check."""
    service, training, rest, saved, sampler = sdk
    run_id = training.model_id
    session_id = run_id.split(":")[0]
    admin_key = _mint(platform, "ops", admin=True)
    admin = tinker.RestClient(base_url=platform.base_url, api_key=admin_key)
    stranger = tinker.RestClient(base_url=platform.base_url, api_key=_mint(platform, "mallory"))
    extra = training.save_state("conformance").result().path
    external = training.save_weights_external("conformance-export").result().path
    sampling = training.create_sampling_client(sampler).result()
    sampled = sampling.sample(
        types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)
    ).result()
    assert len(sampled.sequences) == 1

    def assign_session_project() -> None:
        rest.assign_session_project(session_id, "proj-conformance").result()
        runs = rest.list_training_runs(project_id="proj-conformance").result().training_runs
        assert run_id in [r.training_run_id for r in runs]

    def copy_weights() -> None:
        copied = rest.copy_weights(saved, "proj-copies").result()
        assert copied.endswith("/weights/first") and copied != saved
        # The copy is in a run of its own that, as the SDK documents, cannot be trained on.
        refused = httpx.post(
            f"{platform.base_url}/api/v1/optim_step",
            headers={"X-API-Key": platform.api_key},
            json={"model_id": copied.split("/")[2], "seq_id": 1, "adam_params": {}},
        )
        assert refused.status_code == 400 and "cannot be trained" in refused.json()["error"]

    def delete_checkpoint() -> None:
        path = training.save_state("to-delete-by-id").result().path
        rest.delete_checkpoint(run_id, "weights/to-delete-by-id").result()
        paths = [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints]
        assert path not in paths

    def delete_checkpoint_from_tinker_path() -> None:
        rest.delete_checkpoint_from_tinker_path(extra).result()
        with pytest.raises(tinker.NotFoundError):
            rest.delete_checkpoint_from_tinker_path(extra).result()

    def export_session_trace() -> None:
        url = rest.export_session_trace(session_id).result()
        with urllib.request.urlopen(url, timeout=30) as answer:
            assert len(answer.read()) > 0

    def get_audit_log() -> None:
        with pytest.warns(FutureWarning):
            entries = admin.get_audit_log().result().entries
        assert {"checkpoint_deleted", "training_run_created"} <= {e.event for e in entries}
        audited = tinker.AdminClient(base_url=platform.base_url, api_key=admin_key)
        checkpoints = audited.get_audit_log(event_type="checkpoints").result().entries
        assert extra in {e.tinker_path for e in checkpoints}
        with pytest.raises(tinker.PermissionDeniedError), pytest.warns(FutureWarning):
            rest.get_audit_log().result()  # not an admin key

    def get_billing_usage() -> None:
        with pytest.warns(FutureWarning):
            hour = utcnow().replace(minute=0, second=0, microsecond=0)
            usage = rest.get_billing_usage(hour - timedelta(days=1), hour + timedelta(hours=1))
            usage = usage.result()
        assert isinstance(usage, types.BillingUsageResponse)

    def get_current_checkpoint_storage_usage() -> None:
        with pytest.warns(FutureWarning):
            usage = rest.get_current_checkpoint_storage_usage().result()
        assert isinstance(usage, types.CurrentCheckpointStorageUsageResponse)

    def get_external_weights_urls() -> None:
        urls = rest.get_external_weights_urls(external).result()
        assert "adapter_model.safetensors" in urls.urls

    def get_sampler() -> None:
        sampler_id = rest.get_session(session_id).result().sampler_ids[-1]
        info = rest.get_sampler(sampler_id).result()
        assert info.base_model == BUILTIN_MODEL_NAME and info.model_path == sampler
        with pytest.raises(tinker.NotFoundError):
            stranger.get_sampler(sampler_id).result()

    def get_server_capabilities() -> None:
        models = rest.get_server_capabilities().result().supported_models
        assert BUILTIN_MODEL_NAME in [m.model_name for m in models]

    def get_session() -> None:
        assert run_id in rest.get_session(session_id).result().training_run_ids
        with pytest.raises(tinker.NotFoundError):
            stranger.get_session(session_id).result()

    def get_telemetry() -> None:
        rest.get_telemetry()  # client-side: the SDK's own telemetry sink (None when off)

    def get_training_run() -> None:
        run = rest.get_training_run(run_id).result()
        assert run.training_run_id == run_id and run.lora_rank == 4
        with pytest.raises(tinker.NotFoundError):
            stranger.get_training_run(run_id).result()

    def get_training_run_by_tinker_path() -> None:
        assert rest.get_training_run_by_tinker_path(saved).result().training_run_id == run_id

    def get_weights_info_by_tinker_path() -> None:
        assert rest.get_weights_info_by_tinker_path(saved).result().lora_rank == 4

    def list_checkpoints() -> None:
        paths = [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints]
        assert {saved, sampler, external} <= set(paths)

    def list_sessions() -> None:
        assert session_id in rest.list_sessions().result().sessions
        assert session_id not in stranger.list_sessions().result().sessions

    def list_training_runs() -> None:
        assert run_id in [
            r.training_run_id for r in rest.list_training_runs().result().training_runs
        ]
        assert stranger.list_training_runs().result().training_runs == []

    def list_user_checkpoints() -> None:
        listed = rest.list_user_checkpoints(limit=1000).result().checkpoints
        assert saved in [c.tinker_path for c in listed]

    def publish_checkpoint_from_tinker_path() -> None:
        rest.publish_checkpoint_from_tinker_path(sampler).result()
        assert stranger.get_weights_info_by_tinker_path(sampler).result().lora_rank == 4

    def unpublish_checkpoint_from_tinker_path() -> None:
        rest.unpublish_checkpoint_from_tinker_path(sampler).result()
        with pytest.raises(tinker.NotFoundError):
            stranger.get_weights_info_by_tinker_path(sampler).result()

    def set_checkpoint_ttl_from_tinker_path() -> None:
        rest.set_checkpoint_ttl_from_tinker_path(external, 7200).result()
        (found,) = [
            c
            for c in rest.list_checkpoints(run_id).result().checkpoints
            if c.tinker_path == external
        ]
        assert found.expires_at is not None

    def search_sessions() -> None:
        request = types.SessionSearchRequest(owner=types.AccessibleSearchOwner())
        with pytest.warns(tinker.lib.experimental.ExperimentalWarning):
            page = rest.search_sessions(request).result()
        assert session_id in [x.session_id for x in page.sessions]
        with pytest.warns(tinker.lib.experimental.ExperimentalWarning):
            assert stranger.search_sessions(request).result().sessions == []

    def whoami() -> None:
        # Needs the SDK's JWT exchange, off by default (``jwt_auth_enabled``): the SDK refuses
        # locally. With it on, tests/integration/test_jwt_auth.py reads whoami from the JWT.
        with pytest.raises(RuntimeError, match="whoami requires JWT auth"):
            rest.whoami().result()

    checks = {f.__name__: f for f in locals().values() if inspect.isfunction(f)}
    methods = _public_methods(tinker.RestClient)
    assert methods == set(checks), (methods - set(checks), set(checks) - methods)
    for name in sorted(methods):
        checks[name]()
