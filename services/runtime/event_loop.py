"""Which asyncio event loop the mesh's processes run on (services, load generator, benches)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

EVENT_LOOPS = ("uvloop", "asyncio")


def event_loop_runner(environ: Mapping[str, str] | None = None) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """INFERMESH_EVENT_LOOP: `uvloop` (the default where it is installed) or `asyncio`.

    uvloop measured 4-6% less CPU per Recommend across the mesh at c=32 on the development
    VM (3 rounds in turns, docs/benchmarks.md); grpc.aio runs on either. The load generator and
    the monolith baseline use the same loop, so comparisons stay fair.
    """
    environ = os.environ if environ is None else environ
    choice = environ.get("INFERMESH_EVENT_LOOP", "").strip().lower()
    if choice not in ("", *EVENT_LOOPS):
        raise SystemExit(f"INFERMESH_EVENT_LOOP={choice!r}: use one of {', '.join(EVENT_LOOPS)}")
    if choice in ("", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("INFERMESH_EVENT_LOOP=uvloop but uvloop is not installed") from None
        else:
            return uvloop.run
    return asyncio.run
