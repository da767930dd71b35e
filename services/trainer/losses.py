"""Tinker's built-in losses, one datum at a time (see ``../shared/losses.md`` §1-2).

Each loss maps the learner logprobs ``lp`` (float32, shaped like ``target_tokens``, carrying the
autograd graph back to the adapter) and the datum's checked inputs to an *elementwise* loss of the
same shape. The engine sums it over the sequence and over datums: Tinker never normalises by
token count, and never computes anything across datums, because the client may split one call
into chunks and must get the same answer.

Validation lives here, next to each formula, because only the loss knows which inputs and config
keys it reads. Every rejection is a :class:`whetstone.errors.UserError` (the client's fault, a
``user`` failure category). Input keys a loss does not read are ignored: the cookbook sends extras
(provenance spans, masks) with every loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from whetstone.errors import UserError

Inputs = Mapping[str, torch.Tensor]
Config = Mapping[str, float]

# Every ``loss_fn`` the Tinker SDK can send (its ``LossFnType`` literal). Those without an entry in
# ``LOSSES`` are refused as "not supported yet" rather than "unknown", so users know they are real.
TINKER_LOSS_FNS = (
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "stable_reinforce",
    "custom",
)

PPO_CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


@dataclass(frozen=True)
class LossFn:
    """One built-in loss: its formula plus the contract it declares.

    ``required_inputs`` must be present; ``optional_inputs`` are read when present;
    ``ones_if_missing`` are optional inputs that default to ones shaped like ``target_tokens``
    (cross_entropy's weights, so that a bare ``forward()`` gives the plain NLL). Every input read
    must have exactly the target's shape: ``(N,)``, or ``(N, K)`` where ``allow_2d``.
    ``config_defaults`` lists the only config keys accepted, with their defaults.
    """

    name: str
    compute: Callable[[torch.Tensor, Inputs, Config], torch.Tensor]
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    ones_if_missing: tuple[str, ...] = ()
    config_defaults: Mapping[str, float] = field(default_factory=dict)
    allow_2d: bool = False

    def __call__(self, lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
        return self.compute(lp, inputs, config)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.required_inputs + self.optional_inputs

    def check_config(self, raw: Mapping[str, float | str]) -> dict[str, float]:
        """The config with defaults filled in; unknown keys and non-finite numbers are refused."""
        config = dict(self.config_defaults)
        for key, value in raw.items():
            if key not in self.config_defaults:
                allowed = ", ".join(sorted(self.config_defaults)) or "none"
                raise UserError(
                    f"loss_fn {self.name!r} does not take config key {key!r} (allowed: {allowed})"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"loss_fn_config[{key!r}] must be a number, got {value!r}")
            if not math.isfinite(value):
                raise UserError(f"loss_fn_config[{key!r}] must be finite, got {value!r}")
            config[key] = float(value)
        if "clip_low_threshold" in config:
            low, high = config["clip_low_threshold"], config["clip_high_threshold"]
            if not 0.0 <= low <= 1.0 <= high:
                raise UserError(
                    f"clip thresholds must satisfy 0 <= clip_low_threshold <= 1 <= "
                    f"clip_high_threshold, got {low} and {high}"
                )
        return config

    def check_inputs(
        self, raw: Mapping[str, torch.Tensor], n: int, where: str
    ) -> dict[str, torch.Tensor]:
        """The inputs this loss reads, cast (targets int64, the rest float32) and checked.

        ``n`` is ``len(model_input)``: position i of the input predicts target i, so every input
        has ``n`` rows. ``where`` prefixes messages (e.g. ``"datum 3"``).
        """
        for key in self.required_inputs:
            if key not in raw:
                raise UserError(f"{where}: loss_fn {self.name!r} needs loss_fn_inputs[{key!r}]")
        inputs: dict[str, torch.Tensor] = {}
        for key in self.input_names:
            if key not in raw:
                continue
            value = raw[key]
            if value.dim() == 0 or value.shape[0] != n:
                got = "a scalar" if value.dim() == 0 else f"first dimension {value.shape[0]}"
                raise UserError(
                    f"{where}: loss_fn_inputs[{key!r}] has {got}, expected {n} (len(model_input))"
                )
            if key == "target_tokens":
                if value.is_floating_point():
                    raise UserError(
                        f"{where}: loss_fn_inputs['target_tokens'] must hold integer token ids"
                    )
                value = value.long()
            else:
                value = value.float()
                if not bool(torch.isfinite(value).all()):
                    raise UserError(
                        f"{where}: loss_fn_inputs[{key!r}] holds NaN or infinite values"
                    )
            inputs[key] = value

        targets = inputs["target_tokens"]
        if targets.dim() > (2 if self.allow_2d else 1):
            shape = "(N,) or (N, K)" if self.allow_2d else "(N,)"
            raise UserError(
                f"{where}: loss_fn {self.name!r} needs target_tokens shaped {shape}, "
                f"got {list(targets.shape)}"
            )
        for key, value in inputs.items():
            if value.shape != targets.shape:
                raise UserError(
                    f"{where}: loss_fn_inputs[{key!r}] has shape {list(value.shape)}, "
                    f"expected the shape of target_tokens {list(targets.shape)}"
                )
        for key in self.ones_if_missing:
            inputs.setdefault(
                key, torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
            )
        low, high = inputs.get("clip_low_threshold"), inputs.get("clip_high_threshold")
        if low is not None and not bool(((low >= 0) & (low <= 1)).all()):
            raise UserError(f"{where}: loss_fn_inputs['clip_low_threshold'] must lie in [0, 1]")
        if high is not None and not bool((high >= 1).all()):
            raise UserError(f"{where}: loss_fn_inputs['clip_high_threshold'] must be >= 1")
        return inputs


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Learner logprobs ``log_softmax(logits.float())[t, y]`` for ``(N, V)`` logits and ``(N,)`` or
    ``(N, K)`` targets; the result has the targets' shape (temperature 1, fp32, §1.3)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.reshape(targets.shape[0], -1)).reshape(targets.shape)


# ---------------------------------------------------------------- formulas (§2.1-2.3)


def _cross_entropy(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """``-lp * weights``. Any real weight is allowed: fractional for distillation, negative for
    the client-side custom-loss path (weights = -dC/dlp)."""
    return -lp * inputs["weights"]


def _importance_sampling(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """``-exp(lp - q) * A``: REINFORCE corrected for sampling from q instead of the learner."""
    ratio = torch.exp(lp - inputs["logprobs"])
    return -(ratio * inputs["advantages"])


def _ppo(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """``-min(ratio*A, clamp(ratio, low, high)*A)``, token by token.

    Per-position threshold tensors, when sent, override the config elementwise. ``torch.clamp``
    passes gradient inside the band (bounds inclusive) and ``torch.minimum`` splits it at a tie,
    which gives exactly PPO's documented gradient: ``-A*ratio`` unless the clipped branch wins
    outside the band.
    """
    ratio = torch.exp(lp - inputs["logprobs"])
    low = inputs.get(
        "clip_low_threshold", torch.tensor(config["clip_low_threshold"], device=lp.device)
    )
    high = inputs.get(
        "clip_high_threshold", torch.tensor(config["clip_high_threshold"], device=lp.device)
    )
    advantages = inputs["advantages"]
    objective = torch.minimum(ratio * advantages, torch.clamp(ratio, low, high) * advantages)
    return -objective


LOSSES: dict[str, LossFn] = {
    "cross_entropy": LossFn(
        name="cross_entropy",
        compute=_cross_entropy,
        required_inputs=("target_tokens",),
        optional_inputs=("weights",),
        ones_if_missing=("weights",),
        allow_2d=True,
    ),
    "importance_sampling": LossFn(
        name="importance_sampling",
        compute=_importance_sampling,
        required_inputs=("target_tokens", "logprobs", "advantages"),
        allow_2d=True,
    ),
    "ppo": LossFn(
        name="ppo",
        compute=_ppo,
        required_inputs=("target_tokens", "logprobs", "advantages"),
        optional_inputs=("clip_low_threshold", "clip_high_threshold"),
        config_defaults=PPO_CLIP_DEFAULTS,
    ),
}


def get_loss(name: str) -> LossFn:
    """The loss called ``name``; a Tinker loss we lack and a name Tinker lacks fail differently."""
    loss = LOSSES.get(name)
    if loss is not None:
        return loss
    if name in TINKER_LOSS_FNS:
        raise UserError(f"loss_fn {name!r} is not supported yet")
    raise UserError(f"unknown loss_fn {name!r}; expected one of {', '.join(TINKER_LOSS_FNS)}")
