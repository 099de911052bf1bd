"""One writer per scoring output: a lease object ``<out>/_LOCK`` taken atomically, renewed by a heartbeat,
checked before every write.

The lease is a small JSON object (``run_id``, ``host``, ``boot_id``, ``pid``, ``pid_started``,
``acquired_at``, ``heartbeat_at``, ``ttl_s``). Every decision is made on the **store's clock**: a
lease is stale when the store last wrote it (S3 ``LastModified``, a local file's mtime) more than
``ttl_s`` before the store's own "now" (S3's ``Date`` header), so a taker whose clock runs ahead
cannot take a live lease.

- **Take**: create it only if absent (S3 ``PutObject`` with ``If-None-Match: *``; locally ``O_EXCL``).
  If it exists and is fresh, :class:`LeaseHeld` names the holder, says when the lease goes stale and
  how to break it (``steel lease OUT --break``). A stale lease, or one whose holder is provably dead
  (same host and boot, its process gone), is taken over with a compare-and-swap (``If-Match: <ETag>``;
  locally the same check under an ``flock``): of two takers only one wins.
- **Renew**: a daemon thread rewrites the lease every ``ttl_s / 4`` with the same compare-and-swap.
- **Fence**: :meth:`Lease.fence` renews synchronously and raises :class:`LeaseLost` unless the lease is
  still this run's; the scoring run fences before committing each shard, so a run that was stalled
  past its TTL and lost the lease writes nothing more. :meth:`Lease.check` (cheap) raises when the
  heartbeat found the lease taken, or when renewals have failed for longer than ``ttl_s / 2``.
- **Release**: the holder deletes the object if it is still its own.

No database: S3's conditional writes are the only coordination (moto 5.2 enforces them too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid

from steel.core import storage
from steel.core.retry import retry

log = logging.getLogger(__name__)

LOCK = "_LOCK"
DEFAULT_TTL_S = 120.0
RENEW_GRACE = 0.5  # renewals failing for longer than this share of the TTL stop the run


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (the message names it and says when it goes stale)."""


class LeaseLost(RuntimeError):
    """This run no longer holds the output's lease: taken over, deleted, or not renewable in time."""


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_dead(holder: dict) -> bool:
    """True when the lease's holder provably no longer runs: it ran on this host since this boot, and
    its process is gone (or the pid now belongs to a process started later)."""
    if holder.get("host") != socket.gethostname() or not holder.get("boot_id") or holder["boot_id"] != _boot_id():
        return False
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    started = _started(pid)
    return started is None or (holder.get("pid_started") is not None and started != str(holder["pid_started"]))


def holder_ttl(holder: dict, default: float) -> float:
    """The TTL the holder declared (it renews every ttl/4), else ``default``."""
    try:
        ttl = float(holder.get("ttl_s") or default)
    except (TypeError, ValueError):
        return default
    return ttl if math.isfinite(ttl) and ttl > 0 else default


def describe(holder: dict) -> str:
    return f"run {holder.get('run_id')} on {holder.get('host')} (pid {holder.get('pid')})"


