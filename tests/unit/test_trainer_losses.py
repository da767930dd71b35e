"""The built-in losses against losses.md's worked numbers (tol 1e-5) and against a float64
reference written here, token by token with its gradient derived by hand (no autograd, no code
shared with ``services.trainer.losses``); then their validation. No model: ``lp`` is a leaf
tensor, so ``lp.grad`` is dL/dlp."""

from __future__ import annotations

import math
import random

import pytest
import torch

from services.trainer.losses import LOSSES, TINKER_LOSS_FNS, get_loss, target_logprobs
from whetstone.errors import UserError

TOL = dict(atol=1e-5, rtol=0)

# The shared RL example (§2.2): lp, sampler logprobs q, advantages A.
LP = [-0.5, -1.0, -2.0]
Q = [-0.9, -1.1, -2.3]
A = [1.0, 2.0, -1.0]
# The GSPO / stable_reinforce example (§2.6, §2.7): position 0 is a padded prompt position.
LP_P = [-3.0, -1.0, -2.0]
Q_P = [0.0, -1.1, -2.3]
A_P = [0.0, 1.0, 1.0]


def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def run_loss(name: str, lp: list, inputs: dict[str, torch.Tensor], config: dict | None = None):
    """(loss:sum, elementwise, dL/dlp, counts) for one datum, through the loss's own checks."""
    loss = LOSSES[name]
    lp_t = t(lp).requires_grad_()
    checked = loss.check_inputs(inputs, len(lp), "datum 0")
    out = loss(lp_t, checked, loss.check_config(config or {}))
    total = out.elementwise.sum()
    total.backward()
    counts = {k: float(v) for k, v in out.counts.items()}
    return float(total.detach()), out.elementwise.detach(), lp_t.grad, counts


def assert_close(actual: torch.Tensor | float, expected: list | float) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), **TOL
    )


def rl_inputs(q: list = Q, a: list = A, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "target_tokens": t([0] * len(q), torch.int64),
        "logprobs": t(q),
        "advantages": t(a),
        **extra,
    }


# ---------------------------------------------------------------- float64 reference, by hand


def clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def ref_clipped_token(ratio: float, a: float, low: float, high: float) -> tuple[float, float]:
    """(loss, dloss/dlp) of ``-min(r*A, clip(r)*A)`` where dr/dlp = r."""
    unclipped, clipped = ratio * a, clip(ratio, low, high) * a
    if unclipped <= clipped:
        return -unclipped, -a * ratio
    return -clipped, (0.0 if not low <= ratio <= high else -a * ratio)


def reference(name: str, lp: list, q: list, a: list, config: dict, mask: list | None = None):
    """(elementwise, grad, counts) in float64 Python arithmetic, from losses.md §2's formulas."""
    n = len(lp)
    loss, grad = [0.0] * n, [0.0] * n
    active = sum(x != 0 for x in a)
    counts: dict[str, float] = {}
    if name == "importance_sampling":
        for i in range(n):
            r = math.exp(lp[i] - q[i])
            loss[i], grad[i] = -r * a[i], -r * a[i]
    elif name == "ppo":
        low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
        clipped = 0
        for i in range(n):
            r = math.exp(lp[i] - q[i])
            loss[i], grad[i] = ref_clipped_token(r, a[i], low, high)
            clipped += (a[i] > 0 and r > high) or (a[i] < 0 and r < low)
        counts = {"clipped_tokens": clipped, "active_tokens": active}
    elif name == "cispo":
        low, high = config.get("clip_low_threshold", 0.0), config.get("clip_high_threshold", 4.0)
        clipped = 0
        for i in range(n):
            r = math.exp(lp[i] - q[i])
            c = clip(r, low, high)
            loss[i], grad[i] = -c * lp[i] * a[i], -c * a[i]
            clipped += a[i] != 0 and not low <= r <= high
        counts = {"clipped_tokens": clipped, "active_tokens": active}
    elif name == "dro":
        beta = config.get("beta", 0.05)
        for i in range(n):
            loss[i] = -(lp[i] * a[i] - 0.5 * beta * (lp[i] - q[i]) ** 2)
            grad[i] = -(a[i] - beta * (lp[i] - q[i]))
    elif name == "gspo":
        low = config.get("clip_low_threshold", 0.9997)
        high = config.get("clip_high_threshold", 1.0004)
        members = [i for i in range(n) if (mask[i] != 0 if mask is not None else a[i] != 0)]
        log_s = sum(lp[i] - q[i] for i in members) / len(members) if members else 0.0
        s = math.exp(log_s)
        clipped = 0
        for i in range(n):
            loss[i], grad[i] = ref_clipped_token(s, a[i], low, high)
            clipped += (a[i] > 0 and s > high) or (a[i] < 0 and s < low)
        counts = {"clipped_tokens": clipped, "active_tokens": active}
    elif name == "stable_reinforce":
        kl, high = config.get("kl_coeff", 0.0), config.get("clip_high_threshold", 4.0)
        clipped, k3_sum = 0, 0.0
        for i in range(n):
            if a[i] == 0:
                continue
            rho = math.exp(lp[i] - q[i])
            w = min(rho, high)
            k3 = rho - 1 - (lp[i] - q[i])
            loss[i] = -w * a[i] * lp[i] + kl * k3
            grad[i] = -w * a[i] + kl * (rho - 1)
            clipped += rho > high
            k3_sum += k3
        counts = {"clipped_tokens": clipped, "active_tokens": active, "kl_k3": k3_sum}
    else:
        raise AssertionError(name)
    return loss, grad, counts


