"""Warm-up: the configured requests every instance of a version answers before it takes traffic.

A version whose warm-up fails (the model raises, or returns outputs that cannot be split
into a batch's rows) fails to load, as a broken file would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.scoring.batcher import Instance
from services.scoring.config import ModelConfig, TensorSpec, WarmupSpec
from services.scoring.models import ModelLoadError
from services.scoring.tensors import BYTES, DTYPES


def warmup_shape(tensor: TensorSpec, batch_size: int) -> list[int]:
    """A warmup request's shape for `tensor`: variable dimensions run as 1, and the batch size
    fills a variable first dimension (ModelConfig reports the same)."""
    shape = [d if d >= 0 else 1 for d in tensor.shape]
    if shape and tensor.shape[0] == -1:
        shape[0] = batch_size
    return shape


def warmup_inputs(inputs: Sequence[TensorSpec], spec: WarmupSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in inputs:
        shape = warmup_shape(tensor, spec.batch_size)
        if tensor.datatype == BYTES:
            arrays[tensor.name] = np.full(shape, "", dtype=object)
        elif spec.data == "random":
            arrays[tensor.name] = rng.random(shape).astype(DTYPES[tensor.datatype])
        else:
            arrays[tensor.name] = np.zeros(shape, DTYPES[tensor.datatype])
    return arrays


def warm_up(config: ModelConfig, inputs: Sequence[TensorSpec], instances: Sequence[Instance]) -> None:
    """Run every warmup request on every instance; ModelLoadError on the first that fails."""
    for number, spec in enumerate(config.warmup):
        arrays = warmup_inputs(inputs, spec, seed=number)
        for instance in instances:
            try:
                results = instance.runner(arrays)
            except Exception as error:
                raise ModelLoadError(f"warmup request {number} (batch {spec.batch_size}) failed: {error}") from None
            if config.batching.max_batch_size and any(r.shape[:1] != (spec.batch_size,) for r in results):
                raise ModelLoadError(
                    f"warmup request {number}: outputs {[r.shape for r in results]} lack the batch's "
                    f"{spec.batch_size} rows first"
                )
