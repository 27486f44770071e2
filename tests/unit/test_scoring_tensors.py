"""Datatypes beyond FP32: BYTES (length-prefixed), FP16/INT32/BOOL, and the wire encoding."""

from __future__ import annotations

import numpy as np
import pytest

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.errors import InvalidArgument
from services.scoring.tensors import from_contents, from_raw, to_onnx_input, to_raw


def serialized(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def test_bytes_raw_round_trip() -> None:
    raw = serialized(b"ab", b"", "é".encode())
    array = from_raw(raw, "BYTES", [3, 1], "t")
    assert array.shape == (3, 1) and array.ravel().tolist() == [b"ab", b"", "é".encode()]
    assert to_raw(array, "BYTES") == raw
    assert to_onnx_input(array, "BYTES").ravel().tolist() == ["ab", "", "é"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (serialized(b"ab")[:-1], "runs past the end"),
        (serialized(b"ab") + b"\x01", "inside a length prefix"),
        (serialized(b"a", b"b"), "2 BYTES elements, but shape [3] needs 3"),
    ],
)
def test_malformed_bytes(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_raw(raw, "BYTES", [3], "t")


def test_typed_contents_for_each_kind() -> None:
    assert from_contents(pb.InferTensorContents(bytes_contents=[b"x", b"y"]), "BYTES", [2], "t").tolist() == [
        b"x",
        b"y",
    ]
    fp16 = from_contents(pb.InferTensorContents(fp32_contents=[0.5, 2.0]), "FP16", [1, 2], "t")
    assert fp16.dtype == np.float16 and fp16.tolist() == [[0.5, 2.0]]
    flags = from_contents(pb.InferTensorContents(bool_contents=[True, False]), "BOOL", [2], "t")
    assert flags.dtype == np.bool_ and flags.tolist() == [True, False]
    assert from_contents(pb.InferTensorContents(int_contents=[-3]), "INT32", [1], "t").dtype == np.int32


def test_to_raw_is_little_endian_bytes_of_the_declared_type() -> None:
    assert to_raw(np.array([1, 2], np.int64), "INT64") == np.array([1, 2], "<i8").tobytes()
    assert to_raw(np.array([[1.5]], np.float64), "FP32") == np.array([1.5], "<f4").tobytes()
    assert to_raw(np.array([True, False]), "BOOL") == b"\x01\x00"
