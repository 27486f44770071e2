"""The gRPC server and client spans (services.runtime.rpc_tracing), end to end in one process
talking to itself over a real socket, exported over OTLP to the real receiver.

Each case runs in a fresh interpreter: the tracer provider is process-global."""

from __future__ import annotations

import pytest

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import TraceStore
from services.runtime.rpc_tracing import _peer_address, rpc_attributes
from tests.unit.test_observability_telemetry import _run

CALLS = """
import asyncio, json
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from services.runtime.channels import open_channel
from services.runtime.errors import NotFound
from services.runtime.server import RequestInterceptor
from services.runtime.telemetry import setup_telemetry

telemetry = setup_telemetry("probe")

async def ok(request, context):
    return request

async def missing(request, context):
    raise NotFound("no user u1")

async def crash(request, context):
    raise RuntimeError("bug")

async def stream(requests, context):
    async for request in requests:
        with trace.get_tracer("probe").start_as_current_span("per-message"):
            yield request

async def stream_missing(requests, context):
    async for request in requests:
        raise NotFound("no stream s1")
        yield request

async def main():
    server = grpc.aio.server(interceptors=[RequestInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.v1.Echo", {
        name: grpc.unary_unary_rpc_method_handler(behavior) for name, behavior in
        (("Ok", ok), ("Missing", missing), ("Crash", crash))} | {
        name: grpc.stream_stream_rpc_method_handler(behavior) for name, behavior in
        (("Stream", stream), ("StreamMissing", stream_missing))})])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    codes = {}
    with trace.get_tracer("probe").start_as_current_span("caller") as caller:
        for name in ("Ok", "Missing", "Crash"):
            try:
                await channel.unary_unary(f"/t.v1.Echo/{name}")(b"x", timeout=5)
                codes[name] = "OK"
            except grpc.aio.AioRpcError as error:
                codes[name] = error.code().name
        carrier = {}
        propagate.inject(carrier)  # streams get no client span: the caller's context goes along
        for name in ("Stream", "StreamMissing"):
            open_stream = channel.stream_stream(f"/t.v1.Echo/{name}")
            call = open_stream(iter([b"a", b"b"]), metadata=tuple(carrier.items()), timeout=5)
            try:
                codes[name] = [answer async for answer in call] and "OK"
            except grpc.aio.AioRpcError as error:
                codes[name] = error.code().name
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    await channel.close()
    await server.stop(None)
    return format(caller.get_span_context().trace_id, "032x"), codes

trace_id, codes = asyncio.run(main())
telemetry.shutdown()
print(json.dumps({"trace_id": trace_id, "codes": codes}))
"""


def test_client_and_server_spans_form_one_trace_with_grpc_statuses() -> None:
    with OtlpReceiver(TraceStore()) as receiver:
        result = _run(CALLS, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        assert result["codes"] == {
            "Ok": "OK",
            "Missing": "NOT_FOUND",
            "Crash": "INTERNAL",
            "Stream": "OK",
            "StreamMissing": "NOT_FOUND",
        }
        trace = receiver.store.wait_for(result["trace_id"], lambda t: len(t.spans) >= 11, timeout=10)
        assert trace is not None
        # caller + a client and a server span per unary call, a server span per stream and
        # one per message the Stream handler answered; the health check is not traced
        assert len(trace.spans) == 11, [s.name for s in trace.spans]
        by_id = trace.by_id()
        for name, code, client_error, server_error in (
            ("Ok", 0, False, False),
            ("Missing", 5, True, False),  # the caller's mistake: not a server error
            ("Crash", 13, True, True),
        ):
            method = f"/t.v1.Echo/{name}"
            (client,) = [s for s in trace.spans if s.name == method and s.kind == "CLIENT"]
            (server,) = [s for s in trace.spans if s.name == method and s.kind == "SERVER"]
            assert by_id[client.parent_span_id].name == "caller"
            assert server.parent_span_id == client.span_id  # the context crossed the wire
            expected = {
                "rpc.system": "grpc",
                "rpc.service": "t.v1.Echo",
                "rpc.method": name,
                "rpc.grpc.status_code": code,
            }
            assert client.attributes == {**expected, "infermesh.deadline.remaining_ms": 5000.0}  # timeout=5
            assert server.attributes == {**expected, "network.peer.address": "127.0.0.1"}
            assert (client.status == "ERROR") is client_error
            assert (server.status == "ERROR") is server_error
            assert client.start_ns <= server.start_ns and server.end_ns <= client.end_ns
        # A stream is one SERVER span from open to close, current inside the handler.
        for name, code in (("Stream", 0), ("StreamMissing", 5)):
            (server,) = [s for s in trace.spans if s.name == f"/t.v1.Echo/{name}"]
            assert server.kind == "SERVER" and by_id[server.parent_span_id].name == "caller"
            assert server.attributes["rpc.grpc.status_code"] == code and server.status != "ERROR"
        (stream,) = [s for s in trace.spans if s.name == "/t.v1.Echo/Stream"]
        messages = [s for s in trace.spans if s.name == "per-message"]
        assert len(messages) == 2 and {m.parent_span_id for m in messages} == {stream.span_id}


@pytest.mark.parametrize(
    ("peer", "address"),
    [("ipv4:127.0.0.1:5000", "127.0.0.1"), ("ipv6:[::1]:5000", "::1"), ("unix:/tmp/s.sock", "/tmp/s.sock")],
)
def test_peer_address(peer: str, address: str) -> None:
    assert _peer_address(peer) == address


def test_rpc_attributes_split_the_full_method_name() -> None:
    assert rpc_attributes("/inference.GRPCInferenceService/ModelInfer") == {
        "rpc.system": "grpc",
        "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer",
    }
