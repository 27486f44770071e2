"""infermesh: what users import and run.

`infermesh.client` calls a mesh; `infermesh.cli` is the `infermesh` command; the rest are
the tools behind it (the local supervisor, Envoy rendering, benchmarks, workload, models,
traces). The serving processes themselves live in `services/` and `gateway/`.
"""

from importlib import metadata

try:
    __version__ = metadata.version("infermesh")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
