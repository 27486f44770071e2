"""The mesh on Kubernetes: the topology deploy/ runs, and the Envoy config its ConfigMap holds.

The Envoy config comes from the one renderer `infermesh up` uses
(infermesh.envoy.render); only the topology differs:

* one endpoint per service: its headless Service `<name>:<port>` (same name as the Envoy
  cluster, the Deployment and OTEL_SERVICE_NAME), resolved with STRICT_DNS, so every ready
  pod becomes an upstream host and Envoy's gRPC health checks still gate traffic; scoring's
  HTTP port (the Open Inference Protocol over REST) is the same Service's port `http`, for
  Envoy's cluster `scoring_http`;
* listeners on 0.0.0.0, so the gateway pods reach the backends' listeners at `envoy:<port>`;
* the transcoder's descriptor set at the path the images hold it (deploy/Dockerfile).

The rendered files are committed, never hand-edited, and fed to kustomize's
configMapGenerator:

* deploy/base/envoy/envoy.json        plaintext edge (base)
* deploy/components/tls/envoy.json    the same config with TLS on the edge listener
* deploy/components/mtls/envoy.json   TLS on the edge and mTLS on every internal hop, its
  certificates by SDS from files (infermesh.envoy.sds), and the SDS resource files next to
  it (sds-*.json), which the same ConfigMap carries

CLI::

    python -m infermesh.kubernetes render     # rewrite every file
    python -m infermesh.kubernetes check      # exit 1 if any is stale
    python -m infermesh.kubernetes validate   # envoy --mode validate on every variant
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from infermesh import envoy
from infermesh.envoy import REPO_ROOT, Json, Tracing, render, to_json
from infermesh.envoy.sds import SdsFiles, sds_resources, with_mesh_mtls
from infermesh.envoy.tls import edge_tls_socket
from services.runtime.topology import (
    BACKENDS,
    DEFAULT_REPLICA_BASE_PORTS,
    HTTP_PORT_OFFSET,
    HTTP_SERVICES,
    SERVICES,
    Endpoint,
    MeshTopology,
)

# Deployment and Service of the Envoy front proxy (edge + the backends' listeners).
ENVOY = "envoy"
# Where deploy/Dockerfile puts the descriptor set in every image.
DESCRIPTOR_SET = Path("/etc/infermesh/infermesh_descriptor.binpb")
# Where deploy/components/tls mounts the `edge-tls` Secret (kubernetes.io/tls) into Envoy.
TLS_DIR = Path("/etc/envoy-tls")
# Where deploy/components/mtls mounts the `envoy-mtls` Secret (tls.crt, tls.key, ca.crt:
# Envoy's identity and the mesh CA); the SDS resource files sit next to envoy.json.
MTLS_DIR = Path("/etc/envoy-mtls")
CONFIG_DIR = Path("/etc/envoy")
# Committed renderings, repo-relative: plain (base), with TLS on the edge (tls component),
# and with mTLS on every internal hop too (mtls component, with its SDS files).
CONFIG_FILES: Mapping[str, Path] = {
    "plain": Path("deploy/base/envoy/envoy.json"),
    "tls": Path("deploy/components/tls/envoy.json"),
    "mtls": Path("deploy/components/mtls/envoy.json"),
}
LOCAL_DESCRIPTOR_SET = REPO_ROOT / envoy.DEFAULT_DESCRIPTOR_SET


def service_port(service: str) -> int:
    """The gRPC port of `service`'s pods and headless Service (its first local replica's)."""
    return DEFAULT_REPLICA_BASE_PORTS[service]


def http_port(service: str) -> int:
    """The HTTP port of `service`'s pods and headless Service, for the HTTP_SERVICES (scoring's
    Open Inference Protocol over REST): its gRPC port + HTTP_PORT_OFFSET, as locally."""
    return service_port(service) + HTTP_PORT_OFFSET


def kubernetes_topology(descriptor_set: Path = DESCRIPTOR_SET) -> MeshTopology:
    """One STRICT_DNS endpoint per service: the headless Service of the same name (for
    scoring's HTTP port too, the Service's second port)."""
    return MeshTopology(
        replicas={name: (Endpoint(name, service_port(name)),) for name in SERVICES},
        descriptor_set=descriptor_set,
        listen_host="0.0.0.0",
        discovery="STRICT_DNS",
        http_replicas={name: (Endpoint(name, http_port(name)),) for name in HTTP_SERVICES},
    )


def gateway_targets() -> dict[str, str]:
    """The gateway's GATEWAY_<BACKEND>_TARGET variables: the Envoy Service's listener ports."""
    ports = kubernetes_topology().internal_ports
    return {f"GATEWAY_{name.upper()}_TARGET": f"{ENVOY}:{ports[name]}" for name in BACKENDS}


def with_edge_tls(config: Json, cert_dir: Path = TLS_DIR) -> Json:
    """`config` with TLS (tls.crt/tls.key in `cert_dir`) on the edge listener, nothing else changed.

    ALPN offers h2 and http/1.1, so gRPC and REST still share the edge port (codec AUTO).
    """
    config = copy.deepcopy(config)
    (edge,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "edge"]
    for chain in edge["filter_chains"]:
        chain["transport_socket"] = edge_tls_socket(cert_dir / "tls.crt", cert_dir / "tls.key")
    return config


# Envoy traces too, exporting to the base's OpenTelemetry Collector Service; it samples new
# traces at the services' rate (OTEL_TRACES_SAMPLER_ARG=0.05 in base/kustomization.yaml),
# and the services follow its decision (parentbased_traceidratio).
TRACING = Tracing(otlp_endpoint="http://otel-collector:4317", sampling_percent=5.0)


# In the pod: the edge's Secret, Envoy's mesh Secret, and the SDS files in the ConfigMap.
SDS_FILES = SdsFiles(sds_dir=CONFIG_DIR, edge_dir=TLS_DIR, mesh_dir=MTLS_DIR)


def render_config(
    variant: str = "plain",
    *,
    descriptor_set: Path = DESCRIPTOR_SET,
    tls_dir: Path = TLS_DIR,
    sds_files: SdsFiles = SDS_FILES,
    edge: envoy.EdgePolicy | None = None,
) -> Json:
    """The Kubernetes Envoy bootstrap: `plain`, `tls` (TLS on the edge listener) or `mtls`
    (TLS on the edge, mTLS on every internal hop, certificates by SDS from `sds_files`).
    `edge`: API keys, JWT and rate limits at the edge (the committed files have none;
    docs/security.md says how to render and ship one that does)."""
    config = render(kubernetes_topology(descriptor_set), tracing=TRACING, edge=edge)
    if variant == "tls":
        return with_edge_tls(config, tls_dir)
    if variant == "mtls":
        return with_mesh_mtls(config, sds_files)
    if variant != "plain":
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(CONFIG_FILES)}")
    return config


def generated_files() -> dict[Path, str]:
    """Every committed rendering, repo-relative path -> text: the configs and the mtls
    variant's SDS resource files."""
    files = {relative: to_json(render_config(variant)) for variant, relative in CONFIG_FILES.items()}
    sds_dir = CONFIG_FILES["mtls"].parent
    files |= {sds_dir / name: to_json(resource) for name, resource in sds_resources(SDS_FILES).items()}
    return files


