"""The built-in losses against every worked number of losses.md §2.1-2.3 (tol 1e-5), and their
validation. No model: ``lp`` is a leaf tensor, so ``lp.grad`` is dL/dlp."""

from __future__ import annotations

import pytest
import torch

from services.trainer.losses import LOSSES, get_loss, target_logprobs
from whetstone.errors import UserError

TOL = dict(atol=1e-5, rtol=0)

# The shared RL example (§2.2): lp, sampler logprobs q, advantages A.
LP = [-0.5, -1.0, -2.0]
Q = [-0.9, -1.1, -2.3]
A = [1.0, 2.0, -1.0]


def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def run_loss(name: str, lp: list, inputs: dict[str, torch.Tensor], config: dict | None = None):
    """(loss:sum, elementwise, dL/dlp) for one datum, through the loss's own checks."""
    loss = LOSSES[name]
    lp_t = t(lp).requires_grad_()
    checked = loss.check_inputs(inputs, len(lp), "datum 0")
    elementwise = loss(lp_t, checked, loss.check_config(config or {}))
    total = elementwise.sum()
    total.backward()
    return float(total.detach()), elementwise.detach(), lp_t.grad


def assert_close(actual: torch.Tensor | float, expected: list | float) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), **TOL
    )


def rl_inputs(q: list = Q, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "target_tokens": t([0, 0, 0], torch.int64),
        "logprobs": t(q),
        "advantages": t(A),
        **extra,
    }


# ---------------------------------------------------------------- §2.1 cross_entropy


def test_cross_entropy_1d() -> None:
    inputs = {"target_tokens": t([1, 2, 3], torch.int64), "weights": t([0.0, 1.0, 1.0])}
    total, elementwise, grad = run_loss("cross_entropy", [-0.1, -2.0, -0.7], inputs)
    assert_close(total, 2.7)
    assert_close(elementwise, [0.0, 2.0, 0.7])
    assert_close(grad, [0.0, -1.0, -1.0])


def test_cross_entropy_2d() -> None:
    inputs = {
        "target_tokens": t([[1, 2], [3, 4]], torch.int64),
        "weights": t([[0.7, 0.3], [1.0, 0.0]]),
    }
    total, _, grad = run_loss("cross_entropy", [[-0.5, -1.5], [-0.2, -9.0]], inputs)
    assert_close(total, 1.0)
    assert_close(grad, [[-0.7, -0.3], [-1.0, 0.0]])


def test_cross_entropy_missing_weights_default_to_ones() -> None:
    total, _, grad = run_loss(
        "cross_entropy", [-0.1, -2.0], {"target_tokens": t([1, 2], torch.int64)}
    )
    assert_close(total, 2.1)
    assert_close(grad, [-1.0, -1.0])


