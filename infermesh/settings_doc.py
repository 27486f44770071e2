"""Writes docs/settings.md, the reference of every service's environment variables, from the
settings classes themselves (names, types, ranges, defaults, Field descriptions), so the
reference cannot drift from the code. tests/unit/test_settings_reference.py fails when the
file is stale.

    python -m infermesh.settings_doc            # rewrite docs/settings.md
    python -m infermesh.settings_doc --check    # exit 1 if it is stale
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from gateway.service import GatewaySettings
from infermesh.docgen import generated_doc_main
from infermesh.settings import ToolSettings
from services.features.service import FeaturesSettings
from services.jobs.settings import JobsSettings
from services.ranking.service import RankingSettings
from services.runtime.channels import MeshTlsSettings
from services.runtime.pipeline import PipelineSettings
from services.runtime.server import TlsSettings, tls_settings_class
from services.runtime.settings import ServiceSettings, TelemetrySettings, TracePipelineSettings
from services.runtime.topology import FEATURES, GATEWAY, JOBS, RANKING, SCORING
from services.scoring.service import ScoringSettings

DEFAULT_OUT = Path("docs/settings.md")
REGENERATE = "python -m infermesh.settings_doc"
# In the order a request meets them.
SERVICES: dict[str, type[ServiceSettings]] = {
    FEATURES: FeaturesSettings,
    SCORING: ScoringSettings,
    RANKING: RankingSettings,
    GATEWAY: GatewaySettings,
    JOBS: JobsSettings,
}
_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", SecretStr: "secret string"}
_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)

HEADER = f"""# Settings reference

Generated from the settings classes by `{REGENERATE}`: edit the
`Field(description=...)` in the code, not this file (tests/unit/test_settings_reference.py
fails when it is stale).

Every service reads its settings once, at start, from environment variables named by its
prefix and the setting (`SCORING_PORT`). A malformed or out-of-range value stops the service
at start with a message naming the variable, e.g.
`SCORING_PORT='eighty': Input should be a valid integer, unable to parse string as an integer`.
Booleans take true/false, 1/0, yes/no or on/off. The last rows of each service's table
(`_TLS_*`, `_PLAINTEXT_HEALTH_PORT`) are TLS (see the end).
"""

FOOTER = f"""## TLS (every service)

{" ".join(inspect.getdoc(TlsSettings).split())}

## Read by every process, outside these tables

`LOG_LEVEL` (default `INFO`); `INFERMESH_EVENT_LOOP` (`uvloop` where installed, or
`asyncio`); the OpenTelemetry exporter's and batch processor's own variables
(`OTEL_EXPORTER_OTLP_HEADERS`, `_CERTIFICATE`, `_TIMEOUT`, `_COMPRESSION`, their `_TRACES_`
forms, `OTEL_BSP_*`, `OTEL_PROPAGATORS`), read by those packages as they document them
(docs/observability.md).

glibc's malloc: each service fixes its mmap threshold at 4 MiB and its trim threshold at
32 MiB, so tensors of a few hundred KiB stay in the heap instead of being returned to the
kernel and faulted back in on every batch (services/runtime/allocator.py). Setting any of
glibc's own `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_` or a
`glibc.malloc.*` entry of `GLIBC_TUNABLES` leaves the allocator as you set it.
"""


def _type(field: FieldInfo) -> str:
    annotation = field.annotation
    optional = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if type(None) in typing.get_args(annotation) and len(optional) == 1:  # X | None: unset is the default
        annotation = optional[0]
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    words = [_TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))]
    for constraint in field.metadata:
        for kind, attribute, symbol in _BOUNDS:
            if isinstance(constraint, kind):
                words.append(f"{symbol} {getattr(constraint, attribute)}")
        if isinstance(constraint, annotated_types.MinLen) and constraint.min_length == 1:
            words.append("non-empty")
    return ", ".join(words)


def _default(value: Any) -> str:
    if value == "" or value is None:
        return "(empty)"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(settings_cls: type[ServiceSettings]) -> Iterator[str]:
    for name, field in settings_cls.model_fields.items():
        description = _cell(field.description or "")
        yield f"| `{settings_cls.variable(name)}` | {_type(field)} | {_default(field.default)} | {description} |"


def _section(title: str, settings_cls: type[ServiceSettings], *more: type[ServiceSettings]) -> str:
    return "\n".join(
        [
            f"## {title} (`{settings_cls.variable('')}*`)",
            "",
            _cell(settings_cls.__doc__ or ""),
            "",
            "| Variable | Type | Default | Meaning |",
            "|---|---|---|---|",
            *(row for cls in (settings_cls, *more) for row in _rows(cls)),
            "",
        ]
    )


def render() -> str:
    sections = [HEADER]
    sections += [_section(service, cls, tls_settings_class(service)) for service, cls in SERVICES.items()]
    sections.append(_section("mTLS channels a service opens to Envoy", MeshTlsSettings))
    sections.append(_section("the pipeline file, every service", PipelineSettings))
    sections.append(_section("the `infermesh` command and its tools", ToolSettings))
    sections.append(_section("OpenTelemetry, every service and jobs worker", TelemetrySettings, TracePipelineSettings))
    sections.append(FOOTER)
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    return generated_doc_main(REGENERATE, (__doc__ or "").splitlines()[0], DEFAULT_OUT, render, argv)


if __name__ == "__main__":
    sys.exit(main())
