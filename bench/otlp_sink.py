"""A minimal OTLP/HTTP trace receiver for the benchmarks: it answers every POST with 200 and an
empty ``ExportTraceServiceResponse`` and counts what it was sent, so the services pay the whole
cost of a real exporter (span recording, protobuf encoding, an HTTP request per batch) without a
collector on this machine competing for the CPU.

Run:  python bench/otlp_sink.py [--record FILE]   (prints its port, then serves on 127.0.0.1
until killed; ``GET /stats`` answers ``{"requests": N, "spans": N, "bytes": N}``). ``--record``
appends one JSON line per span (trace, span and parent ids, name, service, start and end in ns),
from which ``bench_overhead.py`` computes where a request's time goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_lock = threading.Lock()
_stats = {"requests": 0, "spans": 0, "bytes": 0}
_record: list[object] = []  # the open file of --record, if any


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector would

    def do_POST(self) -> None:  # noqa: N802 - the http.server spelling
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        spans = 0
        try:
            request = ExportTraceServiceRequest.FromString(body)
            spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        except Exception:  # noqa: BLE001 - counted as a request all the same
            request = None
        with _lock:
            _stats["requests"] += 1
            _stats["spans"] += spans
            _stats["bytes"] += len(body)
            if _record and request is not None:
                _write_spans(_record[0], request)
        self._answer(b"", "application/x-protobuf")

    def do_GET(self) -> None:  # noqa: N802
        with _lock:
            body = json.dumps(_stats).encode()
        self._answer(body, "application/json")

    def _answer(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _write_spans(out: object, request: ExportTraceServiceRequest) -> None:
    for rs in request.resource_spans:
        service = next(
            (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
        )
        for ss in rs.scope_spans:
            for span in ss.spans:
                line = {
                    "trace": span.trace_id.hex(),
                    "span": span.span_id.hex(),
                    "parent": span.parent_span_id.hex(),
                    "name": span.name,
                    "service": service,
                    "start": span.start_time_unix_nano,
                    "end": span.end_time_unix_nano,
                }
                out.write(json.dumps(line) + "\n")  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", help="append every span to this file, one JSON line each")
    args = parser.parse_args()
    if args.record:
        _record.append(open(args.record, "a", buffering=1))  # noqa: SIM115 - open until killed
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
