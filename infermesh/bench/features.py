"""`infermesh features bench`: GetFeatures latency and throughput, cache hot and cold, and
candidate retrieval latency and recall.

GetFeatures is measured through a real features server process (gRPC, the service's own
code path) against Redis holding the reference catalog: "cold" runs it with the local cache
off (every request is one Redis MGET of 1 user + 200 items), "hot" with the cache on and
warmed (no Redis read at all). It also times the store in-process, without gRPC.
Without --redis-url it starts a throwaway redis-server and loads the catalog into it; with
it, the Redis is opened with INFERMESH_REDIS_USERNAME, _PASSWORD and _TLS_* (or the password
`infermesh up` keeps in its data dir), and so is the features server it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infermesh.cli_help import CommandParser, RawDescriptionDefaultsHelpFormatter
from infermesh.settings import redis_env
from infermesh.workload.catalog import N_ITEMS, N_USERS, generate_catalog
from services.features.layout import DEFAULT_NAMESPACE
from services.runtime.event_loop import event_loop_runner
from services.runtime.redis_connection import RedisTarget
from services.runtime.settings import SettingsError


@dataclass(frozen=True)
class Result:
    case: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    per_second: float

    def line(self) -> str:
        return (
            f"{self.case:<28} c={self.concurrency:<3} {self.requests:>7,} req  p50 {self.p50_ms:7.3f} ms  "
            f"p90 {self.p90_ms:7.3f} ms  p99 {self.p99_ms:7.3f} ms  {self.per_second:>9,.0f}/s"
        )


def requests(count: int, entities: int, seed: int = 1) -> list[tuple[str, list[str]]]:
    rng = np.random.default_rng(seed)
    return [
        (f"u{rng.integers(N_USERS)}", [f"i{i}" for i in rng.choice(N_ITEMS, entities, replace=False)])
        for _ in range(count)
    ]


async def drive(
    call: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float, limit: int
) -> tuple[list[float], float]:
    """Run `call` from `concurrency` workers for `seconds` (at most `limit` calls); latencies in s."""
    latencies: list[float] = []
    counter = iter(range(limit))
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        for n in counter:
            if time.perf_counter() >= stop:
                return
            started = time.perf_counter()
            await call(n)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def summarize(case: str, concurrency: int, latencies: list[float], elapsed: float) -> Result:
    ms = np.asarray(latencies) * 1000.0
    return Result(
        case=case,
        concurrency=concurrency,
        requests=len(ms),
        seconds=round(elapsed, 3),
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        per_second=len(ms) / elapsed,
    )


# ------------------------------------------------------------------------------ GetFeatures


def _start_server(
    redis: RedisTarget, namespace: str, cache_bytes: int, port: int, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **redis_env("FEATURES", redis),  # in its environment, never on its command line
        "FEATURES_PORT": str(port),
        "FEATURES_NAMESPACE": namespace,
        "FEATURES_CACHE_MAX_BYTES": str(cache_bytes),
        "OTEL_TRACES_EXPORTER": "none",
        "LOG_LEVEL": "WARNING",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.features"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_serving(address: str, timeout: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"features server at {address} did not become SERVING")


async def _grpc_case(
    address: str, case: str, reqs: list[tuple[str, list[str]]], concurrencies: list[int], seconds: float, warm: bool
) -> list[Result]:
    import grpc

    from services.genproto.infermesh.features.v1 import features_pb2, features_pb2_grpc

    channel = grpc.aio.insecure_channel(address)
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    messages = [features_pb2.GetFeaturesRequest(user_id=u, item_ids=items) for u, items in reqs]

    async def call(n: int) -> Any:
        return await stub.GetFeatures(messages[n % len(messages)], timeout=10)

    if warm:
        for n in range(len(messages)):
            await call(n)
    results = []
    for c in concurrencies:
        await drive(call, c, 0.3, 10_000)  # settle connections
        latencies, elapsed = await drive(call, c, seconds, 1_000_000)
        results.append(summarize(case, c, latencies, elapsed))
    await channel.close()
    return results


def bench_grpc(
    redis: RedisTarget, namespace: str, entities: int, concurrencies: list[int], seconds: float, workdir: Path
) -> list[Result]:
    from infermesh.up.supervisor import free_port

    results: list[Result] = []
    hot_set = requests(64, entities)
    cold_set = requests(2_000, entities, seed=2)
    for case, cache_bytes, reqs, warm in (
        ("grpc cold (cache off)", 0, cold_set, False),
        ("grpc hot (cache warm)", 256 * 1024 * 1024, hot_set, True),
    ):
        port = free_port()
        server = _start_server(redis, namespace, cache_bytes, port, workdir / "features-bench.log")
        try:
            _wait_serving(f"127.0.0.1:{port}")
            results += event_loop_runner()(_grpc_case(f"127.0.0.1:{port}", case, reqs, concurrencies, seconds, warm))
        finally:
            server.terminate()
            server.wait(timeout=15)
    return results


def bench_store(redis: RedisTarget, namespace: str, entities: int, seconds: float) -> list[Result]:
    """The store alone, in this process: what a request costs before gRPC."""
    from services.features.cache import LocalCache
    from services.features.store import FeatureStore
    from services.runtime.breaker import CircuitBreaker

    async def run() -> list[Result]:
        client = redis.async_client()
        out = []
        for case, cache, reqs in (
            ("store cold (cache off)", LocalCache(0, 0.0), requests(2_000, entities, seed=2)),
            ("store hot (cache warm)", LocalCache(256 * 1024 * 1024, 300.0), requests(64, entities)),
        ):
            store = FeatureStore(client, namespace, 1000, cache=cache, breaker=CircuitBreaker())
            await store.refresh()
            for user, items in reqs:
                await store.get(user, items)

            async def call(n: int, store: FeatureStore = store, reqs: list = reqs) -> Any:
                user, items = reqs[n % len(reqs)]
                return await store.get(user, items)

            latencies, elapsed = await drive(call, 1, seconds, 1_000_000)
            out.append(summarize(case, 1, latencies, elapsed))
        await client.aclose()
        return out

    return event_loop_runner()(run())


# ------------------------------------------------------------------------------ retrieval


def bench_retrieval(queries: int = 1_000, count: int = 100) -> dict[str, Any]:
    from services.features.retrieval import CandidateIndex, exact_top, recall_at

    catalog = generate_catalog()
    started = time.perf_counter()
    index = CandidateIndex.build(catalog.item_vecs, catalog.item_ids)
    build_seconds = time.perf_counter() - started
    import faiss

    faiss.omp_set_num_threads(1)
    users = catalog.user_vecs[:queries]
    ann, exact = [], []
    for vector in users:
        t0 = time.perf_counter()
        index.search(vector, count)
        t1 = time.perf_counter()
        exact_top(catalog.item_vecs, vector, count)
        exact.append(time.perf_counter() - t1)
        ann.append(t1 - t0)
    return {
        "index": index.spec,
        "build_seconds": round(build_seconds, 3),
        "queries": len(users),
        f"recall_at_{count}": round(recall_at(index, catalog.item_vecs, users, count), 4),
        "ann_p50_ms": round(float(np.percentile(ann, 50)) * 1000, 4),
        "ann_p99_ms": round(float(np.percentile(ann, 99)) * 1000, 4),
        "exact_numpy_p50_ms": round(float(np.percentile(exact, 50)) * 1000, 4),
        "exact_numpy_p99_ms": round(float(np.percentile(exact, 99)) * 1000, 4),
    }


# ------------------------------------------------------------------------------ command


def _own_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    from infermesh.up.supervisor import free_port, start_redis
    from infermesh.workload.seed import load_into_redis

    port = free_port()
    process = start_redis(workdir, port, workdir / "logs", persist=False)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    print("loading the reference catalog into a throwaway redis-server ...", flush=True)
    load_into_redis(client, generate_catalog(), DEFAULT_NAMESPACE, progress=False)
    client.close()
    return process, url


def _given_redis(url: str) -> RedisTarget:
    """--redis-url with the tools' credentials, checked: refused ones end the run in one line."""
    from infermesh.settings import tools_redis_target

    try:
        target = tools_redis_target(url)
        target.check()
    except SettingsError as error:
        raise SystemExit(f"infermesh features bench: {error}") from None
    return target


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="infermesh features bench", description=__doc__, formatter_class=RawDescriptionDefaultsHelpFormatter
    )
    p.add_argument("--redis-url", help="a Redis seeded with the reference catalog (default: start one)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="key prefix of the catalog in --redis-url")
    p.add_argument("--entities", type=int, default=200, help="items per request (default %(default)s)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated client concurrencies (default %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="per measured case (default %(default)s)")
    p.add_argument("--skip-grpc", action="store_true", help="only the in-process store and retrieval")
    p.add_argument("--skip-retrieval", action="store_true", help="no candidate retrieval (ANN) cases")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    print(f"machine: {os.cpu_count()} cores; {args.entities} entities per request", flush=True)
    with tempfile.TemporaryDirectory(prefix="features-bench-") as tmp:
        workdir = Path(tmp)
        redis_process = None
        try:
            if args.redis_url is None:
                redis_process, url = _own_redis(workdir)
                target = RedisTarget(url)
            else:
                target = _given_redis(args.redis_url)
            results = bench_store(target, args.namespace, args.entities, args.seconds)
            for r in results:
                print(r.line(), flush=True)
            if not args.skip_grpc:
                for r in bench_grpc(target, args.namespace, args.entities, concurrencies, args.seconds, workdir):
                    print(r.line(), flush=True)
                    results.append(r)
        finally:
            if redis_process is not None:
                redis_process.terminate()
                redis_process.wait(timeout=10)
    retrieval = None
    if not args.skip_retrieval:
        retrieval = bench_retrieval()
        print("retrieval: " + json.dumps(retrieval), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"getfeatures": [asdict(r) for r in results], "retrieval": retrieval}, indent=2)
        )
    return 0
