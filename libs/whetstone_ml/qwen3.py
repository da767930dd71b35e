"""The trainer's own Qwen3: packed tokens in, final hidden states out, LoRA built in.

A batch is one flat row of ``T`` tokens: the documents (datums) one after another, no padding.
Each document restarts its RoPE positions at 0 and attends only to its own earlier tokens
(:class:`Pack` holds the lengths, positions and cumulative offsets). The Hugging Face weights are
taken over once, with q/k/v fused into one matrix and gate/up into another, so a decoder layer
runs four base GEMMs. Every fused projection carries LoRA: the adapters' fp32 master factors are
cast to the compute dtype once per pass (:meth:`Qwen3Packed.lora_weights`: the q/k/v or gate/up
``A`` stacked, their ``B`` block-diagonal with the scale folded in), so one shrink and one expand
GEMM serve the fused projection; autograd carries the gradient back to the fp32 masters. The
expand runs inside the base GEMM (``[x | xAᵀ] · [W | B]ᵀ``, ``whetstone_ml.lora.lora_gemm``,
``ModelOptions.lora_expand``) instead of re-reading and rewriting the base output.

Attention (``ModelOptions.attention``; ``auto`` picks):

* ``rows``: every document has the same length, so the pack is a ``(B, L)`` batch without a
  single pad token: SDPA with ``is_causal`` and native GQA (cuDNN on Hopper, the fastest path).
* ``flex``: ragged documents on CUDA under compile: FlexAttention with a document-causal block
  mask built once per pass.
* ``varlen``: ragged documents on CUDA without compile: ``torch.nn.attention.varlen`` (its FA2
  kernels take bf16/fp16 only).
* ``docs``: one causal SDPA per document (CPU; the reference the others must equal).

Each decoder layer is one function; on CUDA it can be compiled once (``torch.compile``) and run
for every layer (regional compilation). With gradients on, each layer runs under activation
checkpointing: ``selective`` keeps the GEMM and attention outputs and recomputes the pointwise
work (norms, RoPE, SiLU), ``full`` recomputes the whole layer, ``none`` keeps everything.

Several adapters in one pass (row segments, one per run) run stacked: their factors side by
side in one shrink and one expand GEMM per projection, with a 0/1 mask keeping each row to its
own adapter's columns (exact: the other products are with zeros); past ``MAX_STACKED_RANK``
columns, one GEMM pair per segment. An adapter with the same modules in every layer (all of
Whetstone's) is cast, cut and stacked for all layers at once, a handful of kernels per pass.

The module computes exactly Hugging Face's ``Qwen3ForCausalLM`` function (the unit tests compare
in float64, packed and unpacked, with and without LoRA, values and gradients); it refuses configs
it does not implement (biases, sliding windows, scaled RoPE). It runs past 800 lines because
the model, its LoRA layouts (per layer and for all layers, single and stacked) and its attention
dispatch are one unit computing one function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from whetstone_ml.lora import LoraAdapter, Segment, lora_gemm

# Fused projections: HF sub-modules in output order, per decoder layer.
FUSED: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
HEAD = "lm_head"
# Several adapters in one pass run stacked up to this total rank (per fused projection).
MAX_STACKED_RANK = 1024
Attention = Literal["auto", "rows", "flex", "varlen", "docs"]
Checkpointing = Literal["none", "selective", "full"]
LoraExpand = Literal["addmm", "gemm", "gemm_all"]


@dataclass(frozen=True)
class ModelOptions:
    """How the model runs. ``compile``: ``torch.compile`` each decoder layer (CUDA only; ignored
    on CPU); ``checkpointing``: the activation policy with gradients on; ``attention``: the
    kernel for a pack (``auto``: ``rows`` when every document has the same length, else
    ``flex`` on CUDA under compile, ``varlen`` on CUDA without (half precision), else ``docs``);
    ``lora_expand``: how a projection adds its LoRA (``gemm``: inside the base GEMM,
    ``[x | xAᵀ] · [W | B]ᵀ``, for q/k/v and gate/up, whose inputs are a norm's fresh output;
    ``gemm_all``: for the o and down projections too; ``addmm``: a separate expand GEMM added
    into the base output)."""

    compile: bool = False
    checkpointing: Checkpointing = "selective"
    attention: Attention = "auto"
    lora_expand: LoraExpand = "gemm"


@dataclass(frozen=True)
class Qwen3Shape:
    """The sizes of a Qwen3 config that the model needs."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float

    @classmethod
    def from_config(cls, config: Any) -> Qwen3Shape:
        """The shape of an HF ``Qwen3Config``; configs this model does not compute are refused."""
        if config.model_type != "qwen3":
            raise ValueError(f"the packed trainer model is Qwen3's, not {config.model_type!r}")
        if getattr(config, "attention_bias", False):
            raise ValueError("qwen3 with attention biases is not supported")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("qwen3 with sliding-window attention is not supported")
        if config.hidden_act != "silu":
            raise ValueError(f"qwen3 with activation {config.hidden_act!r} is not supported")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"qwen3 with RoPE scaling {rope.get('rope_type')!r} is not supported")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10_000.0))
        heads = int(config.num_attention_heads)
        return cls(
            vocab=int(config.vocab_size),
            hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(config.num_key_value_heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            intermediate=int(config.intermediate_size),
            eps=float(config.rms_norm_eps),
            rope_theta=float(theta),
        )

    def sub_sizes(self, kind: str) -> list[int]:
        """Output widths of a fused projection's sub-projections."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "qkv": [q, kv, kv],
            "o": [self.hidden],
            "gate_up": [self.intermediate, self.intermediate],
            "down": [self.hidden],
            HEAD: [self.vocab],
        }[kind]

    def lora_modules(self) -> dict[str, tuple[int, int]]:
        """Every LoRA-targetable HF module name with its ``(in_features, out_features)``."""
        inputs = {"qkv": self.hidden, "o": self.heads * self.head_dim}
        inputs |= {"gate_up": self.hidden, "down": self.intermediate}
        out: dict[str, tuple[int, int]] = {}
        for i in range(self.layers):
            for kind, subs in FUSED.items():
                for sub, width in zip(subs, self.sub_sizes(kind), strict=True):
                    out[f"model.layers.{i}.{sub}"] = (inputs[kind], width)
        out[HEAD] = (self.hidden, self.vocab)
        return out


@dataclass
class Layer:
    """One decoder layer's frozen weights (``nn.Linear`` layout: ``[out, in]``)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 KVH) * hd, D]
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 F, D]
    down: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (
            self.input_norm,
            self.qkv,
            self.q_norm,
            self.k_norm,
            self.o,
            self.post_norm,
            self.gate_up,
            self.down,
        )


