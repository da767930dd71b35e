"""Conformance: every public method of tinker 0.38's ServiceClient, TrainingClient and
SamplingClient, called through the unmodified SDK against a platform of real processes.

Each test names the methods it covers (``@covers``); a method counts as covered only once its
test passed, and the last test asserts that the covered set is the SDK's public set (found with
``inspect``), so a method added to the SDK without a check here fails the suite. A method and its
``_async`` twin share one check. RestClient is covered by ``tests/integration/test_rest_routes.py``.

One module-scoped platform serves every test; they run in file order and build on each other
(the checkpoint saved early is loaded later). The gateway announces ``sample_use_retrieve_futures``,
``sample_join_sampling_session`` and ``sample_cancel_enabled``, so sampling here goes through the
session poller, clones join their sampling session, and abandoned samples are cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import tinker
import torch
from tinker import types
from tinker.lib.public_interfaces.sampling_client import SamplingClient
from tinker.lib.public_interfaces.training_client import TrainingClient
from tinker.lib.queue_state_logger import QueueState

from tests.e2e.test_sft_loop import make_key
from whetstone import bus as b
from whetstone import subjects as s
from whetstone.cli import request_usage_report
from whetstone.messages import UsageReportQuery, WorkerHeartbeat
from whetstone.models.builtin import BUILTIN_MODEL_NAME

# The ``_async`` twins and a few others are deprecated in 0.38 (FutureWarning); still public.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CLIENTS = (tinker.ServiceClient, TrainingClient, SamplingClient)
COVERED: set[str] = set()
TEXTS = ["The capital of Peru is Lima.", "Two plus two is four.", "Water boils at 100 C."]
ADAM = types.AdamParams(learning_rate=1e-2)


def public_methods() -> set[str]:
    """``Class.method`` for every public callable of the three clients (``_async`` folded)."""
    return {
        f"{cls.__name__}.{name.removesuffix('_async')}"
        for cls in CLIENTS
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and callable(member)
    }


def covers(*methods: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Mark a test as the check of ``methods``; they count as covered once it passed."""
    unknown = set(methods) - public_methods()
    assert not unknown, f"not public SDK methods: {unknown}"

    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            test(*args, **kwargs)
            COVERED.update(methods)

        return run

    return wrap


@pytest.fixture(scope="module")
def service(platform):
    client = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def training(service):
    return service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=8, seed=1
    ).result()


@pytest.fixture(scope="module")
def data(training):
    tokenizer = training.get_tokenizer()
    out = []
    for text in TEXTS:
        tokens = tokenizer.encode(text, add_special_tokens=False)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    return out


@pytest.fixture(scope="module")
def state(training, data):
    """A saved training state after two steps: (tinker path, logprobs the weights give)."""
    for _ in range(2):
        training.forward_backward(data, "cross_entropy")
        training.optim_step(ADAM).result()
    saved = training.save_state("conformance").result()
    return saved.path, logprobs(training, data)


def logprobs(training, data) -> list[float]:
    """The datums' target logprobs under the run's weights now, flattened."""
    out = training.forward(data, "cross_entropy").result()
    return [lp for o in out.loss_fn_outputs for lp in o["logprobs"].tolist()]


def run_async(coro):
    """Run an ``_async`` method; most return an APIFuture, whose result is returned then."""
    out = asyncio.run(coro)
    return out.result() if hasattr(out, "result_async") else out


def prompt(training) -> types.ModelInput:
    return types.ModelInput.from_ints(
        training.get_tokenizer().encode("Lima is", add_special_tokens=False)
    )


def gateway_requests(platform, path: str) -> float:
    """How many requests the gateway has answered on ``path`` (its /metrics)."""
    text = httpx.get(f"{platform.base_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("whetstone_gateway_http_requests_total") and f'"{path}"' in line
    )


# ---------------------------------------------------------------- service client


