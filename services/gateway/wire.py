"""Translation between Tinker's wire formats and Whetstone's internal messages.

The gateway is the only place that knows Tinker's protobuf (``tinker_public``, the schema module
the SDK itself ships) and its JSON shapes; everything behind it speaks ``whetstone.messages``.
These are pure functions, no I/O: request bodies in, messages out (decode), and results in, body
bytes out (encode). Anything the caller could fix raises ``UserError`` so that the gateway answers
400 (or fails the future with category ``user``); an inconsistent *result* is our bug and trips an
assertion instead.

Decoding normalises at the edge so that workers see one representation: token ids become one int64
tensor per datum, every loss input becomes a dense little-endian buffer (sparse CSR densified,
int32 and bf16 widened to int64 and float32), and the two loss-config maps become one.

Reference: ``shared/tinker-wire/protocol.md`` sections 5.1-5.9.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeGuard

import numpy as np
import zstandard
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from services.gateway.tinker_schema import pb
from services.gateway.validation import user_error
from whetstone.errors import UserError
from whetstone.messages import (
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    SampleResult,
    SamplingParams,
    TopkLogprobs,
)
from whetstone.tensors import DType, Tensor

JsonObject = Mapping[str, object]

# A decompressed body or a densified CSR tensor can be far larger than the bytes that carried it;
# these caps turn a zip bomb or an absurd sparse shape into a clear user error, not an OOM.
MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024
MAX_DENSE_ELEMENTS = 1 << 26

IMAGE_UNSUPPORTED = "image inputs are not supported by this base model"
DMEL_UNSUPPORTED = "dmel (audio) inputs are not supported by this base model"

# proto DType -> (numpy dtype of the wire bytes, the Whetstone dtype it is widened to)
_PROTO_DTYPES: dict[int, tuple[np.dtype, DType]] = {
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), "float32"),
    pb.DTYPE_INT64: (np.dtype("<i8"), "int64"),
    pb.DTYPE_INT32: (np.dtype("<i4"), "int64"),
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), "float32"),
}
_TO_PROTO_DTYPE: dict[DType, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "int64": pb.DTYPE_INT64,
    "int32": pb.DTYPE_INT32,
    "bfloat16": pb.DTYPE_BFLOAT16,
}
_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


# ---------------------------------------------------------------- forward_backward request


def decode_forward_backward(
    body: bytes, content_encoding: str | None
) -> tuple[str, int, ForwardBackward]:
    """Parse a ``ForwardBackwardRequest`` body into ``(model_id, seq_id, command)``."""
    request = parse_forward_backward(body, content_encoding)
    return request.model_id, request.seq_id, forward_backward_command(request)


def parse_forward_backward(body: bytes, content_encoding: str | None) -> pb.ForwardBackwardRequest:
    """The protobuf of a forward_backward body, not yet translated: once this succeeds the
    request's ``model_id`` and ``seq_id`` are known, so a later refusal can fill its seq_id.

    The SDK zstd-compresses the body only when client/config opts in (``proto_compress_fwdbwd``),
    and HTTP frameworks do not undo request encodings, so it is done here.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "zstd":
        body = _zstd_decompress(body)
    elif encoding != "identity":
        raise UserError(f"unsupported Content-Encoding {content_encoding!r} (only zstd)")
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise UserError(f"malformed ForwardBackwardRequest protobuf: {exc}") from exc
    return request


def forward_backward_command(request: pb.ForwardBackwardRequest) -> ForwardBackward:
    """A parsed ``ForwardBackwardRequest`` as the trainer's command, tensors normalised."""
    data = [_datum_from_proto(i, datum) for i, datum in enumerate(request.data)]
    # The SDK writes numbers to both maps and strings only to v2; v2 is authoritative.
    config: dict[str, float | str] = {k: float(v) for k, v in request.loss_fn_config.items()}
    for key, value in request.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind == "number":
            config[key] = float(value.number)
        elif kind == "text":
            config[key] = value.text
    return ForwardBackward(
        data=data,
        loss_fn=request.loss_fn,
        loss_fn_config=config,
        forward_only=request.forward_only,
    )


