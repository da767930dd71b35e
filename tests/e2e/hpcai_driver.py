"""Drives a running Whetstone with the real hpcai 0.2.0 SDK (HPC-AI's fork of the Tinker SDK):
every public method of its ServiceClient, TrainingClient, SamplingClient and RestClient, and a
short supervised fine-tuning loop. Run by ``tests/e2e/test_hpcai_sdk.py`` in ``.venv-hpcai``
(hpcai pins numpy<2, so it cannot run in ``.venv``):

    .venv-hpcai/bin/python tests/e2e/hpcai_driver.py BASE_URL API_KEY OTHER_TENANT_KEY MODEL

The platform must hold at most one run per trainer (``WHETSTONE_MAX_RUNS=1``): a second
``create_lora_training_client`` then waits ``in_queue`` until ``unload_model`` frees the slot;
and queue one sample per base model (``WHETSTONE_SAMPLE_QUEUE_LIMIT=1``), so that a burst of
samples meets 429s.
Every public method is wrapped to record the calls made from here (calls the SDK makes inside
another public method do not count); any method left uncalled is listed as ``missing``. Prints
one JSON report as its last line; any failed check raises (non-zero exit, traceback on stderr).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import io
import json
import logging
import sys
import tarfile
import threading
import time
from typing import Any

import hpcai
import torch
from hpcai import types
from hpcai.lib.api_future_impl import QueueState
from hpcai.lib.public_interfaces.rest_client import RestClient

CLIENTS = (hpcai.ServiceClient, hpcai.TrainingClient, hpcai.SamplingClient, RestClient)
calls: dict[str, list[tuple[Any, ...]]] = {}
_depth = threading.local()


def _record(qualname: str, fn: Any) -> Any:
    """``fn`` that notes its top-level calls (with their arguments) in ``calls``."""

    callback = qualname.endswith(".on_queue_state_change")  # the SDK's own calls count

    def enter(args: tuple[Any, ...]) -> bool:
        # Only the driver's own calls: not those the SDK makes inside another public method,
        # nor on its event loop's thread (where e.g. forward_backward_custom calls forward).
        main = threading.current_thread() is threading.main_thread()
        outer = callback or (main and getattr(_depth, "n", 0) == 0)
        if outer:
            calls.setdefault(qualname, []).append(args[1:])
        _depth.n = getattr(_depth, "n", 0) + 1
        return outer

    def leave() -> None:
        _depth.n -= 1

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*args: Any, **kwargs: Any) -> Any:
            enter(args)
            try:
                return await fn(*args, **kwargs)
            finally:
                leave()

        return awrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        enter(args)
        try:
            return fn(*args, **kwargs)
        finally:
            leave()

    return wrapper


def public_methods() -> list[str]:
    return [
        f"{cls.__name__}.{name}"
        for cls in CLIENTS
        for name, member in inspect.getmembers(cls, callable)
        if not name.startswith("_")
    ]


def instrument() -> None:
    for cls in CLIENTS:
        for name, member in inspect.getmembers(cls, callable):
            if not name.startswith("_"):
                setattr(cls, name, _record(f"{cls.__name__}.{name}", member))


def expect_error(kind: type[BaseException], match: str, fn: Any) -> str:
    try:
        fn()
    except kind as exc:
        assert match in str(exc), f"expected {match!r} in {exc!r}"
        return str(exc)
    raise AssertionError(f"expected {kind.__name__} ({match!r})")


# ---------------------------------------------------------------- data


def make_data(tokenizer: Any, n: int) -> list[types.Datum]:
    """Arithmetic questions; the loss is on the answer tokens only."""
    data = []
    for i in range(n):
        a, b = i % 7 + 1, i // 7 + 2
        prompt = tokenizer.encode(f"What is {a} plus {b}?", add_special_tokens=False)
        answer = tokenizer.encode(f" {a + b}. Done.", add_special_tokens=False)
        tokens = prompt + answer
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
            )
        )
    return data


def weight_sum(batch: list[types.Datum]) -> float:
    return sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)


def mean_loss(output: types.ForwardBackwardOutput, batch: list[types.Datum]) -> float:
    return output.metrics["loss:sum"] / weight_sum(batch)


# ---------------------------------------------------------------- the run


def main(base_url: str, api_key: str, other_key: str, model: str) -> dict[str, Any]:
    instrument()
    report: dict[str, Any] = {}
    service = hpcai.ServiceClient(base_url=base_url, api_key=api_key)

    caps = service.get_server_capabilities()
    assert model in [m.model_name for m in caps.supported_models], caps
    assert asyncio.run(service.get_server_capabilities_async()) == caps
    service.get_telemetry()
    expect_error(
        hpcai.AuthenticationError,
        "401",
        hpcai.ServiceClient(base_url=base_url, api_key="not-a-key").get_server_capabilities,
    )
    expect_error(
        hpcai.BadRequestError,
        "unknown base model",
        lambda: service.create_lora_training_client(base_model="no-such/model", rank=4),
    )

    # ---- training: create, info, tokenizer, the SFT loop
    training = service.create_lora_training_client(
        base_model=model, rank=8, seed=0, train_mlp=True, train_unembed=True
    )
    run_id = training.model_id
    assert run_id.startswith("hpcai-"), run_id
    info = training.get_info()
    assert info.model_id == run_id and info.lora_rank == 8 and info.model_name == model, info
    assert asyncio.run(training.get_info_async()) == info
    tokenizer = training.get_tokenizer()
    data = make_data(tokenizer, 64)
    adam = types.AdamParams(learning_rate=5e-3)
    losses = []
    for step in range(16):
        batch = data[(step % 4) * 16 : (step % 4 + 1) * 16]
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(adam)
        result = fwd_bwd.result()
        optim.result()
        assert len(result.loss_fn_outputs) == len(batch)
        logprobs = result.loss_fn_outputs[0]["logprobs"]
        assert logprobs.shape == [batch[0].model_input.length], logprobs.shape
        losses.append(mean_loss(result, batch))
    report["losses"] = losses

    async def train_async() -> types.ForwardBackwardOutput:
        fwd_bwd = await training.forward_backward_async(data[:4], "cross_entropy")
        optim = await training.optim_step_async(adam)
        out = await fwd_bwd.result_async()
        assert (await optim.result_async()).metrics is not None
        return out

    assert "loss:sum" in asyncio.run(train_async()).metrics

    def surrogate(batch: list[types.Datum], logprobs: list[torch.Tensor]) -> Any:
        loss = sum(
            -(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
            for d, lp in zip(batch, logprobs, strict=True)
        )
        return loss, {"surrogate:sum": loss.item()}

    custom = training.forward_backward_custom(data[:2], surrogate).result()
    assert "loss:sum" in custom.metrics and "surrogate:sum" in custom.metrics, custom.metrics

    async def custom_async() -> types.ForwardBackwardOutput:
        future = await training.forward_backward_custom_async(data[:2], surrogate)
        return await future.result_async()

    assert "surrogate:sum" in asyncio.run(custom_async()).metrics

    # ---- checkpoints: hpcai:// paths name the same checkpoints as tinker:// ones
    saved = training.save_state("ckpt").result()
    assert saved.path == f"hpcai://{run_id}/training/ckpt", saved.path
    reference = mean_loss(training.forward(data[:8], "cross_entropy").result(), data[:8])
    again = asyncio.run(_result(training.forward_async(data[:8], "cross_entropy")))
    assert abs(mean_loss(again, data[:8]) - reference) < 1e-5  # forward changes nothing
    assert asyncio.run(_result(training.save_state_async("ckpt2"))).path.endswith("/ckpt2")
    sampler_path = training.save_weights_for_sampler("s1").result().path
    assert sampler_path == f"hpcai://{run_id}/sampler/s1", sampler_path
    s2 = asyncio.run(_result(training.save_weights_for_sampler_async("s2"))).path
    assert s2 == f"hpcai://{run_id}/sampler/s2", s2
    loaded = training.load_state(saved.path).result()
    assert loaded.path == saved.path, loaded
    assert asyncio.run(_result(training.load_state_async(saved.path))).path == saved.path
    after_load = mean_loss(training.forward(data[:8], "cross_entropy").result(), data[:8])
    assert abs(after_load - reference) < 1e-5, (after_load, reference)

    # ---- sampling
    prompt = types.ModelInput.from_ints(tokenizer.encode("What is 3 plus 4?"))
    params = types.SamplingParams(max_tokens=6, temperature=0.7, seed=1, stop=["\n"])

    def check_sample(result: types.SampleResponse, n: int) -> None:
        assert len(result.sequences) == n, result
        for seq in result.sequences:
            assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs or []) == len(seq.tokens)
            assert seq.stop_reason in ("stop", "length")

    trained_sampler = training.create_sampling_client(sampler_path)
    first = trained_sampler.sample(prompt, 2, params).result()
    check_sample(first, 2)
    repeat = asyncio.run(trained_sampler.sample_async(prompt, 2, params))
    assert [s.tokens for s in repeat.sequences] == [s.tokens for s in first.sequences]
    prompt_logprobs = trained_sampler.compute_logprobs(prompt).result()
    assert len(prompt_logprobs) == prompt.length and prompt_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in prompt_logprobs[1:])
    assert asyncio.run(trained_sampler.compute_logprobs_async(prompt)) == prompt_logprobs
    # the sampler serves the trainer's weights: its prompt logprobs are the forward's
    tokens = prompt.to_ints()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    forward = training.forward([datum], "cross_entropy").result()
    trained_lp = forward.loss_fn_outputs[0]["logprobs"].data
    assert all(abs(x - y) < 1e-3 for x, y in zip(prompt_logprobs[1:], trained_lp, strict=True))
    check_sample(
        training.save_weights_and_get_sampling_client("s3").sample(prompt, 1, params).result(), 1
    )
    s4 = asyncio.run(training.save_weights_and_get_sampling_client_async("s4"))
    check_sample(s4.sample(prompt, 1, params).result(), 1)
    base = service.create_sampling_client(base_model=model)
    base_lp = base.compute_logprobs(prompt).result()
    assert base_lp[1:] != prompt_logprobs[1:]  # the adapter changed the model
    both = service.create_sampling_client(model_path=sampler_path, base_model=model)
    check_sample(both.sample(prompt, 3, params).result(), 3)
    expect_error(
        hpcai.BadRequestError,
        "training checkpoint",
        lambda: (
            service.create_sampling_client(model_path=saved.path, base_model=model)
            .sample(prompt, 1, params)
            .result()
        ),
    )
    # one queued sample per base model at most (WHETSTONE_SAMPLE_QUEUE_LIMIT=1): a burst is
    # answered 429 in part, which the SDK waits out and resubmits
    burst = [trained_sampler.sample(prompt, 1, params) for _ in range(6)]
    for future in burst:
        check_sample(future.result(), 1)
    for client in (training, trained_sampler):  # the SDK calls these on a 408 (see in_queue)
        client.on_queue_state_change(QueueState.ACTIVE)
        client.get_telemetry()

    # ---- REST
    rest = service.create_rest_client()
    rest.get_telemetry()
    runs = rest.list_training_runs(limit=50).result()
    assert run_id in [r.training_run_id for r in runs.training_runs], runs
    assert runs.cursor.total_count >= 1
    assert asyncio.run(rest.list_training_runs_async(limit=50)).cursor == runs.cursor
    run = rest.get_training_run(run_id).result()
    assert run.base_model == model and run.lora_rank == 8 and run.is_lora, run
    assert run.last_checkpoint is not None and run.last_checkpoint.checkpoint_path.startswith(
        f"hpcai://{run_id}/training/"
    ), run
    assert asyncio.run(rest.get_training_run_async(run_id)).training_run_id == run_id
    assert rest.get_training_run_by_checkpoint_path(saved.path).result().training_run_id == run_id
    by_path = asyncio.run(rest.get_training_run_by_checkpoint_path_async(sampler_path))
    assert by_path.training_run_id == run_id
    listed = rest.list_checkpoints(run_id).result()
    paths = {c.checkpoint_path for c in listed.checkpoints}
    assert {saved.path, sampler_path, s2} <= paths, paths
    assert {c.checkpoint_id for c in listed.checkpoints} >= {"ckpt", "ckpt2", "s1", "s2"}
    assert asyncio.run(rest.list_checkpoints_async(run_id)) == listed
    for archive in (
        rest.download_checkpoint_archive(run_id, "ckpt").result(),
        asyncio.run(rest.download_checkpoint_archive_async(run_id, "s1")),
        rest.download_checkpoint_archive_by_checkpoint_path(saved.path).result(),
        asyncio.run(rest.download_checkpoint_archive_by_checkpoint_path_async(sampler_path)),
    ):
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            assert any(m.isfile() and m.size > 0 for m in tar.getmembers()), tar.getnames()
    rest.delete_checkpoint(run_id, "ckpt2").result()
    asyncio.run(rest.delete_checkpoint_async(run_id, "s3"))
    rest.delete_checkpoint_by_checkpoint_path(s2).result()
    asyncio.run(rest.delete_checkpoint_by_checkpoint_path_async(f"hpcai://{run_id}/sampler/s4"))
    left = {c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert left == {"ckpt", "s1"}, left
    expect_error(
        hpcai.NotFoundError, "404", lambda: rest.delete_checkpoint(run_id, "ckpt2").result()
    )

    # ---- tenants: another key sees none of it
    other = hpcai.ServiceClient(base_url=base_url, api_key=other_key)
    other_rest = other.create_rest_client()
    expect_error(hpcai.NotFoundError, "404", lambda: other_rest.get_training_run(run_id).result())
    expect_error(hpcai.NotFoundError, "404", lambda: other_rest.list_checkpoints(run_id).result())
    assert run_id not in [
        r.training_run_id for r in other_rest.list_training_runs().result().training_runs
    ]
    expect_error(hpcai.NotFoundError, "404", other.create_training_client(model_id=run_id).get_info)

    # ---- in_queue: the one trainer slot is taken, so a second run waits until unload_model
    waiting: dict[str, Any] = {}
    queued = threading.Thread(
        target=lambda: waiting.update(
            client=service.create_lora_training_client(base_model=model, rank=4)
        )
    )
    queued.start()
    deadline = time.monotonic() + 90
    while QueueState.IN_QUEUE not in _states(service) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert QueueState.IN_QUEUE in _states(service), calls.get("ServiceClient.on_queue_state_change")
    assert queued.is_alive()
    unloaded = training.unload_model().result()
    assert unloaded.model_id == run_id, unloaded
    queued.join(90)
    second = waiting["client"]
    assert second.model_id != run_id and second.get_info().lora_rank == 4
    report["queued_after_unload"] = True
    expect_error(
        hpcai.BadRequestError,
        "unloaded",
        lambda: training.forward(data[:1], "cross_entropy").result(),
    )
    expect_error(  # hpcai's from_state makes runs with its default LoRA settings only
        hpcai.BadRequestError, "LoRA adapter", lambda: second.load_state(saved.path).result()
    )
    second.forward_backward(data[:8], "cross_entropy")
    second.optim_step(adam).result()
    second_saved = second.save_state("defaults").result().path
    second_loss = mean_loss(second.forward(data[:8], "cross_entropy").result(), data[:8])
    assert asyncio.run(_result(second.unload_model_async())).model_id == second.model_id

    # ---- resuming from a checkpoint, by its hpcai:// path (of a run with hpcai's defaults)
    resumed = service.create_training_client_from_state(second_saved)
    assert resumed.model_id not in (run_id, second.model_id)
    resumed_loss = mean_loss(resumed.forward(data[:8], "cross_entropy").result(), data[:8])
    assert abs(resumed_loss - second_loss) < 1e-4, (resumed_loss, second_loss)
    resumed.unload_model().result()
    resumed_async = asyncio.run(service.create_training_client_from_state_async(second_saved))
    same = service.create_training_client(model_id=resumed_async.model_id, base_model=model)
    assert same.get_info().model_id == resumed_async.model_id
    resumed_async.unload_model().result()
    fresh = asyncio.run(service.create_lora_training_client_async(base_model=model, rank=2))
    assert fresh.get_info().lora_rank == 2
    fresh.unload_model().result()

    report["missing"] = sorted(set(public_methods()) - set(calls))
    report["covered"] = sorted(calls)
    return report


async def _result(future: Any) -> Any:
    return await (await future).result_async()


def _states(service: hpcai.ServiceClient) -> list[Any]:
    return [args[0] for args in calls.get("ServiceClient.on_queue_state_change", []) if args]


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(main(*sys.argv[1:5])))
