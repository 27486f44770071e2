"""OpenAPI 3.1 document of the REST API that Envoy's gRPC-JSON transcoder serves at the edge.

Generated from a protobuf descriptor set (ideally built with source info, so proto comments
become descriptions): one operation per `google.api.http` rule (additional_bindings
included) of every service in the set, request/response schemas under the proto3 JSON
mapping exactly as the transcoder applies it, and the error bodies it returns.

`scripts/gen_protos.py` writes it to services/genproto/openapi.json (its `--check` proves it
fresh) and the edge serves that file at GET /v1/openapi.json. No hand-written per-RPC
knowledge lives here: a new RPC or field shows up by regenerating.

The proto3 JSON mapping, as the transcoder applies it (see `JsonOptions`):

* field names: the proto names (`preserve_proto_field_names`) in responses; requests may use
  either those or the lowerCamelCase json names, the parser takes both. The schemas list
  the names responses use.
* 64-bit integers are decimal strings in responses (numbers or strings in requests); other
  integers are JSON numbers; `bytes` are base64 strings; enums are their value names;
  repeated fields are arrays, maps are objects; well-known types use their special forms
  (Timestamp as RFC 3339, Duration as "1.5s", wrappers as nullable scalars, ...).
* with `always_print_primitive_fields`, every field without presence (scalars, repeated,
  maps) is always in a response, defaults included: the response schemas mark those
  required. Message fields, proto3 `optional` fields and oneof members appear only when set.
* unknown request fields are ignored, so request schemas allow additional properties.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from infermesh.envoy.routes import OPENAPI_PATH

Json = dict[str, Any]
FieldProto = descriptor_pb2.FieldDescriptorProto

OPENAPI_VERSION = "3.1.0"
TITLE = "infermesh REST API"
# The edge route that serves the document.
DOCUMENT_PATH = OPENAPI_PATH

_HTTP_METHODS = ("get", "put", "post", "delete", "patch")
# Method keys an OpenAPI path item may have: google.api.http's plus custom verbs it knows.
_OPENAPI_METHODS = (*_HTTP_METHODS, "head", "options", "trace")

# Error responses every transcoded operation can give, all with a google.rpc.Status JSON
# body: a gRPC error from a service becomes the HTTP status Envoy maps its code to; Envoy's
# own replies (a body the transcoder cannot parse, a request over the size limit, no healthy
# upstream, a route timeout, the edge rate limit, auth) get the same body through the edge's
# local_reply_config (infermesh.envoy.listeners.LOCAL_REPLY_CODES).
ERROR_STATUSES: Mapping[str, str] = {
    "400": "Invalid request: INVALID_ARGUMENT, FAILED_PRECONDITION or OUT_OF_RANGE from the "
    "service, or a body the transcoder cannot parse into the request message.",
    "401": "UNAUTHENTICATED, or the edge rejected the request's credentials (when auth is on).",
    "403": "PERMISSION_DENIED.",
    "404": "NOT_FOUND: an unknown entity (user, model, ...).",
    "409": "ABORTED or ALREADY_EXISTS.",
    "413": "The request body is over the edge's size limit.",
    "429": "RESOURCE_EXHAUSTED (overload), or the edge's rate limit.",
    "499": "CANCELLED: the request was cancelled.",
    "500": "INTERNAL, UNKNOWN or DATA_LOSS.",
    "501": "UNIMPLEMENTED.",
    "502": "The edge could not reach a gateway replica.",
    "503": "UNAVAILABLE from a service, or no healthy upstream at the edge.",
    "504": "DEADLINE_EXCEEDED from a service, or the edge's route timeout.",
}
STATUS_SCHEMA = "google.rpc.Status"
# Set by the edge on every response while Envoy's tracer is on (infermesh/envoy/tracing.py).
_OK_HEADERS: Mapping[str, Json] = {
    "x-trace-id": {
        "description": "W3C trace id of the request (32 hex characters), when the mesh exports traces.",
        "required": False,
        "schema": {"type": "string"},
    }
}

# Proto type -> JSON schema under the proto3 JSON mapping. 64-bit integers are strings on
# output; the parser also takes them as numbers, which the request variant allows.
_INT64_PATTERN = "^-?[0-9]+$"
_UINT64_PATTERN = "^[0-9]+$"
_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
_SCALARS: Mapping[int, Json] = {
    FieldProto.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldProto.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldProto.TYPE_INT32: _INT32,
    FieldProto.TYPE_SINT32: _INT32,
    FieldProto.TYPE_SFIXED32: _INT32,
    FieldProto.TYPE_UINT32: _UINT32,
    FieldProto.TYPE_FIXED32: _UINT32,
    FieldProto.TYPE_INT64: {"type": "string", "pattern": _INT64_PATTERN},
    FieldProto.TYPE_SINT64: {"type": "string", "pattern": _INT64_PATTERN},
    FieldProto.TYPE_SFIXED64: {"type": "string", "pattern": _INT64_PATTERN},
    FieldProto.TYPE_UINT64: {"type": "string", "pattern": _UINT64_PATTERN},
    FieldProto.TYPE_FIXED64: {"type": "string", "pattern": _UINT64_PATTERN},
    FieldProto.TYPE_BOOL: {"type": "boolean"},
    FieldProto.TYPE_STRING: {"type": "string"},
    # Standard base64 with padding on output; the parser also takes the URL-safe alphabet.
    FieldProto.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
_64_BIT = {
    FieldProto.TYPE_INT64,
    FieldProto.TYPE_SINT64,
    FieldProto.TYPE_SFIXED64,
    FieldProto.TYPE_UINT64,
    FieldProto.TYPE_FIXED64,
}


def _nullable(schema: Json) -> Json:
    return {**schema, "type": [schema["type"], "null"]}


# Well-known types with a special JSON form: inlined, never components.
_WELL_KNOWN: Mapping[str, Json] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths."},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object", "maxProperties": 0},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
    },
    "google.protobuf.DoubleValue": _nullable(_SCALARS[FieldProto.TYPE_DOUBLE]),
    "google.protobuf.FloatValue": _nullable(_SCALARS[FieldProto.TYPE_FLOAT]),
    "google.protobuf.Int64Value": _nullable(_SCALARS[FieldProto.TYPE_INT64]),
    "google.protobuf.UInt64Value": _nullable(_SCALARS[FieldProto.TYPE_UINT64]),
    "google.protobuf.Int32Value": _nullable(_SCALARS[FieldProto.TYPE_INT32]),
    "google.protobuf.UInt32Value": _nullable(_SCALARS[FieldProto.TYPE_UINT32]),
    "google.protobuf.BoolValue": _nullable(_SCALARS[FieldProto.TYPE_BOOL]),
    "google.protobuf.StringValue": _nullable(_SCALARS[FieldProto.TYPE_STRING]),
    "google.protobuf.BytesValue": _nullable(_SCALARS[FieldProto.TYPE_BYTES]),
}
_NULL_VALUE = "google.protobuf.NullValue"


@dataclass(frozen=True)
class JsonOptions:
    """The transcoder's print options that shape response JSON (its `print_options`)."""

    preserve_proto_field_names: bool = False
    always_print_primitive_fields: bool = False

    @classmethod
    def from_print_options(cls, print_options: Mapping[str, Any]) -> JsonOptions:
        # Fields left out of the config take the transcoder's defaults, false for both.
        return cls(
            preserve_proto_field_names=bool(print_options.get("preserve_proto_field_names", False)),
            always_print_primitive_fields=bool(print_options.get("always_print_primitive_fields", False)),
        )


