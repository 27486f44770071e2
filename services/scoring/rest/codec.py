"""Open Inference Protocol HTTP/REST bodies <-> its gRPC messages (services.genproto.inference).

Requests: the JSON inference request of the KServe v2 / Triton HTTP protocol, optionally
followed by raw tensor bytes (Triton's binary tensor data extension: the
`Inference-Header-Content-Length` header says where the JSON ends, each binary input's
`binary_data_size` parameter how many bytes after it are its own, in the order of the
inputs), becomes one ModelInferRequest with every input in raw_input_contents: binary
inputs as sliced from the body, never decoded here; JSON inputs converted by numpy in one
call each (np.asarray, then one astype), never element by element.

Responses: each output as a JSON array, or as raw bytes after the JSON when the request
asked for it (the output's `binary_data` parameter, else the request's
`binary_data_output`), with `binary_data_size` telling its length.

The HTTP-only parameters (binary_data_size, binary_data, binary_data_output) stay here:
the gRPC message carries only what the gRPC path would, so both paths cache, batch and
fail alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.errors import InvalidArgument
from services.scoring.tensors import BYTES, DATATYPES, DTYPES, from_contents, from_raw, to_raw

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
# Reported in the server metadata's extensions, as Triton does.
BINARY_EXTENSION = "binary_tensor_data"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

_INT64 = np.iinfo(np.int64)
_UINT64 = np.iinfo(np.uint64)
# numpy's own limit on dimensions; a longer shape is no tensor anyone can send.
_MAX_DIMENSIONS = 64
# How much of a client's own string (a tensor or parameter name) an error message quotes.
_QUOTED_CHARS = 64
# JSON element kinds (numpy's dtype.kind of np.asarray(data)) each datatype family accepts.
# Keyed by the datatype's own kind (BYTES: "U"); with what an error says each one needs.
_ACCEPTED_KINDS: Mapping[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "iuf", "U": "U"}
_WANTED: Mapping[str, str] = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers", "U": "strings"}
# What the data held instead, by the kind numpy found in it.
_FOUND: Mapping[str, str] = {
    "b": "true/false",
    "i": "integers",
    "u": "integers",
    "f": "numbers with a fraction or an exponent (1.5, 1.0, 1e3)",
    "U": "strings",
}


@dataclass(frozen=True)
class OutputFormat:
    """Which outputs go back as binary data: the output's own `binary_data` parameter,
    else the request's `binary_data_output`, else JSON."""

    binary_by_default: bool = False
    binary: Mapping[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_by_default)


def quoted(text: str) -> str:
    """A client's string as an error message quotes it: repr'd, and cut when long."""
    return repr(text if len(text) <= _QUOTED_CHARS else text[:_QUOTED_CHARS] + "...")


# ---- requests -------------------------------------------------------------------------


def parse_infer_request(
    body: bytes, header_length: str | None, model: str, version: str = ""
) -> tuple[pb.ModelInferRequest, OutputFormat]:
    """The ModelInferRequest an HTTP inference request stands for, and how to answer it.

    `header_length`: the Inference-Header-Content-Length header (None: the whole body is JSON).
    Raises InvalidArgument, with a message the caller can act on, for anything malformed.
    """
    json_end = json_length(header_length, len(body))
    document = _load_object(body[:json_end])
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument('"id" must be a string')
    request.id = request_id
    parameters = _object(document.get("parameters", {}), "the request's parameters")
    binary_by_default = _flag(parameters, BINARY_DATA_OUTPUT, "the request's")
    copy_parameters(parameters, request.parameters, "request", skip=BINARY_DATA_OUTPUT)
    _add_inputs(request, document.get("inputs"), memoryview(body)[json_end:])
    binary = _add_outputs(request, document.get("outputs", []))
    return request, OutputFormat(binary_by_default, binary)


def json_length(header: str | None, body_length: int) -> int:
    """Where the JSON ends: the Inference-Header-Content-Length header, checked against the body."""
    if header is None:
        return body_length
    text = header.strip()
    if not text.isdigit() or len(text) > 19:
        raise InvalidArgument(f"the {HEADER_LENGTH} header must be the JSON's length in bytes, a non-negative integer")
    length = int(text)
    if length > body_length:
        raise InvalidArgument(f"the {HEADER_LENGTH} header says {length} bytes of JSON, but the body has {body_length}")
    return length