def stale_configs(repo_root: Path = REPO_ROOT) -> list[Path]:
    """The committed renderings that differ from a fresh rendering (missing counts as stale)."""
    stale = []
    for relative, text in generated_files().items():
        path = repo_root / relative
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(relative)
    return stale


def write_configs(repo_root: Path = REPO_ROOT) -> list[Path]:
    written = []
    for relative, text in generated_files().items():
        path = repo_root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(relative)
    return written


def _self_signed_certificate(directory: Path) -> None:
    """A throwaway tls.crt/tls.key for `envoy --mode validate` (Envoy loads the files)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise envoy.EnvoyError("openssl is needed to make a throwaway certificate for validation")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=infermesh-validate",
            "-keyout",
            str(directory / "tls.key"),
            "-out",
            str(directory / "tls.crt"),
        ],
        check=True,
        capture_output=True,
    )


def _throwaway_sds_files(directory: Path) -> SdsFiles:
    """SDS files naming throwaway certificates in `directory`, laid out as in the pod."""
    from infermesh import certs

    paths = certs.generate(directory / "certs", days=1)
    files = SdsFiles(sds_dir=directory / "sds", edge_dir=directory / "edge", mesh_dir=directory / "mesh")
    copies = {
        files.edge_dir: {"tls.crt": paths.edge_cert, "tls.key": paths.edge_key},
        files.mesh_dir: {"tls.crt": paths.client_cert, "tls.key": paths.client_key, "ca.crt": paths.ca_cert},
    }
    for target, sources in copies.items():
        target.mkdir()
        for name, source in sources.items():
            shutil.copyfile(source, target / name)
    files.sds_dir.mkdir()
    for name, resource in sds_resources(files).items():
        (files.sds_dir / name).write_text(to_json(resource), encoding="utf-8")
    return files


def validate_configs() -> list[str]:
    """Run `envoy --mode validate` on every variant; raise EnvoyError on the first rejection.

    In-cluster paths do not exist here, so each variant is rendered with the repo's
    descriptor set and throwaway certificates (and SDS files naming them) instead: everything else is byte-for-byte
    the committed config (see tests/unit/test_deploy_envoy_parity.py).
    """
    validated = []
    with tempfile.TemporaryDirectory(prefix="infermesh-k8s-envoy-") as tmp:
        tmp_dir = Path(tmp)
        _self_signed_certificate(tmp_dir)
        sds_files = _throwaway_sds_files(tmp_dir)
        for variant in CONFIG_FILES:
            path = tmp_dir / f"envoy-{variant}.json"
            config = render_config(variant, descriptor_set=LOCAL_DESCRIPTOR_SET, tls_dir=tmp_dir, sds_files=sds_files)
            path.write_text(to_json(config), encoding="utf-8")
            envoy.validate(path, cwd=tmp_dir)
            validated.append(variant)
    return validated


# Custom resources deploy/ ships, by (apiVersion, kind), and the CRD that defines each:
# kubernetes-validate knows only Kubernetes' own kinds (third_party/prometheus-operator,
# third_party/cert-manager).
CUSTOM_RESOURCE_DEFINITIONS: Mapping[tuple[str, str], Path] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): REPO_ROOT
    / "third_party/prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    ("cert-manager.io/v1", "Certificate"): REPO_ROOT / "third_party/cert-manager/cert-manager.io_certificates.yaml",
    ("cert-manager.io/v1", "Issuer"): REPO_ROOT / "third_party/cert-manager/cert-manager.io_issuers.yaml",
}


def custom_resource_errors(resource: Mapping[str, object]) -> list[str] | None:
    """Schema errors of a custom resource deploy/ ships, against its CRD's served version;
    None for a kind not in CUSTOM_RESOURCE_DEFINITIONS. Strict as scripts/validate_deploy.sh
    is with built-in kinds: an unknown field is an error (the API server would drop it)."""
    import jsonschema  # the dev extra's (kubernetes-validate's), like yaml: only deploy checks need them
    import yaml

    crd_path = CUSTOM_RESOURCE_DEFINITIONS.get((str(resource.get("apiVersion")), str(resource.get("kind"))))
    if crd_path is None:
        return None
    crd = yaml.safe_load(crd_path.read_text(encoding="utf-8"))
    version = str(resource["apiVersion"]).rpartition("/")[2]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    schema = _strict(served["schema"]["openAPIV3Schema"])
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'.'.join(str(part) for part in error.absolute_path) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(resource), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _strict(schema: object) -> object:
    """The schema with unknown properties rejected wherever it lists properties and does not
    keep unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infermesh.kubernetes",
        description="Render, check and validate the Kubernetes Envoy configs under deploy/.",
    )
    parser.add_argument("command", choices=("render", "check", "validate"))
    args = parser.parse_args(argv)
    if args.command == "render":
        for path in write_configs():
            print(f"wrote {path}")
        return 0
    if args.command == "check":
        stale = stale_configs()
        for path in stale:
            print(
                f"{path} is stale: run `python -m infermesh.kubernetes render` from the repo root",
                file=sys.stderr,
            )
        return 1 if stale else 0
    try:
        for variant in validate_configs():
            print(f"envoy --mode validate: Kubernetes config ({variant}) OK")
    except (envoy.EnvoyError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