@dataclass(frozen=True)
class HttpBinding:
    """One google.api.http rule (the method's own or one of its additional_bindings)."""

    service: str  # full name, e.g. infermesh.gateway.v1.GatewayService
    method: str  # e.g. Recommend
    index: int  # 0 for the method's own rule, 1.. for additional_bindings
    verb: str  # get, post, ... (lower case; custom verbs as written)
    template: str  # the path template as written, e.g. /v1/{name=models/*}
    body: str  # "", "*" or a top-level field name
    response_body: str
    input_type: str  # full name, no leading dot
    output_type: str


def load_descriptor_set(data: bytes) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def http_bindings(descriptor_set: descriptor_pb2.FileDescriptorSet) -> list[HttpBinding]:
    """Every google.api.http rule in the set, in file, service and method order."""
    found = []
    for file in descriptor_set.file:
        for service in file.service:
            service_name = _join(file.package, service.name)
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                rules = [rule, *rule.additional_bindings]
                for index, each in enumerate(rules):
                    verb, template = _verb_and_template(each, f"{service_name}.{method.name}")
                    found.append(
                        HttpBinding(
                            service=service_name,
                            method=method.name,
                            index=index,
                            verb=verb,
                            template=template,
                            body=each.body,
                            # additional_bindings inherit nothing but may set their own.
                            response_body=each.response_body,
                            input_type=method.input_type.lstrip("."),
                            output_type=method.output_type.lstrip("."),
                        )
                    )
    return found


