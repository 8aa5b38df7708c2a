"""A loopback HTTP proxy in front of moto that makes chosen S3 requests fail as AWS can.

moto answers every request correctly and at once; AWS also answers ``409
ConditionalRequestConflict``, ``500 InternalError``, ``503 SlowDown``, and sometimes answers
late (the request was applied, the client timed out). Point a client's ``endpoint_url`` at
:attr:`FaultProxy.url`, then :meth:`FaultProxy.inject` a fault for the next requests that
match; every other request goes to moto unchanged (the Host header and the signature too:
moto does not check signatures). :attr:`FaultProxy.seen` logs ``(method, path, headers)``.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
Match = Callable[[str, str, dict[str, str]], bool]


@dataclass
class Fault:
    """What to do with a matching request: answer ``status`` with S3 error ``code`` without
    forwarding it, and/or wait ``delay_s`` (after forwarding, when ``forward``)."""

    status: int | None = None
    code: str = ""
    delay_s: float = 0.0
    forward: bool = False


def error_body(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    ).encode()


def conditional_put(method: str, path: str, headers: dict[str, str]) -> bool:
    """A PUT with ``If-None-Match`` (a create-if-absent)."""
    return method == "PUT" and "if-none-match" in headers


class FaultProxy:
    """``with FaultProxy(moto.endpoint_url) as proxy: ...`` on a free loopback port."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._faults: list[tuple[Match, Fault, list[int]]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, fault: Fault, times: int = 1, match: Match = conditional_put) -> None:
        """Apply ``fault`` to the next ``times`` requests for which ``match`` is true
        (``times=-1``: to all of them, until :meth:`clear`)."""
        with self._lock:
            self._faults.append((match, fault, [times]))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def count(self, match: Match = conditional_put) -> int:
        """How many requests so far matched ``match``."""
        return sum(match(*request) for request in self.seen)

    def _fault_for(self, method: str, path: str, headers: dict[str, str]) -> Fault | None:
        with self._lock:
            self.seen.append((method, path, headers))
            for match, fault, left in self._faults:
                if left[0] != 0 and match(method, path, headers):
                    left[0] -= 1
                    return fault
        return None

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        host, port = self.upstream.hostname, self.upstream.port
        upstream = http.client.HTTPConnection(host, port, timeout=30)
        kept = {k: v for k, v in headers.items() if k not in HOP_BY_HOP}
        if body or method in ("PUT", "POST"):
            kept["content-length"] = str(len(body))
        upstream.request(method, path, body=body, headers=kept)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        return response.status, response.getheaders(), data

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # keeps the object's Content-Length, no body
                skip = HOP_BY_HOP | {"date", "server"} | (set() if head else {"content-length"})
                for key, value in headers:
                    if key.lower() not in skip:
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _any(self) -> None:
                body = self._body()
                headers = {k.lower(): v for k, v in self.headers.items()}
                fault = proxy._fault_for(self.command, self.path, headers)
                try:
                    if fault and fault.status and not fault.forward:
                        time.sleep(fault.delay_s)
                        message = f"injected {fault.code}"
                        xml = [("Content-Type", "application/xml")]
                        self._answer(fault.status, xml, error_body(fault.code, message))
                        return
                    answer = proxy._forward(self.command, self.path, headers, body)
                    if fault:
                        time.sleep(fault.delay_s)
                    self._answer(*answer)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
