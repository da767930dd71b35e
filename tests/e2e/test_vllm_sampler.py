"""The vLLM engine (``services/sampler/vllm_engine.py``) in CI, on a CPU.

vLLM lives in its own virtual environment, ``.venv-vllm``, which the ``vllm_python`` fixture
builds with ``scripts/setup-vllm`` when it is missing (a failure to build it fails these tests:
never a skip). Two checks:

* the engine's feature tests, ``tests/vllm`` (the same references as Whetstone's engine's unit
  tests), run there by one test here, which fails when any of them fails;
* end to end: a platform of real processes whose registry serves the built-in model with
  ``engine = "vllm"``, so ``whetstone up``'s code starts the sampler on the vLLM interpreter;
  the unmodified tinker SDK trains a LoRA adapter, samples from it, and the sampler's logprobs
  match the trainer's forward logprobs of the same tokens within ``ATOL`` (float32 on both
  sides; vLLM's CPU attention and LoRA kernels sum in other orders than the trainer's).

Each process starts one vLLM engine: the feature tests share one, the platform's sampler is one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tinker
from tinker import types

from whetstone.models.builtin import BUILTIN_MODEL_NAME
from whetstone.platform import VLLM_PYTHON_ENV, Platform, start_platform

ROOT = Path(__file__).resolve().parents[2]
ATOL = 2e-4
# Building .venv-vllm from nothing takes minutes (3.5 GB of wheels); vLLM starts in seconds.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    done = subprocess.run(
        [str(ROOT / "scripts" / "setup-vllm")], capture_output=True, text=True, timeout=2400
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/setup-vllm failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return ROOT / ".venv-vllm" / "bin" / "python"


def test_the_vllm_engine_passes_its_feature_tests(vllm_python: Path) -> None:
    done = subprocess.run(
        [str(vllm_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging"]
        + ["--confcutdir", "tests/vllm", "tests/vllm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    summary = [line for line in done.stdout.splitlines() if "passed" in line or "failed" in line]
    print(summary[-1:])
    assert done.returncode == 0, f"tests/vllm failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert summary and "failed" not in summary[-1] and " passed" in summary[-1]


@pytest.fixture(scope="module")
def vllm_platform(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    state = tmp_path_factory.mktemp("vllm-platform")
    models_file = state / "models.toml"
    models_file.write_text('[builtin]\nengine = "vllm"\n')
    running: Platform = start_platform(
        state,
        port=0,
        models_dir=models_dir,
        models_file=models_file,
        extra_env={VLLM_PYTHON_ENV: str(vllm_python)},
        ready_timeout_s=600,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def service(vllm_platform: Platform):
    client = tinker.ServiceClient(base_url=vllm_platform.base_url, api_key=vllm_platform.api_key)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def trained(service):
    """A LoRA run after 8 SFT steps on a few sentences: its training client and tokenizer."""
    training = service.create_lora_training_client(
        base_model=BUILTIN_MODEL_NAME, rank=8, seed=0
    ).result()
    tokenizer = training.get_tokenizer()
    texts = [f"The capital of country {i} is city {i}." for i in range(16)]
    data = []
    for text in texts:
        tokens = tokenizer.encode(text, add_special_tokens=False)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    for _ in range(8):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return training, tokenizer


def _trainer_logprobs(training, tokens: list[int]) -> list[float]:
    """The trainer's logprob of each of ``tokens[1:]`` given the ones before it."""
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    return (
        training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    )


def test_the_sampler_runs_on_the_vllm_interpreter(vllm_platform: Platform, vllm_python) -> None:
    assert vllm_platform.children["sampler"].args[0] == str(vllm_python)
    assert vllm_platform.children["trainer"].args[0] == sys.executable
    log = vllm_platform.log_path("sampler").read_text()
    assert "sampler engine" in log and "vllm" in log


def test_samples_from_a_trained_adapter_match_the_trainers_logprobs(service, trained) -> None:
    training, tokenizer = trained
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = tokenizer.encode("The capital of country 3 is", add_special_tokens=False)
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    result = sampler.sample(
        types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params
    ).result()
    assert len(result.sequences) == 2
    for seq in result.sequences:
        assert 1 <= len(seq.tokens) == len(seq.logprobs) <= 8
        expected = _trainer_logprobs(training, prompt + seq.tokens)[len(prompt) - 1 :]
        assert seq.logprobs == pytest.approx(expected, abs=ATOL)
    # Seeded: the same request gives the same samples.
    again = sampler.sample(
        types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params
    ).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in result.sequences]
    # A long prompt's full KV blocks (128 tokens on vLLM's CPU backend) come from the prefix
    # cache the second time, reported for billing as cached prefill.
    long_prompt = types.ModelInput.from_ints(prompt * 40)
    short = types.SamplingParams(max_tokens=1, temperature=1.0, seed=1)
    sampler.sample(long_prompt, num_samples=1, sampling_params=short).result()
    repeat = sampler.sample(long_prompt, num_samples=1, sampling_params=short).result()
    assert repeat.prompt_cache_hit_tokens == 128 * ((long_prompt.length - 1) // 128) > 0
    # The trained adapter is what samples: it learnt the sentences, the base model did not.
    base_sampler = service.create_sampling_client(base_model=BUILTIN_MODEL_NAME).result()
    base = base_sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    tuned = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert tuned[1:] == pytest.approx(_trainer_logprobs(training, prompt), abs=ATOL)
    assert sum(tuned[1:]) > sum(base[1:]) + 1.0


def test_an_option_vllm_cannot_do_is_a_user_error(service) -> None:
    sampler = service.create_sampling_client(base_model=BUILTIN_MODEL_NAME).result()
    future = sampler.sample(
        types.ModelInput.from_ints([1, 2, 3, 4]),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=2),
        prompt_alt_tokens_k=2,
    )
    with pytest.raises(
        tinker.RequestFailedError, match="prompt_alt_tokens_k is not supported"
    ) as e:
        future.result()
    assert e.value.category == "user"
