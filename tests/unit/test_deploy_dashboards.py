"""The Grafana dashboards in deploy/grafana: well-formed, and every PromQL expression in them
and in the alert rules parses with a real PromQL parser (promql-parser) and reads only
metrics and labels of deploy/base/prometheus/metrics.yaml, the services' contract.
tests/e2e/test_metrics_exported.py checks that contract against a running mesh."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.metrics_contract import (
    GRAFANA,
    METRICS,
    TARGET_LABELS,
    TRITON_REQUIRED,
    alert_expressions,
    as_promql,
    dashboard_expressions,
    dashboards,
    documented,
    grouping_labels,
    panels,
    selectors,
    variables_in,
)

DASHBOARDS = dashboards()
EXPRESSIONS = dashboard_expressions() + alert_expressions()
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}


def known_labels(metric: str) -> set[str]:
    entry = documented(metric) or {}
    return set(entry.get("labels", [])) | TARGET_LABELS | ({"le"} if metric.endswith("_bucket") else set())


# ------------------------------------------------------------------- the files


def test_the_two_dashboards_are_there() -> None:
    assert set(DASHBOARDS) == {"infermesh-overview.json", "infermesh-model.json"}
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids) and all(uid.startswith("infermesh-") for uid in uids)
    for dashboard in DASHBOARDS.values():
        assert dashboard["title"].startswith("infermesh / ") and "infermesh" in dashboard["tags"]
        assert dashboard.get("id") is None  # importable anywhere: Grafana assigns its own id


def test_the_configmap_ships_every_dashboard() -> None:
    config = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    (generator,) = config["configMapGenerator"]
    assert sorted(generator["files"]) == sorted(DASHBOARDS)
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}  # what Grafana's sidecar loads


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_are_laid_out_and_read_the_chosen_data_source(name: str) -> None:
    dashboard = DASHBOARDS[name]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"], f"{panel['title']}: say what the panel shows"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    # No two panels overlap.
    cells = set()
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_variable_used_is_defined(name: str) -> None:
    dashboard = DASHBOARDS[name]
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert "datasource" in defined
    used = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            used |= variables_in(target["expr"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        used |= variables_in(query["query"] if isinstance(query, dict) else str(query or ""))
    assert used - GRAFANA_BUILTINS <= defined, sorted(used - GRAFANA_BUILTINS - defined)


def test_the_overview_covers_the_mesh() -> None:
    used = _metrics_used("infermesh-overview.json")
    assert {
        "gateway_requests_total",  # request rate, degraded share
        "grpc_server_handled_total",  # errors per service
        "grpc_server_handling_seconds_bucket",  # p50 / p99 per stage
        "gateway_degraded_responses_total",
        "gateway_stage_batch_requests_sum",  # coalesced batch sizes
        "nv_inference_queue_duration_us",  # queue time
        "features_cache_lookups_total",  # cache hit rate
        "nv_cache_num_hits_per_model",
        "up",  # replicas up
    } <= used
    expressions = [e for where, e in dashboard_expressions() if where.startswith("infermesh-overview.json")]
    assert any("histogram_quantile(0.5," in e for e in expressions) and any(
        "histogram_quantile(0.99," in e for e in expressions
    )


def test_the_model_page_reads_tritons_families() -> None:
    used = _metrics_used("infermesh-model.json")
    assert used >= TRITON_REQUIRED


def _metrics_used(name: str) -> set[str]:
    return {
        selector.metric
        for where, expression in dashboard_expressions()
        if where.startswith(name)
        for selector in selectors(as_promql(expression))
    }


# ------------------------------------------------------------------- every expression


@pytest.mark.parametrize("where, expression", EXPRESSIONS, ids=[where for where, _ in EXPRESSIONS])
def test_expression_parses_and_reads_only_documented_metrics(where: str, expression: str) -> None:
    promql = as_promql(expression)
    found = selectors(promql)  # ValueError: promql-parser's message says where and why
    assert found, "an expression must read at least one metric"
    for selector in found:
        assert documented(selector.metric), f"{selector.metric} is not in deploy/base/prometheus/metrics.yaml"
        unknown = selector.labels - known_labels(selector.metric)
        assert not unknown, f"{selector.metric} has no label(s) {sorted(unknown)}"
    known = set().union(*(known_labels(s.metric) for s in found))
    assert grouping_labels(promql) <= known, sorted(grouping_labels(promql) - known)


@pytest.mark.parametrize(
    "expression, problem",
    [
        ("sum(rate(x_total[5m])", "unclosed"),
        ("ratez(x_total[5m])", "unknown function"),
        ("rate(x_total[5x])", "duration"),
        ("rate(x_total)", "expected type matrix"),
        ('x_total{code=~"("}', "regex"),
    ],
)
def test_the_parser_rejects_what_prometheus_rejects(expression: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        selectors(expression)


def test_grafana_variables_become_promql() -> None:
    assert as_promql('rate(x_total{namespace=~"$namespace"}[$__rate_interval])') == (
        'rate(x_total{namespace=~"grafana-variable"}[5m])'
    )
    assert as_promql('label_values(nv_inference_request_success{model=~"${model}"}, version)') == (
        'nv_inference_request_success{model=~"grafana-variable"}'
    )


def test_names_resolve_to_their_family() -> None:
    assert documented("grpc_server_handling_seconds_bucket") is METRICS["grpc_server_handling_seconds"]
    assert documented("nv_inference_count") is METRICS["nv_inference_count"]
    assert documented("nv_inference_count_total") is None  # Triton's counters have no _total
    assert documented("gateway_requests_total_bucket") is None  # a counter has no buckets
    usage: dict[str, Any] = {s.metric: s.labels for s in selectors('sum by (le) (rate(a_bucket{x="1"}[5m]))')}
    assert usage == {"a_bucket": {"x"}}
    assert grouping_labels("sum by (a) (x) / on (b) group_left (c) y") == {"a", "b", "c"}
