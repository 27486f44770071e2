"""The one server bootstrap every service runs.

serve() owns what services share: the grpc.aio server, health (driven by the service's
own readiness check, never hard-wired to SERVING), reflection, one interceptor (tracing,
error mapping, metrics, request logs), and graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.allocator import MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, tune_allocator
from services.runtime.errors import INTERNAL_ERROR_MESSAGE, InfermeshError, bounded_details, status_for
from services.runtime.event_loop import event_loop_runner
from services.runtime.logs import configure_logging, get_logger, request_log
from services.runtime.metrics import Metrics, RpcMetrics, grpc_code_name
from services.runtime.rpc_tracing import end_server_span, start_server_span
from services.runtime.settings import ServerSettings, ServiceSettings, SettingsError, load_settings
from services.runtime.telemetry import TRACE_ID_HEADER, setup_telemetry
from services.runtime.tls_files import file_signature, read_tls_file

log = get_logger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Service(Protocol):
    """What a service gives serve(); everything else is shared."""

    name: str
    # Fully qualified gRPC service names it serves (for health and reflection).
    grpc_services: tuple[str, ...]
    metrics: Metrics

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason): e.g. model loaded, Redis reachable."""
        ...

    async def close(self) -> None: ...


def _observed(method: str) -> bool:
    """Requests, not probes: health checks (Envoy's, every second) and reflection are
    neither logged nor counted."""
    return not method.startswith(_UNOBSERVED_PREFIXES)


