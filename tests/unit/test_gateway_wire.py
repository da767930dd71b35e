"""Unit tests for ``services.gateway.wire``: Tinker wire formats <-> Whetstone messages.

Golden vectors come from ``shared/tinker-wire/protocol.md``; the real SDK's own encoder
(``tinker.proto.request_conv``) and decoders (``tinker.proto.response_conv``) check that what we
read and write is what the unmodified client sends and understands. No servers needed.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch
import zstandard
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)
from tinker.types import Datum as SdkDatum
from tinker.types import ForwardBackwardInput, ForwardBackwardRequest, ModelInput, TensorData

from services.gateway import wire
from whetstone.errors import UserError
from whetstone.messages import (
    ForwardBackwardResult,
    SampledSequence,
    SampleResult,
    SamplingParams,
)
from whetstone.tensors import Tensor

FB_REQUEST_151 = base64.b64decode(
    "Cg5zZXNzLTE6dHJhaW46MBABGnQKFAoSChABAAAAAgAAAAMAAAAEAAAAEjgKDXRhcmdldF90b2tlbnMSJwogAgAAAAAA"
    "AAADAAAAAAAAAAQAAAAAAAAABQAAAAAAAAAYAiIBBBIiCgd3ZWlnaHRzEhcKEAAAAAAAAAAAAACAPwAAgD8YASIBBCIN"
    "Y3Jvc3NfZW50cm9weQ=="
)
FB_OUTPUT_163 = base64.b64decode(
    "CgtBcnJheVJlY29yZBJ/CgtBcnJheVJlY29yZBI6ChBlbGVtZW50d2lzZV9sb3NzEiYKEAAAAAAAAAAAAACAPwAAgD8S"
    "EAAAAAAAAAAAEAAAAAAAAAAYARIyCghsb2dwcm9icxImChAAAIC/AACAvwAAgL8AAIC/EhAAAAAAAAAAABAAAAAAAAAA"
    "GAEYARoTCghsb3NzOnN1bREAAAAAAAAAQA=="
)
SAMPLE_RESPONSE_38 = base64.b64decode("ChYIARIIZAAAAGUAAAAaCAAAAL8AAAC/EgwAAMB/AAAAwAAAAMA=")


def sdk_body(data: list[SdkDatum], loss_fn: str = "cross_entropy", **kw: object) -> bytes:
    """A request body exactly as tinker 0.38 builds it (``resources/training.py``)."""
    forward_only = bool(kw.pop("forward_only", False))
    request = ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(
            data=data,
            loss_fn=loss_fn,
            **kw,  # type: ignore[arg-type]
        ),
        model_id="s:train:0",
        seq_id=7,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def simple_request() -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2], "<i4").tobytes()
    return msg


# ---------------------------------------------------------------- forward_backward request


def test_golden_forward_backward_request() -> None:
    assert len(FB_REQUEST_151) == 151
    model_id, seq_id, cmd = wire.decode_forward_backward(FB_REQUEST_151, None)
    assert (model_id, seq_id) == ("sess-1:train:0", 1)
    assert cmd.loss_fn == "cross_entropy" and not cmd.forward_only and cmd.loss_fn_config == {}
    (datum,) = cmd.data
    assert datum.model_input.dtype == "int64" and datum.model_input.shape == (4,)
    assert datum.model_input.to_numpy().tolist() == [1, 2, 3, 4]
    target, weights = datum.loss_fn_inputs["target_tokens"], datum.loss_fn_inputs["weights"]
    assert (target.dtype, target.shape, target.to_numpy().tolist()) == ("int64", (4,), [2, 3, 4, 5])
    assert (weights.dtype, weights.shape) == ("float32", (4,))
    assert weights.to_numpy().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_zstd_body_matches_plain() -> None:
    compressed = zstandard.ZstdCompressor().compress(FB_REQUEST_151)
    assert wire.decode_forward_backward(compressed, "zstd") == wire.decode_forward_backward(
        FB_REQUEST_151, "identity"
    )
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(FB_REQUEST_151)
    assert wire.decode_forward_backward(streamed, "ZSTD")[0] == "sess-1:train:0"


@pytest.mark.parametrize(
    "body, encoding, message",
    [
        (b"\xff\xff\xff\xff garbage", None, "malformed ForwardBackwardRequest protobuf"),
        (b"not zstd at all", "zstd", "malformed zstd"),
        (zstandard.ZstdCompressor().compress(FB_REQUEST_151)[:-4], "zstd", "malformed zstd"),
        (FB_REQUEST_151, "gzip", "Content-Encoding"),
    ],
)
def test_unreadable_bodies(body: bytes, encoding: str | None, message: str) -> None:
    with pytest.raises(UserError, match=message):
        wire.decode_forward_backward(body, encoding)


def test_sdk_sparse_csr_inputs_are_densified() -> None:
    target = torch.zeros(4, 3, dtype=torch.int64)
    target[1, 2], target[3, 0] = 7, 9
    weights = torch.zeros(4, 3)
    weights[0, 1] = 0.5
    datum = SdkDatum(
        model_input=ModelInput.from_ints([10, 11, 12, 13]),
        loss_fn_inputs={"target_tokens": target, "weights": weights},
    )
    body = sdk_body([datum], loss_fn_config={"clip": 0.2, "loss_id": "abc"}, forward_only=True)
    sent = pb.ForwardBackwardRequest.FromString(body).data[0].loss_fn_inputs
    assert sent["target_tokens"].WhichOneof("encoding") == "sparse_csr"  # the trap we must handle
    assert sent["weights"].WhichOneof("encoding") == "sparse_csr"

    model_id, seq_id, cmd = wire.decode_forward_backward(body, None)
    assert (model_id, seq_id, cmd.forward_only) == ("s:train:0", 7, True)
    assert cmd.loss_fn_config == {"clip": pytest.approx(0.2), "loss_id": "abc"}
    inputs = cmd.data[0].loss_fn_inputs
    assert inputs["target_tokens"].dtype == "int64" and inputs["target_tokens"].shape == (4, 3)
    np.testing.assert_array_equal(inputs["target_tokens"].to_numpy(), target.numpy())
    assert inputs["weights"].dtype == "float32"
    np.testing.assert_array_equal(inputs["weights"].to_numpy(), weights.numpy())


def test_sdk_dense_multi_datum_and_chunks() -> None:
    data = [
        SdkDatum(
            model_input=ModelInput.from_ints(list(range(n))),
            loss_fn_inputs={"target_tokens": list(range(1, n + 1)), "advantages": [0.5] * n},
        )
        for n in (3, 5)
    ]
    _, _, cmd = wire.decode_forward_backward(sdk_body(data, loss_fn="importance_sampling"), None)
    assert [d.model_input.shape for d in cmd.data] == [(3,), (5,)]
    assert cmd.data[1].loss_fn_inputs["advantages"].to_numpy().tolist() == [0.5] * 5

    msg = simple_request()  # several encoded_text chunks concatenate into one sequence
    msg.data[0].model_input.add().encoded_text.tokens = np.array([3], "<i4").tobytes()
    _, _, cmd = wire.decode_forward_backward(msg.SerializeToString(), None)
    assert cmd.data[0].model_input.to_numpy().tolist() == [1, 2, 3]


def test_loss_fn_config_v2_wins_over_legacy() -> None:
    msg = simple_request()
    msg.loss_fn_config["a"] = 1.0
    msg.loss_fn_config["b"] = 2.0
    msg.loss_fn_config_v2["b"].number = 3.0
    msg.loss_fn_config_v2["c"].text = "x"
    _, _, cmd = wire.decode_forward_backward(msg.SerializeToString(), None)
    assert cmd.loss_fn_config == {"a": 1.0, "b": 3.0, "c": "x"}


def test_int32_and_bfloat16_inputs_are_widened() -> None:
    msg = simple_request()
    inputs = msg.data[0].loss_fn_inputs
    inputs["target_tokens"].CopyFrom(
        pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2], dense=np.array([5, -1], "<i4").tobytes())
    )
    bf16 = (np.array([1.5, -2.0], "<f4").view("<u4") >> 16).astype("<u2")
    inputs["weights"].CopyFrom(pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[2], dense=bf16.tobytes()))
    _, _, cmd = wire.decode_forward_backward(msg.SerializeToString(), None)
    got = cmd.data[0].loss_fn_inputs
    assert got["target_tokens"].dtype == "int64"
    assert got["target_tokens"].to_numpy().tolist() == [5, -1]
    assert got["weights"].dtype == "float32" and got["weights"].to_numpy().tolist() == [1.5, -2.0]


F32 = pb.DTYPE_FLOAT32


def _with_input(tensor: pb.Tensor) -> bytes:
    msg = simple_request()
    msg.data[0].loss_fn_inputs["weights"].CopyFrom(tensor)
    return msg.SerializeToString()


@pytest.mark.parametrize(
    "body, message",
    [
        (_with_input(pb.Tensor(dtype=F32, shape=[2], dense=b"\0" * 7)), "not a multiple of 4"),
        (_with_input(pb.Tensor(dtype=F32, shape=[3], dense=b"\0" * 8)), "do not fill shape"),
        (_with_input(pb.Tensor(dtype=F32, shape=[2], dense=b"\0" * 8)), None),
        (_with_input(pb.Tensor(dtype=0, shape=[2], dense=b"\0" * 8)), "unsupported tensor dtype"),
        (
            _with_input(
                pb.Tensor(
                    dtype=pb.DTYPE_FLOAT32,
                    shape=[2, 2],
                    sparse_csr=pb.SparseCsr(
                        values=np.array([1.0], "<f4").tobytes(),
                        crow_indices=np.array([0, 1, 1], "<i8").tobytes(),
                        col_indices=np.array([5], "<i8").tobytes(),
                    ),
                )
            ),
            "col_indices outside",
        ),
        (
            _with_input(
                pb.Tensor(
                    dtype=pb.DTYPE_FLOAT32,
                    shape=[4],
                    sparse_csr=pb.SparseCsr(values=b"", crow_indices=b"", col_indices=b""),
                )
            ),
            "needs a 2-D shape",
        ),
    ],
)
def test_bad_tensors(body: bytes, message: str | None) -> None:
    if message is None:  # the control case decodes fine
        wire.decode_forward_backward(body, None)
        return
    with pytest.raises(UserError, match=message):
        wire.decode_forward_backward(body, None)


def test_image_and_odd_token_chunks_are_user_errors() -> None:
    msg = simple_request()
    msg.data[0].model_input.add().image.CopyFrom(pb.ImageChunk(data=b"\x89PNG", format="png"))
    with pytest.raises(UserError, match="image inputs are not supported by this base model"):
        wire.decode_forward_backward(msg.SerializeToString(), None)
    msg = simple_request()
    msg.data[0].model_input[0].encoded_text.tokens = b"\1\0\0"
    with pytest.raises(UserError, match="multiple of 4"):
        wire.decode_forward_backward(msg.SerializeToString(), None)


# ---------------------------------------------------------------- forward_backward result


def test_golden_forward_backward_output() -> None:
    result = ForwardBackwardResult(
        outputs=[
            {
                "logprobs": Tensor.from_list([-1.0] * 4, "float32"),
                "elementwise_loss": Tensor.from_list([0, 0, 1, 1], "float32"),
            }
        ],
        metrics={"loss:sum": 2.0},
    )
    ours = pb.ForwardBackwardOutput.FromString(wire.encode_forward_backward_output(result))
    golden = pb.ForwardBackwardOutput.FromString(FB_OUTPUT_163)
    assert ours.loss_fn_output_type == golden.loss_fn_output_type == "ArrayRecord"
    assert dict(ours.metrics) == dict(golden.metrics) == {"loss:sum": 2.0}
    (record,) = ours.loss_fn_outputs
    (golden_record,) = golden.loss_fn_outputs
    assert record.type_tag == golden_record.type_tag == "ArrayRecord"
    assert record.num_datums == golden_record.num_datums == 1
    assert dict(record.fields) == dict(golden_record.fields)
    assert ours == golden  # message equality ignores map order


def test_forward_backward_output_through_sdk_decoder() -> None:
    result = ForwardBackwardResult(
        outputs=[
            {
                "logprobs": Tensor.from_list([-0.5, -1.5], "float32"),
                "topk": Tensor.from_numpy(np.arange(6, dtype=np.int64).reshape(2, 3)),
            },
            {
                "logprobs": Tensor.from_list([-2.0, -3.0, -4.0], "float32"),
                "topk": Tensor.from_numpy(np.arange(9, dtype=np.int64).reshape(3, 3) + 100),
            },
        ],
        metrics={"loss:sum": 11.0, "tokens:mean": 2.5},
    )
    body = wire.encode_forward_backward_output(result)
    record = pb.ForwardBackwardOutput.FromString(body).loss_fn_outputs[0]
    assert np.frombuffer(record.fields["logprobs"].offsets, "<i8").tolist() == [0, 8, 20]
    assert list(record.fields["topk"].trailing_shape) == [3]

    out = deserialize_forward_backward_output(body)
    assert out.loss_fn_output_type == "ArrayRecord"
    assert out.metrics == {"loss:sum": 11.0, "tokens:mean": 2.5}
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-0.5, -1.5]
    assert out.loss_fn_outputs[1]["logprobs"].tolist() == [-2.0, -3.0, -4.0]
    topk = out.loss_fn_outputs[1]["topk"]
    assert (topk.dtype, topk.shape) == ("int64", [3, 3])
    np.testing.assert_array_equal(topk.to_numpy(), np.arange(9).reshape(3, 3) + 100)


def test_forward_backward_output_rejects_inconsistent_fields() -> None:
    ragged = ForwardBackwardResult(
        outputs=[{"logprobs": Tensor.from_list([0.0], "float32")}, {}], metrics={}
    )
    with pytest.raises(AssertionError):
        wire.encode_forward_backward_output(ragged)


# ---------------------------------------------------------------- sampling


def _golden_sample_result() -> SampleResult:
    return SampleResult(
        sequences=[
            SampledSequence(
                tokens=Tensor.from_list([100, 101], "int64"),
                logprobs=Tensor.from_list([-0.5, -0.5], "float32"),
                stop_reason="length",
            )
        ],
        prompt_logprobs=Tensor.from_list([math.nan, -2.0, -2.0], "float32"),
    )


def test_golden_sample_response() -> None:
    body = wire.encode_sample_response(_golden_sample_result())
    ours = pb.SampleResponse.FromString(body)
    golden = pb.SampleResponse.FromString(SAMPLE_RESPONSE_38)
    assert ours.sequences == golden.sequences
    assert ours.prompt_logprobs == golden.prompt_logprobs  # bytes: NaN's bit pattern included
    assert ours == golden


def test_sample_response_through_sdk_decoder() -> None:
    result = _golden_sample_result()
    result.sequences.append(
        SampledSequence(
            tokens=Tensor.from_list([7], "int64"),
            logprobs=Tensor.from_list([-0.25], "float32"),
            stop_reason="stop",
        )
    )
    out = deserialize_sample_response(wire.encode_sample_response(result))
    assert [s.stop_reason for s in out.sequences] == ["length", "stop"]
    assert out.sequences[0].tokens == [100, 101] and out.sequences[1].logprobs == [-0.25]
    assert out.prompt_logprobs == [None, -2.0, -2.0]
    no_prompt = wire.encode_sample_response(SampleResult(sequences=result.sequences))
    assert deserialize_sample_response(no_prompt).prompt_logprobs is None


def test_model_input_from_json() -> None:
    text = [{"tokens": [5, 6, 7], "type": "encoded_text"}, {"tokens": [8], "type": "encoded_text"}]
    chunks = {"chunks": text}
    prompt = wire.model_input_from_json(chunks)
    assert (prompt.dtype, prompt.shape, prompt.to_numpy().tolist()) == ("int64", (4,), [5, 6, 7, 8])
    image = {"chunks": [{"type": "image", "data": "AA==", "format": "png"}]}
    with pytest.raises(UserError, match="image inputs are not supported"):
        wire.model_input_from_json(image)
    for bad in ({}, {"chunks": [{"type": "encoded_text", "tokens": [1.5]}]}, {"chunks": [3]}):
        with pytest.raises(UserError):
            wire.model_input_from_json(bad)


def test_sampling_params_from_json() -> None:
    captured = {
        "max_tokens": 3,
        "seed": 1,
        "stop": ["\n\n", "END"],
        "temperature": 0.7,
        "top_k": -1,
        "top_p": 1.0,
    }
    params = wire.sampling_params_from_json(captured)
    assert params == SamplingParams(
        max_tokens=3,
        seed=1,
        temperature=0.7,
        top_k=-1,
        top_p=1.0,
        stop_strings=["\n\n", "END"],
        stop_on_eos=False,
    )
    default = wire.sampling_params_from_json({"temperature": 1.0})
    assert default == SamplingParams()  # missing max_tokens keeps the model default; EOS stops
    assert wire.sampling_params_from_json({"stop": "###"}).stop_strings == ["###"]
    ids = wire.sampling_params_from_json({"stop": [151645]})
    assert (ids.stop_token_ids, ids.stop_strings, ids.stop_on_eos) == ([151645], [], False)
    none = wire.sampling_params_from_json({"stop": []})
    assert (none.stop_token_ids, none.stop_strings, none.stop_on_eos) == ([], [], False)


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 0},
        {"max_tokens": 2.5},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": 0},
        {"top_k": -2},
        {"stop": ["a", 1]},
        {"stop": 3},
        {"seed": "x"},
    ],
)
def test_sampling_params_validation(params: dict[str, object]) -> None:
    with pytest.raises(UserError):
        wire.sampling_params_from_json(params)


def test_tensor_from_json_dense_and_csr() -> None:
    dense = wire.tensor_from_json({"data": [1, 2, 3, 4, 5, 6], "dtype": "int64", "shape": [2, 3]})
    assert dense.shape == (2, 3) and dense.to_numpy().tolist() == [[1, 2, 3], [4, 5, 6]]
    flat = wire.tensor_from_json({"data": [0.5, 1.0], "dtype": "float32"})
    assert (flat.dtype, flat.shape) == ("float32", (2,))

    source = torch.zeros(5, 4, dtype=torch.int64)
    source[0, 3], source[4, 1] = 11, 12
    td = TensorData.from_torch_sparse(source)
    assert td.sparse_crow_indices is not None
    as_json = {
        "data": td.data,
        "dtype": td.dtype,
        "shape": td.shape,
        "sparse_crow_indices": td.sparse_crow_indices,
        "sparse_col_indices": td.sparse_col_indices,
    }
    np.testing.assert_array_equal(wire.tensor_from_json(as_json).to_numpy(), source.numpy())

    for bad in (
        {"data": [1, 2, 3], "dtype": "int64", "shape": [2, 2]},
        {"data": [1], "dtype": "bool"},
        {"data": [1.5], "dtype": "int64"},
        {**as_json, "shape": None},
    ):
        with pytest.raises(UserError):
            wire.tensor_from_json(bad)


def test_json_results_for_clients_without_protobuf() -> None:
    fb = ForwardBackwardResult(
        outputs=[{"logprobs": Tensor.from_list([-1.0, -0.5], "float32")}], metrics={"loss:sum": 1.5}
    )
    assert wire.forward_backward_output_json(fb) == {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{"logprobs": {"data": [-1.0, -0.5], "dtype": "float32", "shape": [2]}}],
        "metrics": {"loss:sum": 1.5},
    }
    sample = SampleResult(
        sequences=[
            SampledSequence(
                tokens=Tensor.from_list([7, 8], "int64"),
                logprobs=Tensor.from_list([-0.25, -0.5], "float32"),
                stop_reason="stop",
            )
        ],
        prompt_logprobs=Tensor.from_list([math.nan, -2.0], "float32"),
    )
    assert wire.sample_response_json(sample) == {
        "type": "sample",
        "sequences": [{"stop_reason": "stop", "tokens": [7, 8], "logprobs": [-0.25, -0.5]}],
        "prompt_logprobs": [None, -2.0],
    }