@covers(
    "ServiceClient.get_server_capabilities",
    "ServiceClient.create_rest_client",
    "ServiceClient.get_console_url",
    "ServiceClient.get_telemetry",
)
def test_service_client_answers(service) -> None:
    caps = service.get_server_capabilities()
    assert [m.model_name for m in caps.supported_models] == [BUILTIN_MODEL_NAME]
    again = run_async(service.get_server_capabilities_async())
    assert again.supported_models == caps.supported_models
    rest = service.create_rest_client()
    assert rest.get_server_capabilities().result().supported_models == caps.supported_models
    assert service.get_console_url().startswith("http")
    assert service.get_telemetry() is None  # telemetry is off in the tests (TINKER_TELEMETRY=0)


@covers(
    "ServiceClient.create_lora_training_client",
    "TrainingClient.get_info",
    "TrainingClient.get_tokenizer",
    "TrainingClient.get_console_url",
    "TrainingClient.get_telemetry",
)
def test_training_client_is_created(service, training) -> None:
    info = training.get_info()
    assert info.model_id == training.model_id and info.lora_rank == 8
    assert run_async(training.get_info_async()) == info
    assert training.get_tokenizer().encode("a", add_special_tokens=False)
    assert training.model_id in training.get_console_url()
    assert training.get_telemetry() is None  # off in the tests
    other = run_async(
        service.create_lora_training_client_async(base_model=BUILTIN_MODEL_NAME, rank=4)
    )
    assert other.get_info().lora_rank == 4


