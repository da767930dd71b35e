"""Billing end to end: the real platform, the real tinker SDK and CLI.

The reconciliation test runs an SFT loop and an RL loop while billing and the sampler are killed
and restarted and every usage event is published a second time, then reads the ledger back
through ``tinker billing usage``: the tokens per meter must equal the tokens the loops processed,
exactly, and every event names the caller's API key id, the session and the run or sampler. The
tests after it check who may see what (a tenant's key, an admin key), the finance page in
headless Chromium (Debian's, which ``scripts/setup`` installs when ``CI=true``; skipped without it
elsewhere, failed without it in CI) and the monthly statement.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import nats
import pytest
import tinker
from nats.aio.msg import Msg
from tinker import types

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.keys import create_key, key_id
from whetstone.messages import UsageEvent
from whetstone.models.builtin import BUILTIN_MODEL_NAME

pytestmark = pytest.mark.timeout(600)

TENANT, OTHER = "recon", "bystander"


class Tally:
    """Tokens the loops sent and received, per Tinker usage type."""

    training = 0
    sampling_prefill = 0
    sampling_sample = 0


def key_for(platform, tenant: str, admin: bool = False) -> str:  # type: ignore[no-untyped-def]
    async def mint() -> str:
        bus = await b.connect(platform.nats_url, "test-keys")
        try:
            return await create_key(bus, tenant, admin=admin)
        finally:
            await bus.close()

    return asyncio.run(mint())


@pytest.fixture(scope="module")
def keys(platform) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {
        "tenant": key_for(platform, TENANT),
        "other": key_for(platform, OTHER),
        "admin": key_for(platform, "operators", admin=True),
    }


def restart(platform, name: str, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    old = platform.children[name]
    os.kill(old.pid, sig)
    old.wait(30)
    deadline = time.monotonic() + 60
    while platform.children[name].pid == old.pid or platform.children[name].poll() is not None:
        assert time.monotonic() < deadline, f"{name} was not restarted"
        platform.supervise()
        time.sleep(0.2)


def ingested(platform) -> bool:  # type: ignore[no-untyped-def]
    async def check() -> bool:
        bus = await b.connect(platform.nats_url, "test-usage")
        try:
            info = await bus.js.consumer_info(s.USAGE_STREAM, s.BILLING_CONSUMER)
            return info.num_pending == 0 and info.num_ack_pending == 0
        except Exception:  # noqa: BLE001 - billing restarting
            return False
        finally:
            await bus.close()

    return asyncio.run(check())


class UsageTap:
    """Copies of every usage event as it is published (the stream is a work queue: billing's
    acknowledgements delete them there), to publish them all again at the end."""

    def __init__(self, nats_url: str) -> None:
        self.events: list[tuple[str, bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._nc = self._run(nats.connect(nats_url))
        self._run(self._nc.subscribe(f"{s.USAGE_PREFIX}.>", cb=self._on_event))

    async def _on_event(self, msg: Msg) -> None:
        self.events.append((msg.subject, msg.data))

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def redeliver(self) -> int:
        """Publish each event again under a new message id, so the stream's own
        de-duplication lets it through and billing receives it twice."""

        async def again() -> int:
            js = self._nc.jetstream()
            for i, (subject, data) in enumerate(list(self.events)):
                await js.publish(subject, data, headers={"Nats-Msg-Id": f"again-{i}"})
            return len(self.events)

        try:
            return int(self._run(again()))
        finally:
            self._run(self._nc.close())
            self._loop.call_soon_threadsafe(self._loop.stop)


def datum(tokens: list[int], **inputs: list[float]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


def window() -> tuple[str, str]:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return (hour - timedelta(hours=2)).isoformat(), (hour + timedelta(hours=1)).isoformat()


def tinker_cli(platform, key: str, *args: str) -> dict:  # type: ignore[no-untyped-def]
    env = {**os.environ, "TINKER_BASE_URL": platform.base_url, "TINKER_API_KEY": key}
    done = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "-f", "json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout)


def test_every_token_is_billed_once_through_restarts_and_redelivery(platform, keys) -> None:
    tap = UsageTap(platform.nats_url)
    service = tinker.ServiceClient(base_url=platform.base_url, api_key=keys["tenant"])
    training = service.create_lora_training_client(base_model=BUILTIN_MODEL_NAME, rank=4).result()
    adam = types.AdamParams(learning_rate=1e-3)

    # SFT, with billing killed (events unacknowledged at that moment come again) half way.
    for step in range(6):
        batch = [
            datum([1 + (step + i) % 50 for i in range(n)], weights=[1.0] * (n - 1))
            for n in (9, 17, 33)
        ]
        training.forward_backward(batch, "cross_entropy").result()
        training.optim_step(adam).result()
        Tally.training += sum(d.model_input.length for d in batch)
        if step == 2:
            restart(platform, "billing", signal.SIGKILL)

    # RL: sample, score, train on the samples; the sampler is stopped and restarted in between.
    prompt = types.ModelInput.from_ints([5, 6, 7, 8, 9, 10])
    for step in range(4):
        sampler = training.save_weights_and_get_sampling_client().result()
        params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=step)
        result = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
        Tally.sampling_prefill += prompt.length
        rl_batch = []
        for i, seq in enumerate(result.sequences):
            Tally.sampling_sample += len(seq.tokens)
            tokens = prompt.to_ints() + list(seq.tokens)
            pad = [0.0] * (prompt.length - 1)
            rl_batch.append(
                datum(
                    tokens,
                    logprobs=pad + list(seq.logprobs),
                    advantages=pad + [1.0 if i == 0 else -1.0] * len(seq.tokens),
                )
            )
        training.forward_backward(rl_batch, "importance_sampling").result()
        training.optim_step(adam).result()
        Tally.training += sum(d.model_input.length for d in rl_batch)
        if step == 1:
            restart(platform, "sampler", signal.SIGTERM)

    # Every event names the caller's API key (by its id, never the key), the session, and the
    # training run (training) or the sampler (sampling).
    published = [UsageEvent.decode(data) for _, data in tap.events]
    session = training.model_id.split(":")[0]
    assert {e.api_key_id for e in published} == {key_id(keys["tenant"])}
    assert {e.session_id for e in published} == {session}
    trained = [e for e in published if e.meter == "train_tokens"]
    sampled = [e for e in published if e.meter in ("prefill_tokens", "sample_tokens")]
    assert len(trained) == 6 + 4 and len(sampled) == 2 * 4
    assert {e.run_id for e in trained} == {training.model_id}
    assert all(e.sampler_id and e.sampler_id.startswith(f"{session}:sample:") for e in sampled)
    assert all(e.run_id is None for e in sampled)

    assert tap.redeliver() >= 3 * 6 + 4 * 3  # every training and sampling call's events
    deadline = time.monotonic() + 60
    while not ingested(platform):
        assert time.monotonic() < deadline, "billing did not catch up"
        time.sleep(0.5)

    start, end = window()
    billed: dict[str, int] = {}
    for _ in range(20):  # billing answers as soon as it is back; its ingestion may trail
        usage = tinker_cli(platform, keys["tenant"], "billing", "usage", start, end)
        billed = {}
        for row in usage["data"]:
            kind = row["event_info"]["type"]
            billed[kind] = billed.get(kind, 0) + row["event_info"].get("token_count", 0)
            assert row["project_id"] == TENANT and row["base_model"] == BUILTIN_MODEL_NAME
        if billed == expected():
            break
        time.sleep(1)
    assert billed == expected()
    assert all(r["estimated_cost_usd"] > 0 for r in usage["data"])
    # Another tenant's key sees none of it.
    assert tinker_cli(platform, keys["other"], "billing", "usage", start, end)["data"] == []


def expected() -> dict[str, int]:
    return {
        "training": Tally.training,
        "sampling_prefill": Tally.sampling_prefill,
        "sampling_sample": Tally.sampling_sample,
    }


def get(platform, api_key: str | None, path: str, **params: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.get(f"{platform.base_url}{path}", params=params, headers=headers, timeout=60)


def test_a_tenant_sees_only_its_own_usage_and_an_admin_sees_all(platform, keys) -> None:
    mine = get(platform, keys["tenant"], "/billing/usage", tenant=OTHER, group_by="tenant")
    assert mine.status_code == 200
    assert {r["tenant"] for r in mine.json()["rows"]} == {TENANT}  # the filter is overridden
    assert get(platform, keys["other"], "/billing/usage").json()["rows"] == []
    everyone = get(platform, keys["admin"], "/billing/usage", group_by="tenant").json()["rows"]
    assert TENANT in {r["tenant"] for r in everyone}
    assert get(platform, None, "/billing/usage").status_code == 401
    assert get(platform, keys["tenant"], "/billing/").status_code == 403
    login = get(platform, None, "/billing/")
    assert login.status_code == 401 and login.headers["www-authenticate"].startswith("Basic")
    # The report by API key id: the tenant's one key has all of its usage, another key none.
    by_key = get(platform, keys["admin"], "/billing/usage", key=key_id(keys["tenant"])).json()
    assert sum(r["tokens"] for r in by_key["rows"]) == sum(expected().values())
    assert get(platform, keys["admin"], "/billing/usage", key=key_id(keys["other"])).json() == {
        "rows": [],
        "total_cost_usd": "0",
    }
    csv_text = get(platform, keys["admin"], "/billing/usage", tenant=TENANT, format="csv").text
    lines = list(csv.DictReader(io.StringIO(csv_text)))
    assert sum(int(r["quantity"]) for r in lines) == sum(expected().values())


def test_a_run_shows_its_cost_while_it_runs(platform, keys) -> None:
    rows = get(platform, keys["admin"], "/billing/usage", tenant=TENANT, group_by="run").json()
    run_id = next(r["run_id"] for r in rows["rows"] if r.get("run_id"))
    live = get(platform, keys["tenant"], f"/billing/runs/{run_id}/cost").json()
    assert Decimal(live["cost_usd"]) > 0 and live["meters"]["train_tokens"]["quantity"] > 0
    assert get(platform, keys["other"], f"/billing/runs/{run_id}/cost").json()["meters"] == {}
    # The same in the REST run info, which the real SDK still reads (it ignores the field).
    info = get(platform, keys["tenant"], f"/api/v1/training_runs/{run_id}").json()
    assert info["usage"] == {k: v for k, v in live.items() if k != "run_id"}  # nothing ran since
    rest = tinker.RestClient(base_url=platform.base_url, api_key=keys["tenant"])
    run = rest.get_training_run(run_id).result()
    assert run.training_run_id == run_id


def test_the_monthly_statement_totals_the_ledger(platform, keys) -> None:
    month = datetime.now(UTC).strftime("%Y-%m")
    statement = get(
        platform, keys["admin"], "/billing/invoice", tenant=TENANT, month=month, format="csv"
    )
    assert statement.status_code == 200
    lines = list(csv.reader(io.StringIO(statement.text)))
    total = Decimal(lines[-1][-1])
    assert total == sum((Decimal(line[-1]) for line in lines[1:-1]), Decimal(0))
    # The ledger's raw events (a window off the hour reads them, not the roll-ups).
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raw = get(
        platform,
        keys["admin"],
        "/billing/usage",
        tenant=TENANT,
        since=(start + timedelta(milliseconds=0)).isoformat(),
        until=(start + timedelta(days=31, milliseconds=1)).isoformat(),
    ).json()
    assert total == Decimal(raw["total_cost_usd"]) > 0
    page = get(platform, keys["admin"], "/billing/invoice", tenant=TENANT, month=month)
    assert page.status_code == 200 and f'id="total">{total}<' in page.text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IN_CI = os.environ.get("CI") == "true"


@pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="no Chromium (apt-get install chromium)")
def test_the_finance_page_renders_the_ledgers_numbers(platform, keys, tmp_path) -> None:
    assert CHROMIUM is not None, "CI must have Chromium: scripts/setup installs it when CI=true"
    host = platform.base_url.split("://", 1)[1]
    url = f"http://finance:{keys['admin']}@{host}/billing/?tenant={TENANT}"
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = done.stdout
    assert 'data-rendered="2"' in dom, done.stderr[-2000:]  # both charts drew their days
    body = dom.split('id="usage-table"', 1)[1].split("</table>", 1)[0]
    shown = [
        re.findall(r'data-key="(\w+)">([^<]*)<', tr)
        for tr in re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1])
    ]
    ledger = get(platform, keys["admin"], "/billing/usage", tenant=TENANT).json()["rows"]
    assert [dict(row) for row in shown] == [
        {
            "tenant": r["tenant"],
            "base_model": r["base_model"],
            "meter": r["meter"],
            "tokens": str(r["tokens"]),
            "cost_usd": r["cost_usd"],
        }
        for r in ledger
    ]
    total = re.search(r'id="total-cost">([^<]*)<', dom)
    assert total is not None and Decimal(total.group(1)) == sum(
        Decimal(r["cost_usd"]) for r in ledger
    )
    # Each training run's cost so far: what the run's live cost route answers.
    runs_body = dom.split('id="runs-table"', 1)[1].split("</table>", 1)[0]
    runs = [
        dict(re.findall(r'data-key="(\w+)">([^<]*)<', tr))
        for tr in re.findall(r"<tr>(.*?)</tr>", runs_body.split("<tbody>", 1)[1])
    ]
    assert runs, "the page lists no training run"
    for run in runs:
        live = get(platform, keys["admin"], f"/billing/runs/{run['run_id']}/cost").json()
        assert int(run["tokens"]) == live["tokens"] > 0
        assert Decimal(run["cost_usd"]) == Decimal(live["cost_usd"]) > 0
