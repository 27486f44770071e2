"""The Open Inference Protocol's HTTP bodies <-> its gRPC messages (services/scoring/rest/codec.py):
JSON tensors and Triton's binary tensor data extension, as the KServe v2 / Triton HTTP docs
lay them out, and the errors a malformed request gets."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.errors import InvalidArgument
from services.scoring.rest.codec import (
    OutputFormat,
    encode_infer_response,
    json_tensor_bytes,
    model_metadata_json,
    parse_infer_request,
    server_metadata_json,
)


def _body(document: dict[str, Any], *binary: bytes) -> tuple[bytes, str | None]:
    """(body, Inference-Header-Content-Length) as a client sends them."""
    header = json.dumps(document).encode()
    return header + b"".join(binary), (str(len(header)) if binary else None)


def _parse(
    document: dict[str, Any], *binary: bytes, model: str = "m", version: str = ""
) -> tuple[pb.ModelInferRequest, OutputFormat]:
    body, length = _body(document, *binary)
    return parse_infer_request(body, length, model, version)


def _fp32(name: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": shape, "data": data}


# ---- JSON tensors ------------------------------------------------------------------------


def test_json_tensors_become_raw_little_endian_contents() -> None:
    rows = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    request, output_format = _parse(
        {"id": "42", "inputs": [_fp32("x", [2, 3], rows.tolist())], "outputs": [{"name": "y"}]},
        model="ranker",
        version="3",
    )
    assert (request.model_name, request.model_version, request.id) == ("ranker", "3", "42")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", "FP32", [2, 3])
    assert request.raw_input_contents[0] == rows.astype("<f4").tobytes()
    assert not tensor.HasField("contents")
    assert [o.name for o in request.outputs] == ["y"] and not output_format.is_binary("y")


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP32", [1, 2.5, -3e2], np.array([1, 2.5, -300], "<f4")),  # integers are numbers too
        ("FP64", [[0.1], [0.2]], np.array([0.1, 0.2], "<f8")),  # nested rows, row-major
        ("FP16", [0.5, 1], np.array([0.5, 1], "<f2")),
        ("INT64", [-(2**63), 2**63 - 1], np.array([-(2**63), 2**63 - 1], "<i8")),
        ("UINT64", [0, 2**64 - 1], np.array([0, 2**64 - 1], "<u8")),  # past int64: exact all the same
        ("UINT64", [2**63, 1], np.array([2**63, 1], "<u8")),
        ("INT8", [-128, 127], np.array([-128, 127], "i1")),
        ("UINT16", [0, 65535], np.array([0, 65535], "<u2")),
        ("BOOL", [True, False], np.array([1, 0], "u1")),
    ],
)
def test_json_datatypes(datatype: str, data: list[Any], expected: np.ndarray) -> None:
    assert json_tensor_bytes(data, datatype, [expected.size], "t") == expected.tobytes()


def test_json_bytes_tensors_get_tritons_length_prefixes() -> None:
    raw = json_tensor_bytes(["ab", "", "é"], "BYTES", [3], "t")
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"


def test_an_empty_tensor_is_empty_bytes() -> None:
    assert json_tensor_bytes([], "INT32", [0, 4], "t") == b""


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("FP32", [1, 2, 3], "holds 3 values, but shape [2, 2] needs 4"),
        ("FP32", [[1, 2], [3]], "not a regular array"),
        ("FP32", ["1", "2", "3", "4"], 'needs numbers in "data", got strings'),
        ("FP32", [True, False, True, False], "got true/false"),
        ("FP32", [1, None, 3, 4], "got mixed or non-scalar values"),
        ("INT32", [1.5, 2, 3, 4], 'needs integers in "data", got numbers with a fraction'),
        ("INT32", [2**31, 0, 0, 0], "outside the range of INT32"),
        ("UINT8", [-1, 0, 0, 0], "outside the range of UINT8"),
        ("INT64", [2**64, 0, 0, 0], "got mixed or non-scalar values"),
        ("UINT64", [2**63, 1.5, 0, 0], "got numbers with a fraction"),
        ("UINT64", [2**63, -1, 0, 0], "outside the range of UINT64"),
        ("BOOL", [1, 0, 1, 0], "needs true/false"),
        ("BYTES", [1, 2, 3, 4], "needs strings"),
    ],
)
def test_json_data_that_does_not_fit_is_invalid(datatype: str, data: list[Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match="input 't'") as caught:
        json_tensor_bytes(data, datatype, [2, 2], "t")
    assert message in str(caught.value)


def test_json_data_must_be_an_array() -> None:
    with pytest.raises(InvalidArgument, match='"data" must be a JSON array'):
        json_tensor_bytes("1,2", "FP32", [2], "t")


# ---- binary tensor data extension -----------------------------------------------------------


def test_the_extension_docs_example_request() -> None:
    # Triton's extension_binary_data.md: UINT32 [2, 2] (16 bytes) and BOOL [3] (3 bytes),
    # the output asked for as binary data.
    input0 = np.array([[1, 2], [3, 4]], "<u4").tobytes()
    input1 = np.array([True, False, True]).tobytes()
    document = {
        "model_name": "mymodel",
        "inputs": [
            {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "parameters": {"binary_data_size": 16}},
            {"name": "input1", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}},
        ],
        "outputs": [{"name": "output0", "parameters": {"binary_data": True}}],
    }
    request, output_format = _parse(document, input0, input1, model="mymodel")
    assert list(request.raw_input_contents) == [input0, input1]
    # The extension's parameters are HTTP's own: the gRPC request carries none of them.
    assert all(not tensor.parameters for tensor in request.inputs)
    assert not request.outputs[0].parameters
    assert output_format.is_binary("output0")


def test_binary_and_json_inputs_mix_in_input_order() -> None:
    binary = np.arange(4, dtype="<i8").tobytes()
    document = {
        "inputs": [
            {"name": "a", "datatype": "INT64", "shape": [1, 4], "parameters": {"binary_data_size": 32}},
            {"name": "b", "datatype": "INT64", "shape": [1, 4], "data": [5, 6, 7, 8]},
        ]
    }
    request, _ = _parse(document, binary)
    assert list(request.raw_input_contents) == [binary, np.array([5, 6, 7, 8], "<i8").tobytes()]


@pytest.mark.parametrize(
    ("sizes", "extra", "header", "message"),
    [
        ((16,), b"", None, "run past the end of the body"),  # no header: the whole body is JSON
        ((16,), b"\x00" * 15, "", "run past the end"),
        ((16,), b"\x00" * 20, "", "4 bytes after the JSON that no input"),
        ((16,), b"\x00" * 16, "123456", "says 123456 bytes of JSON, but the body has"),
        ((16,), b"\x00" * 16, "-3", "must be the JSON's length in bytes"),
        ((16,), b"\x00" * 16, "ten", "must be the JSON's length in bytes"),
        ((-1,), b"", "", '"binary_data_size" must be a non-negative integer'),
        (("16",), b"\x00" * 16, "", '"binary_data_size" must be a non-negative integer'),
    ],
)
def test_binary_data_that_does_not_add_up_is_invalid(
    sizes: tuple[Any, ...], extra: bytes, header: str | None, message: str
) -> None:
    document = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": size}} for size in sizes
        ]
    }
    json_part = json.dumps(document).encode()
    length = str(len(json_part)) if header == "" else header
    with pytest.raises(InvalidArgument) as caught:
        parse_infer_request(json_part + extra, length, "m")
    assert message in str(caught.value)


def test_binary_data_must_be_the_shapes_worth() -> None:
    document = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 12}}]}
    with pytest.raises(InvalidArgument, match=r"12 bytes of binary data, but shape \[2, 3\] of FP32 needs 24"):
        _parse(document, b"\x00" * 12)


def test_an_input_with_data_and_binary_data_is_invalid() -> None:
    document = {"inputs": [{**_fp32("x", [1], [1.0]), "parameters": {"binary_data_size": 4}}]}
    with pytest.raises(InvalidArgument, match="both"):
        _parse(document, b"\x00" * 4)


def test_an_input_without_data_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match='neither "data" nor'):
        _parse({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]})


# ---- the request around the tensors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"inputs": []}', '"inputs" must be a non-empty array'),
        (b'{"inputs": {}}', '"inputs" must be a non-empty array'),
        (b'{"inputs": [1]}', "input 0 must be a JSON object"),
        (b'{"id": 7, "inputs": []}', '"id" must be a string'),
        (b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', 'input 0 needs a "name"'),
        (b'{"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]}', '"datatype" must be one of'),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', '"shape" must be an array'),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1.0], "data": [1]}]}', '"shape" must be an array'),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": "1", "data": [1]}]}', '"shape" must be an array'),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": {}}',
            '"outputs" must be',
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{}]}',
            'output 0 needs a "name"',
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": []}',
            "parameters must be a JSON object",
        ),
    ],
)
def test_malformed_requests_are_invalid(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_infer_request(body, None, "m")
    assert message in str(caught.value)


def test_parameters_keep_their_json_types() -> None:
    document = {
        "parameters": {"priority": 2, "timeout": 1500, "big": 2**64 - 1, "ratio": 0.5, "tag": "a", "flag": True},
        "inputs": [{**_fp32("x", [1], [1]), "parameters": {"note": "n"}}],
        "outputs": [{"name": "y", "parameters": {"classification": 3}}],
    }
    request, _ = _parse(document)
    p = request.parameters
    assert (p["priority"].int64_param, p["timeout"].int64_param, p["big"].uint64_param) == (2, 1500, 2**64 - 1)
    assert (p["ratio"].double_param, p["tag"].string_param, p["flag"].bool_param) == (0.5, "a", True)
    assert request.inputs[0].parameters["note"].string_param == "n"
    # Passed on as the gRPC path gets it (scoring answers it there: not supported).
    assert request.outputs[0].parameters["classification"].int64_param == 3


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"x": [1]}, "request parameter 'x' must be a string, a number or a boolean"),
        ({"x": None}, "must be a string, a number or a boolean"),
        ({"x": 2**64}, "outside the 64-bit integer range"),
        ({"binary_data_output": "yes"}, '"binary_data_output" must be true or false'),
    ],
)
def test_parameters_json_cannot_carry_are_invalid(parameters: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _parse({"parameters": parameters, "inputs": [_fp32("x", [1], [1])]})
    assert message in str(caught.value)


def test_error_messages_quote_a_long_name_cut_short() -> None:
    name = "n" * 10_000
    with pytest.raises(InvalidArgument) as caught:
        _parse({"inputs": [_fp32(name, [2], [1])]})
    assert len(str(caught.value)) < 200 and "nnn..." in str(caught.value)


# ---- responses -----------------------------------------------------------------------------


def _response() -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="ranker", model_version="1", id="42")
    response.outputs.add(name="score", datatype="FP32", shape=[2, 1])
    response.raw_output_contents.append(np.array([0.5, 0.25], "<f4").tobytes())
    response.outputs.add(name="ids", datatype="INT64", shape=[2])
    response.raw_output_contents.append(np.array([7, -1], "<i8").tobytes())
    return response


def _read_back(body: bytes, header_length: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What a client reads (tritonclient.http's InferResult, by the docs): the JSON, then
    each binary output's bytes in order."""
    document = json.loads(body[:header_length] if header_length is not None else body)
    arrays, offset = {}, header_length or 0
    dtypes = {"FP32": "<f4", "INT64": "<i8"}
    for output in document["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.array(output["data"], dtypes[output["datatype"]])
        else:
            arrays[output["name"]] = np.frombuffer(body[offset : offset + size], dtypes[output["datatype"]])
            offset += size
    assert offset == (len(body) if header_length is not None else 0)
    return document, arrays


def test_outputs_go_back_as_json_by_default() -> None:
    body, header_length = encode_infer_response(_response(), OutputFormat())
    assert header_length is None
    document, arrays = _read_back(body, header_length)
    assert document == {
        "model_name": "ranker",
        "model_version": "1",
        "id": "42",
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 0.25]},
            {"name": "ids", "datatype": "INT64", "shape": [2], "data": [7, -1]},
        ],
    }


