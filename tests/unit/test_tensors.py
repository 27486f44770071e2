import re

import numpy as np
import pytest

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.errors import InvalidArgument
from services.scoring.tensors import from_contents, from_raw


def test_raw_bytes_are_viewed_not_copied_per_element() -> None:
    data = np.arange(6, dtype="<f4")
    array = from_raw(data.tobytes(), "FP32", [2, 3], "x")
    assert array.shape == (2, 3) and array.dtype == np.dtype("<f4")
    assert np.array_equal(array.ravel(), data)


@pytest.mark.parametrize(
    ("raw", "datatype", "shape", "message"),
    [
        (b"\0" * 10, "FP32", [2, 3], "10 bytes, but shape [2, 3] of FP32 needs 24"),
        (b"", "FP32", [-1, 3], "negative dimension"),
        (b"\0" * 4, "COMPLEX", [1], "datatype 'COMPLEX' is not supported"),
    ],
)
def test_bad_raw_tensors_are_invalid_argument(raw: bytes, datatype: str, shape: list[int], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        from_raw(raw, datatype, shape, "x")


def test_typed_contents() -> None:
    contents = pb.InferTensorContents(int64_contents=[1, 2, 3, 4])
    assert from_contents(contents, "INT64", [2, 2], "x").tolist() == [[1, 2], [3, 4]]
    with pytest.raises(InvalidArgument, match="3 values in contents"):
        from_contents(pb.InferTensorContents(fp32_contents=[1, 2, 3]), "FP32", [2, 2], "x")