def _load_object(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except RecursionError:
        raise InvalidArgument("the inference request's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise InvalidArgument(f"the inference request is not valid JSON: {error}") from None
    return _object(document, "the inference request")


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _flag(parameters: Mapping[str, Any], key: str, whose: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f'{whose} parameter "{key}" must be true or false')
    return value


def copy_parameters(source: Mapping[str, Any], target: Any, where: str, skip: str = "") -> None:
    """JSON parameters into a gRPC parameters map (bool, int64 or uint64, double, string)."""
    for key, value in source.items():
        if key == skip:
            continue
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            if _INT64.min <= value <= _INT64.max:
                parameter.int64_param = value
            elif 0 <= value <= _UINT64.max:
                parameter.uint64_param = value
            else:
                raise InvalidArgument(f"{where} parameter {quoted(key)} is outside the 64-bit integer range")
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise InvalidArgument(f"{where} parameter {quoted(key)} must be a string, a number or a boolean")


def _add_inputs(request: pb.ModelInferRequest, inputs: object, binary: memoryview) -> None:
    """Every input, in raw_input_contents; the binary ones consume `binary` in order."""
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument('"inputs" must be a non-empty array of input tensors')
    offset = 0
    for index, value in enumerate(inputs):
        tensor = _object(value, f"input {index}")
        name, datatype, shape = _tensor_header(tensor, index)
        parameters = _object(tensor.get("parameters", {}), f"the parameters of input {quoted(name)}")
        entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
        copy_parameters(parameters, entry.parameters, f"input {quoted(name)}", skip=BINARY_DATA_SIZE)
        size = parameters.get(BINARY_DATA_SIZE)
        if size is None:
            if "data" not in tensor:
                raise InvalidArgument(
                    f'input {quoted(name)} has neither "data" nor a "{BINARY_DATA_SIZE}" parameter (binary data)'
                )
            request.raw_input_contents.append(json_tensor_bytes(tensor["data"], datatype, shape, name))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f'input {quoted(name)}: "{BINARY_DATA_SIZE}" must be a non-negative integer')
        if "data" in tensor:
            raise InvalidArgument(f'input {quoted(name)} has both "data" and binary data; send one')
        _check_binary_size(size, datatype, shape, name)
        if offset + size > len(binary):
            raise InvalidArgument(
                f"input {quoted(name)}: its {size} bytes of binary data run past the end of the body "
                f"({len(binary) - offset} left after the JSON and the inputs before it); is the "
                f"{HEADER_LENGTH} header the JSON's length?"
            )
        request.raw_input_contents.append(bytes(binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary) - offset} bytes after the JSON that no input's "
            f'"{BINARY_DATA_SIZE}" accounts for'
        )


def _check_binary_size(size: int, datatype: str, shape: Sequence[int], name: str) -> None:
    """A fixed-size datatype's binary data is exactly its shape's worth (BYTES is checked when
    its length prefixes are read)."""
    if datatype == BYTES:
        return
    needed = math.prod(shape) * DTYPES[datatype].itemsize
    if size != needed:
        raise InvalidArgument(
            f"input {quoted(name)}: {size} bytes of binary data, but shape {list(shape)} of {datatype} needs {needed}"
        )


def _tensor_header(tensor: Mapping[str, Any], index: int) -> tuple[str, str, list[int]]:
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f'input {index} needs a "name" (a non-empty string)')
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidArgument(f'input {quoted(name)}: "datatype" must be one of {", ".join(sorted(DATATYPES))}')
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMENSIONS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _INT64.max for d in shape)
    ):
        raise InvalidArgument(
            f'input {quoted(name)}: "shape" must be an array of at most {_MAX_DIMENSIONS} non-negative integers'
        )
    return name, datatype, shape


def json_tensor_bytes(data: object, datatype: str, shape: Sequence[int], name: str) -> bytes:
    """A JSON tensor ("data": flat or nested, row-major) as raw little-endian bytes, the
    gRPC path's raw_input_contents: one np.asarray and one astype, no per-element Python.
    Element types must fit the datatype (numbers for floats, integers in range for
    integers, true/false for BOOL, strings for BYTES); nothing is silently truncated."""
    if not isinstance(data, list):
        raise InvalidArgument(f'input {quoted(name)}: "data" must be a JSON array')
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidArgument(
            f'input {quoted(name)}: "data" is not a regular array (nested rows of different lengths?)'
        ) from None
    count = math.prod(shape)
    if array.size != count:
        raise InvalidArgument(
            f'input {quoted(name)}: "data" holds {array.size} values, but shape {list(shape)} needs {count}'
        )
    if count == 0:
        return b""
    if datatype == BYTES:
        _expect_kind(array, "U", datatype, name)
        return to_raw(array, BYTES)
    dtype = DTYPES[datatype]
    if datatype == "UINT64" and array.dtype.kind == "f":
        # numpy reads integers past int64 beside smaller ones as float64: take them exactly.
        array = _exact_uint64(data, array, name)
    _expect_kind(array, dtype.kind, datatype, name)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgument(
                f"input {quoted(name)}: a value is outside the range of {datatype} ({info.min}..{info.max})"
            )
    return array.astype(dtype, copy=False).tobytes()


