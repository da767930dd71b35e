"""Reinforcement learning with a reward function you write, with the Tinker SDK.

The reward is any Python callable ``reward(prompt: str, answer: str) -> float``. Name one with
``--reward module:function`` (a module on the path, or a ``.py`` file), or keep the default,
:func:`shouting`, which pays for the share of the answer's letters that are capitals. Each step
samples a group of answers per prompt, scores them with the callable, centres the rewards within
each group (the group's mean is the baseline) and applies one ``importance_sampling`` update.
Run it against a running platform:

    whetstone up &                      # prints the base URL and an API key
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-... \\
        python examples/rl_custom_reward.py --reward my_rewards.py:politeness

The built-in model has random weights; a reward it can learn within minutes on a CPU is one that
some of its tokens already satisfy now and then, as capital letters do.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import random
import time
from collections.abc import Callable
from pathlib import Path

import tinker
from tinker import types

Reward = Callable[[str, str], float]

PROMPTS = [
    "Tell me about the sea.",
    "What did you do today?",
    "Describe a city at night.",
    "Say something about trains.",
    "How do you make tea?",
    "What is your favourite season?",
]


def shouting(prompt: str, answer: str) -> float:
    """The default reward: the share of the answer's letters that are upper case."""
    letters = [ch for ch in answer if ch.isalpha()]
    return sum(ch.isupper() for ch in letters) / len(letters) if letters else 0.0


def load_reward(spec: str) -> Reward:
    """``module:function`` or ``path/to/file.py:function``."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise SystemExit(f"--reward wants module:function, got {spec!r}")
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if module_spec is None or module_spec.loader is None:
            raise SystemExit(f"cannot load {where}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    reward = getattr(module, name)
    if not callable(reward):
        raise SystemExit(f"{spec} is not callable")
    return reward


def chat_prompt(tokenizer, text: str) -> types.ModelInput:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return types.ModelInput.from_ints(tokenizer.encode(chat, add_special_tokens=False))


def rollout_datum(
    prompt: types.ModelInput, sequence: types.SampledSequence, advantage: float
) -> types.Datum:
    """Prompt plus sampled answer; only the answer's positions carry an advantage."""
    tokens, logprobs = sequence.tokens, sequence.logprobs
    assert logprobs is not None
    prompt_targets = prompt.length - 1
    return types.Datum(
        model_input=prompt.append(types.EncodedTextChunk(tokens=tokens[:-1])),
        loss_fn_inputs={
            "target_tokens": [0] * prompt_targets + tokens,
            "logprobs": [0.0] * prompt_targets + logprobs,
            "advantages": [0.0] * prompt_targets + [advantage] * len(tokens),
        },
    )


def train(service: tinker.ServiceClient, reward: Reward, args: argparse.Namespace) -> list[float]:
    """Run the loop; returns the mean reward of each step."""
    training = service.create_lora_training_client(
        base_model=args.base_model, rank=args.rank, seed=args.seed
    ).result()
    tokenizer = training.get_tokenizer()
    rng = random.Random(args.seed)
    adam = types.AdamParams(learning_rate=args.learning_rate)
    name = getattr(reward, "__name__", repr(reward))
    print(f"training run {training.model_id}: reward {name}, {args.steps} steps")
    history, start = [], time.monotonic()
    for step in range(args.steps):
        sampler = training.save_weights_and_get_sampling_client().result()
        texts = rng.sample(PROMPTS, args.prompts)
        prompts = [chat_prompt(tokenizer, text) for text in texts]
        futures = [
            sampler.sample(
                prompt,
                num_samples=args.group_size,
                sampling_params=types.SamplingParams(
                    max_tokens=args.max_tokens,
                    stop=["<|im_end|>"],
                    seed=args.seed * 100_003 + step * 101 + i,
                ),
            )
            for i, prompt in enumerate(prompts)
        ]
        data, rewards = [], []
        for text, prompt, future in zip(texts, prompts, futures, strict=True):
            group = future.result().sequences
            answers = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in group]
            scores = [float(reward(text, answer)) for answer in answers]
            baseline = sum(scores) / len(scores)
            rewards += scores
            data += [
                rollout_datum(prompt, s, r - baseline)
                for s, r in zip(group, scores, strict=True)
                if r != baseline
            ]
        if data:
            fwd_bwd = training.forward_backward(data, "importance_sampling")
            optim = training.optim_step(adam)
            fwd_bwd.result()
            optim.result()
        history.append(sum(rewards) / len(rewards))
        print(
            f"step {step:3d}  reward {history[-1]:.3f}  e.g. {answers[0]!r}"
            f"  ({time.monotonic() - start:.1f} s)",
            flush=True,
        )
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", help="module:function (default: shouting, defined here)")
    parser.add_argument("--base-model", default="whetstone/tiny-qwen3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="answers sampled per prompt")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reward = load_reward(args.reward) if args.reward else shouting
    with tinker.ServiceClient() as service:  # TINKER_BASE_URL and TINKER_API_KEY from the env
        history = train(service, reward, args)
    k = max(1, len(history) // 4)
    print(
        f"\nmean reward: first {k} steps {sum(history[:k]) / k:.3f}, "
        f"last {k} steps {sum(history[-k:]) / k:.3f}"
    )


if __name__ == "__main__":
    main()
