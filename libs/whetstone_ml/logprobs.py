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