def _verb_and_template(rule: Any, where: str) -> tuple[str, str]:
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        raise ValueError(f"{where}: google.api.http rule without a pattern")
    if pattern == "custom":
        return rule.custom.kind.lower(), rule.custom.path
    return pattern, getattr(rule, pattern)


def _join(package: str, name: str) -> str:
    return f"{package}.{name}" if package else name


# --------------------------------------------------------------------------- path templates

_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class _PathParam:
    field_path: str  # dotted, e.g. "name" or "book.name"
    pattern: str  # the segments it matches, "*" when written bare


def parse_template(template: str) -> tuple[str, list[_PathParam]]:
    """`/v1/{name=models/*}:load` -> ("/v1/{name}:load", [name matching models/*])."""
    params: list[_PathParam] = []

    def replace(match: re.Match[str]) -> str:
        params.append(_PathParam(match.group(1).strip(), (match.group(2) or "*").strip()))
        return "{" + match.group(1).strip() + "}"

    path = _VARIABLE.sub(replace, template)
    # Bare wildcards outside variables match a segment the RPC never sees: name them so the
    # path stays a valid OpenAPI template.
    segments = path.split("/")
    wildcard = 0
    for i, segment in enumerate(segments):
        if segment in ("*", "**"):
            wildcard += 1
            segments[i] = f"{{_wildcard{wildcard}}}"
            params.append(_PathParam(f"_wildcard{wildcard}", segment))
    return "/".join(segments), params


# --------------------------------------------------------------------------- comments


class _Comments:
    """Proto comments by element, from SourceCodeInfo (empty when built without it)."""

    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
        self._by_file: dict[str, dict[tuple[int, ...], str]] = {}
        for file in descriptor_set.file:
            table = {}
            for location in file.source_code_info.location:
                text = _clean_comment(location.leading_comments, location.trailing_comments)
                if text:
                    table[tuple(location.path)] = text
            self._by_file[file.name] = table

    def get(self, file: str, path: tuple[int, ...]) -> str:
        return self._by_file.get(file, {}).get(path, "")


def _clean_comment(*parts: str) -> str:
    paragraphs = []
    for part in parts:
        lines = [line.strip() for line in part.strip("\n").splitlines()]
        text = "\n".join(lines).strip()
        if text:
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


# --------------------------------------------------------------------------- type index

# Field numbers inside descriptor.proto, for SourceCodeInfo paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


@dataclass(frozen=True)
class _Message:
    proto: descriptor_pb2.DescriptorProto
    file: str
    path: tuple[int, ...]
    syntax: str


@dataclass(frozen=True)
class _Enum:
    proto: descriptor_pb2.EnumDescriptorProto
    file: str
    path: tuple[int, ...]


