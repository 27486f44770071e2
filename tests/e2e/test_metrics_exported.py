"""What the services of a running mesh export is what deploy/ reads.

The mesh of tests/conftest.py (real Envoy, Redis, ONNX Runtime) serves some Recommend
traffic, then every replica's /metrics is scraped:

* a real scoring replica exposes Triton's families under Triton's names, types and labels,
  in the plain text format and in OpenMetrics (the list: tests/unit/test_metrics_triton.py);
* every metric a Grafana dashboard or an alert rule reads is exported by a service, or
  listed in deploy/base/prometheus/metrics.yaml as coming from Prometheus itself or
  kube-state-metrics (histogram series resolve to their family);
* every service entry of metrics.yaml is exported by the services it names, with its type
  and, where series exist, exactly its labels.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from infermesh.up.supervisor import Mesh
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.topology import FEATURES, GATEWAY, RANKING, SCORING
from tests.metrics_contract import (
    METRICS,
    Exposition,
    alert_expressions,
    as_promql,
    dashboard_expressions,
    fetch_exposition,
    from_a_service,
    parse_exposition,
    selectors,
)
from tests.unit.test_metrics_triton import OPENMETRICS, check_triton_exposition

CANDIDATES = [f"i{n}" for n in range(0, 20_000, 100)]
REQUESTS = 40


@pytest.fixture(scope="module")
def scraped(mesh: Mesh) -> dict[str, Exposition]:
    """Replica name (scoring-0, ...) -> its exposition, after some concurrent traffic (so the
    gateway coalesces and every per-request series exists)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}")
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)

    def recommend(user: int) -> int:
        request = gateway_pb2.RecommendRequest(user_id=f"u{user}", candidate_ids=CANDIDATES, k=20)
        return len(stub.Recommend(request, timeout=10).items)

    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(recommend, range(REQUESTS))) == [20] * REQUESTS
    finally:
        channel.close()
    assert mesh.metrics_ports, "the mesh serves no /metrics"
    return {
        replica: parse_exposition(fetch_exposition(port)[1]) for replica, port in sorted(mesh.metrics_ports.items())
    }


def service_of(replica: str) -> str:
    return replica.rsplit("-", 1)[0]


def exporters(entry: dict[str, object]) -> set[str]:
    """The services metrics.yaml says export a `service` entry: `service (scoring)`,
    `service (all four; ...)` = the four request-path services, `service (all; ...)` = every one."""
    named = str(entry["source"]).partition("(")[2].split(";")[0].rstrip(")").strip()
    if named == "all four":
        return {GATEWAY, FEATURES, SCORING, RANKING}
    if named == "all":
        return set()  # every replica: see replicas_exporting
    return {named}


def test_a_real_scoring_replica_exposes_tritons_families(mesh: Mesh, scraped: dict[str, Exposition]) -> None:
    scoring = [replica for replica in scraped if service_of(replica) == SCORING]
    assert len(scoring) == 2
    for replica in scoring:
        check_triton_exposition(scraped[replica])
        content_type, text = fetch_exposition(mesh.metrics_ports[replica], OPENMETRICS)
        assert content_type.startswith("application/openmetrics-text") and text.endswith("# EOF\n")
        check_triton_exposition(parse_exposition(text.removesuffix("# EOF\n")))

    def total(family: str) -> float:
        return sum(s.value for replica in scoring for s in scraped[replica].samples if s.name == family)

    # Coalescing may merge Recommends into one ModelInfer, but every candidate is a row.
    assert total("nv_inference_request_success") > 0
    assert total("nv_inference_count") >= REQUESTS * len(CANDIDATES)


def test_every_metric_the_dashboards_and_alerts_read_is_exported(scraped: dict[str, Exposition]) -> None:
    missing = []
    for where, expression in dashboard_expressions() + alert_expressions():
        for selector in selectors(as_promql(expression)):
            if any(exposition.exports(selector.metric) for exposition in scraped.values()):
                continue
            entry = METRICS.get(selector.metric)
            if entry is not None and not from_a_service(entry):
                continue  # Prometheus's `up`, kube-state-metrics' kube_deployment_*
            missing.append(f"{where}: {selector.metric}")
    assert not missing, "read but exported by no service:\n" + "\n".join(missing)


def test_external_metrics_are_not_the_services(scraped: dict[str, Exposition]) -> None:
    for name, entry in METRICS.items():
        if not from_a_service(entry):
            assert not any(exposition.exports(name) for exposition in scraped.values()), name


@pytest.mark.parametrize("name", sorted(n for n, e in METRICS.items() if from_a_service(e)))
def test_the_contract_is_what_the_services_export(name: str, scraped: dict[str, Exposition]) -> None:
    entry = METRICS[name]
    services = exporters(entry)
    replicas = [r for r in scraped if not services or service_of(r) in services]
    assert replicas, f"{name}: no replica of {sorted(services)} in the mesh"
    for replica in replicas:
        exposition = scraped[replica]
        assert exposition.types.get(name) == entry["type"], f"{replica}: {name} is {exposition.types.get(name)}"
        labels = exposition.label_names(name)
        if labels or entry["labels"] == []:  # a labelled family shows its labels once it has a series
            assert labels == set(entry["labels"]), f"{replica}: {name} has labels {sorted(labels)}"
