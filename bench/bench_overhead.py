"""Platform overhead (target P5): the real Tinker SDK through gateway -> NATS -> trainer, against
the same forward called in-process, with tracing off and on, and the futures/s one gateway
completes for many clients.

Run:  .venv/bin/python bench/bench_overhead.py [--n 200] [--m 500] [--clients 8] [--threads K]
          [--tracing off|on|both] [--rounds 2] [--quick] [--dir DIR]

Measurements, side by side in one run, on the built-in tiny model, one datum of 32 tokens,
``cross_entropy``, forward only:

(a) in-process: ``TrainerEngine.forward_backward(run, ForwardBackward(..., forward_only=True))``
    called directly, N times after warm-up: p50/p90 latency. This is the trainer's own cost.
(b) platform: ``training.forward([datum], "cross_entropy").result()`` with the unmodified
    ``tinker`` SDK against ``start_platform`` (NATS plus the five services as child processes),
    N times, one after another; (b) - (a) is the platform's overhead (target: <= 5 ms at p50
    with tracing on).
(c) one client: M ``training.forward`` futures submitted without waiting, then all resolved.
    The SDK submits one TrainingClient's requests one at a time, so this is 1 / submit latency.
(d) many clients: K TrainingClients (K runs), M futures spread over them, every client
    pipelining its share: futures completed per second through one gateway (target: >= 500/s).
    Beside it: the compute ceiling (one trainer runs one forward at a time: 1000 / (a) p50) and
    the CPU each process spent per future (``/proc``), which bounds the rate on this machine.

Tracing: ``--tracing on`` starts a platform whose services really export every span, with the
production exporter (``OTEL_TRACES_EXPORTER=otlp``, OTLP/HTTP protobuf, batch span processor) to
``otlp_sink.py`` on 127.0.0.1, which answers 200 and counts and records the spans. That is what a
deployment pays (span recording, protobuf encoding, one HTTP POST per batch); a console exporter
would measure JSON formatting and terminal writes instead. ``both`` (the default) starts one
platform per mode and interleaves them, so both see the same machine. From the recorded spans
the last table breaks one sequential forward's time down into its steps.

(a) and every (b) run in this process while the platforms are up, interleaved in blocks of 20
calls; (c) and (d) alternate between the modes for ``--rounds`` rounds (the median is printed).
``--threads K`` sets the torch thread count both here and in the trainer service
(``OMP_NUM_THREADS``); by default each uses torch's own choice (one per core).
``--quick`` (N=10, M=40, 4 clients, 2 warm-ups, 1 round, tracing on) is a smoke run for CI; it
checks that everything works, not the targets. A fresh temporary state directory is used (and
removed) unless --dir is given; the built-in model is cached under ``~/.cache/whetstone/models``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
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
from whetstone.platform import Platform, start_platform  # noqa: E402
from whetstone.tensors import Tensor  # noqa: E402
from whetstone_ml.builtin import ensure_builtin_model  # noqa: E402

SEQ_TOKENS = 32
LORA_RANK = 16
TARGET_OVERHEAD_MS = 5.0
TARGET_FUTURES_PER_S = 500.0
BENCH = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def random_tokens(seed: int = 0) -> list[int]:
    """SEQ_TOKENS + 1 ids: inputs are the first SEQ_TOKENS, targets the last SEQ_TOKENS."""
    return np.random.default_rng(seed).integers(1, VOCAB_SIZE, SEQ_TOKENS + 1).tolist()


def percentile_ms(samples_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples_s) * 1000, q))


def in_process_call(models_dir: Path, tokens: list[int]) -> Callable[[], object]:
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


# ---------------------------------------------------------------- the platforms under test


class OtlpSink:
    """``otlp_sink.py`` in a process of its own (its CPU is not the services')."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "otlp_sink.py"), "--record", str(record)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def tracing_env(sink: OtlpSink) -> dict[str, str]:
    """What a deployment sets to export its traces, pointed at the sink."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.endpoint,
    }


@dataclass
class Target:
    """One platform (tracing off or on) and the SDK clients driving it."""

    mode: str
    platform: Platform
    service: tinker.ServiceClient
    training: tinker.TrainingClient
    many: list[tinker.TrainingClient] = field(default_factory=list)

    def pids(self) -> dict[str, int]:
        pids = {name: child.process.pid for name, child in self.platform.services.items()}
        return {**pids, "nats-server": self.platform.nats.process.pid}


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


# ---------------------------------------------------------------- measurements


def interleaved(
    calls: dict[str, Callable[[], object]], n: int, warmup: int, block: int = 20
) -> dict[str, list[float]]:
    """Time each call ``n`` times, alternating blocks of ``block``, so that all see the same
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


@dataclass
class Throughput:
    rate: float  # futures per second
    elapsed_s: float
    cpu_ms: dict[str, float]  # CPU per future, per process


def pipelined(
    target: Target, clients: list[tinker.TrainingClient], datum: types.Datum, m: int
) -> Throughput:
    """M forwards spread round-robin over ``clients``, all submitted before any is waited for;
    seconds from the first submission until the last result, and the CPU spent meanwhile."""
    pids = target.pids()
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    before_client = own_cpu_s()
    start = time.perf_counter()
    futures = [clients[i % len(clients)].forward([datum], "cross_entropy") for i in range(m)]
    for fut in futures:
        fut.result()
    elapsed = time.perf_counter() - start
    cpu = {name: (cpu_s(pid) - before[name]) * 1000 / m for name, pid in pids.items()}
    cpu["client (SDK)"] = (own_cpu_s() - before_client) * 1000 / m
    return Throughput(m / elapsed, elapsed, cpu)


def median_run(runs: list[Throughput]) -> Throughput:
    runs = sorted(runs, key=lambda r: r.rate)
    return runs[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="sequential repetitions for (a), (b)")
    parser.add_argument("--m", type=int, default=500, help="futures in flight for (c) and (d)")
    parser.add_argument("--clients", type=int, default=8, help="TrainingClients (runs) for (d)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (c) and (d) per mode")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--tracing",
        choices=("off", "on", "both"),
        default=None,
        help="platforms to measure (default: both; --quick: on)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run: N=10, M=40, 4 clients, 2 warm-ups"
    )
    parser.add_argument(
        "--dir", type=Path, help="state directory for the platforms (default: a temp dir)"
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
        args.n, args.m, args.clients, args.warmup, args.rounds = 10, 40, 4, 2, 1
    modes = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[
        args.tracing or ("on" if args.quick else "both")
    ]

    tokens = random_tokens()
    datum = sdk_datum(tokens)
    base_env: dict[str, str] = {}
    if args.threads:  # the same torch thread count in this process and in the trainer service
        torch.set_num_threads(args.threads)
        base_env["OMP_NUM_THREADS"] = str(args.threads)
    state_root = args.dir or Path(tempfile.mkdtemp(prefix="whetstone-bench-"))
    state_root.mkdir(parents=True, exist_ok=True)
    sink = OtlpSink(state_root / "spans.jsonl") if "on" in modes else None
    targets: list[Target] = []
    load_start = os.getloadavg()[0]
    try:
        for mode in modes:
            env = {**base_env, **(tracing_env(sink) if mode == "on" and sink else {})}
            print(
                f"starting the platform (tracing {mode}) under {state_root / mode} ...", flush=True
            )
            t0 = time.perf_counter()
            platform = start_platform(
                state_root / mode, port=0, models_dir=args.models_dir, extra_env=env
            )
            print(
                f"platform up in {time.perf_counter() - t0:.1f} s at {platform.base_url}",
                flush=True,
            )
            service = tinker.ServiceClient(base_url=platform.base_url, api_key=platform.api_key)
            target = Target(mode, platform, service, _training_client(service))
            targets.append(target)
            target.many = [_training_client(service) for _ in range(args.clients)]

        local_call = in_process_call(args.models_dir, tokens)
        calls: dict[str, Callable[[], object]] = {"local": local_call}
        for target in targets:
            training = target.training
            calls[target.mode] = lambda t=training: t.forward([datum], "cross_entropy").result()
        print(
            f"(a)+(b) in-process engine and tinker SDK, {args.n} forwards each, interleaved ...",
            flush=True,
        )
        samples = interleaved(calls, args.n, args.warmup)
        sequential_until_ns = time.time_ns()  # traces started before this are (b)'s

        one: dict[str, list[Throughput]] = {t.mode: [] for t in targets}
        many: dict[str, list[Throughput]] = {t.mode: [] for t in targets}
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else targets[::-1]
            for target in order:
                print(
                    f"(c)+(d) round {r + 1}, tracing {target.mode}: {args.m} futures, "
                    f"1 and {args.clients} clients ...",
                    flush=True,
                )
                one[target.mode].append(pipelined(target, [target.training], datum, args.m))
                many[target.mode].append(pipelined(target, target.many, datum, args.m))
        load_end = os.getloadavg()[0]
    finally:
        for target in targets:
            try:
                target.service.close("success").result()
            except Exception as exc:  # noqa: BLE001 - the platform goes down anyway
                print(f"closing the SDK session failed: {exc}", file=sys.stderr)
            target.platform.stop()  # the services flush their span batches on the way out
        spans = sink.stats() if sink else None
        steps = None
        if sink:
            sink.stop()
            if targets and "sequential_until_ns" in locals():
                steps = breakdown(sink.record, sequential_until_ns)
        if args.dir is None:
            shutil.rmtree(state_root, ignore_errors=True)

    report(args, samples, one, many, spans, load_start, load_end)
    if steps:
        print()
        print("Where one sequential forward's time goes, tracing on (p50 over (b)'s traces; the")
        print("SDK's own work and the HTTP round trips are what the spans do not cover)")
        print("| step | p50 | p90 |")
        print("|---|---|---|")
        for step, values in steps.items():
            print(
                f"| {step} | {percentile_ms(values, 50):.2f} ms | "
                f"{percentile_ms(values, 90):.2f} ms |"
            )


def breakdown(record: Path, until_ns: int) -> dict[str, list[float]]:
    """Per-step durations (seconds) of the sequential forwards' traces, from the spans the
    sink recorded: the gateway's submit, the wait in the stream and the trainer's pickup, the
    trainer's execution (forward, result and usage writes, ack), the result's way back to the
    gateway, and the gateway's answer to the long poll."""
    spans = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    by_trace: dict[str, list[dict[str, object]]] = {}
    for span in spans:
        by_trace.setdefault(str(span["trace"]), []).append(span)
    steps: dict[str, list[float]] = {}

    def first(trace: list[dict[str, object]], prefix: str, service: str) -> dict[str, int] | None:
        found = [
            sp
            for sp in trace
            if str(sp["name"]).startswith(prefix) and sp["service"] == f"whetstone-{service}"
        ]
        return min(found, key=lambda sp: int(sp["start"])) if found else None  # type: ignore

    for trace in by_trace.values():
        submit = first(trace, "POST /api/v1/forward_backward", "gateway")
        publish = first(trace, "ws.train.", "gateway")
        consume = first(trace, "ws.train.", "trainer")
        execute = first(trace, "execute forward", "trainer")
        deliver = first(trace, "deliver forward", "gateway")
        if not (submit and publish and consume and execute and deliver):
            continue
        if submit["start"] > until_ns:
            continue
        intervals = {
            "gateway: POST forward_backward, all of it": (submit["start"], submit["end"]),
            "... of which before the publish (auth, decode, validate, dedup create)": (
                submit["start"],
                publish["start"],
            ),
            "... of which the publish and after (publish ack, mark, response)": (
                publish["start"],
                submit["end"],
            ),
            "publish -> trainer consumes (stream, pull fetch, middlewares)": (
                publish["start"],
                consume["start"],
            ),
            "trainer consumes -> executes (reorder buffer, executor wake-up)": (
                consume["start"],
                execute["start"],
            ),
            "trainer executes -> gateway delivers (forward, result write, KV watch, wake-up)": (
                execute["start"],
                deliver["start"],
            ),
            "trainer: execute span, all of it (also progress and ack, after the result)": (
                execute["start"],
                execute["end"],
            ),
            "gateway: encode the result (deliver span)": (deliver["start"], deliver["end"]),
            "first byte of the submit -> result encoded (what the spans cover)": (
                submit["start"],
                deliver["end"],
            ),
        }
        for step, (start, end) in intervals.items():
            steps.setdefault(step, []).append((end - start) / 1e9)
    return steps


def _training_client(service: tinker.ServiceClient) -> tinker.TrainingClient:
    return service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=LORA_RANK
    ).result()