# ---------------------------------------------------------------- §2.1 cross_entropy


def test_cross_entropy_1d() -> None:
    inputs = {"target_tokens": t([1, 2, 3], torch.int64), "weights": t([0.0, 1.0, 1.0])}
    total, elementwise, grad, counts = run_loss("cross_entropy", [-0.1, -2.0, -0.7], inputs)
    assert_close(total, 2.7)
    assert_close(elementwise, [0.0, 2.0, 0.7])
    assert_close(grad, [0.0, -1.0, -1.0])
    assert counts == {}


def test_cross_entropy_2d() -> None:
    inputs = {
        "target_tokens": t([[1, 2], [3, 4]], torch.int64),
        "weights": t([[0.7, 0.3], [1.0, 0.0]]),
    }
    total, _, grad, _ = run_loss("cross_entropy", [[-0.5, -1.5], [-0.2, -9.0]], inputs)
    assert_close(total, 1.0)
    assert_close(grad, [[-0.7, -0.3], [-1.0, 0.0]])


def test_cross_entropy_missing_weights_default_to_ones() -> None:
    total, _, grad, _ = run_loss(
        "cross_entropy", [-0.1, -2.0], {"target_tokens": t([1, 2], torch.int64)}
    )
    assert_close(total, 2.1)
    assert_close(grad, [-1.0, -1.0])


def test_cross_entropy_custom_loss_carrier() -> None:
    """§3: the client's backward request sends weights = -dC/dlp for C = sum(lp^2)."""
    total, _, grad, _ = run_loss(
        "cross_entropy",
        [-0.5, -1.0],
        {"target_tokens": t([1, 2], torch.int64), "weights": t([1.0, 2.0])},
    )
    assert_close(total, 2.5)  # surrogate_loss:sum
    assert_close(grad, [-1.0, -2.0])  # = dC/dlp, so the parameter gradient is that of C


