"""What one recorded span costs a service, in CPU: `python -m infermesh.bench.span_cost`.

Records request-shaped traces in a quiet loop (a SERVER span continuing a remote parent,
five children with attributes, the outgoing context injected, as a service does per
request) and reports the CPU per span of:

* recording alone (the spans are dropped when exported),
* recording + the exporter package's OTLP encoder,
* recording + ours (services.runtime.otlp_encoding),
* the same through services.runtime.lean_tracing's tracer (what the services use),

with the BatchSpanProcessor's own thread counted (process CPU time). No network: the
encoded bytes are what the OTLP exporter would send. `--unsampled`: the same requests under
a parent that was not sampled (tracing off, or a request sampled out at 1%), nothing
recorded, through the SDK's tracer and through lean_tracing's. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from infermesh.bench import report
from services.runtime.lean_tracing import lean
from services.runtime.otlp_encoding import SpanEncoder

SPANS_PER_REQUEST = 6
_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
_UNSAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
_RPC = {"rpc.system": "grpc", "rpc.service": "infermesh.ranking.v1.RankingService", "rpc.method": "Rank"}


class _Encoding(SpanExporter):
    def __init__(self, encode: Callable[[Sequence[ReadableSpan]], object]) -> None:
        self._encode = encode

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._encode(spans)
        return SpanExportResult.SUCCESS


LEAN = "lean record + otlp_encoding"
LEAN_UNSAMPLED = "unsampled, lean tracer"


def _variants(unsampled: bool) -> dict[str, SpanExporter]:
    if unsampled:
        return {"unsampled, SDK tracer": _Encoding(lambda spans: None), LEAN_UNSAMPLED: _Encoding(lambda spans: None)}
    ours, lean_ours = SpanEncoder(), SpanEncoder()
    return {
        "record only": _Encoding(lambda spans: None),
        "record + exporter package's encoder": _Encoding(lambda spans: encode_spans(spans).SerializeToString()),
        "record + otlp_encoding": _Encoding(ours.encode),
        LEAN: _Encoding(lean_ours.encode),
    }


def _cpu_us_per_span(
    exporter: SpanExporter, requests: int, lean_tracer: bool = False, caller: dict[str, str] = _PARENT
) -> float:
    # The services' default sampler (parentbased_always_on); the caller's trace sampled, unless
    # `caller` says it was not (--unsampled).
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), resource=Resource.create({"service.name": "ranking"}))
    # A queue that holds every span of the run: none dropped, all encoded.
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=requests * SPANS_PER_REQUEST + 1, schedule_delay_millis=500)
    )
    tracer = provider.get_tracer("infermesh")
    if lean_tracer:
        tracer = lean(tracer)

    def one_request() -> None:
        parent = propagate.extract(caller)
        server = tracer.start_span(
            "/infermesh.ranking.v1.RankingService/Rank", context=parent, kind=trace.SpanKind.SERVER, attributes=_RPC
        )
        token = otel_context.attach(trace.set_span_in_context(server, parent))
        for stage in ("top_k", "seen_filter", "rules", "calibration", "category_cap"):
            with tracer.start_as_current_span(f"infermesh.ranking.{stage}", attributes={"infermesh.items": 200}):
                pass
        propagate.inject({})
        server.set_attribute("rpc.grpc.status_code", 0)
        server.end()
        otel_context.detach(token)

    for _ in range(min(1000, requests)):  # warm-up
        one_request()
    provider.force_flush()
    start = time.process_time()
    for _ in range(requests):
        one_request()
    provider.force_flush()
    spent = time.process_time() - start
    provider.shutdown()
    return spent / (requests * SPANS_PER_REQUEST) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infermesh.bench.span_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="each variant this many times, in turns; median reported")
    parser.add_argument("--unsampled", action="store_true", help="the caller's trace not sampled: nothing recorded")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be at least 1")
    caller = _UNSAMPLED_PARENT if args.unsampled else _PARENT
    rounds: dict[str, list[float]] = {name: [] for name in _variants(args.unsampled)}
    for _ in range(args.rounds):
        for name, exporter in _variants(args.unsampled).items():
            lean_tracer = name in (LEAN, LEAN_UNSAMPLED)
            rounds[name].append(_cpu_us_per_span(exporter, args.requests, lean_tracer, caller))
    result = {
        name: {
            "median_us_per_span": round(sorted(values)[len(values) // 2], 1),
            "rounds": [round(v, 1) for v in values],
        }
        for name, values in rounds.items()
    }
    print(json.dumps({"machine": report.machine(), "requests": args.requests, "cpu_per_span": result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
