"""Tinker's protobuf schema module, loaded without the rest of the SDK.

The gateway decodes and encodes Tinker's protobuf with the schema module the SDK ships
(``tinker/proto/tinker_public_pb2.py``), but ``import tinker.proto`` first runs the SDK's
``tinker/__init__.py``, whose types import torch whenever it is installed. The control plane never
imports torch (architecture §1), so this module loads the generated file on its own: it needs only
``google.protobuf``. The message classes are the very ones the SDK uses (protobuf keeps one class
per descriptor in the default pool), so a process that also imports the SDK sees no difference.

Use ``from services.gateway.tinker_schema import pb`` where ``from tinker.proto import
tinker_public_pb2 as pb`` would be written.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["pb"]

_SDK_MODULE = "tinker.proto.tinker_public_pb2"
_PRIVATE_NAME = "whetstone_gateway_tinker_public_pb2"


def _load() -> ModuleType:
    """The SDK's schema module if the SDK is already imported, else the file loaded alone."""
    for name in (_SDK_MODULE, _PRIVATE_NAME):
        module = sys.modules.get(name)
        if module is not None:
            return module
    # find_spec on a top-level package locates it without executing its __init__.
    sdk = importlib.util.find_spec("tinker")
    if sdk is None or sdk.origin is None:
        raise ImportError("the tinker SDK is not installed; the gateway needs its protobuf schema")
    location = Path(sdk.origin).parent / "proto" / "tinker_public_pb2.py"
    spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, location)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Tinker's protobuf schema from {location}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PRIVATE_NAME] = module
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:  # the SDK's stubs type the messages; nothing is imported at run time
    from tinker.proto import tinker_public_pb2 as pb
else:
    pb = _load()