@covers(
    "TrainingClient.forward_backward",
    "TrainingClient.forward",
    "TrainingClient.optim_step",
    "TrainingClient.forward_backward_custom",
)
def test_training_primitives(training, data) -> None:
    before = logprobs(training, data)
    out = training.forward_backward(data, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == len(data) and "loss:sum" in out.metrics
    step = training.optim_step(ADAM).result()
    assert step.metrics is None or "grad_norm:mean" in step.metrics

    async def pipelined():
        fb = await training.forward_backward_async(data, "cross_entropy")
        opt = await training.optim_step_async(ADAM)
        fwd = await training.forward_async(data, "cross_entropy")
        return await fb, await opt, await fwd

    _, _, forward = run_async(pipelined())
    after = [lp for o in forward.loss_fn_outputs for lp in o["logprobs"].tolist()]
    assert after != before  # two steps moved the weights

    def neg_ll(data, logprobs_list):
        loss = sum(
            -(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
            for d, lp in zip(data, logprobs_list, strict=True)
        )
        return loss, {"custom_nll": float(loss.detach())}

    custom = training.forward_backward_custom(data, neg_ll).result()
    assert "custom_nll" in str(custom.metrics)
    custom = run_async(training.forward_backward_custom_async(data, neg_ll))
    assert custom.loss_fn_outputs
    training.optim_step(ADAM).result()


# ---------------------------------------------------------------- state: save and load


@covers("TrainingClient.save_state", "TrainingClient.load_state")
def test_load_state_restores_the_weights(training, data, state) -> None:
    path, saved = state
    assert path == f"tinker://{training.model_id}/weights/conformance"
    training.forward_backward(data, "cross_entropy")
    training.optim_step(ADAM).result()
    assert logprobs(training, data) != saved  # moved on since the save
    loaded = training.load_state(path).result()
    assert loaded.path == path
    assert logprobs(training, data) == pytest.approx(saved, abs=1e-6)
    run_async(training.load_state_async(path))
    again = training.save_state("conformance-2").result()  # a request after the load runs
    assert again.path.endswith("/weights/conformance-2")
    run_async(training.save_state_async("conformance-3"))


@covers(
    "TrainingClient.load_state_with_optimizer",
    "ServiceClient.create_training_client_from_state_with_optimizer",
)
def test_with_optimizer_resumes_exactly(service, training, data, state) -> None:
    """The optimizer's moments travel with the state: one step after loading it, in the old run
    and in a new run made from the checkpoint, lands on the same weights."""
    path, _ = state
    training.load_state_with_optimizer(path).result()
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.model_id != training.model_id
    assert resumed.get_info().lora_rank == 8  # the LoRA config is the checkpoint's
    for client in (training, resumed):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(ADAM).result()
    assert logprobs(resumed, data) == pytest.approx(logprobs(training, data), abs=1e-6)
    run_async(training.load_state_with_optimizer_async(path))
    other = run_async(service.create_training_client_from_state_with_optimizer_async(path))
    assert other.get_info().model_id.endswith(":train:" + other.model_id.rsplit(":", 1)[1])


@covers("ServiceClient.create_training_client_from_state")
def test_create_from_state_loads_weights_without_optimizer(service, training, data, state) -> None:
    path, saved = state
    fresh = service.create_training_client_from_state(path).result()
    # The load was seq 0: the new run's first request (seq_id 1) runs on the loaded weights.
    assert logprobs(fresh, data) == pytest.approx(saved, abs=1e-6)
    fresh.forward_backward(data, "cross_entropy")
    assert fresh.optim_step(ADAM).result() is not None
    other = run_async(service.create_training_client_from_state_async(path))
    assert logprobs(other, data) == pytest.approx(saved, abs=1e-6)


def test_other_tenants_load_only_published_checkpoints(platform, training, state) -> None:
    path, _ = state
    stranger = tinker.ServiceClient(
        base_url=platform.base_url, api_key=make_key(platform, "stranger")
    )
    try:
        with pytest.raises(tinker.NotFoundError):
            stranger.create_training_client_from_state(path).result()
        rest = tinker.RestClient(base_url=platform.base_url, api_key=platform.api_key)
        rest.publish_checkpoint_from_tinker_path(path).result()
        loaded = stranger.create_training_client_from_state(path).result()
        assert loaded.get_info().lora_rank == 8
        rest.unpublish_checkpoint_from_tinker_path(path).result()
    finally:
        stranger.close("success").result()


def test_a_missing_checkpoint_fails_the_load_as_a_user_error(training) -> None:
    with pytest.raises(tinker.NotFoundError):
        training.load_state_with_optimizer(f"tinker://{training.model_id}/weights/nope").result()
    # the refused load spent a seq_id; the run's next request still runs
    assert training.save_state("after-refusal").result().path.endswith("/after-refusal")


# ---------------------------------------------------------------- sampling


@covers(
    "TrainingClient.save_weights_for_sampler",
    "TrainingClient.create_sampling_client",
    "ServiceClient.create_sampling_client",
    "SamplingClient.sample",
    "SamplingClient.compute_logprobs",
    "SamplingClient.get_base_model",
    "SamplingClient.get_tokenizer",
    "SamplingClient.get_telemetry",
    "SamplingClient.on_queue_state_change",
)
def test_sampling_through_the_session_poller(platform, service, training) -> None:
    polls = gateway_requests(platform, "/api/v1/retrieve_futures")
    saved = training.save_weights_for_sampler("conformance").result()
    run_async(training.save_weights_for_sampler_async("conformance-async"))
    sampler = training.create_sampling_client(saved.path)
    params = types.SamplingParams(max_tokens=4, seed=0)
    result = sampler.sample(prompt(training), num_samples=2, sampling_params=params).result()
    assert len(result.sequences) == 2 and all(1 <= len(s.tokens) <= 4 for s in result.sequences)
    lps = sampler.compute_logprobs(prompt(training)).result()
    assert len(lps) == prompt(training).length and lps[0] is None
    assert run_async(sampler.compute_logprobs_async(prompt(training))) == pytest.approx(lps)
    same = run_async(sampler.sample_async(prompt(training), 2, params))
    assert [s.tokens for s in same.sequences] == [s.tokens for s in result.sequences]
    assert sampler.get_base_model() == BUILTIN_MODEL_NAME
    assert run_async(sampler.get_base_model_async()) == BUILTIN_MODEL_NAME
    # get_tokenizer loads the tokenizer of the name the client holds: a registry name needs the
    # Hugging Face hub (offline here), a model directory (as get_info's tokenizer_id) does not.
    by_path = service.create_sampling_client(base_model=training.get_info().model_data.tokenizer_id)
    assert by_path.get_tokenizer().encode("a", add_special_tokens=False)
    assert by_path.sample(prompt(training), 1, params).result().sequences
    assert sampler.get_telemetry() is None  # off in the tests
    sampler.on_queue_state_change(QueueState.PAUSED_CAPACITY, "test: the logger only logs")
    # the results came through retrieve_futures (the client's session poller), not one poll each
    assert gateway_requests(platform, "/api/v1/retrieve_futures") > polls
    via_service = service.create_sampling_client(model_path=saved.path)
    assert via_service.sample(prompt(training), 1, params).result().sequences
    by_base = service.create_sampling_client(base_model=BUILTIN_MODEL_NAME)
    assert by_base.sample(prompt(training), 1, params).result().sequences
    later = run_async(service.create_sampling_client_async(model_path=saved.path))
    assert later.get_base_model() == BUILTIN_MODEL_NAME
    run_async(training.create_sampling_client_async(saved.path))


@covers("TrainingClient.save_weights_and_get_sampling_client")
def test_save_weights_and_get_sampling_client(training) -> None:
    sampler = training.save_weights_and_get_sampling_client().result()
    assert sampler.sample(prompt(training), 1, types.SamplingParams(max_tokens=2)).result()
    again = run_async(training.save_weights_and_get_sampling_client_async())
    assert again.compute_logprobs(prompt(training)).result()[0] is None


@covers(
    "SamplingClient.get_sampler_handle",
    "SamplingClient.from_sampler_handle",
    "SamplingClient.create",
)
def test_copies_of_a_sampling_client_join_its_session(platform, training) -> None:
    joins = gateway_requests(platform, "/api/v1/join_sampling_session")
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=3, seed=5)
    first = sampler.sample(prompt(training), 1, params).result()
    copy = SamplingClient.from_sampler_handle(
        sampler.get_sampler_handle(), api_key=platform.api_key
    )
    unpickled = pickle.loads(pickle.dumps(sampler))
    for clone in (copy, unpickled):
        again = clone.sample(prompt(training), 1, params).result()
        assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences]
    assert gateway_requests(platform, "/api/v1/join_sampling_session") >= joins + 2
    made = SamplingClient.create(training.holder, base_model=BUILTIN_MODEL_NAME).result()
    assert made.get_base_model() == BUILTIN_MODEL_NAME


