"""What the repository reports: RepositoryIndex rows and the server's readiness."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.scoring.live import LiveModels, ModelEntry
from services.scoring.models import READY, UNAVAILABLE, UNLOADING, ModelVersion


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


def repository_index(
    entries: Mapping[str, ModelEntry], names_on_disk: Iterable[str], ready_only: bool
) -> list[IndexEntry]:
    """A row per version of every model known or on disk; `ready_only`: ready versions only."""
    rows: list[IndexEntry] = []
    for name in sorted(set(entries) | set(names_on_disk)):
        entry = entries.get(name)
        if entry is None:
            rows.append(IndexEntry(name, "", "", ""))
        else:
            rows.extend(_entry_rows(entry, ready_only))
    return rows


def _entry_rows(entry: ModelEntry, ready_only: bool) -> list[IndexEntry]:
    name = entry.name
    rows = [
        IndexEntry(name, version.version, READY, _ready_reason(version)) for _, version in sorted(entry.serving.items())
    ]
    if ready_only:
        return rows
    rows += [
        IndexEntry(name, version.version, UNLOADING, "draining in-flight requests")
        for version in entry.retiring.values()
    ]
    rows += [
        IndexEntry(name, str(number), UNAVAILABLE, failure.reason)
        for number, failure in sorted(entry.failures.items())
        if number not in entry.serving
    ]
    if entry.config_error and not entry.evicted:
        rows.append(IndexEntry(name, "", UNAVAILABLE, entry.config_error))
    elif entry.evicted and not entry.serving:
        rows.append(IndexEntry(name, "", UNAVAILABLE, entry.evicted))
    elif not rows:
        state = UNAVAILABLE if entry.attempted or entry.unloaded else ""
        rows.append(IndexEntry(name, "", state, entry.missing_reason() if state else ""))
    return rows


def _ready_reason(version: ModelVersion) -> str:
    """Where it runs, and what its config asked for that this server ignores (config.pbtxt)."""
    reason = f"{version.provider}: {version.provider_reason}"
    warnings = version.config.warning_text()
    return f"{reason}; {warnings}" if warnings else reason


def server_readiness(live: LiveModels, repository_error: str) -> tuple[bool, str]:
    """Ready when every model that should serve has a ready version (strict, like Triton)."""
    if repository_error:
        return False, repository_error
    expected = [e for e in live.entries.values() if e.required]
    if not any(e.latest for e in expected):
        return False, "no model loaded" + (
            ": " + "; ".join(f"{e.name}{live.why_missing(e)}" for e in expected) if expected else ""
        )
    missing = [f"{e.name}{live.why_missing(e)}" for e in expected if e.latest is None]
    if missing:
        return False, "models without a ready version: " + "; ".join(missing)
    return True, f"{sum(len(e.serving) for e in expected)} model version(s) ready"
