"""State saved before flat adapters (one leaf per LoRA factor, so an AdamW state and a pending
gradient per factor) still loads with its optimizer into today's flat adapters, and training
carries on exactly as it would have in the old layout (CPU, float32)."""

from __future__ import annotations

from pathlib import Path

import torch

from services.trainer.engine import OPTIMIZER_FILE, TrainerEngine
from services.trainer.snapshots import GRADS_FILE, load_snapshot, save_snapshot
from tests.unit.test_trainer_engine import ADAM, ce, mixed_weights_data, model_dir, train_a_little
from whetstone.messages import LoraConfig
from whetstone_ml.lora import LoraAdapter, LoraFactors

__all__ = ["model_dir"]  # the tiny model fixture

LORA = LoraConfig(rank=4, seed=7)


def per_factor_layout(engine: TrainerEngine, run_id: str) -> None:
    """The run's factors as separate leaves with an AdamW over them, as adapters were before
    they became flat (parameter 2i is module i's A, 2i + 1 its B)."""
    state = engine.runs[run_id]
    factors = {
        name: LoraFactors(
            f.a.detach().clone().requires_grad_(), f.b.detach().clone().requires_grad_(), f.scale
        )
        for name, f in state.adapter.factors.items()
    }
    state.adapter = LoraAdapter(state.adapter.config, factors)
    state.optimizer = torch.optim.AdamW(state.adapter.parameters(), lr=0.0, weight_decay=0.0)


def weights(engine: TrainerEngine, run_id: str) -> dict[str, torch.Tensor]:
    return engine.runs[run_id].adapter.state_dict()


def test_a_per_factor_snapshot_resumes_in_a_flat_adapter(model_dir: Path, tmp_path: Path) -> None:
    old = TrainerEngine(model_dir)
    old.create_run("r", LORA)
    per_factor_layout(old, "r")
    train_a_little(old, "r", steps=2)
    old.forward_backward("r", ce(mixed_weights_data(seed=60)))  # a gradient not yet stepped
    save_snapshot(old, "r", tmp_path / "snap")
    saved = torch.load(tmp_path / "snap" / OPTIMIZER_FILE, weights_only=True)
    assert len(saved["optimizer"]["state"]) == len(weights(old, "r")) > 1  # one per factor
    assert len(torch.load(tmp_path / "snap" / GRADS_FILE, weights_only=True)) > 1

    new = TrainerEngine(model_dir)
    load_snapshot(new, "r", LORA, tmp_path / "snap")
    assert new.runs["r"].adapter.flat is not None and new.runs["r"].step == 2
    for engine in (old, new):
        engine.optim_step("r", ADAM)  # the pending gradient, then the old moments carry on
        engine.forward_backward("r", ce(mixed_weights_data(seed=61)))
        engine.optim_step("r", ADAM)
    a, b = weights(old, "r"), weights(new, "r")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-7, rtol=1e-6)


def test_fresh_moments_would_have_trained_differently(model_dir: Path, tmp_path: Path) -> None:
    """The check above can fail: loading the weights without the old moments diverges."""
    old = TrainerEngine(model_dir)
    old.create_run("r", LORA)
    per_factor_layout(old, "r")
    train_a_little(old, "r", steps=2)
    old.save_state("r", tmp_path / "state")
    new = TrainerEngine(model_dir)
    new.load_state("r", tmp_path / "state", with_optimizer=False)
    for engine in (old, new):
        engine.forward_backward("r", ce(mixed_weights_data(seed=61)))
        engine.optim_step("r", ADAM)
    a, b = weights(old, "r"), weights(new, "r")
    assert any(not torch.allclose(a[k], b[k], atol=1e-6) for k in a)
