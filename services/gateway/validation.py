"""Submission-time validation: bad input is refused with a 400 before it reaches a queue, so it
can never stall a run or disturb other tenants' work."""

from __future__ import annotations

import math

import numpy as np

from whetstone.errors import UserError
from whetstone.messages import AdamParams, ForwardBackward
from whetstone.models.registry import ModelSpec


def validate_forward_backward(command: ForwardBackward, spec: ModelSpec) -> None:
    """Reject what can never run: empty or over-long sequences, token ids outside the vocabulary,
    loss inputs that do not line up with the tokens."""
    if not command.data:
        raise UserError("forward_backward needs at least one datum")
    for i, datum in enumerate(command.data):
        tokens = datum.model_input.to_numpy()
        n = tokens.shape[0]
        if n == 0:
            raise UserError(f"datum {i}: empty model_input")
        if n > spec.context_length:
            raise UserError(f"datum {i}: {n} tokens exceed the context length {spec.context_length} of {spec.name}")
        check_vocab(f"datum {i}: model_input", tokens, spec)
        for key, tensor in datum.loss_fn_inputs.items():
            values = tensor.to_numpy()
            if key.startswith("clip_") and values.ndim == 0:
                continue
            if values.ndim == 0 or values.shape[0] != n:
                raise UserError(f"datum {i}: loss_fn_inputs[{key!r}] has shape {list(values.shape)}; "
                                f"its first dimension must equal the {n} input tokens")
            if key == "target_tokens":
                check_vocab(f"datum {i}: target_tokens", values, spec)


def check_vocab(where: str, tokens: np.ndarray, spec: ModelSpec) -> None:
    bad = (tokens < 0) | (tokens >= spec.vocab_size)
    if bad.any():
        pos = int(np.argwhere(bad)[0][0])
        raise UserError(f"{where}: token id {int(tokens.flat[np.argmax(bad)])} at position {pos} is outside "
                        f"the vocabulary of {spec.name} (0..{spec.vocab_size - 1})")


def validate_adam(adam: AdamParams) -> None:
    values = adam.model_dump()
    if not all(math.isfinite(v) for v in values.values()):
        raise UserError(f"adam_params must be finite: {values}")
    if adam.learning_rate < 0 or not (0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1) or adam.eps <= 0 \
            or adam.weight_decay < 0 or adam.grad_clip_norm < 0:
        raise UserError(f"adam_params out of range: {values}")
