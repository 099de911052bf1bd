"""An HTTP proxy on 127.0.0.1 in front of an endpoint (the moto S3 server), for tests to build on.

A subclass decides what happens to each request in :meth:`LoopbackProxy.handle`: answer it itself
(:meth:`reply`), drop it, or pass it on (:meth:`forward`) and answer with what came back. Started and
stopped as a context manager; ``url`` is where clients point.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "content-length"}


class LoopbackProxy:
    name = "loopback-proxy"

    def __init__(self, target: str):
        self.target = urlparse(target)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                proxy.handle(self, proxy._body(self))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name=self.name, daemon=True)

    def handle(self, h: BaseHTTPRequestHandler, body: bytes | None) -> None:
        """What to do with one request (``h.command``, ``h.path``, ``h.headers``); default: pass it on."""
        self.reply(h, *self.forward(h, body))

    @staticmethod
    def _body(h: BaseHTTPRequestHandler) -> bytes | None:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += h.rfile.read(size)
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else None

    def forward(self, h: BaseHTTPRequestHandler, body: bytes | None) -> tuple[int, list, bytes]:
        """Send the request on to the target; ``(status, headers, data)`` of its answer."""
        conn = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP and k.lower() != "expect"}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, headers: list, data: bytes, close: bool = False) -> None:
        h.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP or (h.command == "HEAD" and k.lower() == "content-length"):
                h.send_header(k, v)  # a HEAD's Content-Length is the object's size
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        if close:
            h.send_header("Connection", "close")
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        if close:
            h.close_connection = True

    @staticmethod
    def drop(h: BaseHTTPRequestHandler) -> None:
        """Close the connection without an answer."""
        h.close_connection = True
        h.connection.shutdown(2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
