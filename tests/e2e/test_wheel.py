"""The wheel alone runs the mesh: built from this checkout, installed into a fresh virtual
environment, `infermesh up` started from a directory outside the checkout seeds its data,
serves a Recommend, and SIGTERM stops every process it started."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from infermesh.up.supervisor import MODULES, WORKER_MODULE, free_port, free_port_block
from tests.processes import alive, descendants, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
# What the build reads: the project's metadata (README.md is its readme) and its packages.
BUILD_INPUTS = ("pyproject.toml", "README.md", "services", "gateway", "infermesh")
CANDIDATES = [f"i{n}" for n in range(200)]


def build_wheel(workdir: Path) -> Path:
    """From a copy of the sources: setuptools keeps a build/ folder in the source tree and
    would pack into the wheel whatever an earlier build left there."""
    source = workdir / "source"
    source.mkdir(parents=True)
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = workdir / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(source)],
        cwd=workdir, check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("infermesh-*.whl")
    return wheel


def suite_versions(path: Path) -> Path:
    """Constraints pinning every distribution of the suite's own environment: the fresh one
    gets the versions the rest of the suite runs with, so a failure here is the wheel's."""
    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()  # as pip compares names
        if name and name != "infermesh":
            pins.setdefault(name, f"{name}=={dist.version}")  # first on sys.path wins, as for imports
    path.write_text("\n".join(sorted(pins.values())) + "\n")
    return path


def fresh_env(venv: Path) -> dict[str, str]:
    """This environment less what would lead a child to the checkout, the suite's Python,
    its Redis or its data; the fresh venv's scripts first on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "OTEL_", "INFERMESH_")) and key not in ("VIRTUAL_ENV", "REDIS_URL")
    }
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    return env


def output_of(argv: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 60) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def command_line(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def recommend(edge: int) -> dict[str, Any]:
    body = json.dumps({"user_id": "u42", "candidate_ids": CANDIDATES, "k": 10}).encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{edge}/v1/recommend", data=body, timeout=10) as response:
        return json.loads(response.read())


def model_ranked_answer(edge: int, attempts: int = 20) -> dict[str, Any]:
    """A Recommend the model scored. On a busy machine the first requests after start-up may
    outrun the gateway's deadline budget and come back degraded (fallback scores)."""
    for _ in range(attempts):
        answer = recommend(edge)
        items = answer["items"]
        assert len(items) == 10, answer
        scores = [item["score"] for item in items]
        assert scores == sorted(scores, reverse=True), answer
        assert {item["item_id"] for item in items} <= set(CANDIDATES), answer
        if not answer["degraded"]:
            return answer
        time.sleep(0.5)
    raise AssertionError(f"every answer degraded, the last: {answer}")


def print_logs(data_dir: Path) -> None:
    """The mesh's logs, which pytest shows when the test fails."""
    for log in sorted((data_dir / "logs").glob("*.log")):
        print(f"---- {log.name}", *log.read_text(errors="replace").splitlines()[-20:], sep="\n")


def test_wheel_installs_and_serves_outside_the_checkout(tmp_path: Path) -> None:
    assert not tmp_path.resolve().is_relative_to(ROOT), "the run must happen outside the checkout"
    wheel = build_wheel(tmp_path / "build")
    version = wheel.name.split("-")[1]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = fresh_env(venv)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    constraints = suite_versions(tmp_path / "constraints.txt")
    output_of([python, "-m", "pip", "install", "--quiet", "-c", constraints, wheel], run_dir, env, timeout=600)

    # Everything comes from the venv's site-packages, nothing from the checkout.
    show_origins = "import gateway, infermesh, services; print(gateway.__file__, infermesh.__file__, services.__file__)"
    origins = output_of([python, "-c", show_origins], run_dir, env)
    assert all(Path(path).is_relative_to(venv) for path in origins.split()), origins
    assert output_of([venv / "bin" / "infermesh", "--version"], run_dir, env) == f"infermesh {version}"
    assert output_of([python, "-m", "infermesh", "--version"], run_dir, env) == f"infermesh {version}"

    edge = free_port()
    process = subprocess.Popen(
        [
            venv / "bin" / "infermesh", "up",
            "--edge-port", str(edge),
            "--admin-port", str(free_port()),
            "--redis-port", str(free_port()),  # a redis-server of its own, seeded by `up`
            "--port-base", str(free_port_block(1600)),  # replicas from N+100 (jobs N+500), metrics 1000 above
            "--replicas", "scoring=1",
            "--timeout", "90",
        ],
        cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    data_dir = run_dir / ".infermesh"  # the default data dir, under the current directory
    try:
        wait_until_up(process, output, timeout=150)
        assert model_ranked_answer(edge)["model_name"] == "ranker"
        # Envoy serves it from the package data beside the descriptor set.
        with urllib.request.urlopen(f"http://127.0.0.1:{edge}/v1/openapi.json", timeout=10) as response:
            assert "/v1/recommend" in json.loads(response.read())["paths"]

        started = {pid: command_line(pid) for pid in descendants(process.pid)}
        services = {argv[2]: pid for pid, argv in started.items() if argv[1:2] == ["-m"]}
        assert set(services) == {*MODULES.values(), WORKER_MODULE}, started  # every service and a jobs worker
        for module, pid in services.items():
            assert started[pid][0].startswith(str(venv)), (module, started[pid])
            assert Path(f"/proc/{pid}/cwd").resolve() == data_dir.resolve(), module
        assert any(Path(argv[0]).name == "envoy" for argv in started.values()), started
        assert any("redis-server" in argv[0] for argv in started.values()), started
        assert (data_dir / "models" / "ranker" / "1" / "model.onnx").is_file()

        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        output.append(rest)
        assert process.returncode == 0, "".join(output)
        assert "stopped." in rest
        leftovers = {pid: argv for pid, argv in started.items() if alive(pid)}
        assert not leftovers, f"processes left behind: {leftovers}"
    except BaseException:
        print_logs(data_dir)
        raise
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
