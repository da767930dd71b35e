"""Target logprobs from a causal LM's final hidden states, one block of tokens at a time.

Full-vocabulary logits for every token of a batch are the largest tensors of a training step
(tokens x vocab x 4 bytes: 8k tokens of a 152k vocabulary are 5 GB, and autograd would keep them
and their softmax for backward). :func:`chunked_target_logprobs` unembeds ``chunk_tokens`` packed
tokens at a time and keeps only what a loss needs: the logits of each position's target ids minus
the position's logsumexp. With gradients on, each block runs under ``torch.utils.checkpoint``, so
backward recomputes the block's logits instead of storing them: peak memory is one block's logits
whatever the batch size.

The unembedding may carry LoRA factors (``train_unembed``). A ``LoraLinear`` routes the rows of
its input, so each block is run under segments expressed in packed-token rows
(:func:`packed_segments`, clipped to the block): every token uses its own run's adapter, exactly as
the unchunked head does. The route is set inside the checkpointed function, so backward's
recomputation sees the same routing.
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
    head: Callable[[torch.Tensor], torch.Tensor],
    route: LoraRoute,
    segments: list[Segment],
    hidden: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    with route.use(segments):
        logits = head(hidden)
    # At least float32 (bf16/fp16 heads are upcast, as Tinker's logprobs are fp32); float64 stays.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets) - torch.logsumexp(logits, dim=-1, keepdim=True)


def chunked_target_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    route: LoraRoute,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    segments: Sequence[Segment],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """``log_softmax(head(hidden))`` at ``targets`` in at least float32, ``chunk_tokens`` rows at
    a time.

    ``hidden`` is ``(M, H)`` packed tokens, ``targets`` ``(M, K)`` int64 ids, ``segments`` the
    adapters of the packed rows (they must tile ``[0, M)`` in order, as ``LoraRoute`` expects).
    Returns ``(M, K)`` logprobs (temperature 1; float32, or float64 for a float64 head) that
    carry the autograd graph when gradients are enabled; their values equal the unchunked
    computation's.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    total = int(hidden.shape[0])
    blocks = []
    for start in range(0, total, chunk_tokens):
        stop = min(start + chunk_tokens, total)
        block = partial(_block_logprobs, head, route, _clip(segments, start, stop))
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