# One fused projection's LoRA in the compute dtype: A ``[R, in]`` and B ``[out, R]`` (scaled).
ProjLora = tuple[torch.Tensor, torch.Tensor]
# Per layer, the fused projections in FUSED's order (None: the adapter has none there).
LayerLora = tuple[ProjLora | None, ...]


@dataclass
class AdapterWeights:
    """An adapter as the model applies it (see :meth:`Qwen3Packed.lora_weights`)."""

    layers: list[LayerLora]
    head: ProjLora | None
    # Per fused projection, every layer's A ``[layers, R, in]`` and B ``[layers, out, R]`` (for
    # a uniform layout; ``layers`` are views of these), so several adapters stack in one go.
    all_layers: list[ProjLora | None] | None = None


@dataclass
class Pack:
    """Documents of ``lengths`` tokens packed one after another into ``T = sum(lengths)`` rows."""

    lengths: list[int]
    positions: torch.Tensor  # (T,) int64, each document's positions from 0
    cu_seqlens: torch.Tensor  # (n + 1,) int32 offsets of the documents
    doc_ids: torch.Tensor  # (T,) int32, the document each row belongs to
    block_mask: Any = field(default=None, repr=False)  # FlexAttention's, built on first use

    @classmethod
    def of(cls, lengths: Sequence[int], device: torch.device) -> Pack:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a pack needs documents of at least one token, got {lengths}")
        lens = torch.tensor(list(lengths), dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        doc_ids = torch.repeat_interleave(torch.arange(len(lens)), lens)
        positions = torch.arange(int(offsets[-1])) - offsets[doc_ids]
        return cls(
            list(lengths),
            positions.to(device),
            offsets.to(device=device, dtype=torch.int32),
            doc_ids.to(device=device, dtype=torch.int32),
        )

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def equal(self) -> bool:
        return len(set(self.lengths)) == 1


# ------------------------------------------------------------------------ the layer function


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Qwen3RMSNorm: normalise in float32, scale in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; ``x`` is ``[T, heads, hd]``, cos/sin ``[T, hd]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _project(
    x: torch.Tensor, w: torch.Tensor, parts: Sequence[tuple[int, int, Any]], fused: bool
) -> torch.Tensor:
    """``x @ w.T`` plus the LoRA of ``parts`` (as :func:`_with_lora`); with ``fused``, a single
    adapter's (or the stacked adapters') expand runs inside the base GEMM (:func:`lora_gemm`)."""
    lora = parts[0][2] if len(parts) == 1 else None
    if not fused or lora is None:
        return _with_lora(x @ w.T, x, parts)
    s = x @ lora[0].T
    return lora_gemm(x, s * lora[2] if len(lora) == 3 else s, w, lora[1])


def _with_lora(
    y: torch.Tensor, x: torch.Tensor, parts: Sequence[tuple[int, int, Any]]
) -> torch.Tensor:
    """``y`` plus the LoRA product of ``x``'s rows. ``parts`` holds ``(start, stop, lora)``:
    one ``(A, B)`` (or ``None``, the base model) per row segment, or a single stacked
    ``(A, B, mask)`` for all rows (several adapters side by side; the 0/1 mask keeps each row
    to its own adapter's columns: :meth:`Qwen3Packed.stacked_lora`)."""
    if len(parts) == 1:
        lora = parts[0][2]
        if lora is None:
            return y
        if len(lora) == 3:
            a, b, mask = lora
            return torch.addmm(y, (x @ a.T) * mask, b.T)
        return torch.addmm(y, x @ lora[0].T, lora[1].T)
    if all(p[2] is None for p in parts):
        return y
    deltas = []
    for start, stop, lora in parts:
        rows = x[start:stop]
        if lora is None:
            deltas.append(rows.new_zeros(stop - start, y.shape[-1]))
        else:
            deltas.append((rows @ lora[0].T) @ lora[1].T)
    return y + torch.cat(deltas)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, meta: Any, scale: float
) -> torch.Tensor:
    """Document-causal attention over packed ``[T, heads, hd]`` q/k/v; returns ``[T, H * hd]``."""
    t, heads, hd = q.shape
    if kind == "rows":  # meta: (B, L)
        b, length = meta
        qb, kb, vb = (z.view(b, length, z.shape[1], hd).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2).reshape(t, heads * hd)
    if kind == "flex":  # meta: the pack's BlockMask
        from torch.nn.attention.flex_attention import flex_attention

        qf, kf, vf = (z.transpose(0, 1)[None] for z in (q, k, v))
        out = flex_attention(qf, kf, vf, block_mask=meta, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(t, heads * hd)  # type: ignore[union-attr]
    if kind == "varlen":  # meta: (cu_seqlens, max_len)
        cu, longest = meta
        out = _varlen(q, k, v, cu, longest, scale)
        return out.reshape(t, heads * hd)
    # "docs": meta is the list of lengths; one causal SDPA per document.
    outs, start = [], 0
    for n in meta:
        qd, kd, vd = (z[start : start + n].transpose(0, 1)[None] for z in (q, k, v))
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1).reshape(n, heads * hd))
        start += n
    return torch.cat(outs)


