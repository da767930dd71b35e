"""The packed Qwen3 on CUDA: the compiled path equals the eager one, every CUDA attention kernel
(SDPA rows, FlexAttention, varlen) equals per-document attention, bf16 stays near a float32
reference, and a compiled trainer engine trains like the CPU one.

Marked ``gpu``: skipped (and deselected by default) without CUDA. Run on a GPU machine with
``pytest -m gpu --noconftest tests/gpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from services.trainer.engine import TrainerEngine
from whetstone.messages import AdamParams, Datum, ForwardBackward, LoraConfig
from whetstone.tensors import Tensor
from whetstone_ml.lora import LoraAdapter, Segment
from whetstone_ml.qwen3 import LoraExpand, ModelOptions, Pack, Qwen3Packed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
VOCAB = 1000


def hf_model(dtype: torch.dtype, device: str) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        hidden_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Qwen3ForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def lora_for(model: Qwen3Packed, seed: int) -> LoraAdapter:
    lora = LoraAdapter.init(
        model.shape.lora_modules(), LoraConfig(rank=8, seed=seed), device=model.device
    )
    gen = torch.Generator().manual_seed(seed)
    for f in lora.factors.values():
        f.b = (torch.randn(f.b.shape, generator=gen) * 0.02).to(model.device).requires_grad_()
    return lora


def run(
    model: Qwen3Packed, lengths: list[int], lora: LoraAdapter
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the LoRA gradients of sum(logsumexp) over a pack of random tokens."""
    gen = torch.Generator().manual_seed(sum(lengths))
    tokens = torch.randint(0, VOCAB, (sum(lengths),), generator=gen).to(model.device)
    pack = Pack.of(lengths, model.device)
    for p in lora.parameters():
        p.grad = None
    segments = [(Segment("a", 0, pack.total), model.lora_weights(lora))]
    logits = model.head_logits(model.hidden(tokens, pack, segments), segments).float()
    logits.logsumexp(-1).sum().backward()
    return logits.detach(), [p.grad.clone() for p in lora.parameters() if p.grad is not None]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


RAGGED = [37, 200, 5, 130, 64]


@pytest.mark.parametrize(
    ("lengths", "expand"),
    [(RAGGED, "gemm"), ([128] * 4, "gemm"), ([128] * 4, "gemm_all"), ([128] * 4, "addmm")],
    ids=["ragged", "rows", "rows-gemm-all", "rows-addmm"],
)
def test_compiled_equals_eager_and_float32(lengths: list[int], expand: LoraExpand) -> None:
    hf = hf_model(torch.bfloat16, "cuda")
    eager = Qwen3Packed.from_hf(hf, ModelOptions(compile=False, lora_expand=expand))
    compiled = Qwen3Packed.from_hf(hf, ModelOptions(compile=True, lora_expand=expand))
    reference = Qwen3Packed.from_hf(hf_model(torch.float32, "cuda"), ModelOptions(attention="docs"))
    lora = lora_for(eager, seed=1)
    logits_e, grads_e = run(eager, lengths, lora)
    logits_c, grads_c = run(compiled, lengths, lora)
    logits_r, grads_r = run(reference, lengths, lora)
    assert torch.isfinite(logits_c).all()
    assert rel(logits_c, logits_e) < 1e-2
    assert rel(logits_e, logits_r) < 2e-2
    assert len(grads_c) == len(grads_e) == len(grads_r) > 0
    for gc, ge, gr in zip(grads_c, grads_e, grads_r, strict=True):
        assert rel(gc, ge) < 3e-2
        assert rel(ge, gr) < 5e-2


@pytest.mark.parametrize("kind", ["flex", "varlen", "rows"])
def test_cuda_attention_kernels_equal_per_document(kind: str) -> None:
    # varlen's FA2 kernels take half precision only: that case is compared in bf16.
    dtype = torch.bfloat16 if kind == "varlen" else torch.float32
    tolerance = 2e-2 if kind == "varlen" else 1e-3
    hf = hf_model(dtype, "cuda")
    lengths = [96] * 3 if kind == "rows" else RAGGED
    options = ModelOptions(attention=kind, compile=kind == "flex")  # type: ignore[arg-type]
    model = Qwen3Packed.from_hf(hf, options)
    docs = Qwen3Packed.from_hf(hf, ModelOptions(attention="docs"))
    lora = lora_for(model, seed=2)
    logits, grads = run(model, lengths, lora)
    ref_logits, ref_grads = run(docs, lengths, lora)
    assert rel(logits, ref_logits) < tolerance
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel(g, r) < 10 * tolerance


def test_selective_checkpointing_under_compile_equals_none() -> None:
    hf = hf_model(torch.float32, "cuda")
    lora = None
    results = []
    for policy in ("none", "selective", "full"):
        model = Qwen3Packed.from_hf(hf, ModelOptions(compile=True, checkpointing=policy))  # type: ignore[arg-type]
        lora = lora or lora_for(model, seed=4)
        results.append(run(model, [256, 256], lora))
    for logits, grads in results[1:]:
        assert rel(logits, results[0][0]) < 1e-4
        for g, r in zip(grads, results[0][1], strict=True):
            assert rel(g, r) < 1e-3


