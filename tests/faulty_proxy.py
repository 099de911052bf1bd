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

import random
from collections import Counter
from urllib.parse import urlparse

from tests.http_proxy import LoopbackProxy

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyProxy(LoopbackProxy):
    name = "faulty-proxy"

    def __init__(self, target: str, rate: float = 0.0, first_n: int = 0, persist=(), seed: int = 0):
        super().__init__(target)
        self.rate, self.first_n, self.persist = rate, first_n, list(persist)
        self.rng = random.Random(seed)
        self.stats: Counter = Counter()
        self.per_key: Counter = Counter()
        self.faults_per_key: Counter = Counter()

    def handle(self, h, body) -> None:
        fault = self._fault(h.command, h.path)
        if fault == "drop":
            return self.drop(h)
        if fault == "503":
            return self.reply(h, 503, [("Content-Type", "application/xml")], SLOWDOWN, close=True)
        self.reply(h, *self.forward(h, body))

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
