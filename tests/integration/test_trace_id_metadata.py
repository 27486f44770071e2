"""Where a response carries its trace id (x-trace-id) for each RequestInterceptor mode: a
real grpc.aio server and client over a socket, in a fresh interpreter (the tracer provider is
process-global). `rest`, the gateway's default, spends the extra initial-metadata write only
on calls Envoy's transcoder made from REST requests (they carry x-envoy-original-path)."""

from __future__ import annotations

import pytest

from tests.unit.test_observability_telemetry import _run

CALLS = """
import asyncio, json
import grpc
from services.runtime.server import RequestInterceptor
from services.runtime.telemetry import setup_telemetry

telemetry = setup_telemetry("probe")

async def ok(request, context):
    return request

async def main():
    found = {}
    for mode in ("rest", "initial", "trailing", "none"):
        server = grpc.aio.server(interceptors=[RequestInterceptor(trace_id_metadata=mode)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "t.v1.Echo", {"Ok": grpc.unary_unary_rpc_method_handler(ok)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for caller, metadata in (("grpc", ()), ("rest", (("x-envoy-original-path", "/v1/recommend"),))):
                call = channel.unary_unary("/t.v1.Echo/Ok")(b"x", metadata=metadata, timeout=5)
                await call
                initial = dict(await call.initial_metadata()).get("x-trace-id")
                trailing = dict(await call.trailing_metadata()).get("x-trace-id")
                found[f"{mode} {caller}"] = [
                    where for where, value in (("initial", initial), ("trailing", trailing))
                    if value is not None and len(value) == 32 and int(value, 16)
                ]
        await server.stop(None)
    return found

found = asyncio.run(main())
telemetry.shutdown()
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def found() -> dict[str, list[str]]:
    return _run(CALLS)


@pytest.mark.parametrize(
    ("mode", "grpc_caller", "rest_caller"),
    [
        ("rest", ["trailing"], ["initial"]),
        ("initial", ["initial"], ["initial"]),
        ("trailing", ["trailing"], ["trailing"]),
        ("none", [], []),
    ],
)
def test_trace_id_goes_where_the_mode_says(
    found: dict[str, list[str]], mode: str, grpc_caller: list[str], rest_caller: list[str]
) -> None:
    assert found[f"{mode} grpc"] == grpc_caller
    assert found[f"{mode} rest"] == rest_caller
