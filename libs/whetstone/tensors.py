"""Tensors as they cross process boundaries: dtype, shape and raw little-endian bytes.

Never JSON lists: a ``Tensor`` serialises its payload as base64 of the raw buffer, and converts to
and from numpy and torch without copying more than once.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

DType = Literal["float32", "int64", "int32", "bfloat16"]

_NUMPY: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "bfloat16": np.dtype("<u2"),  # raw bf16 bits; widened to float32 by ``to_numpy``
}


class Tensor(BaseModel):
    """A dense row-major tensor. ``data`` is the little-endian buffer, base64 in JSON."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    dtype: DType
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        kind = array.dtype.kind
        if kind == "f":
            dtype: DType = "float32"
        elif kind in "iub":
            dtype = "int64"
        else:
            raise TypeError(f"unsupported array dtype {array.dtype}")
        buf = np.ascontiguousarray(array, dtype=_NUMPY[dtype])
        return cls(dtype=dtype, shape=tuple(int(d) for d in array.shape), data=buf.tobytes())

    @classmethod
    def from_list(cls, values: list[int] | list[float], dtype: DType) -> Tensor:
        return cls.from_numpy(np.asarray(values, dtype=_NUMPY[dtype]))

    def to_numpy(self) -> np.ndarray:
        """The array in its natural dtype: int32 widens to int64, bf16 to float32."""
        raw = np.frombuffer(self.data, dtype=_NUMPY[self.dtype])
        if self.dtype == "bfloat16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        elif self.dtype == "int32":
            raw = raw.astype(np.int64)
        expected = int(np.prod(self.shape)) if self.shape else 1
        if raw.size != expected:
            raise ValueError(f"tensor of shape {list(self.shape)} holds {raw.size} elements")
        return raw.reshape(self.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1
