"""How the client reaches the edge: TLS, a client certificate, an API key or a bearer token.

Each comes from the client's arguments, else from the environment (INFERMESH_TLS,
INFERMESH_TLS_CA_FILE, INFERMESH_TLS_CERT_FILE, INFERMESH_TLS_KEY_FILE, INFERMESH_API_KEY,
INFERMESH_TOKEN), so a program picks up its deployment's credentials without code. TLS
verifies the edge against the CA file, or the system's roots without one. An API key goes as
`x-api-key`, a token (a JWT) as `authorization: Bearer`; neither is sent in the clear to
another machine, and neither appears in a repr or an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from infermesh.loopback import is_loopback_host
from services.runtime.settings import ServiceSettings, load_settings
from services.runtime.tls_files import read_tls_file


class ClientSettings(ServiceSettings):
    """The Python client's connection to the edge (INFERMESH_*); its arguments win."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_", env_ignore_empty=True)

    tls: bool = Field(False, description="TLS to the edge (also on when a TLS file is set).")
    tls_ca_file: str = Field("", description="CA certificate(s), PEM, the edge's must chain to; empty: system roots.")
    tls_cert_file: str = Field("", description="Client certificate, PEM, presented to the edge (with the key).")
    tls_key_file: str = Field("", description="Private key, PEM, of the client certificate.")
    api_key: SecretStr = Field("", validate_default=True, description="API key, sent as x-api-key.")
    token: SecretStr = Field("", validate_default=True, description="Bearer token (a JWT), sent as authorization.")

    @model_validator(mode="after")
    def _consistent(self) -> ClientSettings:
        self.check_paired("tls_cert_file", "tls_key_file")
        if self.api_key.get_secret_value() and self.token.get_secret_value():
            raise ValueError("set INFERMESH_API_KEY or INFERMESH_TOKEN, not both")
        return self


@dataclass(frozen=True)
class Security:
    """What a channel and each of its calls carry: credentials (None: plaintext) and metadata."""

    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def security(
    addresses: Sequence[str],
    *,
    tls: bool | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    api_key: str | None = None,
    token: str | None = None,
) -> Security:
    """Arguments given (not None) win over the environment; ValueError on a contradiction."""
    env = load_settings(ClientSettings)
    settings = ClientSettings(
        tls=env.tls if tls is None else tls,
        tls_ca_file=env.tls_ca_file if ca_file is None else ca_file,
        tls_cert_file=env.tls_cert_file if cert_file is None else cert_file,
        tls_key_file=env.tls_key_file if key_file is None else key_file,
        api_key=env.api_key if api_key is None else SecretStr(api_key),
        token=env.token if token is None else SecretStr(token),
    )
    files = settings.tls_ca_file or settings.tls_cert_file
    use_tls = settings.tls or (tls is None and bool(files))
    if files and not use_tls:
        raise ValueError("TLS files were given with tls=False")
    metadata = _metadata(settings)
    if metadata and not use_tls and not all(_on_this_machine(address) for address in addresses):
        raise ValueError("an API key or token would cross the network in the clear: use TLS (tls=True)")
    return Security(_credentials(settings) if use_tls else None, metadata)


def _metadata(settings: ClientSettings) -> tuple[tuple[str, str], ...]:
    if settings.api_key.get_secret_value():
        return (("x-api-key", settings.api_key.get_secret_value()),)
    if settings.token.get_secret_value():
        return (("authorization", f"Bearer {settings.token.get_secret_value()}"),)
    return ()


def _credentials(settings: ClientSettings) -> grpc.ChannelCredentials:
    def read(path: str, what: str) -> bytes | None:
        return read_tls_file(path, f"the {what}") if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.tls_ca_file, "CA file"),
        private_key=read(settings.tls_key_file, "key file"),
        certificate_chain=read(settings.tls_cert_file, "certificate file"),
    )


def _on_this_machine(address: str) -> bool:
    """host:port (or [v6]:port) names a loopback address."""
    return is_loopback_host(address.rsplit(":", 1)[0].strip("[]") if ":" in address else address)
