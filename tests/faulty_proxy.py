"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the moto server), for tests.

Faults are decided *before* a request is forwarded, so a faulted request never reached the store:

- ``rate``: the share of GET and PUT requests answered ``503 SlowDown`` or dropped (connection
  closed without an answer), chosen at random (seeded);
- ``first_n``: the first ``n`` GETs/PUTs of every key fail the same way (more than the clients'
  own retries, so only the caller's retries get through);
- ``persist``: substrings of keys whose GETs and PUTs always fail (until cleared).

``stats`` counts requests and faults (per method and per key) so tests can check faults happened.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "content-length"}


class FaultyProxy:
    def __init__(self, target: str, rate: float = 0.0, first_n: int = 0, persist=(), seed: int = 0):
        self.target = urlparse(target)
        self.rate, self.first_n, self.persist = rate, first_n, list(persist)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stats: Counter = Counter()
        self.per_key: Counter = Counter()
        self.faults_per_key: Counter = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP and k.lower() != "expect"}
                    if body is not None:
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP or (self.command == "HEAD" and k.lower() == "content-length"):
                        self.send_header(k, v)  # a HEAD's Content-Length is the object's size
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault(self, method: str, path: str) -> str | None:
        key = urlparse(path).path
        with self.lock:
            self.stats[method] += 1
            if method not in ("GET", "PUT"):
                return None
            self.per_key[(method, key)] += 1
            hit = (any(p in key for p in self.persist)
                   or self.per_key[(method, key)] <= self.first_n
                   or self.rng.random() < self.rate)
            if not hit:
                return None
            self.stats["faults"] += 1
            self.faults_per_key[(method, key)] += 1
            return self.rng.choice(("503", "drop"))

    def set(self, rate: float | None = None, first_n: int | None = None, persist=None) -> None:
        with self.lock:
            if rate is not None:
                self.rate = rate
            if first_n is not None:
                self.first_n = first_n
                self.per_key.clear()
            if persist is not None:
                self.persist = list(persist)

    def __enter__(self) -> "FaultyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
