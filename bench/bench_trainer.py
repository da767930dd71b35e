"""Trainer throughput (P1): Whetstone's engine against a naive PEFT loop, in one call.

Run (GPU):  python3 bench/bench_trainer.py                 (random-weight Qwen3-4B, bf16)
            python3 bench/bench_trainer.py --smoke         (built-in tiny model, CPU or GPU)

Builds a random-weight Qwen3 of the real size from its config (no download) and saves it once, so
both sides load the same weights. For each batch shape (``--rows`` rows of ``--seq`` tokens) it
times ``--steps`` steps after ``--warmup``: a step is one cross-entropy forward_backward plus one
AdamW step, LoRA rank 32 on every attention and MLP projection, base weights in bf16.

* Whetstone: ``TrainerEngine.forward_backward`` + ``optim_step`` (the service's own path: the
  packed Qwen3 of ``whetstone_ml.qwen3``), once per ``--variants`` entry (``compile`` or
  ``eager``, ``+`` a checkpointing policy: ``selective``, ``full``, ``none``; then optionally
  ``+addmm``, ``+gemm`` or ``+gemm_all`` for ``ModelOptions.lora_expand``, and ``+unflat`` to
  keep the run's factors as separate leaves, as the engine did before flat adapters: so old and
  new run side by side).
* Naive: ``peft.get_peft_model`` over the HF model with gradient checkpointing (without it the
  naive step does not fit at 16k tokens), ``model(input_ids)``, fp32 cross-entropy, backward,
  AdamW. The model is put in train mode: HF applies gradient checkpointing only in training.

``--p2`` measures P2 instead: 8 runs of one 2048-token datum each, stepped one after another
against one ``forward_backward_many`` pass over all of them, for each ``--p2-variants`` entry:
``new`` (the engine as it is: one ``optim_step_many`` for the 8 runs after the pass) and ``old``
(expand by ``addmm``, unflattened factors, each run's own ``optim_step``).
``--models 4b,8b`` picks the sizes (random weights of Qwen3-4B's and Qwen3-8B's configs).
``--profile`` profiles one step of the first variant (torch.profiler) and prints the top kernels.
A side that runs out of memory is reported as OOM. MFU counts 4·N·T (forward plus the backward
through frozen weights, N base parameters, T tokens) plus attention (forward and backward, causal),
against the H200's 989 TFLOP/s dense bf16. Prints a table last; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sampler import QWEN3_4B, sync  # noqa: E402

from services.trainer.engine import TrainerEngine  # noqa: E402
from whetstone.messages import AdamParams, Datum, ForwardBackward, LoraConfig  # noqa: E402
from whetstone.tensors import Tensor  # noqa: E402
from whetstone_ml.builtin import ensure_builtin_model  # noqa: E402
from whetstone_ml.lora import LoraAdapter, LoraFactors  # noqa: E402

RANK = 32
QWEN3_8B = dict(
    QWEN3_4B,
    hidden_size=4096,
    intermediate_size=12288,
    tie_word_embeddings=False,
)
SIZES = {"4b": QWEN3_4B, "8b": QWEN3_8B}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16_FLOPS = 989e12


def model_dir(args: argparse.Namespace, root: Path, size: str) -> Path:
    if args.smoke:
        return ensure_builtin_model(root / "models")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):  # random init on the GPU: seconds, not minutes
            model = Qwen3ForCausalLM(Qwen3Config(**SIZES[size]))
    finally:
        torch.set_default_dtype(previous)
    out = root / f"qwen3-{size}-random"
    model.save_pretrained(out)
    del model
    free()
    return out


def flops_per_step(config, rows: int, seq: int, n_params: int) -> float:
    tokens = rows * seq
    heads_dim = config.num_attention_heads * config.head_dim
    attention_fwd = config.num_hidden_layers * 2 * rows * seq * seq * heads_dim  # causal: half of 4
    return 4 * n_params * tokens + 3 * attention_fwd


def batch(rows: int, seq: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows)
    return torch.randint(0, vocab, (rows, seq + 1), generator=generator)


def timed(step, warmup: int, steps: int) -> dict:
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    try:
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        sync()
        warmup_s = time.perf_counter() - start  # includes compilation
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {
        "oom": False,
        "step_s": statistics.median(times),
        "steps_s": times,
        "warmup_s": warmup_s,
        "peak_bytes": peak,
    }


def set_expand(engine: TrainerEngine, expand: str) -> None:
    """Switch the model's ``lora_expand`` before its first pass (layers compile on first use)."""
    engine.model.options = dataclasses.replace(engine.model.options, lora_expand=expand)  # type: ignore[arg-type]
    engine.model._layer_fns.clear()


