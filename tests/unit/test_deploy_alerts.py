"""The Prometheus alert rules shipped in deploy/ are well-formed and name only known metrics.

No promtool here: the rules file is parsed as YAML, every field Prometheus requires is
checked, and each PromQL expression goes through a small checker (tokens, brackets, label
matchers, range durations, function names, a comparison at the top) that collects the
metric and label names it uses; those must be in deploy/base/prometheus/metrics.yaml, the
documented list of metrics the deployment relies on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.topology import HEALTH_SERVICE_NAMES, SERVICES
from tests.metrics_contract import CATALOG, METRICS, documented

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "base" / "prometheus"
RULES = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
TARGET_LABELS = set(CATALOG["target_labels"])
ALERTS: list[dict[str, Any]] = [rule for group in RULES["groups"] for rule in group["rules"]]
DOCS = (ROOT / "docs" / "deploy.md").read_text()

DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
# go-grpc-prometheus labels grpc_code with Go's codes.Code.String().
GRPC_CODES = {
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
}
AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
FUNCTIONS = AGGREGATIONS | {
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
    "year",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset"}
COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}

TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
    |(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+(?![A-Za-z0-9_]))
    |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
    |(?P<op>==|!=|<=|>=|=~|!~|[-+*/%^<>=,])
    |(?P<bracket>[(){}\[\]])
    """,
    re.VERBOSE,
)


class PromQLError(ValueError):
    pass


@dataclass
class Usage:
    metrics: set[str] = field(default_factory=set)
    # metric -> labels its selectors match on
    selector_labels: dict[str, set[str]] = field(default_factory=dict)
    grouping_labels: set[str] = field(default_factory=set)
    # (label, value) of every matcher, for cross-checks against the topology
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if match is None:
            raise PromQLError(f"unexpected {expr[position : position + 10]!r} at {position}")
        if match.lastgroup != "ws":
            tokens.append((match.lastgroup or "", match.group()))
        position = match.end()
    return tokens


def check_promql(expr: str) -> Usage:
    """Structural check of one expression; returns the names it uses."""
    tokens = tokenize(expr)
    usage = Usage()
    stack: list[str] = []
    pairs = {")": "(", "}": "{", "]": "["}
    top_level_comparison = False
    i = 0

    def expect(kind: str, text: str | None = None) -> str:
        nonlocal i
        if i >= len(tokens) or tokens[i][0] != kind or (text is not None and tokens[i][1] != text):
            found = tokens[i][1] if i < len(tokens) else "end of expression"
            raise PromQLError(f"expected {text or kind}, found {found!r}")
        i += 1
        return tokens[i - 1][1]

    def label_list() -> list[str]:
        nonlocal i
        expect("bracket", "(")
        labels = []
        while tokens[i][1] != ")":
            labels.append(expect("ident"))
            if tokens[i][1] == ",":
                i += 1
        i += 1
        return labels

    def matchers(metric: str | None) -> None:
        nonlocal i
        expect("bracket", "{")
        while tokens[i][1] != "}":
            label = expect("ident")
            op = expect("op")
            if op not in ("=", "!=", "=~", "!~"):
                raise PromQLError(f"bad matcher operator {op!r} for label {label!r}")
            value = expect("string")[1:-1]
            if op in ("=~", "!~"):
                re.compile(value)
            usage.matchers.append((label, op, value))
            if metric is not None:
                usage.selector_labels.setdefault(metric, set()).add(label)
            if tokens[i][1] == ",":
                i += 1
            elif tokens[i][1] != "}":
                raise PromQLError(f"expected , or }} after matcher on {label!r}")
        i += 1

    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text in GROUPING:
            i += 1
            if i < len(tokens) and tokens[i][1] == "(":
                usage.grouping_labels.update(label_list())
            elif text not in ("group_left", "group_right"):
                raise PromQLError(f"{text} needs a label list")
            continue
        if kind == "ident" and text == "offset":
            i += 1
            expect("duration")
            continue
        if kind == "ident" and text in KEYWORDS:
            i += 1
            continue
        if kind == "ident" and following == "(":
            if text not in FUNCTIONS:
                raise PromQLError(f"unknown function {text!r}")
            i += 1
            continue
        if kind == "ident" and text in AGGREGATIONS and following in ("by", "without"):
            i += 1
            continue
        if kind == "ident":
            usage.metrics.add(text)
            i += 1
            if following == "{":
                matchers(text)
            continue
        if text == "{":  # a selector without a metric name
            matchers(None)
            continue
        if text == "[":
            i += 1
            expect("duration")
            expect("bracket", "]")
            continue
        if kind == "bracket":
            if text in "({[":
                stack.append(text)
            elif not stack or stack.pop() != pairs[text]:
                raise PromQLError(f"unbalanced {text!r}")
        elif kind == "op" and text in COMPARISONS and not stack:
            top_level_comparison = True
        elif kind == "op" and text == "=":
            raise PromQLError("'=' outside a label matcher")
        elif kind == "duration":
            raise PromQLError(f"duration {text!r} outside a range selector")
        i += 1
    if stack:
        raise PromQLError(f"unclosed {stack[-1]!r}")
    if not top_level_comparison:
        raise PromQLError("an alert expression needs a comparison at the top level")
    return usage


