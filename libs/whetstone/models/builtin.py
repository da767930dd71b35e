"""The built-in base model's identity, known without torch: its name, directory and sizes.

The tiny Qwen3 that serves CPUs, tests and the demo is generated locally (no download) by
:mod:`whetstone_ml.builtin`, which needs torch and tokenizers. The control plane must never import
those, yet the gateway validates token ids and lengths against this model and ``whetstone up``
makes sure it exists before the workers start. This module holds the facts they need and a way to
have the model generated in a child process, so no caller here ever loads the ML stack.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BUILTIN_MODEL_NAME = "whetstone/tiny-qwen3"
# Bump the suffix whenever the recipe in ``whetstone_ml.builtin`` changes, so stale caches are
# never reused.
BUILTIN_MODEL_DIRNAME = "tiny-qwen3-v1"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# The generated tokenizer has exactly this many ids (special tokens included), and the model's
# ``max_position_embeddings`` is CONTEXT_LENGTH; ``config.json`` says the same once generated.
VOCAB_SIZE = 2048
CONTEXT_LENGTH = 2048

GENERATE_TIMEOUT_S = 600.0


def builtin_model_dir(models_dir: Path) -> Path:
    """Where the built-in model lives (or will live) under the operator's models directory."""
    return Path(models_dir) / BUILTIN_MODEL_DIRNAME


def ensure_builtin_model_in_subprocess(
    models_dir: Path, timeout_s: float = GENERATE_TIMEOUT_S
) -> Path:
    """Return the built-in model's directory, generating it first in a child Python process.

    When the directory already exists (the common case) nothing is started. Otherwise
    ``python -m whetstone_ml.builtin MODELS_DIR`` builds it, so the caller (``whetstone up``)
    never imports torch. The generator publishes the directory atomically, so its existence after
    the child exits means it is complete. A failed generation raises ``RuntimeError`` carrying the
    tail of the child's stderr.
    """
    final = builtin_model_dir(models_dir)
    if final.is_dir():
        return final
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "whetstone_ml.builtin", str(models_dir)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0 or not final.is_dir():
        raise RuntimeError(
            f"generating the built-in model under {models_dir} failed "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return final
