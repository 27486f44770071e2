"""Run a scoring server inside the current event loop: for tests and embedding.

The real server (services.runtime.server.serve: health, reflection, interceptors), real
ONNX Runtime; stopped through serve()'s own stop event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from infermesh.up.supervisor import free_port
from services.runtime.server import serve
from services.scoring.service import ScoringService, ScoringSettings


def server_settings(repository: Path, **overrides: Any) -> ScoringSettings:
    """Settings for a server on a free port, quick to notice readiness and to stop."""
    base: dict[str, Any] = {
        "port": free_port(),
        "model_repository": str(repository),
        "providers": "cpu",
        "readiness_interval_seconds": 0.05,
        "grace_seconds": 5.0,
        "repository_poll_seconds": 0.1,
    }
    return ScoringSettings(**(base | overrides))


@asynccontextmanager
async def running_scoring(settings: ScoringSettings) -> AsyncIterator[ScoringService]:
    service = ScoringService(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(service, settings, stop))
    started = asyncio.create_task(service.started.wait())
    try:
        done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # serve() failed before the models loaded: raise its error here
        yield service
    finally:
        started.cancel()
        stop.set()
        await task
