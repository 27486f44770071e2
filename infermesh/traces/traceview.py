"""The local trace view: a small web UI over a TraceStore, for a laptop with no Jaeger.

Pages (server-rendered HTML, no JavaScript, no assets from anywhere):

* `/`                 recent traces and the slowest ones (filters: ?service=, ?within=<min>)
* `/trace/<trace id>` the waterfall of one trace: every span on a shared time axis,
                      indented under its parent, coloured by service; click a row for its
                      attributes, status and events
* `/api/traces`       JSON list (?order=slowest|recent, ?limit=, ?service=, ?within=)
* `/api/traces/<id>`  JSON of one trace, spans in waterfall order

Started by `infermesh traces` (with its own OTLP receiver) and `infermesh up --trace-view`.
"""

from __future__ import annotations

import html
import json
import math
import time
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from infermesh.traces.http_server import BackgroundHttpServer
from infermesh.traces.store import SpanRecord, Trace, TraceStore

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#9c755f",
    "#ff9da7",
    "#bab0ac",
)
# Fixed colours for the mesh's own services, so screenshots read the same every time.
SERVICE_COLOURS = {
    "envoy": "#9c755f",
    "gateway": "#4e79a7",
    "features": "#59a14f",
    "scoring": "#f28e2b",
    "ranking": "#b07aa1",
}

CSS = """
:root { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2328; }
body { margin: 0; background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 10px 20px; display: flex; gap: 20px; align-items: center; }
header a { color: #fff; text-decoration: none; font-weight: 600; }
header form { margin-left: auto; }
header input { width: 300px; padding: 4px 8px; border-radius: 4px; border: 0; font-family: monospace; }
main { padding: 16px 20px; }
h1 { font-size: 18px; margin: 0 0 4px 0; }
h2 { font-size: 15px; margin: 22px 0 8px 0; }
.meta { color: #57606a; font-size: 13px; margin-bottom: 12px; }
.meta code { background: #eaeef2; padding: 1px 4px; border-radius: 3px; }
table.list { border-collapse: collapse; width: 100%; background: #fff; font-size: 13px; }
table.list th, table.list td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #d0d7de; }
table.list th { background: #eaeef2; font-weight: 600; }
table.list td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.chip { display: inline-block; padding: 1px 7px; margin: 1px 2px; border-radius: 9px; color: #fff; font-size: 11px; }
.err { color: #cf222e; font-weight: 600; }
.durbar { height: 8px; background: #4e79a7; border-radius: 2px; min-width: 2px; }
.wf { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; font-size: 12px; }
.wf .axis, .wf summary { display: grid; grid-template-columns: minmax(380px, 36%) 1fr 80px; align-items: center; }
.wf .axis { border-bottom: 1px solid #d0d7de; background: #eaeef2; font-weight: 600; height: 26px; }
.wf .axis .ticks { position: relative; height: 100%; }
.wf .axis .tick { position: absolute; top: 5px; font-size: 11px; color: #57606a; transform: translateX(-50%); white-space: nowrap; }
.wf .axis .tick:first-child { transform: none; }
.wf details { border-bottom: 1px solid #eaeef2; }
.wf details[open] { background: #f6f8fa; }
.wf summary { list-style: none; cursor: pointer; min-height: 22px; }
.wf summary::-webkit-details-marker { display: none; }
.wf summary:hover { background: #f3f4f6; }
.wf .name { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; padding: 3px 6px; }
.wf .name .svc { display: inline-block; width: 8px; height: 8px; border-radius: 2px; margin-right: 6px; }
.wf .name .sn { color: #57606a; margin-right: 4px; }
.wf .track { position: relative; height: 22px; border-left: 1px solid #d0d7de; }
.wf .track .grid { position: absolute; top: 0; bottom: 0; border-left: 1px dashed #eaeef2; }
.wf .bar { position: absolute; top: 5px; height: 12px; border-radius: 2px; min-width: 2px; }
.wf .bar.error { outline: 2px solid #cf222e; }
.wf .dur { text-align: right; padding-right: 8px; font-variant-numeric: tabular-nums; color: #57606a; }
.wf .attrs { padding: 6px 12px 10px 40px; font-family: monospace; font-size: 12px; }
.wf .attrs table td { padding: 1px 10px 1px 0; vertical-align: top; }
.wf .attrs td.k { color: #57606a; }
.legend { margin: 6px 0 12px 0; font-size: 12px; }
.empty { color: #57606a; padding: 14px; background: #fff; border: 1px solid #d0d7de; border-radius: 6px; }
"""


