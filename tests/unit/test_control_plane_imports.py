"""The control plane never imports torch or transformers (architecture §1).

Each module is imported in a fresh interpreter, because this test process has long since loaded
torch for other tests: only a clean ``sys.modules`` shows what a gateway, scheduler or billing
process (or the CLI) really pulls in.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CONTROL_PLANE = [
    "services.gateway.app",
    "services.scheduler.handlers",
    "services.billing.handlers",
    "services.billing.prices",
    "whetstone.cli",
    "whetstone.platform",
    "whetstone.settings",
    "whetstone.models.registry",
]
ML_STACK = ("torch", "transformers", "safetensors", "peft")


def _loaded_after_import(module: str) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps([m for m in {ML_STACK!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", CONTROL_PLANE)
def test_control_plane_module_is_torch_free(module: str) -> None:
    assert _loaded_after_import(module) == []


def test_the_check_can_fail() -> None:
    """The workers' engines do load torch: the subprocess check sees it, so it is not vacuous."""
    assert {"torch", "transformers"} <= set(_loaded_after_import("services.trainer.engine"))