def report(
    args: argparse.Namespace,
    samples: dict[str, list[float]],
    one: dict[str, list[Throughput]],
    many: dict[str, list[Throughput]],
    spans: dict[str, int] | None,
    load_start: float,
    load_end: float,
) -> None:
    local = samples["local"]
    a50, a90 = percentile_ms(local, 50), percentile_ms(local, 90)
    ceiling = 1000.0 / a50
    ok = lambda good: "meets" if good else "MISSES"  # noqa: E731

    print()
    print(
        f"forward, 1 datum x {SEQ_TOKENS} tokens, cross_entropy, LoRA rank {LORA_RANK}, "
        f"N={args.n}, M={args.m}, {args.clients} clients, {args.rounds} round(s), warm-up "
        f"{args.warmup}, torch threads {torch.get_num_threads()}, load average "
        f"{load_start:.2f} -> {load_end:.2f}"
    )
    if spans is not None:
        print(
            f"spans exported by the traced platform: {spans['spans']} in "
            f"{spans['requests']} OTLP requests ({spans['bytes'] / 1e6:.1f} MB)"
        )
    print("| measurement | p50 | p90 | mean | target |")
    print("|---|---|---|---|---|")
    mean_ms = statistics.mean(local) * 1000
    print(f"| (a) in-process engine | {a50:.2f} ms | {a90:.2f} ms | {mean_ms:.2f} ms | – |")
    for mode in one:
        remote = samples[mode]
        b50, b90 = percentile_ms(remote, 50), percentile_ms(remote, 90)
        overhead = b50 - a50
        target = (
            f"<= {TARGET_OVERHEAD_MS:.0f} ms at p50: {ok(overhead <= TARGET_OVERHEAD_MS)}"
            if mode == "on"
            else "–"
        )
        print(
            f"| (b) tinker SDK via platform, tracing {mode} | {b50:.2f} ms | {b90:.2f} ms | "
            f"{statistics.mean(remote) * 1000:.2f} ms | – |"
        )
        print(
            f"| (b) - (a) platform overhead, tracing {mode} | {overhead:.2f} ms | "
            f"{b90 - a90:.2f} ms | – | {target} |"
        )
    for mode in one:
        c, d = median_run(one[mode]), median_run(many[mode])
        print(
            f"| (c) futures/s, 1 client, {args.m} in flight, tracing {mode} | "
            f"{c.rate:.0f}/s ({c.elapsed_s:.2f} s) | – | – | – |"
        )
        print(
            f"| (d) futures/s, {args.clients} clients, {args.m} in flight, tracing {mode} | "
            f"{d.rate:.0f}/s ({d.elapsed_s:.2f} s) | – | – | "
            f">= {TARGET_FUTURES_PER_S:.0f}/s: {ok(d.rate >= TARGET_FUTURES_PER_S)} |"
        )
    print(
        f"| compute ceiling for (c) and (d), one trainer, 1000 / (a) p50 | {ceiling:.0f}/s "
        "| – | – | – |"
    )
    print()
    print(
        f"CPU per future in (d), ms (the machine has {os.cpu_count()} cores: the rate cannot "
        "pass cores x 1000 / total)"
    )
    names = list(next(iter(many.values()))[0].cpu_ms)
    print("| process | " + " | ".join(f"tracing {mode}" for mode in many) + " |")
    print("|---|" + "---|" * len(many))
    for name in [*names, "total"]:
        cells = []
        for mode in many:
            cpu = median_run(many[mode]).cpu_ms
            cells.append(f"{sum(cpu.values()) if name == 'total' else cpu[name]:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
