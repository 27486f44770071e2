"""`python -m infermesh.envoy render|check`: see infermesh.envoy.cli."""

from infermesh.envoy.cli import main

raise SystemExit(main(prog="python -m infermesh.envoy"))