def _zstd_decompress(body: bytes) -> bytes:
    """One zstd frame, with its declared size checked before anything is allocated."""
    try:
        declared = zstandard.frame_content_size(body)  # -1 when the header does not say
        if declared > MAX_DECOMPRESSED_BYTES:
            raise UserError(f"zstd body declares {declared} bytes, over {MAX_DECOMPRESSED_BYTES}")
        # Without a declared size, max_output_size caps the output (and an overrun is an error).
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_DECOMPRESSED_BYTES)
    except zstandard.ZstdError as exc:
        raise UserError(f"malformed zstd request body: {exc}") from exc


def _datum_from_proto(index: int, datum: pb.Datum) -> Datum:
    tokens: list[np.ndarray] = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind == "encoded_text":
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise UserError(
                    f"data[{index}]: encoded_text tokens hold {len(raw)} bytes, "
                    "not a multiple of 4 (int32)"
                )
            tokens.append(np.frombuffer(raw, dtype="<i4"))
        elif kind == "image":
            raise UserError(IMAGE_UNSUPPORTED)
        elif kind == "dmel":
            raise UserError(DMEL_UNSUPPORTED)
        else:
            raise UserError(f"data[{index}]: model_input chunk without content")
    ids = np.concatenate(tokens) if tokens else np.zeros(0, dtype="<i4")
    inputs = {
        name: _tensor_from_proto(f"data[{index}].loss_fn_inputs[{name!r}]", tensor)
        for name, tensor in datum.loss_fn_inputs.items()
    }
    return Datum(model_input=Tensor.from_numpy(ids.astype("<i8")), loss_fn_inputs=inputs)


def _tensor_from_proto(where: str, msg: pb.Tensor) -> Tensor:
    if msg.dtype not in _PROTO_DTYPES:
        name = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype
        raise UserError(f"{where}: unsupported tensor dtype {name}")
    wire_dtype, dtype = _PROTO_DTYPES[msg.dtype]
    shape = tuple(int(d) for d in msg.shape)
    encoding = msg.WhichOneof("encoding")
    if encoding == "sparse_csr":
        csr = msg.sparse_csr
        values = _frombytes(where, "sparse_csr.values", csr.values, wire_dtype)
        crow = _frombytes(where, "sparse_csr.crow_indices", csr.crow_indices, np.dtype("<i8"))
        col = _frombytes(where, "sparse_csr.col_indices", csr.col_indices, np.dtype("<i8"))
        array = _densify_csr(where, values, crow, col, shape)
    else:  # dense, or no payload at all (an empty tensor)
        flat = _frombytes(where, "dense", msg.dense, wire_dtype)
        # The SDK omits shape only when it had none; a flat vector is the only sane reading.
        array = flat.reshape(_check_shape(where, shape, flat.size) if shape else (flat.size,))
    return _widened(array, dtype)


