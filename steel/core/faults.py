"""Fault injection for tests and drills: environment variables that make a run fail or stop at a named point.

They are read where the run is, so a test (or an operator rehearsing a failure on a real cluster)
sets them on the process or in a job's ``runtime_env``; unset, each hook costs one dictionary lookup.

- ``STEEL_TRAIN_FAIL_AT="epoch=E,rank=R[,marker=PATH][,model=NAME]"``: a training worker raises once
  at the start of epoch E on rank R (of model NAME; the marker file records that it happened, so
  the retried worker group trains on): :func:`train_fault` parses it, :func:`maybe_fail` raises.
- ``STEEL_SCORE_FAIL_AFTER_SHARDS=N``: the scoring driver raises after writing N shards
  (:func:`fail_after_shards`): a crash between shards.
- ``STEEL_SCORE_PAUSE_AT=point[:n]`` with ``STEEL_SCORE_PAUSE_FILE=PATH``: the n-th time (default
  1st) the scoring driver reaches ``point`` it writes ``<point> <pid>`` to PATH and sleeps, so a test
  can SIGKILL (or SIGSTOP) it exactly there (:func:`pause_point`); with ``STEEL_SCORE_RESUME_FILE=PATH``
  it goes on once that file exists (a run that stalled and woke up).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

TRAIN_FAIL_ENV = "STEEL_TRAIN_FAIL_AT"
SCORE_FAIL_AFTER_ENV = "STEEL_SCORE_FAIL_AFTER_SHARDS"
SCORE_PAUSE_AT_ENV = "STEEL_SCORE_PAUSE_AT"
SCORE_PAUSE_FILE_ENV = "STEEL_SCORE_PAUSE_FILE"
SCORE_RESUME_FILE_ENV = "STEEL_SCORE_RESUME_FILE"


# ---------------------------------------------------------------------------------------------
# Training


def parse_train_fault(text: str | None) -> dict | None:
    """``"epoch=2,rank=1,marker=/tmp/x"`` -> dict (the :data:`TRAIN_FAIL_ENV` hook); None when unset."""
    if not text:
        return None
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ("epoch", "rank", "marker", "model") or not value:
            raise ValueError(f"{TRAIN_FAIL_ENV}: expected epoch=E,rank=R[,marker=PATH][,model=NAME], got {text!r}")
        out[key] = value
    if "epoch" not in out or "rank" not in out:
        raise ValueError(f"{TRAIN_FAIL_ENV}: needs epoch= and rank=, got {text!r}")
    return out


def train_fault() -> dict | None:
    """The training fault this process's environment asks for, or None."""
    return parse_train_fault(os.environ.get(TRAIN_FAIL_ENV))


def maybe_fail(fault: dict | None, epoch: int, rank: int) -> None:
    """Raise once at the start of ``epoch`` on ``rank`` when ``fault`` says so (its marker file records it)."""
    if not fault or int(fault["epoch"]) != epoch or int(fault["rank"]) != rank:
        return
    marker = fault.get("marker")
    if marker:
        if os.path.exists(marker):
            return
        with open(marker, "w") as fh:
            fh.write(f"failed at epoch {epoch} on rank {rank}\n")
    raise RuntimeError(f"injected failure at epoch {epoch} on rank {rank} ({TRAIN_FAIL_ENV})")


# ---------------------------------------------------------------------------------------------
# Scoring


def fail_after_shards() -> int | None:
    """N of :data:`SCORE_FAIL_AFTER_ENV`: the scoring driver fails after writing N shards; None when unset."""
    value = os.environ.get(SCORE_FAIL_AFTER_ENV)
    return int(value) if value not in (None, "") else None


_pause_hits: Counter = Counter()


def pause_point(point: str) -> None:
    """Named point of a scoring run (``listed``, ``mid_shard``, ``shard_written`` - between a shard's
    rows file and its index -, ``before_success``): with :data:`SCORE_PAUSE_AT_ENV` naming it, the
    n-th visit writes ``<point> <pid>`` to :data:`SCORE_PAUSE_FILE_ENV` and sleeps: for ever, or until
    the file :data:`SCORE_RESUME_FILE_ENV` names exists."""
    spec = os.environ.get(SCORE_PAUSE_AT_ENV, "")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _pause_hits[point] += 1
    if _pause_hits[point] != int(nth or 1):
        return
    marker = os.environ.get(SCORE_PAUSE_FILE_ENV)
    if marker:
        with open(marker, "w") as fh:
            fh.write(f"{point} {os.getpid()}")
    log.warning("test hook: paused at %s (%s)", point, SCORE_PAUSE_AT_ENV)
    resume = os.environ.get(SCORE_RESUME_FILE_ENV)
    while not (resume and os.path.exists(resume)):
        time.sleep(0.1 if resume else 3600)
    log.warning("test hook: resumed at %s", point)


__all__ = ["TRAIN_FAIL_ENV", "SCORE_FAIL_AFTER_ENV", "SCORE_PAUSE_AT_ENV", "SCORE_PAUSE_FILE_ENV",
           "SCORE_RESUME_FILE_ENV", "parse_train_fault", "train_fault", "maybe_fail", "fail_after_shards", "pause_point"]
