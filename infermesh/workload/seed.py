"""Materialize the reference workload: the ranker model on disk and the feature records in Redis.

Also builds the candidate-retrieval index over the item vectors (FAISS), beside the model.
Idempotent: the model is retrained only when its sidecar says it came from another seed or
catalog, and Redis is reloaded only when the namespace's meta document does not match.
Run as `python -m infermesh.workload.seed` (wired as `infermesh seed`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis
from tqdm import tqdm

from infermesh.cli_help import CommandParser, whole_number
from infermesh.settings import LOCAL_REDIS_URL, add_data_dir_argument, tools_redis_target, tools_redis_url
from infermesh.workload.catalog import (
    DEFAULT_SEED,
    N_CATEGORIES,
    N_ITEMS,
    N_USERS,
    SEEN_PER_USER,
    Catalog,
    generate_catalog,
    seen_items,
)
from infermesh.workload.model import (
    DEFAULT_BATCH,
    DEFAULT_STEPS,
    INPUT_NAME,
    MODEL_NAME,
    MODEL_VERSION,
    OUTPUT_NAME,
    atomic_write_bytes,
    export_onnx,
    train_mlp,
    write_if_changed,
)
from infermesh.workload.modelgen import write_provenance
from services.features.layout import (
    DEFAULT_NAMESPACE,
    FEATURE_DIM,
    ITEM_RECORD,
    MODEL_INPUT_DIM,
    USER_RECORD,
    item_key,
    meta_key,
    user_key,
)
from services.ranking.layout import seen_key
from services.runtime.redis_connection import RedisTarget, redact_url  # noqa: F401 (redact_url: re-exported)
from services.runtime.redis_keys import LOCAL_REDIS_PORT
from services.runtime.settings import SettingsError
from services.scoring.drift import ensure_drift_reference

MSET_CHUNK = 5_000  # keys per MSET: ~0.7 MB per command for items, well under Redis limits
CHUNKS_PER_FLUSH = 4  # MSETs queued per pipeline round trip
SEEN_USERS_PER_FLUSH = 1_000  # users' seen sets (one DEL, then SADD each) per pipeline round trip
MAX_BATCH_SIZE = 4096
# Bump when training changes in a way that should invalidate models already on disk.
TRAINER_VERSION = 1


class SeedError(RuntimeError):
    """Seeding cannot proceed (e.g. Redis unreachable); the message says what to do."""


# ---------------------------------------------------------------------------- model files


def model_repository(data_dir: Path) -> Path:
    """Root of the Triton-like model repository: <repo>/<model>/<version>/model.onnx."""
    return Path(data_dir) / "models"


def model_path(data_dir: Path) -> Path:
    return model_repository(data_dir) / MODEL_NAME / MODEL_VERSION / "model.onnx"


def _sidecar_path(data_dir: Path) -> Path:
    return model_path(data_dir).parent / "trained.json"


def _config_path(data_dir: Path) -> Path:
    return model_repository(data_dir) / MODEL_NAME / "config.json"


def model_config() -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, MODEL_INPUT_DIM]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, 1]}],
        "max_batch_size": MAX_BATCH_SIZE,
    }


def _json_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _training_spec(catalog: Catalog, steps: int) -> dict[str, Any]:
    """What the model on disk must have been trained from to be reusable."""
    return {
        "trainer_version": TRAINER_VERSION,
        "seed": catalog.seed,
        "n_users": catalog.n_users,
        "n_items": catalog.n_items,
        "n_categories": catalog.n_categories,
        "steps": steps,
        "batch": DEFAULT_BATCH,
    }


def _provenance(spec: dict[str, Any]) -> dict[str, str]:
    """The reference model's provenance (served by ModelMetadata / ModelConfig). Its training
    data is generated from the spec alone, so the spec's digest identifies the data."""
    return {
        "owner": "infermesh reference workload",
        "training_data_digest": "sha256:" + hashlib.sha256(_json_bytes(spec)).hexdigest(),
        "training_data": "synthetic catalogue and interactions generated from the training spec",
        "source_revision": f"infermesh/workload/model.py trainer {TRAINER_VERSION}",
    }


def _model_is_current(data_dir: Path, spec: dict[str, Any]) -> bool:
    path, sidecar = model_path(data_dir), _sidecar_path(data_dir)
    if not path.is_file() or not sidecar.is_file():
        return False
    try:
        recorded = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    # The hash catches a model file replaced or truncated behind the sidecar's back.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return recorded.get("spec") == spec and recorded.get("sha256") == digest