def test_compiled_bf16_engine_trains_like_cpu(tmp_path: Path) -> None:
    model = hf_model(torch.float32, "cpu")
    model.save_pretrained(tmp_path / "m")
    gen = torch.Generator().manual_seed(0)
    data = []
    for n in (40, 17, 64, 64):
        seq = torch.randint(0, VOCAB, (n + 1,), generator=gen)
        data.append(
            Datum(
                model_input=Tensor.from_numpy(seq[:-1].numpy()),
                loss_fn_inputs={"target_tokens": Tensor.from_numpy(seq[1:].numpy())},
            )
        )
    cmd = ForwardBackward(data=data, loss_fn="cross_entropy")
    losses = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        engine = TrainerEngine(tmp_path / "m", device=device, dtype=dtype, compile=True)
        engine.create_run("r", LoraConfig(rank=8, seed=1))
        first = engine.forward_backward("r", cmd)
        engine.optim_step("r", AdamParams(learning_rate=1e-2))
        second = engine.forward_backward("r", cmd.model_copy(update={"forward_only": True}))
        losses[device] = (first.metrics["loss:sum"], second.metrics["loss:sum"])
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=1e-2)
    assert losses["cuda"][1] == pytest.approx(losses["cpu"][1], rel=1e-2)
    assert losses["cuda"][1] < losses["cuda"][0]


def test_optim_step_many_equals_a_step_per_run_on_cuda(tmp_path: Path) -> None:
    """The fused AdamW over several runs at once (two sharing hyperparameters, one clipping)
    gives each run the weights and moments of its own fused step."""
    hf_model(torch.float32, "cpu").save_pretrained(tmp_path / "m")
    gen = torch.Generator().manual_seed(2)
    seq = torch.randint(0, VOCAB, (33,), generator=gen)
    datum = Datum(
        model_input=Tensor.from_numpy(seq[:-1].numpy()),
        loss_fn_inputs={"target_tokens": Tensor.from_numpy(seq[1:].numpy())},
    )
    cmd = ForwardBackward(data=[datum], loss_fn="cross_entropy")
    steps = [
        ("r0", AdamParams(learning_rate=1e-2)),
        ("r1", AdamParams(learning_rate=1e-2)),
        ("r2", AdamParams(learning_rate=3e-3, beta1=0.8, grad_clip_norm=1e-4)),
    ]
    engines = []
    for _ in range(2):
        engine = TrainerEngine(tmp_path / "m", device="cuda", dtype="float32")
        for i in range(3):
            engine.create_run(f"r{i}", LoraConfig(rank=4 * (i + 1), seed=i))
            engine.forward_backward(f"r{i}", cmd)
        engines.append(engine)
    apart = [engines[0].optim_step(run_id, adam).metrics for run_id, adam in steps]
    together = [
        r.metrics for r in engines[1].optim_step_many(steps) if not isinstance(r, Exception)
    ]
    assert together == apart
    for run_id, _ in steps:
        (p,) = engines[0].runs[run_id].adapter.parameters()
        (q,) = engines[1].runs[run_id].adapter.parameters()
        assert torch.equal(p, q)
        moments = engines[0].runs[run_id].optimizer.state[p]
        assert torch.equal(
            moments["exp_avg_sq"], engines[1].runs[run_id].optimizer.state[q]["exp_avg_sq"]
        )
        assert float(moments["exp_avg_sq"].abs().max()) > 0


def test_many_runs_in_one_compiled_pass_equal_separate_passes(tmp_path: Path) -> None:
    hf_model(torch.float32, "cpu").save_pretrained(tmp_path / "m")
    gen = torch.Generator().manual_seed(1)
    calls = []
    for i, n in enumerate((64, 64, 30, 64)):
        seq = torch.randint(0, VOCAB, (n + 1,), generator=gen)
        datum = Datum(
            model_input=Tensor.from_numpy(seq[:-1].numpy()),
            loss_fn_inputs={"target_tokens": Tensor.from_numpy(seq[1:].numpy())},
        )
        calls.append((f"r{i % 3}", ForwardBackward(data=[datum], loss_fn="cross_entropy")))
    engines = {}
    for how in ("together", "apart"):
        engine = TrainerEngine(tmp_path / "m", device="cuda", dtype="bfloat16", compile=True)
        for i in range(3):
            engine.create_run(f"r{i}", LoraConfig(rank=8 * (i + 1), seed=i))
        engines[how] = engine
    joint = engines["together"].forward_backward_many(calls)
    alone = [engines["apart"].forward_backward(run_id, cmd) for run_id, cmd in calls]
    for x, y in zip(joint, alone, strict=True):
        assert not isinstance(x, Exception)
        assert x.metrics["loss:sum"] == pytest.approx(y.metrics["loss:sum"], rel=2e-2)
    for i in range(3):
        run_id = f"r{i}"
        together = engines["together"].runs[run_id].adapter.parameters()
        apart = engines["apart"].runs[run_id].adapter.parameters()
        for p, q in zip(together, apart, strict=True):
            assert p.grad is not None and q.grad is not None
            if float(q.grad.norm()) == 0:  # A of a fresh adapter (B = 0) gets no gradient
                assert float(p.grad.norm()) == 0
            else:
                assert rel(p.grad, q.grad) < 5e-2