class _Index:
    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, _Message] = {}
        self.enums: dict[str, _Enum] = {}
        self.services: dict[str, tuple[descriptor_pb2.ServiceDescriptorProto, str, tuple[int, ...]]] = {}
        for file in descriptor_set.file:
            syntax = file.syntax or "proto2"
            for i, message in enumerate(file.message_type):
                self._add_message(_join(file.package, message.name), message, file.name, (_FILE_MESSAGE, i), syntax)
            for i, enum in enumerate(file.enum_type):
                self.enums[_join(file.package, enum.name)] = _Enum(enum, file.name, (_FILE_ENUM, i))
            for i, service in enumerate(file.service):
                self.services[_join(file.package, service.name)] = (service, file.name, (_FILE_SERVICE, i))

    def _add_message(
        self, name: str, message: descriptor_pb2.DescriptorProto, file: str, path: tuple[int, ...], syntax: str
    ) -> None:
        self.messages[name] = _Message(message, file, path, syntax)
        for i, nested in enumerate(message.nested_type):
            self._add_message(f"{name}.{nested.name}", nested, file, (*path, _MESSAGE_NESTED, i), syntax)
        for i, enum in enumerate(message.enum_type):
            self.enums[f"{name}.{enum.name}"] = _Enum(enum, file, (*path, _MESSAGE_ENUM, i))

    def message(self, name: str) -> _Message:
        try:
            return self.messages[name]
        except KeyError:
            raise ValueError(
                f"message {name} is not in the descriptor set (built without --include_imports?)"
            ) from None

    def map_entry(self, field: FieldProto) -> _Message | None:
        if field.label != FieldProto.LABEL_REPEATED or field.type != FieldProto.TYPE_MESSAGE:
            return None
        entry = self.messages.get(field.type_name.lstrip("."))
        return entry if entry is not None and entry.proto.options.map_entry else None

    def field_by_path(self, message: str, dotted: str) -> FieldProto:
        current = self.message(message)
        parts = dotted.split(".")
        for depth, name in enumerate(parts):
            matches = [f for f in current.proto.field if f.name == name]
            if not matches:
                raise ValueError(f"{message} has no field {dotted!r} (path template or body)")
            field = matches[0]
            if depth + 1 < len(parts):
                if field.type != FieldProto.TYPE_MESSAGE:
                    raise ValueError(f"{message}: {dotted!r} goes through a non-message field")
                current = self.message(field.type_name.lstrip("."))
        return field


def _has_presence(field: FieldProto, syntax: str) -> bool:
    """Whether the JSON printer leaves the field out when unset, whatever the options."""
    if field.label == FieldProto.LABEL_REPEATED:
        return False
    if field.type in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_GROUP):
        return True
    if field.proto3_optional or field.HasField("oneof_index"):
        return True
    return syntax == "proto2"


# --------------------------------------------------------------------------- document


