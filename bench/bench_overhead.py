"""Platform overhead (target P5): the real Tinker SDK through gateway -> NATS -> trainer, against
the same forward called in-process.

Run:  .venv/bin/python bench/bench_overhead.py [--n 200] [--m 500] [--threads K] [--quick] [--dir DIR]

Three measurements, side by side in one run, on the built-in tiny model, one datum of 32 tokens,
``cross_entropy``, forward only:

(a) in-process: ``TrainerEngine.forward_backward(run, ForwardBackward(..., forward_only=True))``
    called directly, N times after warm-up: p50/p90 latency. This is the trainer's own cost.
(b) platform: ``training.forward([datum], "cross_entropy").result()`` with the unmodified
    ``tinker`` SDK against ``start_platform`` (NATS plus the five services as child processes),
    N times, one after another: p50/p90 latency; (b) - (a) is the platform's overhead
    (target: <= 15 ms added at p50).
(c) throughput: M ``training.forward`` futures submitted without waiting, then all resolved:
    futures completed per second through one gateway (target: >= 500/s). One run's requests
    execute in order on one trainer, so this is bounded above by 1 / (a)'s latency too; the table
    prints that ceiling beside the figure.

(a) and (b) run in the same process while the platform is up, interleaved in blocks of 20
calls, so both see the same machine (a shared one is noisy). ``--threads K`` sets the torch
thread count both here and in the trainer service (``OMP_NUM_THREADS``); by default each uses
torch's own choice (one per core).
``--quick`` (N=10, M=20, 2 warm-ups) is a smoke run for CI; it checks that everything works,
not the targets. A fresh temporary state directory is used (and removed) unless --dir is given;
the built-in model is cached under ``~/.cache/whetstone/models``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TINKER_TELEMETRY", "0")  # before the SDK is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tinker  # noqa: E402
from tinker import types  # noqa: E402

from services.trainer.engine import TrainerEngine  # noqa: E402
from whetstone.messages import Datum, ForwardBackward, LoraConfig  # noqa: E402
from whetstone.models.builtin import BUILTIN_MODEL_NAME, VOCAB_SIZE  # noqa: E402
from whetstone.platform import start_platform  # noqa: E402
from whetstone.tensors import Tensor  # noqa: E402
from whetstone_ml.builtin import ensure_builtin_model  # noqa: E402

SEQ_TOKENS = 32
LORA_RANK = 16
TARGET_OVERHEAD_MS = 15.0
TARGET_FUTURES_PER_S = 500.0


def random_tokens(seed: int = 0) -> list[int]:
    """SEQ_TOKENS + 1 ids: inputs are the first SEQ_TOKENS, targets the last SEQ_TOKENS."""
    return np.random.default_rng(seed).integers(1, VOCAB_SIZE, SEQ_TOKENS + 1).tolist()


def percentile_ms(samples_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples_s) * 1000, q))


def in_process_call(models_dir: Path, tokens: list[int]):
    """(a): the engine's forward_backward(forward_only=True) with our own message types."""
    engine = TrainerEngine(ensure_builtin_model(models_dir))
    engine.create_run("bench", LoraConfig(rank=LORA_RANK, seed=0))
    datum = Datum(
        model_input=Tensor.from_list(tokens[:-1], "int64"),
        loss_fn_inputs={
            "target_tokens": Tensor.from_list(tokens[1:], "int64"),
            "weights": Tensor.from_list([1.0] * SEQ_TOKENS, "float32"),
        },
    )
    cmd = ForwardBackward(data=[datum], loss_fn="cross_entropy", forward_only=True)
    return lambda: engine.forward_backward("bench", cmd)


def sdk_datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * SEQ_TOKENS},
    )


def sdk_call(training: tinker.TrainingClient, tokens: list[int]):
    """(b): one SDK forward, waited for."""
    datum = sdk_datum(tokens)
    return lambda: training.forward([datum], "cross_entropy").result()


