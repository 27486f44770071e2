"""`infermesh certs`: a local CA and the certificates for TLS at the edge and mTLS inside.

For local use and tests, not a PKI: one directory holds

* ca.crt / ca.key            the CA everything below is signed by (and trusts);
* edge.crt / edge.key        Envoy's edge listener (SANs localhost, 127.0.0.1, ::1, --host);
* client.crt / client.key    Envoy's certificate (SAN DNS:envoy, client and server use): what
                             it presents to every replica (also what `infermesh up` and the
                             tests probe replicas with), and on Kubernetes what its backend
                             listeners present to the gateway;
* <service>.crt / .key       each service's server certificate, SAN DNS:<service> (the name
                             Envoy checks) plus localhost and 127.0.0.1; the gateway's is a
                             client certificate too (it dials Envoy's backend listeners).

A service serves TLS when <SERVICE>_TLS_CERT and <SERVICE>_TLS_KEY are set, and requires a
client certificate signed by <SERVICE>_TLS_CLIENT_CA when that is set too, naming Envoy
(<SERVICE>_TLS_CLIENT_NAMES) (services/runtime/server.py); `infermesh up --tls DIR` sets
them all (service_tls_env). On Kubernetes, the same files can fill the Secrets of
deploy/components/mtls (docs/security.md).

CLI::

    infermesh certs [--out DIR] [--host NAME]... [--days N] [--force | --renew]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infermesh.cli_help import CommandParser
from infermesh.settings import tool_settings
from services.runtime.topology import GATEWAY, SERVICES

DEFAULT_DAYS = 365
# The name in Envoy's certificate: what every service admits (<SERVICE>_TLS_CLIENT_NAMES).
ENVOY_NAME = "envoy"
# Services that call through Envoy's backend listeners, so their certificate is a client's too.
CLIENT_SERVICES: tuple[str, ...] = (GATEWAY,)
LOCAL_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


def default_dir() -> Path:
    return Path(tool_settings().data_dir) / "certs"


@dataclass(frozen=True)
class CertPaths:
    """Where each certificate and key lives in a directory `infermesh certs` wrote."""

    directory: Path

    def _path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca_cert(self) -> Path:
        return self._path("ca.crt")

    @property
    def ca_key(self) -> Path:
        return self._path("ca.key")

    @property
    def edge_cert(self) -> Path:
        return self._path("edge.crt")

    @property
    def edge_key(self) -> Path:
        return self._path("edge.key")

    @property
    def client_cert(self) -> Path:
        return self._path("client.crt")

    @property
    def client_key(self) -> Path:
        return self._path("client.key")

    def service_cert(self, service: str) -> Path:
        return self._path(f"{service}.crt")

    def service_key(self, service: str) -> Path:
        return self._path(f"{service}.key")

    def all(self) -> list[Path]:
        paths = [self.ca_cert, self.ca_key, self.edge_cert, self.edge_key, self.client_cert, self.client_key]
        for service in SERVICES:
            paths += [self.service_cert(service), self.service_key(service)]
        return paths

    def missing(self) -> list[Path]:
        return [path for path in self.all() if not path.is_file()]

    @classmethod
    def checked(cls, directory: Path) -> CertPaths:
        """The certificates in `directory` (made absolute); ValueError if any is missing."""
        paths = cls(Path(directory).resolve())
        paths.check()
        return paths

    def check(self) -> None:
        """ValueError naming what is missing (and how to make it)."""
        missing = self.missing()
        if missing:
            names = ", ".join(path.name for path in missing)
            raise ValueError(
                f"{self.directory}: missing {names}; create them with `infermesh certs --out {self.directory}`"
            )


def service_tls_env(service: str, paths: CertPaths) -> dict[str, str]:
    """A replica's environment for TLS with required client certificates (mTLS)."""
    prefix = service.upper()
    return {
        f"{prefix}_TLS_CERT": str(paths.service_cert(service)),
        f"{prefix}_TLS_KEY": str(paths.service_key(service)),
        f"{prefix}_TLS_CLIENT_CA": str(paths.ca_cert),
        f"{prefix}_TLS_CLIENT_NAMES": ENVOY_NAME,
    }


def client_credentials(paths: CertPaths, *, with_client_cert: bool = True):  # type: ignore[no-untyped-def]
    """grpc ChannelCredentials trusting the local CA, presenting client.crt unless told not to."""
    import grpc

    root = paths.ca_cert.read_bytes()
    if not with_client_cert:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=paths.client_key.read_bytes(),
        certificate_chain=paths.client_cert.read_bytes(),
    )


# --------------------------------------------------------------------------- generation


