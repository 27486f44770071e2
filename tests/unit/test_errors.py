"""The status table (services/runtime/errors.py) against the sources: every gRPC status the
services and the gateway name, and every domain error they raise, must read both ways
through the one table. A status added anywhere without a table entry fails here."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import grpc
import pytest

from services.runtime import errors
from services.runtime.errors import (
    ERROR_FOR_STATUS,
    HTTP_STATUS_FOR_STATUS,
    STATUS_FOR_ERROR,
    InfermeshError,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Overloaded,
    Unavailable,
    from_rpc_error,
    http_status_for,
    status_for,
)

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "services" / "genproto"


def serving_sources() -> dict[str, ast.Module]:
    """Every module of the services and the gateway (generated stubs aside), parsed."""
    files = [*sorted((ROOT / "services").rglob("*.py")), *sorted((ROOT / "gateway").rglob("*.py"))]
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): ast.parse(path.read_text(), str(path))
        for path in files
        if GENERATED not in path.parents
    }


SOURCES = serving_sources()


def statuses_named() -> set[str]:
    """The X of every grpc.StatusCode.X: what the code raises, aborts with or acts on."""
    named = set()
    for tree in SOURCES.values():
        for node in ast.walk(tree):
            match node:
                case ast.Attribute(value=ast.Attribute(value=ast.Name(id="grpc"), attr="StatusCode"), attr=name):
                    named.add(name)
    return named - {"OK"}  # success, not an error


def domain_errors() -> dict[str, type[InfermeshError]]:
    """Every InfermeshError subclass, by name: the table's, and those defined beside the code
    that raises them (found in the sources, then imported)."""
    known = {
        cls.__name__: cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, InfermeshError)
    }
    grew = True
    while grew:
        grew = False
        for module, tree in SOURCES.items():
            for node in ast.walk(tree):
                if not isinstance(node, ast.ClassDef) or node.name in known:
                    continue
                bases = {base.id for base in node.bases if isinstance(base, ast.Name)}
                if bases & known.keys():
                    known[node.name] = getattr(importlib.import_module(module), node.name)
                    grew = True
    return known


DOMAIN_ERRORS = domain_errors()


def domain_errors_constructed() -> set[str]:
    """Every domain error the code builds: `raise X(...)`, `future.set_exception(X(...))`."""
    built = set()
    for tree in SOURCES.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in DOMAIN_ERRORS:
                built.add(node.func.id)
    return built - {InfermeshError.__name__}


STATUSES = statuses_named()
CONSTRUCTED = domain_errors_constructed()


def test_the_walk_finds_what_it_should() -> None:
    # Guards the walkers themselves: a walker that finds nothing would pass everything.
    assert {"INVALID_ARGUMENT", "OUT_OF_RANGE", "INTERNAL", "DEADLINE_EXCEEDED"} <= STATUSES
    assert {"InvalidArgument", "NotFound", "Overloaded", "InferenceFailed"} <= CONSTRUCTED


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_every_status_in_the_sources_reads_both_ways_through_the_table(name: str) -> None:
    status = grpc.StatusCode[name]
    assert status in ERROR_FOR_STATUS, f"grpc.StatusCode.{name} is used but has no domain error in the table"
    assert STATUS_FOR_ERROR[ERROR_FOR_STATUS[status]] == status


@pytest.mark.parametrize("name", sorted(CONSTRUCTED))
def test_every_domain_error_raised_comes_back_as_itself_or_its_table_entry(name: str) -> None:
    raised = DOMAIN_ERRORS[name]
    status = status_for(raised("x"))
    assert status in ERROR_FOR_STATUS, f"{name} becomes {status.name}, which the table cannot read back"
    assert issubclass(raised, ERROR_FOR_STATUS[status])


def test_the_table_is_one_to_one() -> None:
    assert len(set(STATUS_FOR_ERROR.values())) == len(STATUS_FOR_ERROR)
    assert {status: error for error, status in STATUS_FOR_ERROR.items()} == ERROR_FOR_STATUS


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_out_of_range_downstream_stays_a_client_error() -> None:
    # It used to read as Unavailable: UNAVAILABLE, which Envoy retries.
    error = from_rpc_error("ranking", FakeRpcError(grpc.StatusCode.OUT_OF_RANGE, "offset past the end"))
    assert isinstance(error, OutOfRange) and str(error) == "ranking: offset past the end"
    assert status_for(error) == grpc.StatusCode.OUT_OF_RANGE


def test_internal_downstream_stays_internal() -> None:
    # A bug downstream is not a transient outage: no retry would fix it.
    error = from_rpc_error("features", FakeRpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert isinstance(error, Internal) and status_for(error) == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("status", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED])
def test_statuses_no_service_of_ours_raises_read_as_unavailable(status: grpc.StatusCode) -> None:
    error = from_rpc_error("features", FakeRpcError(status, ""))
    assert type(error) is Unavailable and str(error) == f"features: {status.name}"


def test_a_domain_error_outside_the_table_is_internal() -> None:
    assert status_for(InfermeshError("x")) == grpc.StatusCode.INTERNAL
    assert status_for(InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT


def test_every_status_of_the_table_reads_as_http_too() -> None:
    # The services' own HTTP endpoints (scoring's /v2) answer with these; Envoy's transcoder
    # maps the same codes the same way for the gateway's REST clients (docs/rest.md).
    assert set(HTTP_STATUS_FOR_STATUS) == set(STATUS_FOR_ERROR.values())
    assert [http_status_for(error("x")) for error in (InvalidArgument, OutOfRange, NotFound, Overloaded)] == [
        400,
        400,
        404,
        429,
    ]
    assert (http_status_for(Unavailable("x")), http_status_for(Internal("x"))) == (503, 500)
    assert http_status_for(InfermeshError("x")) == 500  # outside the table: INTERNAL
