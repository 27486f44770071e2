"""The reference ranker: a small MLP trained in numpy on the ground-truth affinity, exported to ONNX.

numpy only (no torch) keeps `infermesh seed` dependency-light; the network is small enough
that a few thousand Adam steps fit in seconds on two cores.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from infermesh.workload.catalog import DEFAULT_SEED, Catalog, affinity
from services.features.layout import MODEL_INPUT_DIM

MODEL_NAME = "ranker"
MODEL_VERSION = "1"
INPUT_NAME = "features"
OUTPUT_NAME = "score"

HIDDEN1 = 256
HIDDEN2 = 128
OPSET = 17
# IR 8 is the version that introduced opset 17; onnxruntime loads it (and older runtimes do too).
IR_VERSION = 8

DEFAULT_STEPS = 2000
DEFAULT_BATCH = 1024
_LR = 2e-3
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8
_F32 = np.float32


@dataclass(eq=False)
class MlpWeights:
    """64 -> 256 -> 128 -> 1; weights are stored [in, out] so forward is x @ w + b."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    def params(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2, self.w3, self.b3]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Scores in (0, 1), float32 [N, 1]; the same function the ONNX graph computes."""
        x = np.asarray(x, dtype=_F32)
        h1 = np.maximum(x @ self.w1 + self.b1, _F32(0))
        h2 = np.maximum(h1 @ self.w2 + self.b2, _F32(0))
        return _sigmoid(h2 @ self.w3 + self.b3)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Split by sign so exp never overflows for large |z|.
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = _F32(1) / (_F32(1) + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (_F32(1) + ez)
    return out


def _init_weights(rng: np.random.Generator) -> MlpWeights:
    def he(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out), dtype=_F32) * _F32(np.sqrt(2.0 / fan_in))).astype(_F32)

    return MlpWeights(
        w1=he(MODEL_INPUT_DIM, HIDDEN1),
        b1=np.zeros(HIDDEN1, _F32),
        w2=he(HIDDEN1, HIDDEN2),
        b2=np.zeros(HIDDEN2, _F32),
        w3=he(HIDDEN2, 1) * _F32(0.1),  # small last layer: start near p = 0.5
        b3=np.zeros(1, _F32),
    )


def _gradients(w: MlpWeights, x: np.ndarray, y: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Backprop of mean binary cross-entropy with soft labels y; returns (grads, loss)."""
    n = _F32(x.shape[0])
    a1 = x @ w.w1 + w.b1
    h1 = np.maximum(a1, _F32(0))
    a2 = h1 @ w.w2 + w.b2
    h2 = np.maximum(a2, _F32(0))
    logit = h2 @ w.w3 + w.b3
    p = _sigmoid(logit)
    eps = _F32(1e-7)
    loss = -float(np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))

    d_logit = (p - y) / n  # d(BCE)/d(logit) for a sigmoid output
    g_w3 = h2.T @ d_logit
    g_b3 = d_logit.sum(axis=0)
    d_a2 = (d_logit @ w.w3.T) * (a2 > 0)
    g_w2 = h1.T @ d_a2
    g_b2 = d_a2.sum(axis=0)
    d_a1 = (d_a2 @ w.w2.T) * (a1 > 0)
    g_w1 = x.T @ d_a1
    g_b1 = d_a1.sum(axis=0)
    return [g_w1, g_b1, g_w2, g_b2, g_w3, g_b3], loss


def train_mlp(
    catalog: Catalog,
    seed: int = DEFAULT_SEED,
    steps: int = DEFAULT_STEPS,
    batch: int = DEFAULT_BATCH,
    *,
    progress: bool = False,
) -> MlpWeights:
    """Adam on fresh random (user, item) pairs each step, labelled with the true affinity.

    Sampling candidates uniformly matches how the ranker is used (200 random candidates), and
    fresh pairs every step mean no overfitting to a fixed training set. Deterministic from seed.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    w = _init_weights(rng)
    params = w.params()
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    x = np.empty((batch, MODEL_INPUT_DIM), _F32)
    dim = catalog.user_vecs.shape[1]

    bar = tqdm(range(1, steps + 1), desc="training ranker", unit="step", disable=not progress)
    for t in bar:
        users = catalog.user_vecs[rng.integers(0, catalog.n_users, batch)]
        items = catalog.item_vecs[rng.integers(0, catalog.n_items, batch)]
        x[:, :dim] = users
        x[:, dim:] = items
        y = affinity(users, items)[:, None]
        grads, loss = _gradients(w, x, y)

        # Cosine decay: large steps early, fine convergence at the end.
        lr = _F32(_LR * 0.5 * (1.0 + np.cos(np.pi * (t - 1) / steps)))
        c1 = _F32(1.0 - _BETA1**t)
        c2 = _F32(1.0 - _BETA2**t)
        for p, g, mi, vi in zip(params, grads, m, v, strict=False):
            mi *= _F32(_BETA1)
            mi += _F32(1 - _BETA1) * g
            vi *= _F32(_BETA2)
            vi += _F32(1 - _BETA2) * (g * g)
            p -= lr * (mi / c1) / (np.sqrt(vi / c2) + _F32(_EPS))  # in place: params alias w's arrays
        if progress and t % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")
    return w


def build_onnx(weights: MlpWeights) -> onnx.ModelProto:
    """Gemm/Relu/Gemm/Relu/Gemm/Sigmoid with a dynamic batch dimension."""
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(a, dtype=_F32), name)
        for name, a in zip(("w1", "b1", "w2", "b2", "w3", "b3"), weights.params(), strict=False)
    ]
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "w1", "b1"], ["a1"], name="fc1"),
        helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["a2"], name="fc2"),
        helper.make_node("Relu", ["a2"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["logit"], name="fc3"),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        MODEL_NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", MODEL_INPUT_DIM])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="infermesh",
        model_version=int(MODEL_VERSION),
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(weights: MlpWeights, path: Path) -> None:
    """Write the model atomically; identical weights give identical bytes (no timestamps)."""
    atomic_write_bytes(Path(path), build_onnx(weights).SerializeToString(deterministic=True))


def write_if_changed(path: Path, data: bytes) -> None:
    """atomic_write_bytes unless the file already holds `data`: unchanged files keep their
    mtime, so a polling scoring server sees nothing to reload."""
    if not path.is_file() or path.read_bytes() != data:
        atomic_write_bytes(path, data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same directory + os.replace, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes 0600; model servers may run as another user and must read it.
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
