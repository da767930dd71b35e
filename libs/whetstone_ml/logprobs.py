"""Target logprobs from a causal LM's final hidden states, one block of tokens at a time.

Full-vocabulary logits for every token of a batch are the largest tensors of a training step
(tokens x vocab x 4 bytes: 8k tokens of a 152k vocabulary are 5 GB, and autograd would keep them
and their softmax for backward). :func:`blockwise_target_logprobs` unembeds ``chunk_tokens`` packed
tokens at a time and keeps only what a loss needs: the logits of each position's target ids minus
the position's logsumexp. With gradients on, each block runs under ``torch.utils.checkpoint``, so
backward recomputes the block's logits instead of storing them: peak memory is one block's logits
whatever the batch size.

The unembedding may carry LoRA factors (``train_unembed``). :func:`blockwise_target_logprobs`
calls the head with each block's row range, so a head with per-row adapters (the packed Qwen3's
``head_logits`` over clipped segments) applies every token's own adapter, in the forward and in
backward's recomputation alike. :func:`chunked_target_logprobs` does the same for a
``LoraLinear`` head, setting its ``LoraRoute`` to the segments clipped to the block
(:func:`packed_segments` turns a padded batch's row segments into packed-token segments).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from whetstone_ml.lora import LoraRoute, Segment

DEFAULT_CHUNK_TOKENS = 1024


def packed_segments(row_segments: Sequence[Segment], lengths: Sequence[int]) -> list[Segment]:
    """Segments over the rows of a padded batch as segments over its packed real tokens.

    ``lengths[i]`` is row i's number of real tokens; packing concatenates the rows' real tokens
    in row order (what ``hidden[attention_mask.bool()]`` does), so row ranges map to token ranges.
    """
    offsets = [0, *itertools.accumulate(lengths)]
    return [Segment(s.adapter_id, offsets[s.start], offsets[s.stop]) for s in row_segments]


def _clip(segments: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """The parts of ``segments`` inside ``[start, stop)``, relative to ``start``."""
    clipped = []
    for s in segments:
        lo, hi = max(s.start, start), min(s.stop, stop)
        if lo < hi:
            clipped.append(Segment(s.adapter_id, lo - start, hi - start))
    return clipped


def _block_logprobs(
    head: Callable[[torch.Tensor, int, int], torch.Tensor],
    start: int,
    stop: int,
    hidden: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    logits = head(hidden, start, stop)
    # At least float32 (bf16/fp16 heads are upcast, as Tinker's logprobs are fp32); float64 stays.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets) - torch.logsumexp(logits, dim=-1, keepdim=True)


def blockwise_target_logprobs(
    head: Callable[[torch.Tensor, int, int], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """``log_softmax(head(hidden))`` at ``targets`` in at least float32, ``chunk_tokens`` rows at
    a time.

    ``hidden`` is ``(M, H)`` packed tokens, ``targets`` ``(M, K)`` int64 ids; ``head(h, start,
    stop)`` returns the logits of rows ``[start, stop)`` (``h`` is those rows), so that a head
    with per-row adapters knows which rows it has. Returns ``(M, K)`` logprobs (temperature 1;
    float32, or float64 for a float64 head) that carry the autograd graph when gradients are
    enabled; their values equal the unchunked computation's.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    total = int(hidden.shape[0])
    blocks = []
    for start in range(0, total, chunk_tokens):
        stop = min(start + chunk_tokens, total)
        block = partial(_block_logprobs, head, start, stop)
        h, y = hidden[start:stop], targets[start:stop]
        if torch.is_grad_enabled():
            blocks.append(checkpoint(block, h, y, use_reentrant=False))
        else:
            blocks.append(block(h, y))
    if not blocks:
        return hidden.new_zeros(
            targets.shape, dtype=torch.promote_types(hidden.dtype, torch.float32)
        )
    return torch.cat(blocks)


