"""The packed Qwen3 (``whetstone_ml.qwen3``) computes Hugging Face's ``Qwen3ForCausalLM`` in
float64 on the CPU: logits packed (ragged documents in one row) and unpacked (equal rows), with
and without LoRA (PEFT's own model is the reference, loading our exported adapter), the LoRA
gradients, every checkpointing policy, every CPU attention path, and several adapters routed to
row segments of one pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from whetstone.messages import LoraConfig
from whetstone_ml import qwen3
from whetstone_ml.lora import LoraAdapter, Segment, lora_gemm
from whetstone_ml.qwen3 import ModelOptions, Pack, Qwen3Packed, Qwen3Shape

VOCAB = 300


def hf_model(tied: bool = False) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # not hidden / heads: the model must read head_dim
        intermediate_size=96,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
        rope_theta=1000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = Qwen3ForCausalLM(config)
        # Non-trivial norm weights: HF initialises them to ones, which would hide a missed norm.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.data.uniform_(0.5, 1.5)
    return model.double().eval()


def adapter(shape: Qwen3Shape, seed: int, **flags: bool) -> LoraAdapter:
    """A float64 adapter with B non-zero; values representable in float32 (PEFT's file)."""
    config = LoraConfig(rank=4, seed=seed, **flags)
    lora = LoraAdapter.init(shape.lora_modules(), config)
    gen = torch.Generator().manual_seed(seed)
    for f in lora.factors.values():
        f.b = (torch.randn(f.b.shape, generator=gen) * 0.05).double().requires_grad_()
        f.a = f.a.detach().double().requires_grad_()
    return lora


def tokens_for(lengths: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


def packed_logits(
    model: Qwen3Packed, docs: list[torch.Tensor], lora: LoraAdapter | None = None
) -> list[torch.Tensor]:
    pack = Pack.of([len(d) for d in docs], torch.device("cpu"))
    w = None if lora is None else model.lora_weights(lora)
    segments = [(Segment("a", 0, pack.total), w)]
    hidden = model.hidden(torch.cat(docs), pack, segments)
    return list(model.head_logits(hidden, segments).split(pack.lengths))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("lengths", [[7, 3, 12, 1], [6, 6, 6]], ids=["ragged", "equal-rows"])
def test_base_logits_equal_hf_in_float64(tied: bool, lengths: list[int]) -> None:
    hf = hf_model(tied)
    model = Qwen3Packed.from_hf(hf)
    docs = tokens_for(lengths, seed=1)
    with torch.no_grad():
        got = packed_logits(model, docs)
        for doc, logits in zip(docs, got, strict=True):
            want = hf(input_ids=doc[None]).logits[0]
            torch.testing.assert_close(logits, want, atol=1e-10, rtol=1e-10)
    # Not vacuous: documents see their own context only, so one pass over everything at once
    # (a single long document) differs from the packed result.
    with torch.no_grad():
        joined = hf(input_ids=torch.cat(docs)[None]).logits[0]
    assert not torch.allclose(torch.cat(got), joined, atol=1e-3)


def peft_reference(hf: Qwen3ForCausalLM, lora: LoraAdapter, tmp_path: Path) -> torch.nn.Module:
    from peft import PeftModel

    lora.save_peft(tmp_path / "adapter", "tiny")
    return PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).double().eval()


def test_lora_logits_and_gradients_equal_peft_in_float64(tmp_path: Path) -> None:
    hf = hf_model()
    model = Qwen3Packed.from_hf(hf)
    lora = adapter(model.shape, seed=3, train_unembed=True)
    docs = tokens_for([9, 4, 13], seed=2)
    weights = [torch.randn(len(d), VOCAB, dtype=torch.float64) for d in docs]

    ours = packed_logits(model, docs, lora)
    loss = sum((torch.log_softmax(lg, -1) * w).sum() for lg, w in zip(ours, weights, strict=True))
    assert isinstance(loss, torch.Tensor)
    loss.backward()

    peft = peft_reference(hf, lora, tmp_path)
    ref_loss = torch.zeros((), dtype=torch.float64)
    for doc, lg, w in zip(docs, ours, weights, strict=True):
        want = peft(input_ids=doc[None]).logits[0]
        torch.testing.assert_close(lg.detach(), want.detach(), atol=1e-10, rtol=1e-10)
        ref_loss = ref_loss + (torch.log_softmax(want, -1) * w).sum()
    ref_loss.backward()
    named = dict(peft.named_parameters())
    assert {n.rsplit(".", 1)[-1] for n in lora.factors} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }
    for name, f in lora.factors.items():
        for which, ours_p in (("lora_A", f.a), ("lora_B", f.b)):
            ref = named[f"base_model.model.{name}.{which}.default.weight"]
            assert ours_p.grad is not None and ref.grad is not None
            torch.testing.assert_close(ours_p.grad, ref.grad, atol=1e-10, rtol=1e-8)
    # The adapter matters: the base logits differ.
    with torch.no_grad():
        base = packed_logits(model, docs)
    assert not torch.allclose(torch.cat(base), torch.cat(ours).detach(), atol=1e-3)


