"""The built-in tiny Qwen3 and the model registry: determinism, tokenizer, model, resolution."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from whetstone.errors import UnknownModel, UserError
from whetstone.models.builtin import (
    BUILTIN_MODEL_DIRNAME,
    BUILTIN_MODEL_NAME,
    CONTEXT_LENGTH,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    ensure_builtin_model_in_subprocess,
)
from whetstone.models.registry import ModelRegistry, ModelSpec, builtin_spec, default_registry
from whetstone_ml import builtin
from whetstone_ml.builtin import ensure_builtin_model


def _hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("cache"))


def test_layout_and_idempotence(model_dir: Path) -> None:
    assert model_dir.name == BUILTIN_MODEL_DIRNAME
    names = {p.name for p in model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    before = _hashes(model_dir)
    assert ensure_builtin_model(model_dir.parent) == model_dir
    assert _hashes(model_dir) == before
    assert [p.name for p in model_dir.parent.iterdir()] == [BUILTIN_MODEL_DIRNAME]


def test_generation_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    other = ensure_builtin_model(tmp_path / "again")
    assert _hashes(other) == _hashes(model_dir)


def test_special_tokens_are_single_ids(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok.encode(s, add_special_tokens=False) for s in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 3
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ids[2][0]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ids[0][0]
    # Special tokens inside text are still matched whole.
    assert tok.encode("hi<|im_end|>", add_special_tokens=False)[-1] == tok.eos_token_id


def test_chat_template_renders_chatml(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "Q: What is 12 plus 30?\nA: 42.",
        "  leading spaces, tabs\tand unicode: café, 東京, 🙂\n",
    ],
)
def test_tokenizer_round_trips(model_dir: Path, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)


def test_tokenizer_learned_english(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == 2048
    # A useful BPE, not bytes: common words are one token each.
    assert len(tok.encode(" the capital of France", add_special_tokens=False)) == 4


def test_model_loads_and_produces_logits(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert config.model_type == "qwen3" and config.vocab_size == len(tok)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 2, 32)
    assert not config.tie_word_embeddings
    assert config.eos_token_id == tok.eos_token_id and config.pad_token_id == tok.pad_token_id
    ids = tok.encode("The red fox lives in Paris.", add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_registry_resolves_by_name_and_path(model_dir: Path) -> None:
    registry = default_registry(model_dir.parent)
    spec = registry.resolve(BUILTIN_MODEL_NAME)
    assert spec == ModelSpec(BUILTIN_MODEL_NAME, model_dir, 2048, 2048, 64, "qwen3")
    assert registry.resolve(str(model_dir)) is spec
    assert registry.resolve(str(model_dir / ".." / model_dir.name)) is spec
    assert registry.names() == [BUILTIN_MODEL_NAME] and registry.specs() == [spec]
    assert BUILTIN_MODEL_NAME in registry and "nope" not in registry


def test_registry_rejects_unknown_models(model_dir: Path, tmp_path: Path) -> None:
    registry = default_registry(model_dir.parent)
    for name in ["Qwen/Qwen3-8B", str(tmp_path), ""]:
        with pytest.raises(UnknownModel) as info:
            registry.resolve(name)
        assert isinstance(info.value, UserError)
        assert info.value.message == f"unknown base model {name!r}; served: {BUILTIN_MODEL_NAME}"


def test_registry_registers_more_models_once(model_dir: Path) -> None:
    registry = default_registry(model_dir.parent)
    registry.register(ModelSpec.from_dir("local/copy", model_dir))
    assert registry.names() == ["local/copy", BUILTIN_MODEL_NAME]
    assert registry.resolve("local/copy").vocab_size == 2048
    with pytest.raises(ValueError):
        ModelRegistry([registry.resolve("local/copy")] * 2)


def test_builtin_spec_needs_no_generated_model(model_dir: Path, tmp_path: Path) -> None:
    """The constants the control plane uses match what generation writes to config.json."""
    before = builtin_spec(tmp_path)
    assert not before.path.exists()
    assert (before.context_length, before.vocab_size) == (CONTEXT_LENGTH, VOCAB_SIZE)
    assert builtin_spec(model_dir.parent) == ModelSpec(
        BUILTIN_MODEL_NAME, model_dir, CONTEXT_LENGTH, VOCAB_SIZE
    )


def test_subprocess_generation_only_runs_when_missing(model_dir: Path, tmp_path: Path) -> None:
    assert ensure_builtin_model_in_subprocess(model_dir.parent) == model_dir
    fake = tmp_path / "fake"
    # A directory that exists is trusted as it is: no child process rebuilds it.
    (fake / BUILTIN_MODEL_DIRNAME).mkdir(parents=True)
    assert ensure_builtin_model_in_subprocess(fake) == fake / BUILTIN_MODEL_DIRNAME
    assert list((fake / BUILTIN_MODEL_DIRNAME).iterdir()) == []


def test_losing_the_rename_race_uses_the_winner(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process publishes while we build: we keep its directory and drop our temp."""
    final = tmp_path / BUILTIN_MODEL_DIRNAME

    def build_while_another_wins(out_dir: Path) -> None:
        (out_dir / "ours").write_text("loser")
        final.mkdir()
        (final / "theirs").write_text("winner")

    monkeypatch.setattr(builtin, "generate_builtin_model", build_while_another_wins)
    assert ensure_builtin_model(tmp_path) == final
    assert [p.name for p in tmp_path.iterdir()] == [BUILTIN_MODEL_DIRNAME]
    assert [p.name for p in final.iterdir()] == ["theirs"]


def test_concurrent_processes_end_with_one_valid_directory(model_dir: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from whetstone_ml.builtin import ensure_builtin_model; "
        "print(ensure_builtin_model(Path(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert {out.strip() for out, _ in results} == {str(tmp_path / BUILTIN_MODEL_DIRNAME)}
    assert all(err == "" for _, err in results), "generation should log nothing"
    assert [p.name for p in tmp_path.iterdir()] == [BUILTIN_MODEL_DIRNAME]
    assert _hashes(tmp_path / BUILTIN_MODEL_DIRNAME) == _hashes(model_dir)