def chunked_target_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    route: LoraRoute,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    segments: Sequence[Segment],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """:func:`blockwise_target_logprobs` for a ``LoraLinear`` head routed by ``route``:
    ``segments`` are the adapters of the packed rows (they must tile ``[0, M)`` in order, as
    ``LoraRoute`` expects); each block runs under its clipped segments, also in backward's
    recomputation."""

    def routed(h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with route.use(_clip(segments, start, stop)):
            return head(h)

    return blockwise_target_logprobs(routed, hidden, targets, chunk_tokens)


# ------------------------------------------------------------------ the fused linear head


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1, True)


def _softmax_times(logits: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``-scale * softmax(logits)`` in the logits' dtype (computed in at least float32)."""
    wide = logits.to(lse.dtype)
    return (-scale * torch.exp(wide - lse)).to(logits.dtype)


_FUSED: dict[str, Callable[..., torch.Tensor]] = {}


def _pointwise(name: str, fn: Callable[..., torch.Tensor], device: torch.device) -> Callable:
    """``fn`` compiled on CUDA (one pass over the logits instead of several), eager elsewhere."""
    if device.type != "cuda":
        return fn
    if name not in _FUSED:
        _FUSED[name] = torch.compile(fn, dynamic=True)
    return _FUSED[name]


class _LinearHeadLogprobs(torch.autograd.Function):
    """Target logprobs of ``logits = h Wᵀ (+ s Bᵀ)`` for one block, saving only ``h`` (and
    ``s``) and the logsumexp: backward recomputes the logits, forms
    ``dlogits = scatter(g) - (Σ_k g) · softmax`` in one pass and returns ``dh`` (and ``ds``,
    ``dB``); the frozen ``W`` gets no gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,
        w: torch.Tensor,
        s: torch.Tensor | None,
        b: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        logits = h @ w.T if s is None or b is None else torch.addmm(h @ w.T, s, b.T)
        lse = _pointwise("lse", _logsumexp, h.device)(logits)
        ctx.save_for_backward(h, w, s, b, targets, lse)
        return logits.gather(-1, targets).to(lse.dtype) - lse

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        h, w, s, b, targets, lse = ctx.saved_tensors
        logits = h @ w.T if s is None or b is None else torch.addmm(h @ w.T, s, b.T)
        softmax_grad = _pointwise("softmax_grad", _softmax_times, h.device)
        dlogits = softmax_grad(logits, lse, g.sum(-1, keepdim=True))
        dlogits.scatter_add_(-1, targets, g.to(dlogits.dtype))
        dh = dlogits @ w
        ds = db = None
        if s is not None and b is not None:
            dh_needed = ctx.needs_input_grad
            ds = dlogits @ b if dh_needed[2] else None
            db = dlogits.T @ s if dh_needed[3] else None
        return dh, None, ds, db, None


def linear_target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """:func:`blockwise_target_logprobs` for the head ``hidden @ weightᵀ`` (plus one adapter's
    LoRA ``(A, B)``, scale folded into ``B``, on every row), with a fused backward.

    The same function as the blockwise path, computed with less memory traffic: the logits are
    never upcast and kept, the softmax gradient is one pass (compiled on CUDA), and the LoRA of
    ``train_unembed`` is exact (``h Wᵀ + (h Aᵀ) Bᵀ``; ``h Aᵀ`` is formed once for all rows).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    s = None if lora is None else hidden @ lora[0].T
    b = None if lora is None else lora[1]
    blocks = []
    for start in range(0, int(hidden.shape[0]), chunk_tokens):
        stop = start + chunk_tokens
        s_block = None if s is None else s[start:stop]
        blocks.append(
            _LinearHeadLogprobs.apply(hidden[start:stop], weight, s_block, b, targets[start:stop])
        )
    if not blocks:
        return hidden.new_zeros(
            targets.shape, dtype=torch.promote_types(hidden.dtype, torch.float32)
        )
    return torch.cat(blocks)
