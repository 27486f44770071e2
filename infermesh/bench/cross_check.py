"""`infermesh bench` against independent clients: `python -m infermesh.bench.cross_check`.

A load generator written in Python shares the machine with the mesh and may add its own
latency, so its numbers need a second opinion. This loads a running mesh's edge, in turns
at each concurrency, with four clients sending the same reference requests:

* `infermesh bench --target rest` and wrk (C, HTTP/1.1 keep-alive, the REST route),
* `infermesh bench --target grpc` and h2load (C, nghttp2's HTTP/2 client, the gRPC route:
  one connection with `concurrency` streams, as the project's client uses one channel),
* with --monolith-data-dir, the in-process monolith beside them (`infermesh bench --target
  monolith --processes 2`, as the suite's baseline), for ratios read in one run.

wrk cycles through the same 1,000 reference requests as `infermesh bench`; h2load sends
one of them again and again (it takes one body). h2load cannot read gRPC trailers, so a
gRPC error would look like an HTTP 200 with no data: the requests answered are the data
bytes h2load received over those of the real answer (fetched once first), and the table
counts the rest as failed. Closed loop only; wrk's and h2load's
percentiles are of the time from sending to the whole answer, as `infermesh bench`'s are.

Needs wrk and h2load on PATH (Debian/Ubuntu: `apt-get install wrk nghttp2-client`) and a
running mesh (`infermesh up`). A benchmark, not a test: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from infermesh.bench import report
from infermesh.bench.targets import reference_requests
from infermesh.cli_help import CommandParser, number, whole_number, whole_numbers

RECOMMEND_PATH = "/infermesh.gateway.v1.GatewayService/Recommend"
ROUTES = {"grpc": "gRPC", "rest": "REST", "monolith": "monolith, 2 processes"}


@dataclass
class Row:
    client: str
    route: str
    concurrency: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    failed: int


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed), as it travels in a DATA frame."""
    return b"\0" + struct.pack(">I", len(message)) + message


def write_inputs(folder: Path, requests: list[dict]) -> tuple[Path, Path]:
    """The wrk script cycling through `requests` as JSON, and h2load's body: the first one
    as a gRPC frame. (lua script, gRPC body)"""
    from services.genproto.infermesh.gateway.v1 import gateway_pb2

    bodies = folder / "bodies.jsonl"
    bodies.write_text("".join(json.dumps(r) + "\n" for r in requests))
    script = folder / "post.lua"
    script.write_text(
        "local bodies = {}\n"
        f"for line in io.lines({json.dumps(str(bodies))}) do bodies[#bodies + 1] = line end\n"
        "local i = 0\n"
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        "  return wrk.format(nil, nil, nil, bodies[i])\n"
        "end\n"
    )
    first = requests[0]
    message = gateway_pb2.RecommendRequest(user_id=first["user_id"], candidate_ids=first["candidate_ids"], k=first["k"])
    body = folder / "recommend.grpc"
    body.write_bytes(grpc_frame(message.SerializeToString()))
    return script, body


def answer_bytes(address: str, body: Path) -> int:
    """The data bytes of the edge's answer to h2load's body (a gRPC frame), called once."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(RECOMMEND_PATH, request_serializer=None, response_deserializer=None)
        answer = call(body.read_bytes()[5:], timeout=10.0)
    return len(grpc_frame(answer))


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(output: str, concurrency: int) -> Row:
    """wrk --latency's report."""
    percentiles = {p: _ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.M)}
    requests = int(re.search(r"^\s+(\d+) requests in", output, re.M).group(1))  # type: ignore[union-attr]
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Row(
        client="wrk",
        route="REST",
        concurrency=concurrency,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        requests=requests,
        failed=(int(failed.group(1)) if failed else 0) + (sum(map(int, errors.groups())) if errors else 0),
    )


def parse_h2load(output: str, log: str, concurrency: int, answer: int) -> Row:
    """h2load's report and its --log-file (start us, HTTP status, duration us per request).
    `answer`: the data bytes of one real answer; fewer per request means some failed."""
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", output)
    succeeded = int(done.group(3))  # type: ignore[union-attr]
    data = int(re.search(r"traffic: .*?\((\d+)\) data", output).group(1))  # type: ignore[union-attr]
    # Failed calls carry no DATA; answered ones the same bytes each (one body, one answer).
    answered = min(succeeded, round(data / answer)) if answer else succeeded
    rows = [line.split() for line in log.splitlines() if line.strip()]
    durations_ms = np.array([int(r[2]) / 1000 for r in rows if r[1] == "200"]) if rows else np.zeros(0)
    return Row(
        client="h2load",
        route="gRPC",
        concurrency=concurrency,
        rps=float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output).group(1)),  # type: ignore[union-attr]
        p50_ms=float(np.percentile(durations_ms, 50)) if len(durations_ms) else None,
        p99_ms=float(np.percentile(durations_ms, 99)) if len(durations_ms) else None,
        requests=int(done.group(2)),  # type: ignore[union-attr]
        failed=int(done.group(2)) - answered,  # type: ignore[union-attr]
    )


