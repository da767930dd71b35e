"""The sampler engine named per base model in the registry (``engine = "whetstone" | "vllm"``)
and the interpreter ``whetstone up`` starts that sampler with. No torch, no vLLM needed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.models.registry import ModelSpec, RegistryError, parse_models_file
from whetstone.platform import VLLM_PYTHON_ENV, service_pythons


def _model(directory: Path) -> Path:
    directory.mkdir(parents=True)
    config = {"model_type": "qwen3", "max_position_embeddings": 4096, "vocab_size": 1000}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_engine_defaults_to_whetstone_and_may_be_vllm(tmp_path: Path) -> None:
    _model(tmp_path / "hf" / "m")
    path = _file(
        tmp_path,
        """
        [builtin]
        engine = "vllm"
        [[models]]
        name = "local/m"
        path = "hf/m"
        """,
    )
    registry = parse_models_file(path, tmp_path / "models")
    assert registry.resolve(BUILTIN_MODEL_NAME).engine == "vllm"
    assert registry.resolve("local/m").engine == "whetstone"


@pytest.mark.parametrize(
    "text",
    [
        "[builtin]\nengine = 'sglang'\n",
        "builtin = false\n[[models]]\nname = 'local/m'\npath = 'hf/m'\nengine = 'sglang'\n",
    ],
)
def test_an_unknown_engine_stops_the_start_up(tmp_path: Path, text: str) -> None:
    _model(tmp_path / "hf" / "m")
    path = _file(tmp_path, text)
    with pytest.raises(
        RegistryError, match=r"engine 'sglang' is not one of \['whetstone', 'vllm'\]"
    ):
        parse_models_file(path, tmp_path / "models")
    with pytest.raises(RegistryError, match="engine"):
        ModelSpec("x", tmp_path, 8, 8, engine="sglang")


def test_the_sampler_of_a_vllm_model_runs_on_the_vllm_interpreter(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    vllm_model = _file(tmp_path, "[builtin]\nengine = 'vllm'\n")
    python = tmp_path / "venv" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    env = {VLLM_PYTHON_ENV: str(python)}
    assert service_pythons(env, models_dir, vllm_model) == {"sampler": str(python)}
    # The models file may come through the environment, as a service reads it.
    assert service_pythons({**env, "WHETSTONE_MODELS_FILE": str(vllm_model)}, models_dir, None) == {
        "sampler": str(python)
    }
    # The sampler's own base model decides: one served by Whetstone's engine needs nothing.
    assert service_pythons(env, models_dir, None) == {}
    with pytest.raises(RuntimeError, match="run scripts/setup-vllm"):
        service_pythons({VLLM_PYTHON_ENV: str(tmp_path / "absent")}, models_dir, vllm_model)
