"""TrainerEngine on a tiny random Qwen3 (CPU, float32): logprobs, every loss's outputs, metrics
and gradients, the chunked unembedding, AdamW, runs, checkpoints and the PEFT export, all checked
against independent references (a float64 AdamW and the losses' float64 reference written in
``test_trainer_losses``)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from services.trainer.engine import TrainerEngine, micro_batches, num_tokens, pack_requests
from tests.unit.test_trainer_losses import reference
from whetstone.errors import Conflict, NotFound, UserError
from whetstone.messages import AdamParams, Datum, ForwardBackward, LoraConfig
from whetstone.tensors import Tensor
from whetstone_ml.lora import LoraAdapter

VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 with seeded random weights; small enough that every test loads its own
    engine."""
    config = Qwen3Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=128,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = Qwen3ForCausalLM(config).float()
    path = tmp_path_factory.mktemp("tiny-qwen3")
    model.save_pretrained(path)
    return path


@pytest.fixture
def engine(model_dir: Path) -> TrainerEngine:
    return TrainerEngine(model_dir)


def base_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def sequences(count: int, seed: int, lengths: tuple[int, int] = (5, 12)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def sft_datum(seq: list[int], weights: list[float] | None = None) -> Datum:
    """``model_input = seq[:-1]`` predicts ``target_tokens = seq[1:]``."""
    inputs = {"target_tokens": Tensor.from_list(seq[1:], "int64")}
    if weights is not None:
        inputs["weights"] = Tensor.from_list(weights, "float32")
    return Datum(model_input=Tensor.from_list(seq[:-1], "int64"), loss_fn_inputs=inputs)


def ce(datums: list[Datum], forward_only: bool = False) -> ForwardBackward:
    return ForwardBackward(data=datums, loss_fn="cross_entropy", forward_only=forward_only)


def mixed_weights_data(seed: int) -> list[Datum]:
    rng = random.Random(seed)
    return [
        sft_datum(s, [rng.choice([0.0, 0.5, 1.0, -0.3]) for _ in s[1:]]) for s in sequences(3, seed)
    ]


def params(engine: TrainerEngine, run_id: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.runs[run_id].adapter.parameters()]


def grads(engine: TrainerEngine, run_id: str) -> list[torch.Tensor | None]:
    return [
        None if p.grad is None else p.grad.clone() for p in engine.runs[run_id].adapter.parameters()
    ]


def assert_all_close(xs: list[torch.Tensor], ys: list[torch.Tensor], **tol: float) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, **tol)