def metric_labels(metric: str) -> set[str]:
    entry = documented(metric) or {}
    extra = {"le"} if metric.endswith("_bucket") else set()
    return set(entry.get("labels", [])) | TARGET_LABELS | extra


USAGES = {rule["alert"]: check_promql(rule["expr"]) for rule in ALERTS}


# ------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    "expr, problem",
    [
        ("sum(rate(x_total[5m]) > 1", "unclosed"),
        ("rate(x_total[5m]))) > 1", "unbalanced"),
        ('rate(x_total{code=~"5.."}[5x]) > 1', "duration"),
        ('rate(x_total{code="5"[5m]) > 1', "expected , or }"),
        ('rate(x_total{code>"5"}[5m]) > 1', "bad matcher operator"),
        ("ratez(x_total[5m]) > 1", "unknown function"),
        ("sum by (job) (rate(x_total[5m]))", "comparison"),
        ("sum by (rate(x_total[5m])) > 1", "expected ident"),
        ('x_total{code=~"("} > 1', "unterminated|missing"),
    ],
)
def test_checker_rejects_malformed_expressions(expr: str, problem: str) -> None:
    with pytest.raises((PromQLError, re.error), match=problem):
        check_promql(expr)


def test_checker_collects_names() -> None:
    usage = check_promql('sum by (namespace) (rate(a_total{x="1", y=~"2|3"}[5m])) / on (namespace) group_left b > 0.5')
    assert usage.metrics == {"a_total", "b"}
    assert usage.selector_labels == {"a_total": {"x", "y"}}
    assert usage.grouping_labels == {"namespace"}


# ------------------------------------------------------------------- the rules file


def test_rules_file_has_named_groups_of_rules() -> None:
    assert set(RULES) == {"groups"}
    names = [group["name"] for group in RULES["groups"]]
    assert len(names) == len(set(names))
    for group in RULES["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        assert group["rules"], f"group {group['name']} is empty"


@pytest.mark.parametrize("rule", ALERTS, ids=[r["alert"] for r in ALERTS])
def test_alert_rule_fields(rule: dict[str, Any]) -> None:
    assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
    assert re.fullmatch(r"Infermesh[A-Z][A-Za-z0-9]+", rule["alert"])
    assert isinstance(rule["expr"], str) and rule["expr"].strip()
    assert DURATION.match(rule["for"]), rule["for"]
    assert rule["labels"]["severity"] in ("critical", "warning")
    annotations = rule["annotations"]
    assert {"summary", "description", "runbook_url"} <= set(annotations)
    for text in annotations.values():
        assert text.count("{{") == text.count("}}"), text


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in ALERTS]
    assert len(names) == len(set(names))


def test_the_required_alerts_are_there() -> None:
    names = {rule["alert"] for rule in ALERTS}
    required = {
        "InfermeshHighErrorRate",  # error rate
        "InfermeshLatencyOverSLO",  # p99 over the SLO
        "InfermeshDegradedResponses",  # degraded responses
        "InfermeshFeatureDrift",  # drift above threshold (inputs)
        "InfermeshPredictionDrift",  # drift above threshold (scores)
        "InfermeshReplicaDown",  # replica down
    }
    assert required <= names


