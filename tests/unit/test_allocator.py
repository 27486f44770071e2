"""glibc malloc thresholds (services/runtime/allocator.py): the user's own variables win,
and where set they keep buffers of a few hundred KiB in the heap (page faults counted in a
fresh process each, so this test process's allocator is never changed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.runtime.allocator import tune_allocator, user_tuned

# Buffers from 200 KiB to 3 MiB, allocated and freed in turns, as coalesced tensors are.
CHURN = """
import json, resource, sys
from services.runtime.allocator import tune_allocator
tuned = tune_allocator({}) if sys.argv[1] == "tune" else False
sizes = [(200 << 10) + ((i * 37) << 10) % (3 << 20) for i in range(200)]
for n in sizes[:20]:
    b = bytearray(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for n in sizes:
    b = bytearray(n); c = bytearray(n // 3); del b, c
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(sizes)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def churn(mode: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_TRIM_THRESHOLD_": "1048576"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TOP_PAD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
    ],
)
def test_the_users_own_malloc_variables_win(environ: dict[str, str]) -> None:
    assert user_tuned(environ)
    assert tune_allocator(environ) is False


def test_unrelated_variables_do_not_count_as_tuning() -> None:
    assert not user_tuned({"GLIBC_TUNABLES": "glibc.rtld.nns=2", "MALLOC_TRIM_THRESHOLD_": ""})


def test_tuned_thresholds_keep_large_buffers_in_the_heap() -> None:
    tuned = churn("tune")
    if not tuned["tuned"]:
        pytest.skip("not glibc: its malloc thresholds do not apply")
    assert isinstance(tuned["faults"], float)
    # Measured 2.5 faults per round tuned, 175 with glibc's defaults (the default run is only
    # context for a failure: with transparent huge pages always on, it faults far less).
    assert tuned["faults"] < 10, (tuned, churn("default"))
