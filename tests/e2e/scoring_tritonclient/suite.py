"""An unmodified tritonclient.grpc against the scoring server: run in its own interpreter.

tritonclient registers its own `inference.*` protobuf descriptors, which clash with ours in
one process, so tests/e2e/test_scoring_tritonclient.py runs this file as a subprocess:

    python suite.py sync|aio HOST:PORT REPOSITORY

It runs every check, prints one JSON object {check: null | "what went wrong"} and exits 0;
the test asserts on that report, so a failure names the check.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

ROWS = np.random.default_rng(1).standard_normal((200, 64)).astype(np.float32)
A = np.arange(12, dtype=np.int64).reshape(3, 4) - 5
B = np.full((3, 4), 2**40, dtype=np.int64)


def reference(repository: Path, model: str, version: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(repository / model / version / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def tensor(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    value = triton.InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array)
    return value


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def expect_error(status: str, phrase: str, error: BaseException | None) -> None:
    check(isinstance(error, InferenceServerException), f"expected {status}, got {error!r}")
    assert isinstance(error, InferenceServerException)
    check(error.status() == f"StatusCode.{status}", f"expected {status}, got {error.status()}: {error.message()}")
    check(phrase in (error.message() or ""), f"{phrase!r} not in {error.message()!r}")


def check_model_config(repository: Path, model: str, as_json: dict[str, Any], reply: Any) -> None:
    """get_model_config's answer, as JSON and as protobuf, against the model's config.json.

    As in Triton, dims leave out the batch dimension when max_batch_size > 0 (config.json's
    shapes include it), and data types are the TYPE_* enum.
    """
    doc = json.loads((repository / model / "config.json").read_text())
    max_batch_size = doc.get("max_batch_size", 0)

    def stated(key: str) -> list[tuple[str, str, list[int]]]:
        return [
            (t["name"], f"TYPE_{t['datatype']}", t["shape"][1:] if max_batch_size else t["shape"]) for t in doc[key]
        ]

    config, proto = as_json["config"], reply.config
    check(config["name"] == model and config.get("max_batch_size", 0) == max_batch_size, str(config))
    check(proto.name == model and proto.max_batch_size == max_batch_size, str(proto))
    check(config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime", str(config))
    for key, field in (("inputs", "input"), ("outputs", "output")):
        in_json = [(t["name"], t["data_type"], [int(d) for d in t.get("dims", [])]) for t in config[field]]
        check(in_json == stated(key), f"as_json {field} {in_json} != config.json {stated(key)}")
        in_proto = [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in getattr(proto, field)]
        check(in_proto == stated(key), f"protobuf {field} {in_proto} != config.json {stated(key)}")


# ---------------------------------------------------------------------------- sync


def sync_checks(url: str, repository: Path) -> dict[str, Callable[[], None]]:
    client = triton.InferenceServerClient(url)

    def raises(call: Callable[[], Any]) -> BaseException | None:
        try:
            call()
        except InferenceServerException as error:
            return error
        return None

    def health() -> None:
        check(client.is_server_live() and client.is_server_ready(), "server not live/ready")
        check(client.is_model_ready("ranker") and client.is_model_ready("ranker", "1"), "ranker not ready")
        check(not client.is_model_ready("ranker", "9") and not client.is_model_ready("nope"), "phantom model ready")

    def server_metadata() -> None:
        meta = client.get_server_metadata(as_json=True)
        check(meta["name"] == "infermesh", str(meta))
        check({"model_configuration", "statistics", "model_repository"} <= set(meta["extensions"]), str(meta))

    def model_metadata() -> None:
        meta = client.get_model_metadata("ranker", as_json=True)
        check(meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"], str(meta))
        check(meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "64"]}], str(meta))
        check(meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": ["-1", "1"]}], str(meta))
        typed = client.get_model_metadata("typed", "1")
        check([i.datatype for i in typed.inputs] == ["INT32", "FP16", "BOOL", "BYTES"], str(typed))

    def model_config() -> None:
        for model in ("ranker", "add"):
            check_model_config(
                repository, model, client.get_model_config(model, as_json=True), client.get_model_config(model, "1")
            )
        ranker = client.get_model_config("ranker").config
        check(ranker.dynamic_batching.max_queue_delay_microseconds == 1000, str(ranker.dynamic_batching))
        check(ranker.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU, str(ranker.instance_group))
        typed = client.get_model_config("typed", as_json=True)["config"]
        datatypes = [i["data_type"] for i in typed["input"]]
        check(datatypes == ["TYPE_INT32", "TYPE_FP16", "TYPE_BOOL", "TYPE_STRING"], str(typed["input"]))
        expect_error("NOT_FOUND", "unknown model 'nope'", raises(lambda: client.get_model_config("nope")))
        expect_error("NOT_FOUND", "no ready version '9'", raises(lambda: client.get_model_config("ranker", "9")))

    def fp32_raw() -> None:
        result = client.infer(
            "ranker",
            [tensor("features", ROWS, "FP32")],
            outputs=[triton.InferRequestedOutput("score")],
            request_id="r1",
        )
        served = result.as_numpy("score")
        local = reference(repository, "ranker", "1", {"features": ROWS})[0]
        check(served.shape == (200, 1) and np.allclose(served, local, rtol=0, atol=1e-6), "scores differ")
        response = result.get_response()
        check(response.model_version == "1" and response.id == "r1", str(response.model_version))

    def int64_raw() -> None:
        result = client.infer("add", [tensor("a", A, "INT64"), tensor("b", B, "INT64")])
        check(np.array_equal(result.as_numpy("sum"), A + B) and result.as_numpy("sum").dtype == np.int64, "sum")
        check(np.array_equal(result.as_numpy("diff"), A - B), "diff")

    def typed_contents() -> None:
        # Typed (non-raw) contents, with tritonclient's own messages and stub.
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))
        request = service_pb2.ModelInferRequest(model_name="ranker")
        request.inputs.add(name="features", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend(
            ROWS[:2].ravel().tolist()
        )
        served = triton.InferResult(stub.ModelInfer(request)).as_numpy("score")
        local = reference(repository, "ranker", "1", {"features": ROWS[:2]})[0]
        check(np.allclose(served, local, rtol=0, atol=1e-6), "typed fp32 differs")
        request = service_pb2.ModelInferRequest(model_name="add")
        request.inputs.add(name="a", datatype="INT64", shape=[3, 4]).contents.int64_contents.extend(A.ravel().tolist())
        request.inputs.add(name="b", datatype="INT64", shape=[3, 4]).contents.int64_contents.extend(B.ravel().tolist())
        check(
            np.array_equal(triton.InferResult(stub.ModelInfer(request)).as_numpy("sum"), A + B), "typed int64 differs"
        )

    def other_datatypes() -> None:
        i32 = np.array([[1, -2, 3, 2**30]], np.int32)
        f16 = np.array([[0.5, -1.25, 3.0, 1024.0]], np.float16)
        flag = np.array([[True, False, True, False]])
        text = np.array([[b"caf\xc3\xa9"]], dtype=np.object_)
        result = client.infer(
            "typed",
            [
                tensor("i32", i32, "INT32"),
                tensor("f16", f16, "FP16"),
                tensor("flag", flag, "BOOL"),
                tensor("text", text, "BYTES"),
            ],
        )
        check(np.array_equal(result.as_numpy("i32_out"), i32 + 1), "INT32")
        check(
            result.as_numpy("f16_out").dtype == np.float16 and np.array_equal(result.as_numpy("f16_out"), f16 * 2),
            "FP16",
        )
        check(np.array_equal(result.as_numpy("flag_out"), ~flag), "BOOL")
        check(result.as_numpy("text_out").tolist() == [[b"caf\xc3\xa9"]], str(result.as_numpy("text_out")))

    def request_parameters() -> None:
        result = client.infer("ranker", [tensor("features", ROWS[:4], "FP32")], priority=1, timeout=10_000_000)
        check(result.as_numpy("score").shape == (4, 1), "priority/timeout request")
        error = raises(lambda: client.infer("ranker", [tensor("features", ROWS[:4], "FP32")], timeout=1))
        expect_error("DEADLINE_EXCEEDED", "not computed", error)

    def wrong_shape() -> None:
        error = raises(lambda: client.infer("ranker", [tensor("features", ROWS[:4].reshape(8, 32), "FP32")]))
        expect_error("INVALID_ARGUMENT", "the model expects [-1, 64]", error)

    def wrong_datatype() -> None:
        error = raises(lambda: client.infer("ranker", [tensor("features", ROWS[:4].astype(np.float64), "FP64")]))
        expect_error("INVALID_ARGUMENT", "does not match the model's FP32", error)
        error = raises(lambda: client.infer("add", [tensor("a", A.astype(np.int32), "INT32"), tensor("b", B, "INT64")]))
        expect_error("INVALID_ARGUMENT", "datatype INT32 does not match the model's INT64", error)

    def wrong_byte_length() -> None:
        short = tensor("features", ROWS[:100], "FP32")
        short.set_shape([200, 64])  # the bytes now cover half the declared shape
        expect_error("INVALID_ARGUMENT", "needs 51200", raises(lambda: client.infer("ranker", [short])))

    def unknown_model_and_version() -> None:
        expect_error("NOT_FOUND", "unknown model 'nope'", raises(lambda: client.get_model_metadata("nope")))
        expect_error(
            "NOT_FOUND",
            "unknown model 'nope'",
            raises(lambda: client.infer("nope", [tensor("features", ROWS[:1], "FP32")])),
        )
        error = raises(lambda: client.infer("ranker", [tensor("features", ROWS[:1], "FP32")], model_version="9"))
        expect_error("NOT_FOUND", "no ready version '9'", error)
        expect_error("NOT_FOUND", "no ready version '9'", raises(lambda: client.get_model_metadata("ranker", "9")))

    def load_and_unload() -> None:
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        check("spare" in index and index["spare"].get("state", "") == "", str(index.get("spare")))
        expect_error("NOT_FOUND", "unknown model 'spare'", raises(lambda: client.get_model_metadata("spare")))
        client.load_model("spare")
        check(client.is_model_ready("spare"), "spare not ready after load")
        served = client.infer("spare", [tensor("features", ROWS[:3], "FP32")]).as_numpy("score")
        check(
            np.allclose(served, reference(repository, "spare", "2", {"features": ROWS[:3]})[0], rtol=0, atol=1e-6),
            "spare v2",
        )
        client.load_model("spare", config=json.dumps({"version_policy": {"specific": {"versions": [1]}}}))
        check(
            client.infer("spare", [tensor("features", ROWS[:1], "FP32")]).get_response().model_version == "1",
            "override",
        )
        client.unload_model("spare")
        check(not client.is_model_ready("spare"), "spare still ready after unload")
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        check(index["spare"]["state"] == "UNAVAILABLE" and index["spare"]["reason"] == "unloaded", str(index["spare"]))
        expect_error(
            "NOT_FOUND", "unloaded", raises(lambda: client.infer("spare", [tensor("features", ROWS[:1], "FP32")]))
        )
        expect_error("NOT_FOUND", "no model 'ghost'", raises(lambda: client.load_model("ghost")))
        expect_error("INVALID_ARGUMENT", "failed to load 'corrupt'", raises(lambda: client.load_model("corrupt")))

    def statistics() -> None:
        stats = client.get_inference_statistics("add", as_json=True)["model_stats"]
        check(len(stats) == 1 and stats[0]["name"] == "add" and stats[0]["version"] == "1", str(stats))
        add = stats[0]
        check(int(add["inference_count"]) >= 6 and int(add["execution_count"]) >= 2, str(add))
        infer = add["inference_stats"]
        check(int(infer["success"]["count"]) >= 2 and int(infer["fail"]["count"]) >= 1, str(infer))
        check(int(infer["queue"]["count"]) >= 2 and int(infer["compute_infer"]["ns"]) > 0, str(infer))
        check(add["batch_stats"][0]["batch_size"] == "3", str(add["batch_stats"]))
        everything = client.get_inference_statistics(as_json=True)["model_stats"]
        check({"ranker", "add", "typed"} <= {s["name"] for s in everything}, str([s["name"] for s in everything]))
        expect_error("NOT_FOUND", "unknown model", raises(lambda: client.get_inference_statistics("nope")))

    def async_infer_callback() -> None:
        done: list[Any] = []
        client.async_infer(
            "ranker",
            [tensor("features", ROWS[:5], "FP32")],
            callback=lambda result, error: done.append((result, error)),
        )
        for _ in range(200):
            if done:
                break
            time.sleep(0.05)
        result, error = done[0]
        check(error is None and result.as_numpy("score").shape == (5, 1), f"callback: {error}")

    def stream_infer() -> None:
        # Triton's ModelStreamInfer: 32 single-row requests in flight on one stream (so the
        # batcher may merge them), answered by id; failures arrive as errors on the stream,
        # which goes on serving the requests after them.
        answers: dict[str, tuple[Any, Any]] = {}
        client.start_stream(
            callback=lambda result, error: answers.setdefault(
                result.get_response().id if result is not None else f"error-{len(answers)}", (result, error)
            )
        )
        try:
            for i in range(32):
                client.async_stream_infer(
                    "ranker", [tensor("features", ROWS[i : i + 1], "FP32")], request_id=f"row-{i}"
                )
            client.async_stream_infer("nope", [tensor("features", ROWS[:1], "FP32")], request_id="unknown")
            short = tensor("features", ROWS[:2], "FP32")
            short.set_shape([4, 64])
            client.async_stream_infer("ranker", [short], request_id="short")
            client.async_stream_infer("ranker", [tensor("features", ROWS[32:40], "FP32")], request_id="after")
            for _ in range(400):
                if len(answers) >= 35:
                    break
                time.sleep(0.05)
        finally:
            client.stop_stream()
        check(len(answers) == 35, f"{len(answers)} answers of 35: {sorted(answers)}")
        local = reference(repository, "ranker", "1", {"features": ROWS[:40]})[0]
        for i in range(32):
            result, error = answers[f"row-{i}"]
            check(
                error is None and np.allclose(result.as_numpy("score"), local[i : i + 1], rtol=0, atol=1e-6), f"row {i}"
            )
        result, error = answers["after"]
        check(
            error is None and np.allclose(result.as_numpy("score"), local[32:40], rtol=0, atol=1e-6), "after the errors"
        )
        messages = sorted(str(error.message()) for key, (result, error) in answers.items() if key.startswith("error-"))
        check(
            len(messages) == 2 and "needs 1024" in messages[0] and "unknown model 'nope'" in messages[1], str(messages)
        )

    return {name: fn for name, fn in locals().items() if callable(fn) and name not in ("raises",)}


# ---------------------------------------------------------------------------- aio


def aio_checks(url: str, repository: Path) -> dict[str, Callable[[], Awaitable[None]]]:
    async def raises(call: Callable[[], Awaitable[Any]]) -> BaseException | None:
        try:
            await call()
        except InferenceServerException as error:
            return error
        return None

    async def with_client(body: Callable[[triton_aio.InferenceServerClient], Awaitable[None]]) -> None:
        client = triton_aio.InferenceServerClient(url)
        try:
            await body(client)
        finally:
            await client.close()

    async def aio_health_and_metadata() -> None:
        async def body(client: triton_aio.InferenceServerClient) -> None:
            check(await client.is_server_live() and await client.is_server_ready(), "not live/ready")
            meta = await client.get_model_metadata("add", as_json=True)
            check([i["datatype"] for i in meta["inputs"]] == ["INT64", "INT64"], str(meta))

        await with_client(body)

    async def aio_model_config() -> None:
        async def body(client: triton_aio.InferenceServerClient) -> None:
            as_json = await client.get_model_config("add", as_json=True)
            check_model_config(repository, "add", as_json, await client.get_model_config("add", "1"))
            expect_error("NOT_FOUND", "unknown model 'nope'", await raises(lambda: client.get_model_config("nope")))

        await with_client(body)

    async def aio_concurrent_fp32_and_int64() -> None:
        async def body(client: triton_aio.InferenceServerClient) -> None:
            results = await asyncio.gather(
                *(client.infer("ranker", [tensor("features", ROWS[i : i + 1], "FP32")]) for i in range(64))
            )
            served = np.concatenate([r.as_numpy("score") for r in results])
            local = reference(repository, "ranker", "1", {"features": ROWS[:64]})[0]
            check(np.allclose(served, local, rtol=0, atol=1e-6), "concurrent scores differ")
            summed = await client.infer("add", [tensor("a", A, "INT64"), tensor("b", B, "INT64")])
            check(np.array_equal(summed.as_numpy("sum"), A + B), "int64")

        await with_client(body)

    async def aio_errors() -> None:
        async def body(client: triton_aio.InferenceServerClient) -> None:
            short = tensor("features", ROWS[:10], "FP32")
            short.set_shape([20, 64])
            expect_error("INVALID_ARGUMENT", "needs 5120", await raises(lambda: client.infer("ranker", [short])))
            expect_error("NOT_FOUND", "unknown model", await raises(lambda: client.get_model_metadata("nope")))

        await with_client(body)

    async def aio_load_unload_and_statistics() -> None:
        async def body(client: triton_aio.InferenceServerClient) -> None:
            await client.load_model("spare")
            check(await client.is_model_ready("spare"), "spare not ready")
            await client.infer("spare", [tensor("features", ROWS[:2], "FP32")])
            stats = await client.get_inference_statistics("spare", as_json=True)
            check(int(stats["model_stats"][0]["inference_count"]) == 2, str(stats))
            await client.unload_model("spare")
            check(not await client.is_model_ready("spare"), "spare still ready")

        await with_client(body)

    async def aio_stream_infer() -> None:
        async def body(client: triton_aio.InferenceServerClient) -> None:
            async def requests() -> Any:
                for i in range(16):
                    yield {
                        "model_name": "ranker",
                        "inputs": [tensor("features", ROWS[i : i + 1], "FP32")],
                        "request_id": str(i),
                    }
                yield {"model_name": "ranker", "inputs": [tensor("features", ROWS[:1], "FP32")], "model_version": "9"}

            served: dict[str, np.ndarray] = {}
            errors = []
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    errors.append(str(error.message()))
                else:
                    served[result.get_response().id] = result.as_numpy("score")
                if len(served) + len(errors) == 17:
                    break
            local = reference(repository, "ranker", "1", {"features": ROWS[:16]})[0]
            check(sorted(served) == sorted(map(str, range(16))), str(sorted(served)))
            check(
                all(np.allclose(served[str(i)], local[i : i + 1], rtol=0, atol=1e-6) for i in range(16)),
                "stream scores",
            )
            check(len(errors) == 1 and "no ready version '9'" in errors[0], str(errors))

        await with_client(body)

    return {name: fn for name, fn in locals().items() if name.startswith("aio_")}


def run(mode: str, url: str, repository: Path) -> dict[str, str | None]:
    report: dict[str, str | None] = {}
    if mode == "sync":
        for name, fn in sync_checks(url, repository).items():
            try:
                fn()
                report[name] = None
            except Exception:
                report[name] = traceback.format_exc(limit=3)
    else:
        for name, coroutine in aio_checks(url, repository).items():
            try:
                asyncio.run(coroutine())
                report[name] = None
            except Exception:
                report[name] = traceback.format_exc(limit=3)
    return report


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
