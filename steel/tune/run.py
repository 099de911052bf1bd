"""Tune the cascade's thresholds on the validation split, maximising mean Dice.

The models run **once** over the validation images (:func:`predict_cache`), on Ray actors through
scoring's own pipeline (:mod:`steel.score.probabilities`; GPU actors with ``score.gpus_per_actor``; the
driver runs no model): binary and multilabel probabilities and every segmenter's probability map
for every image (ungated), reduced in the actor to the exact tables below (and, with a cache size,
the maps downsampled with ``cv2.INTER_AREA`` and kept as float16 beside their truth as coverage
fractions). A saved cache (``--cache``) carries its key (:func:`cache_key`: the models' weights
sha256 and specs, TTA, cache size, validation labels, pixel grid) and is reused only for the same
key; a stale one is recomputed.

The search (:func:`search`) is numpy only and scores what the cascade deploys. With the images'
truth, the actors also count, for every pixel threshold p of the grid, each class map's mask as
:func:`steel.model.cascade.mask_from_prob` makes it (resized to 256 x 1600 with ``cv2.INTER_LINEAR``,
``>= p`` in float32) and its area and overlap with the truth in full-resolution pixels
(:func:`steel.score.probabilities.full_tables`; ``PredictionCache.full_*``). Then each candidate
thresholds set is scored with a few vector operations over images:

    dice(i, k) = 2 |X∩Y| / (|X| + |Y|)   if image i passes t_bin and t_k and min_area_k <= |X| <= max_area_k
               = 1 if |Y| == 0 else 0     otherwise (empty prediction)

averaged over **all** (image, class) pairs (empty/empty = 1), as the competition metric.
A cache without these tables (cached maps only, e.g. an older ``--cache`` file) is scored the old,
approximate way: a mask at cache resolution is ``seg_k >= p``, its area ``count * (256*1600)/(h*w)``
and its overlap ``sum(mask * truth_fraction)`` times the same factor (one histogram pass per class).
Coordinate ascent over grids, for several rounds: t_bin (each candidate scored with every class's
(t_k, p_k) re-chosen for it), then per class (t_k, p_k) jointly, min_area_k and max_area_k. A value only changes
when a candidate scores strictly higher, so the result never scores below the starting thresholds
on the cached predictions. :func:`tune` wires it to a config and a bundle:
writes ``thresholds.json`` (with before/after scores) and ``tuning/*.png`` plots of Dice against each
threshold, and (optionally) the full-resolution Dice of the tuned cascade on the same images.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from steel.core.names import CLASSES, PIXELS
from steel.data import rle
from steel.model.thresholds import validate_thresholds

log = logging.getLogger(__name__)

MAX_CACHE_PIXELS = 64 * 400  # default cap of the cached map size per image and class (25,600 cells)

PROB_GRID: tuple[float, ...] = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2).tolist())
PIXEL_GRID: tuple[float, ...] = tuple(np.round(np.arange(0.1, 0.901, 0.05), 2).tolist())
AREA_GRID: tuple[int, ...] = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1500, 2000, 2500,
                              3000, 3500, 4000, 5000, 6000, 8000, 10000)
# max_area: from a small blob to the whole image (the seed's bounds are 10,000-160,000).
MAX_AREA_GRID: tuple[int, ...] = (2000, 4000, 6000, 8000, 10000, 15000, 20000, 30000, 50000, 80000, 127000, 160000,
                                  250000, PIXELS)


# --------------------------------------------------------------------------------------------
# Cached predictions
# --------------------------------------------------------------------------------------------

@dataclass
class PredictionCache:
    """Validation predictions and truth at cache resolution (one entry per image, classes 1..4).

    Attributes:
        image_ids: N ImageIds.
        p_defect: (N,) binary probabilities.  p_class: (N, 4) multilabel probabilities.
        seg: {k: (N, h_k, w_k) float16} segmenter probability maps at cache resolution.
        truth_frac: {k: (N, h_k, w_k) float16} share of each cache cell covered by the truth mask.
        truth_area: (N, 4) int64 truth areas in full-resolution pixels.
        full_edges, full_area, full_inter: optional exact tables of the deployed cascade
            (:func:`steel.score.probabilities.full_tables`): pixel thresholds (P,) float32, and per image,
            class and threshold the 256 x 1600 mask's area and its overlap with the truth,
            (N, 4, P) int64. With them :class:`Evaluator` scores exactly what scoring writes, and
            ``seg``/``truth_frac`` may be empty. full_soft: optional (N, 4, 3) soft Dice sums of
            each segmenter map (:func:`steel.score.probabilities.soft_sums`).
    """

    image_ids: list[str]
    p_defect: np.ndarray
    p_class: np.ndarray
    seg: dict[int, np.ndarray]
    truth_frac: dict[int, np.ndarray]
    truth_area: np.ndarray
    meta: dict = field(default_factory=dict)
    full_edges: np.ndarray | None = None
    full_area: np.ndarray | None = None
    full_inter: np.ndarray | None = None
    full_soft: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.image_ids)
        self.p_defect = np.asarray(self.p_defect, dtype=np.float32).reshape(-1)
        self.p_class = np.asarray(self.p_class, dtype=np.float32)
        self.truth_area = np.asarray(self.truth_area, dtype=np.int64)
        if self.p_defect.shape != (n,) or self.p_class.shape != (n, 4) or self.truth_area.shape != (n, 4):
            raise ValueError(f"cache shapes disagree with {n} images: p_defect {self.p_defect.shape}, "
                             f"p_class {self.p_class.shape}, truth_area {self.truth_area.shape}")
        if self.full_edges is not None:
            self.full_edges = np.asarray(self.full_edges, np.float32).reshape(-1)
            p = self.full_edges.size
            self.full_area = np.asarray(self.full_area, np.int64)
            self.full_inter = np.asarray(self.full_inter, np.int64)
            if self.full_area.shape != (n, 4, p) or self.full_inter.shape != (n, 4, p):
                raise ValueError(f"full-resolution tables must be (N={n}, 4, P={p}), got {self.full_area.shape} "
                                 f"and {self.full_inter.shape}")
            if not self.seg and not self.truth_frac:
                return
        for k in CLASSES:
            if k not in self.seg or k not in self.truth_frac:
                raise ValueError(f"cache has no segmentation / truth maps for class {k}")
            if self.seg[k].shape != self.truth_frac[k].shape or self.seg[k].shape[0] != n:
                raise ValueError(f"class {k}: seg {self.seg[k].shape} and truth {self.truth_frac[k].shape} "
                                 f"maps must both be (N={n}, h, w)")

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def exact(self) -> bool:
        """Whether the cache holds the deployed cascade's full-resolution tables."""
        return self.full_edges is not None

    def scale(self, k: int) -> float:
        """Full-resolution pixels per cache cell of class k."""
        h, w = self.seg[k].shape[1:]
        return PIXELS / float(h * w)

    def save(self, path: str) -> None:
        """Write to a local .npz file (reload with :meth:`load`)."""
        arrays = {"image_ids": np.asarray(self.image_ids, dtype=str), "p_defect": self.p_defect,
                  "p_class": self.p_class, "truth_area": self.truth_area,
                  "meta": np.asarray(json.dumps(self.meta))}
        for k in CLASSES:
            if k in self.seg:
                arrays[f"seg{k}"] = self.seg[k]
                arrays[f"truth{k}"] = self.truth_frac[k]
        if self.exact:
            arrays.update(full_edges=self.full_edges, full_area=self.full_area, full_inter=self.full_inter)
            if self.full_soft is not None:
                arrays["full_soft"] = self.full_soft
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str) -> "PredictionCache":
        with np.load(path, allow_pickle=False) as z:
            full = {name: z[name] for name in ("full_edges", "full_area", "full_inter", "full_soft") if name in z.files}
            return cls(image_ids=z["image_ids"].tolist(), p_defect=z["p_defect"], p_class=z["p_class"],
                       seg={k: z[f"seg{k}"] for k in CLASSES if f"seg{k}" in z.files},
                       truth_frac={k: z[f"truth{k}"] for k in CLASSES if f"truth{k}" in z.files},
                       truth_area=z["truth_area"], meta=json.loads(str(z["meta"])), **full)


