"""The sampler's own Qwen3 decoder: packed tokens in, hidden states out, over a paged KV cache.

It holds the Hugging Face model's weights (q/k/v and gate/up fused into one matrix each, so each
layer runs four GEMMs) and runs them on a flat ``[T, D]`` batch of tokens from any number of
sequences, each at its own position. Attention goes through a ``PrefillBatch`` (chunks of
prompts, one SDPA per chunk) or a ``DecodeBatch`` (one token per sequence: one SDPA over the
gathered blocks, or on CUDA a Triton kernel that reads the blocks in place);
neither ever repeats the KV heads: queries are reshaped so that the ``group`` query heads that
share a KV head sit in the same SDPA "head" (``[kv_heads, group * n, head_dim]`` for a chunk,
``[B, kv_heads, group, head_dim]`` for decode), so every KV head is read once.

Multi-LoRA: a batch's adapters come as a ``ModelLora`` (built by ``weights``), one ``LoraArg``
per fused projection and layer. In decode it names fixed-capacity slot stacks (every slot's
factors stacked along the rank axis, the scale folded into B) and each row's slot: one shrink
GEMM, one 0/1 mask (computed on the device from the row's slot) and one expand GEMM per
projection and rank class, whatever the mix (the products with zeros keep it exact); prefill
instead runs each run of rows against its own adapter's factors, so its FLOPs do not grow with
the adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from services.sampler.kvcache import PagedKVCache

# Fused projections and the HF sub-modules each one stacks, in output order.
FUSED: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
HEAD = "lm_head"


@dataclass(frozen=True)
class Shape:
    """The sizes of a Qwen3 config that the decoder needs."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float
    max_positions: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 KVH) * hd, D]
    qk_norm: torch.Tensor  # [H + KVH, hd]: q_norm's weight for every query head, then k_norm's
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 F, D]
    down: torch.Tensor


# A projection's LoRA for one batch. Decode: per rank class, ``(a, b, row_slot, width)``: the
# stacked A ``[slots * width, in]`` and B ``[out, slots * width]`` (scale folded in) of the slots
# in use and each row's slot ``[T]`` (-1: none), ``width`` columns per slot. Prefill: per run of
# rows, ``(row_start, row_stop, a, b)``: its adapter's own columns. ``None``: no adapter here.
SlotArg = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
RunArg = tuple[int, int, torch.Tensor, torch.Tensor]
LoraArg = tuple[SlotArg, ...] | tuple[RunArg, ...] | None


@dataclass
class ModelLora:
    """A batch's adapters: ``layers[i]`` holds layer ``i``'s (qkv, o, gate_up, down) arguments."""

    layers: list[tuple[LoraArg, LoraArg, LoraArg, LoraArg]]
    head: LoraArg = None


