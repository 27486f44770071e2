"""The "Try it" command `infermesh up` prints must work when pasted into bash: run through
bash here (its quoting, the real `seq`), its -d body is the reference request as JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from infermesh.cli import _print_ready
from services.runtime.topology import local_topology


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("seq") is None, reason="needs bash and seq")
def test_the_printed_curl_body_is_the_reference_request_once_bash_has_read_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    topology = local_topology(descriptor_set=Path("/nonexistent/descriptor.binpb"))
    _print_ready(topology, Path("/tmp/logs"), "redis://127.0.0.1:6379/0")
    printed = capsys.readouterr().out
    command = next(line.strip() for line in printed.splitlines() if line.strip().startswith("curl "))
    body = re.search(r' -d (".*")$', command)
    assert body is not None, command
    # What curl would receive: bash expands the double-quoted argument as the user's shell would.
    expanded = subprocess.run(["bash", "-c", f"printf %s {body.group(1)}"], capture_output=True, text=True, check=True)
    request = json.loads(expanded.stdout)
    assert request["user_id"] == "u42" and request["k"] == 20
    assert request["candidate_ids"] == [f"i{n}" for n in range(200)]
