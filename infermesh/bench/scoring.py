"""Scoring throughput: items/s through gRPC (ModelInfer on a real scoring server) against
raw ONNX Runtime on the same model, thread count and batch sizes.

    infermesh models bench [--batch-sizes 1,64,256,1024] [--seconds 3] [--concurrency 4]

Raw: one InferenceSession with the server's per-instance options (intra-op threads),
called back to back. Through gRPC: a `python -m services.scoring` subprocess (or --target)
and `concurrency` grpc.aio clients in this process sending pre-built raw FP32 requests.
The report also gives the server's mean executed batch size over the run (ModelStatistics),
since its dynamic batcher may merge concurrent requests into larger executions, and the CPU
time per request of the client (this process) and of the server it started, over the
measured seconds. With --overhead the server runs a 64 -> 1 linear model with the same
input and output instead: what serving alone costs, per request, on this machine.
A command, not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from infermesh.bench.report import cpu_name, cpu_seconds
from infermesh.cli_help import CommandParser, whole_numbers
from infermesh.models.names import model_name
from infermesh.settings import model_repository
from infermesh.up.supervisor import free_port
from infermesh.workload import modelgen
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.runtime.event_loop import event_loop_runner
from services.scoring.loading import session_options
from services.scoring.providers import CUDA, IoBindingRunner, SessionRunner, create_session, plan_providers, runner_for
from services.scoring.service import PROVIDER_KEY, PROVIDER_REASON_KEY
from services.scoring.stats import load_nvml

DEFAULT_BATCH_SIZES = (1, 64, 256, 1024)
INPUT, OUTPUT, WIDTH = "features", "score", 64


@dataclass(frozen=True)
class Through:
    """One through-gRPC run of grpc_throughput."""

    grpc_items_per_s: float
    grpc_p50_ms: float
    grpc_p99_ms: float
    server_mean_batch: float
    # CPU time per gRPC request over the measured seconds; the server's only where this
    # command started it (None with --target).
    client_cpu_us: float
    server_cpu_us: float | None


@dataclass(frozen=True)
class Row(Through):
    """A batch size's report line: its gRPC run and raw ONNX Runtime on the same batch."""

    batch: int
    raw_items_per_s: float
    raw_us_per_call: float

    @property
    def ratio(self) -> float:
        return self.grpc_items_per_s / self.raw_items_per_s if self.raw_items_per_s else 0.0


def latest_model(repository: Path, model: str) -> Path | None:
    directory = repository / model
    versions = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit() and (p / "model.onnx").is_file())
    return directory / str(versions[-1]) / "model.onnx" if versions else None


def bench_repository(
    model_file: Path | None, model: str, max_batch: int, workdir: Path, data: bytes | None = None
) -> Path:
    """A one-model repository for the server under test: `data`, else the model file, else
    the reference MLP."""
    root = workdir / "models"
    if data is None:
        data = model_file.read_bytes() if model_file is not None else modelgen.mlp_model(0)
    modelgen.write_config(root, model, {"max_batch_size": max_batch, "warmup": [{"batch_size": min(256, max_batch)}]})
    modelgen.write_version(root, model, 1, data)
    return root


def raw_runner(model: bytes, threads: int, provider: str) -> SessionRunner | IoBindingRunner:
    """What one scoring instance runs, without the server: the same session options and, on
    CUDA, the same IO-binding runner (inputs copied to the GPU once, outputs read once)."""
    choice = create_session(
        model, plan_providers([provider], ort.get_available_providers(), False), session_options(threads)
    )
    if provider != "cpu" and choice.provider != CUDA:
        raise SystemExit(f"raw ONNX Runtime could not run on CUDA: {choice.reason}")
    return runner_for(choice, 0)


def raw_throughput(
    model: bytes, batch: int, seconds: float, threads: int, provider: str = "cpu"
) -> tuple[float, float]:
    run = raw_runner(model, threads, provider)
    rows = np.random.default_rng(0).standard_normal((batch, WIDTH)).astype(np.float32)
    feed = {INPUT: rows}
    for _ in range(10):
        run(feed)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        run(feed)
        calls += 1
    return calls * batch / elapsed, elapsed / calls * 1e6


