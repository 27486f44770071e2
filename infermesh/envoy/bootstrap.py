"""The complete static bootstrap: listeners, clusters and the process-wide parts, as
canonical JSON, written atomically; and the committed envoy/local.json it is checked against."""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from infermesh.certs import CertPaths
from infermesh.envoy.admin import admin, layered_runtime, overload_manager
from infermesh.envoy.clusters import http_service_cluster, service_cluster
from infermesh.envoy.common import CONNECT_TIMEOUT, REPO_ROOT, Json, http2_upstream, lb_endpoint
from infermesh.envoy.edge_auth import jwks_clusters
from infermesh.envoy.edge_policy import EdgePolicy
from infermesh.envoy.http_filters import router
from infermesh.envoy.listeners import edge_listener, http_connection_manager, internal_listener, listener
from infermesh.envoy.tracing import Tracing, collector_cluster
from services.runtime.topology import SERVICES, Endpoint, MeshTopology, local_topology

# Repo-relative on purpose: the committed envoy/local.json must not hold a machine's path.
# Envoy resolves it against its working directory, i.e. run it from the repo root.
DEFAULT_DESCRIPTOR_SET = Path("services/genproto/infermesh_descriptor.binpb")
# The same file where this install has it (a checkout's or a wheel's site-packages): what a
# config rendered for this machine names, so it validates and runs from any directory.
# It ships as package data of services.genproto (pyproject.toml), with the OpenAPI document
# beside it, so it is found the same way in a wheel's site-packages as in a checkout.
GENPROTO_PACKAGE = "services.genproto"
INSTALLED_DESCRIPTOR_SET = Path(str(resources.files(GENPROTO_PACKAGE) / DEFAULT_DESCRIPTOR_SET.name))
LOCAL_CONFIG = Path("envoy/local.json")
# envoy/local.json is what `infermesh up` runs without --otlp-endpoint: no tracer.
LOCAL_TRACING: Tracing | None = None


def render(
    topology: MeshTopology,
    tracing: Tracing | None = None,
    edge: EdgePolicy | None = None,
    tls: CertPaths | None = None,
) -> Json:
    """The complete static bootstrap for `topology`; `tracing` adds the tracer, `edge` the
    edge's rate limit and authentication, `tls` TLS at the edge and mTLS to the services."""
    edge = edge or EdgePolicy()
    listeners = [edge_listener(topology, tracing, edge, tls)]
    listeners += [internal_listener(topology, name, tracing) for name in topology.internal_ports]
    # The jobs service is optional (a mesh of the pipeline alone has none): only the services
    # the topology runs get a cluster.
    clusters = [service_cluster(topology, name, tls) for name in SERVICES if name in topology.replicas]
    # Services that serve HTTP too (scoring's Open Inference Protocol over REST).
    clusters += [http_service_cluster(topology, name, tls) for name in SERVICES if topology.http_replicas.get(name)]
    if tracing is not None:
        clusters.append(collector_cluster(tracing.otlp_endpoint, tracing.protocol))
    clusters += jwks_clusters(edge.jwt)  # a remote JWKS's server
    return {
        "admin": admin(topology.admin_port),
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
        "overload_manager": overload_manager(),
        "layered_runtime": layered_runtime(tracing),
    }


def plain_proxy(listen_port: int, upstream_port: int, host: str = "127.0.0.1") -> Json:
    """The least an Envoy hop of the mesh does: one HTTP/2 listener routed to one HTTP/2
    upstream with the router filter alone (no retries, health checks, access log or tracing).
    `python -m infermesh.bench.rpc_floor` measures a hop's floor through it."""
    name = "plain"
    route = {"match": {"prefix": "/"}, "route": {"cluster": name}}
    manager = http_connection_manager(name, "HTTP2", [route], [router()], access_log=False)
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "typed_extension_protocol_options": http2_upstream(),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [lb_endpoint(Endpoint(host, upstream_port))]}],
        },
    }
    return {"static_resources": {"listeners": [listener(name, host, listen_port, manager)], "clusters": [cluster]}}


def to_json(config: Json) -> str:
    """Canonical text: sorted keys, indent 2, trailing newline (stable diffs)."""
    return json.dumps(config, sort_keys=True, indent=2) + "\n"


def write(
    topology: MeshTopology,
    path: Path,
    tracing: Tracing | None = None,
    edge: EdgePolicy | None = None,
    tls: CertPaths | None = None,
) -> Path:
    """Render `topology` to `path` atomically (readers never see a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_json(render(topology, tracing, edge, tls))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def local_config_topology() -> MeshTopology:
    """The topology envoy/local.json is rendered from: defaults, repo-relative descriptor."""
    return local_topology(descriptor_set=DEFAULT_DESCRIPTOR_SET)


def local_config_is_fresh(repo_root: Path = REPO_ROOT) -> bool:
    """True when envoy/local.json equals a fresh rendering of the default topology."""
    path = repo_root / LOCAL_CONFIG
    return path.is_file() and path.read_text(encoding="utf-8") == to_json(
        render(local_config_topology(), LOCAL_TRACING)
    )
