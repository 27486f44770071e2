"""What deploy/ reads from the services' metrics, and what the services expose.

* The PromQL of the Grafana dashboards (deploy/grafana) and of the alert rules
  (deploy/base/prometheus/alerts.yaml), parsed with a real PromQL parser (promql-parser,
  the dev extra), and the metric selectors in it.
* The Prometheus exposition text a process serves, read line by line: family types from
  the TYPE lines and every sample under its exact name (prometheus_client's own parser
  renames a counter's samples to `_total`, which would hide what Triton users see).
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "base" / "prometheus"
CATALOG = yaml.safe_load((PROMETHEUS / "metrics.yaml").read_text())
METRICS: dict[str, dict[str, Any]] = {m["name"]: m for m in CATALOG["metrics"]}
TARGET_LABELS = frozenset(CATALOG["target_labels"])
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# The Triton families issue 22 names: scoring exposes every one, the model dashboard reads them.
TRITON_REQUIRED = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
    }
)

# Grafana's interval variables stand for a range; any duration parses the same.
GRAFANA_INTERVALS = ("__rate_interval", "__interval", "__range")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.DOTALL)


# ------------------------------------------------------------------- dashboards and rules


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(GRAFANA.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Query variable name -> its query (`label_values(<selector>, <label>)` or PromQL)."""
    found = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found[variable["name"]] = query["query"] if isinstance(query, dict) else query
    return found


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expression) of every panel target and query variable of every dashboard."""
    found = []
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                found.append((f"{name}: {panel['title']} [{target['refId']}]", target["expr"]))
        for variable, query in variable_queries(dashboard).items():
            found.append((f"{name}: variable ${variable}", query))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    return [(f"alerts.yaml: {rule['alert']}", rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def variables_in(expression: str) -> set[str]:
    return {next(name for name in match.groups() if name) for match in VARIABLE.finditer(expression)}


def as_promql(expression: str) -> str:
    """A Grafana expression as Prometheus receives it: interval variables become a duration,
    the others a value (they stand in label matchers), and a `label_values(selector, label)`
    variable query its selector."""
    label_values = LABEL_VALUES.match(expression)
    if label_values:
        expression = label_values.group(1)

    def substitute(match: re.Match[str]) -> str:
        name = next(name for name in match.groups() if name)
        return "5m" if name in GRAFANA_INTERVALS else "grafana-variable"

    return VARIABLE.sub(substitute, expression)


@dataclass
class Selector:
    metric: str
    labels: set[str] = field(default_factory=set)


def selectors(expression: str) -> list[Selector]:
    """The metric selectors of a PromQL expression; ValueError if it does not parse."""
    found: list[Selector] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next((m.value for m in matchers if m.name == "__name__"), "")
            found.append(Selector(name, {m.name for m in matchers if m.name != "__name__"}))
        return True

    promql_parser.walk(promql_parser.parse(expression), visit)
    return found


def grouping_labels(expression: str) -> set[str]:
    """Labels named in by/without, on/ignoring and group_left/group_right clauses."""
    found: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.update(node.modifier.labels)
        if isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                found.update(node.modifier.matching.labels)
            found.update(node.modifier.group_labels or ())
        return True

    promql_parser.walk(promql_parser.parse(expression), visit)
    return found


def documented(metric: str) -> dict[str, Any] | None:
    """metrics.yaml's entry of a name as PromQL uses it (a histogram's series resolve to it)."""
    if metric in METRICS:
        return METRICS[metric]
    for suffix in HISTOGRAM_SUFFIXES:
        base = metric.removesuffix(suffix)
        if base != metric and METRICS.get(base, {}).get("type") == "histogram":
            return METRICS[base]
    return None


def from_a_service(entry: dict[str, Any]) -> bool:
    return str(entry["source"]).startswith("service")


# ------------------------------------------------------------------- exposition text


SAMPLE_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)  # family name (as its TYPE line says) -> type
    samples: list[Sample] = field(default_factory=list)

    def family_of(self, sample: str) -> str | None:
        """The family a series belongs to: its own name, or a histogram's/summary's base."""
        if sample in self.types:
            return sample
        for suffix in (*HISTOGRAM_SUFFIXES, "_created"):
            base = sample.removesuffix(suffix)
            if base != sample and base in self.types:
                return base
        return None

    def label_names(self, family: str) -> set[str]:
        return {
            label
            for sample in self.samples
            if self.family_of(sample.name) == family
            for label in sample.labels
            if label not in ("le", "quantile")
        }

    def exports(self, metric: str) -> bool:
        """Whether a name as PromQL uses it selects series of this exposition."""
        if metric in self.types:
            return True
        for suffix in HISTOGRAM_SUFFIXES:
            base = metric.removesuffix(suffix)
            if base != metric and self.types.get(base) in ("histogram", "summary"):
                return True
        return False


def parse_exposition(text: str) -> Exposition:
    parsed = Exposition()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            parsed.types[name] = kind
        elif line and not line.startswith("#"):
            parsed.samples.append(_sample(line))
    return parsed


def _sample(line: str) -> Sample:
    name_match = SAMPLE_NAME.match(line)
    assert name_match, f"not a sample line: {line!r}"
    position, labels = name_match.end(), {}
    if line[position : position + 1] == "{":
        position += 1
        while line[position] != "}":
            pair = LABEL_PAIR.match(line, position)
            assert pair, f"bad labels in {line!r}"
            labels[pair.group(1)] = pair.group(2)
            position = pair.end()
        position += 1
    value = line[position:].split()[0]
    return Sample(name_match.group(), labels, float(value))


def fetch_exposition(port: int, accept: str = "") -> tuple[str, str]:
    """(content type, body) of GET 127.0.0.1:<port>/metrics with `accept`."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()
