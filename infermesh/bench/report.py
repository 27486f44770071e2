"""Bench output: JSON documents, a markdown table, and a latency-vs-rate plot."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def cpu_name(default: str = "unknown") -> str:
    """The CPU's model name from /proc/cpuinfo, or `default` where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def machine() -> dict[str, Any]:
    cpu = cpu_name()
    memory_gib = None
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory_gib = round(kib / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc); OSError where it cannot be read."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def latency_row(name: str, result: dict[str, Any]) -> str:
    lat = result.get("latency_ms", {})
    errors = sum(result.get("errors", {}).values()) + result.get("dropped", 0)

    def fmt(key: str) -> str:
        return f"{lat[key]:.2f}" if key in lat else "–"

    load = f"c={result['concurrency']}" if result.get("concurrency") else f"{result.get('offered_rps', 0):.0f}/s open"
    return (
        f"| {name} | {load} | {result['rps']:.0f} | {fmt('p50')} | {fmt('p90')} | {fmt('p99')} | "
        f"{fmt('p99.9')} | {fmt('max')} | {errors} |"
    )


TABLE_HEAD = (
    "| scenario | load | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def plot_ramps(path: Path, ramps: dict[str, list[dict[str, Any]]], slo_ms: float) -> None:
    """Latency percentiles against offered rate, one panel per ramped target."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ramps), figsize=(6 * len(ramps), 4.5), squeeze=False)
    for ax, (name, steps) in zip(axes[0], ramps.items(), strict=True):
        rates = [s["offered_rps"] for s in steps]
        for key, style in (("p50", "-o"), ("p90", "-s"), ("p99", "-^")):
            ax.plot(rates, [s["latency_ms"].get(key, float("nan")) for s in steps], style, label=key)
        ax.axhline(slo_ms, color="red", linestyle="--", linewidth=1, label=f"SLO p99 {slo_ms:g} ms")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (requests/s, open loop)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