def test_binary_outputs_follow_the_json_in_output_order() -> None:
    body, header_length = encode_infer_response(_response(), OutputFormat(binary_by_default=True))
    assert header_length is not None and body[header_length - 1 : header_length] == b"}"
    document, arrays = _read_back(body, header_length)
    assert [o["parameters"] for o in document["outputs"]] == [{"binary_data_size": 8}, {"binary_data_size": 16}]
    assert all("data" not in o for o in document["outputs"])
    assert arrays["score"].tolist() == [0.5, 0.25] and arrays["ids"].tolist() == [7, -1]


def test_an_outputs_own_binary_data_wins_over_the_requests_default() -> None:
    body, header_length = encode_infer_response(_response(), OutputFormat(True, {"ids": False}))
    document, arrays = _read_back(body, header_length)
    assert "data" in document["outputs"][1] and "parameters" not in document["outputs"][1]
    assert arrays["score"].tolist() == [0.5, 0.25]


def test_no_id_no_id_field() -> None:
    response = _response()
    response.id = ""
    body, _ = encode_infer_response(response, OutputFormat())
    assert "id" not in json.loads(body)


def test_bytes_outputs_as_json_are_strings() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="label", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(b"\x03\x00\x00\x00cat\x00\x00\x00\x00")
    body, _ = encode_infer_response(response, OutputFormat())
    assert json.loads(body)["outputs"][0]["data"] == ["cat", ""]
    response.raw_output_contents[0] = b"\x01\x00\x00\x00\xff\x00\x00\x00\x00"
    with pytest.raises(InvalidArgument, match='not UTF-8 text; ask for it with "binary_data": true'):
        encode_infer_response(response, OutputFormat())


def test_typed_contents_are_encoded_too() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    tensor = response.outputs.add(name="y", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.5, 2.5])
    body, header_length = encode_infer_response(response, OutputFormat(True))
    assert header_length is not None and body[header_length:] == np.array([1.5, 2.5], "<f4").tobytes()


def test_metadata_documents() -> None:
    server = pb.ServerMetadataResponse(name="infermesh", version="0.1.0", extensions=["model_configuration"])
    assert server_metadata_json(server) == {
        "name": "infermesh",
        "version": "0.1.0",
        "extensions": ["model_configuration", "binary_tensor_data"],
    }
    tensor = pb.ModelMetadataResponse.TensorMetadata
    model = pb.ModelMetadataResponse(
        name="ranker",
        versions=["1", "2"],
        platform="onnxruntime_onnx",
        inputs=[tensor(name="features", datatype="FP32", shape=[-1, 64])],
        outputs=[tensor(name="score", datatype="FP32", shape=[-1, 1])],
    )
    assert model_metadata_json(model) == {
        "name": "ranker",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
    }
