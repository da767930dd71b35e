"""Loading a base model as the registry says: its dtype, its device, its directory.

The registry (:mod:`whetstone.models.registry`) names dtypes and devices as strings so that the
control plane never imports torch; this module turns them into torch objects and loads the
weights for the trainer's and the sampler's engines. The built-in model is generated here on
first use when a worker starts before anything else has generated it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from whetstone.models.registry import DTYPES, ModelSpec
from whetstone_ml.builtin import ensure_builtin_model

_TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16`` for ``"bfloat16"`` (or for ``torch.bfloat16``); other dtypes are refused:
    the engines support exactly the registry's ``DTYPES``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; supported: {list(DTYPES)}")
        return dtype
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {list(DTYPES)}") from None


def local_model_dir(spec: ModelSpec) -> Path:
    """The directory to load ``spec`` from, generating the built-in model there if needed."""
    if spec.is_builtin:
        return ensure_builtin_model(spec.path.parent)
    return spec.path


def load_base_model(
    directory: Path, dtype: str | torch.dtype, device: str | torch.device
) -> PreTrainedModel:
    """The causal LM in ``directory``, its weights in ``dtype`` on ``device``, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype(dtype))
    # transformers types .to() wrongly, hence the ignore.
    return model.to(torch.device(device)).eval()  # type: ignore[arg-type]
