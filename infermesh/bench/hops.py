"""Where one hop's time goes, on a running local mesh: `python -m infermesh.bench.hops`.

For the features and scoring stages, each at concurrency 1 with the reference request
(1 user + 200 items; the 200 x 64 FP32 rows those return), it times the same call three
ways and reads the replica's own handling time from its /metrics:

* handler      grpc_server_handling_seconds of the replica: our interceptor + servicer
* direct       a grpc.aio client straight to the replica: + gRPC (HTTP/2, protobuf, event
               loop wake-ups) on both sides
* via Envoy    the same client to the stage's Envoy listener, as the gateway calls it

and, for comparison, the bare floor of `python -m infermesh.bench.rpc_floor` with the same
payload sizes (a server that does nothing). Defaults fit `infermesh up` (replica 0 of each
service, metrics on its port + 1000).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np

from infermesh.bench.targets import reference_requests
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc
from services.genproto.infermesh.features.v1 import features_pb2, features_pb2_grpc
from services.runtime.topology import DEFAULT_INTERNAL_PORTS, DEFAULT_REPLICA_BASE_PORTS, FEATURES, SCORING

METRICS_OFFSET = 1000


def handling(metrics_port: int, method: str) -> tuple[float, float]:
    """(seconds, calls) of grpc_server_handling_seconds for one method, from /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("grpc_method") != method:
                continue
            if sample.name == "grpc_server_handling_seconds_sum":
                total += sample.value
            elif sample.name == "grpc_server_handling_seconds_count":
                count += sample.value
    return total, count


async def timed(call: Callable[[int], Awaitable[Any]], calls: int, warmup: int) -> float:
    """p50 in ms of `calls` sequential calls after `warmup` unmeasured ones."""
    for n in range(warmup):
        await call(n)
    latencies = np.empty(calls)
    for n in range(calls):
        started = time.perf_counter()
        await call(n)
        latencies[n] = time.perf_counter() - started
    return float(np.median(latencies) * 1000.0)


async def measure_stage(
    name: str,
    method: str,
    replica: int,
    listener: int,
    make: Callable[[grpc.aio.Channel], Callable[[int], Awaitable[Any]]],
    calls: int,
    warmup: int,
) -> dict[str, float]:
    row: dict[str, float] = {}
    for label, port in (("direct", replica), ("via Envoy", listener)):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            before = handling(replica + METRICS_OFFSET, method)
            row[label] = await timed(make(channel), calls, warmup)
            after = handling(replica + METRICS_OFFSET, method)
        if label == "direct":
            served = after[1] - before[1]
            row["handler"] = 1000.0 * (after[0] - before[0]) / served if served else float("nan")
    return row


def features_call(requests: list[dict[str, Any]]) -> Callable[[grpc.aio.Channel], Callable[[int], Awaitable[Any]]]:
    def make(channel: grpc.aio.Channel) -> Callable[[int], Awaitable[Any]]:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        messages = [
            features_pb2.GetFeaturesRequest(user_id=r["user_id"], item_ids=r["candidate_ids"]) for r in requests
        ]
        return lambda n: stub.GetFeatures(messages[n % len(messages)], timeout=5)

    return make


def scoring_call(rows: bytes) -> Callable[[grpc.aio.Channel], Callable[[int], Awaitable[Any]]]:
    request = inference_pb2.ModelInferRequest(model_name="ranker")
    request.inputs.add(name="features", datatype="FP32", shape=[200, 64])
    request.outputs.add(name="score")
    request.raw_input_contents.append(rows)

    def make(channel: grpc.aio.Channel) -> Callable[[int], Awaitable[Any]]:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        return lambda n: stub.ModelInfer(request, timeout=5)

    return make


async def run(calls: int, warmup: int) -> dict[str, dict[str, float]]:
    requests = reference_requests(200)
    features = DEFAULT_REPLICA_BASE_PORTS[FEATURES], DEFAULT_INTERNAL_PORTS[FEATURES]
    scoring = DEFAULT_REPLICA_BASE_PORTS[SCORING], DEFAULT_INTERNAL_PORTS[SCORING]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{features[0]}") as channel:
        first = requests[0]
        reply = await features_pb2_grpc.FeatureServiceStub(channel).GetFeatures(
            features_pb2.GetFeaturesRequest(user_id=first["user_id"], item_ids=first["candidate_ids"]), timeout=5
        )
    return {
        "features GetFeatures": await measure_stage(
            FEATURES, "GetFeatures", *features, features_call(requests), calls, warmup
        ),
        "scoring ModelInfer": await measure_stage(
            SCORING, "ModelInfer", *scoring, scoring_call(reply.model_input.data), calls, warmup
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infermesh.bench.hops", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="measured calls per row (default 1000)")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.calls, args.warmup))
    print("| stage | handler mean ms | direct p50 ms | via Envoy p50 ms | gRPC + our framework ms | Envoy ms |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['handler']:.3f} | {row['direct']:.3f} | {row['via Envoy']:.3f} | "
            f"{row['direct'] - row['handler']:.3f} | {row['via Envoy'] - row['direct']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
