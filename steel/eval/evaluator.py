"""Mean Dice of threshold sets on a :class:`~steel.eval.predictions.PredictionCache`, with numpy only.

With the exact tables (the actors counted, for every pixel threshold p, each class map's deployed
mask: resized to 256 x 1600 with ``cv2.INTER_LINEAR``, ``>= p`` in float32, its area and overlap
with the truth in full-resolution pixels) each candidate set is scored with a few vector operations::

    dice(i, k) = 2 |X∩Y| / (|X| + |Y|)   if image i passes t_bin and t_k and min_area_k <= |X| <= max_area_k
               = 1 if |Y| == 0 else 0     otherwise (empty prediction)

averaged over **all** (image, class) pairs (empty/empty = 1), as the competition metric. A cache
without these tables (maps only, e.g. an older ``--cache`` file) is scored the approximate way: a
mask at cache resolution is ``seg_k >= p``, its area ``count * (256*1600)/(h*w)`` and its overlap
``sum(mask * truth_fraction)`` times the same factor (one histogram pass per class).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from steel.core.names import CLASSES
from steel.eval.predictions import PredictionCache


class Evaluator:
    """Scores threshold sets on a :class:`PredictionCache` with precomputed per-pixel-threshold tables.

    ``pixel_values`` are the pixel thresholds the tables of a cache without exact tables are built at
    (any value asked for later is added on demand by recomputing that class's table).
    """

    def __init__(self, cache: PredictionCache, pixel_values: Iterable[float] = ()):
        self.cache = cache
        self.n = len(cache)
        self._edges: dict[int, np.ndarray] = {}
        self._count: dict[int, np.ndarray] = {}  # (P, N) full-resolution predicted area per threshold
        self._inter: dict[int, np.ndarray] = {}  # (P, N) full-resolution overlap with truth
        self._pixel_values = sorted(set(float(v) for v in pixel_values))
        for k in CLASSES:
            if cache.exact:  # the deployed cascade's own areas and overlaps
                self._edges[k] = cache.full_edges
                self._count[k] = np.ascontiguousarray(cache.full_area[:, k - 1, :].T.astype(np.float64))
                self._inter[k] = np.ascontiguousarray(cache.full_inter[:, k - 1, :].T.astype(np.float64))
            else:
                self._build(k, self._pixel_values)

    def _build(self, k: int, values: Sequence[float]) -> None:
        """Histogram pass: for each image, cells (and truth coverage) at or above each threshold."""
        edges = np.asarray(sorted(set(float(v) for v in values)), dtype=np.float32)
        seg, frac = self.cache.seg[k], self.cache.truth_frac[k]
        n, p = self.n, edges.size
        counts = np.zeros((n, p + 1), dtype=np.float64)
        inters = np.zeros((n, p + 1), dtype=np.float64)
        step = max(1, 2_000_000 // max(1, seg[0].size))  # ~2M cells per chunk
        for start in range(0, n, step):
            s = seg[start:start + step].reshape(min(step, n - start), -1).astype(np.float32)
            f = frac[start:start + step].reshape(s.shape).astype(np.float64)
            # bin b = number of edges <= value: value >= edges[j] iff bin > j
            bins = np.searchsorted(edges, s, side="right")
            rows = np.arange(s.shape[0])[:, None] * (p + 1)
            flat = (rows + bins).ravel()
            counts[start:start + s.shape[0]] = np.bincount(flat, minlength=s.shape[0] * (p + 1)).reshape(-1, p + 1)
            inters[start:start + s.shape[0]] = np.bincount(flat, weights=f.ravel(),
                                                           minlength=s.shape[0] * (p + 1)).reshape(-1, p + 1)
        # at-or-above threshold j = sum of bins j+1..p  (reverse cumulative sum)
        ge_counts = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
        ge_inters = np.cumsum(inters[:, ::-1], axis=1)[:, ::-1][:, 1:]
        scale = self.cache.scale(k)
        self._edges[k] = edges
        self._count[k] = np.ascontiguousarray((ge_counts * scale).T)
        self._inter[k] = np.ascontiguousarray((ge_inters * scale).T)

    def _row(self, k: int, pixel: float) -> int:
        edges = self._edges[k]
        j = int(np.searchsorted(edges, np.float32(pixel)))
        if j < edges.size and edges[j] == np.float32(pixel):
            return j
        if self.cache.exact:
            raise ValueError(f"pixel threshold {pixel} was not counted by the actors (exact tables hold "
                             f"{', '.join(f'{v:g}' for v in edges)}); add it to the grid")
        self._build(k, [*edges.tolist(), float(pixel)])
        return self._row(k, pixel)

    def kept(self, k: int, t_bin: float, prob: float, pixel: float, min_area: float, max_area: float) -> np.ndarray:
        """(N,) bool: whether the cascade writes a (non-empty) class-k mask for each image."""
        c = self.cache
        area = self._count[k][self._row(k, pixel)]
        return (c.p_defect >= t_bin) & (c.p_class[:, k - 1] >= prob) & (area > 0) & (area >= min_area) & (area <= max_area)

    def class_dice(self, k: int, t_bin: float, prob: float, pixel: float, min_area: float,
                   max_area: float) -> np.ndarray:
        """(N,) Dice of class k per image for one set of thresholds."""
        c = self.cache
        j = k - 1
        row = self._row(k, pixel)
        area, inter = self._count[k][row], self._inter[k][row]
        truth = c.truth_area[:, j].astype(np.float64)
        keep = self.kept(k, t_bin, prob, pixel, min_area, max_area)
        denom = np.where(keep, area + truth, 1.0)
        return np.where(keep, 2.0 * inter / denom, (truth == 0).astype(np.float64))

    def prob_curve(self, k: int, t_bin: float, pixel: float, min_area: float, max_area: float,
                   probs: Sequence[float]) -> np.ndarray:
        """Mean class-k Dice for every multilabel threshold in ``probs`` at once (others fixed).

        An image's Dice is ``pos`` if it passes every gate and ``neg`` (empty prediction) if not; the
        multilabel gate passes the images with ``p_k >= prob``, so the mean for each ``prob`` is
        ``mean(neg) + sum(pos - neg over passing images) / N``: one sort and a cumulative sum.
        """
        c = self.cache
        j = k - 1
        row = self._row(k, pixel)
        area, inter = self._count[k][row], self._inter[k][row]
        truth = c.truth_area[:, j].astype(np.float64)
        neg = (truth == 0).astype(np.float64)
        other = (c.p_defect >= t_bin) & (area > 0) & (area >= min_area) & (area <= max_area)
        pos = 2.0 * inter / np.where(other, area + truth, 1.0)
        gain = np.where(other, pos - neg, 0.0)
        p = c.p_class[:, j]  # float32: thresholds compare in float32, as class_dice does
        order = np.argsort(p, kind="stable")
        tail = np.concatenate([np.cumsum(gain[order][::-1])[::-1], [0.0]])  # tail[i] = sum of gain[order[i:]]
        first = np.searchsorted(p[order], np.asarray(probs, dtype=np.float32), side="left")
        return (neg.sum() + tail[first]) / max(self.n, 1)

    def per_class(self, th: dict) -> dict[int, float]:
        out = {}
        for k in CLASSES:
            ck = th["classes"][str(k)]
            out[k] = float(self.class_dice(k, th["binary"], ck["prob"], ck["pixel"], ck["min_area"],
                                           ck["max_area"]).mean()) if self.n else 1.0
        return out

    def score(self, th: dict) -> float:
        """Mean Dice over all (image, class) pairs (= mean of the per-class means: 4 pairs per image)."""
        return float(np.mean(list(self.per_class(th).values())))
