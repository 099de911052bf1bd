"""One writer per scoring output: a lease object ``<out>/_LOCK`` taken atomically, renewed by a heartbeat.

The lease is a small JSON object (``run_id``, ``host``, ``pid``, ``acquired_at``, ``heartbeat``).

- **Take**: create it only if absent: on S3 a conditional ``PutObject`` with ``If-None-Match: *``;
  locally ``open(O_CREAT | O_EXCL)``. If it exists and its heartbeat is younger than ``ttl_s``,
  :class:`LeaseHeld` names the holder. If the heartbeat is older, the lease is taken over with a
  compare-and-swap: on S3 ``PutObject`` with ``If-Match: <the ETag we read>``, so of two takers only
  one wins (the other gets 412 and sees the winner's fresh heartbeat); locally the same check and
  replace happens under an ``flock`` on ``_LOCK.guard`` (``steel.core.storage``'s conditional writes).
- **Renew**: a daemon thread rewrites the heartbeat every ``ttl_s / 4`` with the same compare-and-swap
  against the ETag it last wrote. If someone else took the lease (we were stalled past the TTL), the
  renewal fails and :meth:`Lease.check` raises :class:`LeaseLost` at the writer's next step.
- **Release**: the holder deletes the object (after checking it is still its own).

No database: S3's conditional writes are the only coordination (moto 5.2 enforces them too).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from steel.core import storage

log = logging.getLogger(__name__)

LOCK = "_LOCK"


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (the message names it)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (its heartbeat went stale)."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def describe(holder: dict, now: float | None = None) -> str:
    age = (now or _now()) - float(holder.get("heartbeat", 0))
    return (f"run {holder.get('run_id')} on {holder.get('host')} (pid {holder.get('pid')}), "
            f"heartbeat {age:.0f} s ago")


# ----------------------------------------------------------------------------------------------
# The lease object through storage's conditional writes: read -> (content, tag); create-if-absent;
# replace-if-tag; delete-if-tag.


class _Backend:
    def __init__(self, uri: str):
        self.uri = uri

    def read(self):
        current = storage.read_versioned(self.uri)
        if current is None:
            return None, None
        try:
            return json.loads(current.data), current.tag
        except json.JSONDecodeError:  # a taker killed mid-create: treat as a lease of heartbeat 0
            return {"run_id": "?", "heartbeat": 0}, current.tag

    def create(self, body: bytes):
        return storage.create_only(self.uri, body)

    def replace(self, body: bytes, tag):
        return storage.replace_if(self.uri, body, tag)

    def delete(self, tag) -> None:
        if not storage.delete_if(self.uri, tag):
            content, _ = self.read()
            log.warning("%s: not released: it is no longer ours (%s)", self.uri, describe(content or {}))


class Lease:
    """The lease on ``<out_uri>/_LOCK`` for run ``run_id``; use as a context manager or
    :meth:`acquire` / :meth:`release`."""

    def __init__(self, out_uri: str, run_id: str, ttl_s: float = 600.0, heartbeat_s: float | None = None,
                 retries: int = 4, backoff_s: float = 0.5):
        if ttl_s <= 0:
            raise ValueError(f"lock_ttl_s must be positive, got {ttl_s}")
        self.out_uri = str(out_uri)
        self.uri = storage.join(out_uri, LOCK)
        self.run_id = run_id
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else self.ttl_s / 4
        self.retries, self.backoff_s = retries, backoff_s  # for release (acquire: the caller retries)
        self.backend = _Backend(self.uri)
        self.tag = None
        self.acquired_at: float | None = None
        self.took_over: dict | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = _now()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired_at": _iso(self.acquired_at or now), "heartbeat": now,
                           "heartbeat_at": _iso(now), "ttl_s": self.ttl_s}).encode()

    def acquire(self) -> "Lease":
        """Take the lease or raise :class:`LeaseHeld` naming the holder; starts the heartbeat."""
        self.acquired_at = _now()
        tag = self.backend.create(self._body())
        if tag is None:
            holder, held_tag = self.backend.read()
            if holder is None:  # released between our create and read: one more try
                tag = self.backend.create(self._body())
                holder, held_tag = (None, None) if tag else self.backend.read()
            if tag is None and (holder or {}).get("run_id") == self.run_id:
                tag = held_tag  # our own create succeeded but its answer was lost (the client retried)
            if tag is None:
                age = _now() - float((holder or {}).get("heartbeat", 0))
                if age <= self.ttl_s:
                    raise LeaseHeld(f"{self.out_uri}: another run holds the lease ({self.uri}): "
                                    f"{describe(holder)}; it expires {self.ttl_s - age:.0f} s "
                                    "after its last heartbeat (score.lock_ttl_s)")
                tag = self.backend.replace(self._body(), held_tag)
                if tag is None:
                    holder, _ = self.backend.read()
                    raise LeaseHeld(f"{self.uri}: another run took over the stale lease first: "
                                    f"{describe(holder or {})}")
                self.took_over = holder
                log.warning("took over the stale lease %s from %s", self.uri, describe(holder))
        self.tag = tag
        self._thread = threading.Thread(target=self._beat, name="steel-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        if self.lost:
            return
        tag = self.backend.replace(self._body(), self.tag)
        if tag is None:
            holder, _ = self.backend.read()
            self.lost = f"lease {self.uri} was taken over by " + (describe(holder) if holder else "nobody (deleted)")
            log.error("%s", self.lost)
        else:
            self.tag = tag

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried at the next beat
                log.warning("lease heartbeat failed (%s: %s); retrying", type(e).__name__, e)
            if self.lost:
                return

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another run took the lease over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.tag is not None and not self.lost:
            from steel.core.retry import retry

            try:  # storage faults are retried; a lease left behind expires after its TTL
                retry(lambda: self.backend.delete(self.tag), retries=self.retries, backoff_s=self.backoff_s,
                      what=f"releasing {self.uri}")
            except Exception as e:  # noqa: BLE001
                log.warning("could not release %s (%s); it expires after %.0f s", self.uri, e, self.ttl_s)
        self.tag = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(out_uri: str) -> dict | None:
    """The current lease content of an output, or None."""
    return _Backend(storage.join(out_uri, LOCK)).read()[0]


__all__ = ["Lease", "LeaseHeld", "LeaseLost", "LOCK", "read_holder", "describe"]