async def grpc_throughput(
    target: str,
    model: str,
    batch: int,
    seconds: float,
    concurrency: int,
    streaming: bool = False,
    server_pid: int | None = None,
) -> Through:
    """ModelInfer calls with `concurrency` in flight, or, streaming, ModelStreamInfer with
    `concurrency` requests in flight on one stream; with the server's pid, its CPU time too."""
    rows = np.random.default_rng(0).standard_normal((batch, WIDTH)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=INPUT, datatype="FP32", shape=[batch, WIDTH])
    request.outputs.add(name=OUTPUT)
    request.raw_input_contents.append(rows.tobytes())
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    run = _stream_calls if streaming else _unary_calls
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await run(stub, request, concurrency, min(1.0, seconds / 3), [])  # warm: connections, batcher, caches
        before = await _counts(stub, model)
        latencies: list[float] = []
        server_before = cpu_seconds(server_pid) if server_pid is not None else 0.0
        client_before = time.process_time()
        started = time.perf_counter()
        calls = await run(stub, request, concurrency, seconds, latencies)
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_before
        server_cpu = cpu_seconds(server_pid) - server_before if server_pid is not None else None
        after = await _counts(stub, model)
    executions = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / executions if executions else 0.0
    if not calls:
        raise SystemExit(f"no request of {batch} rows was answered in {seconds} s")
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return Through(
        calls * batch / elapsed,
        float(p50),
        float(p99),
        mean_batch,
        client_cpu / calls * 1e6,
        server_cpu / calls * 1e6 if server_cpu is not None else None,
    )


async def _unary_calls(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    concurrency: int,
    seconds: float,
    latencies: list[float],
) -> int:
    stop_at = time.perf_counter() + seconds

    async def client() -> int:
        done = 0
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            await stub.ModelInfer(request, timeout=30)
            latencies.append(time.perf_counter() - began)
            done += 1
        return done

    return sum(await asyncio.gather(*(client() for _ in range(concurrency))))


async def _stream_calls(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    concurrency: int,
    seconds: float,
    latencies: list[float],
) -> int:
    """One stream; a new request goes out as each answer comes back (ids carry send times)."""
    stop_at = time.perf_counter() + seconds
    sent: dict[str, float] = {}
    slots = asyncio.Semaphore(concurrency)
    call = stub.ModelStreamInfer(timeout=seconds + 30)

    async def send() -> None:
        number = 0
        while time.perf_counter() < stop_at:
            await slots.acquire()
            request.id = str(number)
            sent[request.id] = time.perf_counter()
            await call.write(request)
            number += 1
        await call.done_writing()

    sender = asyncio.create_task(send())
    done = 0
    try:
        async for answer in call:
            if answer.error_message:
                raise SystemExit(f"stream request failed: {answer.error_message}")
            latencies.append(time.perf_counter() - sent.pop(answer.infer_response.id))
            done += 1
            slots.release()
        await sender
    finally:
        if not sender.done():
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    return done


async def _counts(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> tuple[int, int]:
    reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return (
        sum(s.inference_count for s in reply.model_stats),
        sum(s.execution_count for s in reply.model_stats),
    )


def start_server(
    repository: Path, threads: int, log_level: str, log: Path, provider: str = "cpu"
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "SCORING_PORT": str(port),
        "SCORING_MODEL_REPOSITORY": str(repository),
        "SCORING_MODEL_CONTROL_MODE": "none",
        "SCORING_PROVIDERS": provider,
        "SCORING_INTRA_OP_THREADS": str(threads),
        "SCORING_MAX_MESSAGE_BYTES": str(64 << 20),
        "OTEL_TRACES_EXPORTER": "none",
        "LOG_LEVEL": log_level,
    }
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "services.scoring"], env=env, stdout=sink, stderr=sink)
    return process, f"127.0.0.1:{port}"


