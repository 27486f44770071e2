"""deploy/components/monitoring: the PodMonitor passes the Prometheus Operator's CRD schema
(vendored in third_party/), scrapes what base/prometheus/scrape-config.yaml scrapes with the
same target labels, and the production overlay ships it with the dashboards."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from infermesh.kubernetes import custom_resource_errors

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPONENT = DEPLOY / "components" / "monitoring"
POD_MONITOR = yaml.safe_load((COMPONENT / "podmonitor.yaml").read_text())
(SCRAPE_JOB,) = yaml.safe_load((DEPLOY / "base" / "prometheus" / "scrape-config.yaml").read_text())["scrape_configs"]
(ENDPOINT,) = POD_MONITOR["spec"]["podMetricsEndpoints"]


def base_pod_templates() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((DEPLOY / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("Deployment", "StatefulSet"):
                found.append((doc["metadata"]["name"], doc["spec"]["template"]))
    return found


def test_the_pod_monitor_passes_the_crd_schema() -> None:
    assert custom_resource_errors(POD_MONITOR) == []


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda pm: pm["spec"]["podMetricsEndpoints"][0].update(scrapeInterval="15s"), "scrapeInterval"),
        (lambda pm: pm["spec"].update(jobLabel=["app"]), "is not of type 'string'"),
        (lambda pm: pm["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds"), "does not match"),
    ],
)
def test_the_schema_check_catches_mistakes(change: Any, problem: str) -> None:
    broken = copy.deepcopy(POD_MONITOR)
    change(broken)
    errors = custom_resource_errors(broken)
    assert errors and any(problem in error for error in errors), errors


def test_only_known_custom_kinds_are_checked_against_a_crd() -> None:
    assert custom_resource_errors({"apiVersion": "v1", "kind": "ConfigMap"}) is None


def test_it_scrapes_the_pods_scrape_config_scrapes() -> None:
    keep = {r["source_labels"][0]: r["regex"] for r in SCRAPE_JOB["relabel_configs"] if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_part_of"] == "infermesh"
    assert POD_MONITOR["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/part-of": "infermesh"}}
    # Every pod annotated for scraping names its metrics port `metrics`, the endpoint's port.
    annotated = 0
    for name, template in base_pod_templates():
        annotations = template["metadata"].get("annotations", {})
        ports = {p.get("name"): p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        if annotations.get("prometheus.io/scrape") == "true":
            annotated += 1
            assert ports.get(ENDPOINT["port"]) == int(annotations["prometheus.io/port"]), name
            assert annotations["prometheus.io/path"] == ENDPOINT["path"], name
        else:
            assert ENDPOINT["port"] not in ports, f"{name} would be scraped by the PodMonitor only"
    assert annotated >= 5


def test_it_gives_the_target_labels_the_alerts_and_dashboards_use() -> None:
    # job: alerts.yaml's InfermeshReplicaDown selects up{job="infermesh"}, the scrape job's name;
    # the PodMonitor takes it from the pods' app.kubernetes.io/part-of label.
    assert POD_MONITOR["spec"]["jobLabel"] == "app.kubernetes.io/part-of"
    assert SCRAPE_JOB["job_name"] == "infermesh"
    # service: from app.kubernetes.io/name, as the scrape job does (namespace and pod: the operator).
    scrape_service = [r for r in SCRAPE_JOB["relabel_configs"] if r.get("target_label") == "service"]
    monitor_service = [r for r in ENDPOINT["relabelings"] if r.get("targetLabel") == "service"]
    assert [r["source_labels"] for r in scrape_service] == [r["sourceLabels"] for r in monitor_service]


def test_production_ships_the_component_with_the_dashboards() -> None:
    component = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert set(component["resources"]) == {"podmonitor.yaml", "../../grafana"}
    production = yaml.safe_load((DEPLOY / "overlays" / "production" / "kustomization.yaml").read_text())
    assert "../../components/monitoring" in production["components"]
