"""GRPO-style reinforcement learning on generated arithmetic problems, with the Tinker SDK.

Each step samples a group of answers per problem from the current weights, scores every answer
with a verifier, turns the rewards into group-relative advantages (reward minus the group's mean)
and applies one ``importance_sampling`` update. Every call is billed per token (prefill and
sampled tokens of the rollouts, trained tokens of the updates); at the end the script asks the
platform what the run cost. Run it against a running platform:

    whetstone up &                      # prints the base URL and an API key
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-... python examples/grpo_math.py

The reward is the verifier's verdict (1 when the answer is exactly the sum) plus a small format
credit: the share of the answer's characters that are digits ("answer with the number only").
The built-in model has random weights, so what it learns within a few minutes on a CPU is the
format, and the mean reward rises with it; accuracy needs a pretrained model (name one with
``--base-model``) and more steps.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time

import httpx
import tinker
from tinker import types

FORMAT_WEIGHT = 0.2


def make_problem(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"What is {a} + {b}? Answer with the number only.", a + b


def verify(answer_text: str, expected: int) -> tuple[float, float]:
    """(correct, format): correct is 1.0 when the answer is exactly the expected number."""
    text = answer_text.strip()
    correct = 1.0 if re.fullmatch(r"\d+", text) and int(text) == expected else 0.0
    digits = sum(ch.isdigit() for ch in text) / len(text) if text else 0.0
    return correct, digits


def chat_prompt(tokenizer, question: str) -> types.ModelInput:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return types.ModelInput.from_ints(tokenizer.encode(text, add_special_tokens=False))


def rollout_datum(
    prompt: types.ModelInput, sequence: types.SampledSequence, advantage: float
) -> types.Datum:
    """The prompt and the sampled answer as one training datum: the loss reads only the sampled
    positions (advantage 0 elsewhere), against the sampler's own logprobs."""
    tokens, logprobs = sequence.tokens, sequence.logprobs
    assert logprobs is not None
    prompt_targets = prompt.length - 1  # targets of the prompt's own positions
    return types.Datum(
        model_input=prompt.append(types.EncodedTextChunk(tokens=tokens[:-1])),
        loss_fn_inputs={
            "target_tokens": [0] * prompt_targets + tokens,
            "logprobs": [0.0] * prompt_targets + logprobs,
            "advantages": [0.0] * prompt_targets + [advantage] * len(tokens),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="whetstone/tiny-qwen3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--problems", type=int, default=4, help="problems per step")
    parser.add_argument("--group-size", type=int, default=8, help="answers sampled per problem")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=2e-2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tinker.ServiceClient() as service:  # TINKER_BASE_URL and TINKER_API_KEY from the env
        run_id = train(service, args)
    print_cost(run_id)


def train(service: tinker.ServiceClient, args: argparse.Namespace) -> str:
    training = service.create_lora_training_client(
        base_model=args.base_model, rank=args.rank, seed=args.seed
    ).result()
    tokenizer = training.get_tokenizer()
    rng = random.Random(args.seed)
    adam = types.AdamParams(learning_rate=args.learning_rate)
    print(
        f"training run {training.model_id}: {args.steps} steps x {args.problems} problems x "
        f"{args.group_size} samples"
    )
    start = time.monotonic()
    for step in range(args.steps):
        # Sample from the current weights (a new sampler version per step: on-policy).
        sampler = training.save_weights_and_get_sampling_client().result()
        problems = [make_problem(rng) for _ in range(args.problems)]
        prompts = [chat_prompt(tokenizer, question) for question, _ in problems]
        futures = [
            sampler.sample(
                prompt,
                num_samples=args.group_size,
                sampling_params=types.SamplingParams(
                    max_tokens=args.max_tokens,
                    temperature=1.0,
                    stop=["<|im_end|>"],
                    seed=args.seed * 100_003 + step * 101 + i,
                ),
            )
            for i, prompt in enumerate(prompts)
        ]
        data, rewards, correct, formats = [], [], [], []
        for prompt, (_, expected), future in zip(prompts, problems, futures, strict=True):
            group = future.result().sequences
            scores = [
                verify(tokenizer.decode(s.tokens, skip_special_tokens=True), expected)
                for s in group
            ]
            group_rewards = [c + FORMAT_WEIGHT * f for c, f in scores]
            baseline = sum(group_rewards) / len(group_rewards)
            rewards += group_rewards
            correct += [c for c, _ in scores]
            formats += [f for _, f in scores]
            if all(r == baseline for r in group_rewards):
                continue  # the group agrees: nothing to learn from it
            data += [
                rollout_datum(prompt, s, r - baseline)
                for s, r in zip(group, group_rewards, strict=True)
            ]
        if data:
            fwd_bwd = training.forward_backward(data, "importance_sampling")
            optim = training.optim_step(adam)
            fwd_bwd.result()
            optim.result()
        print(
            f"step {step:3d}  reward {sum(rewards) / len(rewards):.3f}  "
            f"accuracy {sum(correct) / len(correct):.3f}  format {sum(formats) / len(formats):.3f}"
            f"  ({time.monotonic() - start:.1f} s)",
            flush=True,
        )
    return training.model_id


def print_cost(run_id: str, wait_s: float = 30.0) -> None:
    """The tokens and cost per meter of the whole job (the session: the run's updates and every
    rollout's sampling) and of the training run alone, from the platform's billing routes.
    Billing ingests usage a few seconds behind the work, so wait until the figures settle."""
    session_id = run_id.split(":train:")[0]  # the SDK's own model id scheme
    base_url = os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000")
    headers = {"X-API-Key": os.environ["TINKER_API_KEY"]}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        deadline, previous = time.monotonic() + wait_s, None
        while True:
            report = http.get("/billing/usage", params={"session": session_id, "group_by": "meter"})
            report.raise_for_status()
            rows = {row["meter"]: row for row in report.json()["rows"]}
            settled = rows == previous and {"train_tokens", "sample_tokens"} <= rows.keys()
            if settled or time.monotonic() > deadline:
                break
            previous = rows
            time.sleep(2.0)
        run_cost = http.get(f"/billing/runs/{run_id}/cost")
        run_cost.raise_for_status()
    print(f"\nbilled to session {session_id} (rollouts and updates):")
    for meter, row in sorted(rows.items()):
        print(f"  {meter:16s} {row['tokens']:>10,d}  ${row['cost_usd']}")
    print(f"  {'total':16s} {'':>10s}  ${report.json()['total_cost_usd']}")
    cost = run_cost.json()
    print(f"of which training run {run_id}: {cost['tokens']:,d} tokens, ${cost['cost_usd']}")


if __name__ == "__main__":
    main()
