"""The server interceptor's errors stay small and keep their meaning, whatever a request
carries: a status message quoting a huge input is cut (it once outgrew gRPC's metadata
limit: RESOURCE_EXHAUSTED at 20,000 characters, UNAVAILABLE at 100,000), and bytes that are
no such message are INVALID_ARGUMENT, not UNKNOWN. A real grpc.aio server and client over
a loopback socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from services.genproto.infermesh.gateway.v1 import gateway_pb2
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.limits import MAX_DETAILS_BYTES
from services.runtime.server import RequestInterceptor

SERVICE = "infermesh.gateway.v1.GatewayService"
pytestmark = pytest.mark.timeout(30)


async def _echo_error(request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext) -> None:
    # What a careless message would do: quote the whole input.
    if request.user_id.startswith("nf"):
        raise NotFound(f"unknown user {request.user_id!r}")
    raise InvalidArgument(f"bad user {request.user_id!r}")


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[RequestInterceptor()])
    handler = grpc.unary_unary_rpc_method_handler(
        _echo_error,
        request_deserializer=gateway_pb2.RecommendRequest.FromString,
        response_serializer=gateway_pb2.RecommendResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Recommend": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _call(address: str, payload: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary(f"/{SERVICE}/Recommend")(payload, timeout=10)
    return raised.value


@pytest.mark.parametrize(
    ("user_id", "code"),
    [
        ("x" * 20_000, grpc.StatusCode.INVALID_ARGUMENT),
        ("x" * 100_000, grpc.StatusCode.INVALID_ARGUMENT),
        ("nf" + "\u00e9" * 100_000, grpc.StatusCode.NOT_FOUND),  # percent-encoded: 6 bytes each
        ("u1", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_a_huge_input_quoted_in_an_error_keeps_its_status(
    address: str, user_id: str, code: grpc.StatusCode
) -> None:
    error = await _call(address, gateway_pb2.RecommendRequest(user_id=user_id).SerializeToString())
    assert error.code() == code, error.details()[:200]
    details = error.details() or ""
    assert len(details.encode()) <= MAX_DETAILS_BYTES
    if len(user_id) < 100:
        assert details == f"bad user {user_id!r}"  # short messages are left whole
    else:
        assert details.endswith("(truncated)")


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x02\xff\xfe",  # user_id that is not UTF-8
        b"\x0a\x50abc",  # a field longer than the message
        b"\xff\xff\xff",  # no message at all
    ],
)
async def test_bytes_that_are_no_such_message_are_invalid_argument(address: str, payload: bytes) -> None:
    error = await _call(address, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in (error.details() or "")