class Lease:
    """The lease on ``<out_uri>/_LOCK`` for run ``run_id``; use as a context manager or
    :meth:`acquire` / :meth:`release`."""

    def __init__(self, out_uri: str, run_id: str, ttl_s: float = DEFAULT_TTL_S, heartbeat_s: float | None = None,
                 retries: int = 4, backoff_s: float = 0.5):
        if ttl_s <= 0:
            raise ValueError(f"lock_ttl_s must be positive, got {ttl_s}")
        self.out_uri = str(out_uri)
        self.uri = storage.join(out_uri, LOCK)
        self.run_id = run_id
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else self.ttl_s / 4
        self.retries, self.backoff_s = retries, backoff_s  # for fence and release (acquire: the caller retries)
        self._nonce = ""
        self.tag: str | None = None
        self.took_over: dict | None = None
        self.lost: str | None = None
        self._renewed = time.monotonic()  # last successful write of the lease, on this process's clock
        self._lock = threading.Lock()  # one writer of self.tag at a time: the heartbeat or a fence
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.acquired_at: float | None = None

    def _body(self) -> bytes:
        """The lease's content; each write carries a fresh ``nonce``, so a writer whose answer was lost
        can tell whether its write landed."""
        now = time.time()
        self._nonce = uuid.uuid4().hex
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "boot_id": _boot_id(),
                           "pid": os.getpid(), "pid_started": _started(os.getpid()),
                           "acquired_at": _iso(self.acquired_at or now), "heartbeat_at": _iso(now),
                           "ttl_s": self.ttl_s, "nonce": self._nonce}).encode()

    def _landed(self) -> str | None:
        """The lease's tag if it holds our last write (its answer was lost, or a retry saw our own change)."""
        current = storage.read_versioned(self.uri)
        return current.tag if current is not None and parse(current).get("nonce") == self._nonce else None

    # -- taking ------------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        """Take the lease or raise :class:`LeaseHeld` naming the holder; starts the heartbeat."""
        self.acquired_at = time.time()
        tag = storage.create_only(self.uri, self._body())
        if tag is None:
            current = storage.read_versioned(self.uri)
            if current is None:  # released between our create and read: one more try
                tag = storage.create_only(self.uri, self._body())
                current = None if tag else storage.read_versioned(self.uri)
            if tag is None:
                holder = parse(current)
                if holder.get("run_id") == self.run_id:
                    tag = current.tag  # our own create succeeded but its answer was lost (the client retried)
                else:
                    tag = self._take_over(holder, current)
        self.tag = tag
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="steel-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, holder: dict, current: storage.Versioned) -> str:
        dead = holder_dead(holder)
        # The longer of both TTLs: a taker configured shorter must not cut into the holder's renewals.
        ttl = max(self.ttl_s, holder_ttl(holder, self.ttl_s))
        if not dead and current.age <= ttl:
            raise LeaseHeld(f"{self.out_uri}: another run holds the lease ({self.uri}): {describe(holder)}, "
                            f"last renewed {current.age:.0f} s ago; it goes stale in {ttl - current.age:.0f} s "
                            f"(TTL {ttl:.0f} s, score.lock_ttl_s) and the next run takes it over then. "
                            f"`steel lease {self.out_uri}` shows it; `--break` removes a stale one")
        tag = storage.replace_if(self.uri, self._body(), current.tag)
        if tag is None:
            now = parse(storage.read_versioned(self.uri))
            raise LeaseHeld(f"{self.uri}: another run took over the {'dead holder' if dead else 'stale'} lease first: "
                            f"{describe(now)}")
        self.took_over = {**holder, "age_s": round(current.age, 1), "dead": dead}
        log.warning("took over the %s lease %s from %s", "dead holder's" if dead else "stale", self.uri,
                    describe(holder))
        return tag

    # -- keeping -----------------------------------------------------------------------------
    def renew(self) -> None:
        """Rewrite the lease if it is still ours (compare-and-swap); sets :attr:`lost` when it is not."""
        with self._lock:
            if self.lost:
                return
            try:
                tag = storage.replace_if(self.uri, self._body(), self.tag)
            except Exception:  # noqa: BLE001 - a dropped answer: the write may still have landed
                tag = self._landed()
                if tag is None:
                    raise
            if tag is None:
                tag = self._landed()
            if tag is None:
                holder = parse(storage.read_versioned(self.uri))
                self.lost = (f"lease {self.uri} was taken over by {describe(holder)}" if holder
                             else f"lease {self.uri} was deleted")
                log.error("%s", self.lost)
                return
            self.tag = tag
            self._renewed = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - retried at the next beat; check() stops the run in time
                log.warning("lease heartbeat failed (%s: %s); retrying", type(e).__name__, e)
            if self.lost:
                return

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was taken over, or could not be renewed for longer than
        ``RENEW_GRACE * ttl_s`` (another run may take it over soon: stop before it does)."""
        if self.lost:
            raise LeaseLost(self.lost)
        silent = time.monotonic() - self._renewed
        if silent > RENEW_GRACE * self.ttl_s:
            self.lost = (f"lease {self.uri} not renewed for {silent:.0f} s (over {RENEW_GRACE:.0%} of its "
                         f"{self.ttl_s:.0f} s TTL): stopping before another run takes it over")
            raise LeaseLost(self.lost)

    def fence(self) -> None:
        """Renew now, and raise :class:`LeaseLost` unless the lease is still this run's: call it right
        before a write that commits work, so a run that lost its lease writes nothing more."""
        self.check()
        try:  # a store fault is retried (within ttl/2 of silence: check() below); then nothing is committed
            retry(self.renew, retries=self.retries, backoff_s=self.backoff_s, what=f"renewing {self.uri}")
        except Exception as e:  # noqa: BLE001
            raise LeaseLost(f"lease {self.uri} could not be confirmed before a write: {type(e).__name__}: {e}") from e
        self.check()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.tag is not None and not self.lost:
            try:  # storage faults are retried; a lease left behind goes stale after its TTL
                released = retry(lambda: storage.delete_if(self.uri, self.tag), retries=self.retries,
                                 backoff_s=self.backoff_s, what=f"releasing {self.uri}")
                if not released:
                    log.warning("%s: not released: it is no longer ours", self.uri)
            except Exception as e:  # noqa: BLE001
                log.warning("could not release %s (%s); it goes stale after %.0f s", self.uri, e, self.ttl_s)
        self.tag = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def parse(current: storage.Versioned | None) -> dict:
    """The lease's content; a lease that is not JSON (a taker killed mid-write, another tool) reads as a
    holder nobody can name, whose age decides like any other's."""
    if current is None:
        return {}
    try:
        data = json.loads(current.data)
    except (ValueError, UnicodeDecodeError):
        return {"run_id": "?", "unreadable": True}
    return data if isinstance(data, dict) else {"run_id": "?", "unreadable": True}


