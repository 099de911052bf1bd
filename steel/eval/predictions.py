"""Validation predictions, computed once per bundle and split: the cache tuning searches and evaluation scores.

The models run **once** over the labelled images (:func:`predict_cache`), on Ray actors through
scoring's own pipeline (:mod:`steel.score.probabilities`; GPU actors with ``score.gpus_per_actor``;
the driver runs no model): binary and multilabel probabilities and every segmenter's probability map
(ungated), reduced in the actor to exact full-resolution tables (and, with a cache size, the maps
downsampled with ``cv2.INTER_AREA`` as float16 beside their truth as coverage fractions). A saved
cache carries its key (:func:`cache_key`: the models' weights sha256 and specs, TTA, cache size,
labels, pixel grid) and is reused only for the same key (:func:`load_cache`).

:func:`full_resolution_dice` is the other pass: the thresholded cascade's masks at 256 x 1600 (the
same masks ``steel score`` writes) against the labels.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from steel.core.names import CLASSES, PIXELS
from steel.data import rle

log = logging.getLogger(__name__)

MAX_CACHE_PIXELS = 64 * 400  # default cap of the cached map size per image and class (25,600 cells)


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




def predict_cache(cascade_factory: Callable[[], Any], labels, images_uri: str,
                  sizes: dict[int, tuple[int, int]] | None, score_cfg=None, key: dict | None = None,
                  pixels: Sequence[float] | None = None) -> PredictionCache:
    """Run every model once over the labelled images, on Ray actors, and cache probabilities.

    Args:
        cascade_factory: picklable ``f() -> Cascade`` built once per actor, e.g.
            :class:`steel.model.predictor.BundleCascade` (its thresholds are not used here).
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


def pixel_values(*thresholds: dict, grid: Sequence[float] = ()) -> list[float]:
    """The pixel thresholds the actors count the exact tables at: ``grid``'s and every given thresholds set's."""
    values = {float(v) for v in grid}
    for th in thresholds:
        values |= {float(th["classes"][str(k)]["pixel"]) for k in CLASSES}
    return sorted(values)


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




def full_resolution_dice(cascade_factory: Callable[[], Any], labels, images_uri: str, score_cfg=None) -> dict:
    """Mean Dice (overall, per class) at 256x1600 of the thresholded cascade against the labels' masks.

    The masks come from Ray actors running scoring's own stage (:func:`steel.score.probabilities.predict_masks`)
    with ``cascade_factory`` (e.g. :class:`steel.model.predictor.BundleCascade` with the tuned thresholds).
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
