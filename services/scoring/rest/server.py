"""The Open Inference Protocol's HTTP/REST endpoints (KServe v2 / Triton HTTP), on aiohttp in
the scoring process's own event loop, beside its gRPC server:

  GET  /v2/health/live                          200 live, else 400; empty body
  GET  /v2/health/ready                         200 every model ready, else 400; empty body
  GET  /v2                                      server metadata
  GET  /v2/models/<m>[/versions/<v>]            model metadata
  GET  /v2/models/<m>[/versions/<v>]/ready      200 ready, else 400; empty body
  POST /v2/models/<m>[/versions/<v>]/infer      JSON tensors, or JSON + binary tensors

Each request becomes the gRPC request message (codec) and goes through the very servicer
the gRPC server runs (InferenceCore), in process: batching, versions, caching, model
statistics and nv_inference_* metrics are shared, and so are the errors, mapped to HTTP
statuses by the one error table (services/runtime/errors.py) with the protocol's
{"error": "..."} body, bounded like a gRPC status message.

What the servicer asks of a gRPC call, an HTTP call answers (HttpCall): its deadline is
the one Envoy enforces on the route (x-envoy-expected-rq-timeout-ms), or none when called
directly; the trailing metadata of ModelMetadata (the execution provider) come back as
response headers. A request gets a SERVER span that continues the caller's trace context
(W3C traceparent, which Envoy sends), and a log line; health probes get neither, like the
gRPC health checks. Rate, errors and latency per route are Envoy's (cluster scoring_http).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.errors import INTERNAL_ERROR_MESSAGE, InfermeshError, bounded_details, http_status_for
from services.runtime.logs import get_logger
from services.runtime.server import ReloadingSslContext, TlsSettings
from services.runtime.telemetry import tracer
from services.scoring.rest.codec import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    dump_json,
    encode_infer_response,
    error_json,
    model_metadata_json,
    parse_infer_request,
    quoted,
    server_metadata_json,
)

log = get_logger(__name__)

# The route Envoy enforces a deadline on tells the upstream how long it has (the route's
# timeout, or its per-try timeout when that is shorter), in milliseconds.
ENVOY_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"
# Routes that are probes, neither traced nor logged (Envoy checks every replica every second).
PROBE_ROUTES = frozenset({"/v2/health/live", "/v2/health/ready"})
ENDPOINTS_HINT = (
    "the Open Inference Protocol's HTTP endpoints are GET /v2, GET /v2/health/live, GET /v2/health/ready, "
    "GET /v2/models/<name>[/versions/<version>][/ready] and POST /v2/models/<name>[/versions/<version>]/infer"
)
# Semantic-convention attributes of an HTTP server span.
ATTR_HTTP_METHOD = "http.request.method"
ATTR_HTTP_ROUTE = "http.route"
ATTR_HTTP_STATUS = "http.response.status_code"


class InferenceCore(Protocol):
    """The servicer methods the HTTP endpoints call (services.scoring.service.InferenceServicer)."""

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse: ...

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse: ...

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse: ...

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse: ...

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse: ...

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse: ...


class HttpCall:
    """What the servicer uses of a gRPC call's context, for a request that came over HTTP."""

    __slots__ = ("_deadline", "_trailing")

    def __init__(self, timeout_seconds: float | None) -> None:
        self._deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        self._trailing: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, request: web.Request) -> HttpCall:
        return cls(envoy_timeout(request.headers.get(ENVOY_TIMEOUT_HEADER)))

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        self._trailing = tuple(metadata)


