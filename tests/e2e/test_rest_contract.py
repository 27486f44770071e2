"""The REST contract against a real mesh: the edge serves the OpenAPI document, and
schemathesis drives every operation in it (valid, invalid and realistic inputs) with no
5xx and every response as documented (status, content type, headers, JSON schema)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from infermesh import openapi
from infermesh.openapi import DOCUMENT_PATH
from infermesh.up.supervisor import Mesh

DOCUMENT = Path(__file__).resolve().parents[2] / "services" / "genproto" / "openapi.json"
# Bounded and reproducible: a few dozen cases per operation and mode, one fixed seed.
EXAMPLES = 40
SEED = 20261122
REQUEST_TIMEOUT = 10.0
# What the contract promises. Not positive_data_acceptance: the schema cannot say that k
# must be 1..1000 or which users exist, so schema-valid requests may rightly get 400/404.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

# Values the reference workload knows, mixed into generated bodies by field name so that
# cases get past validation and run the whole pipeline (features, scoring, ranking) with
# odd combinations of the other fields. Fields an operation lacks are left alone.
KNOWN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "user_id": st.one_of(st.integers(0, 9_999).map(lambda n: f"u{n}"), st.just("u10000")),
    "candidate_ids": st.lists(
        st.one_of(st.integers(0, 99_999).map(lambda n: f"i{n}"), st.sampled_from(["i100000", "x"])),
        min_size=1,
        max_size=60,
    ),
    "k": st.integers(-1, 1_001),
    "retrieve_candidates": st.sampled_from([0, 1, 7, 200, 1_000, 1_001]),
    "offset": st.sampled_from([0, 1, 19, 20, 999, 2**31, 2**32 - 1]),
}


@pytest.fixture(scope="module")
def base_url(mesh: Mesh) -> str:
    return f"http://127.0.0.1:{mesh.topology.edge_port}"


def test_edge_serves_the_committed_document(base_url: str) -> None:
    with urllib.request.urlopen(f"{base_url}{DOCUMENT_PATH}", timeout=10) as response:
        assert response.status == 200
        assert response.headers["content-type"] == "application/json"
        served = json.loads(response.read())
    assert served == json.loads(DOCUMENT.read_text(encoding="utf-8"))


def _realistic(strategy: st.SearchStrategy[Any], properties: set[str]) -> st.SearchStrategy[Any]:
    def mix(pair: tuple[Any, dict[str, Any]]) -> Any:
        case, known = pair
        if isinstance(case.body, dict):
            # Only the declared fields: an undeclared one (the schema allows them) is a
            # rejection the positive and negative modes already probe, and would keep
            # every realistic case from reaching the pipeline as often as not.
            case.body = {**{k: v for k, v in case.body.items() if k in properties}, **known}
        return case

    # A known user and candidates always (without them nothing reaches the pipeline);
    # each other known field mixed in or not, independently.
    required = {"user_id", "candidate_ids"} & properties
    known = st.fixed_dictionaries(
        {k: v for k, v in KNOWN_VALUES.items() if k in required},
        optional={k: v for k, v in KNOWN_VALUES.items() if k not in required},
    )
    return st.tuples(strategy, known).map(mix)


def _modes(operation: Any) -> dict[str, st.SearchStrategy[Any]]:
    properties = _body_properties(operation)
    modes = {
        "positive": operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
        "negative": operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
    }
    if properties & set(KNOWN_VALUES):
        modes["realistic"] = _realistic(modes["positive"], properties)
    return modes


def _body_properties(operation: Any) -> set[str]:
    body = operation.definition.raw.get("requestBody", {})
    schema = body.get("content", {}).get("application/json", {}).get("schema", {})
    if "$ref" in schema:
        schema = operation.schema.raw_schema["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return set(schema.get("properties", {}))


def _run(strategy: st.SearchStrategy[Any], on_case: Callable[[Any], None]) -> None:
    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # each request has its own timeout; slow CI must not flake
        database=None,  # nothing written into the work tree, every run the same cases
        suppress_health_check=list(HealthCheck),
        # No shrinking: a failure is reported as found, and the run stays bounded.
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        on_case(case)

    run()


def test_every_operation_holds_its_contract(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}{DOCUMENT_PATH}", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every RPC operation (schemathesis leaves out the document's own URL: tested above).
    rpcs = {
        f"{verb.upper()} {path}" for verb, path, op in openapi.operations(schema.raw_schema) if "x-grpc-method" in op
    }
    assert "POST /v1/recommend" in rpcs and rpcs <= {op.label for op in operations}
    statuses: Counter[tuple[str, str, int]] = Counter()
    for operation in operations:
        for mode, strategy in _modes(operation).items():

            def check(case: Any, mode: str = mode, label: str = operation.label) -> None:
                response = case.call(base_url=base_url, timeout=REQUEST_TIMEOUT)
                statuses[(label, mode, response.status_code)] += 1
                # Raises with schemathesis' report (and a curl command) on any violation.
                case.validate_response(response, checks=CHECKS)

            try:
                _run(strategy, check)
            except Unsatisfiable:
                # A schema with nothing to violate (GET /v1/jobs/{job_id}: any string is a
                # job id, answered 404 when unknown) has no negative cases to generate.
                if mode != "negative":
                    raise
    assert not [key for key in statuses if key[2] >= 500], statuses
    # The realistic cases reached the pipeline and came back ranked, not only rejected.
    assert statuses[("POST /v1/recommend", "realistic", 200)] > 0, statuses
    assert statuses[("POST /v1/recommend", "negative", 400)] > 0, statuses


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/recommend"),
        ("PUT", "/v1/recommend"),
        ("DELETE", "/v1/recommend"),
        ("OPTIONS", "/v1/recommend"),
        ("GET", "/nope"),
    ],
)
def test_unmapped_rest_requests_are_client_errors(base_url: str, method: str, path: str) -> None:
    """A REST path or method no google.api.http rule maps is a JSON 404 from the edge, not a
    request forwarded to the gateway as malformed gRPC (which answered 503 or a bare 200)."""
    request = urllib.request.Request(f"{base_url}{path}", method=method)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 404
    assert caught.value.headers["content-type"] == "application/json"
    body = json.loads(caught.value.read())
    assert body["code"] == 5 and "/v1/openapi.json" in body["message"]
