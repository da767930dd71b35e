"""The checks every sampler engine makes on a request before spending compute on it."""

from __future__ import annotations

import math

import numpy as np

from whetstone.errors import UserError
from whetstone.messages import SampleRequest


def checked_prompt(
    request: SampleRequest,
    *,
    vocab_size: int,
    context_length: int,
    max_seqs: int,
    min_new_tokens: int = 0,
) -> list[int]:
    """The request's prompt as token ids, once its prompt, lengths, sample count, temperature
    and top_p are valid for an engine of these sizes (``min_new_tokens``: the fewest tokens the
    engine draws, whatever ``max_tokens`` says); a :class:`UserError` otherwise."""
    p = request.params
    prompt: list[int] = request.prompt.to_numpy().reshape(-1).astype(np.int64).tolist()
    if not prompt:
        raise UserError("prompt is empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise UserError(f"prompt holds token ids outside the vocabulary [0, {vocab_size})")
    if p.max_tokens < 0:
        raise UserError("max_tokens must not be negative")
    if len(prompt) + max(p.max_tokens, min_new_tokens) > context_length:
        raise UserError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
            f"context length {context_length}"
        )
    n = request.num_samples
    if n < 1:
        raise UserError("num_samples must be at least 1")
    if n > max_seqs:
        raise UserError(f"num_samples ({n}) exceeds this sampler's {max_seqs} sequences")
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise UserError("temperature must be a finite number >= 0")
    if not 0 < p.top_p <= 1:
        raise UserError("top_p must be in (0, 1]")
    return prompt
