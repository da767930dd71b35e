"""Every script in ``examples/`` run as a user would (its own process, the real ``tinker`` SDK,
``TINKER_BASE_URL`` and ``TINKER_API_KEY`` in the environment) against one module-scoped
platform, with short settings from its command-line flags; each test reads the metric the script
prints and checks it improved. The built-in model has random weights, so each example's task is
one it learns in a few steps on a CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(platform, name: str, *args: str, timeout_s: float = 400) -> str:
    env = {
        **os.environ,
        "TINKER_BASE_URL": platform.base_url,
        "TINKER_API_KEY": platform.api_key,
        "TINKER_TELEMETRY": "0",
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def per_step(output: str, metric: str) -> list[float]:
    """The value of ``metric`` on every ``step N ...`` line, in order."""
    pattern = re.compile(rf"^\s*step\s+\d+\s.*?\b{metric}\s+(-?[\d.]+)", re.M)
    return [float(x) for x in pattern.findall(output)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_grpo_math_raises_the_reward_and_prints_the_bill(platform) -> None:
    out = run_example(platform, "grpo_math.py", "--steps", "12")
    rewards = per_step(out, "reward")
    assert len(rewards) == 12
    assert mean(rewards[-3:]) > 3 * mean(rewards[:3]) and mean(rewards[-3:]) > 0.05, out
    assert all(0.0 <= a <= 1.0 for a in per_step(out, "accuracy"))
    rows = re.findall(r"^\s+(\w+_tokens)\s+([\d,]+)\s+\$([\d.]+)", out, re.M)
    billed = {meter: (int(n.replace(",", "")), Decimal(cost)) for meter, n, cost in rows}
    # the rollouts' prefill and sampling and the updates' training, all billed (prompts that hit
    # the sampler's prefix cache may add cached_prefill_tokens)
    assert {"prefill_tokens", "sample_tokens", "train_tokens"} <= billed.keys(), out
    assert all(tokens > 0 and cost > 0 for tokens, cost in billed.values()), out
    # 12 steps x 4 problems x 8 samples, each answer 1 to 6 tokens
    assert 12 * 32 <= billed["sample_tokens"][0] <= 12 * 32 * 6
    run = re.search(r"of which training run \S+: ([\d,]+) tokens, \$([\d.]+)", out)
    assert run is not None, out
    assert int(run[1].replace(",", "")) == billed["train_tokens"][0]
    assert Decimal(run[2]) == billed["train_tokens"][1]


def test_rl_with_a_custom_reward_callable(platform, tmp_path: Path) -> None:
    rewards_file = tmp_path / "my_rewards.py"
    rewards_file.write_text(
        "def digits(prompt, answer):\n"
        "    return sum(c.isdigit() for c in answer) / max(1, len(answer))\n"
    )
    out = run_example(platform, "rl_custom_reward.py", "--reward", f"{rewards_file}:digits")
    assert "reward digits" in out
    rewards = per_step(out, "reward")
    assert len(rewards) == 20
    assert mean(rewards[-3:]) > 0.3 and mean(rewards[-3:]) > 3 * mean(rewards[:3]), out


@pytest.mark.slow
def test_rl_with_the_default_custom_reward(platform) -> None:
    out = run_example(platform, "rl_custom_reward.py", "--steps", "20")
    rewards = per_step(out, "reward")
    assert mean(rewards[-3:]) > 3 * mean(rewards[:3]), out


def test_dpo_prefers_the_chosen_answers(platform) -> None:
    out = run_example(platform, "dpo.py")
    losses = per_step(out, "dpo_loss")
    assert len(losses) == 12
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy is the reference
    assert mean(losses[-3:]) < 0.5, out
    final = re.search(r"preference accuracy ([\d.]+), mean margin (-?[\d.]+)", out)
    assert final is not None, out
    assert float(final[1]) >= 0.9 and float(final[2]) > 0.5, out


def test_resume_carries_on_from_the_saved_state(platform) -> None:
    out = run_example(platform, "resume.py")
    final = re.search(r"fresh ([\d.]+), saved ([\d.]+), resumed ([\d.]+), final ([\d.]+)", out)
    assert final is not None, out
    fresh, saved, resumed, last = (float(x) for x in final.groups())
    assert resumed == pytest.approx(saved, abs=1e-3)  # the new client holds the saved weights
    assert saved < 0.8 * fresh and last < 0.8 * resumed, out
    assert "resumed as run" in out


@pytest.mark.slow
def test_sft_example_lowers_the_loss(platform) -> None:
    out = run_example(platform, "sft.py", "--epochs", "1", timeout_s=900)
    losses = [float(x) for x in re.findall(r"loss/token ([\d.]+)", out)]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0], out
    assert "samples from the fine-tuned model" in out
