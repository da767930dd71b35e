"""Resuming a training run from a saved state, with the Tinker SDK.

Trains a LoRA adapter for a few supervised steps, saves its state (weights and Adam moments)
with ``save_state``, then starts a *new* training client from that checkpoint with
``create_training_client_from_state_with_optimizer`` (as a restarted job would) and carries on.
The resumed client's loss on the same batch equals the saved one, far below the fresh model's,
and keeps falling from there. ``load_state`` does the same into an existing client, and
``create_training_client_from_state`` loads the weights with a fresh optimizer. Run it against a
running platform:

    whetstone up &                      # prints the base URL and an API key
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-... python examples/resume.py
"""

from __future__ import annotations

import argparse
import random

import tinker
from sft import make_datum  # the chat-formatted datum, trained on the answer only
from tinker import types

FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("What colour is snow?", "Snow is white."),
    ("What colour is coal?", "Coal is black."),
    ("What colour is a lemon?", "A lemon is yellow."),
    ("What colour is a tomato?", "A tomato is red."),
]


def loss_per_token(training: tinker.TrainingClient, batch: list[types.Datum]) -> float:
    """The batch's loss under the client's current weights (a forward: no update)."""
    loss = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    return loss / sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)


def train_steps(
    training: tinker.TrainingClient,
    batch: list[types.Datum],
    adam: types.AdamParams,
    steps: int,
    first: int,
) -> None:
    n_target = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
    for step in range(first, first + steps):
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(adam)
        loss = fwd_bwd.result().metrics["loss:sum"] / n_target
        optim.result()
        print(f"  step {step:3d}  loss/token {loss:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="whetstone/tiny-qwen3")
    parser.add_argument("--steps-before", type=int, default=8)
    parser.add_argument("--steps-after", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    adam = types.AdamParams(learning_rate=args.learning_rate)
    with tinker.ServiceClient() as service:  # TINKER_BASE_URL and TINKER_API_KEY from the env
        training = service.create_lora_training_client(
            base_model=args.base_model, rank=args.rank, seed=args.seed
        ).result()
        tokenizer = training.get_tokenizer()
        batch = [make_datum(tokenizer, q, a) for q, a in FACTS]
        random.Random(args.seed).shuffle(batch)

        fresh = loss_per_token(training, batch)
        print(f"training run {training.model_id}: fresh loss/token {fresh:.4f}")
        train_steps(training, batch, adam, args.steps_before, first=0)
        saved_loss = loss_per_token(training, batch)
        state = training.save_state("resume-example").result()
        print(f"saved state {state.path} at loss/token {saved_loss:.4f}")

        # A new client, as a restarted job would make: weights and optimizer from the checkpoint.
        resumed = service.create_training_client_from_state_with_optimizer(state.path).result()
        resumed_loss = loss_per_token(resumed, batch)
        print(f"resumed as run {resumed.model_id} at loss/token {resumed_loss:.4f}")
        train_steps(resumed, batch, adam, args.steps_after, first=args.steps_before)
        final = loss_per_token(resumed, batch)
    print(
        f"\nloss/token: fresh {fresh:.4f}, saved {saved_loss:.4f}, resumed {resumed_loss:.4f}, "
        f"final {final:.4f}"
    )


if __name__ == "__main__":
    main()