def _exact_uint64(data: list[Any], floats: np.ndarray, name: str) -> np.ndarray:
    """`data` as uint64 when it holds integers only (the float64 reading `floats` must agree
    with the exact one, which a fraction would not); else `floats`, for _expect_kind to reject."""
    try:
        exact = np.array(data, dtype=np.uint64)
    except (OverflowError, ValueError, TypeError):
        raise InvalidArgument(
            f"input {quoted(name)}: a value is outside the range of UINT64 (0..{_UINT64.max})"
        ) from None
    return exact if np.array_equal(exact.astype(np.float64), floats) else floats


def _expect_kind(array: np.ndarray, kind: str, datatype: str, name: str) -> None:
    """The JSON elements (as numpy typed them) must suit a datatype of numpy kind `kind`."""
    found = array.dtype.kind
    if found not in _ACCEPTED_KINDS[kind]:
        got = _FOUND.get(found, "mixed or non-scalar values")
        raise InvalidArgument(f'input {quoted(name)}: datatype {datatype} needs {_WANTED[kind]} in "data", got {got}')


def _add_outputs(request: pb.ModelInferRequest, outputs: object) -> dict[str, bool]:
    """The requested outputs; returns each one's binary_data choice, where it has one."""
    if not isinstance(outputs, list):
        raise InvalidArgument('"outputs" must be an array of requested outputs')
    binary: dict[str, bool] = {}
    for index, value in enumerate(outputs):
        tensor = _object(value, f"requested output {index}")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f'requested output {index} needs a "name" (a non-empty string)')
        parameters = _object(tensor.get("parameters", {}), f"the parameters of output {quoted(name)}")
        if BINARY_DATA in parameters:
            binary[name] = _flag(parameters, BINARY_DATA, f"output {quoted(name)}'s")
        entry = request.outputs.add(name=name)
        copy_parameters(parameters, entry.parameters, f"output {quoted(name)}", skip=BINARY_DATA)
    return binary


# ---- responses ------------------------------------------------------------------------


def encode_infer_response(response: pb.ModelInferResponse, output_format: OutputFormat) -> tuple[bytes, int | None]:
    """(body, JSON length): the JSON inference response, then the binary outputs' bytes in
    the order of its outputs; the JSON length (the Inference-Header-Content-Length header)
    is None when every output went as JSON."""
    outputs: list[dict[str, Any]] = []
    binary_parts: list[bytes] = []
    for index, tensor in enumerate(response.outputs):
        raw = _output_bytes(response, index)
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = parameters_json(tensor.parameters)
        if output_format.is_binary(tensor.name):
            parameters[BINARY_DATA_SIZE] = len(raw)
            binary_parts.append(raw)
        else:
            entry["data"] = json_tensor_data(raw, tensor.datatype, tensor.shape, tensor.name)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = parameters_json(response.parameters)
    document["outputs"] = outputs
    header = dump_json(document)
    if not binary_parts:
        return header, None
    return b"".join((header, *binary_parts)), len(header)


def _output_bytes(response: pb.ModelInferResponse, index: int) -> bytes:
    """Output `index` as raw bytes: as the servicer sends it (raw_output_contents), or from
    typed contents if a response ever carries those."""
    if index < len(response.raw_output_contents):
        return response.raw_output_contents[index]
    tensor = response.outputs[index]
    return to_raw(from_contents(tensor.contents, tensor.datatype, tensor.shape, tensor.name), tensor.datatype)


def json_tensor_data(raw: bytes, datatype: str, shape: Sequence[int], name: str) -> list[Any]:
    """Raw output bytes as the flat, row-major JSON array of the protocol."""
    if datatype == BYTES:
        try:
            return [element.decode("utf-8") for element in from_raw(raw, BYTES, shape, name).ravel()]
        except UnicodeDecodeError:
            raise InvalidArgument(
                f'output {quoted(name)} holds bytes that are not UTF-8 text; ask for it with "{BINARY_DATA}": true'
            ) from None
    values: list[Any] = np.frombuffer(raw, dtype=DTYPES[datatype]).tolist()
    return values


def parameters_json(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    out = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(parameter, choice)
    return out


def server_metadata_json(response: pb.ServerMetadataResponse) -> dict[str, Any]:
    """$metadata_server_response; the HTTP server adds Triton's binary tensor data extension."""
    return {"name": response.name, "version": response.version, "extensions": [*response.extensions, BINARY_EXTENSION]}


def model_metadata_json(response: pb.ModelMetadataResponse) -> dict[str, Any]:
    """$metadata_model_response (shapes as numbers: -1 for a variable dimension)."""

    def tensors(metadata: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata]

    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": tensors(response.inputs),
        "outputs": tensors(response.outputs),
    }


def error_json(message: str) -> bytes:
    """The protocol's error object, {"error": message}."""
    return dump_json({"error": message})


def dump_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
