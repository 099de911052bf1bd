"""The threshold search: coordinate ascent over grids on cached validation predictions.

Rounds of: t_bin (each candidate scored with every class's (t_k, p_k) re-chosen for it), then per
class (t_k, p_k) jointly, min_area_k and max_area_k. A value only changes when a candidate scores
strictly higher, so the result never scores below the starting thresholds on the cached
predictions; ties go to the middle of the tied plateau (:func:`plateau_center`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from steel.core.names import CLASSES, PIXELS
from steel.eval.evaluator import Evaluator
from steel.eval.predictions import PredictionCache
from steel.model.thresholds import validate_thresholds

PROB_GRID: tuple[float, ...] = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2).tolist())
PIXEL_GRID: tuple[float, ...] = tuple(np.round(np.arange(0.1, 0.901, 0.05), 2).tolist())
AREA_GRID: tuple[int, ...] = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1500, 2000, 2500,
                              3000, 3500, 4000, 5000, 6000, 8000, 10000)
# max_area: from a small blob to the whole image (the seed's bounds are 10,000-160,000).
MAX_AREA_GRID: tuple[int, ...] = (2000, 4000, 6000, 8000, 10000, 15000, 20000, 30000, 50000, 80000, 127000, 160000,
                                  250000, PIXELS)




@dataclass
class Grids:
    binary: Sequence[float] = PROB_GRID
    prob: Sequence[float] = PROB_GRID
    pixel: Sequence[float] = PIXEL_GRID
    min_area: Sequence[int] = AREA_GRID
    max_area: Sequence[int] = MAX_AREA_GRID

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("binary", "prob", "pixel", "min_area", "max_area")}


def candidates(grid: Sequence[float], current: float) -> list[float]:
    return sorted(set(float(v) for v in grid) | {float(current)})


def plateau_center(scores: Sequence[float], tol: float = 1e-12) -> int:
    """Index of the middle of the longest run of neighbouring grid values that all reach the best score.

    On a validation set of a hundred images Dice is flat over wide ranges of a threshold; the first
    value of such a plateau (the most permissive one, e.g. a class gate of 0.05) sits at its edge and
    carries over worst to new images. Its middle keeps the most margin on both sides."""
    s = np.asarray(scores, np.float64)
    on = s >= s.max() - tol
    best_start, best_len, start = 0, 0, None
    for i, flag in enumerate(list(on) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    return best_start + (best_len - 1) // 2


def search(cache: PredictionCache, start: dict, grids: Grids | None = None, rounds: int = 4,
           evaluator: Evaluator | None = None) -> dict:
    """Coordinate ascent from ``start`` thresholds; never returns a lower cached score than ``start``.

    Each round: (1) t_bin, scoring every candidate with each class's (t_k, p_k) re-chosen jointly
    for it (a gate threshold is only useful together with the thresholds behind it); (2) per class,
    (t_k, p_k) jointly, then min_area_k, then max_area_k. A value changes only if the score rises
    strictly; among grid values that tie for the new best it takes the middle of their plateau
    (:func:`plateau_center`), not its first (most permissive) value. Stops after ``rounds`` or a
    round without change.

    Returns ``{"thresholds", "before", "after", "per_class_before", "per_class_after", "rounds",
    "steps", "evaluator"}``; ``steps`` lists every accepted change (param, old, new, score).
    """
    grids = grids or Grids()
    th = validate_thresholds(start)
    ev = evaluator or Evaluator(cache, sorted(set(grids.pixel) | {th["classes"][str(k)]["pixel"] for k in CLASSES}))
    before_per_class = ev.per_class(th)
    per_class = dict(before_per_class)
    before = float(np.mean(list(per_class.values())))
    best = before
    steps: list[dict] = []

    def joint(k: int, t_bin: float, ck: dict) -> tuple[float, float, float]:
        """Best (score, prob, pixel) of class k at ``t_bin``; the current pair unless one is strictly better."""
        probs = candidates(grids.prob, ck["prob"])
        here = ev.prob_curve(k, t_bin, ck["pixel"], ck["min_area"], ck["max_area"], [ck["prob"]])[0]
        top = (float(here), ck["prob"], ck["pixel"])
        for pixel in candidates(grids.pixel, ck["pixel"]):
            curve = ev.prob_curve(k, t_bin, pixel, ck["min_area"], ck["max_area"], probs)
            i = plateau_center(curve)
            if curve[i] > top[0] + 1e-12:
                top = (float(curve[i]), probs[i], pixel)
        return top

    def set_class(th: dict, k: int, **values) -> dict:
        return {**th, "classes": {**th["classes"], str(k): {**th["classes"][str(k)], **values}}}

    done_rounds = 0
    for r in range(rounds):
        done_rounds = r + 1
        changed = False
        # (1) t_bin, with each class's (prob, pixel) re-chosen for every candidate.
        choice = None
        values = candidates(grids.binary, th["binary"])
        tried = {}
        for value in values:
            if value != th["binary"]:
                picks = {k: joint(k, value, th["classes"][str(k)]) for k in CLASSES}
                tried[value] = (float(np.mean([picks[k][0] for k in CLASSES])), picks)
        scores = [tried[v][0] if v in tried else best for v in values]
        if max(scores) > best + 1e-12:
            value = values[plateau_center(scores)]
            choice = (value, *tried[value])
        if choice is not None:
            value, s, picks = choice
            steps.append({"round": r + 1, "param": "binary", "old": th["binary"], "new": value, "score": s})
            th = {**th, "binary": value}
            for k in CLASSES:
                _, prob, pixel = picks[k]
                old = th["classes"][str(k)]
                for name, v in (("prob", prob), ("pixel", pixel)):
                    if v != old[name]:
                        steps.append({"round": r + 1, "param": f"classes.{k}.{name}", "old": old[name], "new": v,
                                      "score": s})
                th = set_class(th, k, prob=prob, pixel=pixel)
                per_class[k] = picks[k][0]
            best, changed = s, True
        # (2) per class: (prob, pixel) jointly, then min_area.
        for k in CLASSES:
            ck = th["classes"][str(k)]
            score_k, prob, pixel = joint(k, th["binary"], ck)
            if score_k > per_class[k] + 1e-12:
                for name, v in (("prob", prob), ("pixel", pixel)):
                    if v != ck[name]:
                        steps.append({"round": r + 1, "param": f"classes.{k}.{name}", "old": ck[name], "new": v,
                                      "score": best + (score_k - per_class[k]) / len(CLASSES)})
                th = set_class(th, k, prob=prob, pixel=pixel)
                per_class[k] = score_k
                best = float(np.mean(list(per_class.values())))
                changed = True
            for name, grid in (("min_area", grids.min_area), ("max_area", grids.max_area)):
                ck = th["classes"][str(k)]
                best_v, best_k = ck[name], per_class[k]
                values = [int(v) for v in candidates(grid, ck[name])]
                scores = []
                for value in values:
                    bounds = {"min_area": ck["min_area"], "max_area": ck["max_area"], name: value}
                    if value == ck[name]:
                        scores.append(per_class[k])
                    elif bounds["min_area"] > bounds["max_area"]:
                        scores.append(-1.0)
                    else:
                        scores.append(float(ev.class_dice(k, th["binary"], ck["prob"], ck["pixel"], **bounds).mean()))
                if max(scores) > best_k + 1e-12:
                    i = plateau_center(scores)
                    best_v, best_k = values[i], scores[i]
                if best_v != ck[name]:
                    th = set_class(th, k, **{name: best_v})
                    per_class[k] = best_k
                    best = float(np.mean(list(per_class.values())))
                    steps.append({"round": r + 1, "param": f"classes.{k}.{name}", "old": ck[name],
                                  "new": best_v, "score": best})
                    changed = True
        if not changed:
            break
    th = validate_thresholds(th)
    after_per_class = ev.per_class(th)  # recomputed directly: the reported score is the real one
    after = float(np.mean(list(after_per_class.values())))
    if after < before:  # cannot happen (strict improvements only); guard against rounding anyway
        th, after, after_per_class, steps = validate_thresholds(start), before, before_per_class, []
    return {"thresholds": th, "before": before, "after": after,
            "per_class_before": before_per_class, "per_class_after": after_per_class,
            "rounds": done_rounds, "steps": steps, "evaluator": ev}