class _Builder:
    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet, options: JsonOptions) -> None:
        self.index = _Index(descriptor_set)
        self.comments = _Comments(descriptor_set)
        self.options = options
        self.schemas: dict[str, Json] = {}
        self._output_messages: set[str] = set()

    # ---- names ------------------------------------------------------------------------
    def json_name(self, field: FieldProto) -> str:
        if self.options.preserve_proto_field_names:
            return field.name
        return field.json_name or _lower_camel(field.name)

    def component(self, message: str, output: bool) -> str:
        # A message used on both sides needs two schemas (responses mark fields required,
        # requests never do): the response keeps the proto name.
        if output or message not in self._output_messages:
            return message
        return f"{message}.Input"

    # ---- reachability -----------------------------------------------------------------
    def set_output_messages(self, bindings: Iterable[HttpBinding]) -> None:
        roots = []
        for binding in bindings:
            if not binding.response_body:
                roots.append(binding.output_type)
                continue
            field = self.index.field_by_path(binding.output_type, binding.response_body)
            if field.type == FieldProto.TYPE_MESSAGE:
                roots.append(field.type_name.lstrip("."))
        self._output_messages = self.reachable(roots)

    def reachable(self, roots: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        stack = [r for r in roots if r not in _WELL_KNOWN]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for field in self.index.message(name).proto.field:
                if field.type in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_GROUP):
                    child = field.type_name.lstrip(".")
                    if child not in _WELL_KNOWN and child not in seen:
                        stack.append(child)
        return seen

    # ---- schemas ----------------------------------------------------------------------
    def ref(self, message: str, output: bool) -> Json:
        if message in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message])
        name = self.component(message, output)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder first: recursive messages terminate
            self.schemas[name] = self.message_schema(message, output)
        return {"$ref": f"#/components/schemas/{name}"}

    def enum_ref(self, enum: str) -> Json:
        if enum == _NULL_VALUE:
            return {"type": "null"}
        if enum not in self.schemas:
            found = self.index.enums.get(enum)
            if found is None:
                raise ValueError(f"enum {enum} is not in the descriptor set")
            schema: Json = {"type": "string", "enum": [v.name for v in found.proto.value]}
            description = self.comments.get(found.file, found.path)
            values = [
                f"- {v.name}: {text}"
                for i, v in enumerate(found.proto.value)
                if (text := self.comments.get(found.file, (*found.path, _ENUM_VALUE, i)))
            ]
            if values:
                description = "\n".join(filter(None, [description, *values]))
            if description:
                schema["description"] = description
            self.schemas[enum] = schema
        return {"$ref": f"#/components/schemas/{enum}"}

    def message_schema(self, message: str, output: bool, skip: frozenset[str] = frozenset()) -> Json:
        found = self.index.message(message)
        properties: Json = {}
        required: list[str] = []
        for i, field in enumerate(found.proto.field):
            if field.name in skip:
                continue
            name = self.json_name(field)
            schema = self.field_schema(field, output)
            description = self.comments.get(found.file, (*found.path, _MESSAGE_FIELD, i))
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneof = found.proto.oneof_decl[field.oneof_index].name
                description = "\n\n".join(filter(None, [description, f"Member of oneof `{oneof}`: set at most one."]))
            if description:
                schema = {**schema, "description": description}
            properties[name] = schema
            if output and self.options.always_print_primitive_fields and not _has_presence(field, found.syntax):
                required.append(name)
        schema: Json = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        description = self.comments.get(found.file, found.path)
        if description:
            schema["description"] = description
        return schema

    def field_schema(self, field: FieldProto, output: bool) -> Json:
        entry = self.index.map_entry(field)
        if entry is not None:
            _, value = sorted(entry.proto.field, key=lambda f: f.number)  # key, value
            return {"type": "object", "additionalProperties": self.single_schema(value, output)}
        single = self.single_schema(field, output)
        if field.label == FieldProto.LABEL_REPEATED:
            return {"type": "array", "items": single}
        return single

    def single_schema(self, field: FieldProto, output: bool) -> Json:
        if field.type in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_GROUP):
            return self.ref(field.type_name.lstrip("."), output)
        if field.type == FieldProto.TYPE_ENUM:
            return self.enum_ref(field.type_name.lstrip("."))
        schema = dict(_SCALARS[field.type])
        if not output and field.type in _64_BIT:
            # The parser takes 64-bit integers as JSON numbers too.
            schema = {"type": ["string", "integer"], "pattern": schema["pattern"]}
        return schema

    # ---- operations -------------------------------------------------------------------
    def operation(self, binding: HttpBinding) -> tuple[str, str, Json]:
        path, params = parse_template(binding.template)
        service, file, service_path = self.index.services[binding.service]
        method_index = [m.name for m in service.method].index(binding.method)
        description = self.comments.get(file, (*service_path, _SERVICE_METHOD, method_index))
        short = binding.service.rsplit(".", 1)[-1]
        operation: Json = {
            "operationId": f"{short}_{binding.method}" + (f"_{binding.index}" if binding.index else ""),
            "tags": [short],
            "summary": _first_sentence(description) or binding.method,
            "x-grpc-method": f"/{binding.service}/{binding.method}",
        }
        if description:
            operation["description"] = description
        parameters = [self.path_parameter(binding.input_type, p) for p in params]
        bound = {p.field_path for p in params}
        if binding.body == "*":
            # Path-bound top-level fields are not part of the body.
            skip = frozenset(f for f in bound if "." not in f)
            body_schema = (
                self.ref(binding.input_type, output=False)
                if not skip
                else self.message_schema(binding.input_type, output=False, skip=skip)
            )
            operation["requestBody"] = _json_body(body_schema)
        else:
            if binding.body:
                field = self.index.field_by_path(binding.input_type, binding.body)
                operation["requestBody"] = _json_body(self.field_schema(field, output=False))
                bound.add(binding.body)
            parameters += self.query_parameters(binding.input_type, bound)
        if parameters:
            operation["parameters"] = parameters
        if binding.response_body:
            field = self.index.field_by_path(binding.output_type, binding.response_body)
            response_schema = self.field_schema(field, output=True)
        else:
            response_schema = self.ref(binding.output_type, output=True)
        ok: Json = {"description": "OK", "headers": dict(_OK_HEADERS), **_json_body(response_schema)}
        responses: Json = {"200": ok}
        for status in ERROR_STATUSES:
            responses[status] = {"$ref": f"#/components/responses/{_error_name(status)}"}
        operation["responses"] = responses
        return path, binding.verb, operation

    def path_parameter(self, message: str, param: _PathParam) -> Json:
        if param.field_path.startswith("_wildcard"):
            schema: Json = {"type": "string"}
            description = f"Matches `{param.pattern}`; not passed to the RPC."
        else:
            field = self.index.field_by_path(message, param.field_path)
            schema = self.single_schema(field, output=False)
            description = f"Field `{param.field_path}`" + (
                f"; matches `{param.pattern}`" if param.pattern != "*" else ""
            )
        return {
            "name": param.field_path,
            "in": "path",
            "required": True,
            "description": description,
            "schema": schema,
        }

    def query_parameters(self, message: str, bound: set[str], prefix: str = "", depth: int = 0) -> list[Json]:
        """Fields not bound to the path or body, as the transcoder reads them from the query."""
        found = self.index.message(message)
        params = []
        for i, field in enumerate(found.proto.field):
            dotted = f"{prefix}{field.name}"
            if dotted in bound or self.index.map_entry(field) is not None:
                continue
            if field.type in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_GROUP):
                child = field.type_name.lstrip(".")
                # Nested messages flatten to dotted names; repeated ones and recursion cannot.
                if field.label != FieldProto.LABEL_REPEATED and child not in _WELL_KNOWN and depth < 3:
                    params += self.query_parameters(child, bound, f"{dotted}.", depth + 1)
                elif child in _WELL_KNOWN and field.label != FieldProto.LABEL_REPEATED:
                    params.append(self._query_param(dotted, dict(_WELL_KNOWN[child]), found, i))
                continue
            schema = self.single_schema(field, output=False)
            if field.label == FieldProto.LABEL_REPEATED:
                schema = {"type": "array", "items": schema}
            params.append(self._query_param(dotted, schema, found, i))
        return params

    def _query_param(self, name: str, schema: Json, found: _Message, index: int) -> Json:
        param: Json = {"name": name, "in": "query", "required": False, "schema": schema}
        if schema.get("type") == "array":
            param["style"], param["explode"] = "form", True
        description = self.comments.get(found.file, (*found.path, _MESSAGE_FIELD, index))
        if description:
            param["description"] = description
        return param


