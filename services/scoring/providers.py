"""Execution providers: which to ask ONNX Runtime for, and the fallback TensorRT -> CUDA -> CPU.

Two steps, both logged and both reported with the model (ModelMetadata trailing metadata,
RepositoryIndex reason, ModelStatistics memory_usage, the model info metric):
1. plan: drop providers this onnxruntime build lacks, or whose libraries are absent
   (the TensorRT provider is listed by onnxruntime-gpu even where libnvinfer is missing);
2. create: try the session with the plan's first provider; if that fails, try the next.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from services.runtime.logs import get_logger

log = get_logger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
FALLBACK_ORDER: tuple[str, ...] = (TENSORRT, CUDA, CPU)
# The names ALIASES expands, as a type (for settings); a unit test holds the two equal.
ProviderAlias = Literal["auto", "tensorrt", "cuda", "cpu"]
ALIASES: dict[str, tuple[str, ...]] = {
    "auto": FALLBACK_ORDER,
    "tensorrt": (TENSORRT, CUDA, CPU),
    "cuda": (CUDA, CPU),
    "cpu": (CPU,),
}
GPU_PROVIDERS = frozenset((TENSORRT, CUDA))


@dataclass(frozen=True)
class ProviderPlan:
    chain: tuple[str, ...]  # preference order; CPU always last
    notes: tuple[str, ...]  # why a preferred provider was left out


def tensorrt_libraries_present() -> bool:
    """TensorRT's runtime must be installed for onnxruntime's TensorRT provider: system-wide
    (libnvinfer on the loader path) or as the Python wheels that onnxruntime can preload."""
    if ctypes.util.find_library("nvinfer") is not None:
        return True
    return any(importlib.util.find_spec(name) is not None for name in ("tensorrt_libs", "tensorrt"))


def plan_providers(requested: Sequence[str], available: Sequence[str], tensorrt_libraries: bool) -> ProviderPlan:
    """Pure: the chain to try for `requested` (names from ALIASES, in preference order)."""
    wanted: list[tuple[str, bool]] = []
    for name in requested:
        try:
            expansion = ALIASES[name]
        except KeyError:
            raise ValueError(f"unknown execution provider {name!r}; use one of {sorted(ALIASES)}") from None
        wanted.extend((provider, name != "auto") for provider in expansion)
    chain: list[str] = []
    notes: list[str] = []
    for provider, explicit in wanted:
        if provider == CPU or provider in chain:
            continue
        if provider not in available:
            note = f"{provider} is not in this onnxruntime build"
            if explicit and note not in notes:
                notes.append(note)
            continue
        if provider == TENSORRT and not tensorrt_libraries:
            note = f"{TENSORRT} skipped: TensorRT libraries (libnvinfer) not found"
            if note not in notes:
                notes.append(note)
            continue
        chain.append(provider)
    chain.append(CPU)
    if chain == [CPU] and not notes:
        notes.append(
            "CPU requested" if all(n == "cpu" for n in requested) else "no GPU provider in this onnxruntime build"
        )
    return ProviderPlan(tuple(chain), tuple(notes))


def provider_options(provider: str, device_id: int) -> dict[str, Any]:
    if provider == CUDA:
        return {"device_id": device_id}
    if provider == TENSORRT:
        return {"device_id": device_id, "trt_engine_cache_enable": False}
    return {}


@dataclass(frozen=True)
class SessionChoice:
    session: Any  # ort.InferenceSession (or a test double)
    provider: str  # the provider the session actually runs on first
    reason: str


SessionFactory = Callable[..., Any]


def create_session(
    model: str | bytes,
    plan: ProviderPlan,
    options: ort.SessionOptions | None,
    device_id: int = 0,
    factory: SessionFactory = ort.InferenceSession,
) -> SessionChoice:
    """Walk the plan's chain until a session loads; raise the CPU attempt's error if none does."""
    notes = list(plan.notes)
    for index, provider in enumerate(plan.chain):
        remaining = plan.chain[index:]
        providers = [(p, provider_options(p, device_id)) for p in remaining]
        try:
            session = factory(model, sess_options=options, providers=providers)
        except Exception as error:
            if provider == CPU:
                raise
            notes.append(f"{provider} failed: {_first_line(error)}")
            log.warning(
                "execution provider failed; falling back", provider=provider, next=remaining[1], error=str(error)
            )
            continue
        actual = session.get_providers()[0]
        if actual != provider:
            # onnxruntime may drop a provider silently (e.g. missing CUDA libraries): say so.
            notes.append(f"{provider} requested but onnxruntime runs on {actual}")
        reason = "; ".join(notes) if notes else f"{actual} was the first choice"
        return SessionChoice(session, actual, reason)
    raise AssertionError("the plan always ends with CPU")  # pragma: no cover


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


class SessionRunner:
    """Plain session.run: right for CPU, where inputs are already in host memory."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.io_binding = False

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, inputs)


class IoBindingRunner:
    """GPU execution with IO binding: each input copied to the device once, outputs read once.

    Outputs stay on `device` until copy_outputs_to_cpu, so onnxruntime does not stage them
    through extra host buffers per node.
    """

    def __init__(self, session: Any, device: str, device_id: int) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self.output_names = [o.name for o in session.get_outputs()]
        self.io_binding = True

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def runner_for(choice: SessionChoice, device_id: int) -> SessionRunner | IoBindingRunner:
    if choice.provider in GPU_PROVIDERS:
        return IoBindingRunner(choice.session, "cuda", device_id)
    return SessionRunner(choice.session)
