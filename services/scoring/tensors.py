"""Open Inference Protocol tensors <-> numpy, without per-element Python on raw bytes.

Fixed-size datatypes are viewed in place with numpy.frombuffer. BYTES tensors (Triton's
4-byte little-endian length prefix before each element) are variable-length by nature, so
they are the one datatype decoded element by element; no hot-path model takes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from services.runtime.errors import InvalidArgument

# OIP datatype -> little-endian numpy dtype (BYTES handled separately).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
DATATYPES: frozenset[str] = frozenset((*DTYPES, BYTES))
# ONNX Runtime's type names for the same.
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
# Which InferTensorContents field carries each datatype when typed contents are used.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = np.dtype("<u4")


def dtype_of(datatype: str, tensor: str) -> np.dtype:
    try:
        return DTYPES[datatype]
    except KeyError:
        known = ", ".join(sorted(DATATYPES))
        raise InvalidArgument(
            f"input {tensor!r}: datatype {datatype!r} is not supported here; use one of {known}"
        ) from None


def element_count(shape: Sequence[int], tensor: str) -> int:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {tensor!r}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def from_raw(raw: bytes, datatype: str, shape: Sequence[int], tensor: str) -> np.ndarray:
    if datatype == BYTES:
        return _bytes_from_raw(raw, shape, tensor)
    dtype = dtype_of(datatype, tensor)
    count = element_count(shape, tensor)
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"input {tensor!r}: raw contents have {len(raw)} bytes, but shape {list(shape)} "
            f"of {datatype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_contents(contents: object, datatype: str, shape: Sequence[int], tensor: str) -> np.ndarray:
    if datatype != BYTES:
        dtype = dtype_of(datatype, tensor)
    count = element_count(shape, tensor)
    values = getattr(contents, CONTENTS_FIELD[datatype])
    if len(values) != count:
        raise InvalidArgument(
            f"input {tensor!r}: {len(values)} values in contents, but shape {list(shape)} needs {count}"
        )
    if datatype == BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _bytes_from_raw(raw: bytes, shape: Sequence[int], tensor: str) -> np.ndarray:
    """Triton's BYTES layout: each element is a uint32 LE length then that many bytes."""
    count = element_count(shape, tensor)
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidArgument(f"input {tensor!r}: BYTES contents end inside a length prefix")
        (length,) = np.frombuffer(view[offset : offset + 4], dtype=_LENGTH)
        start, offset = offset + 4, offset + 4 + int(length)
        if offset > len(view):
            raise InvalidArgument(f"input {tensor!r}: BYTES element {len(elements)} runs past the end")
        elements.append(bytes(view[start:offset]))
    if len(elements) != count:
        raise InvalidArgument(
            f"input {tensor!r}: {len(elements)} BYTES elements, but shape {list(shape)} needs {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array.reshape(shape)


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    """One copy into little-endian wire bytes (BYTES gets its length prefixes)."""
    if datatype == BYTES:
        parts: list[bytes] = []
        for element in array.ravel():
            data = element if isinstance(element, bytes) else str(element).encode()
            parts.append(len(data).to_bytes(4, "little"))
            parts.append(data)
        return b"".join(parts)
    wanted = DTYPES[datatype]
    if array.dtype != wanted:
        array = array.astype(wanted)
    return np.ascontiguousarray(array).tobytes()


def to_onnx_input(array: np.ndarray, datatype: str) -> np.ndarray:
    """ONNX Runtime takes string tensors as numpy str/object arrays of str, not bytes."""
    if datatype != BYTES:
        return array
    return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object])(array)
