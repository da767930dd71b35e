"""Direct Preference Optimization (DPO) with the Tinker SDK's custom-loss call.

Each pair is one question with a preferred and a rejected answer (here: the right capital of a
country and a wrong one). The reference model is the starting weights, frozen in a sampling
client whose ``compute_logprobs`` scores every answer once. Each step sends the pairs to
``forward_backward_custom`` with the DPO loss

    loss = -log sigmoid(beta * ((log p(chosen) - log p_ref(chosen))
                                - (log p(rejected) - log p_ref(rejected))))

computed here, on the client, from the logprobs the server returns (the SDK turns its gradient
into a weighted cross-entropy the server applies). Run it against a running platform:

    whetstone up &                      # prints the base URL and an API key
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-... python examples/dpo.py

The loss starts at log 2 (the policy is the reference) and falls; the preference accuracy rises.
"""

from __future__ import annotations

import argparse
import random
import time

import tinker
import torch
import torch.nn.functional as F
from sft import make_datum  # the chat-formatted datum, trained on the answer only
from tinker import types

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Peru": "Lima",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Italy": "Rome",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
}
QUESTIONS = ["What is the capital of {c}?", "Name the capital of {c}.", "Capital of {c}?"]


def make_pairs(seed: int) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected): the right capital against another country's."""
    rng = random.Random(seed)
    pairs = []
    for country, city in CAPITALS.items():
        for question in QUESTIONS:
            wrong = rng.choice([c for c in CAPITALS.values() if c != city])
            pairs.append(
                (
                    question.format(c=country),
                    f"The capital of {country} is {city}.",
                    f"The capital of {country} is {wrong}.",
                )
            )
    rng.shuffle(pairs)
    return pairs


def reference_logprobs(reference: tinker.SamplingClient, data: list[types.Datum]) -> list[float]:
    """log p_ref(answer | question) of each datum: the reference's logprobs of the answer's
    tokens, summed. Every request is submitted before the first is waited on."""
    futures = [
        reference.compute_logprobs(
            types.ModelInput.from_ints(
                [*d.model_input.to_ints(), d.loss_fn_inputs["target_tokens"].tolist()[-1]]
            )
        )
        for d in data
    ]
    sums = []
    for d, future in zip(data, futures, strict=True):
        logprobs = future.result()[1:]  # the first token has none; the rest align with targets
        weights = d.loss_fn_inputs["weights"].tolist()
        sums.append(sum(w * lp for w, lp in zip(weights, logprobs, strict=True) if w))
    return sums


def dpo_loss(reference_logprobs: list[float], beta: float):
    """The custom loss over a batch laid out chosen, rejected, chosen, rejected, ..."""

    def loss_fn(data: list[types.Datum], logprobs: list[torch.Tensor]):
        weights = [d.loss_fn_inputs["weights"].to_torch() for d in data]
        summed = torch.stack([(lp * w).sum() for lp, w in zip(logprobs, weights, strict=True)])
        ref = torch.tensor(reference_logprobs)
        log_ratio = summed - ref
        margin = beta * (log_ratio[0::2] - log_ratio[1::2])
        loss = -F.logsigmoid(margin).mean()
        metrics = {
            "dpo_loss": loss.item(),
            "accuracy": (margin > 0).float().mean().item(),
            "margin": margin.mean().item(),
        }
        return loss, metrics

    return loss_fn


def evaluate(
    training: tinker.TrainingClient, data: list[types.Datum], ref_logprobs: list[float], beta: float
) -> tuple[float, float]:
    """Preference accuracy and mean margin over every pair, from the current weights."""
    outputs = training.forward(data, "cross_entropy").result().loss_fn_outputs
    summed = [
        (d.loss_fn_inputs["weights"].to_torch() * out["logprobs"].to_torch()).sum().item()
        for d, out in zip(data, outputs, strict=True)
    ]
    margins = [
        beta * ((summed[i] - ref_logprobs[i]) - (summed[i + 1] - ref_logprobs[i + 1]))
        for i in range(0, len(data), 2)
    ]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="whetstone/tiny-qwen3")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tinker.ServiceClient() as service:  # TINKER_BASE_URL and TINKER_API_KEY from the env
        train(service, args)


def train(service: tinker.ServiceClient, args: argparse.Namespace) -> None:
    training = service.create_lora_training_client(
        base_model=args.base_model, rank=args.rank, seed=args.seed
    ).result()
    tokenizer = training.get_tokenizer()
    pairs = make_pairs(args.seed)
    data = [
        make_datum(tokenizer, question, answer)
        for question, chosen, rejected in pairs
        for answer in (chosen, rejected)
    ]
    # The reference: the starting weights, frozen; each answer is scored once.
    reference = training.save_weights_and_get_sampling_client().result()
    ref_logprobs = reference_logprobs(reference, data)
    print(f"training run {training.model_id}: {len(pairs)} preference pairs, beta {args.beta}")

    adam = types.AdamParams(learning_rate=args.learning_rate)
    batch = 2 * args.pairs_per_step
    start = time.monotonic()
    for step in range(args.steps):
        lo = (step * batch) % len(data)
        idx = [(lo + i) % len(data) for i in range(batch)]
        loss_fn = dpo_loss([ref_logprobs[i] for i in idx], args.beta)
        fwd_bwd = training.forward_backward_custom([data[i] for i in idx], loss_fn)
        optim = training.optim_step(adam)
        metrics = fwd_bwd.result().metrics
        optim.result()
        print(
            f"step {step:3d}  dpo_loss {metrics['dpo_loss']:.4f}  "
            f"accuracy {metrics['accuracy']:.3f}  margin {metrics['margin']:.3f}"
            f"  ({time.monotonic() - start:.1f} s)",
            flush=True,
        )
    accuracy, margin = evaluate(training, data, ref_logprobs, args.beta)
    print(f"\nall {len(pairs)} pairs: preference accuracy {accuracy:.3f}, mean margin {margin:.3f}")


if __name__ == "__main__":
    main()