@pytest.mark.parametrize("rule", ALERTS, ids=[r["alert"] for r in ALERTS])
def test_expression_uses_only_documented_metrics_and_labels(rule: dict[str, Any]) -> None:
    usage = USAGES[rule["alert"]]
    assert usage.metrics, "an alert must read at least one metric"
    for metric in usage.metrics:
        assert documented(metric), f"{metric} is not in deploy/base/prometheus/metrics.yaml"
        unknown = usage.selector_labels.get(metric, set()) - metric_labels(metric)
        assert not unknown, f"{metric} has no label(s) {sorted(unknown)}"
    known = set().union(*(metric_labels(m) for m in usage.metrics))
    assert usage.grouping_labels <= known, sorted(usage.grouping_labels - known)
    # {{ $labels.x }} in the annotations must be a label the alert can carry.
    templated = set()
    for text in rule["annotations"].values():
        templated |= set(re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text))
    assert templated <= known, sorted(templated - known)


def test_matchers_name_real_services_and_codes() -> None:
    for alert, usage in USAGES.items():
        for label, op, value in usage.matchers:
            if label == "grpc_service" and op == "=":
                assert value in HEALTH_SERVICE_NAMES.values(), (alert, value)
            if label == "grpc_code":
                assert set(value.split("|")) <= GRPC_CODES, (alert, value)
            if label == "deployment":
                assert set(value.split("|")) == {*SERVICES, "envoy"}, (alert, value)


def test_error_rate_counts_server_errors_not_bad_requests() -> None:
    (codes,) = [v for label, _, v in USAGES["InfermeshHighErrorRate"].matchers if label == "grpc_code"]
    codes = set(codes.split("|"))
    assert {"Internal", "Unavailable", "DeadlineExceeded"} <= codes
    assert not codes & {"OK", "InvalidArgument", "NotFound"}


@pytest.mark.parametrize("rule", ALERTS, ids=[r["alert"] for r in ALERTS])
def test_every_alert_has_a_runbook_in_docs(rule: dict[str, Any]) -> None:
    path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
    assert path == "docs/deploy.md" and anchor == rule["alert"].lower()
    assert re.search(rf"^#+ {rule['alert']}\s*$", DOCS, re.MULTILINE), (
        f"docs/deploy.md needs a '{rule['alert']}' heading (the runbook)"
    )


# ------------------------------------------------------------------- the metric list


def test_metric_list_entries_are_complete() -> None:
    for metric in CATALOG["metrics"]:
        assert re.fullmatch(r"[a-z_:][a-z0-9_:]*", metric["name"]), metric["name"]
        assert metric["type"] in ("counter", "gauge", "histogram", "summary")
        if metric["type"] == "counter" and not metric["name"].startswith("nv_"):
            # Triton's counters (nv_*) keep Triton's names, without _total.
            assert metric["name"].endswith("_total"), metric["name"]
        assert metric["source"] and metric["help"]
        assert isinstance(metric["labels"], list)


def test_every_documented_metric_is_used() -> None:
    """No dead entries: each is read by an alert, a dashboard, the autoscaler or the docs."""
    used = set().union(*(u.metrics for u in USAGES.values()))
    used = {m for name in used for m in METRICS if documented(name) is METRICS[m]}
    components = ROOT / "deploy" / "components"
    dashboards = ROOT / "deploy" / "grafana"
    elsewhere = DOCS + "".join(p.read_text() for p in [*components.rglob("*.yaml"), *dashboards.glob("*.json")])
    for name in METRICS:
        assert name in used or name in elsewhere, f"{name} is documented but never used"


def test_queue_autoscaling_reads_a_documented_gauge() -> None:
    component = ROOT / "deploy" / "components" / "queue-autoscaling"
    text = "".join(p.read_text() for p in component.glob("*.yaml"))
    names = set(re.findall(r"nv_inference_[a-z_]+", text))
    assert names == {"nv_inference_pending_request_count"}
    assert METRICS["nv_inference_pending_request_count"]["type"] == "gauge"


def test_scrape_config_adds_the_target_labels() -> None:
    config = yaml.safe_load((PROMETHEUS / "scrape-config.yaml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "infermesh"  # InfermeshReplicaDown selects up{job="infermesh"}
    added = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    assert TARGET_LABELS - {"job", "instance"} <= added
