#!/usr/bin/env python3
"""Generate the Python stubs, the descriptor set and the OpenAPI document from protos/.

Plus the vendored protos that services use as they are (VENDORED: Triton's
model_config.proto, third_party/triton-common), compiled with protos/ into the same stubs.

Everything goes into services/genproto/; openapi.json describes the REST API that Envoy's
transcoder serves (infermesh/openapi.py), using the transcoder's own JSON options from
the rendered Envoy config (infermesh/envoy/http_filters.py).

    python scripts/gen_protos.py          # regenerate in place
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs are stale

The output is committed and never edited by hand; CI runs --check to prove it is fresh.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party" / "googleapis"
# Vendored protos compiled into stubs too (googleapis' are imports only, their stubs come
# with googleapis-common-protos): include root -> files, as imported.
TRITON = ROOT / "third_party" / "triton-common"
VENDORED: dict[Path, tuple[str, ...]] = {TRITON: ("inference/model_config.proto",)}
OUT = ROOT / "services" / "genproto"
# Envoy's REST<->gRPC transcoder reads service definitions from this file.
DESCRIPTOR_SET = "infermesh_descriptor.binpb"
# The REST API's OpenAPI document; the edge serves it at GET /v1/openapi.json.
OPENAPI = "openapi.json"
README = """# Generated code: do not edit

Everything here is written by `python scripts/gen_protos.py` from `protos/`.
Edit the .proto files and regenerate; CI fails when this folder is stale.
`infermesh_descriptor.binpb` is the descriptor set Envoy's gRPC-JSON transcoder loads;
`openapi.json` is the OpenAPI document of that REST API (served at GET /v1/openapi.json).
"""


def _protoc(*args: str) -> None:
    from grpc_tools import protoc  # build-time tool, imported only when generating

    # protoc's own well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = Path(protoc.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    vendored = sorted(name for names in VENDORED.values() for name in names)
    includes = [f"-I{root}" for root in (PROTOS, *VENDORED, THIRD_PARTY, well_known)]
    command = ["protoc", *includes, *args, *sources, *vendored]
    if protoc.main(command) != 0:
        raise SystemExit("protoc failed")


def openapi_document(scratch: Path) -> str:
    """The OpenAPI document, from a descriptor set with comments (not the one Envoy loads)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from infermesh import envoy, openapi

    described = scratch / "described.binpb"
    _protoc(f"--descriptor_set_out={described}", "--include_imports", "--include_source_info")
    # The JSON shape is the transcoder's: the print options its config is rendered with.
    options = openapi.JsonOptions.from_print_options(envoy.TRANSCODER_PRINT_OPTIONS)
    return openapi.render(described.read_bytes(), options)


# protoc writes imports from the proto package root (`from infermesh.gateway.v1 import ...`,
# `from inference import ...`). The stubs live under services.genproto instead, so that
# `import infermesh` is the project and no top-level `inference` module clashes with other
# installs; these imports are rooted there.
_STUB_IMPORT = re.compile(r"^(from|import) (infermesh|inference)\b", re.M)


def root_imports(out: Path) -> None:
    for path in [*out.rglob("*.py"), *out.rglob("*.pyi")]:
        text = path.read_text(encoding="utf-8")
        rooted = _STUB_IMPORT.sub(r"\1 services.genproto.\2", text)
        if rooted != text:
            path.write_text(rooted, encoding="utf-8")


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _protoc(
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--descriptor_set_out={out / DESCRIPTOR_SET}",
        "--include_imports",
    )
    with tempfile.TemporaryDirectory() as scratch:
        (out / OPENAPI).write_text(openapi_document(Path(scratch)), encoding="utf-8")
    root_imports(out)
    # Regular packages (not namespace ones) so packaging tools find them.
    (out / "__init__.py").touch()
    for directory in [p for p in out.rglob("*") if p.is_dir()]:
        if directory.name != "__pycache__":
            (directory / "__init__.py").touch()
    (out / "README.md").write_text(README)


def differences(expected: Path, actual: Path) -> list[str]:
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    want, have = files(expected), files(actual)
    problems = [f"missing: {name}" for name in sorted(want - have)]
    problems += [f"not generated by protos/: {name}" for name in sorted(have - want)]
    problems += [
        f"stale: {name}"
        for name in sorted(want & have)
        if not filecmp.cmp(expected / name, actual / name, shallow=False)
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if services/genproto is stale")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "genproto"
            generate(fresh)
            problems = differences(fresh, OUT)
        if problems:
            print("services/genproto is out of date with protos/:", *problems, sep="\n  ")
            print("Run: python scripts/gen_protos.py")
            return 1
        print("services/genproto is up to date")
        return 0
    shutil.rmtree(OUT, ignore_errors=True)
    generate(OUT)
    print(f"generated {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