def _document_operation() -> Json:
    # Served by the edge itself (a direct response), not by an RPC.
    return {
        "operationId": "getOpenApiDocument",
        "tags": ["OpenAPI"],
        "summary": "This OpenAPI document",
        "responses": {"200": {"description": "OK", **_json_body({"type": "object"})}},
    }


def _naming_note(options: JsonOptions) -> str:
    names = "proto field names" if options.preserve_proto_field_names else "lowerCamelCase JSON names"
    note = f"Responses use the {names}"
    if options.always_print_primitive_fields:
        note += " and carry every field without presence, defaults included"
    return note + "; requests take proto field names or lowerCamelCase JSON names alike."


def _json_body(schema: Json) -> Json:
    return {"content": {"application/json": {"schema": schema}}}


def _error_name(status: str) -> str:
    return f"Error{status}"


def _first_sentence(text: str) -> str:
    first = text.split("\n\n", 1)[0].replace("\n", " ").strip()
    match = re.match(r"(.+?[.:])(\s|$)", first)
    return (match.group(1) if match else first).rstrip(":.")


def _lower_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _error_components() -> tuple[Json, Json]:
    status: Json = {
        "type": "object",
        "description": "google.rpc.Status: the gRPC status the service returned, as the "
        "transcoder renders it (convert_grpc_status).",
        "properties": {
            "code": {
                "description": "gRPC status code (3 INVALID_ARGUMENT, 5 NOT_FOUND, 14 UNAVAILABLE, ...).",
                **_INT32,
            },
            "message": {"type": "string", "description": "Developer-facing error message."},
            "details": {"type": "array", "items": dict(_WELL_KNOWN["google.protobuf.Any"])},
        },
        "required": ["code", "message"],
    }
    responses = {
        _error_name(code): {
            "description": text,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}},
            },
        }
        for code, text in ERROR_STATUSES.items()
    }
    return status, responses