def test_retrieve_futures_off_polls_each_future(platform, training) -> None:
    """The flag's off path: a client told ``sample_use_retrieve_futures: false`` (set here on
    its copy of the client config, as the answer of a gateway configured so would) polls
    ``retrieve_future`` per sample and gets the same results."""
    client = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    try:
        training_off = client.create_lora_training_client(
            base_model=BUILTIN_MODEL_NAME, rank=4
        ).result()
        holder = training_off.holder
        holder._client_config = holder._client_config.model_copy(
            update={"sample_use_retrieve_futures": False}
        )
        sampler = training_off.save_weights_and_get_sampling_client().result()
        polls = gateway_requests(platform, "/api/v1/retrieve_futures")
        out = sampler.sample(prompt(training), 1, types.SamplingParams(max_tokens=2)).result()
        assert out.sequences
        assert gateway_requests(platform, "/api/v1/retrieve_futures") == polls
    finally:
        client.close("success").result()


def test_cancelled_sample_answers_cancelled_and_is_not_billed(platform) -> None:
    """A sample its client abandons: the SDK sends cancel_future; the future answers a user
    error "cancelled", the sampler writes no result over it, and nothing is billed for it."""
    key = make_key(platform, "canceller")
    client = tinker.ServiceClient(base_url=platform.base_url, api_key=key)
    try:
        sampler = client.create_sampling_client(base_model=BUILTIN_MODEL_NAME)
        cancels = gateway_requests(platform, "/api/v1/cancel_future")
        long = types.SamplingParams(max_tokens=1500, stop=[])

        submitted = gateway_requests(platform, "/api/v1/asample")

        async def abandon() -> None:
            task = asyncio.ensure_future(
                sampler.sample_async(types.ModelInput.from_ints([1, 2, 3]), 4, long)
            )
            # Abandoned once accepted: queued or just started, far from its 1500 tokens.
            while (
                await asyncio.to_thread(gateway_requests, platform, "/api/v1/asample") == submitted
            ):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # the client has read the answer (its request id)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run_async(abandon())
        until(lambda: gateway_requests(platform, "/api/v1/cancel_future") > cancels)
        records = until(lambda: session_records(client, "sample"))
        assert [r["status"] for r in records] == ["failed"]
        with httpx.Client(base_url=platform.base_url, timeout=60) as http:
            answer = http.post(
                "/api/v1/retrieve_future",
                json={"request_id": records[0]["request_id"], "allow_metadata_only": True},
                headers={"X-API-Key": key},
            ).json()
        assert answer == {"error": "cancelled by the client", "category": "user"}
        until(lambda: sampler_idle(platform))
        time.sleep(2.0)  # billing would have ingested an event by now
        report = asyncio.run(
            request_usage_report(platform.nats_url, UsageReportQuery(tenant="canceller"))
        )
        assert report.rows == []
    finally:
        client.close("success").result()


