"""Mutual TLS on every hop through Envoy, with certificates Envoy re-reads when they change.

Envoy gets its certificates by SDS from files (no control plane): each SDS resource is a
file holding one Secret that names certificate files, with a `watched_directory`. When the
directory's content is swapped (a Kubernetes Secret volume update renames its `..data`
link), Envoy re-reads the files and new connections use the new certificate: rotation
without a restart. Three resources:

* `edge_certificate`: the edge listener's certificate (Secret `edge-tls` on Kubernetes);
* `mesh_certificate`: Envoy's own identity (SAN `envoy`), the client certificate it presents
  to every service and the server certificate of the backends' listeners;
* `mesh_ca`: the CA every service certificate and the gateway's is checked against.

`with_mesh_mtls` turns a rendered bootstrap into one where every internal hop is mTLS:

* Envoy -> every service (and scoring's HTTP port): Envoy presents its certificate and
  requires the replica's to name the service (SAN match), from the mesh CA;
* gateway -> the backends' listeners: the gateway must present a certificate naming it,
  Envoy presents its own;
* the edge: TLS with the edge certificate (h2 and http/1.1 by ALPN, as before).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infermesh.certs import ENVOY_NAME
from infermesh.envoy.common import EXTENSIONS_TYPE, Json
from infermesh.envoy.tls import san_matchers, tls_params, tls_socket
from services.runtime.topology import BACKENDS, GATEWAY, SERVICES, http_cluster

SECRET_TYPE = f"{EXTENSIONS_TYPE}.transport_sockets.tls.v3.Secret"

EDGE_CERTIFICATE = "edge_certificate"
MESH_CERTIFICATE = "mesh_certificate"
MESH_CA = "mesh_ca"
# Who may dial the backends' listeners: the gateway alone.
BACKEND_CLIENTS: tuple[str, ...] = (GATEWAY,)


@dataclass(frozen=True)
class SdsFiles:
    """Where the SDS resource files and the certificate files they name are.

    `edge_dir`: tls.crt and tls.key of the edge; `mesh_dir`: tls.crt, tls.key (Envoy's
    identity) and ca.crt (the mesh CA); `sds_dir`: the SDS resource files (sds_resources)."""

    sds_dir: Path
    edge_dir: Path
    mesh_dir: Path

    def resource_path(self, name: str) -> Path:
        return self.sds_dir / resource_file(name)


def resource_file(name: str) -> str:
    return f"sds-{name.replace('_', '-')}.json"


def _certificate(directory: Path) -> Json:
    return {
        "certificate_chain": {"filename": str(directory / "tls.crt")},
        "private_key": {"filename": str(directory / "tls.key")},
        # A Secret volume swaps its content by renaming ..data in this directory.
        "watched_directory": {"path": str(directory)},
    }


def sds_resources(files: SdsFiles) -> dict[str, Json]:
    """File name -> the DiscoveryResponse it holds (one Secret each: Envoy reads one per file)."""
    secrets: Mapping[str, Json] = {
        EDGE_CERTIFICATE: {"tls_certificate": _certificate(files.edge_dir)},
        MESH_CERTIFICATE: {"tls_certificate": _certificate(files.mesh_dir)},
        MESH_CA: {
            "validation_context": {
                "trusted_ca": {"filename": str(files.mesh_dir / "ca.crt")},
                "watched_directory": {"path": str(files.mesh_dir)},
            }
        },
    }
    return {
        resource_file(name): {"resources": [{"@type": SECRET_TYPE, "name": name, **secret}]}
        for name, secret in secrets.items()
    }


def _sds(files: SdsFiles, name: str) -> Json:
    return {
        "name": name,
        "sds_config": {"path_config_source": {"path": str(files.resource_path(name))}, "resource_api_version": "V3"},
    }


def _common(files: SdsFiles, certificate: str, alpn: tuple[str, ...], peer_names: tuple[str, ...] = ()) -> Json:
    common: Json = {
        "alpn_protocols": list(alpn),
        "tls_params": tls_params(),
        "tls_certificate_sds_secret_configs": [_sds(files, certificate)],
    }
    if peer_names:
        common["combined_validation_context"] = {
            "default_validation_context": {"match_typed_subject_alt_names": san_matchers(peer_names)},
            "validation_context_sds_secret_config": _sds(files, MESH_CA),
        }
    return common


def upstream_mtls(files: SdsFiles, service: str, alpn: tuple[str, ...] = ("h2",)) -> Json:
    """Envoy -> `service`'s replicas: Envoy's certificate; theirs must name `service`."""
    common = _common(files, MESH_CERTIFICATE, alpn, (service,))
    return tls_socket("UpstreamTlsContext", {"sni": service, "common_tls_context": common})


def backend_listener_mtls(files: SdsFiles) -> Json:
    """The backends' listeners: Envoy's certificate; the caller must present the gateway's."""
    common = _common(files, MESH_CERTIFICATE, ("h2",), BACKEND_CLIENTS)
    return tls_socket("DownstreamTlsContext", {"require_client_certificate": True, "common_tls_context": common})


def edge_tls(files: SdsFiles) -> Json:
    """The edge: the edge certificate; h2 and http/1.1, so gRPC and REST share the port."""
    return tls_socket(
        "DownstreamTlsContext", {"common_tls_context": _common(files, EDGE_CERTIFICATE, ("h2", "http/1.1"))}
    )


def with_mesh_mtls(config: Json, files: SdsFiles) -> Json:
    """`config` with TLS on the edge and mTLS on every hop to and from a service, all by SDS."""
    config = copy.deepcopy(config)
    # SDS subscriptions need a node identity, even from files (no control plane to show it to).
    config.setdefault("node", {"id": ENVOY_NAME, "cluster": "infermesh"})
    resources = config["static_resources"]
    for listener in resources["listeners"]:
        name = listener["name"]
        socket = edge_tls(files) if name == "edge" else backend_listener_mtls(files) if name in BACKENDS else None
        if socket is None:
            raise ValueError(f"listener {name!r} is neither the edge nor a backend's: no TLS for it")
        for chain in listener["filter_chains"]:
            chain["transport_socket"] = socket
    http_clusters = {http_cluster(service): service for service in SERVICES}
    for cluster in resources["clusters"]:
        name = cluster["name"]
        if name in SERVICES:
            cluster["transport_socket"] = upstream_mtls(files, name)
        elif name in http_clusters:
            # The replica's certificate names the service, whichever port presents it.
            cluster["transport_socket"] = upstream_mtls(files, http_clusters[name], alpn=("http/1.1",))
    return config


def mtls_clusters(config: Json) -> list[str]:
    """The clusters of `config` that are a service's (each must carry upstream_mtls)."""
    http_clusters = {http_cluster(service) for service in SERVICES}
    return [c["name"] for c in config["static_resources"]["clusters"] if c["name"] in {*SERVICES, *http_clusters}]
