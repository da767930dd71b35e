"""Fixtures of the vLLM engine's tests, which only the vLLM virtual environment collects
(``scripts/setup-vllm``; the main suite runs them through ``tests/test_vllm_engine.py``).

vLLM takes seconds to start on a CPU, so the whole directory shares ONE engine on the built-in
tiny Qwen3 (head_dim 32, which vLLM's CPU backend takes), with two adapters resident at most.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.sampler.vllm_engine import VllmEngine
from whetstone.messages import LoraConfig
from whetstone_ml.builtin import ensure_builtin_model
from whetstone_ml.lora import LoraAdapter, LoraModel

MAX_ADAPTERS = 2


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def engine(model_dir: Path):
    engine = VllmEngine(model_dir, max_adapters=MAX_ADAPTERS, max_seqs=64, kv_cache_tokens=32_768)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hf(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def make_adapter(directory: Path, seed: int, model_dir: Path, rank: int = 8) -> Path:
    """A PEFT adapter (the trainer's export format) whose B is random, so it changes outputs."""
    base = LoraModel(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32))
    adapter = LoraAdapter.init(base, LoraConfig(rank=rank, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for f in adapter.factors.values():
            f.b.copy_(torch.randn(f.b.shape, generator=gen) * 0.05)
    adapter.save_peft(directory, str(model_dir))
    return directory


@pytest.fixture(scope="session")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(root / name, seed, model_dir)
        for name, seed in (("a", 1), ("b", 2), ("c", 3))
    }


@pytest.fixture
def adapters(engine: VllmEngine, adapter_dirs: dict[str, Path]) -> dict[str, Path]:
    """Adapters a and b resident (what a handler's ensure_adapter does before each request)."""
    for name in ("a", "b"):
        engine.ensure_adapter(name, adapter_dirs[name])
    return adapter_dirs


def peft_model(
    model_dir: Path, adapter_dir: Path | None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.to(dtype).eval()