_UNOBSERVED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Envoy's gRPC-JSON transcoder keeps a REST request's path in this header (also matched by
# the edge's routes, infermesh/envoy/listeners.py).
ORIGINAL_PATH_HEADER = "x-envoy-original-path"
# Status codes that mean the server failed (as opposed to the caller's request).
_SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"})


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """The one server interceptor: where each request (not probes) is traced, its errors
    mapped and it is observed, once.

    * the request's SERVER span (services.runtime.rpc_tracing), continuing the caller's
      trace context, current for everything inside, so exemplars and log lines carry it;
    * domain errors mapped to status codes through one table; internal failures hidden;
    * given the service's RpcMetrics, RED metrics (services.runtime.metrics.RpcMetrics): grpc_server_started_total,
      grpc_server_handled_total{grpc_code}, grpc_server_handling_seconds with the trace id
      as exemplar when the request is sampled;
    * one JSON log line per request at info: `rpc` with grpc_method, grpc_code,
      duration_ms and (added by the log processor) trace_id/span_id; errors add the status
      message, unhandled exceptions a stack trace; never request payloads;
    * the trace id returned to the caller as `x-trace-id` response metadata (trailing
      metadata: free, sent with the status; `initial` sends it as initial metadata instead,
      which Envoy turns into an HTTP response header for REST clients, at the cost of one
      more write per call; `rest` does that only for calls Envoy transcoded from REST, the
      edge-facing gateway's default).
    """

    def __init__(self, rpc: RpcMetrics | None = None, *, trace_id_metadata: str = "trailing") -> None:
        if trace_id_metadata not in ("none", "trailing", "initial", "rest"):
            raise ValueError(f"trace_id_metadata must be none, trailing, initial or rest, not {trace_id_metadata!r}")
        self._rpc = rpc
        self._trace_id_metadata = trace_id_metadata
        # method -> (handler it wrapped, wrapper): handlers are looked up per call, wrapped once.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or (handler.unary_unary is None and handler.stream_stream is None):
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method) if handler.unary_unary is not None else self._wrap_stream(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        # An async servicer method (grpc's stubs know only the synchronous kind).
        behavior: Any = handler.unary_unary
        deserialize = handler.request_deserializer

        async def handle(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            # Parsed here rather than by grpc, which answers bytes that are no such message
            # (truncated, a string that is not UTF-8) with UNKNOWN: a server fault to clients
            # and to the edge, for what is the caller's malformed request.
            try:
                request = raw if deserialize is None else deserialize(raw)
            except Exception:  # noqa: BLE001 (whatever the parser raises, the bytes are at fault)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {method} message")
            try:
                return await behavior(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await _abort_for(error, context, method)

        unary_unary: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]] = handle
        if _observed(method):

            async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = await _ObservedCall.begin(self, method, context)
                try:
                    return await handle(request, context)
                finally:
                    call.end(context)

            unary_unary = observed

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _wrap_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A bidirectional stream (an async generator servicer) is observed as one call:
        one span, one log line, one metrics sample from its start to its end; errors that
        end the stream are mapped like a unary call's."""
        behavior: Any = handler.stream_stream  # an async generator, see _wrap

        async def handle(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in behavior(requests, context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await _abort_for(error, context, method)

        stream_stream = handle
        if _observed(method):

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                call = await _ObservedCall.begin(self, method, context)
                try:
                    async for response in handle(requests, context):
                        yield response
                finally:
                    call.end(context)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """Domain errors through the one status table; anything else is hidden as INTERNAL."""
    if isinstance(error, InfermeshError):
        # Bounded: a message quoting a huge input must not outgrow gRPC's metadata limit.
        await context.abort(status_for(error), bounded_details(str(error)))
    log.exception("unhandled error", grpc_method=method)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)


class _ObservedCall:
    """One observed call's span (current until end), metrics and log line."""

    __slots__ = ("_method", "_rpc", "_started", "_span", "_token", "_ids")
    _method: str
    _rpc: RpcMetrics | None
    _started: float
    _span: trace.Span
    _token: object
    _ids: tuple[str, str, bool] | None

    @classmethod
    async def begin(
        cls, interceptor: RequestInterceptor, method: str, context: grpc.aio.ServicerContext
    ) -> _ObservedCall:
        call = cls()
        call._method, call._rpc = method, interceptor._rpc
        call._started = time.perf_counter()
        received = context.invocation_metadata()
        call._span, call._token = start_server_span(method, received)
        call._ids = None
        try:
            if call._rpc is not None:
                call._rpc.start(method)
            call._ids = current_ids()
            header = interceptor._trace_id_metadata
            if call._ids is not None and header != "none":
                if header == "rest":
                    header = "initial" if _transcoded(received) else "trailing"
                metadata = ((TRACE_ID_HEADER, call._ids[0]),)
                if header == "initial":
                    await context.send_initial_metadata(metadata)
                else:
                    context.set_trailing_metadata(metadata)
        except BaseException:
            end_server_span(call._span, call._token, "UNKNOWN", None, None)
            raise
        return call

    def end(self, context: grpc.aio.ServicerContext) -> None:
        code = "UNKNOWN"
        try:
            code = "CANCELLED" if context.cancelled() else _status_name(context)
            if self._rpc is not None:
                _observe(self._rpc, self._method, context, code, time.perf_counter() - self._started, self._ids)
        finally:
            details = context.details() if code != "OK" else None
            span = self._span
            end_server_span(span, self._token, code, details, context.peer() if span.is_recording() else None)


def _transcoded(metadata: Any) -> bool:
    """Whether Envoy's transcoder made this call from a REST request (it keeps the REST path
    in x-envoy-original-path): only a REST client needs the trace id in initial metadata,
    which reaches it as a response header."""
    return any(key == ORIGINAL_PATH_HEADER for key, _ in metadata or ())


def current_ids() -> tuple[str, str, bool] | None:
    """(trace_id, span_id, sampled) of the current span, or None outside any trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x"), context.trace_flags.sampled


def _status_name(context: grpc.aio.ServicerContext) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 (a context that cannot tell: the call did not end normally)
        return "UNKNOWN"
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    # Some grpc versions report the numeric code.
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


def _observe(
    rpc: RpcMetrics,
    method: str,
    context: grpc.aio.ServicerContext,
    code: str,
    seconds: float,
    ids: tuple[str, str, bool] | None,
) -> None:
    exemplar = {"trace_id": ids[0], "span_id": ids[1]} if ids is not None and ids[2] else None
    rpc.observe(method, code, seconds, exemplar)
    # The same code spelling as the metric's grpc_code label, so logs and metrics agree.
    if code == "OK" and request_log.enabled:  # the line of nearly every request: the fast writer
        request_log.info(method, "OK", round(seconds * 1000.0, 3), ids)
        return
    fields: dict[str, Any] = {
        "grpc_method": method,
        "grpc_code": grpc_code_name(code),
        "duration_ms": round(seconds * 1000.0, 3),
    }
    details = context.details() if code != "OK" else None
    if details:
        fields["grpc_message"] = str(details)[:300]
    if code in _SERVER_FAULTS:
        log.error("rpc", **fields)
    else:
        log.info("rpc", **fields)


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Fail loudly if the port is taken instead of silently sharing it.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


class TlsSettings(ServiceSettings):
    """`<SERVICE>_TLS_CERT` and `_TLS_KEY` (PEM files): serve TLS instead of plaintext; with
    `<SERVICE>_TLS_CLIENT_CA` too, require a client certificate signed by that CA (mTLS:
    only Envoy, holding the mesh's client certificate, gets through), and with
    `<SERVICE>_TLS_CLIENT_NAMES`, one that names one of those clients. The files are re-read
    when they change (a renewed certificate or a Kubernetes Secret update): new connections
    get the new certificate, no restart. `infermesh certs` makes them, `infermesh up --tls
    DIR` sets them; on Kubernetes, docs/security.md."""

    # Each service reads these with its own prefix: tls_settings_class(service).
    model_config = SettingsConfigDict(env_prefix="<SERVICE>_")

    tls_cert: str = Field("", description="PEM certificate (chain) the server presents; empty: plaintext.")
    tls_key: str = Field("", description="PEM private key of that certificate; set with the certificate.")
    tls_client_ca: str = Field(
        "", description="PEM CA bundle: clients must present a certificate it signed (mTLS); empty: none asked."
    )
    tls_client_names: str = Field(
        "",
        description="Comma-separated DNS names: a client certificate must name one of them (SAN), or its calls "
        "get PERMISSION_DENIED; empty: any certificate the CA signed. Needs the client CA.",
    )
    plaintext_health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="With TLS, also serve grpc.health.v1 alone, in plaintext, on this port, for probes that "
        "cannot speak TLS (the kubelet's gRPC probes); 0: none.",
    )

    @model_validator(mode="after")
    def _files_go_together(self) -> TlsSettings:
        cert, key, client_ca, names = (
            self.variable(name) for name in ("tls_cert", "tls_key", "tls_client_ca", "tls_client_names")
        )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"{cert} and {key} go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"{client_ca} needs {cert} and {key}")
        if self.client_names and not self.tls_client_ca:
            raise ValueError(f"{names} needs {client_ca}: names are checked on certificates that CA signed")
        if self.plaintext_health_port and not self.tls_cert:
            raise ValueError(f"{self.variable('plaintext_health_port')} is for TLS servers: set {cert} and {key}")
        return self

    @property
    def mode(self) -> str:
        if not self.tls_cert:
            return "plaintext"
        return "mtls" if self.tls_client_ca else "tls"

    @property
    def client_names(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.tls_client_names.split(",") if name.strip())


@functools.cache
def tls_settings_class(service: str) -> type[TlsSettings]:
    """TlsSettings read with `service`'s prefix (SCORING_TLS_CERT, ...)."""
    config = SettingsConfigDict(env_prefix=f"{service.upper()}_")
    return type(f"{service.title()}TlsSettings", (TlsSettings,), {"model_config": config})


def load_tls_settings(service: str, environ: Mapping[str, str] | None = None) -> TlsSettings:
    return load_settings(tls_settings_class(service), environ)


class CertificateFiles:
    """The server's certificate, key and client CA as files, re-read when they change.

    grpc asks `fetch` before every TLS handshake (dynamic_ssl_server_credentials): a stat of
    each file tells whether anything changed; only then are they read, and a new pair is
    used only once the key matches the certificate, so a rotation caught half-written (or a
    bad file) keeps the current certificate until the files are whole again."""

    def __init__(self, tls: TlsSettings) -> None:
        self._paths = tuple(Path(p) for p in (tls.tls_cert, tls.tls_key, tls.tls_client_ca) if p)
        self._tls = tls
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._refused: tuple[object, ...] | None = None
        self.current = self._load()

    def _stat(self) -> tuple[object, ...]:
        return file_signature(self._paths)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """The files' configuration; SettingsError if one is unreadable or the key is not the certificate's."""
        tls = self._tls
        cert, key = read_tls_file(tls.tls_cert), read_tls_file(tls.tls_key)
        client_ca = read_tls_file(tls.tls_client_ca) if tls.tls_client_ca else None
        _check_pair(tls, cert, key, client_ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and are whole, else None (keep the current)."""
        signature = self._stat()
        if signature == self._signature:
            return None
        with self._lock:  # handshakes may ask from several grpc threads at once
            if signature == self._signature or signature == self._refused:
                return None
            try:
                configuration = self._load()
            except SettingsError as error:
                self._refused = signature
                log.warning(
                    "TLS files changed but cannot be used yet; keeping the current certificate", error=str(error)
                )
                return None
            if self._stat() != signature:  # changed while being read: try again on the next handshake
                return None
            self._signature, self.current = signature, configuration
            log.info("TLS certificate reloaded", certificate=str(self._paths[0]))
            return configuration

    def credentials(self) -> grpc.ServerCredentials:
        # grpc's stubs say the fetcher always returns a configuration; None (no change) is documented.
        fetch: Any = self.fetch
        return grpc.dynamic_ssl_server_credentials(
            self.current, fetch, require_client_authentication=bool(self._tls.tls_client_ca)
        )


def _check_pair(tls: TlsSettings, cert: bytes, key: bytes, client_ca: bytes | None) -> None:
    """SettingsError unless `key` is the private key of `cert` and `client_ca` parses:
    grpc would only find out at the first handshake, and fail every one after."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # ssl loads key pairs from files only: the ones just read, unchanged (fetch re-checks).
        context.load_cert_chain(tls.tls_cert, tls.tls_key)
        if Path(tls.tls_cert).read_bytes() != cert or Path(tls.tls_key).read_bytes() != key:
            raise SettingsError(f"{tls.tls_cert} or {tls.tls_key} changed while being read")
        if client_ca is not None:
            context.load_verify_locations(cadata=client_ca.decode("ascii", errors="replace"))
    except (ssl.SSLError, OSError, ValueError) as error:
        cert_var, key_var = tls.variable("tls_cert"), tls.variable("tls_key")
        raise SettingsError(
            f"{cert_var}, {key_var} or {tls.variable('tls_client_ca')}: not a PEM certificate with its key "
            f"and a PEM CA ({type(error).__name__}: {str(error)[:120]})"
        ) from None


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """None for plaintext; files are read now, so a bad path fails at start, and again
    whenever they change (CertificateFiles). grpc binds reloading credentials to one
    server: make them per server."""
    if tls.mode == "plaintext":
        return None
    return CertificateFiles(tls).credentials()


class ReloadingSslContext:
    """TLS for a service's HTTP server (ssl, not grpc) that, like the gRPC server's, re-reads
    its files when they change: each handshake is switched to the context of the current
    files (`context.sni_callback` runs on every ClientHello, SNI or not)."""

    def __init__(self, tls: TlsSettings) -> None:
        self._files = CertificateFiles(tls)  # validates the files now, and tracks changes
        self._tls = tls
        self.context = self._build()
        self._current = self.context

    def _build(self) -> ssl.SSLContext:
        tls = self._tls
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.tls_cert, tls.tls_key)
        if tls.tls_client_ca:
            context.load_verify_locations(cafile=tls.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = self._on_hello
        return context

    def _on_hello(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if self._files.fetch() is not None:  # changed, and the new files are whole
            try:
                self._current = self._build()
            except (ssl.SSLError, OSError) as error:
                log.warning("TLS files changed but cannot be loaded; keeping the current certificate", error=str(error))
        connection.context = self._current


class ClientNameInterceptor(grpc.aio.ServerInterceptor):
    """mTLS with named clients: a call whose client certificate names none of `names` (a
    SAN DNS entry) gets PERMISSION_DENIED before any handler runs, probes included; the CA
    alone would let any workload holding a certificate it signed (another service) in."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = frozenset(name.encode() for name in names)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        names = context.auth_context().get("x509_subject_alternative_name", ())
        if self._names.isdisjoint(names):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this client's certificate is not allowed here")

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        admit = self._admit
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary_unary: Any = handler.unary_unary

            async def checked_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(context)
                return await unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(checked_unary, **codecs)
        if handler.stream_unary is not None:
            stream_unary: Any = handler.stream_unary

            async def checked_stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(context)
                return await stream_unary(requests, context)

            return grpc.stream_unary_rpc_method_handler(checked_stream_unary, **codecs)
        streaming: Any = handler.unary_stream or handler.stream_stream

        async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            response = streaming(request, context)
            if hasattr(response, "__aiter__"):
                async for item in response:
                    yield item
            else:  # a coroutine writing with context.write
                await response

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(checked_stream, **codecs)
        return grpc.stream_stream_rpc_method_handler(checked_stream, **codecs)


async def start_plaintext_health(health_servicer: health.aio.HealthServicer, host: str, port: int) -> grpc.aio.Server:
    """grpc.health.v1 alone, in plaintext, for probes that cannot speak TLS; health says
    only SERVING or not, and a NetworkPolicy keeps other pods off the port."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as error:
        raise SystemExit(f"cannot serve plaintext health on {host}:{port} ({error}); is the port in use?") from None
    await server.start()
    return server


class HealthPublisher:
    """Publishes readiness on grpc.health.v1 for "" and every served service name."""

    def __init__(self, servicer: health.aio.HealthServicer, names: Iterable[str]) -> None:
        self._servicer = servicer
        self._names = ("", *names)
        self.ready: bool | None = None

    async def publish(self, ready: bool, reason: str) -> None:
        if ready == self.ready:
            return
        for name in self._names:
            await self._servicer.set(name, SERVING if ready else NOT_SERVING)
        if self.ready is not None or not ready:
            log.info("readiness changed", ready=ready, reason=reason)
        self.ready = ready


async def _watch_readiness(service: Service, publisher: HealthPublisher, interval: float) -> None:
    while True:
        try:
            ready, reason = await service.readiness()
        except Exception as error:  # a failing check means not ready, never a crash
            ready, reason = False, f"readiness check failed: {error!r}"
        await publisher.publish(ready, reason)
        await asyncio.sleep(interval)


async def serve(service: Service, settings: ServerSettings, stop: asyncio.Event | None = None) -> None:
    """Run `service` until SIGTERM/SIGINT (or `stop` is set), then shut down gracefully."""
    try:
        tls = load_tls_settings(service.name)
        credentials = server_credentials(tls)
    except SettingsError as error:
        raise SystemExit(f"{service.name}: {error}") from None
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tls.client_names:
        interceptors.append(ClientNameInterceptor(tls.client_names))
    interceptors.append(RequestInterceptor(service.metrics.rpc(), trace_id_metadata=settings.trace_id_metadata))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service.register(server)
    reflection.enable_server_reflection((*service.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise SystemExit(f"{service.name}: cannot listen on {address} ({error}); is the port in use?") from None

    if settings.metrics_port:
        try:
            service.metrics.serve_http(settings.host, settings.metrics_port)
        except OSError as error:
            raise SystemExit(
                f"{service.name}: cannot serve metrics on {settings.host}:{settings.metrics_port} ({error})"
            ) from None
        log.info("metrics", address=f"http://{settings.host}:{settings.metrics_port}/metrics")
    publisher = HealthPublisher(health_servicer, service.grpc_services)
    await publisher.publish(False, "starting")
    await server.start()
    health_server = None
    if tls.plaintext_health_port:
        try:
            health_server = await start_plaintext_health(health_servicer, settings.host, tls.plaintext_health_port)
        except SystemExit as error:
            raise SystemExit(f"{service.name}: {error}") from None
    loop = asyncio.get_running_loop()
    log.info("listening", address=address, transport=tls.mode, event_loop=type(loop).__module__.split(".")[0])
    await service.start()
    # Everything alive now (imported modules, descriptors, loaded models, settings) lives as
    # long as the process: moved out of the collector's generations, it is no longer
    # scanned by every full collection (a gen-1 pause fell from ~4.5 ms to ~0.1 ms in
    # the monolith benchmark on the 2-core machine).
    gc.freeze()

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_readiness(service, publisher, settings.readiness_interval_seconds))
    try:
        await stop.wait()
    finally:
        started = time.monotonic()
        log.info("shutting down", grace_seconds=settings.grace_seconds)
        watcher.cancel()
        # NOT_SERVING first, so load balancers route elsewhere while in-flight calls finish.
        await health_servicer.enter_graceful_shutdown()
        if settings.drain_seconds > 0:
            await asyncio.sleep(settings.drain_seconds)
        await server.stop(settings.grace_seconds)
        if health_server is not None:
            await health_server.stop(None)
        # A service whose close() hangs must not keep the process (and a rollout) waiting.
        try:
            await asyncio.wait_for(service.close(), settings.grace_seconds)
        except TimeoutError:
            log.error("service close() did not finish in time", grace_seconds=settings.grace_seconds)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped", seconds=round(time.monotonic() - started, 3))


def run(name: str, build: Callable[[], tuple[Service, ServerSettings]]) -> None:
    """Entry point of every service's __main__: logs, telemetry, serve, flush."""
    configure_logging(name, os.environ.get("LOG_LEVEL", "INFO"))
    if tune_allocator():
        log.debug(
            "malloc thresholds set",
            mmap_threshold_bytes=MMAP_THRESHOLD_BYTES,
            trim_threshold_bytes=TRIM_THRESHOLD_BYTES,
        )
    try:
        telemetry = setup_telemetry(name)
    except SettingsError as error:  # a bad OTEL_* variable, named in the message
        raise SystemExit(f"{name}: {error}") from None

    async def main() -> None:
        # Built inside the loop: channels and Redis clients bind to the running loop.
        service, settings = build()
        await serve(service, settings)

    try:
        event_loop_runner()(main())
    except SystemExit:
        raise
    except SettingsError as error:  # a bad variable: its message is the whole story
        raise SystemExit(f"{name}: {error}") from None
    except Exception:
        log.exception("service failed")
        sys.exit(1)
    finally:
        telemetry.shutdown()