def _varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    """Causal ``varlen_attn`` (causal is ``window_size=(-1, 0)``; torch 2.11 takes GQA as it is,
    later versions ask for ``enable_gqa``)."""
    from torch.nn.attention.varlen import varlen_attn

    call: Any = varlen_attn
    extra = {"enable_gqa": True} if _VARLEN_TAKES_GQA else {}
    out = call(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), **extra)
    return out if isinstance(out, torch.Tensor) else out[0]


def _varlen_takes_gqa() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


_VARLEN_TAKES_GQA = _varlen_takes_gqa()


def decoder_layer(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    lora: tuple[tuple[int, int, LayerLora | None], ...],
    attention: tuple[str, Any],
    shape: Qwen3Shape,
    expand: LoraExpand = "addmm",
) -> torch.Tensor:
    """One Qwen3 decoder layer over packed tokens ``x`` ``[T, D]`` (HF's computation, fused;
    ``expand`` as ``ModelOptions.lora_expand``)."""
    input_norm, qkv_w, q_norm, k_norm, o_w, post_norm, gate_up_w, down_w = weights
    s = shape
    t = x.shape[0]

    def parts(kind: int) -> list[tuple[int, int, ProjLora | None]]:
        return [(a, b, None if layer is None else layer[kind]) for a, b, layer in lora]

    h = rms_norm(x, input_norm, s.eps)
    fused, fused_all = expand != "addmm", expand == "gemm_all"
    qkv = _project(h, qkv_w, parts(0), fused)
    q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = rope(rms_norm(q.reshape(t, s.heads, s.head_dim), q_norm, s.eps), cos, sin)
    k = rope(rms_norm(k.reshape(t, s.kv_heads, s.head_dim), k_norm, s.eps), cos, sin)
    v = v.reshape(t, s.kv_heads, s.head_dim)
    attn = _attention(q, k, v, attention[0], attention[1], s.head_dim**-0.5)
    x = x + _project(attn, o_w, parts(1), fused_all)

    h = rms_norm(x, post_norm, s.eps)
    gate, up = _project(h, gate_up_w, parts(2), fused).chunk(2, dim=-1)
    m = F.silu(gate) * up
    return x + _project(m, down_w, parts(3), fused_all)