def _run(command: list[str], timeout: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def run_wrk(url: str, script: Path, concurrency: int, seconds: float, warmup: float) -> Row:
    base = ["wrk", "-t1", f"-c{concurrency}", "--latency", "-s", str(script)]
    _run([*base, f"-d{warmup:g}s", url], warmup + 30)  # the warm-up: its report is dropped
    return parse_wrk(_run([*base, f"-d{seconds:g}s", url], seconds + 30), concurrency)


def run_h2load(
    address: str, body: Path, answer: int, concurrency: int, seconds: float, warmup: float, folder: Path
) -> Row:
    log = folder / "h2load.log"
    log.unlink(missing_ok=True)
    output = _run(
        [
            "h2load", "-c1", f"-m{concurrency}", f"-D{seconds:g}", f"--warm-up-time={warmup:g}",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-d", str(body), f"--log-file={log}", f"http://{address}{RECOMMEND_PATH}",
        ],
        seconds + warmup + 30,
    )  # fmt: skip
    return parse_h2load(output, log.read_text() if log.exists() else "", concurrency, answer)


def run_own(target: str, where: list[str], concurrency: int, seconds: float, warmup: float, folder: Path) -> Row:
    """`infermesh bench --target <target> <where...>` as a user runs it, in its own process."""
    out = folder / "own.json"
    _run(
        [
            sys.executable, "-m", "infermesh.cli", "bench", "--target", target, *where, "--mode", "closed",
            "--concurrency", str(concurrency), "--duration", f"{seconds:g}", "--warmup", f"{warmup:g}",
            "--out", str(out), "--no-progress",
        ],
        seconds + warmup + 60,
    )  # fmt: skip
    result = json.loads(out.read_text())["result"]
    return Row(
        client="infermesh bench",
        route=ROUTES[target],
        concurrency=concurrency,
        rps=result["rps"],
        p50_ms=result["latency_ms"].get("p50"),
        p99_ms=result["latency_ms"].get("p99"),
        requests=result["requests"],
        failed=result["requests"] - result["ok"],
    )


def table(rows: list[Row]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "| client | route | c | req/s | p50 ms | p99 ms | requests | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.client} | {r.route} | {r.concurrency} | {r.rps:.0f} | {cell(r.p50_ms)} | {cell(r.p99_ms)} "
        f"| {r.requests} | {r.failed} |"
        for r in rows
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m infermesh.bench.cross_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="127.0.0.1:8080", help="the mesh's edge (default %(default)s)")
    p.add_argument(
        "--concurrency",
        type=whole_numbers(1),
        default="1,32",
        help="requests in flight, comma-separated (default %(default)s)",
    )
    p.add_argument(
        "--seconds", type=number(above=0), default=10.0, help="measured seconds per row (default %(default)s)"
    )
    p.add_argument(
        "--warmup", type=number(at_least=0), default=2.0, help="seconds of load before each row (default %(default)s)"
    )
    p.add_argument(
        "--rounds", type=whole_number(1), default=1, help="times to run the four clients in turns (default %(default)s)"
    )
    p.add_argument(
        "--monolith-data-dir",
        type=Path,
        help="also load the one-process monolith (2 processes, as the suite does) in the same turns, with the "
        "reference model of this data dir (e.g. the mesh's, as given to `up`)",
    )
    p.add_argument("--monolith-redis-url", help="the monolith's Redis (default: the bench's default)")
    p.add_argument("--out", type=Path, help="also write the rows and the machine as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        print(f"not on PATH: {', '.join(missing)} (Debian/Ubuntu: apt-get install wrk nghttp2-client)", file=sys.stderr)
        return 2
    levels: list[int] = args.concurrency
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="infermesh-cross-check-") as tmp:
        folder = Path(tmp)
        script, body = write_inputs(folder, reference_requests())
        answer = answer_bytes(args.address, body)
        url = f"http://{args.address}/v1/recommend"
        monolith = []
        if args.monolith_data_dir:
            monolith = ["--data-dir", str(args.monolith_data_dir), "--processes", "2"]
            monolith += ["--redis-url", args.monolith_redis_url] if args.monolith_redis_url else []
        for concurrency in levels:
            for _ in range(args.rounds):
                timing = (concurrency, args.seconds, args.warmup)
                runs = [
                    partial(run_own, "rest", ["--url", url], *timing, folder),
                    partial(run_wrk, url, script, *timing),
                    partial(run_own, "grpc", ["--address", args.address], *timing, folder),
                    partial(run_h2load, args.address, body, answer, *timing, folder),
                ]
                runs += [partial(run_own, "monolith", monolith, *timing, folder)] if monolith else []
                for run in runs:
                    rows.append(run())
                    print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"machine": report.machine(), "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