def test_cross_entropy_from_logits_vocab3() -> None:
    """The end-to-end example: gather from logits, logprobs out, and dL/dlogits."""
    logits = t([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).requires_grad_()
    targets = t([0, 2], torch.int64)
    lp = target_logprobs(logits, targets)
    inputs = LOSSES["cross_entropy"].check_inputs(
        {"target_tokens": targets, "weights": t([1.0, 0.5])}, 2, "datum 0"
    )
    total = LOSSES["cross_entropy"](lp, inputs, {}).elementwise.sum()
    total.backward()
    assert_close(lp.detach(), [-0.407606, -1.098612])
    assert_close(float(total.detach()), 0.956912)
    assert_close(logits.grad, [[-0.334759, 0.244728, 0.090031], [0.166667, 0.166667, -0.333333]])


def test_target_logprobs_2d_targets() -> None:
    logits = t([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    lp = target_logprobs(logits, t([[0, 1], [2, 2]], torch.int64))
    assert lp.shape == (2, 2)
    assert_close(lp, [[-0.407606, -1.407606], [-1.098612, -1.098612]])


# ---------------------------------------------------------------- §2.2-2.7 worked numbers


def test_importance_sampling() -> None:
    total, elementwise, grad, _ = run_loss("importance_sampling", LP, rl_inputs())
    assert_close(total, -2.352308)
    assert_close(elementwise, [-1.491825, -2.210342, 1.349859])
    assert_close(grad, [-1.491825, -2.210342, 1.349859])


def test_importance_sampling_2d() -> None:
    inputs = {
        "target_tokens": t([[0, 1]] * 3, torch.int64),
        "logprobs": t([[q, q] for q in Q]),
        "advantages": t([[a, a] for a in A]),
    }
    total, _, grad, _ = run_loss("importance_sampling", [[x, x] for x in LP], inputs)
    assert_close(total, 2 * -2.352308)
    assert_close(grad, [[g, g] for g in [-1.491825, -2.210342, 1.349859]])


@pytest.mark.parametrize("name", ["importance_sampling", "ppo", "cispo"])
def test_on_policy_gradient_is_minus_advantage(name: str) -> None:
    total, _, grad, _ = run_loss(name, LP, rl_inputs(q=LP))
    assert_close(total, {"importance_sampling": -2.0, "ppo": -2.0, "cispo": 0.5}[name])
    assert_close(grad, [-1.0, -2.0, 1.0])


WORKED = [
    # (loss, config, q, a, loss:sum, elementwise, dL/dlp, counts)
    (
        "ppo",
        {},
        Q,
        A,
        -2.060483,
        [-1.2, -2.210342, 1.349859],
        [0.0, -2.210342, 1.349859],
        {"clipped_tokens": 1, "active_tokens": 3},
    ),
    (
        "ppo",
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
        Q,
        A,
        -1.950141,
        [-1.1, -2.2, 1.349859],
        [0.0, 0.0, 1.349859],
        {"clipped_tokens": 2, "active_tokens": 3},
    ),
    ("ppo", {}, LP, A, -2.0, [-1.0, -2.0, 1.0], [-1.0, -2.0, 1.0], {"clipped_tokens": 0}),
    (
        "cispo",
        {},
        Q,
        A,
        0.256537,
        [0.745912, 2.210342, -2.699718],
        [-1.491825, -2.210342, 1.349859],
        {"clipped_tokens": 0, "active_tokens": 3},
    ),
    (
        "cispo",
        {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        Q,
        A,
        0.410342,
        [0.6, 2.210342, -2.4],
        [-1.2, -2.210342, 1.2],
        {"clipped_tokens": 2},
    ),
    ("cispo", {}, LP, A, 0.5, [0.5, 2.0, -2.0], [-1.0, -2.0, 1.0], {}),
    ("dro", {}, Q, A, 0.5065, [0.504, 2.00025, -1.99775], [-0.98, -1.995, 1.015], {}),
    ("dro", {"beta": 0.05}, Q, A, 0.5065, [0.504, 2.00025, -1.99775], [-0.98, -1.995, 1.015], {}),
    ("dro", {"beta": 0.1}, Q, A, 0.513, [0.508, 2.0005, -1.9955], [-0.96, -1.99, 1.03], {}),
]


@pytest.mark.parametrize(
    ("name", "config", "q", "a", "total", "elementwise", "grad", "counts"),
    WORKED,
    ids=[f"{w[0]}-{i}" for i, w in enumerate(WORKED)],
)
def test_worked_numbers(name, config, q, a, total, elementwise, grad, counts) -> None:
    got_total, got_elementwise, got_grad, got_counts = run_loss(name, LP, rl_inputs(q, a), config)
    assert_close(got_total, total)
    assert_close(got_elementwise, elementwise)
    assert_close(got_grad, grad)
    assert {k: got_counts[k] for k in counts} == counts


def test_dro_prompt_position_is_not_masked() -> None:
    """§2.5: lp = -3 on a prompt position (A = 0, q = 0) with beta 0.05."""
    total, _, grad, _ = run_loss("dro", [-3.0], rl_inputs(q=[0.0], a=[0.0]))
    assert_close(total, 0.225)
    assert_close(grad, [-0.15])


LOW_HIGH = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
WIDE = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.3}
S = 1.221403  # the sequence ratio e^0.2 of the example
GSPO = [
    # (config, a, mask, loss:sum, dL/dlp, clipped tokens)
    (WIDE, A_P, [0, 1, 1], -2.442806, [0.0, -S, -S], 0),
    (LOW_HIGH, A_P, [0, 1, 1], -2.4, [0.0, 0.0, 0.0], 2),
    (LOW_HIGH, [0.0, -1.0, -1.0], [0, 1, 1], 2.442806, [0.0, S, S], 0),
    ({}, A_P, [0, 1, 1], -2.0008, [0.0, 0.0, 0.0], 2),
    (WIDE, A_P, None, -2.442806, [0.0, -S, -S], 0),
    (WIDE, A_P, [1, 1, 1], -0.840701, [0.0, -0.42035, -0.42035], 0),
]


@pytest.mark.parametrize(
    ("config", "a", "mask", "total", "grad", "clipped"),
    GSPO,
    ids=["in-band", "clipped", "unclipped-wins", "default", "no-mask", "all-ones-mask"],
)
def test_gspo_worked_numbers(config, a, mask, total, grad, clipped) -> None:
    extra = {} if mask is None else {"sequence_ratio_mask": t([float(m) for m in mask])}
    got_total, _, got_grad, counts = run_loss("gspo", LP_P, rl_inputs(Q_P, a, **extra), config)
    assert_close(got_total, total)
    assert_close(got_grad, grad)
    assert counts["clipped_tokens"] == clipped and counts["active_tokens"] == 2


def test_gspo_empty_mask_is_finite() -> None:
    total, elementwise, grad, _ = run_loss(
        "gspo", LP_P, rl_inputs(Q_P, A_P, sequence_ratio_mask=t([0.0, 0.0, 0.0]))
    )
    assert math.isfinite(total) and bool(torch.isfinite(elementwise).all())
    assert_close(total, -2.0)  # s = 1: inside any band, so the loss is -sum(A)
    assert_close(grad, [0.0, -1.0, -1.0])


@pytest.mark.parametrize(
    ("config", "total", "grad", "k3"),
    [
        ({}, 3.804888, [0.0, -1.105171, -1.349859], 0.055030),
        ({"kl_coeff": 0.1}, 3.810391, [0.0, -1.094654, -1.314873], 0.055030),
    ],
)
def test_stable_reinforce_worked_numbers(config, total, grad, k3) -> None:
    got_total, elementwise, got_grad, counts = run_loss(
        "stable_reinforce", LP_P, rl_inputs(Q_P, A_P), config
    )
    assert_close(got_total, total)
    assert_close(got_grad, grad)
    assert float(elementwise[0]) == 0.0  # the prompt position
    assert counts["kl_k3"] == pytest.approx(k3, abs=1e-5)
    assert counts["active_tokens"] == 2 and counts["clipped_tokens"] == 0


def test_stable_reinforce_caps_the_weight() -> None:
    """rho = e^2 > 4: the coefficient is the cap, and the token counts as clipped."""
    _, _, grad, counts = run_loss(
        "stable_reinforce", [-1.0], rl_inputs(q=[-3.0], a=[1.0]), {"clip_high_threshold": 4.0}
    )
    assert_close(grad, [-4.0])
    assert counts["clipped_tokens"] == 1


# ---------------------------------------------------------------- against the reference


CONFIGS = {
    "importance_sampling": [{}],
    "ppo": [{}, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}],
    "cispo": [{}, {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}],
    "dro": [{}, {"beta": 0.3}],
    "gspo": [{}, {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}],
    "stable_reinforce": [{}, {"kl_coeff": 0.2, "clip_high_threshold": 1.5}],
}


@pytest.mark.parametrize(
    ("name", "config"), [(n, c) for n, cs in CONFIGS.items() for c in cs], ids=str
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_float64_reference(name: str, config: dict, seed: int) -> None:
    """Random datums with a padded prompt (A = 0, q = 0) and off-policy sampled tokens."""
    rng = random.Random(seed)
    prompt, n = rng.randint(0, 4), rng.randint(3, 12)
    lp = [rng.uniform(-4.0, -0.01) for _ in range(n)]
    q = [0.0] * prompt + [x + rng.gauss(0.0, 0.4) for x in lp[prompt:]]
    a = [0.0] * prompt + [rng.choice([-1.5, -0.5, 0.0, 0.7, 2.0]) for _ in range(n - prompt)]
    mask = [0.0] * prompt + [1.0] * (n - prompt)
    extra = {"sequence_ratio_mask": t(mask)} if name == "gspo" and seed != 2 else {}
    total, elementwise, grad, counts = run_loss(name, lp, rl_inputs(q, a, **extra), config)
    ref_loss, ref_grad, ref_counts = reference(name, lp, q, a, config, mask if extra else None)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        elementwise.double(), torch.tensor(ref_loss, dtype=torch.float64), **tol
    )
    torch.testing.assert_close(grad.double(), torch.tensor(ref_grad, dtype=torch.float64), **tol)
    assert total == pytest.approx(sum(ref_loss), abs=1e-4, rel=1e-5)
    assert counts == pytest.approx(ref_counts, abs=1e-4)


@pytest.mark.parametrize("name", ["importance_sampling", "ppo", "cispo", "stable_reinforce"])
def test_zero_advantage_gives_zero_loss_and_gradient(name: str) -> None:
    total, elementwise, grad, _ = run_loss(name, LP, rl_inputs(a=[0.0, 0.0, 0.0]))
    assert total == 0.0
    assert bool((elementwise == 0).all()) and bool((grad == 0).all())


def test_ppo_per_position_thresholds_override_config() -> None:
    inputs = rl_inputs(clip_low_threshold=t([0.9] * 3), clip_high_threshold=t([1.1] * 3))
    total, _, grad, _ = run_loss("ppo", LP, inputs, {"clip_high_threshold": 5.0})
    assert_close(total, -1.950141)
    assert_close(grad, [0.0, 0.0, 1.349859])


def test_cispo_per_position_thresholds_override_config() -> None:
    inputs = rl_inputs(clip_low_threshold=t([0.8] * 3), clip_high_threshold=t([1.2] * 3))
    total, _, _, _ = run_loss("cispo", LP, inputs)
    assert_close(total, 0.410342)


# ---------------------------------------------------------------- validation


def test_every_tinker_loss_is_known() -> None:
    assert set(LOSSES) == set(TINKER_LOSS_FNS) - {"custom"}
    with pytest.raises(UserError, match="loss_fn 'custom' is not supported yet"):
        get_loss("custom")
    with pytest.raises(UserError, match="unknown loss_fn 'mse'"):
        get_loss("mse")


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("cross_entropy", {"beta": 0.1}, "does not take config key 'beta'"),
        ("importance_sampling", {"clip_low_threshold": 0.8}, "does not take config key"),
        ("ppo", {"clip_epsilon": 0.2}, "does not take config key 'clip_epsilon'"),
        ("ppo", {"clip_low_threshold": "0.8"}, "must be a number"),
        ("ppo", {"clip_low_threshold": True}, "must be a number"),
        ("ppo", {"clip_low_threshold": float("nan")}, "must be finite"),
        ("ppo", {"clip_low_threshold": 1.1}, r"'clip_low_threshold'\] must lie in \[0, 1\]"),
        ("ppo", {"clip_high_threshold": 0.9}, r"'clip_high_threshold'\] must be >= 1"),
        ("ppo", {"clip_low_threshold": -0.1}, r"must lie in \[0, 1\]"),
        ("cispo", {"clip_high_threshold": float("inf")}, "must be finite"),
        ("dro", {"beta": -0.1}, r"'beta'\] must be >= 0"),
        ("dro", {"clip_low_threshold": 0.8}, "does not take config key"),
        ("gspo", {"beta": 0.1}, "does not take config key"),
        ("gspo", {"clip_high_threshold": 0.99}, "must be >= 1"),
        ("stable_reinforce", {"kl_coeff": -1.0}, r"'kl_coeff'\] must be >= 0"),
        ("stable_reinforce", {"clip_high_threshold": 0.5}, "must be >= 1"),
        ("stable_reinforce", {"clip_low_threshold": 0.5}, "does not take config key"),
        ("stable_reinforce", {"loss_id": "abc"}, "does not take config key 'loss_id'"),
    ],
)
def test_bad_config(name: str, config: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        LOSSES[name].check_config(config)


def test_config_defaults_and_int_values() -> None:
    assert LOSSES["ppo"].check_config({}) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert LOSSES["ppo"].check_config({"clip_high_threshold": 2}) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 2.0,
    }
    assert LOSSES["cispo"].check_config({}) == {
        "clip_low_threshold": 0.0,
        "clip_high_threshold": 4.0,
    }
    assert LOSSES["dro"].check_config({"beta": 1}) == {"beta": 1.0}
    assert LOSSES["gspo"].check_config({}) == pytest.approx(
        {"clip_low_threshold": 0.9997, "clip_high_threshold": 1.0004}
    )
    assert LOSSES["stable_reinforce"].check_config({}) == {
        "kl_coeff": 0.0,
        "clip_high_threshold": 4.0,
    }
    assert LOSSES["cross_entropy"].check_config({}) == {}
    assert LOSSES["importance_sampling"].check_config({}) == {}