def envoy_timeout(value: str | None) -> float | None:
    """Seconds from Envoy's x-envoy-expected-rq-timeout-ms; None when absent or not a count."""
    if value is None or not value.isdigit():
        return None
    return int(value) / 1000


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The gRPC server's TLS for the HTTP port too: the same certificate, re-read when its
    files change, and with a client CA, mTLS (only a certificate that CA signed gets
    through). None: plaintext."""
    if tls.mode == "plaintext":
        return None
    return ReloadingSslContext(tls).context


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InferenceHttpApi:
    """The routes, over an InferenceCore."""

    def __init__(self, core: InferenceCore, max_body_bytes: int) -> None:
        self._core = core
        self._max_body_bytes = max_body_bytes

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._observed])
        routes = app.router
        routes.add_get("/v2", self.server_metadata)
        routes.add_get("/v2/health/live", self.server_live)
        routes.add_get("/v2/health/ready", self.server_ready)
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes.add_get(model, self.model_metadata)
            routes.add_get(f"{model}/ready", self.model_ready)
            routes.add_post(f"{model}/infer", self.infer)
        return app

    # ---- endpoints ------------------------------------------------------------------------
    async def server_live(self, request: web.Request) -> web.Response:
        reply = await self._core.ServerLive(pb.ServerLiveRequest(), HttpCall.of(request))
        return _health(reply.live)

    async def server_ready(self, request: web.Request) -> web.Response:
        reply = await self._core.ServerReady(pb.ServerReadyRequest(), HttpCall.of(request))
        return _health(reply.ready)

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = _model(request)
        reply = await self._core.ModelReady(pb.ModelReadyRequest(name=model, version=version), HttpCall.of(request))
        return _health(reply.ready)

    async def server_metadata(self, request: web.Request) -> web.Response:
        reply = await self._core.ServerMetadata(pb.ServerMetadataRequest(), HttpCall.of(request))
        return json_response(server_metadata_json(reply))

    async def model_metadata(self, request: web.Request) -> web.Response:
        model, version = _model(request)
        call = HttpCall.of(request)
        reply = await self._core.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), call)
        # The execution provider (and why) the gRPC path sends as trailing metadata.
        return json_response(model_metadata_json(reply), headers=dict(call.trailing_metadata()))

    async def infer(self, request: web.Request) -> web.Response:
        model, version = _model(request)
        body = await request.read()
        message, output_format = parse_infer_request(body, request.headers.get(HEADER_LENGTH), model, version)
        reply = await self._core.ModelInfer(message, HttpCall.of(request))
        payload, json_length = encode_infer_response(reply, output_format)
        if json_length is None:
            response = web.Response(body=payload, content_type=JSON_CONTENT_TYPE)
        else:
            response = web.Response(
                body=payload, content_type=BINARY_CONTENT_TYPE, headers={HEADER_LENGTH: str(json_length)}
            )
        # Triton's response compression, when asked for (Accept-Encoding: gzip or deflate);
        # the JSON length stays that of the uncompressed body, as the client reads it.
        if request.headers.get("Accept-Encoding"):
            response.enable_compression()
        return response

    # ---- every request --------------------------------------------------------------------
    @web.middleware
    async def _observed(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Errors as {"error": ...} with the status of the error table; a span and a log line."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        if route in PROBE_ROUTES:
            return await self._answer(request, handler)
        started = time.perf_counter()
        name = f"{request.method} {route}" if route else request.method
        parent = propagate.extract(request.headers)
        attributes = {ATTR_HTTP_METHOD: request.method, **({ATTR_HTTP_ROUTE: route} if route else {})}
        span = tracer().start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 499  # the client went away (the handler was cancelled)
        try:
            response = await self._answer(request, handler)
            status = response.status
            return response
        finally:
            if span.is_recording():
                span.set_attribute(ATTR_HTTP_STATUS, status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            span.end()
            otel_context.detach(token)
            fields = {
                "http_method": request.method,
                "http_route": route,
                "http_status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
            }
            (log.error if status >= 500 and status != 499 else log.info)("http", **fields)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except InfermeshError as error:
            return error_response(http_status_for(error), bounded_details(str(error)))
        except web.HTTPException as error:  # the router's 404 and 405, the body limit's 413
            return error_response(error.status, self._http_error_message(error, request))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error", http_method=request.method, http_path=request.path[:200])
            return error_response(500, INTERNAL_ERROR_MESSAGE)

    def _http_error_message(self, error: web.HTTPException, request: web.Request) -> str:
        if isinstance(error, web.HTTPRequestEntityTooLarge):
            return f"the request body is over {self._max_body_bytes} bytes, the most this server takes"
        if isinstance(error, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(error.allowed_methods - {"HEAD"}))
            return f"method {quoted(request.method)} is not allowed here; use {allowed}"
        if isinstance(error, web.HTTPNotFound):
            return f"no such endpoint; {ENDPOINTS_HINT}"
        return bounded_details(error.reason)


def json_response(document: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    """A JSON document, compact like the inference responses."""
    return web.Response(body=dump_json(document), content_type=JSON_CONTENT_TYPE, headers=headers)


def error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=error_json(message), content_type=JSON_CONTENT_TYPE)


def _health(ok: bool) -> web.Response:
    # The protocol's health answer is the status alone: 200 true, 4xx false, empty body.
    return web.Response(status=200 if ok else 400)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


class InferenceHttpServer:
    """InferenceHttpApi on host:port, started and stopped with the service."""

    def __init__(
        self,
        core: InferenceCore,
        *,
        host: str,
        port: int,
        max_body_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
        grace_seconds: float = 10.0,
    ) -> None:
        self.address = f"{host}:{port}"
        self._host, self._port, self._ssl = host, port, ssl_context
        # Cancelled when the client goes away (Envoy gave up on it): no batch slot is spent
        # on an answer nobody reads. aiohttp's own access log is off: the middleware logs.
        self._runner = web.AppRunner(
            InferenceHttpApi(core, max_body_bytes).application(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=grace_seconds,
        )

    async def start(self) -> None:
        """Listen; OSError when the port is taken."""
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl).start()
        log.info("listening", address=self.address, transport="https" if self._ssl else "http", protocol="oip-http")

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (up to the grace period)."""
        await self._runner.cleanup()