# A DNS name of letters, digits and '-' labels joined by '.' (a leading '*.' for a wildcard).
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def host_name(text: str) -> str:
    """--host: an IP address or a DNS name a certificate can name; else a usage error."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if len(text) > 253 or not _DNS_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is neither an IP address nor a DNS name")
    return text


def _names(hosts: Iterable[str]):  # type: ignore[no-untyped-def]
    from cryptography import x509

    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write(path: Path, data: bytes, private: bool) -> None:
    # Keys are created owner-only from the start, never world-readable for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class _Issuer:
    """A CA: a new one, or with `existing`, the one whose ca.crt/ca.key are there (renewal)."""

    def __init__(self, days: int, existing: CertPaths | None = None) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ec, self._oid = x509, hashes, ec, NameOID
        now = datetime.datetime.now(datetime.UTC)
        # An hour back: a clock a little behind must not find the certificate not yet valid.
        self.not_before = now - datetime.timedelta(hours=1)
        self.not_after = now + datetime.timedelta(days=days)
        if existing is not None:
            self.cert = x509.load_pem_x509_certificate(existing.ca_cert.read_bytes())
            key = serialization.load_pem_private_key(existing.ca_key.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{existing.ca_key}: not the EC key `infermesh certs` writes")
            self.key, self.name = key, self.cert.subject
            # Leaves must not outlive their CA.
            self.not_after = min(self.not_after, self.cert.not_valid_after_utc)
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "infermesh local CA")])
        public = self.key.public_key()
        self.cert = (
            self._builder(self.name, public)
            .issuer_name(self.name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def _builder(self, subject, public_key):  # type: ignore[no-untyped-def]
        x509 = self._x509
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def issue(  # type: ignore[no-untyped-def]
        self, common_name: str, *, server_names: Sequence[str] = (), server: bool = True, client: bool = False
    ):
        x509, oid = self._x509, self._x509.oid.ExtendedKeyUsageOID
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, common_name)])
        usages = [usage for usage, wanted in ((oid.SERVER_AUTH, server), (oid.CLIENT_AUTH, client)) if wanted]
        builder = (
            self._builder(subject, key.public_key())
            .issuer_name(self.name)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        names = list(server_names) or [common_name]
        builder = builder.add_extension(x509.SubjectAlternativeName(_names(names)), critical=False)
        return key, builder.sign(self.key, self._hashes.SHA256())


def _pem(key, cert) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def generate(directory: Path, *, hosts: Sequence[str] = (), days: int = DEFAULT_DAYS, renew: bool = False) -> CertPaths:
    """Write a fresh CA and every certificate to `directory` (replacing what is there); with
    `renew`, new certificates and keys from the CA already there, which stays (so what
    trusts it keeps trusting them: rotation)."""
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    paths = CertPaths(Path(directory).resolve())
    paths.directory.mkdir(parents=True, exist_ok=True)
    if renew:
        missing = [p.name for p in (paths.ca_cert, paths.ca_key) if not p.is_file()]
        if missing:
            raise ValueError(f"--renew needs the CA in {paths.directory}: {', '.join(missing)} missing")
        issuer = _Issuer(days, existing=paths)
    else:
        issuer = _Issuer(days)
        key_pem, cert_pem = _pem(issuer.key, issuer.cert)
        _write(paths.ca_key, key_pem, private=True)
        _write(paths.ca_cert, cert_pem, private=False)

    def save(cert_path: Path, key_path: Path, common_name: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
        key_pem, cert_pem = _pem(*issuer.issue(common_name, **kwargs))
        _write(key_path, key_pem, private=True)
        _write(cert_path, cert_pem, private=False)

    save(paths.edge_cert, paths.edge_key, "infermesh-edge", server_names=[*LOCAL_NAMES, *hosts])
    # Envoy's identity: the client certificate it presents to every replica, and on
    # Kubernetes the server certificate of the backends' listeners the gateway dials.
    save(paths.client_cert, paths.client_key, ENVOY_NAME, server_names=[ENVOY_NAME], client=True)
    for service in SERVICES:
        names = [service, *LOCAL_NAMES, *hosts]
        # The gateway is a client of Envoy's backend listeners too (mTLS on Kubernetes).
        client = service in CLIENT_SERVICES
        save(paths.service_cert(service), paths.service_key(service), service, server_names=names, client=client)
    return paths


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="infermesh certs",
        description="Create a local CA and certificates for TLS at the edge and mTLS between "
        "Envoy and the services (for `infermesh up --tls DIR`). For local use and tests.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_dir(),
        help="directory to write to (default $INFERMESH_DATA_DIR/certs or ./.infermesh/certs)",
    )
    parser.add_argument(
        "--host",
        action="append",
        type=host_name,
        default=[],
        metavar="NAME",
        help="one more DNS name or IP the edge and services are reached by (repeatable); "
        "localhost, 127.0.0.1 and ::1 are always in",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace certificates that already exist")
    parser.add_argument(
        "--renew",
        action="store_true",
        help="new certificates and keys from the CA already in --out, which stays (rotation: "
        "whatever trusts the CA accepts them)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = CertPaths(args.out.resolve())
    if not args.force and not args.renew and not paths.missing():
        print(f"certificates already in {paths.directory} (--force replaces them, --renew renews them)")
        return 0
    try:
        generate(paths.directory, hosts=args.host, days=args.days, renew=args.renew)
    except (ValueError, OSError) as error:
        print(f"infermesh certs: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote a CA and certificates for the edge, Envoy's client and {', '.join(SERVICES)} "
        f"to {paths.directory}\n"
        f"  use them:   infermesh up --tls {paths.directory}\n"
        f"  REST:       curl --cacert {paths.ca_cert} https://localhost:8080/v1/recommend ...\n"
        f"  gRPC:       grpc.ssl_channel_credentials(root_certificates=open('{paths.ca_cert}','rb').read())"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