def service_colour(service: str) -> str:
    return SERVICE_COLOURS.get(service) or PALETTE[zlib.crc32(service.encode()) % len(PALETTE)]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_esc(title)}</title>{refresh}<style>{CSS}</style></head><body>"
        '<header><a href="/">infermesh traces</a>'
        '<form action="/find" method="get"><input name="trace_id" '
        'placeholder="trace id (x-trace-id, trace_id in logs)" autocomplete="off"></form>'
        f"</header><main>{body}</main></body></html>"
    )


def _chips(services: list[str]) -> str:
    return "".join(f'<span class="chip" style="background:{service_colour(s)}">{_esc(s)}</span>' for s in services)


def _clock(unix_ns: int) -> str:
    seconds = unix_ns / 1e9
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{int(unix_ns / 1e6) % 1000:03d}"


def _trace_table(traces: list[Trace], empty: str) -> str:
    if not traces:
        return f'<div class="empty">{_esc(empty)}</div>'
    longest = max(t.duration_ms for t in traces) or 1.0
    rows = []
    for t in traces:
        width = max(0.5, 100.0 * t.duration_ms / longest)
        error = ' <span class="err">error</span>' if t.has_error else ""
        rows.append(
            "<tr>"
            f"<td>{_clock(t.start_ns)}</td>"
            f'<td><a href="/trace/{_esc(t.trace_id)}">{_esc(t.title)}</a>{error}<br>'
            f'<code style="font-size:11px;color:#57606a">{_esc(t.trace_id)}</code></td>'
            f"<td>{_chips(t.services)}</td>"
            f'<td class="num">{len(t.spans)}</td>'
            f'<td class="num">{t.duration_ms:.2f} ms</td>'
            f'<td style="width:18%"><div class="durbar" style="width:{width:.1f}%"></div></td>'
            "</tr>"
        )
    return (
        '<table class="list"><tr><th>started</th><th>trace</th><th>services</th>'
        "<th>spans</th><th>duration</th><th></th></tr>" + "".join(rows) + "</table>"
    )


def render_index(store: TraceStore, service: str | None = None, within_min: float = 15.0) -> str:
    slow = store.slowest(20, within_s=within_min * 60.0, service=service)
    recent = store.recent(50, service=service)
    scope = f" for {_esc(service)}" if service else ""
    body = (
        "<h1>Traces</h1>"
        f'<div class="meta">{store.spans_received} spans received; {len(store.traces())} traces kept'
        f"{scope}. Filter: <code>?service=gateway</code>, <code>?within=60</code> (minutes).</div>"
        f"<h2>Slowest traces, last {within_min:g} minutes{scope}</h2>"
        + _trace_table(slow, "No traces yet: send a request through the mesh.")
        + f"<h2>Recent traces{scope}</h2>"
        + _trace_table(recent, "No traces yet.")
    )
    return _page("infermesh traces", body, refresh_s=None)


def _nice_step(total_ms: float, ticks: int = 5) -> float:
    raw = max(total_ms / ticks, 1e-6)
    magnitude = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        if raw <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1000:.0f} µs"


def _attr_rows(span: SpanRecord) -> str:
    rows = [
        ("service", span.service),
        ("span id", span.span_id),
        ("parent span id", span.parent_span_id or "(root)"),
        ("kind", span.kind),
        ("status", span.status + (f": {span.status_message}" if span.status_message else "")),
        ("duration", _fmt_ms(span.duration_ms)),
    ]
    rows += sorted((k, json.dumps(v) if not isinstance(v, str) else v) for k, v in span.attributes.items())
    rows += [(f"event @{_fmt_ms((e.time_ns - span.start_ns) / 1e6)}", e.name) for e in span.events]
    return "<table>" + "".join(f'<tr><td class="k">{_esc(k)}</td><td>{_esc(v)}</td></tr>' for k, v in rows) + "</table>"


