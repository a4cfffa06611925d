"""A fault-injecting HTTP reverse proxy for tests: 127.0.0.1:<port> in front of
one upstream (moto's ThreadedMotoServer), threaded, stdlib only.

Contract
--------
- Every request is either forwarded (request line, headers in their order,
  Host included, and body byte for byte to a fresh upstream connection; the
  upstream's status, headers and body back byte for byte, only the framing
  of a chunked body rewritten as Content-Length) or answered with a fault.
  A forwarded request is signed by the client for the proxy's address, which
  the upstream never checks against its own.
- Faults, each counted in `counts` (with `requests` and `forwarded`):
    "500", "503"    an S3-style XML error (InternalError, SlowDown); the
                    upstream never sees the request
    "drop"          the connection closed without a response, before the
                    upstream sees the request
    "drop_after"    the upstream performs the request, then the connection is
                    closed without its response (a lost reply: a retry finds
                    the work done)
    "stall"         the upstream performs it and the response is held for
                    `stall` seconds (shorter than the client's read timeout)
    "stall_long"    held for `stall_long` seconds (longer: the client times
                    out and retries; the held response is then written to a
                    closed socket and discarded)
- Which request gets a fault: first `rules` (added with `add_rule(kind,
  match, times)`, for a targeted fault such as a lost reply to a
  conditional PUT), then, while `max_faults` is not used up, each request
  with probability `rate`, its kind drawn from `kinds` by a
  `random.Random(seed)`. The number of faults is bounded, so a client that
  retries always gets through.
- `faults` lists (kind, method, path) of every fault, for assertion messages.
"""
from __future__ import annotations

import collections
import random
import socket
import threading
import time
from dataclasses import dataclass
from http.client import HTTPResponse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

KINDS = ("500", "503", "drop", "drop_after", "stall", "stall_long")
_ERRORS = {"500": ("InternalError", "We encountered an internal error. Please try again."),
           "503": ("SlowDown", "Please reduce your request rate.")}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict  # lower-cased names


@dataclass
class Rule:
    kind: str
    match: Callable[[Request], bool]
    times: int


class FaultProxy:
    def __init__(self, upstream_port: int, *, seed: int = 0, rate: float = 0.0, max_faults: int = 0,
                 kinds: tuple[str, ...] = KINDS, stall: float = 0.5, stall_long: float = 5.0):
        assert set(kinds) <= set(KINDS), kinds
        self.upstream = ("127.0.0.1", upstream_port)
        self.rng = random.Random(seed)
        self.rate, self.max_faults, self.kinds = rate, max_faults, tuple(kinds)
        self.stall, self.stall_long = stall, stall_long
        self.rules: list[Rule] = []
        self.counts: collections.Counter = collections.Counter()
        self.faults: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_rule(self, kind: str, match: Callable[[Request], bool], times: int = 1) -> None:
        assert kind in KINDS, kind
        with self._lock:
            self.rules.append(Rule(kind, match, times))

    def set_rate(self, rate: float, max_faults: int) -> None:
        with self._lock:
            self.rate, self.max_faults = rate, max_faults

    def injected(self) -> int:
        with self._lock:
            return sum(self.counts[k] for k in KINDS)

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="faultproxy",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def decide(self, req: Request) -> str | None:
        """The fault for this request, or None to forward it."""
        with self._lock:
            self.counts["requests"] += 1
            kind = None
            for rule in self.rules:
                if rule.times > 0 and rule.match(req):
                    rule.times -= 1
                    kind = rule.kind
                    break
            if kind is None and self.max_faults > 0 and self.rng.random() < self.rate:
                self.max_faults -= 1
                kind = self.rng.choice(self.kinds)
            if kind is None:
                self.counts["forwarded"] += 1
            else:
                self.counts[kind] += 1
                self.faults.append((kind, req.method, req.path))
            return kind


def _read_chunked(rfile) -> bytes:
    """The raw bytes of a chunked body, framing included (forwarded as sent)."""
    raw = bytearray()
    while True:
        line = rfile.readline()
        raw += line
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        raw += rfile.read(size + 2)  # the chunk and its CRLF
    while True:  # trailers, up to the empty line
        line = rfile.readline()
        raw += line
        if line in (b"\r\n", b"\n", b""):
            return bytes(raw)


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return _read_chunked(self.rfile)
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _drop(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _error(self, kind: str) -> None:
            code, message = _ERRORS[kind]
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>").encode()
            self.send_response(int(kind))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self, body: bytes) -> bytes:
            """The request to the upstream as received; its response as bytes to send back."""
            head = [f"{self.command} {self.path} {self.request_version}\r\n"]
            head += [f"{k}: {v}\r\n" for k, v in self.headers.items()]
            with socket.create_connection(proxy.upstream, timeout=60) as up:
                up.sendall("".join(head).encode("latin-1") + b"\r\n" + body)
                resp = HTTPResponse(up, method=self.command)
                resp.begin()
                data = resp.read()
                out = [f"HTTP/1.1 {resp.status} {resp.reason}\r\n"]
                chunked = False
                for k, v in resp.getheaders():
                    if k.lower() == "transfer-encoding" and "chunked" in v.lower():
                        chunked = True
                        continue
                    if k.lower() == "connection" and v.lower() == "close":
                        self.close_connection = True
                    out.append(f"{k}: {v}\r\n")
                if chunked:
                    out.append(f"Content-Length: {len(data)}\r\n")
                return "".join(out).encode("latin-1") + b"\r\n" + data

        def _handle(self) -> None:
            body = self._body()
            req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            kind = proxy.decide(req)
            if kind in ("500", "503"):
                self._error(kind)
                return
            if kind == "drop":
                self._drop()
                return
            reply = self._forward(body)
            if kind == "drop_after":
                self._drop()
                return
            if kind in ("stall", "stall_long"):
                time.sleep(proxy.stall if kind == "stall" else proxy.stall_long)
            try:
                self.wfile.write(reply)
                self.wfile.flush()
            except OSError:  # the client gave up (a long stall): the reply is discarded
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

    return Handler
