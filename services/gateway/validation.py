"""Submission-time validation: bad input is refused with a 400 before it reaches a queue, so it
can never stall a run or disturb other tenants' work.

The rules that need no model (AdamParams, LoraConfig, SamplingParams ranges, ...) live on the
contract models in ``whetstone.messages``; this module holds the limits that depend on the base
model's ``ModelSpec`` (context length, vocabulary, largest LoRA rank) and turns a pydantic
``ValidationError`` into the ``UserError`` the client sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from whetstone.errors import UserError
from whetstone.messages import ForwardBackward, LoraConfig, SamplingParams
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
            raise UserError(
                f"datum {i}: {n} tokens exceed the context length "
                f"{spec.context_length} of {spec.name}"
            )
        check_vocab(f"datum {i}: model_input", tokens, spec)
        for key, tensor in datum.loss_fn_inputs.items():
            values = tensor.to_numpy()
            if key.startswith("clip_") and values.ndim == 0:
                continue
            if command.custom_loss is not None and command.custom_loss.rank_of(key) in (None, 0):
                continue  # a custom loss reads only what it declared (scalars checked there)
            if values.ndim == 0 or values.shape[0] != n:
                raise UserError(
                    f"datum {i}: loss_fn_inputs[{key!r}] has shape "
                    f"{list(values.shape)}; its first dimension must equal the {n} "
                    "input tokens"
                )
            if key == "target_tokens":
                check_vocab(f"datum {i}: target_tokens", values, spec)


def check_vocab(where: str, tokens: np.ndarray, spec: ModelSpec) -> None:
    bad = (tokens < 0) | (tokens >= spec.vocab_size)
    if bad.any():
        pos = int(np.argwhere(bad)[0][0])
        token = int(tokens.flat[np.argmax(bad)])
        raise UserError(
            f"{where}: token id {token} at position {pos} is outside the vocabulary "
            f"of {spec.name} (0..{spec.vocab_size - 1})"
        )


def check_lora(lora: LoraConfig, spec: ModelSpec) -> None:
    if lora.rank > spec.max_lora_rank:
        raise UserError(
            f"LoRA rank {lora.rank} out of range: {spec.name} supports 1..{spec.max_lora_rank}"
        )


def check_sample(prompt: np.ndarray, params: SamplingParams, spec: ModelSpec) -> None:
    """A prompt and its sampling params against the base model: vocabulary and context."""
    if prompt.size == 0:
        raise UserError("empty prompt")
    check_vocab("prompt", prompt, spec)
    if prompt.size + params.max_tokens > spec.context_length:
        raise UserError(
            f"prompt ({prompt.size} tokens) + max_tokens ({params.max_tokens}) exceed "
            f"the context length {spec.context_length} of {spec.name}"
        )
    if params.stop_token_ids and max(params.stop_token_ids) >= spec.vocab_size:
        raise UserError("a stop token id is outside the vocabulary")


def describe(errors: Sequence[ErrorDetails]) -> str:
    """pydantic's error list as one line: ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)


def user_error(exc: ValidationError, what: str) -> UserError:
    """A contract model refused a value the client sent: a 400 naming the field."""
    return UserError(f"invalid {what}: {describe(exc.errors())}")
