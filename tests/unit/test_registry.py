"""The model registry as operator configuration: the TOML models file, its errors, dtypes by
device, the settings that point at it, and billing's prices taken from it. No torch needed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from services.billing.prices import DEFAULT_PRICE_TABLE, Price, PriceTable
from whetstone.errors import UnknownModel
from whetstone.models.builtin import BUILTIN_MODEL_NAME, CONTEXT_LENGTH, VOCAB_SIZE
from whetstone.models.registry import (
    ModelSpec,
    RegistryError,
    default_dtype,
    load_registry,
    parse_models_file,
)
from whetstone.settings import ServiceSettings

PRICES = "prices = { train_tokens = 2.4, prefill_tokens = 0.6, sample_tokens = 1.8 }"


def fake_model(directory: Path, max_positions: int = 4096, vocab: int = 1000) -> Path:
    """A Hugging Face directory as the registry sees it: only config.json."""
    directory.mkdir(parents=True)
    config = {"model_type": "qwen3", "max_position_embeddings": max_positions, "vocab_size": vocab}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def big(tmp_path: Path) -> Path:
    return fake_model(tmp_path / "hf" / "big", max_positions=40960, vocab=151936)


def test_a_good_file(tmp_path: Path, big: Path) -> None:
    small = fake_model(tmp_path / "hf" / "small")
    path = write(
        tmp_path,
        f"""
        [[models]]
        name = "Qwen/Qwen3-8B"
        path = "{big}"
        device = "cuda"
        context_length = 32768
        max_lora_rank = 128
        {PRICES}

        [[models]]
        name = "local/small"
        path = "hf/small"   # relative to the file
        dtype = "float16"
    """,
    )
    registry = parse_models_file(path, tmp_path / "models")
    assert registry.names() == ["Qwen/Qwen3-8B", "local/small", BUILTIN_MODEL_NAME]
    assert registry.resolve("Qwen/Qwen3-8B") == ModelSpec(
        "Qwen/Qwen3-8B",
        big,
        32768,
        151936,
        128,
        "qwen3",
        "bfloat16",
        "cuda",
        {"train_tokens": 2.4, "prefill_tokens": 0.6, "sample_tokens": 1.8},
    )
    spec = registry.resolve(str(small))  # by directory, as clients may name it
    assert (spec.name, spec.path, spec.context_length, spec.vocab_size) == (
        "local/small",
        small,
        4096,
        1000,
    )
    assert (spec.device, spec.dtype, spec.max_lora_rank, spec.prices) == (
        "cpu",
        "float16",
        64,
        None,
    )
    builtin = registry.resolve(BUILTIN_MODEL_NAME)
    assert builtin.path == tmp_path / "models" / "tiny-qwen3-v1" and not builtin.path.exists()
    assert (builtin.context_length, builtin.vocab_size, builtin.dtype) == (
        CONTEXT_LENGTH,
        VOCAB_SIZE,
        "float32",
    )


def test_builtin_can_be_left_out_or_configured(tmp_path: Path, big: Path) -> None:
    entry = f'[[models]]\nname = "big"\npath = "{big}"\n'
    registry = parse_models_file(write(tmp_path, "builtin = false\n" + entry), tmp_path)
    assert registry.names() == ["big"]
    with pytest.raises(UnknownModel, match="served: big"):
        registry.resolve(BUILTIN_MODEL_NAME)

    path = write(tmp_path, f'[builtin]\ndevice = "cuda:1"\nmax_lora_rank = 8\n{PRICES}\n')
    spec = parse_models_file(path, tmp_path).resolve(BUILTIN_MODEL_NAME)
    assert (spec.device, spec.dtype, spec.max_lora_rank) == ("cuda:1", "bfloat16", 8)
    assert spec.prices == {"train_tokens": 2.4, "prefill_tokens": 0.6, "sample_tokens": 1.8}
    assert parse_models_file(write(tmp_path, ""), tmp_path).names() == [BUILTIN_MODEL_NAME]


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", "float32"),
        ("cuda", "bfloat16"),
        ("cuda:3", "bfloat16"),
        ("mps", "float32"),
    ],
)
def test_default_dtype_follows_the_device(
    tmp_path: Path, big: Path, device: str, dtype: str
) -> None:
    assert default_dtype(device) == dtype
    path = write(tmp_path, f'[[models]]\nname = "m"\npath = "{big}"\ndevice = "{device}"\n')
    assert parse_models_file(path, tmp_path).resolve("m").dtype == dtype


def test_a_device_override_keeps_or_redefaults_the_dtype(big: Path) -> None:
    gpu = ModelSpec.from_dir("m", big, device="cuda")
    assert gpu.dtype == "bfloat16"
    assert gpu.on_device("cuda:1").dtype == "bfloat16"
    assert gpu.on_device("cpu").dtype == "float32"  # never bfloat16 by accident on a CPU
    assert gpu.on_device("cpu", "bfloat16").dtype == "bfloat16"
    assert (
        ModelSpec.from_dir("m", big, device="cuda", dtype="float32").on_device("cuda:2").dtype
        == "float32"
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            'name = "m"\npath = "{big}"\ncolour = "red"',
            r"models\[0\] \('m'\): unknown keys \['colo",
        ),
        (
            'name = "m"\npath = "{big}"\ndtype = "int8"',
            r"models\[0\] \('m'\): dtype 'int8' is not one",
        ),
        ('name = "m"\npath = "{big}"\ndevice = "gpu0"', r"device 'gpu0' is not a device string"),
        (
            'name = "m"\npath = "{missing}"',
            r"models\[0\] \('m'\): model directory .* does not exist",
        ),
        ('name = "m"\npath = "{empty}"', r"holds no config.json"),
        ('name = "m"', r"models\[0\] \('m'\): 'path' .* is required"),
        ('path = "{big}"', r"models\[0\]: 'name' must be a non-empty string"),
        (
            'name = "m"\npath = "{big}"\ncontext_length = 50000',
            r"exceeds the model's max_position_",
        ),
        ('name = "m"\npath = "{big}"\ncontext_length = 0', r"'context_length' must be a positive"),
        ('name = "m"\npath = "{big}"\nmax_lora_rank = "8"', r"'max_lora_rank' must be a positive"),
        (
            'name = "m"\npath = "{big}"\nprices = {{ train_tokens = 1.0 }}',
            r"missing \['prefill_tok",
        ),
        (
            (
                'name = "m"\npath = "{big}"\n'
                "prices = {{ train_tokens = -1.0, prefill_tokens = 0.1, sample_tokens = 0.3 }}"
            ),
            r"price of train_tokens must be a number >= 0",
        ),
        (
            (
                'name = "m"\npath = "{big}"\nprices = {{ train_tokens = 1, prefill_tokens = 1, '
                "sample_tokens = 1, tip = 1 }}"
            ),
            r"unknown \['tip'\]",
        ),
    ],
)
def test_each_bad_entry_names_the_file_and_the_entry(
    tmp_path: Path, big: Path, entry: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    body = entry.format(big=big, missing=tmp_path / "nope", empty=tmp_path / "empty")
    path = write(tmp_path, "[[models]]\n" + body + "\n")
    with pytest.raises(RegistryError, match=message) as info:
        parse_models_file(path, tmp_path)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[models]]\nname = "m"\npath = "{big}"\n[[models]]\nname = "m"\npath = "{big}"\n',
            r"base model 'm' is listed twice",
        ),
        (
            f'[[models]]\nname = "{BUILTIN_MODEL_NAME}"\npath = "{{big}}"\n',
            rf"base model '{BUILTIN_MODEL_NAME}' is listed twice",
        ),
        ('models = "all"\n', r"'models' must be an array of tables"),
        ('builtin = "yes"\n', r"'builtin' must be true, false or a table"),
        ('[builtin]\npath = "/elsewhere"\n', r"\[builtin\]: unknown keys \['path'\]"),
        ('[builtin]\ndtype = "fp8"\n', r"\[builtin\]: dtype 'fp8'"),
        ("model = []\n", r"the top level: unknown keys \['model'\]"),
        ("[[models]\n", r"not valid TOML"),
    ],
)
def test_bad_files(tmp_path: Path, big: Path, text: str, message: str) -> None:
    path = write(tmp_path, text.format(big=big))
    with pytest.raises(RegistryError, match=message):
        parse_models_file(path, tmp_path)


def test_a_missing_file_and_an_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="models file not found"):
        load_registry(tmp_path, tmp_path / "absent.toml")
    registry = load_registry(tmp_path)  # no file: the built-in model alone
    assert registry.names() == [BUILTIN_MODEL_NAME]
    with pytest.raises(UnknownModel, match="unknown base model 'Qwen/Qwen3-8B'"):
        registry.resolve("Qwen/Qwen3-8B")


def test_settings_read_the_models_file(
    tmp_path: Path, big: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, f'builtin = false\n[[models]]\nname = "big"\npath = "{big}"\n')
    monkeypatch.setenv("WHETSTONE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("WHETSTONE_MODELS_FILE", str(path))
    assert ServiceSettings().registry().names() == ["big"]
    monkeypatch.setenv("WHETSTONE_MODELS_FILE", "")  # set but empty: no file
    assert ServiceSettings().models_file is None
    assert ServiceSettings().registry().names() == [BUILTIN_MODEL_NAME]


def test_the_example_file_is_documented_and_valid(tmp_path: Path) -> None:
    """``deploy/models.example.toml`` parses once its directories exist."""
    example = Path(__file__).resolve().parents[2] / "deploy" / "models.example.toml"
    text = example.read_text()
    for directory in ("Qwen3-8B", "Qwen3-0.6B"):
        fake_model(tmp_path / directory, max_positions=40960, vocab=151936)
        text = text.replace(f"/srv/models/{directory}", str(tmp_path / directory))
    registry = parse_models_file(write(tmp_path, text), tmp_path / "models")
    assert registry.names() == ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B", BUILTIN_MODEL_NAME]
    assert registry.resolve("Qwen/Qwen3-0.6B").dtype == "bfloat16"  # cuda:1's default


def test_billing_takes_prices_from_the_registry(tmp_path: Path, big: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [[models]]
        name = "priced"
        path = "{big}"
        {PRICES}

        [[models]]
        name = "unpriced"
        path = "{big}"
    """,
    )
    registry = parse_models_file(path, tmp_path)
    table = PriceTable.from_registry(registry)
    assert table.price_for("priced") == Price(2.4, 0.6, 1.8)
    assert table.price_for("unpriced") == DEFAULT_PRICE_TABLE.default
    assert table.price_for(BUILTIN_MODEL_NAME) == DEFAULT_PRICE_TABLE.price_for(BUILTIN_MODEL_NAME)
    assert table.cost_usd("priced", "train_tokens", 2_000_000) == pytest.approx(4.8)

    # Over a JSON price table: the registry's own prices win, the rest of the file stays.
    base = PriceTable(
        default=Price(9, 9, 9), models={"priced": Price(1, 1, 1), "other": Price(2, 2, 2)}
    )
    layered = PriceTable.from_registry(registry, base=base)
    assert layered.price_for("priced") == Price(2.4, 0.6, 1.8)
    assert layered.price_for("other") == Price(2, 2, 2)
    assert layered.price_for("unpriced") == Price(9, 9, 9)
