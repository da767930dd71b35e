"""tinker-cookbook 0.6.1's training loops, unmodified, against a running Whetstone.

The cookbook's own ``supervised.train``, ``rl.train`` (with ``importance_sampling``, ``ppo`` and
its default loss ``stable_reinforce``) and ``preference.train_dpo`` drive one module-scoped
platform through the real ``tinker`` SDK, offline: the tokenizer is the built-in model's local
directory (which the gateway also accepts as the base model's name), the renderer is
``role_colon``, and the price list the loops fetch at start-up is skipped. Only the data is ours:
a JSONL file of chats, an RL environment whose reward a few tokens satisfy, and a JSONL file of
preference pairs. Each test reads the metrics the loop itself logged (``metrics.jsonl``) and
asserts they improved; the built-in model has random weights, so every task is one it can learn
in a dozen steps. The long versions are marked slow.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import chz
import pytest
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
from tinker_cookbook.rl import train as rl_train
from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset, RLDatasetBuilder, StepResult
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
from tinker_cookbook.tokenizer_utils import get_tokenizer
from tinker_cookbook.utils import cost_estimation

from whetstone.models.builtin import builtin_model_dir

RENDERER = "role_colon"

# The loops fetch a price list from the internet at start-up (and carry on when that fails);
# there is no internet here, so skip the attempt.
cost_estimation._pricing_fetched = True


@pytest.fixture(scope="module")
def model(platform, models_dir: Path) -> Iterator[str]:
    """The built-in model's directory (tokenizer and base model name at once), with the SDK's
    key in the environment, where the cookbook's ``ServiceClient()`` reads it."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_API_KEY", platform.api_key)
        yield str(builtin_model_dir(models_dir))


def logged(log_path: Path, key: str) -> list[float]:
    """One metric per step, as the cookbook's logger wrote it."""
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------- supervised


CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Egypt": "Cairo"}


def write_chats(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            country = rng.choice(sorted(CAPITALS))
            answer = f"The capital of {country} is {CAPITALS[country]}."
            chat = [
                {"role": "user", "content": f"Capital of {country}?"},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")
    return path


def run_supervised(platform, model: str, tmp_path: Path, examples: int, epochs: int) -> list[float]:
    config = sl_train.Config(
        log_path=str(tmp_path / "run"),
        model_name=model,
        recipe_name="whetstone_e2e",
        renderer_name=RENDERER,
        dataset_builder=FromConversationFileBuilder(
            file_path=str(write_chats(tmp_path / "chats.jsonl", examples)),
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=model,
                renderer_name=RENDERER,
                max_length=256,
                batch_size=32,
            ),
        ),
        learning_rate=5e-3,
        num_epochs=epochs,
        lora_rank=16,
        save_every=0,
        eval_every=0,
        base_url=platform.base_url,
    )
    asyncio.run(sl_train.main(config))
    return logged(tmp_path / "run", "train_mean_nll")


def test_supervised_loop_lowers_the_nll(platform, model: str, tmp_path: Path) -> None:
    nll = run_supervised(platform, model, tmp_path, examples=256, epochs=2)
    assert len(nll) == 16
    assert mean(nll[-3:]) < 0.5 * mean(nll[:3]), nll


@pytest.mark.slow
def test_supervised_loop_long(platform, model: str, tmp_path: Path) -> None:
    nll = run_supervised(platform, model, tmp_path, examples=512, epochs=4)
    assert nll[-1] < 0.1 * nll[0], nll


# ---------------------------------------------------------------- reinforcement learning


class DigitsEnv(Env):
    """One turn: the reward is the fraction of the answer's characters that are digits. About a
    tenth of the vocabulary is digits, so random weights already earn some reward, and a policy
    gradient has something to follow."""

    def __init__(self, renderer: renderers.Renderer, question: str) -> None:
        self.renderer = renderer
        self.question = question

    async def initial_observation(self):
        prompt = [{"role": "user", "content": self.question}]
        return self.renderer.build_generation_prompt(prompt), self.renderer.get_stop_sequences()

    async def step(self, action, *, extra=None) -> StepResult:
        text = self.renderer.tokenizer.decode(action)
        return StepResult(
            reward=sum(ch.isdigit() for ch in text) / max(1, len(text)),
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.renderer.get_stop_sequences(),
        )


@dataclass(frozen=True)
class DigitsGroup(EnvGroupBuilder):
    renderer: renderers.Renderer
    question: str
    group_size: int

    async def make_envs(self) -> Sequence[Env]:
        return [DigitsEnv(self.renderer, self.question) for _ in range(self.group_size)]


class DigitsDataset(RLDataset):
    def __init__(self, renderer: renderers.Renderer, builder: DigitsBuilder) -> None:
        self.renderer = renderer
        self.builder = builder

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        b = self.builder
        return [
            DigitsGroup(self.renderer, f"Give me a number ({index}.{i}).", b.group_size)
            for i in range(b.batch_size)
        ]

    def __len__(self) -> int:
        return self.builder.n_batches


@chz.chz
class DigitsBuilder(RLDatasetBuilder):
    model: str
    batch_size: int
    group_size: int
    n_batches: int

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        renderer = renderers.get_renderer(RENDERER, get_tokenizer(self.model))
        return DigitsDataset(renderer, self), None


def run_rl(platform, model: str, tmp_path: Path, loss_fn: str, steps: int) -> list[float]:
    config = rl_train.Config(
        learning_rate=2e-2,
        dataset_builder=DigitsBuilder(model=model, batch_size=4, group_size=8, n_batches=steps),
        model_name=model,
        recipe_name="whetstone_e2e",
        max_tokens=6,
        log_path=str(tmp_path),
        eval_every=0,
        save_every=0,
        renderer_name=RENDERER,
        loss_fn=loss_fn,
        lora_rank=16,
        base_url=platform.base_url,
        num_groups_to_log=0,
    )
    asyncio.run(rl_train.main(config))
    return logged(tmp_path, "env/all/reward/total")


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "stable_reinforce"])
def test_rl_loop_raises_the_reward(platform, model: str, tmp_path: Path, loss_fn: str) -> None:
    rewards = run_rl(platform, model, tmp_path, loss_fn, steps=14)
    assert len(rewards) == 14
    first, last = mean(rewards[:3]), mean(rewards[-3:])
    assert last > 0.3 and last > 3 * first, rewards