@pytest.mark.parametrize(
    ("name", "inputs", "match"),
    [
        (
            "importance_sampling",
            {"target_tokens": t([1, 2, 3], torch.int64), "logprobs": t(Q)},
            r"needs loss_fn_inputs\['advantages'\]",
        ),
        (
            "cross_entropy",
            {"weights": t([1.0, 1.0, 1.0])},
            r"needs loss_fn_inputs\['target_tokens'\]",
        ),
        (
            "cross_entropy",
            {"target_tokens": t([1, 2], torch.int64)},
            "first dimension 2, expected 3",
        ),
        (
            "cross_entropy",
            {"target_tokens": t([1, 2, 3], torch.int64), "weights": t([1.0, 1.0])},
            "first dimension 2, expected 3",
        ),
        (
            "cross_entropy",
            {"target_tokens": t([1, 2, 3], torch.int64), "weights": t(1.0)},
            "has a scalar",
        ),
        (
            "cross_entropy",
            {"target_tokens": t([1, 2, 3], torch.int64), "weights": t([1.0, float("nan"), 1.0])},
            "NaN or infinite",
        ),
        ("importance_sampling", rl_inputs(q=[0.0, float("inf"), 0.0]), "NaN or infinite"),
        ("cross_entropy", {"target_tokens": t([1.0, 2.0, 3.0])}, "integer token ids"),
        (
            "cross_entropy",
            {"target_tokens": t([[1, 2]] * 3, torch.int64), "weights": t([1.0] * 3)},
            "expected the shape of target_tokens",
        ),
        (
            "importance_sampling",
            {**rl_inputs(), "target_tokens": t([[1, 2]] * 3, torch.int64)},
            "expected the shape of target_tokens",
        ),
        ("ppo", {**rl_inputs(), "target_tokens": t([[1, 2]] * 3, torch.int64)}, r"shaped \(N,\)"),
        ("ppo", rl_inputs(clip_low_threshold=t([0.8, 1.5, 0.8])), r"must lie in \[0, 1\]"),
        ("ppo", rl_inputs(clip_high_threshold=t([1.2, 0.5, 1.2])), "must be >= 1"),
        ("cispo", {**rl_inputs(), "logprobs": t([[0.0]] * 3)}, "expected the shape"),
        ("dro", {"target_tokens": t([1, 2, 3], torch.int64), "advantages": t(A)}, "'logprobs'"),
        ("gspo", rl_inputs(sequence_ratio_mask=t([1.0, 1.0])), "first dimension 2, expected 3"),
        (
            "gspo",
            rl_inputs(sequence_ratio_mask=t([1.0, float("nan"), 1.0])),
            "NaN or infinite",
        ),
        (
            "stable_reinforce",
            {"target_tokens": t([1, 2, 3], torch.int64), "advantages": t(A)},
            r"needs loss_fn_inputs\['logprobs'\]",
        ),
    ],
)
def test_bad_inputs(name: str, inputs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        LOSSES[name].check_inputs(inputs, 3, "datum 0")


def test_unknown_input_keys_are_ignored() -> None:
    inputs = {"target_tokens": t([1, 2, 3], torch.int64), "mask": t([1.0]), "advantages": t([1.0])}
    checked = LOSSES["cross_entropy"].check_inputs(inputs, 3, "datum 0")
    assert set(checked) == {"target_tokens", "weights"}
    checked = LOSSES["gspo"].check_inputs(rl_inputs(mask=t([1.0])), 3, "datum 0")
    assert set(checked) == {"target_tokens", "logprobs", "advantages"}
