"""Tinker's built-in losses, one datum at a time (see ``../shared/losses.md`` §1-2).

Each loss maps the learner logprobs ``lp`` (float32, shaped like ``target_tokens``, carrying the
autograd graph back to the adapter) and the datum's checked inputs to a :class:`LossOutput`: an
*elementwise* loss of the same shape plus a few per-datum counts. The engine sums the elementwise
loss over the sequence and over datums (``loss:sum``), and each count over datums
(``<name>:sum``): Tinker never normalises by token count, and never computes anything across
datums, because the client may split one call into chunks and must get the same answer.

Formula sources (losses.md tags): ``cross_entropy``, ``importance_sampling``, ``ppo``, ``cispo``,
``dro`` and ``gspo`` follow the Tinker docs' formulas; the defaults the docs leave open follow
losses.md's proposals (dro ``beta`` 0.05; gspo thresholds 0.9997/1.0004, the GSPO paper's; gspo
without ``sequence_ratio_mask`` averages over positions with A != 0). ``stable_reinforce``'s
objective is undocumented; this is losses.md's §2.7 proposal, fed by the client's ``logprobs``
(see :func:`_stable_reinforce`). The counts ``clipped_tokens`` and ``active_tokens`` (and
``kl_k3`` for stable_reinforce) are losses.md's proposed diagnostics.

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

RL_INPUTS = ("target_tokens", "logprobs", "advantages")
CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")

# What every config value a loss accepts must satisfy, whichever loss takes it.
CONFIG_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "clip_low_threshold": (lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]"),
    "clip_high_threshold": (lambda v: v >= 1.0, "must be >= 1"),
    "beta": (lambda v: v >= 0.0, "must be >= 0"),
    "kl_coeff": (lambda v: v >= 0.0, "must be >= 0"),
}


@dataclass(frozen=True)
class LossOutput:
    """One datum's loss: ``elementwise`` (shaped like ``target_tokens``; its sum is the datum's
    loss) and ``counts``, detached scalars the engine reports summed over datums as
    ``<name>:sum`` (a name that carries its reduction, as custom losses' metrics do, keeps it).
    A loss that is not ``per_token`` (a custom loss) gives one 0-dim ``elementwise`` value."""

    elementwise: torch.Tensor
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


def count_metrics(counts: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Counts summed over datums as ``name:reduction`` metrics (``:sum`` unless named)."""
    return {(n if ":" in n else f"{n}:sum"): float(v) for n, v in counts.items()}


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
    compute: Callable[[torch.Tensor, Inputs, Config], LossOutput]
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    ones_if_missing: tuple[str, ...] = ()
    config_defaults: Mapping[str, float] = field(default_factory=dict)
    allow_2d: bool = False
    # False for a loss with one value per datum (custom losses): no ``elementwise_loss`` output.
    per_token: bool = True

    def __call__(self, lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
        return self.compute(lp, inputs, config)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.required_inputs + self.optional_inputs

    def check_config(self, raw: Mapping[str, float | str]) -> dict[str, float]:
        """The config with defaults filled in; unknown keys, non-numbers, non-finite numbers and
        values outside a key's range (``CONFIG_RULES``) are refused."""
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
        for key, value in config.items():
            rule = CONFIG_RULES.get(key)
            if rule is not None and not rule[0](value):
                raise UserError(f"loss_fn_config[{key!r}] {rule[1]}, got {value}")
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
    ``(N, K)`` targets; the result has the targets' shape (temperature 1, fp32, §1.3). The engine
    computes the same values from hidden states in blocks (``whetstone_ml.logprobs``)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.reshape(targets.shape[0], -1)).reshape(targets.shape)


# ---------------------------------------------------------------- helpers


def _thresholds(lp: torch.Tensor, inputs: Inputs, config: Config) -> tuple[torch.Tensor, ...]:
    """The clip band: per-position tensors when sent (they override the config elementwise),
    else the config's values."""
    return tuple(
        inputs.get(key, torch.tensor(config[key], dtype=torch.float32, device=lp.device))
        for key in CLIP_INPUTS
    )


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.detach().sum().float()


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> LossOutput:
    """``-min(ratio*A, clamp(ratio, low, high)*A)`` and its counts (ppo and gspo).

    ``torch.clamp`` passes gradient inside the band (bounds inclusive) and ``torch.minimum``
    splits it at a tie, which gives PPO's documented gradient: ``-A*ratio`` unless the clipped
    branch wins outside the band. Those positions are the clipped tokens.
    """
    objective = torch.minimum(ratio * advantages, torch.clamp(ratio, low, high) * advantages)
    r = ratio.detach()
    active = advantages != 0
    clipped = ((advantages > 0) & (r > high)) | ((advantages < 0) & (r < low))
    return LossOutput(
        -objective, {"clipped_tokens": _count(clipped), "active_tokens": _count(active)}
    )


# ---------------------------------------------------------------- formulas (§2.1-2.7)


def _cross_entropy(lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
    """``-lp * weights``. Any real weight is allowed: fractional for distillation, negative for
    the client-side custom-loss path (weights = -dC/dlp)."""
    return LossOutput(-lp * inputs["weights"])


def _importance_sampling(lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
    """``-exp(lp - q) * A``: REINFORCE corrected for sampling from q instead of the learner."""
    ratio = torch.exp(lp - inputs["logprobs"])
    return LossOutput(-(ratio * inputs["advantages"]))


def _ppo(lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
    """The token-level clipped surrogate with ``ratio = exp(lp - q)``."""
    low, high = _thresholds(lp, inputs, config)
    ratio = torch.exp(lp - inputs["logprobs"])
    return _clipped_surrogate(ratio, inputs["advantages"], low, high)


def _cispo(lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
    """``-sg(clamp(ratio, low, high)) * lp * A``: the clipped IS weight is a stop-gradient
    coefficient, so clipping bounds a token's gradient and never zeroes it."""
    low, high = _thresholds(lp, inputs, config)
    advantages = inputs["advantages"]
    ratio = torch.exp(lp.detach() - inputs["logprobs"])
    coefficient = torch.clamp(ratio, low, high)
    clipped = (advantages != 0) & ((ratio < low) | (ratio > high))
    return LossOutput(
        -(coefficient * lp * advantages),
        {"clipped_tokens": _count(clipped), "active_tokens": _count(advantages != 0)},
    )


def _dro(lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
    """``-(lp*A - beta/2 * (lp - q)^2)``, literally: no position is masked, so a prompt position
    (A = 0, q padded to 0) contributes ``beta/2 * lp^2`` (losses.md §2.5)."""
    q, advantages = inputs["logprobs"], inputs["advantages"]
    return LossOutput(-(lp * advantages - 0.5 * config["beta"] * (lp - q) ** 2))


def _gspo(lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
    """GSPO-token: every position's ratio has the sequence ratio's value and its own gradient.

    ``s = exp(mean over M of (sg(lp) - q))`` with M the positions where ``sequence_ratio_mask``
    is nonzero (without the mask: where A != 0; padded prompt positions, q = 0, would distort a
    mean over all positions). An empty M gives ``s = 1`` instead of NaN. Then
    ``ratio_t = s * exp(lp_t - sg(lp_t))`` enters PPO's clipped surrogate, summed over all
    positions; the mean uses detached logprobs, so no gradient flows between tokens.
    """
    low, high = _thresholds(lp, inputs, config)
    advantages = inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask")
    members = (mask != 0) if mask is not None else (advantages != 0)
    log_ratio = torch.where(members, lp.detach() - inputs["logprobs"], 0.0)
    log_s = log_ratio.sum() / members.sum().clamp(min=1)
    ratio = torch.exp(log_s + lp - lp.detach())
    return _clipped_surrogate(ratio, advantages, low, high)


def _stable_reinforce(lp: torch.Tensor, inputs: Inputs, config: Config) -> LossOutput:
    """losses.md §2.7's proposal (Tinker's objective is undocumented).

    On the sampled positions S: ``w = sg(clamp(rho, 0, clip_high_threshold))`` with
    ``rho = exp(lp - q)``, and ``loss_t = -w*A*lp + kl_coeff * (rho - 1 - log rho)`` (the k3
    estimator of KL(q || p) on the sampler's samples); other positions contribute 0.

    The trainer receives no provenance spans and keeps no stability record, so q is the client's
    ``logprobs`` and S is the positions with A != 0. The cookbook puts nonzero advantages only on
    sampled tokens (its ``rl/train.py`` refuses anything else), so S is what the spans name.
    """
    advantages = inputs["advantages"]
    sampled = advantages != 0
    log_rho = torch.where(sampled, lp - inputs["logprobs"], 0.0)
    rho = torch.exp(log_rho)
    weight = torch.clamp(rho.detach(), max=config["clip_high_threshold"])
    k3 = rho - 1 - log_rho  # 0 outside S, where log_rho = 0
    elementwise = torch.where(sampled, -weight * advantages * lp + config["kl_coeff"] * k3, 0.0)
    return LossOutput(
        elementwise,
        {
            "clipped_tokens": _count(sampled & (rho.detach() > config["clip_high_threshold"])),
            "active_tokens": _count(sampled),
            "kl_k3": k3.detach().sum(),
        },
    )


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
        required_inputs=RL_INPUTS,
        allow_2d=True,
    ),
    "ppo": LossFn(
        name="ppo",
        compute=_ppo,
        required_inputs=RL_INPUTS,
        optional_inputs=CLIP_INPUTS,
        config_defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    ),
    "cispo": LossFn(
        name="cispo",
        compute=_cispo,
        required_inputs=RL_INPUTS,
        optional_inputs=CLIP_INPUTS,
        config_defaults={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    ),
    "dro": LossFn(
        name="dro",
        compute=_dro,
        required_inputs=RL_INPUTS,
        config_defaults={"beta": 0.05},
    ),
    "gspo": LossFn(
        name="gspo",
        compute=_gspo,
        required_inputs=RL_INPUTS,
        optional_inputs=("sequence_ratio_mask", *CLIP_INPUTS),
        config_defaults={"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4},
    ),
    "stable_reinforce": LossFn(
        name="stable_reinforce",
        compute=_stable_reinforce,
        required_inputs=RL_INPUTS,
        config_defaults={"kl_coeff": 0.0, "clip_high_threshold": 4.0},
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