def test_cross_entropy_from_logits_vocab3() -> None:
    """The end-to-end example: gather from logits, logprobs out, and dL/dlogits."""
    logits = t([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).requires_grad_()
    targets = t([0, 2], torch.int64)
    lp = target_logprobs(logits, targets)
    inputs = LOSSES["cross_entropy"].check_inputs(
        {"target_tokens": targets, "weights": t([1.0, 0.5])}, 2, "datum 0"
    )
    total = LOSSES["cross_entropy"](lp, inputs, {}).sum()
    total.backward()
    assert_close(lp.detach(), [-0.407606, -1.098612])
    assert_close(float(total.detach()), 0.956912)
    assert_close(logits.grad, [[-0.334759, 0.244728, 0.090031], [0.166667, 0.166667, -0.333333]])


def test_target_logprobs_2d_targets() -> None:
    logits = t([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    lp = target_logprobs(logits, t([[0, 1], [2, 2]], torch.int64))
    assert lp.shape == (2, 2)
    assert_close(lp, [[-0.407606, -1.407606], [-1.098612, -1.098612]])


# ---------------------------------------------------------------- §2.2 importance_sampling


def test_importance_sampling() -> None:
    total, elementwise, grad = run_loss("importance_sampling", LP, rl_inputs())
    assert_close(total, -2.352308)
    assert_close(elementwise, [-1.491825, -2.210342, 1.349859])
    assert_close(grad, [-1.491825, -2.210342, 1.349859])


def test_importance_sampling_on_policy_is_reinforce() -> None:
    total, _, grad = run_loss("importance_sampling", LP, rl_inputs(q=LP))
    assert_close(total, -2.0)
    assert_close(grad, [-1.0, -2.0, 1.0])


def test_importance_sampling_2d() -> None:
    inputs = {
        "target_tokens": t([[0, 1]] * 3, torch.int64),
        "logprobs": t([[q, q] for q in Q]),
        "advantages": t([[a, a] for a in A]),
    }
    total, _, _ = run_loss("importance_sampling", [[x, x] for x in LP], inputs)
    assert_close(total, 2 * -2.352308)


# ---------------------------------------------------------------- §2.3 ppo


@pytest.mark.parametrize(
    ("config", "q", "expected_total", "expected_elementwise", "expected_grad"),
    [
        ({}, Q, -2.060483, [-1.2, -2.210342, 1.349859], [0.0, -2.210342, 1.349859]),
        (
            {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
            Q,
            -1.950141,
            [-1.1, -2.2, 1.349859],
            [0.0, 0.0, 1.349859],
        ),
        ({}, LP, -2.0, [-1.0, -2.0, 1.0], [-1.0, -2.0, 1.0]),
    ],
    ids=["default", "narrow", "on-policy"],
)
def test_ppo(config, q, expected_total, expected_elementwise, expected_grad) -> None:
    total, elementwise, grad = run_loss("ppo", LP, rl_inputs(q=q), config)
    assert_close(total, expected_total)
    assert_close(elementwise, expected_elementwise)
    assert_close(grad, expected_grad)


def test_ppo_per_position_thresholds_override_config() -> None:
    inputs = rl_inputs(clip_low_threshold=t([0.9] * 3), clip_high_threshold=t([1.1] * 3))
    total, _, grad = run_loss("ppo", LP, inputs, {"clip_high_threshold": 5.0})
    assert_close(total, -1.950141)
    assert_close(grad, [0.0, 0.0, 1.349859])


@pytest.mark.parametrize("name", ["importance_sampling", "ppo"])
def test_zero_advantage_gives_zero_loss_and_gradient(name: str) -> None:
    inputs = rl_inputs()
    inputs["advantages"] = t([0.0, 0.0, 0.0])
    total, elementwise, grad = run_loss(name, LP, inputs)
    assert total == 0.0
    assert bool((elementwise == 0).all()) and bool((grad == 0).all())


# ---------------------------------------------------------------- validation


def test_unsupported_and_unknown_losses() -> None:
    with pytest.raises(UserError, match="loss_fn 'cispo' is not supported yet"):
        get_loss("cispo")
    with pytest.raises(UserError, match="unknown loss_fn 'mse'"):
        get_loss("mse")


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("cross_entropy", {"beta": 0.1}, "does not take config key 'beta'"),
        ("ppo", {"clip_epsilon": 0.2}, "does not take config key 'clip_epsilon'"),
        ("ppo", {"clip_low_threshold": "0.8"}, "must be a number"),
        ("ppo", {"clip_low_threshold": float("nan")}, "must be finite"),
        ("ppo", {"clip_low_threshold": 1.1}, "0 <= clip_low_threshold <= 1"),
        ("ppo", {"clip_high_threshold": 0.9}, "0 <= clip_low_threshold <= 1"),
        ("ppo", {"clip_low_threshold": -0.1}, "0 <= clip_low_threshold <= 1"),
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
    assert LOSSES["cross_entropy"].check_config({}) == {}


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
        ("ppo", {**rl_inputs(), "target_tokens": t([[1, 2]] * 3, torch.int64)}, r"shaped \(N,\)"),
        ("ppo", rl_inputs(clip_low_threshold=t([0.8, 1.5, 0.8])), r"must lie in \[0, 1\]"),
        ("ppo", rl_inputs(clip_high_threshold=t([1.2, 0.5, 1.2])), "must be >= 1"),
    ],
)
def test_bad_inputs(name: str, inputs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        LOSSES[name].check_inputs(inputs, 3, "datum 0")


def test_unknown_input_keys_are_ignored() -> None:
    inputs = {"target_tokens": t([1, 2, 3], torch.int64), "mask": t([1.0]), "advantages": t([1.0])}
    checked = LOSSES["cross_entropy"].check_inputs(inputs, 3, "datum 0")
    assert set(checked) == {"target_tokens", "weights"}
