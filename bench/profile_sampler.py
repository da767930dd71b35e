"""Where a sampler decode step spends its time: a torch.profiler table for eager and graphed steps.

Run (GPU):  python3 bench/profile_sampler.py [--seqs 64 --prompt 256]

Same random-weight Qwen3-4B as ``bench_sampler.py``, the engine's CUDA defaults (CUDA graphs,
compiled layer bodies, Triton paged attention). Prefills the prompts, then profiles a few decode
steps (kernels by CUDA time, and host ops by CPU time: what the GPU waits for between replays),
and times the graph replay alone against the whole step; profiles the prefill step first.
``--eager`` profiles the eager step too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import build_model, requests, sync  # noqa: E402

from services.sampler.engine import SamplerEngine  # noqa: E402
from whetstone_ml.builtin import ensure_builtin_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    args.smoke, args.device, args.dtype = False, "cuda", "bfloat16"
    tiny = ensure_builtin_model(Path("/tmp/whetstone-bench-models"))
    model = build_model(args, tiny)
    prompts = np.random.default_rng(0).integers(10, 1999, size=(args.seqs, args.prompt))
    for graphs in (False, True) if args.eager else (True,):
        engine = SamplerEngine(
            model=model,
            tokenizer_dir=tiny,
            device="cuda",
            dtype=torch.bfloat16,
            context_length=args.prompt + 300,
            max_seqs=args.seqs,
            kv_cache_tokens=args.seqs * (args.prompt + 320),
            prefill_tokens=args.seqs * args.prompt,
            cuda_graphs=graphs,
        )
        # The prefill step twice (the first warms kernels and graphs), the second profiled.
        for profiled in (False, True):
            engine.abort()
            for r in requests(prompts, 200, 1.0):
                engine.add(r, None)
            sync()
            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step()
                sync()
            if profiled:
                print(f"\n=== prefill step: {(time.perf_counter() - t) * 1e3:.1f} ms")
                print(
                    prof.key_averages().table(
                        sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70
                    )
                )
        for _ in range(2 + args.steps):  # warm the decode graphs
            engine.step()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step_ms = (time.perf_counter() - t) / args.steps * 1e3
        print(f"\n=== cuda_graphs={graphs}: {step_ms:.2f} ms per decode step")
        if graphs and engine._graphs is not None:
            g = next(iter(engine._graphs.graphs.values()))[0]
            times = []
            for _ in range(10):
                sync()
                t = time.perf_counter()
                g.replay()
                sync()
                times.append((time.perf_counter() - t) * 1e3)
            print(f"graph replay alone: {statistics.median(times):.2f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            sync()
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