def until(probe: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            assert value, "timed out waiting"
            return value
        time.sleep(0.3)


def session_trace(client) -> dict[str, Any]:
    """The session's trace, as ``tinker session export-trace`` fetches it (signed URL, no key)."""
    rest = client.create_rest_client()
    url = rest.export_session_trace(client.holder.get_session_id()).result()
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def session_records(client, op: str) -> list[dict[str, Any]]:
    """One entry per request of ``op`` in the session's trace (its queue event's args)."""
    events = session_trace(client)["traceEvents"]
    return [e["args"] for e in events if e.get("name") == f"queue {op}"]


def sampler_idle(platform) -> bool:
    async def depth() -> int | None:
        bus = await b.connect(platform.nats_url, "test-depth")
        try:
            return await b.consumer_depth(
                bus, s.SAMPLE_STREAM, s.sample_consumer(BUILTIN_MODEL_NAME)
            )
        finally:
            await bus.close()

    return asyncio.run(depth()) == 0


# ---------------------------------------------------------------- the rest of the lifecycle


@covers("TrainingClient.save_weights_external", "ServiceClient.copy_weights")
def test_external_weights_and_copies(platform, service, training, state) -> None:
    path, _ = state
    external = training.save_weights_external("conformance-ext").result()
    assert external.path == f"tinker://{training.model_id}/external_weights/conformance-ext"
    run_async(training.save_weights_external_async("conformance-ext-2"))
    archive = tinker.ServiceClient(
        base_url=platform.base_url, api_key=platform.api_key, project_id="proj-archive"
    )
    try:
        copied = archive.copy_weights(path).result()  # into the client's project
        assert copied.startswith("tinker://") and copied.endswith("/weights/conformance")
        loaded = service.create_training_client_from_state(copied).result()
        assert loaded.get_info().lora_rank == 8
    finally:
        archive.close("success").result()


@covers("ServiceClient.create_custom_loss")
def test_custom_loss(service, training, data) -> None:
    def weighted_nll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/weighted_nll:sum": loss}

    handle = service.create_custom_loss(
        weighted_nll, input_ranks={"logprobs": 1, "weights": 1}
    ).result()
    out = training.forward_backward_custom(data, handle).result()
    plain = training.forward(data, "cross_entropy").result()
    assert out.metrics["custom/weighted_nll:sum"] == pytest.approx(
        plain.metrics["loss:sum"], rel=1e-4
    )


def test_trace_export_shows_queue_wait_and_execution(platform, service, training) -> None:
    """``tinker session export-trace`` downloads the session's requests as trace events: for
    each, its wait in the queue and its execution, from the platform's own timestamps."""
    events = session_trace(service)["traceEvents"]
    slices = [e for e in events if e.get("ph") == "X"]
    executed = [e for e in slices if e["cat"] == "execute" and e["name"] == "forward_backward"]
    queued = [e for e in slices if e["cat"] == "queue" and e["name"] == "queue forward_backward"]
    assert executed and queued and len(queued) >= len(executed)
    assert all(e["dur"] > 0 for e in executed)
    for run in executed:  # its queue wait ends where its execution starts
        wait = next(q for q in queued if q["args"]["request_id"] == run["args"]["request_id"])
        assert wait["ts"] + wait["dur"] == run["ts"]
    env = {
        **os.environ,
        "TINKER_BASE_URL": platform.base_url,
        "TINKER_API_KEY": platform.api_key,
    }
    cli = [str(os.path.join(os.path.dirname(sys.executable), "tinker")), "-f", "json"]
    session_id = service.holder.get_session_id()
    done = subprocess.run(
        [*cli, "session", "export-trace", session_id, "--url-only"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    url = json.loads(done.stdout)["url"]
    tampered = url.replace("sig=", "sig=0")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(tampered, timeout=30)
    assert refused.value.code == 403
    other = make_key(platform, "trace-stranger")
    with httpx.Client(base_url=platform.base_url, timeout=30) as http:
        answer = http.get(
            f"/api/v1/sessions/{session_id}/trace_export", headers={"X-API-Key": other}
        )
    assert answer.status_code == 404


def test_unload_model_frees_the_run(platform, service, data) -> None:
    """``unload_model`` (tinker 0.38 never sends it; hpcai does) answers a future with the
    model id, the trainer lets the run go, and the run's later requests are a user error."""
    training = service.create_lora_training_client(base_model=BUILTIN_MODEL_NAME, rank=4).result()
    training.forward(data, "cross_entropy").result()
    headers = {"X-API-Key": platform.api_key}
    with httpx.Client(base_url=platform.base_url, timeout=60, headers=headers) as http:
        future = http.post(
            "/api/v1/unload_model", json={"model_id": training.model_id, "type": "unload_model"}
        ).json()
        result = http.post(
            "/api/v1/retrieve_future", json={"request_id": future["request_id"]}
        ).json()
        assert result == {"type": "unload_model", "model_id": training.model_id}
        stranger = make_key(platform, "unload-stranger")
        refused = http.post(
            "/api/v1/unload_model",
            json={"model_id": training.model_id},
            headers={"X-API-Key": stranger},
        )
        assert refused.status_code == 404
    until(lambda: training.model_id not in trainer_runs(platform))
    with pytest.raises(tinker.BadRequestError, match="unloaded"):
        training.forward(data, "cross_entropy").result()


def trainer_runs(platform) -> set[str]:
    """The runs the trainers hold, as their heartbeats say."""

    async def runs() -> set[str]:
        bus = await b.connect(platform.nats_url, "test-runs")
        try:
            sub = await bus.nc.subscribe(f"{s.HEARTBEAT_PREFIX}.trainer.*")
            msg = await sub.next_msg(timeout=30)
            await sub.unsubscribe()
            return set(WorkerHeartbeat.decode(msg.data).runs)
        finally:
            await bus.close()

    return asyncio.run(runs())


@covers("ServiceClient.close")
def test_close_finishes_the_session(platform) -> None:
    client = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
    client.create_sampling_client(base_model=BUILTIN_MODEL_NAME)
    session_id = client.holder.get_session_id()
    client.close("success").result()
    with httpx.Client(base_url=platform.base_url, timeout=30) as http:
        beat = http.post(
            "/api/v1/session_heartbeat",
            json={"session_id": session_id, "type": "session_heartbeat"},
            headers={"X-API-Key": platform.api_key},
        )
    assert beat.status_code == 410


def test_every_public_method_is_covered() -> None:
    """Last: every public method of the three clients had a passing check above."""
    assert COVERED == public_methods(), sorted(public_methods() ^ COVERED)
