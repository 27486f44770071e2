"""telemetry/schema.yaml and the code agree: every span/attribute constant is listed, every
custom name is namespaced, and the metric families the code registers are the listed ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from services.runtime import telemetry
from services.runtime.metrics import Metrics
from services.scoring.drift import DriftMonitor, DriftReference
from services.scoring.stats import ScoringMetrics

SCHEMA = Path(__file__).resolve().parents[2] / "telemetry" / "schema.yaml"
STANDARD_PREFIXES = ("db.", "server.", "rpc.", "network.", "http.", "grpc.", "component", "upstream_")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())


def _constants(prefix: str) -> dict[str, str]:
    return {name: getattr(telemetry, name) for name in dir(telemetry) if name.startswith(prefix)}


def test_every_span_constant_is_in_the_schema(schema: dict[str, Any]) -> None:
    listed = {span["constant"]: span["name"] for span in schema["spans"] if "constant" in span}
    constants = _constants("SPAN_")
    assert sorted(listed) == sorted(constants)
    for constant, name in listed.items():
        value = constants[constant]
        if value.endswith("."):  # a prefix: infermesh.ranking. + stage
            assert name.startswith(value) and name.endswith(">"), (constant, name)
        else:
            assert name == value, (constant, name)


def test_every_attribute_constant_is_in_the_schema(schema: dict[str, Any]) -> None:
    attributes = schema["attributes"]
    constants = _constants("ATTR_")
    by_constant = {spec["constant"]: name for name, spec in attributes.items()}
    assert sorted(by_constant) == sorted(constants)
    for constant, name in by_constant.items():
        assert constants[constant] == name


def test_custom_names_are_namespaced(schema: dict[str, Any]) -> None:
    for name in schema["attributes"]:
        assert name.startswith(("infermesh.", *STANDARD_PREFIXES)), name
    for span in schema["spans"]:
        attributes = span.get("attributes", [])
        for attribute in attributes:
            assert attribute.startswith(("infermesh.", *STANDARD_PREFIXES)), (span["name"], attribute)
            if attribute.startswith("infermesh."):
                assert attribute in schema["attributes"], attribute
        if "constant" in span and span["name"] != telemetry.SPAN_REDIS_MGET:
            assert span["name"].startswith("infermesh."), span["name"]


def test_agreed_span_names_are_exact() -> None:
    # The names the service owners agreed on; changing one breaks dashboards and the e2e test.
    assert telemetry.SPAN_REDIS_MGET == "MGET"
    assert telemetry.SPAN_FEATURES_CACHE_LOOKUP == "infermesh.features.cache_lookup"
    assert telemetry.SPAN_SCORING_QUEUE == "infermesh.scoring.queue"
    assert telemetry.SPAN_SCORING_INFERENCE == "infermesh.scoring.inference"
    assert telemetry.SPAN_RANKING_PREFIX == "infermesh.ranking."
    assert telemetry.SPAN_GATEWAY_FALLBACK == "infermesh.gateway.fallback"
    assert telemetry.ATTR_DB_SYSTEM == "db.system.name"
    assert telemetry.ATTR_DB_OPERATION == "db.operation.name"
    assert telemetry.ATTR_FEATURES_KEYS == "infermesh.features.keys"
    assert telemetry.ATTR_CACHE_HIT == "infermesh.cache.hit"
    assert telemetry.ATTR_BATCH_SIZE == "infermesh.batch.size"
    assert telemetry.ATTR_BATCH_ID == "infermesh.batch.id"
    assert telemetry.ATTR_MODEL_NAME == "infermesh.model.name"
    assert telemetry.ATTR_MODEL_VERSION == "infermesh.model.version"
    assert telemetry.ATTR_EXECUTION_PROVIDER == "infermesh.execution_provider"


def _families(metrics: Metrics) -> set[str]:
    names = set()
    for family in metrics.registry.collect():
        name = family.name
        if family.type == "counter":
            name += "_total"
        names.add(name)
    return names


def _listed(schema: dict[str, Any], service: str) -> set[str]:
    return {m["name"].replace("<service>", service) for m in schema["metrics"] if "*" not in m["name"]}


def test_registered_metrics_are_the_listed_ones(schema: dict[str, Any]) -> None:
    metrics = Metrics("scoring")
    metrics.rpc()
    reference = DriftReference.build(np.random.default_rng(0).normal(size=(100, 3)), np.linspace(0, 1, 100))
    DriftMonitor(reference, metrics=metrics, model="m", version="1")
    scoring = ScoringMetrics(metrics)
    ours = {name for name in _families(metrics) if name.startswith(("scoring_", "grpc_"))}
    assert ours == _listed(schema, "scoring")
    listed = {m["name"]: m for m in schema["metrics"]}
    for instrument, name in (
        (scoring.model_info, "scoring_model_info"),
        (scoring.evictions, "scoring_model_evictions_total"),
    ):
        assert list(instrument._labelnames) == listed[name]["labels"], name
    rpc = metrics.rpc()
    for instrument, name in (
        (rpc.started, "grpc_server_started_total"),
        (rpc.handled, "grpc_server_handled_total"),
        (rpc.handling, "grpc_server_handling_seconds"),
    ):
        assert list(instrument._labelnames) == listed[name]["labels"], name


DEPLOY_CONTRACT = Path(__file__).resolve().parents[2] / "deploy" / "base" / "prometheus" / "metrics.yaml"


def test_rpc_metrics_match_the_deployment_contract() -> None:
    # deploy/'s alert rules and dashboards rely on these names and labels.
    if not DEPLOY_CONTRACT.is_file():
        pytest.fail(f"{DEPLOY_CONTRACT} is missing")
    contract = {m["name"]: m for m in yaml.safe_load(DEPLOY_CONTRACT.read_text())["metrics"]}
    rpc = Metrics("gateway").rpc()
    for instrument, name in (
        (rpc.handled, "grpc_server_handled_total"),
        (rpc.handling, "grpc_server_handling_seconds"),
    ):
        assert name in contract, name
        assert sorted(instrument._labelnames) == sorted(contract[name]["labels"]), name


def test_grpc_code_names() -> None:
    from services.runtime.metrics import grpc_code_name

    assert [grpc_code_name(c) for c in ("OK", "CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "INTERNAL")] == [
        "OK",
        "Canceled",
        "InvalidArgument",
        "DeadlineExceeded",
        "Internal",
    ]
