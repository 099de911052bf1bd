"""Retries with capped, jittered exponential backoff: the one retry loop of every stage.

Storage reads and writes, the scoring lease, predictor calls: each passes the exceptions that
retrying cannot fix as ``permanent`` (a missing file, a bad image, a lease another run holds).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import time

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
_active = contextvars.ContextVar("steel_retry_active", default=False)
_policy: contextvars.ContextVar[tuple[int, float] | None] = contextvars.ContextVar("steel_retry_policy", default=None)


def active() -> bool:
    """True inside a :func:`retry` call: the layers below (``steel.core.storage``) then try once and let
    the caller's loop count the attempts, so retries are never multiplied."""
    return _active.get()


@contextlib.contextmanager
def policy(retries: int, backoff_s: float):
    """Inside this block, each storage request (``steel.core.storage``) is retried ``retries`` times
    with this backoff: retries where the fault is, one request at a time, so an operation of several
    requests (a shard: its rows, its index) never repeats the ones that succeeded."""
    token = _policy.set((int(retries), float(backoff_s)))
    try:
        yield
    finally:
        _policy.reset(token)


def current_policy(default: tuple[int, float]) -> tuple[int, float]:
    """``(retries, backoff_s)`` of the enclosing :func:`policy`, else ``default``."""
    return _policy.get() or default


def retry(fn, *, retries: int, backoff_s: float, what: str = "", permanent: tuple = (),
          sleep=time.sleep, on_retry=None):
    """``fn()``, retried up to ``retries`` times on any exception not in ``permanent``.

    Waits ``backoff_s * 2**attempt`` (capped at 60 s) times a jitter factor in [0.5, 1] between
    attempts, so many workers hitting a throttled store do not retry in lock-step. The last
    exception is re-raised. ``on_retry(exc)`` is called before each wait (metrics, tests).
    """
    attempt = 0
    while True:
        token = _active.set(True)
        try:
            return fn()
        except permanent:
            raise
        except Exception as e:  # noqa: BLE001 - transient by definition here; re-raised when retries run out
            if attempt >= retries:
                raise
            delay = min(backoff_s * 2 ** attempt, MAX_BACKOFF_S) * (0.5 + 0.5 * random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.2f s", what or "call", type(e).__name__,
                        str(e)[:200], attempt + 1, retries, delay)
            if on_retry is not None:
                on_retry(e)
            sleep(delay)
            attempt += 1
        finally:
            _active.reset(token)


__all__ = ["retry", "active", "policy", "current_policy", "MAX_BACKOFF_S"]