def status(out_uri: str) -> dict | None:
    """The lease of an output as an operator sees it: its holder, age (store clock), TTL, whether it is
    stale or its holder dead; None when there is none."""
    uri = storage.join(out_uri, LOCK)
    current = storage.read_versioned(uri)
    if current is None:
        return None
    holder = parse(current)
    ttl = holder_ttl(holder, DEFAULT_TTL_S)
    return {"uri": uri, "holder": holder, "age_s": round(current.age, 1), "ttl_s": ttl,
            "stale": current.age > ttl, "dead": holder_dead(holder), "tag": current.tag}


def break_lease(out_uri: str) -> dict:
    """Remove an output's lease by hand; refused (:class:`LeaseHeld`) while its holder's heartbeat is
    fresh and the holder is not provably dead. Returns what was removed."""
    st = status(out_uri)
    if st is None:
        raise FileNotFoundError(f"{out_uri}: no lease ({LOCK}) to break")
    if not st["stale"] and not st["dead"]:
        raise LeaseHeld(f"{st['uri']}: {describe(st['holder'])} renewed it {st['age_s']:.0f} s ago (TTL "
                        f"{st['ttl_s']:.0f} s): it is alive; not broken")
    if not storage.delete_if(st["uri"], st["tag"]):
        raise LeaseHeld(f"{st['uri']}: changed while breaking it (a run renewed or took it): not broken")
    return st


def read_holder(out_uri: str) -> dict | None:
    """The current lease content of an output, or None."""
    current = storage.read_versioned(storage.join(out_uri, LOCK))
    return parse(current) if current is not None else None


__all__ = ["Lease", "LeaseHeld", "LeaseLost", "LOCK", "DEFAULT_TTL_S", "read_holder", "status", "break_lease",
           "holder_dead", "describe", "parse"]
