"""The OpenAPI document of the REST API (infermesh/openapi.py, services/genproto/openapi.json).

The committed document is checked against the committed descriptor set and the Envoy edge
that serves it; a synthetic proto exercises the proto3 JSON mapping rules the real protos
do not use yet (64-bit integers, bytes, enums, maps, oneofs, well-known types, path and
query parameters, additional bindings, response_body), so a new RPC regenerates correctly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from infermesh import envoy, openapi
from services.runtime.topology import local_topology

ROOT = Path(__file__).resolve().parents[2]
GENPROTO = ROOT / "services" / "genproto"
DOCUMENT = GENPROTO / "openapi.json"
DESCRIPTOR_SET = GENPROTO / "infermesh_descriptor.binpb"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(DOCUMENT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bindings() -> list[openapi.HttpBinding]:
    return openapi.http_bindings(openapi.load_descriptor_set(DESCRIPTOR_SET.read_bytes()))


def _edge_config() -> dict[str, Any]:
    return envoy.render(envoy.local_config_topology())


def test_committed_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_every_http_rule_has_an_operation(document: dict[str, Any], bindings: list[openapi.HttpBinding]) -> None:
    assert bindings, "the descriptor set has no google.api.http rule"
    served = {
        (op["x-grpc-method"], verb, path) for verb, path, op in openapi.operations(document) if "x-grpc-method" in op
    }
    expected = {(f"/{b.service}/{b.method}", b.verb, openapi.parse_template(b.template)[0]) for b in bindings}
    assert served == expected
    # Plus the document itself, which the edge serves.
    assert document["paths"][openapi.DOCUMENT_PATH]["get"]["operationId"] == "getOpenApiDocument"


def test_recommend_is_documented_as_the_transcoder_speaks_it(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/recommend"]["post"]
    assert operation["operationId"] == "GatewayService_Recommend"
    schemas = document["components"]["schemas"]
    request = schemas["infermesh.gateway.v1.RecommendRequest"]
    # Proto names (preserve_proto_field_names), nothing required in a proto3 request.
    assert {"user_id", "candidate_ids", "k"} <= set(request["properties"])
    assert "required" not in request
    assert request["properties"]["candidate_ids"] == {
        **request["properties"]["candidate_ids"],
        "type": "array",
        "items": {"type": "string"},
    }
    response = schemas["infermesh.gateway.v1.RecommendResponse"]
    # always_print_primitive_fields: every scalar and repeated field is always there.
    assert {"items", "model_name", "model_version", "trace_id", "stage_timings", "degraded"} <= set(
        response["required"]
    )
    item = schemas["infermesh.gateway.v1.RecommendedItem"]
    assert set(item["properties"]) >= {"item_id", "score", "category"}
    assert item["properties"]["score"]["type"] == "number"
    assert item["properties"]["category"]["minimum"] == 0  # uint32


def test_errors_map_to_http_statuses_with_a_status_body(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v1/recommend"]["post"]["responses"]
    for status in ("400", "404", "429", "503", "504"):
        assert responses[status] == {"$ref": f"#/components/responses/Error{status}"}
        content = document["components"]["responses"][f"Error{status}"]["content"]
        assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/google.rpc.Status"}
        assert set(content) == {"application/json"}  # Envoy's own replies too (local_reply_config)
    status = document["components"]["schemas"]["google.rpc.Status"]
    assert set(status["properties"]) == {"code", "message", "details"}


def transcoder_settings(envoy_bootstrap: Any) -> tuple[openapi.JsonOptions, list[str]]:
    """The JSON options and transcoded services of the transcoder in a rendered bootstrap:
    what Envoy really runs with, to hold the generator's options against."""
    for listener in envoy_bootstrap["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for http_filter in hcm["http_filters"]:
            if http_filter["name"] == "envoy.filters.http.grpc_json_transcoder":
                config = http_filter["typed_config"]
                return openapi.JsonOptions.from_print_options(config["print_options"]), list(config["services"])
    raise AssertionError("no gRPC-JSON transcoder in the Envoy config")


def test_document_follows_the_transcoders_print_options() -> None:
    options, services = transcoder_settings(_edge_config())
    assert options == openapi.JsonOptions(preserve_proto_field_names=True, always_print_primitive_fields=True)
    # Every service with REST rules must be one the transcoder actually transcodes.
    described = {b.service for b in openapi.http_bindings(openapi.load_descriptor_set(DESCRIPTOR_SET.read_bytes()))}
    assert described <= set(services)


def test_document_matches_the_descriptor_set_envoy_loads(document: dict[str, Any]) -> None:
    """Same as a fresh build from the committed descriptor set, comments aside."""
    options, _ = transcoder_settings(_edge_config())
    fresh = openapi.build(openapi.load_descriptor_set(DESCRIPTOR_SET.read_bytes()), options)
    assert _without_descriptions(fresh) == _without_descriptions(document)


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k not in ("description", "summary")}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def test_edge_serves_the_document_before_any_proxied_route() -> None:
    assert envoy.OPENAPI_PATH == openapi.DOCUMENT_PATH
    topology = local_topology(descriptor_set=Path("services/genproto/infermesh_descriptor.binpb"))
    (edge,) = [x for x in envoy.render(topology)["static_resources"]["listeners"] if x["name"] == "edge"]
    hcm = edge["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (index,) = [i for i, r in enumerate(routes) if r["match"].get("path") == openapi.DOCUMENT_PATH]
    route = routes[index]
    catch_all = [i for i, r in enumerate(routes) if r["match"] == {"prefix": "/"}]
    assert index < min(catch_all)
    assert route["direct_response"] == {
        "status": 200,
        "body": {"filename": "services/genproto/openapi.json"},
    }
    headers = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
    assert headers["content-type"] == "application/json"
    # Envoy refuses to start when the file is over the limit (4 KiB by default).
    assert DOCUMENT.stat().st_size * 4 < hcm["route_config"]["max_direct_response_body_size_bytes"]


def test_rendering_is_deterministic() -> None:
    options = openapi.JsonOptions(True, True)
    data = DESCRIPTOR_SET.read_bytes()
    assert openapi.render(data, options) == openapi.render(data, options)
    assert openapi.render(data, options).endswith("}\n")


# --------------------------------------------------------------------------- synthetic proto

LIBRARY_PROTO = """
syntax = "proto3";
package example.library.v1;

import "google/api/annotations.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// Books on shelves.
service LibraryService {
  // Gets one book. Longer text follows.
  rpc GetBook(GetBookRequest) returns (Book) {
    option (google.api.http) = {
      get: "/v1/{name=shelves/*/books/*}"
      additional_bindings { get: "/v1/books/{name}" }
    };
  }
  rpc UpdateBook(UpdateBookRequest) returns (Book) {
    option (google.api.http) = { patch: "/v1/{book.name=shelves/*/books/*}" body: "book" };
  }
  rpc MoveBook(MoveBookRequest) returns (MoveBookResponse) {
    option (google.api.http) = {
      post: "/v1/{name=shelves/*/books/*}:move" body: "*" response_body: "book"
    };
  }
  rpc ListBooks(ListBooksRequest) returns (ListBooksResponse) {
    option (google.api.http) = { get: "/v1/shelves/{shelf}/books" };
  }
  // No REST mapping: not in the document.
  rpc Internal(GetBookRequest) returns (Book);
}

// A book.
message Book {
  string name = 1;
  int64 copies = 2;
  uint64 isbn = 3;
  bytes cover = 4;
  Genre genre = 5;
  map<string, int32> ratings = 6;
  optional string subtitle = 7;
  oneof source { string publisher = 8; bool self_published = 9; }
  google.protobuf.Timestamp published = 10;
  google.protobuf.Int32Value pages = 11;
  Book sequel = 12;
  repeated Chapter chapters = 13;
  message Chapter { string title = 1; }
}

enum Genre {
  // Not set.
  GENRE_UNSPECIFIED = 0;
  GENRE_FICTION = 1;
}

message GetBookRequest { string name = 1; }
message UpdateBookRequest { Book book = 1; bool validate_only = 2; }
message MoveBookRequest { string name = 1; string to_shelf = 2; }
message MoveBookResponse { Book book = 1; }
message Paging { int32 size = 1; string token = 2; }
message ListBooksRequest {
  string shelf = 1;
  repeated Genre genres = 2;
  Paging paging = 3;
  int64 min_copies = 4;
}
message ListBooksResponse { repeated Book books = 1; }
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    protoc = pytest.importorskip("grpc_tools.protoc")
    tmp = tmp_path_factory.mktemp("library")
    (tmp / "library.proto").write_text(LIBRARY_PROTO)
    out = tmp / "library.binpb"
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{tmp}",
        f"-I{ROOT / 'third_party' / 'googleapis'}",
        f"-I{well_known}",
        f"--descriptor_set_out={out}",
        "--include_imports",
        "--include_source_info",
        "library.proto",
    ]
    assert protoc.main(args) == 0
    document = openapi.build(openapi.load_descriptor_set(out.read_bytes()), openapi.JsonOptions(True, True))
    validate(document)
    return document


def test_synthetic_api_has_one_operation_per_binding(library: dict[str, Any]) -> None:
    found = {(verb, path): op for verb, path, op in openapi.operations(library)}
    assert set(found) == {
        ("get", "/v1/{name}"),
        ("get", "/v1/books/{name}"),
        ("patch", "/v1/{book.name}"),
        ("post", "/v1/{name}:move"),
        ("get", "/v1/shelves/{shelf}/books"),
        ("get", openapi.DOCUMENT_PATH),
    }
    ids = [op["operationId"] for op in found.values()]
    assert len(ids) == len(set(ids))
    get = found[("get", "/v1/{name}")]
    assert get["operationId"] == "LibraryService_GetBook"
    assert found[("get", "/v1/books/{name}")]["operationId"] == "LibraryService_GetBook_1"
    assert get["summary"] == "Gets one book"
    (name,) = get["parameters"]
    assert name["in"] == "path" and name["required"] and "shelves/*/books/*" in name["description"]
    assert "requestBody" not in get


def test_synthetic_body_field_query_and_response_body(library: dict[str, Any]) -> None:
    paths = library["paths"]
    update = paths["/v1/{book.name}"]["patch"]
    assert update["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/example.library.v1.Book.Input"
    }
    params = {p["name"]: p for p in update["parameters"]}
    assert params["book.name"]["in"] == "path"
    assert params["validate_only"]["in"] == "query"

    move = paths["/v1/{name}:move"]["post"]
    body = move["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"to_shelf"}  # name is bound to the path
    assert move["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/example.library.v1.Book"
    }

    listing = paths["/v1/shelves/{shelf}/books"]["get"]
    query = {p["name"]: p for p in listing["parameters"] if p["in"] == "query"}
    assert set(query) == {"genres", "paging.size", "paging.token", "min_copies"}
    assert query["genres"]["schema"] == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/example.library.v1.Genre"},
    }
    assert query["genres"]["explode"] is True
    assert query["min_copies"]["schema"]["type"] == ["string", "integer"]


def test_synthetic_proto3_json_mapping(library: dict[str, Any]) -> None:
    schemas = library["components"]["schemas"]
    book = schemas["example.library.v1.Book"]
    props = book["properties"]
    assert props["copies"]["type"] == "string" and props["copies"]["pattern"] == "^-?[0-9]+$"
    assert props["isbn"]["pattern"] == "^[0-9]+$"
    assert props["cover"] == {"type": "string", "contentEncoding": "base64"}
    assert props["genre"] == {"$ref": "#/components/schemas/example.library.v1.Genre"}
    assert schemas["example.library.v1.Genre"]["enum"] == ["GENRE_UNSPECIFIED", "GENRE_FICTION"]
    assert "GENRE_UNSPECIFIED: Not set." in schemas["example.library.v1.Genre"]["description"]
    assert props["ratings"]["type"] == "object"
    assert props["ratings"]["additionalProperties"]["format"] == "int32"
    assert props["published"] == {"type": "string", "format": "date-time"}
    assert props["pages"]["type"] == ["integer", "null"]
    assert props["sequel"] == {"$ref": "#/components/schemas/example.library.v1.Book"}  # recursion
    assert props["chapters"]["items"] == {"$ref": "#/components/schemas/example.library.v1.Book.Chapter"}
    assert "oneof `source`" in props["publisher"]["description"]
    assert book["description"] == "A book."
    # Present only when set: optional, oneof members and message fields.
    assert set(book["required"]) == {"name", "copies", "isbn", "cover", "genre", "ratings", "chapters"}
    # The request-side twin of a response message: nothing required, 64-bit ints as numbers too.
    book_in = schemas["example.library.v1.Book.Input"]
    assert "required" not in book_in
    assert book_in["properties"]["copies"]["type"] == ["string", "integer"]
    assert book_in["properties"]["sequel"] == {"$ref": "#/components/schemas/example.library.v1.Book.Input"}


def test_lower_camel_names_when_the_transcoder_uses_json_names(tmp_path: Path) -> None:
    options = openapi.JsonOptions(preserve_proto_field_names=False, always_print_primitive_fields=False)
    document = openapi.build(openapi.load_descriptor_set(DESCRIPTOR_SET.read_bytes()), options)
    request = document["components"]["schemas"]["infermesh.gateway.v1.RecommendRequest"]
    assert {"userId", "candidateIds"} <= set(request["properties"])
    response = document["components"]["schemas"]["infermesh.gateway.v1.RecommendResponse"]
    assert "required" not in response  # defaults are left out without always_print_primitive_fields


def test_gen_protos_writes_the_document(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools.protoc")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    text = gen_protos.openapi_document(tmp_path)
    assert text == DOCUMENT.read_text(encoding="utf-8"), "stale: run scripts/gen_protos.py"