@dataclass
class PrefillBatch:
    """Chunks of prompts packed into one ``[T, D]`` batch.

    ``chunks`` holds ``(row_start, row_stop, position_start, block_ids)`` per chunk: rows of the
    pack, the position of its first token in its sequence, and the sequence's block ids (a
    ``[n_blocks]`` long tensor covering the context up to the chunk's end).

    Chunks that start a prompt attend only to their own fresh keys: those of equal length run as
    one batched SDPA (the usual case: a batch of whole prompts). Chunks that continue a prompt
    read their context back from the cache: those of equal length and start (repeated prompts
    after a prefix-cache hit, long prompts chunked alike) run as one batched SDPA too.
    """

    slots: torch.Tensor
    chunks: list[tuple[int, int, int, torch.Tensor]]
    _groups: list[tuple[int, torch.Tensor]] | None = None  # (length, row ids) of fresh chunks
    # (length, start position, row ids, block tables [C, n_blocks]) of continuing chunks
    _continued: list[tuple[int, int, torch.Tensor, torch.Tensor]] | None = None

    def _continued_groups(
        self, device: torch.device
    ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        if self._continued is None:
            by_shape: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
            for start, stop, pos, blocks in self.chunks:
                if pos > 0:
                    by_shape.setdefault((stop - start, pos), []).append((start, stop, blocks))
            self._continued = [
                (
                    n,
                    pos,
                    torch.tensor([r for a, b, _ in group for r in range(a, b)], device=device),
                    torch.stack([blocks for _, _, blocks in group]),
                )
                for (n, pos), group in by_shape.items()
            ]
        return self._continued

    def _fresh_groups(self, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        if self._groups is None:
            by_length: dict[int, list[int]] = {}
            for start, stop, pos, _ in self.chunks:
                if pos == 0:
                    by_length.setdefault(stop - start, []).extend(range(start, stop))
            self._groups = [(n, torch.tensor(rows, device=device)) for n, rows in by_length.items()]
        return self._groups

    def attend(
        self,
        cache: PagedKVCache,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        shape = cache.shape
        kvh, hd = shape.kv_heads, shape.head_dim
        t, g = q.shape[0], q.shape[1] // kvh
        out = q.new_empty(t, kvh * g * hd)
        for n, rows in self._fresh_groups(q.device):
            c = rows.shape[0] // n
            # Query heads of one KV head side by side: [C, KVH, G * n, hd], rows (g, token).
            qc = q.index_select(0, rows).reshape(c, n, kvh, g, hd)
            qc = qc.permute(0, 2, 3, 1, 4).reshape(c, kvh, g * n, hd)
            kc = k.index_select(0, rows).view(c, n, kvh, hd).transpose(1, 2)
            vc = v.index_select(0, rows).view(c, n, kvh, hd).transpose(1, 2)
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=causal.repeat(g, 1))
            o = o.view(c, kvh, g, n, hd).permute(0, 3, 1, 2, 4).reshape(c * n, -1)
            out.index_copy_(0, rows, o)
        for n, pos, rows, tables in self._continued_groups(q.device):
            c, ctx = tables.shape[0], pos + n
            kk, vv = cache.gather(layer, tables)  # [C, n_blocks * bs, KVH, hd]
            kk, vv = kk[:, :ctx].transpose(1, 2), vv[:, :ctx].transpose(1, 2)  # [C, KVH, ctx, hd]
            qc = q.index_select(0, rows).reshape(c, n, kvh, g, hd)
            qc = qc.permute(0, 2, 3, 1, 4).reshape(c, kvh, g * n, hd)
            q_pos = torch.arange(pos, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None] <= q_pos[:, None]  # [n, ctx] causal
            o = F.scaled_dot_product_attention(qc, kk, vv, attn_mask=mask.repeat(g, 1))
            o = o.view(c, kvh, g, n, hd).permute(0, 3, 1, 2, 4).reshape(c * n, -1)
            out.index_copy_(0, rows, o)
        return out


@dataclass
class DecodeBatch:
    """One new token per sequence: its KV slot, the sequence's block table and context length
    (new token included). Rows past the real batch (CUDA-graph padding) point at the scratch
    block and have context length 1."""

    slots: torch.Tensor  # [B]
    block_table: torch.Tensor  # [B, n_blocks]
    context_lens: torch.Tensor  # [B]
    kernel: str = "sdpa"  # or "triton": read the paged cache in place (CUDA only)

    def attend(
        self,
        cache: PagedKVCache,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of the new tokens ``q`` over the cache (``k``, ``v``, the new tokens' own,
        are in it already)."""
        if self.kernel == "triton":
            from services.sampler.paged_attention import paged_decode_attention

            return paged_decode_attention(
                q, cache.k[layer], cache.v[layer], self.block_table, self.context_lens
            )
        shape = cache.shape
        b, kvh, hd = q.shape[0], shape.kv_heads, shape.head_dim
        k, v = cache.gather(layer, self.block_table)  # [B, L, KVH, hd]
        length = k.shape[1]
        valid = torch.arange(length, device=q.device)[None] < self.context_lens[:, None]
        o = F.scaled_dot_product_attention(
            q.reshape(b, kvh, -1, hd),  # [B, KVH, G, hd]: the G heads of a KV head as its queries
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=valid[:, None, None, :],
        )
        return o.reshape(b, -1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm over the last axis: normalised (statistics in float32 for half types),
    rounded to the model dtype, then scaled by ``weight`` (broadcast), as HF does."""
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half); ``x`` is ``[T, heads, hd]``, cos/sin ``[T, hd]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Qwen3Decoder:
    """Qwen3's forward over packed tokens; weights borrowed from (or fused out of) an HF model."""

    def __init__(
        self,
        shape: Shape,
        embed: torch.Tensor,
        layers: list[Layer],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
    ) -> None:
        self.shape = shape
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        dtype, device = embed.dtype, embed.device
        # RoPE tables in float64, cast once: the same values whatever the model dtype.
        inv_freq = 1.0 / (
            shape.rope_theta
            ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim)
        )
        angles = torch.arange(shape.max_positions, dtype=torch.float64)[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().to(device=device, dtype=dtype)
        self.sin = angles.sin().to(device=device, dtype=dtype)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        batch: PrefillBatch | DecodeBatch,
        lora: ModelLora | None = None,
        compiled: bool = False,
    ) -> torch.Tensor:
        """Last-layer hidden states ``[T, D]`` of the tokens ``ids`` at ``positions``; their keys
        and values are written to ``cache`` at ``batch.slots`` before attention reads it.
        ``compiled``: run the layer bodies through ``decode_fns`` (graphed CUDA decode), or for a
        prefill without LoRA through ``prefill_fns`` (any token count)."""
        s = self.shape
        pre, post = attention_inputs, attention_output_and_mlp
        if compiled and isinstance(batch, PrefillBatch):
            assert lora is None, "compiled prefill runs the base model only"
            pre, post = prefill_fns()
        elif compiled:
            pre, post, _ = decode_fns()
        cos, sin = self.cos[positions], self.sin[positions]
        h = self.embed[ids]
        for i, layer in enumerate(self.layers):
            qkv, o, gate_up, down = lora.layers[i] if lora is not None else (None,) * 4
            q, k, v = pre(h, layer.input_norm, layer.qkv, layer.qk_norm, cos, sin, qkv, s)
            cache.write(i, batch.slots, k, v)
            attn = batch.attend(cache, i, q, k, v)
            weights = (layer.o, layer.post_norm, layer.gate_up, layer.down)
            h = post(h, attn, *weights, o, gate_up, down, s.eps)
        return h

    def logits(
        self,
        hidden: torch.Tensor,
        lora: ModelLora | None = None,
        compiled: bool = False,
    ) -> torch.Tensor:
        """Float32 logits ``[T, V]`` of the last layer's hidden states (final norm and the head's
        LoRA included)."""
        head = decode_fns()[2] if compiled else final_logits
        arg = lora.head if lora is not None else None
        return head(hidden, self.norm, self.lm_head, arg, self.shape.eps)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora: LoraArg) -> torch.Tensor:
    """``x @ weight.T`` plus each row's adapter (``LoraArg``)."""
    y = x @ weight.T
    if not lora:
        return y
    for entry in lora:
        if isinstance(entry[0], torch.Tensor):  # slots: one GEMM pair for any mix of adapters
            a, b, row_slot, width = entry
            slot_of_col = torch.arange(a.shape[0], device=x.device) // width
            mask = (slot_of_col[None] == row_slot[:, None]).to(x.dtype)
            y = torch.addmm(y, (x @ a.T) * mask, b.T)
        else:  # exact FLOPs: a run of rows against its own adapter's columns
            r0, r1, a, b = entry
            y[r0:r1].addmm_(x[r0:r1] @ a.T, b.T)
    return y