def test_partial_targets_equal_peft(tmp_path: Path) -> None:
    """An adapter on the MLP only (no q/k/v, o or head factors) and one on attention only."""
    hf = hf_model()
    model = Qwen3Packed.from_hf(hf)
    docs = tokens_for([5, 8], seed=4)
    for flags in ({"train_attn": False}, {"train_mlp": False, "train_unembed": False}):
        lora = adapter(model.shape, seed=5, **flags)
        with torch.no_grad():
            ours = packed_logits(model, docs, lora)
            peft = peft_reference(hf, lora, tmp_path / str(len(lora.factors)))
            for doc, lg in zip(docs, ours, strict=True):
                torch.testing.assert_close(
                    lg, peft(input_ids=doc[None]).logits[0], atol=1e-10, rtol=0
                )
        hf = hf_model()  # PEFT wrapped the last one in place


def _grads_under(options: ModelOptions, docs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    hf = hf_model()
    model = Qwen3Packed.from_hf(hf, options)
    lora = adapter(model.shape, seed=seed)
    logits = packed_logits(model, docs, lora)
    torch.cat(logits).logsumexp(-1).sum().backward()
    return [t.grad for t in lora.parameters() if t.grad is not None]


def test_checkpointing_policies_and_attention_paths_give_the_same_gradients() -> None:
    docs = tokens_for([6, 6, 6], seed=9)
    reference = _grads_under(ModelOptions(checkpointing="none", attention="docs"), docs, seed=1)
    assert len(reference) == 2 * (2 * 7 + 1) and any(bool(g.abs().max() > 0) for g in reference)
    for options in (
        ModelOptions(checkpointing="selective", attention="docs"),
        ModelOptions(checkpointing="full", attention="docs"),
        ModelOptions(checkpointing="selective", attention="rows"),
        ModelOptions(checkpointing="selective", lora_expand="addmm"),
        ModelOptions(checkpointing="none", lora_expand="gemm_all"),
        ModelOptions(checkpointing="selective", lora_expand="gemm_all"),
    ):
        got = _grads_under(options, docs, seed=1)
        for g, r in zip(got, reference, strict=True):
            torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("stacked", "expand", "all_layers"),
    [
        (True, "gemm_all", True),
        (True, "addmm", True),
        (True, "gemm", False),
        (False, "gemm_all", True),
    ],
    ids=["stacked-in-gemm", "stacked-addmm", "stacked-layer-by-layer", "per-segment"],
)
def test_segments_route_rows_to_their_own_adapter(
    stacked: bool, expand: qwen3.LoraExpand, all_layers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three segments (adapter a, the base model, adapter b) in one pass equal three passes,
    with the adapters stacked (one GEMM pair, masked; the expand inside the base GEMM or added
    after it; stacked for all layers at once or layer by layer) or applied per segment."""
    if not stacked:
        monkeypatch.setattr(qwen3, "MAX_STACKED_RANK", 0)
    if not all_layers:
        monkeypatch.setattr(Qwen3Packed, "stacked_lora_all", lambda *_: None)
    model = Qwen3Packed.from_hf(hf_model(), ModelOptions(lora_expand=expand))
    assert (
        model.stacked_lora_ok([(Segment("a", 0, 1), model.lora_weights(adapter(model.shape, 1)))])
        is stacked
    )
    a, b = adapter(model.shape, seed=1), adapter(model.shape, seed=2, train_unembed=True)
    docs = tokens_for([5, 3, 7, 4, 6], seed=3)
    lengths = [len(d) for d in docs]
    pack = Pack.of(lengths, torch.device("cpu"))
    wa, wb = model.lora_weights(a), model.lora_weights(b)
    cut1, cut2 = lengths[0] + lengths[1], sum(lengths[:3])
    segments = [
        (Segment("a", 0, cut1), wa),
        (Segment(None, cut1, cut2), None),
        (Segment("b", cut2, pack.total), wb),
    ]
    joint = model.head_logits(model.hidden(torch.cat(docs), pack, segments), segments)
    joint.logsumexp(-1).sum().backward()
    joint_grads = [t.grad.clone() for t in (*a.parameters(), *b.parameters()) if t.grad is not None]
    for t in (*a.parameters(), *b.parameters()):
        t.grad = None
    apart = [
        *packed_logits(model, docs[:2], a),
        *packed_logits(model, docs[2:3]),
        *packed_logits(model, docs[3:], b),
    ]
    torch.testing.assert_close(joint.detach(), torch.cat(apart).detach(), atol=1e-10, rtol=0)
    torch.cat(apart).logsumexp(-1).sum().backward()
    apart_grads = [t.grad for t in (*a.parameters(), *b.parameters()) if t.grad is not None]
    assert len(joint_grads) == len(apart_grads) > 0
    for g, r in zip(joint_grads, apart_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)


def test_unsupported_configs_are_refused() -> None:
    config = hf_model().config
    config.attention_bias = True
    with pytest.raises(ValueError, match="attention biases"):
        Qwen3Shape.from_config(config)
    with pytest.raises(ValueError, match="at least one token"):
        Pack.of([3, 0], torch.device("cpu"))


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_lora_gemm_is_the_sum_and_passes_gradcheck(x_grad: bool) -> None:
    """``[x | s] [W | B]ᵀ`` equals ``x Wᵀ + s Bᵀ``, and its backward (``[dx | ds]`` in one GEMM,
    ``dB``, no gradient for ``W``) passes gradcheck in float64, also when ``x`` needs none."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 5, dtype=torch.float64, generator=gen).requires_grad_(x_grad)
    s = torch.randn(7, 3, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(6, 3, dtype=torch.float64, generator=gen).requires_grad_()
    torch.testing.assert_close(lora_gemm(x, s, w, b), x @ w.T + s @ b.T, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lora_gemm, (x, s, w, b))
    inputs = [t for t in (x, s, b) if t.requires_grad]
    got = torch.autograd.grad(lora_gemm(x, s, w, b).sin().sum(), inputs)
    want = torch.autograd.grad((x @ w.T + s @ b.T).sin().sum(), inputs)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_lora_gemm_refuses_a_trainable_base_weight() -> None:
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient for the base weight"):
        lora_gemm(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1), w, torch.randn(4, 1))


def test_a_flattened_adapter_computes_the_same_and_gets_one_gradient() -> None:
    """``LoraAdapter.flatten(model.lora_order)``: one leaf; the same logits, and its gradient is
    the per-factor gradients laid out in that order (A's, then B's); factors read and write it."""
    model = Qwen3Packed.from_hf(hf_model())
    docs = tokens_for([5, 9], seed=6)
    apart, flat = adapter(model.shape, seed=8), adapter(model.shape, seed=8)
    flat.flatten(model.lora_order)
    assert len(flat.parameters()) == 1 and flat.flat is not None
    results = []
    for lora in (apart, flat):
        logits = torch.cat(packed_logits(model, docs, lora))
        logits.logsumexp(-1).sum().backward()
        results.append(logits.detach())
    torch.testing.assert_close(results[1], results[0], atol=1e-12, rtol=0)
    names = flat.flat_names
    want = [apart.factors[n].a.grad for n in names] + [apart.factors[n].b.grad for n in names]
    assert all(g is not None for g in want)
    torch.testing.assert_close(flat.parameters()[0].grad, torch.cat([g.reshape(-1) for g in want]))
    with torch.no_grad():
        flat.flat.zero_()
    assert all(not f.b.any() for f in flat.factors.values())  # the factors are views of it
    shuffled = adapter(model.shape, seed=8)
    shuffled.flatten(list(reversed(model.lora_order)))
    with pytest.raises(ValueError, match="another order"):
        model.lora_weights(shuffled)


@pytest.mark.parametrize(
    "flags", [{"train_unembed": True}, {"train_attn": False}], ids=["all", "mlp-only"]
)
def test_all_layers_at_once_equals_layer_by_layer_weights(
    flags: dict[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lora_weights`` builds a uniform adapter's per-layer factors for all layers at once;
    forced onto the per-piece path, the model computes the same logits and gradients."""
    model = Qwen3Packed.from_hf(hf_model())
    docs = tokens_for([6, 4], seed=12)
    results = []
    for uniform in (True, False):
        if not uniform:
            monkeypatch.setattr(Qwen3Packed, "_uniform_layout", lambda *_: False)
        lora = adapter(model.shape, seed=13, **flags)
        lora.flatten(model.lora_order)
        logits = torch.cat(packed_logits(model, docs, lora))
        logits.logsumexp(-1).sum().backward()
        (grad,) = [p.grad for p in lora.parameters()]
        results.append((logits.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-12, rtol=1e-10)
    assert float(results[0][1].abs().max()) > 0


def test_an_adapter_missing_a_layers_module_takes_the_per_piece_path() -> None:
    model = Qwen3Packed.from_hf(hf_model())
    lora = adapter(model.shape, seed=14)
    names = [n for n in model.lora_order if n in lora.factors]
    assert model._uniform_layout(lora, names)
    del lora.factors["model.layers.1.mlp.down_proj"]
    names = [n for n in model.lora_order if n in lora.factors]
    assert not model._uniform_layout(lora, names)
    weights = model.lora_weights(lora)
    assert weights.layers[1][3] is None and weights.layers[0][3] is not None