def unflatten(engine: TrainerEngine, run_id: str) -> None:
    """The run's factors as separate leaves (two per module), with a fresh optimizer over them:
    the engine before flat adapters, for timing old against new."""
    state = engine.runs[run_id]
    factors = {
        name: LoraFactors(
            f.a.detach().clone().requires_grad_(), f.b.detach().clone().requires_grad_(), f.scale
        )
        for name, f in state.adapter.factors.items()
    }
    state.adapter = LoraAdapter(state.adapter.config, factors)
    state.optimizer = engine._new_optimizer(state.adapter)


def ours(directory: Path, tokens: torch.Tensor, args: argparse.Namespace, variant: str) -> dict:
    mode, *rest = variant.split("+")
    policy, flags = (rest[0] if rest else "selective"), rest[1:]
    engine = TrainerEngine(
        directory,
        device=args.device,
        dtype="bfloat16",
        compile=mode == "compile",
        checkpointing=policy,  # type: ignore[arg-type]
        micro_batch_tokens=tokens.numel(),
    )
    for flag in flags:
        if flag in ("addmm", "gemm", "gemm_all"):
            set_expand(engine, flag)
    engine.create_run("r", LoraConfig(rank=RANK, seed=0, train_unembed=False))
    if "unflat" in flags:
        unflatten(engine, "r")
    data = [
        Datum(
            model_input=Tensor.from_list(row[:-1].tolist(), "int64"),
            loss_fn_inputs={"target_tokens": Tensor.from_list(row[1:].tolist(), "int64")},
        )
        for row in tokens
    ]
    command = ForwardBackward(data=data, loss_fn="cross_entropy")
    adam = AdamParams(learning_rate=1e-4)

    def step() -> None:
        engine.forward_backward("r", command)
        engine.optim_step("r", adam)

    result = timed(step, args.warmup, args.steps)
    result["micro_batch_tokens"] = engine.micro_batch_tokens  # lowered if a pass ran out of memory
    if args.profile and not result["oom"]:
        result["profile"] = profile(step, args)
        args.profile = False  # the first variant only
    return result  # the caller frees what it held (free())


def many_runs(directory: Path, args: argparse.Namespace, variant: str, runs: int = 8) -> dict:
    """P2: ``runs`` runs of one ``--seq``-token datum each, stepped one after another
    (forward_backward + optim_step per run) and together (one ``forward_backward_many`` over all
    runs, then the runs' optimizer steps: ``optim_step_many`` for ``new``, one ``optim_step``
    per run for ``old``), on one engine (compile+selective)."""
    engine = TrainerEngine(
        directory, device=args.device, dtype="bfloat16", compile=args.device == "cuda"
    )
    old = variant == "old"
    if old:
        set_expand(engine, "addmm")
    tokens = batch(runs, args.seq, engine.vocab_size)
    calls = []
    for i, row in enumerate(tokens):
        engine.create_run(f"r{i}", LoraConfig(rank=RANK, seed=i, train_unembed=False))
        if old:
            unflatten(engine, f"r{i}")
        datum = Datum(
            model_input=Tensor.from_list(row[:-1].tolist(), "int64"),
            loss_fn_inputs={"target_tokens": Tensor.from_list(row[1:].tolist(), "int64")},
        )
        calls.append((f"r{i}", ForwardBackward(data=[datum], loss_fn="cross_entropy")))
    adam = AdamParams(learning_rate=1e-4)

    def one_after_another() -> None:
        for run_id, cmd in calls:
            engine.forward_backward(run_id, cmd)
            engine.optim_step(run_id, adam)

    def together() -> None:
        for result in engine.forward_backward_many(calls):
            assert not isinstance(result, Exception), result
        if old:
            for run_id, _ in calls:
                engine.optim_step(run_id, adam)
        else:
            for step in engine.optim_step_many([(run_id, adam) for run_id, _ in calls]):
                assert not isinstance(step, Exception), step

    out = {"sequential": timed(one_after_another, args.warmup, args.steps)}
    out["one pass"] = timed(together, args.warmup, args.steps)
    if args.profile and not out["one pass"]["oom"]:
        out["one pass"]["profile"] = profile(together, args)
    return out