@pytest.mark.slow
@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "stable_reinforce"])
def test_rl_loop_long(platform, model: str, tmp_path: Path, loss_fn: str) -> None:
    rewards = run_rl(platform, model, tmp_path, loss_fn, steps=40)
    # Some runs settle on one answer short of all digits (e.g. 0.75): a collapsed group has no
    # advantage left to learn from, so ask for a clear gain, not for the maximum.
    assert mean(rewards[-5:]) > 0.6 and mean(rewards[-5:]) > 5 * mean(rewards[:5]), rewards


# ---------------------------------------------------------------- DPO


def write_pairs(path: Path, n: int) -> Path:
    """Pairs whose preferred answer is always the same polite sentence, on either side."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            topic = rng.choice(["cats", "dogs", "rain", "tea", "trains"])
            good = [{"role": "assistant", "content": "Yes, gladly."}]
            bad = [{"role": "assistant", "content": "No."}]
            good_first = rng.random() < 0.5
            comparison = {
                "prompt_conversation": [{"role": "user", "content": f"Tell me about {topic}."}],
                "completion_A": good if good_first else bad,
                "completion_B": bad if good_first else good,
            }
            f.write(json.dumps({"comparison": comparison, "label": "A" if good_first else "B"}))
            f.write("\n")
    return path


def run_dpo(platform, model: str, tmp_path: Path, pairs: int, epochs: int) -> Path:
    config = train_dpo.Config(
        log_path=str(tmp_path / "run"),
        model_name=model,
        recipe_name="whetstone_e2e",
        renderer_name=RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            comparison_builder=ComparisonBuilderFromJsonl(
                train_path=str(write_pairs(tmp_path / "pairs.jsonl", pairs))
            ),
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=model,
                renderer_name=RENDERER,
                max_length=128,
                batch_size=8,
            ),
        ),
        learning_rate=5e-3,
        num_epochs=epochs,
        dpo_beta=0.1,
        lora_rank=16,
        save_every=0,
        eval_every=0,
        base_url=platform.base_url,
    )
    train_dpo.main(config)
    return tmp_path / "run"


def test_dpo_loop_prefers_the_chosen_answers(platform, model: str, tmp_path: Path) -> None:
    run = run_dpo(platform, model, tmp_path, pairs=64, epochs=1)
    losses, margins = logged(run, "dpo_loss"), logged(run, "margin")
    assert len(losses) == 8
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference
    assert losses[-1] < 0.2 and margins[-1] > 1.0, (losses, margins)
    assert logged(run, "accuracy")[-1] == 1.0


@pytest.mark.slow
def test_dpo_loop_long(platform, model: str, tmp_path: Path) -> None:
    run = run_dpo(platform, model, tmp_path, pairs=256, epochs=2)
    assert logged(run, "dpo_loss")[-1] < 0.01