ADAM = AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
IDS = torch.tensor([[5, 17, 42, 7, 99, 250, 3, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


# ---------------------------------------------------------------- forward: logprobs


def test_fresh_adapter_leaves_base_logits(engine: TrainerEngine, model_dir: Path) -> None:
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    with torch.no_grad():
        reference = base_model(model_dir)(input_ids=IDS).logits
    torch.testing.assert_close(engine.forward_logits("r", IDS), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(engine.forward_logits(None, IDS), reference, atol=1e-6, rtol=0)


def test_cross_entropy_logprobs_match_float64_reference(
    engine: TrainerEngine, model_dir: Path
) -> None:
    """Different lengths in one padded batch; each datum checked against its own unpadded pass."""
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    data = mixed_weights_data(seed=3)
    result = engine.forward_backward("r", ce(data, forward_only=True))
    model = base_model(model_dir)
    expected_total = 0.0
    for datum, out in zip(data, result.outputs, strict=True):
        tokens = torch.from_numpy(datum.model_input.to_numpy().copy())[None]
        targets = torch.from_numpy(datum.loss_fn_inputs["target_tokens"].to_numpy().copy())
        weights = torch.from_numpy(datum.loss_fn_inputs["weights"].to_numpy().copy()).double()
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        got = torch.from_numpy(out["logprobs"].to_numpy().copy())
        assert out["logprobs"].dtype == "float32" and out["logprobs"].shape == tuple(targets.shape)
        torch.testing.assert_close(got.double(), lp, atol=1e-5, rtol=0)
        elementwise = torch.from_numpy(out["elementwise_loss"].to_numpy().copy()).double()
        torch.testing.assert_close(elementwise, -lp * weights, atol=1e-5, rtol=0)
        expected_total += float((-lp * weights).sum())
    assert result.metrics["loss:sum"] == pytest.approx(expected_total, abs=1e-4)
    assert all(key.count(":") == 1 for key in result.metrics)


def test_two_dimensional_targets(engine: TrainerEngine) -> None:
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    seq = [5, 17, 42, 7, 99]
    targets = [[t, (t + 1) % VOCAB] for t in seq[1:]]
    datum = Datum(
        model_input=Tensor.from_list(seq[:-1], "int64"),
        loss_fn_inputs={
            "target_tokens": Tensor.from_numpy(torch.tensor(targets).numpy()),
            "weights": Tensor.from_numpy(torch.full((4, 2), 0.5).numpy()),
        },
    )
    result = engine.forward_backward("r", ce([datum]))
    lp = torch.from_numpy(result.outputs[0]["logprobs"].to_numpy().copy())
    assert lp.shape == (4, 2)
    logits = engine.forward_logits("r", torch.tensor([seq[:-1]]))[0]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets))
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)
    assert result.metrics["loss:sum"] == pytest.approx(float(-0.5 * expected.sum()), abs=1e-4)


# ---------------------------------------------------------------- RL losses end to end

RL_CONFIGS: dict[str, dict[str, float]] = {
    "importance_sampling": {},
    "ppo": {},
    "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "dro": {"beta": 0.2},
    "gspo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05},
    "stable_reinforce": {"kl_coeff": 0.1, "clip_high_threshold": 1.2},
}


def rl_data(engine: TrainerEngine, run_id: str, seed: int) -> list[tuple[Datum, dict]]:
    """Cookbook-shaped datums: a prompt (targets 0, q 0, A 0) then sampled tokens whose sampler
    logprobs are the learner's plus noise; with each datum's raw lists for the reference."""
    rng = random.Random(seed)
    seqs = sequences(3, seed, lengths=(8, 12))
    probe = engine.forward_backward(run_id, ce([sft_datum(q) for q in seqs], forward_only=True))
    out = []
    for seq, result in zip(seqs, probe.outputs, strict=True):
        lp = result["logprobs"].to_numpy().tolist()
        prompt = rng.randint(2, 4)
        q = [0.0] * prompt + [x + rng.gauss(0.0, 0.3) for x in lp[prompt:]]
        a = [0.0] * prompt + [rng.choice([-1.0, 0.5, 1.0, 2.0])] * (len(lp) - prompt)
        mask = [0.0] * prompt + [1.0] * (len(lp) - prompt)
        targets = [0] * prompt + seq[1 + prompt :]
        inputs = {
            "target_tokens": Tensor.from_list(targets, "int64"),
            "logprobs": Tensor.from_list(q, "float32"),
            "advantages": Tensor.from_list(a, "float32"),
            "sequence_ratio_mask": Tensor.from_list(mask, "float32"),
        }
        datum = Datum(model_input=Tensor.from_list(seq[:-1], "int64"), loss_fn_inputs=inputs)
        out.append((datum, {"q": q, "a": a, "mask": mask, "targets": targets}))
    return out


@pytest.mark.parametrize("loss_fn", list(RL_CONFIGS))
def test_rl_losses_match_reference_and_their_gradient(engine: TrainerEngine, loss_fn: str) -> None:
    """Outputs, ``loss:sum`` and counts against the float64 reference at the engine's logprobs;
    the parameter gradient against cross-entropy with weights = -dL/dlp (the custom-loss
    identity), on an adapter trained one step so that every factor has a gradient."""
    for run_id in ("rl", "ce"):
        engine.create_run(run_id, LoraConfig(rank=4, seed=3))
        train_a_little(engine, run_id, steps=1)
    pairs = rl_data(engine, "rl", seed=8)
    data, raw = [d for d, _ in pairs], [r for _, r in pairs]
    config = RL_CONFIGS[loss_fn]
    cmd = ForwardBackward(data=data, loss_fn=loss_fn, loss_fn_config=config)
    result = engine.forward_backward("rl", cmd)

    total, counts, weights = 0.0, {}, []
    learner = engine.forward_backward("ce", ce([_ce_twin(d) for d in data], forward_only=True))
    for out, r, twin in zip(result.outputs, raw, learner.outputs, strict=True):
        lp = out["logprobs"].to_numpy().tolist()
        assert out["logprobs"].dtype == "float32" and out["logprobs"].shape == (len(r["a"]),)
        assert out["logprobs"] == twin["logprobs"]  # the same pre-update logprobs as CE's
        mask = r["mask"] if loss_fn == "gspo" else None
        loss, grad, ref_counts = reference(loss_fn, lp, r["q"], r["a"], config, mask)
        elementwise = out["elementwise_loss"].to_numpy().tolist()
        assert elementwise == pytest.approx(loss, abs=1e-5, rel=1e-5)
        total += sum(loss)
        for k, v in ref_counts.items():
            counts[k] = counts.get(k, 0.0) + v
        weights.append([-g for g in grad])
    assert result.metrics["loss:sum"] == pytest.approx(total, abs=1e-4, rel=1e-5)
    assert set(result.metrics) == {"loss:sum"} | {f"{k}:sum" for k in counts}
    for k, v in counts.items():
        assert result.metrics[f"{k}:sum"] == pytest.approx(v, abs=1e-4)
    assert all(key.count(":") == 1 for key in result.metrics)

    surrogate = [_ce_twin(d, w) for d, w in zip(data, weights, strict=True)]
    engine.forward_backward("ce", ce(surrogate))
    assert any(bool(g.abs().max() > 0) for g in grads(engine, "rl"))
    assert_all_close(grads(engine, "rl"), grads(engine, "ce"), atol=1e-6, rtol=1e-4)

    # Nothing is computed across datums: one call equals the sum of one call per datum.
    parts = [
        engine.forward_backward("rl", cmd.model_copy(update={"data": [d], "forward_only": True}))
        for d in data
    ]
    joint = sum(p.metrics["loss:sum"] for p in parts)
    assert joint == pytest.approx(result.metrics["loss:sum"], abs=1e-4)


def _ce_twin(datum: Datum, weights: list[float] | None = None) -> Datum:
    """The datum as cross_entropy input: same tokens and targets, the given weights (or ones)."""
    targets = datum.loss_fn_inputs["target_tokens"]
    w = weights if weights is not None else [1.0] * targets.shape[0]
    inputs = {"target_tokens": targets, "weights": Tensor.from_list(w, "float32")}
    return Datum(model_input=datum.model_input, loss_fn_inputs=inputs)


def test_chunked_head_equals_one_block(engine: TrainerEngine) -> None:
    """Blocks of 3 tokens against the whole batch in one block, with the unembedding trained,
    and targets of mixed widths ((N,) and (N, 2)) in one request."""
    engine.create_run("small", LoraConfig(rank=4, seed=5, train_unembed=True))
    engine.create_run("whole", LoraConfig(rank=4, seed=5, train_unembed=True))
    train_a_little(engine, "small", steps=1)
    train_a_little(engine, "whole", steps=1)
    seq = [5, 17, 42, 7, 99, 12, 250]
    wide = Datum(
        model_input=Tensor.from_list(seq[:-1], "int64"),
        loss_fn_inputs={
            "target_tokens": Tensor.from_numpy(
                torch.tensor([[t, (t + 7) % VOCAB] for t in seq[1:]]).numpy()
            ),
            "weights": Tensor.from_numpy(torch.full((6, 2), 0.5).numpy()),
        },
    )
    data = [*mixed_weights_data(seed=6), wide]
    results = {}
    for run_id, chunk in (("small", 3), ("whole", 10_000)):
        engine.logprob_chunk_tokens = chunk
        results[run_id] = engine.forward_backward(run_id, ce(data))
    for a, b in zip(results["small"].outputs, results["whole"].outputs, strict=True):
        assert a["logprobs"].shape == b["logprobs"].shape
        torch.testing.assert_close(
            torch.from_numpy(a["logprobs"].to_numpy().copy()),
            torch.from_numpy(b["logprobs"].to_numpy().copy()),
            atol=1e-6,
            rtol=0,
        )
    assert results["small"].outputs[-1]["logprobs"].shape == (6, 2)
    assert results["small"].metrics["loss:sum"] == pytest.approx(
        results["whole"].metrics["loss:sum"], abs=1e-5
    )
    assert_all_close(grads(engine, "small"), grads(engine, "whole"), atol=1e-6, rtol=1e-5)
    assert "lm_head" in engine.runs["small"].adapter.factors


# ---------------------------------------------------------------- backward: accumulation


def test_forward_only_changes_nothing(engine: TrainerEngine) -> None:
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    data = mixed_weights_data(seed=4)
    before = params(engine, "r")
    probe = engine.forward_backward("r", ce(data, forward_only=True))
    assert all(g is None for g in grads(engine, "r"))
    trained = engine.forward_backward("r", ce(data))
    assert trained.metrics == probe.metrics
    accumulated = grads(engine, "r")
    engine.forward_backward("r", ce(data, forward_only=True))
    assert_all_close(grads(engine, "r"), accumulated, atol=0, rtol=0)
    assert_all_close(params(engine, "r"), before, atol=0, rtol=0)
    for a, b in zip(probe.outputs, trained.outputs, strict=True):
        assert a["logprobs"] == b["logprobs"]


def test_two_calls_then_step_equal_one_call_with_all_data(engine: TrainerEngine) -> None:
    """Gradients accumulate: split and joint runs (same seed) stay equal over two rounds."""
    engine.create_run("split", LoraConfig(rank=4, seed=7))
    engine.create_run("joint", LoraConfig(rank=4, seed=7))
    for round_ in range(2):
        first, second = mixed_weights_data(seed=10 + round_), mixed_weights_data(seed=20 + round_)
        loss_a = engine.forward_backward("split", ce(first)).metrics["loss:sum"]
        loss_b = engine.forward_backward("split", ce(second)).metrics["loss:sum"]
        loss_ab = engine.forward_backward("joint", ce(first + second)).metrics["loss:sum"]
        assert loss_a + loss_b == pytest.approx(loss_ab, abs=1e-4)
        assert_all_close(grads(engine, "split"), grads(engine, "joint"), atol=1e-6, rtol=1e-4)
        engine.optim_step("split", ADAM)
        engine.optim_step("joint", ADAM)
        assert_all_close(params(engine, "split"), params(engine, "joint"), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- optimizer


def adamw_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    adam: AdamParams,
    step: int,
) -> float:
    """One AdamW step in float64, in place, by the textbook: clip the gradient to
    ``grad_clip_norm`` by global norm, update both moments, decay the weights (decoupled), step
    by the bias-corrected moments. Returns the norm before clipping."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    scale = adam.grad_clip_norm / norm if 0 < adam.grad_clip_norm < norm else 1.0
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        g = g * scale
        m, v = moments[i]
        m = adam.beta1 * m + (1 - adam.beta1) * g
        v = adam.beta2 * v + (1 - adam.beta2) * g * g
        moments[i] = (m, v)
        m_hat = m / (1 - adam.beta1**step)
        v_hat = v / (1 - adam.beta2**step)
        p.mul_(1 - adam.learning_rate * adam.weight_decay)
        p.sub_(adam.learning_rate * m_hat / (v_hat.sqrt() + adam.eps))
    return norm


def test_optim_step_matches_float64_adamw(engine: TrainerEngine) -> None:
    """Every AdamParams field changes between steps: clipping on (and biting), off, on but not
    biting; weight decay on and off; betas, eps and learning rate."""
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    reference_params = [p.double() for p in params(engine, "r")]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in reference_params]
    steps = [
        AdamParams(
            learning_rate=1e-2,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            grad_clip_norm=1e-3,
        ),
        AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.99, eps=1e-6),
        AdamParams(
            learning_rate=5e-3, beta1=0.5, beta2=0.9, eps=1e-4, weight_decay=0.3, grad_clip_norm=1e6
        ),
        AdamParams(learning_rate=2e-2, beta1=0.0, beta2=0.0, eps=1e-12, grad_clip_norm=0.5),
    ]
    for i, adam in enumerate(steps, start=1):
        engine.forward_backward("r", ce(mixed_weights_data(seed=30 + i)))
        engine_grads = [g.double() for g in grads(engine, "r")]
        norm = adamw_reference(reference_params, engine_grads, moments, adam, step=i)
        metrics = engine.optim_step("r", adam).metrics
        assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-5)
        assert metrics["learning_rate:mean"] == adam.learning_rate
        assert all(key.count(":") == 1 for key in metrics)
        for got, want in zip(params(engine, "r"), reference_params, strict=True):
            torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
        assert all(g is None for g in grads(engine, "r"))
    assert engine.runs["r"].step == len(steps)
    # The runs moved: a test of a no-op optimizer would pass the comparisons above too.
    assert any(bool(f.b.abs().max() > 0) for f in engine.runs["r"].adapter.factors.values())


def test_training_lowers_the_loss(engine: TrainerEngine) -> None:
    engine.create_run("r", LoraConfig(rank=8, seed=1))
    data = [sft_datum(s) for s in sequences(2, seed=5, lengths=(10, 12))]
    losses = []
    for _ in range(20):
        losses.append(engine.forward_backward("r", ce(data)).metrics["loss:sum"])
        engine.optim_step("r", ADAM)
    final = engine.forward_backward("r", ce(data, forward_only=True)).metrics["loss:sum"]
    assert final < 0.5 * losses[0]
    assert losses[-1] < losses[10] < losses[0]


# ---------------------------------------------------------------- runs


def test_runs_are_independent(engine: TrainerEngine) -> None:
    engine.create_run("a", LoraConfig(rank=4, seed=1))
    engine.create_run("b", LoraConfig(rank=8, seed=2, train_unembed=False))
    base_logits = engine.forward_logits(None, IDS)
    engine.forward_backward("b", ce(mixed_weights_data(seed=1)))
    b_params, b_grads = params(engine, "b"), grads(engine, "b")
    for _ in range(3):
        engine.forward_backward("a", ce(mixed_weights_data(seed=2)))
        engine.optim_step("a", ADAM)
    assert_all_close(params(engine, "b"), b_params, atol=0, rtol=0)
    assert_all_close(grads(engine, "b"), b_grads, atol=0, rtol=0)
    torch.testing.assert_close(engine.forward_logits("b", IDS), base_logits, atol=1e-6, rtol=0)
    assert not torch.allclose(engine.forward_logits("a", IDS), base_logits, atol=1e-3)
    engine.drop_run("a")
    assert not engine.has_run("a") and engine.has_run("b")
    torch.testing.assert_close(engine.forward_logits(None, IDS), base_logits, atol=0, rtol=0)


def test_seed_is_honoured(engine: TrainerEngine) -> None:
    engine.create_run("x", LoraConfig(rank=4, seed=11))
    engine.create_run("y", LoraConfig(rank=4, seed=11))
    engine.create_run("z", LoraConfig(rank=4, seed=12))
    assert_all_close(params(engine, "x"), params(engine, "y"), atol=0, rtol=0)
    a_x = [f.a for f in engine.runs["x"].adapter.factors.values()]
    a_z = [f.a for f in engine.runs["z"].adapter.factors.values()]
    assert not any(torch.equal(p, q) for p, q in zip(a_x, a_z, strict=True))
    assert all(bool((f.b == 0).all()) for f in engine.runs["x"].adapter.factors.values())


def test_unseeded_run_leaves_global_rng_alone(engine: TrainerEngine) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    engine.create_run("r", LoraConfig(rank=4))
    torch.testing.assert_close(torch.rand(3), expected)
    assert engine.runs["r"].adapter.config.seed is not None


# ---------------------------------------------------------------- checkpoints


def train_a_little(engine: TrainerEngine, run_id: str, steps: int = 3) -> None:
    for i in range(steps):
        engine.forward_backward(run_id, ce(mixed_weights_data(seed=40 + i)))
        engine.optim_step(run_id, ADAM)


def test_save_sampler_is_a_peft_adapter(
    engine: TrainerEngine, model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    engine.create_run("r", LoraConfig(rank=4, seed=1))
    train_a_little(engine, "r")
    written = engine.save_sampler("r", tmp_path / "sampler")
    assert written == sum(p.stat().st_size for p in (tmp_path / "sampler").iterdir())
    peft_model = PeftModel.from_pretrained(base_model(model_dir), tmp_path / "sampler").eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=IDS).logits
    ours = engine.forward_logits("r", IDS)
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=0)
    assert not torch.allclose(ours, engine.forward_logits(None, IDS), atol=1e-3)  # not a no-op


def test_save_and_load_state_round_trip(
    engine: TrainerEngine, model_dir: Path, tmp_path: Path
) -> None:
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    train_a_little(engine, "r", steps=2)
    written = engine.save_state("r", tmp_path / "state")
    assert written == sum(p.stat().st_size for p in (tmp_path / "state").iterdir())

    other = TrainerEngine(model_dir)
    other.load_state("r", tmp_path / "state", with_optimizer=True)
    assert other.runs["r"].step == 2
    assert_all_close(params(other, "r"), params(engine, "r"), atol=0, rtol=0)
    # Same weights and same AdamW moments: the next step is identical.
    data = mixed_weights_data(seed=50)
    for e in (engine, other):
        e.forward_backward("r", ce(data))
        e.optim_step("r", ADAM)
    assert_all_close(params(other, "r"), params(engine, "r"), atol=1e-7, rtol=1e-6)

    # Weights only: into an existing run, fresh optimizer.
    engine.create_run("fresh", LoraConfig(rank=4, seed=99))
    engine.load_state("fresh", tmp_path / "state", with_optimizer=False)
    assert engine.runs["fresh"].step == 0 and not engine.runs["fresh"].optimizer.state
    saved = LoraAdapter.load_peft(tmp_path / "state")
    for name, f in engine.runs["fresh"].adapter.factors.items():
        assert torch.equal(f.a, saved.factors[name].a) and torch.equal(f.b, saved.factors[name].b)


def test_load_state_errors(engine: TrainerEngine, tmp_path: Path) -> None:
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    engine.save_sampler("r", tmp_path / "sampler")
    with pytest.raises(UserError, match="no optimizer state"):
        engine.load_state("r", tmp_path / "sampler", with_optimizer=True)
    with pytest.raises(UserError, match="no adapter checkpoint"):
        engine.load_state("r", tmp_path / "missing", with_optimizer=False)
    engine.create_run("r8", LoraConfig(rank=8, seed=1))
    with pytest.raises(UserError, match="rank 4, this run has rank 8"):
        engine.load_state("r8", tmp_path / "sampler", with_optimizer=False)
    engine.create_run("mlp", LoraConfig(rank=4, seed=1, train_attn=False))
    with pytest.raises(UserError, match="other modules"):
        engine.load_state("mlp", tmp_path / "sampler", with_optimizer=False)


# ---------------------------------------------------------------- validation and helpers


def test_bad_requests_raise_user_errors(model_dir: Path) -> None:
    engine = TrainerEngine(model_dir, context_length=16)
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    good = sft_datum([1, 2, 3, 4])

    def fails(cmd: ForwardBackward, match: str) -> None:
        with pytest.raises(UserError, match=match):
            engine.forward_backward("r", cmd)

    fails(
        ce([good, sft_datum([1, 2, VOCAB])]),
        r"datum 1: target_tokens: token ids must lie in \[0, 300\)",
    )
    fails(ce([sft_datum([1, -1, 3])]), "datum 0: model_input: token ids must lie")
    fails(ce([sft_datum(list(range(18)))]), "17 tokens exceed the context length 16")
    fails(ce([sft_datum([1, 2, 3], [1.0])]), "first dimension 1, expected 2")
    fails(ce([sft_datum([1, 2, 3], [1.0, float("nan")])]), "NaN or infinite")
    fails(ce([]), "at least one datum")
    fails(
        ForwardBackward(data=[good], loss_fn="importance_sampling"),
        r"needs loss_fn_inputs\['logprobs'\]",
    )
    fails(
        ForwardBackward(data=[good], loss_fn="custom"),
        r"loss_fn 'custom' needs loss_fn_config\['loss_id'\]",
    )
    fails(
        ForwardBackward(data=[good], loss_fn="cispo"),
        r"datum 0: loss_fn 'cispo' needs loss_fn_inputs\['logprobs'\]",
    )
    fails(
        ForwardBackward(data=[good], loss_fn="gspo", loss_fn_config={"clip_high_threshold": 0.5}),
        "must be >= 1",
    )
    fails(
        ForwardBackward(data=[good], loss_fn="cross_entropy", loss_fn_config={"beta": 1.0}),
        "does not take config key 'beta'",
    )
    float_input = Datum(
        model_input=Tensor.from_list([1.0, 2.0], "float32"),
        loss_fn_inputs={"target_tokens": Tensor.from_list([2, 3], "int64")},
    )
    fails(ce([float_input]), "integer token ids")
    assert all(g is None for g in grads(engine, "r"))  # nothing was accumulated by failures

    for rank in (0, 65):
        with pytest.raises(UserError, match="LoRA rank must be between 1 and 64"):
            engine.create_run("bad", LoraConfig.model_construct(rank=rank))
    with pytest.raises(Conflict):
        engine.create_run("r", LoraConfig(rank=4))
    with pytest.raises(NotFound):
        engine.forward_backward("nope", ce([good]))
    with pytest.raises(UserError, match="betas"):
        engine.optim_step("r", AdamParams.model_construct(beta1=1.0))
    with pytest.raises(UserError, match=">= 0"):
        engine.optim_step("r", AdamParams.model_construct(learning_rate=-1.0))


def test_unknown_input_keys_are_ignored(engine: TrainerEngine) -> None:
    engine.create_run("r", LoraConfig(rank=4, seed=1))
    datum = sft_datum([1, 2, 3, 4])
    extra = datum.model_copy(
        update={
            "loss_fn_inputs": {
                **datum.loss_fn_inputs,
                "mask": Tensor.from_list([1.0], "float32"),
            }
        }
    )
    assert engine.forward_backward("r", ce([extra], True)) == engine.forward_backward(
        "r", ce([datum], True)
    )


def test_num_tokens_and_batch_segments() -> None:
    cmd = ce([sft_datum([1, 2, 3, 4]), sft_datum([5, 6])])
    assert num_tokens(cmd) == 4 == TrainerEngine.num_tokens(cmd)
    batch = pack_requests(
        [("a", [torch.tensor([1, 2, 3])]), ("b", [torch.tensor([4]), torch.tensor([5, 6])])],
        device=torch.device("cpu"),
    )
    assert [(s.adapter_id, s.start, s.stop) for s in batch.segments] == [("a", 0, 3), ("b", 3, 6)]
    assert batch.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert batch.pack.lengths == [3, 1, 2]
    assert batch.pack.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert micro_batches([3, 1, 2, 5, 1], budget_tokens=4) == [
        range(0, 2),
        range(2, 3),
        range(3, 4),
        range(4, 5),
    ]
    assert micro_batches([9, 1], budget_tokens=4) == [range(0, 1), range(1, 2)]
    assert micro_batches([1, 1, 1], budget_tokens=100) == [range(0, 3)]