def profile(step, args: argparse.Namespace) -> str:
    """One step under torch.profiler: the kernels by their own CUDA time, top 45."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45)
    if args.out:
        (args.out / "profile.txt").write_text(table)
    return table


def naive(directory: Path, tokens: torch.Tensor, args: argparse.Namespace) -> dict:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16)
    model = get_peft_model(
        model.to(args.device),
        PeftLoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0),
    )
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()  # HF checkpoints only in training mode (Qwen3 has no dropout to switch on)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 LoRA factors, as ours keeps them
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = tokens[:, :-1].to(args.device)
    labels = tokens[:, 1:].to(args.device)

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, args.warmup, args.steps)  # the caller frees what it held (free())


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="4b", help="sizes, comma-separated: 4b, 8b")
    parser.add_argument("--rows", default="8", help="rows per step, comma-separated")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="compile+selective", help="ours, comma-separated")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive PEFT loop")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--p2", action="store_true", help="only P2: 8 runs in one pass")
    parser.add_argument("--p2-variants", default="new", help="P2 engines: new, old")
    parser.add_argument("--out", type=Path, help="folder for profile.txt")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.seq, args.rows, args.steps, args.warmup, args.models = 64, "2", 1, 1, "tiny"
    from transformers import AutoConfig, AutoModelForCausalLM

    naive_name = "naive PEFT + checkpointing"
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": {},
    }
    for size in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            directory = model_dir(args, Path(tmp), size)
            config = AutoConfig.from_pretrained(str(directory))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
                n_params = sum(p.numel() for p in model.parameters())
            if args.p2:
                for variant in args.p2_variants.split(","):
                    p2 = many_runs(directory, args, variant)
                    free()
                    results.setdefault("p2", {})[f"{size} 8 runs x {args.seq}, {variant}"] = p2
                    if "profile" in p2["one pass"]:
                        print(p2["one pass"]["profile"])
                        args.profile = False
                continue
            for rows in [int(r) for r in args.rows.split(",")]:
                tokens = batch(rows, args.seq, config.vocab_size)
                shape: dict = {"flops": flops_per_step(config, rows, args.seq, n_params)}
                shape["params"] = n_params
                for variant in args.variants.split(","):
                    shape[f"whetstone {variant}"] = ours(directory, tokens, args, variant)
                    free()
                if not args.no_naive:
                    shape[naive_name] = naive(directory, tokens, args)
                    free()
                results["shapes"][f"{size} {rows}x{args.seq}"] = shape
                printable = {k: v for k, v in shape.items() if not isinstance(v, dict)}
                printable |= {
                    k: {x: y for x, y in v.items() if x != "profile"}
                    for k, v in shape.items()
                    if isinstance(v, dict)
                }
                print(json.dumps({f"{size} {rows}x{args.seq}": printable}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for name, shape in results["shapes"].items():
        for engine, r in shape.items():
            if isinstance(r, dict) and "profile" in r:
                print(f"\nprofile of one step, {name}, {engine}:\n{r['profile']}")
    print(
        f"\n{results['device']} (torch {results['torch']}): LoRA rank {RANK}, attention + MLP, "
        "bf16 base"
    )
    for name, p2 in results.get("p2", {}).items():
        print(f"\nP2, {name}, LoRA rank {RANK}: one step of every run")
        print("| how | step s | tokens/s | peak GiB | vs sequential |")
        print("|---|---|---|---|---|")
        tokens = 8 * args.seq
        for how, r in p2.items():
            if r["oom"]:
                print(f"| {how} | OOM | - | - | - |")
                continue
            speed = p2["sequential"]["step_s"] / r["step_s"] if not p2["sequential"]["oom"] else 0
            print(
                f"| {how} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} | "
                f"{r['peak_bytes'] / 2**30:.1f} | {speed:.2f}x |"
            )
    if args.p2:
        return 0
    print("| model, step | engine | step s | tokens/s | MFU | peak GiB | vs naive |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in results["shapes"].items():
        rows_seq = name.split()[-1]
        tokens = int(rows_seq.split("x")[0]) * int(rows_seq.split("x")[1])
        base = shape.get(naive_name, {"oom": True})
        for engine, r in shape.items():
            if not isinstance(r, dict):
                continue
            if r["oom"]:
                print(f"| {name} | {engine} | OOM | - | - | - | - |")
                continue
            speed = "-" if base["oom"] else f"{base['step_s'] / r['step_s']:.2f}x"
            mfu = shape["flops"] / r["step_s"] / PEAK_BF16_FLOPS
            print(
                f"| {name} | {engine} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} | "
                f"{mfu:.1%} | {r['peak_bytes'] / 2**30:.1f} | {speed} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