def _save_list() -> set[Any]:
    """Ops whose outputs selective checkpointing keeps: GEMMs and attention (torchtitan's
    choice); everything else (norms, RoPE, SiLU, casts) is recomputed in backward."""
    aten = torch.ops.aten
    names = [
        "mm",
        "addmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ]
    ops: set[Any] = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    return ops


_SAVE = _save_list()


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(fn: Callable[..., torch.Tensor], policy: Checkpointing) -> Callable[..., Any]:
    if policy == "none":
        return fn
    if policy == "full":
        return functools.partial(checkpoint, fn, use_reentrant=False)
    context = functools.partial(create_selective_checkpoint_contexts, _policy)
    return functools.partial(checkpoint, fn, use_reentrant=False, context_fn=context)


# ------------------------------------------------------------------------ the model


class Qwen3Packed:
    """A frozen Qwen3 base over packed tokens, applying any mix of adapters per row segment."""

    def __init__(
        self,
        shape: Qwen3Shape,
        embed: torch.Tensor,
        layers: list[Layer],
        norm: torch.Tensor,
        head: torch.Tensor,
        options: ModelOptions | None = None,
    ) -> None:
        self.shape = shape
        self.embed, self.layers, self.norm, self.head = embed, layers, norm, head
        self.options = options or ModelOptions()
        self.device, self.dtype = embed.device, embed.dtype
        s = shape
        self.inv_freq = 1.0 / (
            s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim)
        ).to(self.device)
        self.compiled = self.options.compile and self.device.type == "cuda"
        # LoRA factors in layer order, each fused projection's sub-projections adjacent.
        self._lora_order = [
            f"model.layers.{i}.{sub}"
            for i in range(s.layers)
            for subs in FUSED.values()
            for sub in subs
        ] + [HEAD]
        self._layer_fns: dict[bool, Callable[..., Any]] = {}

    @classmethod
    def from_hf(cls, model: Any, options: ModelOptions | None = None) -> Qwen3Packed:
        """Take over an HF ``Qwen3ForCausalLM``'s weights (q/k/v and gate/up concatenated)."""
        shape = Qwen3Shape.from_config(model.config)
        layers = []
        with torch.no_grad():
            for hf in model.model.layers:
                a, m = hf.self_attn, hf.mlp
                layers.append(
                    Layer(
                        hf.input_layernorm.weight.detach(),
                        torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                        a.q_norm.weight.detach(),
                        a.k_norm.weight.detach(),
                        a.o_proj.weight.detach(),
                        hf.post_attention_layernorm.weight.detach(),
                        torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                        m.down_proj.weight.detach(),
                    )
                )
        return cls(
            shape,
            model.model.embed_tokens.weight.detach(),
            layers,
            model.model.norm.weight.detach(),
            model.lm_head.weight.detach(),
            options,
        )

    @property
    def lora_order(self) -> list[str]:
        """Every LoRA-targetable module in the order :meth:`lora_weights` lays factors out (pass
        it to ``LoraAdapter.flatten``)."""
        return list(self._lora_order)

    def base_tensors(self) -> list[torch.Tensor]:
        """Every frozen base tensor (a tied head appears once, as the embedding)."""
        out = [self.embed, *(t for layer in self.layers for t in layer.tensors()), self.norm]
        return out if self.head is self.embed else [*out, self.head]

    # ---------------------------------------------------------------- LoRA

    def lora_weights(self, adapter: LoraAdapter) -> AdapterWeights:
        """``adapter``'s fp32 factors fused per projection and cast to the compute dtype.

        For a fused projection the sub-projections' ``A`` are stacked (``[R_q + R_k + R_v, in]``)
        and their scaled ``B`` placed block-diagonally (``[out, R_q + R_k + R_v]``; a missing
        sub-projection is a zero block), so ``x @ Aᵀ @ Bᵀ`` is every sub-projection's LoRA at
        once. Differentiable: gradients reach the fp32 masters; built with gradients off, the
        result is detached from them.

        Every factor goes through one concatenation (none for an adapter already flattened in
        :attr:`lora_order`, whose flat leaf is cast as it is), one cast and one scaling, laid
        out so that
        each stacked ``A`` is a view: a few dozen kernels per adapter and pass instead of a
        thousand (their launch cost, not their bytes, is what a pass would wait for).
        """
        f = adapter.factors
        names = [n for n in self._lora_order if n in f]
        scales = {f[n].scale for n in names}
        if adapter.flat is not None:  # already laid out so (LoraAdapter.flatten(lora_order))
            if adapter.flat_names != tuple(names):
                raise ValueError("the adapter was flattened in another order than lora_order")
            flat = adapter.flat
        else:
            flat = torch.cat(
                [f[n].a.reshape(-1) for n in names] + [f[n].b.reshape(-1) for n in names]
            )
        flat = flat.to(self.dtype, copy=True)  # a fresh tensor: never the leaves themselves
        if len(scales) == 1 and self._uniform_layout(adapter, names):
            return self._layerwise_lora(adapter, names, flat, scales.pop())
        # Pieces by split, never by slicing: a split's backward is one concatenation of the
        # pieces' gradients, where each slice's would fill a zero tensor of the whole size and
        # add it up (hundreds of full-size fills and adds per pass).
        known = set(names)
        groups: list[list[str]] = []  # per fused projection present, its modules (A adjacent)
        for i in range(self.shape.layers):
            for subs in FUSED.values():
                present = [m for sub in subs if (m := f"model.layers.{i}.{sub}") in known]
                if present:
                    groups.append(present)
        if HEAD in known:
            groups.append([HEAD])
        n_a = sum(f[n].a.numel() for n in names)
        a_part, b_part = flat.split([n_a, flat.numel() - n_a])
        if len(scales) == 1:
            b_part = b_part * scales.pop()
        a_pieces = a_part.split([sum(f[n].a.numel() for n in group) for group in groups])
        b_pieces = b_part.split([f[n].b.numel() for n in names])
        stacked_a = {group[0]: piece for group, piece in zip(groups, a_pieces, strict=True)}
        bs: dict[str, torch.Tensor] = {}
        for n, piece in zip(names, b_pieces, strict=True):
            b = piece.view(f[n].b.shape)
            bs[n] = b if len(scales) <= 1 else b * f[n].scale

        layers: list[LayerLora] = []
        for i in range(self.shape.layers):
            fused: list[ProjLora | None] = []
            for kind, subs in FUSED.items():
                found = [f"model.layers.{i}.{sub}" for sub in subs]
                present = [n for n in found if n in bs]
                if not present:
                    fused.append(None)
                    continue
                rows = sum(f[n].a.shape[0] for n in present)
                a = stacked_a[present[0]].view(rows, f[present[0]].a.shape[1])
                blocks = [
                    bs[n] if n in bs else torch.zeros(size, 0, dtype=self.dtype, device=self.device)
                    for n, size in zip(found, self.shape.sub_sizes(kind), strict=True)
                ]
                fused.append((a, blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)))
            layers.append(tuple(fused))
        head = None
        if HEAD in bs:
            head = (stacked_a[HEAD].view(f[HEAD].a.shape), bs[HEAD])
        return AdapterWeights(layers, head)

    def _uniform_layout(self, adapter: LoraAdapter, names: Sequence[str]) -> bool:
        """Whether every decoder layer has the same LoRA modules with the same shapes (what
        ``LoraAdapter.init`` makes), so that the flat layout repeats with a fixed period."""
        f = adapter.factors
        subs = [sub for subs in FUSED.values() for sub in subs]
        first = [
            (f[n].a.shape, f[n].b.shape) if (n := f"model.layers.0.{s}") in f else None
            for s in subs
        ]
        expected = sum(x is not None for x in first) * self.shape.layers + (HEAD in f)
        if len(names) != expected:
            return False
        for i in range(1, self.shape.layers):
            for sub, shapes in zip(subs, first, strict=True):
                g = f.get(f"model.layers.{i}.{sub}")
                if (g is None) != (shapes is None) or (
                    g is not None and (g.a.shape, g.b.shape) != shapes
                ):
                    return False
        return True

    def _layerwise_lora(
        self, adapter: LoraAdapter, names: Sequence[str], flat: torch.Tensor, scale: float
    ) -> AdapterWeights:
        """:meth:`lora_weights` for a uniform layout, built for all layers at once: the flat
        factors viewed as ``[layers, period]`` and split by module, each fused projection's
        block-diagonal ``B`` filled for every layer in one copy per sub-projection, and the
        per-layer tensors taken by ``unbind`` (whose backward is one stack). A handful of
        kernels and autograd nodes per adapter, where per-layer pieces cost hundreds of small
        copies each pass."""
        f, n_layers = adapter.factors, self.shape.layers
        layer0 = [n for n in names if n.startswith("model.layers.0.")]
        a_layer = sum(f[n].a.numel() for n in layer0)
        b_layer = sum(f[n].b.numel() for n in layer0)
        head_a = f[HEAD].a.numel() if HEAD in f else 0
        head_b = f[HEAD].b.numel() if HEAD in f else 0
        a_all, b_all = flat.split([n_layers * a_layer + head_a, n_layers * b_layer + head_b])
        b_all = b_all * scale
        a_layers, a_head = a_all.split([n_layers * a_layer, head_a])
        b_layers, b_head = b_all.split([n_layers * b_layer, head_b])
        b_subs = b_layers.view(n_layers, b_layer).split([f[n].b.numel() for n in layer0], dim=1)
        b_of = {n.removeprefix("model.layers.0."): t for n, t in zip(layer0, b_subs, strict=True)}
        kinds: list[tuple[list[torch.Tensor], list[torch.Tensor]] | None] = []
        all_layers: list[ProjLora | None] = []
        a_sizes: list[int] = []
        present_by_kind: list[list[str]] = []
        for subs in FUSED.values():
            present = [sub for sub in subs if f"model.layers.0.{sub}" in f]
            present_by_kind.append(present)
            if present:
                a_sizes.append(sum(f[f"model.layers.0.{sub}"].a.numel() for sub in present))
        a_kinds = iter(a_layers.view(n_layers, a_layer).split(a_sizes, dim=1))
        for (kind, subs), present in zip(FUSED.items(), present_by_kind, strict=True):
            if not present:
                kinds.append(None)
                all_layers.append(None)
                continue
            first = f[f"model.layers.0.{present[0]}"].a
            rows = sum(f[f"model.layers.0.{sub}"].a.shape[0] for sub in present)
            a = next(a_kinds).view(n_layers, rows, first.shape[1])
            sizes = self.shape.sub_sizes(kind)
            if len(subs) == 1:
                b = b_of[subs[0]].view(n_layers, sizes[0], rows)
            else:
                b = flat.new_zeros(n_layers, sum(sizes), rows)
                row = col = 0
                for sub, size in zip(subs, sizes, strict=True):
                    if sub in b_of:
                        rank = f[f"model.layers.0.{sub}"].b.shape[1]
                        b[:, row : row + size, col : col + rank] = b_of[sub].view(
                            n_layers, size, rank
                        )
                        col += rank
                    row += size
            kinds.append((list(a.unbind(0)), list(b.unbind(0))))
            all_layers.append((a, b))
        layers: list[LayerLora] = [
            tuple(None if k is None else (k[0][i], k[1][i]) for k in kinds) for i in range(n_layers)
        ]
        head = None
        if HEAD in f:
            head = (a_head.view(f[HEAD].a.shape), b_head.view(f[HEAD].b.shape))
        return AdapterWeights(layers, head, all_layers)

    # ---------------------------------------------------------------- forward

    def _attention_for(self, pack: Pack) -> tuple[str, Any]:
        kind = self.options.attention
        if kind == "auto":
            if pack.equal:
                kind = "rows"
            elif self.device.type != "cuda":
                kind = "docs"
            elif self.compiled:
                kind = "flex"
            else:  # varlen's kernels take half precision only
                kind = "varlen" if self.dtype in (torch.bfloat16, torch.float16) else "docs"
        if kind == "rows":
            if not pack.equal:
                raise ValueError("rows attention needs documents of one length")
            return kind, (len(pack.lengths), pack.lengths[0])
        if kind == "varlen":
            return kind, (pack.cu_seqlens, max(pack.lengths))
        if kind == "flex":
            if pack.block_mask is None:
                pack.block_mask = _document_mask(pack)
            return kind, pack.block_mask
        return kind, list(pack.lengths)

    def _layer_fn(self) -> Callable[..., Any]:
        grad = torch.is_grad_enabled()
        fn = self._layer_fns.get(grad)
        if fn is None:
            fn = _checkpointed(decoder_layer, self.options.checkpointing if grad else "none")
            if self.compiled:
                fn = torch.compile(fn)
            self._layer_fns[grad] = fn
        return fn

    def hidden(
        self,
        tokens: torch.Tensor,
        pack: Pack,
        segments: Sequence[tuple[Segment, AdapterWeights | None]] = (),
    ) -> torch.Tensor:
        """Final (normed) hidden states ``[T, D]`` of packed ``tokens`` ``(T,)``.

        ``segments`` are token-row ranges tiling ``[0, T)`` in order, each with the adapter its
        rows use (``None``: the base model); no segments is the base model everywhere.
        """
        if tokens.shape != (pack.total,):
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match the pack ({pack.total})")
        freqs = pack.positions.float()[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        attention = self._attention_for(pack)
        routes = list(segments) or [(Segment(None, 0, pack.total), None)]
        stacked = len(routes) > 1 and self.stacked_lora_ok(routes)
        masks: dict[tuple[int, ...], torch.Tensor] = {}
        every_layer = self.stacked_lora_all(routes, pack.total, masks) if stacked else None
        layer_fn = self._layer_fn()
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            if every_layer is not None:
                lora: tuple[tuple[int, int, Any], ...] = ((0, pack.total, every_layer[i]),)
            elif stacked:
                lora = ((0, pack.total, self.stacked_lora(routes, i, pack.total, masks)),)
            else:
                lora = tuple(
                    (seg.start, seg.stop, None if w is None else w.layers[i]) for seg, w in routes
                )
            x = layer_fn(
                x, cos, sin, layer.tensors(), lora, attention, self.shape, self.options.lora_expand
            )
        return rms_norm(x, self.norm, self.shape.eps)

    def stacked_lora_ok(self, routes: Sequence[tuple[Segment, AdapterWeights | None]]) -> bool:
        """Whether several segments' adapters run stacked (one shrink and one expand GEMM for
        all rows, products with zeros outside a row's own columns): while the stacked width
        stays small, that costs less than a pair of GEMMs and a concatenation per segment."""
        widths = [
            sum(int(lora[0].shape[0]) for _, w in routes if w and (lora := w.layers[0][kind]))
            for kind in range(len(FUSED))
        ]
        return 0 < max(widths) <= MAX_STACKED_RANK

    def stacked_lora(
        self,
        routes: Sequence[tuple[Segment, AdapterWeights | None]],
        layer: int,
        total: int,
        masks: dict[tuple[int, ...], torch.Tensor],
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, ...]:
        """Layer ``layer``'s LoRA of every routed adapter, stacked per fused projection:
        ``A`` ``[ΣR, in]``, ``B`` ``[out, ΣR]`` and a ``[T, ΣR]`` 0/1 mask of each row's own
        columns (masks are shared between layers with the same column layout)."""
        out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        for kind in range(len(FUSED)):
            pieces: list[tuple[Segment, ProjLora]] = []
            for seg, w in routes:
                lora = None if w is None else w.layers[layer][kind]
                if lora is not None:
                    pieces.append((seg, lora))
            if not pieces:
                out.append(None)
                continue
            mask = self._stack_mask([(seg, p[0].shape[0]) for seg, p in pieces], total, masks)
            a = torch.cat([p[0] for _, p in pieces])
            b = torch.cat([p[1] for _, p in pieces], dim=1)
            out.append((a, b, mask))
        return tuple(out)

    def stacked_lora_all(
        self,
        routes: Sequence[tuple[Segment, AdapterWeights | None]],
        total: int,
        masks: dict[tuple[int, ...], torch.Tensor],
    ) -> list[tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, ...]] | None:
        """:meth:`stacked_lora` of every layer, stacked once for all layers (one concatenation
        per fused projection, not one per layer); ``None`` unless every routed adapter has its
        ``all_layers`` form."""
        adapters = [(seg, w) for seg, w in routes if w is not None]
        if not adapters or any(w.all_layers is None for _, w in adapters):
            return None
        per_kind: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None] = []
        for kind in range(len(FUSED)):
            pieces = [(seg, p) for seg, w in adapters if w.all_layers and (p := w.all_layers[kind])]
            if not pieces:
                per_kind.append(None)
                continue
            mask = self._stack_mask([(seg, p[0].shape[1]) for seg, p in pieces], total, masks)
            a = torch.cat([p[0] for _, p in pieces], dim=1).unbind(0)
            b = torch.cat([p[1] for _, p in pieces], dim=2).unbind(0)
            per_kind.append([(a_i, b_i, mask) for a_i, b_i in zip(a, b, strict=True)])
        return [
            tuple(None if k is None else k[i] for k in per_kind) for i in range(self.shape.layers)
        ]

    def _stack_mask(
        self,
        columns: Sequence[tuple[Segment, int]],
        total: int,
        masks: dict[tuple[int, ...], torch.Tensor],
    ) -> torch.Tensor:
        """The ``[T, ΣR]`` 0/1 mask keeping each segment's rows to its own ``R`` columns (one per
        column layout, shared by the layers)."""
        key = tuple(x for seg, rank in columns for x in (seg.start, seg.stop, rank))
        if key not in masks:
            rows = torch.arange(total, device=self.device)
            parts = [
                ((rows >= seg.start) & (rows < seg.stop))[:, None].expand(-1, rank)
                for seg, rank in columns
            ]
            masks[key] = torch.cat(parts, dim=1).to(self.dtype)
        return masks[key]

    def head_logits(
        self, hidden: torch.Tensor, segments: Sequence[tuple[Segment, AdapterWeights | None]] = ()
    ) -> torch.Tensor:
        """``lm_head`` (with each segment's head LoRA) on rows of ``hidden``; the segments are
        relative to these rows."""
        parts = [(s.start, s.stop, None if w is None else w.head) for s, w in segments]
        y = hidden @ self.head.T
        return _with_lora(y, hidden, parts) if parts else y


def _document_mask(pack: Pack) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    docs = pack.doc_ids

    def document_causal(b: Any, h: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (docs[q] == docs[kv]) & (q >= kv)

    return create_block_mask(
        document_causal, None, None, pack.total, pack.total, device=str(pack.doc_ids.device)
    )