def render_trace(trace: Trace) -> str:
    start = trace.start_ns
    total_ms = max(trace.duration_ms, 1e-3)
    step = _nice_step(total_ms)
    ticks = []
    grid = []
    value = 0.0
    while value <= total_ms + 1e-9:
        left = 100.0 * value / total_ms
        ticks.append(f'<span class="tick" style="left:{left:.3f}%">{_fmt_ms(value)}</span>')
        grid.append(f'<span class="grid" style="left:{left:.3f}%"></span>')
        value += step
    grid_html = "".join(grid)
    rows = []
    for depth, span in trace.walk():
        colour = service_colour(span.service)
        left = 100.0 * (span.start_ns - start) / 1e6 / total_ms
        width = 100.0 * span.duration_ms / total_ms
        error = " error" if span.status == "ERROR" else ""
        rows.append(
            "<details><summary>"
            f'<div class="name" style="padding-left:{6 + 16 * depth}px" '
            f'title="{_esc(span.service)}: {_esc(span.name)}">'
            f'<span class="svc" style="background:{colour}"></span><span class="sn">{_esc(span.service)}</span>'
            f"{_esc(span.name)}</div>"
            f'<div class="track">{grid_html}<div class="bar{error}" style="left:{left:.3f}%;width:{width:.3f}%;'
            f'background:{colour}"></div></div>'
            f'<div class="dur">{_fmt_ms(span.duration_ms)}</div>'
            f'</summary><div class="attrs">{_attr_rows(span)}</div></details>'
        )
    legend = _chips(trace.services)
    error = ' · <span class="err">has errors</span>' if trace.has_error else ""
    body = (
        f"<h1>{_esc(trace.title)}</h1>"
        f'<div class="meta">trace <code>{_esc(trace.trace_id)}</code> · started {_clock(start)} · '
        f"{_fmt_ms(trace.duration_ms)} · {len(trace.spans)} spans · {len(trace.services)} services{error}"
        f' · <a href="/api/traces/{_esc(trace.trace_id)}">JSON</a></div>'
        f'<div class="legend">{legend}</div>'
        '<div class="wf"><div class="axis"><div class="name">span</div>'
        f'<div class="ticks">{"".join(ticks)}</div><div class="dur">duration</div></div>' + "".join(rows) + "</div>"
    )
    return _page(f"trace {trace.trace_id[:8]} · {trace.title}", body)


def render_missing(trace_id: str) -> str:
    body = (
        f"<h1>Trace {_esc(trace_id)} not here (yet)</h1>"
        '<div class="meta">Spans reach the view a moment after the request; this page reloads every '
        "2 s. Traces that were not sampled (OTEL_TRACES_SAMPLER) never arrive.</div>"
    )
    return _page("trace not found", body, refresh_s=2)


class _Handler(BaseHTTPRequestHandler):
    store: TraceStore  # set on the subclass made per server
    server_version = "infermesh-traceview"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass  # quiet: the UI is for people, its access log is noise

    def _send(self, status: int, body: str, content_type: str = "text/html; charset=utf-8") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.send_header("cache-control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = parts.path.rstrip("/") or "/"
        service = query.get("service") or None
        try:
            within = float(query.get("within", "15"))
            limit = max(1, min(1000, int(query.get("limit", "50"))))
        except ValueError:
            self._send(HTTPStatus.BAD_REQUEST, _page("bad request", "<h1>bad query parameter</h1>"))
            return
        if path == "/":
            self._send(HTTPStatus.OK, render_index(self.store, service, within))
        elif path == "/find":
            trace_id = query.get("trace_id", "").strip().lower()
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("location", f"/trace/{trace_id}" if trace_id else "/")
            self.send_header("content-length", "0")
            self.end_headers()
        elif path.startswith("/trace/"):
            trace_id = path.removeprefix("/trace/").lower()
            trace = self.store.get(trace_id)
            if trace is None:
                self._send(HTTPStatus.NOT_FOUND, render_missing(trace_id))
            else:
                self._send(HTTPStatus.OK, render_trace(trace))
        elif path == "/api/traces":
            if query.get("order", "recent") == "slowest":
                traces = self.store.slowest(limit, within_s=within * 60.0, service=service)
            else:
                traces = self.store.recent(limit, service=service)
            self._json(HTTPStatus.OK, [t.summary() for t in traces])
        elif path.startswith("/api/traces/"):
            trace = self.store.get(path.removeprefix("/api/traces/"))
            if trace is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": "no such trace"})
            else:
                self._json(HTTPStatus.OK, trace.to_json())
        elif path == "/healthz":
            self._send(HTTPStatus.OK, "ok\n", "text/plain")
        else:
            self._send(HTTPStatus.NOT_FOUND, _page("not found", "<h1>not found</h1>"))


class TraceView(BackgroundHttpServer):
    """The web UI on host:port (0: a free port; see .port) in a daemon thread."""

    what = "the trace view"

    def __init__(self, store: TraceStore, host: str = "127.0.0.1", port: int = 16686) -> None:
        super().__init__(host, port)
        self.store = store

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def trace_url(self, trace_id: str) -> str:
        return f"{self.url}/trace/{trace_id}"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_Handler,), {"store": self.store})
