"""Decode attention straight from the paged KV cache: one Triton program per (sequence, KV head).

The SDPA decode path first gathers every sequence's blocks into a dense ``[B, L, KVH, hd]`` copy
(read the cache, write the copy, read it again). This kernel reads each sequence's keys and
values once, through its block table, for all ``group`` query heads of a KV head at a time
(the ``group`` heads are the rows of one small matrix product, padded to 16 rows), with an online
softmax over tiles of ``BLOCK_N`` tokens. Float32 inputs use exact float32 products (no TF32) so
that the GPU test can compare it with the CPU path. CUDA only: the CPU runs the SDPA path.

Triton's JIT functions are untyped, hence the module-level mypy exemption.
"""
# mypy: ignore-errors

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_blocks, BS, KVH, D] (one layer)
    v_ptr,
    table_ptr,  # [B, n_blocks]
    ctx_ptr,  # [B]
    o_ptr,  # [B, H, D]
    table_stride,
    scale,
    H: tl.constexpr,
    KVH: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_TILES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    rows = tl.arange(0, G_PAD)
    dims = tl.arange(0, D)
    row_ok = rows < G
    q_off = b * H * D + (kvh * G + rows)[:, None] * D + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    ctx = tl.load(ctx_ptr + b)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    tokens = tl.arange(0, BLOCK_N)
    # A static trip count (the table's width, a bucket under CUDA graphs): tiles past a short
    # row's context are fully masked and load nothing.
    for i in range(0, N_TILES):
        t = i * BLOCK_N + tokens
        t_ok = t < ctx
        block = tl.load(table_ptr + b * table_stride + t // BS, mask=t_ok, other=0)
        kv_off = ((block * BS + t % BS) * KVH + kvh) * D
        k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=t_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=t_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(o_ptr + q_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """Attention output ``[B, H * D]`` of one query token per sequence (``q``: ``[B, H, D]``)."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    g = h // kvh
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode[(b, kvh)](
        q,
        k_cache,
        v_cache,
        block_table,
        context_lens,
        out,
        block_table.stride(0),
        d**-0.5,
        H=h,
        KVH=kvh,
        G=g,
        G_PAD=max(16, triton.next_power_of_2(g)),
        D=d,
        BS=bs,
        BLOCK_N=64,
        N_TILES=triton.cdiv(block_table.shape[1] * bs, 64),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2,
    )
    return out.view(b, h * d)