def _ensure_model(
    data_dir: Path,
    catalog: Catalog,
    *,
    steps: int,
    force: bool,
    progress: bool,
) -> tuple[Path, bool]:
    """Returns (model path, whether it was (re)trained now)."""
    path = model_path(data_dir)
    spec = _training_spec(catalog, steps)
    trained = False
    if force or not _model_is_current(data_dir, spec):
        weights = train_mlp(catalog, seed=catalog.seed, steps=steps, batch=DEFAULT_BATCH, progress=progress)
        export_onnx(weights, path)
        # Sidecar after the model: a sidecar that matches always describes a complete model.
        sidecar = {"spec": spec, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        atomic_write_bytes(_sidecar_path(data_dir), _json_bytes(sidecar))
        trained = True
    write_if_changed(_config_path(data_dir), _json_bytes(model_config()))
    write_provenance(path.parent, _provenance(spec))
    # Reference histograms for the scoring service's drift monitor, beside the model.
    ensure_drift_reference(path, catalog)
    return path, trained


def ensure_model(
    data_dir: Path,
    seed: int = DEFAULT_SEED,
    catalog: Catalog | None = None,
    progress: bool = True,
    *,
    steps: int = DEFAULT_STEPS,
    force: bool = False,
) -> Path:
    """Train and export the ranker unless an up-to-date one is already on disk; returns its path."""
    if catalog is None:
        catalog = generate_catalog(seed)
    elif catalog.seed != seed:
        raise ValueError(f"catalog was generated from seed {catalog.seed}, not {seed}")
    path, _ = _ensure_model(Path(data_dir), catalog, steps=steps, force=force, progress=progress)
    return path


# ---------------------------------------------------------------------------- candidate index


def index_path(data_dir: Path) -> Path:
    """The candidate-retrieval index the features service loads (FEATURES_INDEX_PATH)."""
    return Path(data_dir) / "index" / "items.npz"


def _index_spec(catalog: Catalog) -> dict[str, Any]:
    return {
        "source": "reference-catalog",
        "seed": catalog.seed,
        "n_items": catalog.n_items,
        "n_categories": catalog.n_categories,
    }


def _ensure_index(data_dir: Path, catalog: Catalog, *, force: bool) -> tuple[Path, bool]:
    """Build the item-vector ANN index unless an up-to-date one is on disk; (path, built now)."""
    from services.features.retrieval import CandidateIndex, read_spec  # FAISS loads only here

    path = index_path(data_dir)
    spec = _index_spec(catalog)
    recorded = read_spec(path) if path.is_file() else None
    if not force and recorded is not None and {k: recorded.get(k) for k in spec} == spec:
        return path, False
    CandidateIndex.build(catalog.item_vecs, catalog.item_ids, spec).save(path)
    return path, True


# ---------------------------------------------------------------------------- redis


def user_records(catalog: Catalog) -> np.ndarray:
    records = np.empty(catalog.n_users, dtype=USER_RECORD)
    records["vec"] = catalog.user_vecs
    return records


def item_records(catalog: Catalog) -> np.ndarray:
    records = np.empty(catalog.n_items, dtype=ITEM_RECORD)
    records["vec"] = catalog.item_vecs
    records["category"] = catalog.item_category
    records["price"] = catalog.item_price
    return records


def _queue_records(
    pipe: redis.client.Pipeline,
    keys: Sequence[str],
    records: np.ndarray,
    bar: tqdm,
) -> None:
    """MSET the records in chunks, one pipeline round trip every CHUNKS_PER_FLUSH chunks."""
    size = records.dtype.itemsize
    queued = 0
    for start in range(0, len(keys), MSET_CHUNK):
        end = min(start + MSET_CHUNK, len(keys))
        # One tobytes per chunk, then cheap slices: no per-record numpy calls.
        buf = records[start:end].tobytes()
        values = [buf[j : j + size] for j in range(0, len(buf), size)]
        pipe.mset(dict(zip(keys[start:end], values, strict=False)))
        queued += end - start
        if len(pipe) >= CHUNKS_PER_FLUSH:
            pipe.execute()
            bar.update(queued)
            queued = 0
    if len(pipe):
        pipe.execute()
    bar.update(queued)


def _queue_seen_sets(
    pipe: redis.client.Pipeline,
    catalog: Catalog,
    namespace: str,
    per_user: int,
    bar: tqdm,
) -> None:
    """Replace every user's seen set (ranking's seen filter), SEEN_USERS_PER_FLUSH users per
    pipeline round trip."""
    item_ids = np.asarray(catalog.item_ids, dtype=object)
    rows = item_ids[seen_items(catalog.seed, catalog.n_users, catalog.n_items, per_user)].tolist()
    for start in range(0, catalog.n_users, SEEN_USERS_PER_FLUSH):
        end = min(start + SEEN_USERS_PER_FLUSH, catalog.n_users)
        keys = [seen_key(namespace, user_id) for user_id in catalog.user_ids[start:end]]
        pipe.delete(*keys)  # a reload replaces the sets, never merges into old ones
        for key, members in zip(keys, rows[start:end], strict=False):
            pipe.sadd(key, *members)
        pipe.execute()
        bar.update(end - start)


def _meta_document(catalog: Catalog, seen_per_user: int = 0) -> dict[str, Any]:
    return {
        "seed": catalog.seed,
        "n_users": catalog.n_users,
        "n_items": catalog.n_items,
        "n_categories": catalog.n_categories,
        "feature_dim": FEATURE_DIM,
        "model": MODEL_NAME,
        "seen_per_user": seen_per_user,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def load_into_redis(
    client: redis.Redis,
    catalog: Catalog,
    namespace: str = DEFAULT_NAMESPACE,
    progress: bool = True,
    *,
    seen_per_user: int = 0,
) -> int:
    """Write every user and item record, then the meta document; returns keys written (incl. meta).

    With `seen_per_user`, also each user's seen-items set (`<namespace>:seen:<user>`, not
    counted in the return value), before the meta document like the records.
    """
    # Drop meta first so a reload that dies half-way is not mistaken for a complete catalog.
    client.delete(meta_key(namespace))
    user_keys = [user_key(namespace, uid) for uid in catalog.user_ids]
    item_keys = [item_key(namespace, iid) for iid in catalog.item_ids]
    total = len(user_keys) + len(item_keys)
    with tqdm(total=total, desc="loading redis", unit="key", unit_scale=True, disable=not progress) as bar:
        pipe = client.pipeline(transaction=False)
        _queue_records(pipe, user_keys, user_records(catalog), bar)
        _queue_records(pipe, item_keys, item_records(catalog), bar)
    if seen_per_user > 0:
        with tqdm(total=catalog.n_users, desc="seen sets", unit="user", disable=not progress) as bar:
            _queue_seen_sets(client.pipeline(transaction=False), catalog, namespace, seen_per_user, bar)
    client.set(meta_key(namespace), json.dumps(_meta_document(catalog, seen_per_user)))
    return total + 1


def read_meta(client: redis.Redis, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any] | None:
    raw = client.get(meta_key(namespace))
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def is_seeded(
    client: redis.Redis,
    namespace: str = DEFAULT_NAMESPACE,
    seed: int = DEFAULT_SEED,
    *,
    n_users: int = N_USERS,
    n_items: int = N_ITEMS,
    n_categories: int = N_CATEGORIES,
    seen_per_user: int = 0,
) -> bool:
    """Meta matches the seed and sizes, and the first and last records are really there."""
    meta = read_meta(client, namespace)
    expected = {
        "seed": seed,
        "n_users": n_users,
        "n_items": n_items,
        "n_categories": n_categories,
        "feature_dim": FEATURE_DIM,
    }
    if meta is None or any(meta.get(k) != v for k, v in expected.items()):
        return False
    # Metas written before seen sets existed have no field: they hold none.
    if meta.get("seen_per_user", 0) != seen_per_user:
        return False
    # Cheap guard against keys evicted or deleted after the meta was written.
    probes = {
        user_key(namespace, "u0"),
        user_key(namespace, f"u{n_users - 1}"),
        item_key(namespace, "i0"),
        item_key(namespace, f"i{n_items - 1}"),
    }
    if seen_per_user > 0:
        probes |= {seen_key(namespace, "u0"), seen_key(namespace, f"u{n_users - 1}")}
    return client.exists(*probes) == len(probes)


# ---------------------------------------------------------------------------- orchestration


def _connect(target: RedisTarget) -> redis.Redis:
    shown = target.shown
    try:
        client = target.client(socket_connect_timeout=5, socket_timeout=60)
        client.ping()
    except ValueError as exc:
        raise SeedError(f"invalid Redis URL {shown!r}: {exc}") from None
    except redis.exceptions.AuthenticationError as exc:  # before ConnectionError, its base
        raise SeedError(str(target.refused(exc))) from None
    except redis.exceptions.NoPermissionError as exc:
        raise SeedError(str(target.forbidden(exc))) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise SeedError(
            f"cannot connect to Redis at {shown}: {exc}\n"
            f"Start a server, e.g. `redis-server --port {LOCAL_REDIS_PORT} --save '' --appendonly no`, "
            "or point --redis-url / REDIS_URL at a running one."
        ) from None
    return client


def seed_all(
    data_dir: Path,
    redis_url: str | RedisTarget,
    namespace: str = DEFAULT_NAMESPACE,
    seed: int = DEFAULT_SEED,
    force: bool = False,
    progress: bool = True,
    *,
    n_users: int = N_USERS,
    n_items: int = N_ITEMS,
    n_categories: int = N_CATEGORIES,
    train_steps: int = DEFAULT_STEPS,
    seen_per_user: int = SEEN_PER_USER,
) -> dict[str, Any]:
    """Make sure the model file and the Redis namespace both hold the workload for `seed`.

    `force` retrains the model and reloads Redis even when they look current. Redis also
    gets each user's seen-items set (`seen_per_user` items; 0: none) for ranking.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    # Connect first: fail in milliseconds rather than after training the model.
    target = RedisTarget.of(redis_url)
    client = _connect(target)
    shown = target.shown

    t0 = time.perf_counter()
    catalog = generate_catalog(seed, n_users, n_items, n_categories)
    catalog_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    path, trained = _ensure_model(data_dir, catalog, steps=train_steps, force=force, progress=progress)
    model_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    index_file, index_built = _ensure_index(data_dir, catalog, force=force)
    index_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    keys_written = 0
    try:
        seeded = is_seeded(
            client,
            namespace,
            seed,
            n_users=n_users,
            n_items=n_items,
            n_categories=n_categories,
            seen_per_user=seen_per_user,
        )
        if force or not seeded:
            keys_written = load_into_redis(client, catalog, namespace, progress=progress, seen_per_user=seen_per_user)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise SeedError(f"lost the connection to Redis at {shown} while loading: {exc}") from exc
    finally:
        client.close()
    load_seconds = time.perf_counter() - t0

    return {
        "seed": seed,
        "namespace": namespace,
        "redis_url": shown,
        "data_dir": str(data_dir),
        "model_path": str(path),
        "n_users": catalog.n_users,
        "n_items": catalog.n_items,
        "n_categories": catalog.n_categories,
        "model_trained": trained,
        "index_path": str(index_file),
        "index_built": index_built,
        "redis_loaded": keys_written > 0,
        "keys_written": keys_written,
        "seen_sets_written": catalog.n_users if keys_written and seen_per_user > 0 else 0,
        "catalog_seconds": round(catalog_seconds, 3),
        "model_seconds": round(model_seconds, 3),
        "index_seconds": round(index_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
    }


def format_summary(summary: dict[str, Any]) -> str:
    model_state = "trained" if summary["model_trained"] else "up to date"
    if summary["redis_loaded"]:
        redis_state = f"loaded {summary['keys_written']:,} keys"
        if summary.get("seen_sets_written"):
            redis_state += f" and {summary['seen_sets_written']:,} seen-items sets"
    else:
        redis_state = "already seeded"
    return "\n".join(
        [
            f"seed {summary['seed']}: {summary['n_users']:,} users, {summary['n_items']:,} items, "
            f"{summary['n_categories']} categories (generated in {summary['catalog_seconds']:.2f}s)",
            f"model  {summary['model_path']}: {model_state} ({summary['model_seconds']:.2f}s)",
            f"index  {summary['index_path']}: {'built' if summary['index_built'] else 'up to date'} "
            f"({summary['index_seconds']:.2f}s)",
            f"redis  {summary['redis_url']} namespace {summary['namespace']!r}: "
            f"{redis_state} ({summary['load_seconds']:.2f}s)",
            f"done in {summary['total_seconds']:.2f}s",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="infermesh seed",
        description="Generate the reference catalog, train/export the ranker and load features into Redis.",
    )
    add_data_dir_argument(p, "where models/ is written")
    p.add_argument(
        "--redis-url",
        default=tools_redis_url(),
        help=f"Redis to load (default: $INFERMESH_REDIS_URL, $REDIS_URL or {LOCAL_REDIS_URL})",
    )
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="key prefix (default: %(default)s)")
    p.add_argument(
        "--seed", type=whole_number(0), default=DEFAULT_SEED, help="catalog/model seed (default: %(default)s)"
    )
    p.add_argument("--force", action="store_true", help="retrain and reload even if already current")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir.exists() and not args.data_dir.is_dir():  # before minutes of training, not after
        print(f"infermesh seed: --data-dir {args.data_dir} is a file, not a directory", file=sys.stderr)
        return 1
    try:
        summary = seed_all(
            args.data_dir,
            tools_redis_target(args.redis_url, args.data_dir),
            namespace=args.namespace,
            seed=args.seed,
            force=args.force,
            progress=not args.no_progress,
        )
    except (SeedError, SettingsError) as exc:
        print(f"infermesh seed: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
