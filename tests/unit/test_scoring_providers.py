"""Execution provider choice and the TensorRT -> CUDA -> CPU fallback (pure logic, fakes for sessions)."""

from __future__ import annotations

from typing import get_args

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from infermesh.workload import modelgen
from services.scoring.providers import (
    ALIASES,
    CPU,
    CUDA,
    TENSORRT,
    IoBindingRunner,
    ProviderAlias,
    ProviderPlan,
    SessionRunner,
    create_session,
    plan_providers,
    runner_for,
)
from services.scoring.stats import GpuMemoryCollector

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_BUILD = ["AzureExecutionProvider", "CPUExecutionProvider"]


def test_every_provider_setting_value_has_a_chain() -> None:
    # SCORING_PROVIDERS validates against ProviderAlias; plan_providers expands through ALIASES.
    assert get_args(ProviderAlias) == tuple(ALIASES)


def test_auto_on_a_full_gpu_host_prefers_tensorrt() -> None:
    assert plan_providers(["auto"], GPU_BUILD, tensorrt_libraries=True) == ProviderPlan((TENSORRT, CUDA, CPU), ())


def test_tensorrt_without_its_libraries_is_skipped_with_a_reason() -> None:
    plan = plan_providers(["auto"], GPU_BUILD, tensorrt_libraries=False)
    assert plan.chain == (CUDA, CPU)
    assert plan.notes == ("TensorrtExecutionProvider skipped: TensorRT libraries (libnvinfer) not found",)


def test_cpu_only_build() -> None:
    assert plan_providers(["auto"], CPU_BUILD, False) == ProviderPlan(
        (CPU,), ("no GPU provider in this onnxruntime build",)
    )
    assert plan_providers(["cpu"], GPU_BUILD, True) == ProviderPlan((CPU,), ("CPU requested",))
    cuda = plan_providers(["cuda"], CPU_BUILD, False)
    assert cuda.chain == (CPU,) and cuda.notes == ("CUDAExecutionProvider is not in this onnxruntime build",)


def test_config_lists_combine_in_order() -> None:
    assert plan_providers(["cuda", "tensorrt"], GPU_BUILD, True).chain == (CUDA, TENSORRT, CPU)


def test_unknown_provider_name() -> None:
    with pytest.raises(ValueError, match="unknown execution provider 'gpu'"):
        plan_providers(["gpu"], GPU_BUILD, True)


class FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers

    def get_outputs(self) -> list[object]:
        return []


class FakeFactory:
    """Fails for the providers in `broken`; records every attempt's provider list."""

    def __init__(self, broken: set[str], runs_on: str | None = None) -> None:
        self.broken = broken
        self.runs_on = runs_on
        self.attempts: list[list[str]] = []

    def __call__(self, model: bytes, sess_options: object, providers: list[tuple[str, dict]]) -> FakeSession:
        names = [name for name, _ in providers]
        self.attempts.append(names)
        if names[0] in self.broken:
            raise RuntimeError(f"{names[0]}: libnvinfer.so.10: cannot open shared object file\nmore detail")
        return FakeSession([self.runs_on or names[0], *names[1:]])


def test_tensorrt_failure_falls_back_to_cuda_and_says_so() -> None:
    factory = FakeFactory(broken={TENSORRT})
    with capture_logs() as logs:
        choice = create_session(b"model", ProviderPlan((TENSORRT, CUDA, CPU), ()), None, 0, factory)
    assert factory.attempts == [[TENSORRT, CUDA, CPU], [CUDA, CPU]]
    assert choice.provider == CUDA
    assert choice.reason == (
        "TensorrtExecutionProvider failed: TensorrtExecutionProvider: libnvinfer.so.10: cannot open shared object file"
    )
    assert [(e["event"], e["provider"], e["next"]) for e in logs] == [
        ("execution provider failed; falling back", TENSORRT, CUDA)
    ]


def test_tensorrt_and_cuda_failing_end_on_cpu() -> None:
    factory = FakeFactory(broken={TENSORRT, CUDA})
    choice = create_session(b"model", ProviderPlan((TENSORRT, CUDA, CPU), ()), None, 0, factory)
    assert choice.provider == CPU and factory.attempts[-1] == [CPU]
    assert "TensorrtExecutionProvider failed" in choice.reason and "CUDAExecutionProvider failed" in choice.reason


def test_a_silent_fallback_inside_onnxruntime_is_reported() -> None:
    choice = create_session(b"model", ProviderPlan((CUDA, CPU), ()), None, 0, FakeFactory(set(), runs_on=CPU))
    assert choice.provider == CPU
    assert choice.reason == "CUDAExecutionProvider requested but onnxruntime runs on CPUExecutionProvider"


def test_a_model_cpu_cannot_load_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        create_session(b"model", ProviderPlan((CPU,), ()), None, 0, FakeFactory({CPU}))


def test_runner_follows_the_provider() -> None:
    gpu = create_session(b"m", ProviderPlan((CUDA, CPU), ()), None, 0, FakeFactory(set()))
    cpu = create_session(b"m", ProviderPlan((CPU,), ()), None, 0, FakeFactory(set()))
    assert isinstance(runner_for(gpu, 0), IoBindingRunner) and runner_for(gpu, 0).io_binding
    assert isinstance(runner_for(cpu, 0), SessionRunner)


def test_io_binding_runner_gives_the_same_outputs_as_run() -> None:
    # The binding path on the CPU device: same code the GPU host runs with device "cuda".
    session = ort.InferenceSession(modelgen.mlp_model(3), providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(0).standard_normal((17, 64)).astype(np.float32)
    bound = IoBindingRunner(session, "cpu", 0)({"features": rows})
    assert np.array_equal(bound[0], session.run(None, {"features": rows})[0])


class FakeNvml:
    """NVML's calls as pynvml exposes them, for one GPU."""

    class Memory:
        used, total = 3 * 2**30, 80 * 2**30

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return b"GPU-1234"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> FakeNvml.Memory:
        return FakeNvml.Memory()


def test_gpu_memory_gauges_come_from_nvml() -> None:
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(FakeNvml()))
    assert registry.get_sample_value("nv_gpu_memory_used_bytes", {"gpu_uuid": "GPU-1234"}) == 3 * 2**30
    assert registry.get_sample_value("nv_gpu_memory_total_bytes", {"gpu_uuid": "GPU-1234"}) == 80 * 2**30