def wait_ready(target: str, model: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < give_up:
            if process.poll() is not None:
                raise SystemExit(f"scoring server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"scoring server at {target} not ready after {timeout}s:\n{log.read_text()[-2000:]}")


async def serving_provider(target: str, model: str) -> tuple[str, str]:
    """(execution provider, why) of the model the server runs, from ModelMetadata."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
        await call
        trailing = dict(await call.trailing_metadata() or ())
    return str(trailing.get(PROVIDER_KEY, "unknown")), str(trailing.get(PROVIDER_REASON_KEY, ""))


def gpu_name() -> str:
    nvml = load_nvml()
    if nvml is None:
        return "GPU"
    try:
        name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:  # noqa: BLE001 (a name is only for the report)
        return "GPU"
    return name.decode() if isinstance(name, bytes) else str(name)


def machine() -> str:
    cpu = cpu_name(platform.processor() or platform.machine())
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, onnxruntime {ort.__version__}"


def format_table(rows: Sequence[Row]) -> str:
    lines = [
        f"{'batch':>6} {'raw items/s':>13} {'raw us/call':>12} {'gRPC items/s':>13} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'exec batch':>10} {'gRPC/raw':>9} {'CPU us/req client':>17} {'server':>7}"
    ]
    for r in rows:
        server = f"{r.server_cpu_us:>7.0f}" if r.server_cpu_us is not None else f"{'-':>7}"
        lines.append(
            f"{r.batch:>6} {r.raw_items_per_s:>13,.0f} {r.raw_us_per_call:>12.1f} {r.grpc_items_per_s:>13,.0f} "
            f"{r.grpc_p50_ms:>8.2f} {r.grpc_p99_ms:>8.2f} {r.server_mean_batch:>10.1f} {r.ratio:>8.0%} "
            f"{r.client_cpu_us:>17.0f} {server}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="infermesh models bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--repository",
        type=Path,
        default=Path(model_repository()),
        help="the model repository (default $SCORING_MODEL_REPOSITORY or .infermesh/models)",
    )
    p.add_argument(
        "--model",
        default="ranker",
        type=model_name,
        help="model name; its newest version is used (default %(default)s)",
    )
    p.add_argument(
        "--batch-sizes",
        type=whole_numbers(1),
        default=",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="comma-separated rows per call",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per batch size and mode")
    p.add_argument("--concurrency", type=int, default=4, help="gRPC requests in flight")
    p.add_argument(
        "--streaming", action="store_true", help="send over one ModelStreamInfer stream instead of ModelInfer calls"
    )
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (raw and server)")
    p.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="execution provider of raw ONNX Runtime and of the server (cuda: GPU 0, IO binding; default %(default)s)",
    )
    p.add_argument(
        "--overhead",
        action="store_true",
        help="serve a 64 -> 1 linear model with the reference model's input and output instead "
        "(almost no compute): what serving itself costs per request",
    )
    p.add_argument("--target", help="benchmark this running server (host:port) instead of starting one")
    p.add_argument(
        "--server-log-level", default="WARNING", help="LOG_LEVEL of the server started (default %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes: list[int] = args.batch_sizes
    if args.provider == "cuda" and CUDA not in ort.get_available_providers():
        raise SystemExit(
            f"--provider cuda needs onnxruntime-gpu on a host with an NVIDIA GPU (`pip install -e '.[gpu]'`); "
            f"this onnxruntime {ort.__version__} has {', '.join(ort.get_available_providers())}"
        )
    if args.overhead and args.target:
        raise SystemExit("--overhead starts its own server with the linear model; leave out --target")
    model_file = None if args.overhead else latest_model(args.repository, args.model)
    if model_file is None and not args.overhead:
        raise SystemExit(
            f"infermesh models bench: no model {args.model!r} with a <version>/model.onnx in {args.repository} "
            "(`infermesh seed` writes the reference one; --overhead needs none)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="scoring-bench-"))
    process = None
    try:
        repository = bench_repository(
            model_file, args.model, max(sizes), workdir, modelgen.linear_model(0) if args.overhead else None
        )
        model_bytes = (repository / args.model / "1" / "model.onnx").read_bytes()
        target = args.target
        if target is None:
            log = workdir / "scoring.log"
            process, target = start_server(repository, args.threads, args.server_log_level, log, args.provider)
            wait_ready(target, args.model, process, log)
        served_on, why = event_loop_runner()(serving_provider(target, args.model))
        if args.provider == "cuda" and served_on != CUDA:
            raise SystemExit(f"the scoring server runs {args.model} on {served_on}, not CUDA: {why}")
        rows = []
        for batch in sizes:
            raw, per_call = raw_throughput(model_bytes, batch, args.seconds, args.threads, args.provider)
            through = event_loop_runner()(
                grpc_throughput(
                    target,
                    args.model,
                    batch,
                    args.seconds,
                    args.concurrency,
                    args.streaming,
                    process.pid if process is not None else None,
                )
            )
            rows.append(Row(**vars(through), batch=batch, raw_items_per_s=raw, raw_us_per_call=per_call))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.overhead:
        source = "64 -> 1 linear model (--overhead: serving cost, almost no compute)"
    else:
        source = str(model_file) if model_file else "reference MLP architecture (untrained weights)"
    if args.json:
        print(
            json.dumps(
                {
                    "machine": machine(),
                    "provider": served_on,
                    "model": source,
                    "threads": args.threads,
                    "concurrency": args.concurrency,
                    "streaming": args.streaming,
                    "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
                },
                indent=2,
            )
        )
    else:
        print(f"machine: {machine()}" + (f"; {gpu_name()}" if args.provider == "cuda" else ""))
        print(f"server:  {served_on} ({why})")
        sending = (
            f"{args.concurrency} in flight on one ModelStreamInfer stream"
            if args.streaming
            else f"gRPC concurrency {args.concurrency}"
        )
        print(f"model:   {source}; {args.threads} intra-op thread(s); {sending}")
        print(format_table(rows))
    return 0