def interleaved(
    calls: dict[str, object], n: int, warmup: int, block: int = 20
) -> dict[str, list[float]]:
    """Time each call ``n`` times, alternating blocks of ``block``, so that both see the same
    noise on a shared machine (a fixed order would give one of them the quiet minute)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    while len(samples[next(iter(calls))]) < n:
        for name, call in calls.items():
            for _ in range(min(block, n - len(samples[name]))):
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
    return samples


def bench_sdk_throughput(training: tinker.TrainingClient, tokens: list[int], m: int) -> float:
    """(c): seconds from the first of M submissions until all M results are in."""
    datum = sdk_datum(tokens)
    start = time.perf_counter()
    futures = [training.forward([datum], "cross_entropy") for _ in range(m)]
    for fut in futures:
        fut.result()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="sequential repetitions for (a) and (b)")
    parser.add_argument("--m", type=int, default=500, help="futures in flight for (c)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run: N=10, M=20, 2 warm-ups"
    )
    parser.add_argument(
        "--dir", type=Path, help="state directory for the platform (default: a temp dir)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads here and in the trainer service (default: torch's own choice)",
    )
    parser.add_argument(
        "--models-dir", type=Path, default=Path.home() / ".cache" / "whetstone" / "models"
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.m, args.warmup = 10, 20, 2

    tokens = random_tokens()
    extra_env = {}
    if args.threads:  # the same torch thread count in this process and in the trainer service
        torch.set_num_threads(args.threads)
        extra_env = {"OMP_NUM_THREADS": str(args.threads)}
    state_dir = args.dir or Path(tempfile.mkdtemp(prefix="whetstone-bench-"))
    print(f"starting the platform under {state_dir} ...", flush=True)
    t0 = time.perf_counter()
    platform = start_platform(state_dir, port=0, models_dir=args.models_dir, extra_env=extra_env)
    print(f"platform up in {time.perf_counter() - t0:.1f} s at {platform.base_url}", flush=True)
    try:
        local_call = in_process_call(args.models_dir, tokens)
        service = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
        try:
            training = service.create_lora_training_client(
                base_model=BUILTIN_MODEL_NAME, rank=LORA_RANK
            ).result()
            print(
                f"(a)+(b) in-process engine and tinker SDK, {args.n} forwards each, interleaved ...",
                flush=True,
            )
            samples = interleaved(
                {"local": local_call, "remote": sdk_call(training, tokens)}, args.n, args.warmup
            )
            local, remote = samples["local"], samples["remote"]
            print(f"(c) tinker SDK via the platform: {args.m} futures in flight ...", flush=True)
            elapsed_s = bench_sdk_throughput(training, tokens, args.m)
        finally:
            service.close("success").result()
    finally:
        platform.stop()
        if args.dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)

    a50, a90 = percentile_ms(local, 50), percentile_ms(local, 90)
    b50, b90 = percentile_ms(remote, 50), percentile_ms(remote, 90)
    overhead = b50 - a50
    rate = args.m / elapsed_s
    ceiling = 1000.0 / a50
    ok = lambda good: "meets" if good else "MISSES"  # noqa: E731

    print()
    print(
        f"forward, 1 datum x {SEQ_TOKENS} tokens, cross_entropy, LoRA rank {LORA_RANK}, "
        f"N={args.n}, M={args.m}, warm-up {args.warmup}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print("| measurement | p50 | p90 | mean | target |")
    print("|---|---|---|---|---|")
    print(
        f"| (a) in-process engine | {a50:.2f} ms | {a90:.2f} ms | {statistics.mean(local) * 1000:.2f} ms | – |"
    )
    print(
        f"| (b) tinker SDK via platform | {b50:.2f} ms | {b90:.2f} ms | {statistics.mean(remote) * 1000:.2f} ms | – |"
    )
    print(
        f"| (b) - (a) platform overhead | {overhead:.2f} ms | {b90 - a90:.2f} ms | – | "
        f"<= {TARGET_OVERHEAD_MS:.0f} ms at p50: {ok(overhead <= TARGET_OVERHEAD_MS)} |"
    )
    print(
        f"| (c) futures/s, {args.m} in flight | {rate:.0f}/s ({elapsed_s:.2f} s) | – | – | "
        f">= {TARGET_FUTURES_PER_S:.0f}/s: {ok(rate >= TARGET_FUTURES_PER_S)} |"
    )
    print(f"| compute ceiling for (c), 1000 / (a) p50 | {ceiling:.0f}/s | – | – | – |")


if __name__ == "__main__":
    main()
