"""Client channels with the defaults every caller in the mesh should have.

Created once per process and reused: a deadline on every call (the caller's budget),
retries on UNAVAILABLE through the gRPC service config, tracing propagation.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping
from typing import Any

import grpc
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.logs import get_logger
from services.runtime.rpc_tracing import TracedChannel
from services.runtime.settings import ServiceSettings, SettingsError, load_settings
from services.runtime.tls_files import file_signature, read_tls_file

log = get_logger(__name__)

# Retry only what is safe: UNAVAILABLE means the call did not reach a server's handler.
DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def channel_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", json.dumps(DEFAULT_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


class MeshTlsSettings(ServiceSettings):
    """`MESH_TLS_CA`, `_CERT`, `_KEY` (PEM files): the channels a service opens to Envoy's
    backend listeners speak mTLS, presenting that certificate and requiring Envoy's to name
    `MESH_TLS_SERVER_NAME`; empty: plaintext. The files are looked at every 10 s and new
    connections use them once they change (ReloadingChannel). On Kubernetes the gateway's,
    from its Secret (deploy/components/mtls)."""

    model_config = SettingsConfigDict(env_prefix="MESH_TLS_")

    ca: str = Field("", description="PEM CA bundle that signed Envoy's certificate; empty: plaintext channels.")
    cert: str = Field("", description="PEM client certificate presented to Envoy; set with the CA.")
    key: str = Field("", description="PEM private key of that certificate.")
    server_name: str = Field("envoy", description="The name Envoy's certificate must carry (SAN).")

    @model_validator(mode="after")
    def _files_go_together(self) -> MeshTlsSettings:
        if len({bool(self.ca), bool(self.cert), bool(self.key)}) > 1:
            names = ", ".join(self.variable(name) for name in ("ca", "cert", "key"))
            raise ValueError(f"{names} go together: set all three or none")
        return self

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext; files are read now, so a bad path fails at start."""
        return tls_credentials(self.ca, self.cert, self.key) if self.ca else None


def tls_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """A TLS client's credentials from PEM files: the CA the server's certificate must chain
    to (empty: the system's roots) and, with `cert` and `key`, a client certificate. The
    files are read now, so a bad path fails at start (SettingsError naming it)."""

    def read(path: str) -> bytes | None:
        return read_tls_file(path) if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))


def load_mesh_tls(environ: Mapping[str, str] | None = None) -> MeshTlsSettings:
    return load_settings(MeshTlsSettings, environ)


# How often a ReloadingChannel looks at its files, and how long calls already on a replaced
# channel get to finish.
RELOAD_CHECK_SECONDS = 10.0
RETIRE_GRACE_SECONDS = 30.0


class ReloadingChannel:
    """An mTLS grpc.aio channel whose client certificate follows its files: grpc fixes a
    channel's credentials when it opens, so when the files change (a renewed Kubernetes
    Secret), the next call opens a channel with the new ones and the old one closes once its
    calls are done (RETIRE_GRACE_SECONDS). Stubs keep working: the methods it hands out look
    up the current channel on each call; the files are looked at every `check_seconds`."""

    def __init__(self, target: str, tls: MeshTlsSettings, *, check_seconds: float = RELOAD_CHECK_SECONDS) -> None:
        self._target, self._tls, self._check_seconds = target, tls, check_seconds
        self._signature = self._stat()
        self._channel = self._open()
        self._next_check = time.monotonic() + check_seconds
        self._retiring: set[asyncio.Task[None]] = set()

    def _stat(self) -> tuple[object, ...]:
        return file_signature((self._tls.ca, self._tls.cert, self._tls.key))

    def _open(self) -> grpc.aio.Channel:
        credentials = self._tls.credentials()
        assert credentials is not None  # only made with TLS settings
        options = [*channel_options(), ("grpc.ssl_target_name_override", self._tls.server_name)]
        return grpc.aio.secure_channel(self._target, credentials, options=options)

    def current(self) -> grpc.aio.Channel:
        now = time.monotonic()
        if now < self._next_check:
            return self._channel
        self._next_check = now + self._check_seconds
        signature = self._stat()
        if signature == self._signature:
            return self._channel
        try:
            _check_pair(self._tls)
            channel = self._open()
        except SettingsError as error:  # half-updated or unreadable: keep the current one, look again later
            log.warning("mesh TLS files changed but cannot be used yet", error=str(error))
            return self._channel
        old, self._channel, self._signature = self._channel, channel, signature
        task = asyncio.get_running_loop().create_task(old.close(RETIRE_GRACE_SECONDS))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("mesh TLS certificate reloaded", target=self._target)
        return channel

    def unary_unary(self, *args: Any, **kwargs: Any) -> _CurrentMethod:
        return _CurrentMethod(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> _CurrentMethod:
        return _CurrentMethod(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> _CurrentMethod:
        return _CurrentMethod(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> _CurrentMethod:
        return _CurrentMethod(self, "stream_stream", args, kwargs)

    def __getattr__(self, name: str) -> Any:  # channel_ready, get_state...: the current channel's
        return getattr(self.current(), name)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)
        await asyncio.gather(*self._retiring, return_exceptions=True)

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _CurrentMethod:
    """One method of a ReloadingChannel, called on whichever channel is current."""

    __slots__ = ("_owner", "_kind", "_args", "_kwargs", "_channel", "_method")

    def __init__(self, owner: ReloadingChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._owner, self._kind, self._args, self._kwargs = owner, kind, args, kwargs
        self._channel: grpc.aio.Channel | None = None
        self._method: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if channel is not self._channel:
            self._channel, self._method = channel, getattr(channel, self._kind)(*self._args, **self._kwargs)
        return self._method(*args, **kwargs)


def _check_pair(tls: MeshTlsSettings) -> None:
    """SettingsError unless the key is the certificate's (a rotation caught half-written)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(tls.cert, tls.key)
        context.load_verify_locations(cafile=tls.ca)
    except (ssl.SSLError, OSError) as error:
        raise SettingsError(f"{tls.variable('cert')}, {tls.variable('key')} or {tls.variable('ca')}: {error}") from None


def open_channel(target: str, *, traced: bool = True, tls: MeshTlsSettings | None = None) -> grpc.aio.Channel:
    """A channel to `target`; mTLS when MESH_TLS_* (or `tls`) says so, following its files."""
    tls = load_mesh_tls() if tls is None else tls
    channel: Any
    if not tls.ca:
        channel = grpc.aio.insecure_channel(target, options=channel_options())
    else:
        _check_pair(tls)
        channel = ReloadingChannel(target, tls)
    # A TracedChannel stands in for the channel it wraps (stubs, close, channel_ready).
    return TracedChannel(channel) if traced else channel  # type: ignore[return-value]
