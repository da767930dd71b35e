"""Supervised fine-tuning with the unmodified Tinker SDK against Whetstone.

Teaches the built-in model a small question-answering task (1,000 chat examples: the capital of
each of 10 countries, asked 100 ways), then samples from the fine-tuned weights and scores a
prompt with ``compute_logprobs``. Run it against a running platform:

    whetstone up &                      # prints the base URL and an API key
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-... python examples/sft.py

Nothing here is Whetstone-specific: the same script runs against any Tinker service.
"""

from __future__ import annotations

import argparse
import random
import time

import tinker
from tinker import types

BASE_MODEL = "whetstone/tiny-qwen3"

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Peru": "Lima",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Italy": "Rome",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "India": "New Delhi",
    "Chile": "Santiago",
}
PREFIXES = ["", "Hi! ", "Quick question: ", "Please help me. "]
QUESTIONS = [
    "What is the capital of {c}?",
    "Name the capital city of {c}.",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "{c}: what is its capital?",
    "What city serves as the capital of {c}?",
    "Capital of {c}?",
    "Do you know the capital of {c}?",
    "Where is the seat of government of {c}?",
    "Which city is {c}'s capital?",
    "I need the capital of {c}.",
    "What's the capital of {c}?",
    "Give the capital of {c}.",
    "The capital of {c} is which city?",
    "Please name {c}'s capital.",
    "In {c}, which city is the capital?",
    "Quick question: capital of {c}?",
    "What is {c}'s capital city?",
    "Can you tell me the capital of {c}?",
    "Identify the capital of {c}.",
    "Which is the capital of {c}?",
    "What do we call the capital of {c}?",
    "Say the capital of {c}.",
    "Recall the capital of {c}.",
    "Answer with the capital of {c}.",
]


def make_examples() -> list[tuple[str, str]]:
    examples = [
        (p + q.format(c=c), f"The capital of {c} is {city}.")
        for c, city in CAPITALS.items()
        for q in QUESTIONS
        for p in PREFIXES
    ]
    random.Random(0).shuffle(examples)
    return examples  # 10 countries x 25 questions x 4 openings = 1,000


def make_datum(tokenizer, question: str, answer: str) -> types.Datum:
    """Chat-format the pair; train only on the assistant's answer (and its end-of-turn token)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt_tokens = tokenizer.encode(prompt, add_special_tokens=False)
    answer_tokens = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    tokens = prompt_tokens + answer_tokens
    weights = [0.0] * len(prompt_tokens) + [1.0] * len(answer_tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()

    # TINKER_BASE_URL and TINKER_API_KEY come from the environment; leaving the block closes the
    # session.
    with tinker.ServiceClient() as service:
        train_and_sample(service, args)


def train_and_sample(service: tinker.ServiceClient, args: argparse.Namespace) -> None:
    training = service.create_lora_training_client(
        base_model=BASE_MODEL, rank=args.rank, seed=0
    ).result()
    tokenizer = training.get_tokenizer()
    data = [make_datum(tokenizer, q, a) for q, a in make_examples()]
    print(
        f"training run {training.model_id}: {len(data)} examples, batch {args.batch_size}, "
        f"{args.epochs} epochs"
    )

    adam = types.AdamParams(learning_rate=args.learning_rate)
    step, start = 0, time.monotonic()
    for epoch in range(args.epochs):
        for i in range(0, len(data), args.batch_size):
            batch = data[i : i + args.batch_size]
            # Submit both before waiting: the server runs them in order, the client does not idle.
            fwd_bwd = training.forward_backward(batch, "cross_entropy")
            optim = training.optim_step(adam)
            result = fwd_bwd.result()
            optim.result()
            n_target = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
            step += 1
            if step % 5 == 1:
                loss_per_token = result.metrics["loss:sum"] / n_target
                print(
                    f"epoch {epoch} step {step:3d}  loss/token {loss_per_token:.4f}"
                    f"  ({time.monotonic() - start:.1f} s)",
                    flush=True,
                )

    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=24, temperature=0.0, stop=["<|im_end|>"])
    print("\nsamples from the fine-tuned model:")
    for country in ("France", "Japan", "Peru"):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is the capital of {country}?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        prompt_input = types.ModelInput.from_ints(
            tokenizer.encode(prompt, add_special_tokens=False)
        )
        out = sampler.sample(prompt_input, num_samples=1, sampling_params=params).result()
        print(
            f"  {country}: {tokenizer.decode(out.sequences[0].tokens, skip_special_tokens=True)!r}"
        )
    scored = tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(scored)).result()
    log_p = sum(lp for lp in logprobs if lp is not None)
    print(f"\nlog p('The capital of France is Paris.') = {log_p:.2f}")


if __name__ == "__main__":
    main()
