"""glibc malloc thresholds for a process that handles tensors of tens to hundreds of KiB.

With glibc's defaults a scoring replica under load returned the memory of its coalesced
inputs (~1,000 rows: 256 KiB) to the kernel after each batch and faulted it back in for the
next: 13-17 page faults per Recommend at c=32. With fixed thresholds: 0.3-1.4, and the
scoring replicas' CPU per Recommend 5-12% lower against the gateway's in the same round
(docs/benchmarks.md, "Round 2, fifth pass").

glibc's own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_,
GLIBC_TUNABLES with glibc.malloc.*) win: where one is set, nothing is changed. Other C libraries: nothing to do.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping

# Requests up to this size come from the heap instead of a fresh mmap each time.
MMAP_THRESHOLD_BYTES = 4 << 20
# The heap keeps up to this much free memory at its top instead of shrinking after a free.
TRIM_THRESHOLD_BYTES = 32 << 20

# mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_tuned(environ: Mapping[str, str]) -> bool:
    """Whether the environment already tunes glibc malloc's thresholds."""
    return any(environ.get(name) for name in _GLIBC_VARIABLES) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def tune_allocator(environ: Mapping[str, str] | None = None) -> bool:
    """Set the thresholds above in this process; True where they were set."""
    environ = os.environ if environ is None else environ
    if user_tuned(environ):
        return False
    mallopt = _glibc_mallopt()
    # mallopt returns 1 on success.
    return mallopt is not None and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    try:
        # The process's own symbols, libc's among them: no library search (find_library runs
        # ldconfig in a subprocess, ~3.5 ms, and the load generator calls this for every run).
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and others have no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