def default_cache_size(input_size: Sequence[int], max_pixels: int = MAX_CACHE_PIXELS) -> tuple[int, int]:
    """A segmenter's input size, halved until it has at most ``max_pixels`` cells."""
    h, w = int(input_size[0]), int(input_size[1])
    while h * w > max_pixels and h % 2 == 0 and w % 2 == 0:
        h, w = h // 2, w // 2
    return h, w


def truth_maps(rles: Sequence[str], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Coverage fractions (n, h, w) float16 and full-resolution areas (n,) of truth RLEs."""
    from steel.model.cascade import resize_prob

    fracs = np.zeros((len(rles), int(size[0]), int(size[1])), dtype=np.float16)
    areas = np.zeros(len(rles), dtype=np.int64)
    for i, code in enumerate(rles):
        if not isinstance(code, str) or not code.strip():
            continue
        mask = rle.decode(code)
        areas[i] = int(mask.sum())
        fracs[i] = resize_prob(mask.astype(np.float32), size, "area")
    return fracs, areas


def read_image(uri: str) -> np.ndarray:
    """One image as uint8 RGB 256 x 1600 x 3 (``steel.data.images.decode``: scoring's decoder; ValueError
    naming the file if it is not one)."""
    from steel.core import storage
    from steel.data import images

    try:
        return images.decode(storage.read_bytes(uri))
    except images.BadImage as e:
        raise ValueError(f"{uri}: {e}") from None


def predict_cache(cascade_factory: Callable[[], Any], labels, images_uri: str,
                  sizes: dict[int, tuple[int, int]] | None, score_cfg=None, key: dict | None = None,
                  pixels: Sequence[float] | None = None) -> PredictionCache:
    """Run every model once over the labelled images, on Ray actors, and cache probabilities.

    Args:
        cascade_factory: picklable ``f() -> Cascade`` built once per actor, e.g.
            :class:`steel.score.run.BundleCascade` (its thresholds are not used here).
        labels: wide label table (ImageId, Defect_1..4) of the images to predict.
        images_uri: folder URI holding the images.
        sizes: {class: (h, w)} of the cached maps (see :func:`cache_sizes`); None: no maps (then
            ``pixels`` is needed).
        score_cfg: :class:`steel.core.config.ScoreConfig` of the actor pool (actors, batch_size,
            gpus_per_actor); default values if None.
        key: the cache's identity (:func:`cache_key`), stored in ``meta["key"]``.
        pixels: pixel thresholds at which the actors also count the deployed cascade's exact
            full-resolution areas and overlaps (``full_*`` tables; what :class:`Evaluator` then scores).
    Unreadable images are logged and left out (the cache's ``meta["skipped"]`` lists them).
    The driver runs no model: see :mod:`steel.score.probabilities`.
    """
    from steel.core.config import ScoreConfig
    from steel.score.probabilities import predict_probabilities

    if sizes is None and not pixels:
        raise ValueError("predict_cache needs cache sizes, pixel thresholds, or both")
    ids = [str(i) for i in labels["ImageId"].tolist()]
    rows = labels.assign(ImageId=labels["ImageId"].astype(str)).drop_duplicates("ImageId").set_index("ImageId")
    codes = {i: [str(c) if isinstance(c, str) else "" for c in r] for i, r in
             zip(rows.index, rows[[f"Defect_{k}" for k in CLASSES]].itertuples(index=False))}
    pred = predict_probabilities(cascade_factory, ids, images_uri, sizes, score_cfg or ScoreConfig(),
                                 truth=codes if pixels else None, edges=pixels)
    if not pred["image_ids"]:
        raise ValueError(f"no readable images in {images_uri} ({len(pred['skipped'])} skipped)")
    rows = rows.loc[pred["image_ids"]]
    truth_frac, truth_area = {}, np.zeros((len(rows), 4), dtype=np.int64)
    for j, k in enumerate(CLASSES):
        column = rows[f"Defect_{k}"].fillna("").astype(str).tolist()
        if sizes:
            truth_frac[k], truth_area[:, j] = truth_maps(column, sizes[k])
        else:
            truth_area[:, j] = [rle.area(c) if c.strip() else 0 for c in column]
    full = {"full_edges": pred["edges"], "full_area": pred["area"], "full_inter": pred["inter"],
            "full_soft": pred["soft"]} if pixels else {}
    return PredictionCache(
        image_ids=pred["image_ids"], p_defect=pred["p_defect"], p_class=pred["p_class"], seg=pred["seg"],
        truth_frac=truth_frac, truth_area=truth_area,
        meta={"cache_size": {str(k): list(sizes[k]) for k in CLASSES} if sizes else None,
              "skipped": pred["skipped"], "tta": getattr(cascade_factory, "tta", None), "key": key},
        **full,
    )


def cache_sizes(input_sizes: dict[str, Sequence[int]], cache_size: Sequence[int] | None = None) -> dict[int, tuple]:
    """{class: (h, w)} of the cached maps: ``cache_size`` for every class, else each segmenter's input
    size (the unified model's for every class) halved until at most 64*400 cells (:func:`default_cache_size`)."""
    return {k: tuple(int(v) for v in cache_size) if cache_size
            else default_cache_size(input_sizes[f"seg{k}"] if f"seg{k}" in input_sizes else input_sizes["unified"])
            for k in CLASSES}


def bundle_identity(bundle_uri: str) -> dict:
    """What identifies a bundle's models: each model's weights sha256 and spec (from manifest.json)."""
    from steel.model import bundle as bundle_lib

    manifest = bundle_lib.read_manifest(bundle_uri)
    models = {name: {"sha256": m.get("sha256"), "spec": m.get("spec")}
              for name, m in sorted((manifest.get("models") or {}).items())}
    missing = [name for name, m in models.items() if not m["sha256"]]
    if missing:
        raise ValueError(f"{bundle_uri}: manifest.json has no sha256 for {', '.join(missing)}; cannot key a cache")
    identity = {"models": models}
    if manifest.get("version"):
        identity["version"] = manifest["version"]
    return identity


def cache_key(identity: dict, tta: str, sizes: dict[int, Sequence[int]] | None, labels,
              pixels: Sequence[float] | None = None) -> dict:
    """Identity of a prediction cache: the models, the TTA, the cache sizes (None: no maps), the
    labelled images and the pixel thresholds of the exact tables (None: none).

    A cache made with other models (another bundle or version, retrained weights), another TTA,
    resolution, validation set or pixel grid is stale: :func:`load_cache` refuses it.
    """
    import hashlib

    cols = ["ImageId", *(f"Defect_{k}" for k in CLASSES)]
    table = labels[cols].astype(str).to_csv(index=False).encode()
    return {"models": hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest(),
            "tta": str(tta), "cache_size": {str(k): [int(v) for v in sizes[k]] for k in CLASSES} if sizes else None,
            "labels": hashlib.sha256(table).hexdigest(),
            "pixels": sorted(set(float(v) for v in pixels)) if pixels else None}


def load_cache(path: str, key: dict) -> PredictionCache | None:
    """The cache at ``path`` if it exists and was made for ``key``; None (and why, logged) otherwise."""
    import os

    if not os.path.exists(path):
        return None
    try:
        cache = PredictionCache.load(path)
    except (OSError, ValueError, KeyError) as e:
        log.warning("prediction cache %s is unreadable (%s): recomputing it", path, e)
        return None
    have = cache.meta.get("key") or {}
    if have != key:
        what = [name for name in ("models", "tta", "cache_size", "labels", "pixels") if have.get(name) != key.get(name)]
        log.warning("prediction cache %s is stale (%s changed): recomputing it",
                    path, ", ".join(what) if have else "made without a key")
        return None
    return cache


# --------------------------------------------------------------------------------------------
# Scoring candidates on the cache (numpy only)
# --------------------------------------------------------------------------------------------

class Evaluator:
    """Scores threshold sets on a :class:`PredictionCache` with precomputed per-pixel-threshold tables.

    ``pixel_values`` are the pixel thresholds the tables cover (the grid plus any value asked for
    later is added on demand by recomputing that class's table).
    """

    def __init__(self, cache: PredictionCache, pixel_values: Iterable[float] = PIXEL_GRID):
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


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------

@dataclass
class Grids:
    binary: Sequence[float] = PROB_GRID
    prob: Sequence[float] = PROB_GRID
    pixel: Sequence[float] = PIXEL_GRID
    min_area: Sequence[int] = AREA_GRID
    max_area: Sequence[int] = MAX_AREA_GRID

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("binary", "prob", "pixel", "min_area", "max_area")}


def _candidates(grid: Sequence[float], current: float) -> list[float]:
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
        probs = _candidates(grids.prob, ck["prob"])
        here = ev.prob_curve(k, t_bin, ck["pixel"], ck["min_area"], ck["max_area"], [ck["prob"]])[0]
        top = (float(here), ck["prob"], ck["pixel"])
        for pixel in _candidates(grids.pixel, ck["pixel"]):
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
        values = _candidates(grids.binary, th["binary"])
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
                values = [int(v) for v in _candidates(grid, ck[name])]
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


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def sweep(ev: Evaluator, th: dict, k: int | None, param: str, values: Sequence[float]) -> np.ndarray:
    """Dice as one threshold varies (others fixed at ``th``): overall for ``binary``, class k otherwise."""
    out = []
    for v in values:
        if param == "binary":
            out.append(ev.score({**th, "binary": float(v)}))
        else:
            ck = {**th["classes"][str(k)], param: v}
            out.append(float(ev.class_dice(k, th["binary"], ck["prob"], ck["pixel"], ck["min_area"],
                                           ck["max_area"]).mean()))
    return np.asarray(out)


def plot_curves(ev: Evaluator, start: dict, final: dict, grids: Grids) -> dict[str, bytes]:
    """PNG bytes: ``dice_vs_binary.png`` and ``dice_vs_class{k}.png`` (prob, pixel, min_area, max_area panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        return buf.getvalue()

    files = {}
    values = _candidates(grids.binary, final["binary"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(values, sweep(ev, final, None, "binary", values), marker="o", ms=3, label="mean Dice (all pairs)")
    for k in CLASSES:
        ys = [float(np.mean(ev.class_dice(k, v, **_class_args(final, k)))) for v in values]
        ax.plot(values, ys, lw=1, alpha=0.6, label=f"class {k}")
    ax.axvline(final["binary"], color="k", ls="--", lw=1, label=f"tuned {final['binary']:.2f}")
    ax.axvline(start["binary"], color="grey", ls=":", lw=1, label=f"start {start['binary']:.2f}")
    ax.set_xlabel("t_bin (binary classifier threshold)")
    ax.set_ylabel("validation Dice")
    ax.set_title("Dice vs binary gate (other thresholds tuned)")
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
    files["dice_vs_binary.png"] = png(fig)
    for k in CLASSES:
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
        ck, c0 = final["classes"][str(k)], start["classes"][str(k)]
        for ax, (param, grid, label) in zip(axes, (("prob", grids.prob, "t_k (multilabel prob)"),
                                                   ("pixel", grids.pixel, "p_k (pixel prob)"),
                                                   ("min_area", grids.min_area, "min_area_k (pixels)"),
                                                   ("max_area", grids.max_area, "max_area_k (pixels)"))):
            xs = _candidates(grid, ck[param])
            if param == "min_area":
                xs = [x for x in xs if x <= ck["max_area"]]
            if param == "max_area":
                xs = [x for x in xs if x >= ck["min_area"]]
            ax.plot(xs, sweep(ev, final, k, param, xs), marker="o", ms=3)
            ax.axvline(ck[param], color="k", ls="--", lw=1, label=f"tuned {ck[param]:g}")
            ax.axvline(c0[param], color="grey", ls=":", lw=1, label=f"start {c0[param]:g}")
            ax.set_xlabel(label)
            ax.set_ylabel(f"class {k} Dice")
            ax.legend(fontsize=7)
        fig.suptitle(f"Class {k}: validation Dice vs each threshold (others at tuned values)")
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.86, wspace=0.28)
        files[f"dice_vs_class{k}.png"] = png(fig)
    return files


def _class_args(th: dict, k: int) -> dict:
    ck = th["classes"][str(k)]
    return {"prob": ck["prob"], "pixel": ck["pixel"], "min_area": ck["min_area"], "max_area": ck["max_area"]}


# --------------------------------------------------------------------------------------------
# Full-resolution check and the job
# --------------------------------------------------------------------------------------------

AGREEMENT = 0.001  # tuning's score and the deployed cascade's must agree this closely


def pixel_grid(grids: Grids, *thresholds: dict) -> list[float]:
    """The pixel thresholds the actors count at: the grid's and every given thresholds set's."""
    values = set(float(v) for v in grids.pixel)
    for th in thresholds:
        values |= {float(th["classes"][str(k)]["pixel"]) for k in CLASSES}
    return sorted(values)


def full_resolution_dice(cascade_factory: Callable[[], Any], labels, images_uri: str, score_cfg=None) -> dict:
    """Mean Dice (overall, per class) at 256x1600 of the thresholded cascade against the labels' masks.

    The masks come from Ray actors running scoring's own stage (:func:`steel.score.probabilities.predict_masks`)
    with ``cascade_factory`` (e.g. :class:`steel.score.run.BundleCascade` with the tuned thresholds).
    """
    import pandas as pd

    from steel.core.config import ScoreConfig
    from steel.eval import metrics
    from steel.score.probabilities import predict_masks

    ids = [str(i) for i in labels["ImageId"].tolist()]
    rows, used, gating = predict_masks(cascade_factory, ids, images_uri, score_cfg or ScoreConfig())
    pred = pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])
    keep = labels[labels["ImageId"].astype(str).isin(set(used))]
    truth = pd.DataFrame([{"ImageId": r.ImageId, "ClassId": k, "EncodedPixels": getattr(r, f"Defect_{k}") or ""}
                          for r in keep.itertuples() for k in CLASSES])
    result = metrics.mean_dice(pred, truth)
    return {"mean_dice": float(result["mean_dice"]),
            "per_class": {str(k): float(v) for k, v in result["per_class"].items()},
            "n_images": int(result["n_images"]), "stats": gating}


def validation_labels(cfg) -> tuple[Any, str]:
    """The validation split (wide table) of the config's data and the data fingerprint."""
    from steel.data import labels as dataset

    wide = dataset.load_labels(cfg.data.path("train_csv"), images=cfg.data.path("train_images"),
                               skip_bad=cfg.data.skip_bad)
    splits = dataset.split(wide, seed=cfg.data.seed)
    return splits["val"], dataset.fingerprint(splits)


def _write_thresholds(bundle_uri: str, th: dict) -> None:
    try:
        from steel.model import bundle as bundle_lib
        writer: Callable | None = getattr(bundle_lib, "write_thresholds", None)
    except ImportError:
        writer = None
    if writer is not None:
        writer(bundle_uri, validate_thresholds(th))
    else:
        from steel.model.thresholds import save_thresholds

        save_thresholds(bundle_uri, th)


def _ray_for_models(ray_address: str | None, score_cfg) -> None:
    """Start or join Ray for the actors that run the models (and refuse GPU actors without a GPU)."""
    from steel.core.ray_session import ensure_ray

    ensure_ray(ray_address)
    if score_cfg.gpus_per_actor > 0:
        from steel.core.devices import check_ray_gpus

        check_ray_gpus("score.gpus_per_actor > 0 (tuning)", score_cfg.gpus_per_actor)


def tune(cfg, bundle_uri: str | None = None, stamp: str | None = None, *, start: dict | None = None,
         grids: Grids | None = None, rounds: int = 4, cache_size: Sequence[int] | None = None,
         batch_size: int = 8, full_check: bool = True, cache_path: str | None = None, tta: str | None = None,
         predictor=None, labels=None, ray_address: str | None = None, seed_thresholds: dict | None = None) -> dict:
    """Tune thresholds for a bundle on the config's validation split and write them into the bundle.

    The models run on Ray actors (scoring's pipeline and actor pool, ``cfg.score``'s actors and
    ``gpus_per_actor``; see :mod:`steel.score.probabilities`); this process only searches.

    Args:
        cfg: a :class:`steel.core.config.Config` (data paths, split seed, tune.tta, score's actor pool).
        bundle_uri: bundle folder (default ``cfg.bundle``).
        stamp: identifies the bundle's models (stored as ``validation.fingerprint``, so a pipeline can
            tell whether thresholds were tuned for the current models).
        start: starting thresholds (default: the bundle's thresholds.json, else the seed's).
        grids, rounds: the search grids and the maximum number of coordinate-ascent rounds.
        cache_size: (h, w) of segmenter maps to keep in the cache beside the exact tables (default:
            none; the search does not need them).
        batch_size: images per actor batch.
        full_check: also run the tuned cascade at full resolution on the validation images.
        cache_path: local .npz to reuse or write the prediction cache to. It is reused only when it
            was made for the same models (weights sha256 and spec of each), TTA, cache size and
            validation labels (:func:`cache_key`); a stale one is recomputed and overwritten.
        tta: flip TTA for the validation predictions (default ``cfg.tune.tta``).
        predictor: picklable cascade factory with ``thresholds`` and ``tta`` fields (tests); default
            :class:`steel.score.run.BundleCascade` of the bundle.
        labels: validation table to use instead of the config's split (tests).
        ray_address: Ray to start or join when this process has not initialised Ray yet.
        seed_thresholds: the seed's fixed thresholds to report beside the tuned ones (default:
            :func:`fixed_thresholds` of the config; the seed's published ones when ``labels`` is given).
    Returns a summary dict (``before``, ``after``, ``per_class_before/after``, ``thresholds``,
    ``seed`` (the fixed thresholds' Dice on the same images), ``deployed_check`` (search score vs
    the deployed cascade's, with ``full_check``), ``cache`` ("computed", "reused" or "recomputed"),
    ``files``...).
    """
    import dataclasses
    import os

    from steel.core import storage
    from steel.model import thresholds as th
    from steel.model.bundle import read_manifest
    from steel.score.run import BundleCascade

    t0 = time.time()
    bundle_uri = bundle_uri or cfg.bundle
    tta = tta or cfg.tune.tta
    data_fp = None
    if labels is None:
        labels, data_fp = validation_labels(cfg)
    try:
        manifest = read_manifest(bundle_uri)
    except FileNotFoundError:
        if predictor is None:
            raise
        manifest = None  # a test's stand-in predictor with no bundle on disk
    if manifest is not None:
        manifest_fp = manifest.get("fingerprint")
        if data_fp and manifest_fp and manifest_fp != data_fp:
            log.warning("the bundle was trained on a different split (fingerprint %s, data now %s): "
                        "validation images may have been seen in training", manifest_fp[:12], data_fp[:12])
    if start is None and predictor is not None:
        start = predictor.thresholds
    if start is None:
        try:
            start = th.load_thresholds(bundle_uri)
        except FileNotFoundError:
            start = th.default_thresholds()
    start = validate_thresholds(start)
    if predictor is None:
        predictor = BundleCascade(str(bundle_uri), start, tta, endpoint=storage.current_endpoint())
    predictor = dataclasses.replace(predictor, thresholds=start, tta=tta)
    sizes = cache_sizes({}, cache_size) if cache_size else None
    grids = grids or Grids()
    seed = seed_thresholds if seed_thresholds is not None else (
        fixed_thresholds(cfg) if data_fp else th.default_thresholds())
    pixels = pixel_grid(grids, start, seed)
    identity = bundle_identity(bundle_uri) if manifest is not None else {"predictor": type(predictor).__qualname__}
    key = cache_key(identity, tta, sizes, labels, pixels)
    score_cfg = dataclasses.replace(cfg.score, batch_size=batch_size, tta=tta, allow_resize=False)
    images_uri = cfg.data.path("train_images")

    checked: list[bool] = []

    def ray_ready():  # once, and only when a model has to run
        if not checked:
            _ray_for_models(ray_address or cfg.ray_address, score_cfg)
            checked.append(True)

    cache = load_cache(cache_path, key) if cache_path else None
    if cache is not None:
        cache_state = "reused"
        log.info("reusing %d cached validation predictions from %s", len(cache), cache_path)
    else:
        cache_state = "recomputed" if cache_path and os.path.exists(cache_path) else "computed"
        ray_ready()
        cache = predict_cache(predictor, labels, images_uri, sizes, score_cfg, key=key, pixels=pixels)
        if cache_path:
            cache.save(cache_path)
    t_pred = time.time() - t0
    result = search(cache, start, grids, rounds=rounds)
    t_search = time.time() - t0 - t_pred
    final = result["thresholds"]
    final["tta"] = tta
    validation: dict = {
        "fingerprint": stamp, "data_fingerprint": data_fp, "n_images": len(cache),
        "before": result["before"], "after": result["after"],
        "per_class_before": {str(k): v for k, v in result["per_class_before"].items()},
        "per_class_after": {str(k): v for k, v in result["per_class_after"].items()},
        "cache_size": cache.meta.get("cache_size"), "skipped_images": len(cache.meta.get("skipped", [])),
        "cache_key": key, "rounds": result["rounds"], "changes": result["steps"], "grids": grids.to_dict(),
        "start": {k: start[k] for k in ("binary", "classes")},
        "seed": {"thresholds": {k: seed[k] for k in ("binary", "classes")}, "source": seed.get("source"),
                 "mean_dice": result["evaluator"].score(seed),
                 "per_class": {str(k): v for k, v in result["evaluator"].per_class(seed).items()}},
        "note": "before/after/seed: mean Dice of the deployed cascade (256x1600 masks: linear resize, "
                "full-resolution areas) on the validation predictions",
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if full_check:
        ray_ready()
        tuned = dataclasses.replace(predictor, thresholds=validate_thresholds(final))
        full = full_resolution_dice(tuned, labels[labels["ImageId"].astype(str).isin(set(cache.image_ids))],
                                    images_uri, score_cfg)
        validation["full_resolution_after"] = {k: full[k] for k in ("mean_dice", "per_class", "n_images")}
        validation["deployed_check"] = {"search": result["after"], "deployed": full["mean_dice"],
                                        "difference": abs(result["after"] - full["mean_dice"]),
                                        "agree": abs(result["after"] - full["mean_dice"]) <= AGREEMENT}
        if not validation["deployed_check"]["agree"]:
            log.warning("tuning's score %.4f and the deployed cascade's %.4f differ by more than %g",
                        result["after"], full["mean_dice"], AGREEMENT)
        validation["gating"] = {k: v for k, v in full["stats"].items() if k != "seg_calls_per_class"}
    final["validation"] = validation
    _write_thresholds(bundle_uri, final)
    files = [storage.join(bundle_uri, "thresholds.json")]
    for name, data in plot_curves(result["evaluator"], start, final, grids).items():
        uri = storage.join(bundle_uri, "tuning", name)
        storage.write_bytes(uri, data)
        files.append(uri)
    summary = {
        "before": result["before"], "after": result["after"],
        "per_class_before": validation["per_class_before"], "per_class_after": validation["per_class_after"],
        "full_resolution_after": validation.get("full_resolution_after"),
        "deployed_check": validation.get("deployed_check"), "seed": validation["seed"],
        "n_images": len(cache), "thresholds": {k: final[k] for k in ("binary", "classes", "tta")},
        "changes": len(result["steps"]), "files": files, "cache": cache_state,
        "seconds": {"predict": round(t_pred, 2), "search": round(t_search, 2), "total": round(time.time() - t0, 2)},
    }
    return summary


def fixed_thresholds(cfg) -> dict:
    """The seed's hand-set thresholds for the config's data, without any search.

    Probabilities and pixel threshold 0.5 (``steel.model.thresholds.default_thresholds``); each class's
    area bounds from ``cfg.tune.area_thresholds`` (EDA's ``area_thresholds.json``) when set, else
    computed here exactly as ``steel eda --split train`` does: the 2nd and 98th percentile of the
    mask areas in the config's train split (the seed's section 4.1). Classes without a training mask
    keep the seed's published bounds. The mapping records where it came from under ``source``.
    """
    from steel.model import thresholds as th_lib

    if cfg.tune.area_thresholds:
        th = th_lib.from_area_json(cfg.tune.area_thresholds)
        source = {"mode": "fixed", "areas": cfg.tune.area_thresholds}
    else:
        from steel.data import labels as dataset
        from steel.report import eda

        wide = dataset.load_labels(cfg.data.path("train_csv"), images=cfg.data.path("train_images"),
                                   skip_bad=cfg.data.skip_bad)
        train = dataset.split(wide, seed=cfg.data.seed)["train"]
        areas = eda.area_thresholds(eda.mask_areas(train))
        th = th_lib.merge_areas(th_lib.default_thresholds(), areas)
        source = {"mode": "fixed", "areas": f"train split ({len(train)} images, seed {cfg.data.seed}), "
                                            f"percentiles {list(eda.PERCENTILES)}"}
    th["tta"] = cfg.tune.tta
    th["source"] = source
    return validate_thresholds(th)


def write_fixed(cfg, bundle_uri: str | None = None, full_check: bool = True, batch_size: int = 8,
                stamp: str | None = None, ray_address: str | None = None) -> dict:
    """Write :func:`fixed_thresholds` into the bundle; with ``full_check``, also the validation split's
    mean Dice of the cascade with them (what scoring deploys), recorded under ``validation``."""
    bundle_uri = bundle_uri or cfg.bundle
    th = fixed_thresholds(cfg)
    summary: dict = {"mode": "fixed", "thresholds": th, "source": th["source"]}
    if full_check:
        from steel.core import storage
        from steel.score.run import BundleCascade

        labels, data_fp = validation_labels(cfg)
        score_cfg = dataclasses.replace(cfg.score, batch_size=batch_size, tta=th["tta"], allow_resize=False)
        _ray_for_models(ray_address or cfg.ray_address, score_cfg)
        predictor = BundleCascade(str(bundle_uri), th, th["tta"], endpoint=storage.current_endpoint())
        full = full_resolution_dice(predictor, labels, cfg.data.path("train_images"), score_cfg)
        th["validation"] = {"split": "val", "fingerprint": stamp, "data_fingerprint": data_fp, "mean_dice": full["mean_dice"],
                            "per_class": full["per_class"], "n_images": full["n_images"]}
        summary["validation"] = th["validation"]
    _write_thresholds(bundle_uri, th)
    return summary


def format_summary(s: dict) -> str:
    if s.get("mode") == "fixed":
        th, v = s["thresholds"], s.get("validation")
        lines = [f"fixed thresholds (no search): areas from {s['source']['areas']}"]
        if v:
            lines.append(f"validation mean Dice (full resolution, {v['n_images']} images): {v['mean_dice']:.4f}")
        lines.append(f"t_bin {th['binary']:.2f}")
        lines.extend(f"class {k}: prob {c['prob']:.2f} pixel {c['pixel']:.2f} area {c['min_area']}-{c['max_area']}"
                     for k, c in th["classes"].items())
        return "\n".join(lines)
    lines = [f"validation mean Dice ({s['n_images']} images): {s['before']:.4f} -> {s['after']:.4f} "
             f"({s['changes']} threshold changes)", f"validation predictions: {s.get('cache', 'computed')}"]
    seed = s.get("seed")
    if seed:
        lines.append(f"seed's fixed thresholds on the same images: {seed['mean_dice']:.4f} "
                     f"(tuned {s['after']:.4f})")
    check = s.get("deployed_check")
    if check:
        lines.append(f"deployed check: search {check['search']:.4f}, deployed cascade {check['deployed']:.4f} "
                     f"(|difference| {check['difference']:.5f}, {'within' if check['agree'] else 'NOT within'} "
                     f"{AGREEMENT})")
    th = s["thresholds"]
    lines.append(f"t_bin {th['binary']:.2f}")
    for k in CLASSES:
        c = th["classes"][str(k)]
        seed_k = f", seed {seed['per_class'][str(k)]:.4f}" if seed else ""
        lines.append(f"class {k}: prob {c['prob']:.2f} pixel {c['pixel']:.2f} area {c['min_area']}-{c['max_area']}"
                     f"  Dice {s['per_class_before'][str(k)]:.4f} -> {s['per_class_after'][str(k)]:.4f}{seed_k}")
    lines.append("files: " + ", ".join(s["files"]))
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    return "\n".join(lines)


__all__ = ["PredictionCache", "Evaluator", "Grids", "search", "sweep", "plot_curves", "predict_cache",
           "cache_sizes", "cache_key", "load_cache", "bundle_identity",
           "truth_maps", "read_image", "full_resolution_dice", "validation_labels", "tune", "format_summary",
           "fixed_thresholds", "write_fixed",
           "default_cache_size", "pixel_grid", "AGREEMENT", "MAX_AREA_GRID"]