def build(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
    options: JsonOptions,
    *,
    title: str = TITLE,
) -> Json:
    """The OpenAPI document for every google.api.http rule in `descriptor_set`."""
    bindings = http_bindings(descriptor_set)
    builder = _Builder(descriptor_set, options)
    builder.set_output_messages(bindings)
    paths: dict[str, Json] = {}
    for binding in bindings:
        path, verb, operation = builder.operation(binding)
        item = paths.setdefault(path, {})
        # OpenAPI has fixed method keys; a custom verb (e.g. HEAD, OPTIONS) maps if known.
        if verb not in _OPENAPI_METHODS:
            raise ValueError(f"{binding.service}.{binding.method}: HTTP method {verb!r} has no OpenAPI key")
        if verb in item:
            raise ValueError(f"{verb.upper()} {path} is bound twice ({binding.service}.{binding.method})")
        item[verb] = operation
    if DOCUMENT_PATH in paths:
        raise ValueError(f"{DOCUMENT_PATH} is bound by an RPC; the edge serves this document there")
    paths[DOCUMENT_PATH] = {"get": _document_operation()}
    status_schema, error_responses = _error_components()
    builder.schemas[STATUS_SCHEMA] = status_schema
    tags: list[Json] = [{"name": "OpenAPI", "description": "The API description itself."}]
    for name in sorted({b.service for b in bindings}):
        _, file, path = builder.index.services[name]
        tag: Json = {"name": name.rsplit(".", 1)[-1], "x-grpc-service": name}
        description = builder.comments.get(file, path)
        if description:
            tag["description"] = description
        tags.append(tag)
    versions = sorted({p for b in bindings for p in b.service.split(".") if re.fullmatch(r"v\d+\w*", p)})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": ",".join(versions) or "0",
            "description": (
                "REST/JSON mapping of the infermesh gRPC API, served by Envoy's gRPC-JSON "
                "transcoder at the edge. Generated from the protos by scripts/gen_protos.py: "
                "do not edit. " + _naming_note(options)
            ),
        },
        "tags": tags,
        "paths": paths,
        "components": {"schemas": builder.schemas, "responses": error_responses},
    }


def to_json(document: Json) -> str:
    """Canonical text: sorted keys, indent 2, trailing newline (stable diffs)."""
    return json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def render(descriptor_set_bytes: bytes, options: JsonOptions) -> str:
    return to_json(build(load_descriptor_set(descriptor_set_bytes), options))


def operations(document: Mapping[str, Any]) -> Iterator[tuple[str, str, Json]]:
    """(method, path, operation) for every operation in `document`."""
    for path, item in document.get("paths", {}).items():
        for verb, operation in item.items():
            if verb in _OPENAPI_METHODS:
                yield verb, path, operation