def _frombytes(where: str, part: str, raw: bytes, dtype: np.dtype) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise UserError(
            f"{where}: {part} holds {len(raw)} bytes, not a multiple of {dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype)


def _widened(array: np.ndarray, dtype: DType) -> Tensor:
    """int32 -> int64 and raw bf16 bits -> float32, so workers only see two dtypes."""
    if array.dtype == np.dtype("<u2"):
        array = (array.astype(np.uint32) << 16).view(np.float32)
    wide = np.ascontiguousarray(array, dtype="<i8" if dtype == "int64" else "<f4")
    return Tensor(dtype=dtype, shape=tuple(int(d) for d in array.shape), data=wide.tobytes())


def _check_shape(where: str, shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    if any(d < 0 for d in shape):
        raise UserError(f"{where}: negative dimension in shape {list(shape)}")
    if math.prod(shape) != size:
        raise UserError(f"{where}: {size} elements do not fill shape {list(shape)}")
    return shape


def _densify_csr(
    where: str, values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """CSR -> dense with implicit zeros (the pad value of every training input)."""
    if len(shape) != 2 or min(shape) < 0:
        raise UserError(f"{where}: sparse CSR needs a 2-D shape, got {list(shape)}")
    rows, cols = shape
    if rows * cols > MAX_DENSE_ELEMENTS:
        raise UserError(f"{where}: shape {list(shape)} is too large to densify")
    nnz = values.size
    if crow.size != rows + 1 or col.size != nnz:
        raise UserError(
            f"{where}: sparse CSR of shape {list(shape)} needs {rows + 1} crow_indices and "
            f"{nnz} col_indices, got {crow.size} and {col.size}"
        )
    if crow[0] != 0 or crow[-1] != nnz or np.any(np.diff(crow) < 0):
        raise UserError(f"{where}: crow_indices must rise from 0 to {nnz}")
    if nnz and (col.min() < 0 or col.max() >= cols):
        raise UserError(f"{where}: col_indices outside [0, {cols})")
    dense = np.zeros((rows, cols), dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense


# ---------------------------------------------------------------- forward_backward result


def encode_forward_backward_output(result: ForwardBackwardResult) -> bytes:
    """One ``ArrayRecord`` holding every datum: each field is a ``BatchedTensor`` whose per-datum
    slices are found by byte ``offsets`` and reshaped by ``trailing_shape`` (protocol.md 5.6)."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(result.outputs))
    names = set(result.outputs[0]) if result.outputs else set()
    for i, datum in enumerate(result.outputs):
        assert set(datum) == names, f"datum {i} has outputs {sorted(datum)}, not {sorted(names)}"
    for name in sorted(names):
        tensors = [datum[name] for datum in result.outputs]
        dtype, trailing = tensors[0].dtype, tensors[0].shape[1:]
        offsets = [0]
        for t in tensors:
            # One record cannot hold ragged trailing shapes or mixed dtypes; the trainer never
            # produces them, so finding one here is a bug on our side, not the client's.
            assert t.dtype == dtype and t.shape[1:] == trailing, f"{name}: ragged outputs"
            offsets.append(offsets[-1] + len(t.data))
        record.fields[name].CopyFrom(
            pb.BatchedTensor(
                data=b"".join(t.data for t in tensors),
                offsets=np.asarray(offsets, dtype="<i8").tobytes(),
                dtype=pb.DType.Value(pb.DType.Name(_TO_PROTO_DTYPE[dtype])),
                trailing_shape=trailing,
            )
        )
    for key, value in result.metrics.items():
        # The client raises on any key without exactly one ':' (protocol.md 4.6).
        assert key.count(":") == 1, f"metric key {key!r} is not name:reduction"
        out.metrics[key] = value
    encoded: bytes = out.SerializeToString()  # protobuf has no stubs installed: name the type
    return encoded


# ---------------------------------------------------------------- sampling


def encode_sample_response(result: SampleResult) -> bytes:
    """``SampleResponse``: int32 tokens and float32 logprobs per sequence, and float32 prompt
    logprobs with NaN where none was computed (the client turns NaN into None)."""
    out = pb.SampleResponse()
    for seq in result.sequences:
        tokens = seq.tokens.to_numpy()
        logprobs = seq.logprobs.to_numpy()
        assert tokens.size == logprobs.size, "one logprob per sampled token"
        added = out.sequences.add(
            stop_reason=_STOP_REASONS[seq.stop_reason],
            tokens=tokens.astype("<i4").tobytes(),
            logprobs=logprobs.astype("<f4").tobytes(),
        )
        if seq.topk_logprobs is not None:
            _fill_topk(added.topk_sampled_logprobs, seq.topk_logprobs)
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = result.prompt_logprobs.to_numpy().astype("<f4").tobytes()
    if result.topk_prompt_logprobs is not None:
        _fill_topk(out.topk_prompt_logprobs, result.topk_prompt_logprobs)
    if result.target_prompt_logprobs is not None:
        _fill_tensor(
            out.target_prompt_logprobs,
            result.target_prompt_logprobs.to_numpy(),
            csr=result.target_prompt_csr,
        )
    if result.prompt_alt_tokens is not None:
        _fill_tensor(out.prompt_alt_tokens.tokens, result.prompt_alt_tokens.token_ids.to_numpy())
        _fill_tensor(out.prompt_alt_tokens.logprobs, result.prompt_alt_tokens.logprobs.to_numpy())
    out.prompt_cache_hit_tokens = result.prompt_cache_hit_tokens
    encoded: bytes = out.SerializeToString()  # protobuf has no stubs installed: name the type
    return encoded


def _fill_topk(msg: pb.TopkLogprobs, topk: TopkLogprobs) -> None:
    """``TopkLogprobs``: int32 ids and float32 logprobs, row-major ``length x k``."""
    ids, values = topk.token_ids.to_numpy(), topk.logprobs.to_numpy()
    msg.length, msg.k = ids.shape
    msg.token_ids = ids.astype("<i4").tobytes()
    msg.logprobs = values.astype("<f4").tobytes()


def _fill_tensor(msg: pb.Tensor, array: np.ndarray, csr: bool = False) -> None:
    """A float32 or int64 proto ``Tensor``; sparse CSR (the nonzero cells) when ``csr``."""
    floating = array.dtype.kind == "f"
    wire = np.dtype("<f4") if floating else np.dtype("<i8")
    msg.dtype = pb.DTYPE_FLOAT32 if floating else pb.DTYPE_INT64
    msg.shape.extend(int(d) for d in array.shape)
    if csr and array.ndim == 2:
        rows, cols = np.nonzero(array)
        crow = np.zeros(array.shape[0] + 1, dtype="<i8")
        np.cumsum(np.bincount(rows, minlength=array.shape[0]), out=crow[1:])
        msg.sparse_csr.values = array[rows, cols].astype(wire).tobytes()
        msg.sparse_csr.crow_indices = crow.tobytes()
        msg.sparse_csr.col_indices = cols.astype("<i8").tobytes()
    else:
        msg.dense = np.ascontiguousarray(array, dtype=wire).tobytes()


def target_prompt_logprobs_from_json(td: JsonObject) -> tuple[Tensor, bool]:
    """asample's ``target_prompt_logprobs`` (int64 ``[len(prompt) - 1, K]``, -1: nothing) as a
    dense tensor, and whether it came as sparse CSR (its unlisted cells request nothing)."""
    if td.get("dtype") != "int64":
        raise UserError("target_prompt_logprobs must be an int64 tensor of token ids")
    csr = td.get("sparse_crow_indices") is not None or td.get("sparse_col_indices") is not None
    if not csr:
        return tensor_from_json(td), False
    # Shift by one so that CSR's implicit zeros become -1 ("nothing requested").
    data = td.get("data")
    shifted = [v + 1 for v in data] if isinstance(data, list) and all(map(_is_int, data)) else data
    dense = tensor_from_json({**td, "data": shifted}).to_numpy() - 1
    return Tensor.from_numpy(dense), True


def model_input_from_json(model_input: JsonObject) -> Tensor:
    """The JSON ``ModelInput`` of ``asample`` -> the prompt as one int64 tensor."""
    chunks = model_input.get("chunks")
    if not isinstance(chunks, list):
        raise UserError("model input needs a 'chunks' list")
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        chunk = chunk if isinstance(chunk, Mapping) else {}
        kind, tokens = chunk.get("type", "encoded_text"), chunk.get("tokens")
        if kind in ("image", "image_asset_pointer"):
            raise UserError(IMAGE_UNSUPPORTED)
        if kind == "dmel":
            raise UserError(DMEL_UNSUPPORTED)
        if kind != "encoded_text" or not (isinstance(tokens, list) and all(map(_is_int64, tokens))):
            raise UserError(f"chunks[{i}] is not an encoded_text chunk with integer tokens")
        ids.extend(tokens)
    return Tensor.from_list(ids, "int64")


def sampling_params_from_json(params: JsonObject) -> SamplingParams:
    """asample's ``sampling_params``, validated; ``stop`` is split by kind (protocol.md 5.8).

    JSON types are checked here (no string or bool passes for a number); the ranges are the
    rules of ``SamplingParams`` itself."""
    fields: dict[str, object] = {}
    max_tokens = params.get("max_tokens")
    if max_tokens is not None:  # absent: the model default
        if not _is_int(max_tokens):
            raise UserError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        fields["max_tokens"] = max_tokens
    temperature = _number(params, "temperature", 1.0)
    top_p = _number(params, "top_p", 1.0)
    top_k = _get(params, "top_k", -1)
    if not _is_int(top_k):
        raise UserError(f"top_k must be -1 (off) or an integer >= 1, got {top_k!r}")
    seed = params.get("seed")
    if seed is not None and not _is_int(seed):
        raise UserError(f"seed must be an integer, got {seed!r}")
    fields.update(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)

    stop = params.get("stop")
    if stop is not None:
        # Any explicit stop replaces EOS stopping; [] therefore disables every stop.
        fields["stop_on_eos"] = False
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list):
            raise UserError(f"stop must be a string or a list, got {type(stop).__name__}")
        if all(isinstance(s, str) for s in stop):
            fields["stop_strings"] = stop
        elif all(map(_is_int, stop)):
            fields["stop_token_ids"] = stop
        else:
            raise UserError("stop must list only strings or only token ids")
    try:
        return SamplingParams.model_validate(fields)
    except ValidationError as exc:
        raise user_error(exc, "sampling_params") from exc


def tensor_from_json(td: JsonObject) -> Tensor:
    """JSON ``TensorData`` -> dense Tensor; sparse CSR is densified with pad value 0."""
    dtype, data, shape = td.get("dtype"), td.get("data"), td.get("shape")
    if dtype not in ("int64", "float32"):
        raise UserError(f"tensor dtype must be 'int64' or 'float32', got {dtype!r}")
    valid = _is_int64 if dtype == "int64" else _is_number
    if not isinstance(data, list) or not all(map(valid, data)):
        raise UserError(f"tensor data must be a flat list of {dtype} values")
    if shape is not None and not (isinstance(shape, list) and all(map(_is_int, shape))):
        raise UserError("tensor shape must be a list of integers")
    values = np.asarray(data, dtype="<i8" if dtype == "int64" else "<f4").reshape(-1)
    crow, col = td.get("sparse_crow_indices"), td.get("sparse_col_indices")
    if crow is None and col is None:
        dims = tuple(shape) if shape is not None else (values.size,)
        array = values.reshape(_check_shape("tensor", dims, values.size))
    else:
        if not all(isinstance(x, list) and all(map(_is_int64, x)) for x in (crow, col)):
            raise UserError("sparse CSR needs integer sparse_crow_indices and sparse_col_indices")
        if shape is None:
            raise UserError("sparse CSR tensor needs a shape")
        array = _densify_csr(
            "tensor", values, np.asarray(crow, dtype="<i8"), np.asarray(col, dtype="<i8"), shape
        )
    return _widened(array, dtype)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int64(value: object) -> TypeGuard[int]:
    return _is_int(value) and -(2**63) <= value < 2**63


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(params: JsonObject, key: str, default: object) -> object:
    """JSON null means "not given", as the SDK serialises with exclude_none anyway."""
    value = params.get(key)
    return default if value is None else value


def _number(params: JsonObject, key: str, default: float) -> float:
    value = _get(params, key, default)
    if not _is_number(value):
        raise UserError(f"{key} must be a number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- JSON results (no protobuf)


def _tensor_json(tensor: Tensor) -> dict[str, object]:
    array = tensor.to_numpy()
    return {
        "data": array.reshape(-1).tolist(),
        "dtype": "int64" if array.dtype.kind in "iu" else "float32",
        "shape": list(array.shape),
    }


def forward_backward_output_json(result: ForwardBackwardResult) -> dict[str, object]:
    """The JSON form of ForwardBackwardOutput, for clients that do not take protobuf (hpcai)."""
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{k: _tensor_json(v) for k, v in out.items()} for out in result.outputs],
        "metrics": result.metrics,
    }


def sample_response_json(result: SampleResult) -> dict[str, object]:
    body: dict[str, object] = {
        "type": "sample",
        "sequences": [
            {
                "stop_reason": seq.stop_reason,
                "tokens": seq.tokens.to_numpy().tolist(),
                "logprobs": seq.logprobs.to_numpy().tolist(),
            }
            for seq in result.sequences
        ],
    }
    if result.prompt_logprobs is not None:
        body["prompt_logprobs"] = [
            None if v != v else v for v in result.prompt_logprobs.to_numpy().tolist()
        ]
    return body
