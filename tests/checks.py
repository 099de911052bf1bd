"""Checks several test modules share."""

from __future__ import annotations

import pytest


def assert_search_rose(before: float, after: float, steps: list[dict]) -> None:
    """A threshold search's record holds: every accepted change scored above the start, the scores of the
    changes never fell, and the last one is the reported ``after``; no change means ``after == before``.
    (``after >= before`` alone holds by construction: the search only accepts strict gains.)"""
    if not steps:
        assert after == pytest.approx(before, abs=1e-12), (before, after)
        return
    scores = [float(s["score"]) for s in steps]
    assert scores[0] > before, (before, steps[0])
    assert all(b >= a for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] == pytest.approx(after, abs=1e-9), (scores[-1], after)
    assert after > before