def attention_inputs(
    h: torch.Tensor,
    input_norm: torch.Tensor,
    qkv_weight: torch.Tensor,
    qk_norm: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lora: LoraArg,
    s: Shape,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer up to attention: RMSNorm, the fused q/k/v projection, q/k RMSNorm and RoPE.
    Queries ``[T, H, hd]`` (contiguous), keys and values ``[T, KVH, hd]``."""
    t = h.shape[0]
    q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
    qkv = lora_linear(rms_norm(h, input_norm, s.eps), qkv_weight, lora)
    # q and k heads normed and rotated together: the same ops on each head, fewer kernels.
    qk = qkv[:, : q_size + kv_size].view(t, s.heads + s.kv_heads, s.head_dim)
    qk = rope(rms_norm(qk, qk_norm, s.eps), cos, sin)
    v = qkv[:, q_size + kv_size :].view(t, s.kv_heads, s.head_dim)
    return qk[:, : s.heads].contiguous(), qk[:, s.heads :], v


def attention_output_and_mlp(
    h: torch.Tensor,
    attn: torch.Tensor,
    o_weight: torch.Tensor,
    post_norm: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    o_lora: LoraArg,
    gate_up_lora: LoraArg,
    down_lora: LoraArg,
    eps: float,
) -> torch.Tensor:
    """A layer after attention: the output projection and residual, RMSNorm, the SwiGLU MLP and
    its residual. The new hidden states."""
    h = h + lora_linear(attn, o_weight, o_lora)
    x = rms_norm(h, post_norm, eps)
    gate, up = lora_linear(x, gate_up_weight, gate_up_lora).chunk(2, dim=-1)
    return h + lora_linear(F.silu(gate) * up, down_weight, down_lora)


_COMPILED: list[Callable[..., Any]] = []


def decode_fns() -> list[Callable[..., Any]]:
    """``attention_inputs``, ``attention_output_and_mlp`` and ``final_logits`` compiled
    (``torch.compile``, static shapes), shared by every decoder of the process: each fuses its
    norms, RoPE, SiLU, residual adds and LoRA masks into a few kernels around the GEMMs (which
    stay cuBLAS calls). One compilation per batch bucket and LoRA on/off; the CUDA graphs then
    capture the compiled kernels. Every tensor is an argument, so the 36 layers share one."""
    if not _COMPILED:
        import torch._dynamo

        # Past this many shapes dynamo would silently fall back to eager.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 256)
        fns = (attention_inputs, attention_output_and_mlp, final_logits)
        _COMPILED.extend(torch.compile(fn, dynamic=False) for fn in fns)
    return _COMPILED


_PREFILL: list[Callable[..., Any]] = []


def prefill_fns() -> list[Callable[..., Any]]:
    """``attention_inputs`` and ``attention_output_and_mlp`` compiled with a symbolic token
    count, for prefills without LoRA: a prompt batch of any length reuses one compilation
    (eager, the element-wise work of a 16k-token prefill of Qwen3-4B on an H200 took about a
    third of its 0.31 s; the GEMMs the rest). With LoRA the prefill runs eagerly: its runs of
    rows vary in number and bounds, which would recompile."""
    if not _PREFILL:
        fns = (attention_inputs, attention_output_and_mlp)
        _PREFILL.extend(torch.compile(fn, dynamic=True) for fn in fns)
    return _PREFILL


def final_logits(
    h: torch.Tensor, norm: torch.Tensor, head: torch.Tensor, lora: LoraArg, eps: float
) -> torch.Tensor:
    """Float32 logits of the last layer's hidden states: final RMSNorm, the head (and its LoRA)."""
    return lora_linear(rms_norm(h, norm, eps), head, lora).float()
