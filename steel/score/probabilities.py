"""Validation predictions for threshold tuning, on Ray: scoring's pipeline with a probability stage.

Tuning needs two passes of the cascade over the labelled validation images: the raw (ungated)
probabilities of every model, and, after the search, the tuned cascade's masks at full resolution.
Both run on the cluster through the very pipeline batch scoring uses
(:func:`steel.score.stages.cascade_dataset`: ``from_items -> decode_batch -> actor pool``, GPU actors
when ``score.gpus_per_actor > 0``); the driver only collects small results:

- :func:`predict_probabilities`: :class:`ProbabilityActor` (a :class:`~steel.score.stages.CascadeActor`
  returning per image ``p_defect``, ``p_class`` and each segmenter's map already reduced to the
  cache resolution, float16: ~200 KB per image instead of 6.5 MB);
- :func:`predict_masks`: scoring's own :class:`~steel.score.stages.CascadeActor` with the tuned
  thresholds (the same masks ``steel score`` would write).

With the images' truth masks, the probability pass also returns, per image and class, what the
deployed cascade would make of each pixel threshold (:func:`full_tables`: the segmenter map resized
to 256 x 1600 with ``cv2.INTER_LINEAR`` exactly as :func:`steel.model.cascade.mask_from_prob` does, the
mask's area and its overlap with the truth, in full-resolution pixels), and the seed's soft Dice sums
at the segmenter's output resolution. Tuning's search and the per-split evaluation score thresholds
from these tables, so their numbers are the deployed cascade's.

Images that cannot be decoded are left out and reported (``skipped``). In the probability pass a
model failure fails the pass (tuning on a silently smaller set would move the thresholds); the
full-resolution check leaves such images out with a warning and counts only the images it used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from steel.core import storage
from steel.core.names import CLASSES, IMAGE_FORMATS, SHAPE
from steel.data import rle
from steel.score.stages import CascadeActor, add_stats, cascade_dataset

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Actor side
# --------------------------------------------------------------------------------------------

def full_tables(prob: np.ndarray, truth: np.ndarray | None, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deployed area and truth overlap of one segmenter map at every pixel threshold in ``edges``.

    ``prob`` is the segmenter's map at its output resolution; it is resized to 256 x 1600 as the
    cascade deploys it (``resize_prob(..., "linear")``) and compared in float32 as
    :func:`steel.model.cascade.mask_from_prob` does. Returns ``(area, inter)``, int64 (P,) each:
    pixels with ``full >= edges[j]``, and how many of them the truth mask (256 x 1600, or None) holds.
    """
    from steel.model.cascade import resize_prob

    full = resize_prob(prob, SHAPE, "linear").ravel()
    p = edges.size
    bins = np.searchsorted(edges, full, side="right")  # value >= edges[j] iff bin > j
    counts = np.bincount(bins, minlength=p + 1)
    area = np.cumsum(counts[::-1])[::-1][1:]
    if truth is None or not truth.any():
        return area.astype(np.int64), np.zeros(p, np.int64)
    inters = np.bincount(bins[truth.ravel() > 0], minlength=p + 1)
    return area.astype(np.int64), np.cumsum(inters[::-1])[::-1][1:].astype(np.int64)


def soft_sums(prob: np.ndarray, truth: np.ndarray | None) -> tuple[float, float, float]:
    """The seed's soft Dice sums of one segmenter map at its output resolution: (sum(p * t), sum(p),
    sum(t)), the truth mask brought to that resolution with ``cv2.INTER_AREA`` (cell coverage)."""
    from steel.model.cascade import resize_prob

    prob = np.asarray(prob, np.float32)
    if truth is None or not truth.any():
        return 0.0, float(prob.sum()), 0.0
    t = resize_prob(truth.astype(np.float32), prob.shape, "area")
    return float((prob * t).sum()), float(prob.sum()), float(t.sum())


class _Probabilities:
    """Predictor: every model's raw probabilities, segmenter maps reduced to ``sizes[k]`` (none when
    ``sizes`` is None); with ``truth`` ({ImageId: 4 RLEs}) also :func:`full_tables` at ``edges`` and
    :func:`soft_sums` per class (see :meth:`predict`)."""

    def __init__(self, cascade, sizes: dict[int, tuple[int, int]] | None, truth: dict | None = None,
                 edges: Sequence[float] | None = None):
        self.cascade = cascade
        self.sizes = sizes
        self.truth = truth
        self.edges = np.asarray(sorted(set(float(v) for v in edges or ())), dtype=np.float32)

    def predict(self, images: np.ndarray) -> list[dict]:
        from steel.model.cascade import resize_prob

        p = self.cascade.predict_probabilities(images, seg_size=None, seg_dtype=np.float32)
        out = []
        for i in range(len(images)):
            item = {"p_defect": float(p["p_defect"][i]), "p_class": np.asarray(p["p_class"][i], np.float32),
                    "seg": ({k: resize_prob(p["seg"][k][i], self.sizes[k], "area").astype(np.float16) for k in CLASSES}
                            if self.sizes else {})}
            if self.truth is not None:  # the maps at output resolution, for add_tables (needs the image id)
                item["seg_raw"] = {k: p["seg"][k][i] for k in CLASSES}
            out.append(item)
        return out

    def add_tables(self, image_id: str, item: dict) -> None:
        """Replace ``item["seg_raw"]`` by ``area``/``inter`` (4, P) (:func:`full_tables`) and ``soft``
        (4, 3) (:func:`soft_sums`) against the image's truth."""
        codes = self.truth.get(str(image_id))
        if codes is None:
            raise ValueError(f"{image_id}: no truth given for this image")
        raw = item.pop("seg_raw")
        masks = [rle.decode(c) if isinstance(c, str) and c.strip() else None for c in codes]
        tables = [full_tables(raw[k], masks[j], self.edges) for j, k in enumerate(CLASSES)]
        item["area"] = np.stack([t[0] for t in tables])
        item["inter"] = np.stack([t[1] for t in tables])
        item["soft"] = np.asarray([soft_sums(raw[k], masks[j]) for j, k in enumerate(CLASSES)], np.float64)


@dataclass
class ProbabilityPredictor:
    """Picklable factory: ``cascade_factory()`` (e.g. :class:`~steel.model.predictor.BundleCascade`) wrapped to
    return probabilities at cache resolution ``sizes`` ({class: (h, w)}, or None: no maps) and, with
    ``truth`` ({ImageId: [4 RLEs]}), the deployed tables at pixel thresholds ``edges``."""

    cascade_factory: Callable[[], Any]
    sizes: dict[int, tuple[int, int]] | None
    truth: dict | None = None
    edges: tuple[float, ...] | None = None

    def __call__(self) -> _Probabilities:
        sizes = {int(k): tuple(v) for k, v in self.sizes.items()} if self.sizes else None
        return _Probabilities(self.cascade_factory(), sizes, self.truth, self.edges)


class ProbabilityActor(CascadeActor):
    """Ray Data actor stage of the tuning pass: probabilities instead of thresholded masks.

    In: :func:`~steel.score.stages.decode_batch`'s columns. Out: ``image_id``, ``error`` (decode error or
    ''), ``p_defect``, ``p_class`` (N x 4) and ``seg_<k>`` (N x h_k x w_k float16; zeros on error
    rows; absent without cache sizes); with truth also ``area``/``inter`` (N x 4 x P int64) and
    ``soft`` (N x 4 x 3) (see :class:`_Probabilities`).
    """

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image_id"])
        ids = [str(v) for v in batch["image_id"]]
        errors = np.asarray(batch["error"], dtype=object).copy()
        sizes = self.predictor.sizes or {}
        out = {"image_id": np.asarray(ids, dtype=object), "error": errors,
               "error_kind": np.asarray(batch.get("error_kind", np.where(errors == "", "", "decode")), dtype=object),
               "p_defect": np.full(n, np.nan, np.float32), "p_class": np.full((n, 4), np.nan, np.float32),
               **{f"seg_{k}": np.zeros((n, *sizes[k]), np.float16) for k in sizes}}
        tables = self.predictor.truth is not None
        if tables:
            p = self.predictor.edges.size
            out.update(area=np.zeros((n, 4, p), np.int64), inter=np.zeros((n, 4, p), np.int64),
                       soft=np.zeros((n, 4, 3), np.float64))
        ok = np.flatnonzero(errors == "")
        if ok.size:
            results = self._predict(np.asarray(batch["image"])[ok])
            for i, res in zip(ok, results):
                if isinstance(res, Exception):
                    raise RuntimeError(f"{batch['file'][i]}: the cascade failed on this validation image: "
                                       f"{type(res).__name__}: {res}") from res
                out["p_defect"][i] = res["p_defect"]
                out["p_class"][i] = res["p_class"]
                for k in sizes:
                    out[f"seg_{k}"][i] = res["seg"][k]
                if tables:
                    self.predictor.add_tables(ids[i], res)
                    for name in ("area", "inter", "soft"):
                        out[name][i] = res[name]
        return out


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------

def _items(image_ids: Sequence[str], images_uri: str) -> list[dict]:
    return [{"shard": "validation", "image_id": str(i), "file": storage.join(images_uri, i)} for i in image_ids]


def _skip_reason(batch: dict, i: int) -> str:
    """The reason to leave row ``i`` out: only an undecodable file is skipped. A transient failure
    (storage, network, predictor) that outlived scoring's retries fails the pass instead, so tuning
    never quietly drops validation images."""
    reason = str(batch["error"][i])
    if str(batch.get("error_kind", [""] * (i + 1))[i]) in ("transient", "gone"):
        raise RuntimeError(f"{batch['image_id'][i]}: failed after retries ({reason}); tuning needs every "
                           f"validation image: run it again once the store answers")
    return reason


def _formats(score_cfg) -> tuple[str, ...]:

    return tuple(getattr(score_cfg, "image_formats", None) or IMAGE_FORMATS)


def predict_probabilities(cascade_factory: Callable[[], Any], image_ids: Sequence[str], images_uri: str,
                          sizes: dict[int, tuple[int, int]] | None, score_cfg, truth: dict | None = None,
                          edges: Sequence[float] | None = None) -> dict:
    """Every model's probabilities for ``image_ids`` under ``images_uri``, computed by Ray actors.

    Returns ``{"image_ids": [...] (in the given order, undecodable ones left out), "p_defect": (N,),
    "p_class": (N, 4), "seg": {k: (N, h_k, w_k) float16} ({} when ``sizes`` is None),
    "skipped": [{"ImageId", "reason"}]}``; with ``truth`` ({ImageId: [4 RLEs]}) and pixel thresholds
    ``edges`` also ``"edges"`` (P,) float32, ``"area"``/``"inter"`` (N, 4, P) int64: the deployed
    mask's area and truth overlap per threshold (:func:`full_tables`), and ``"soft"`` (N, 4, 3)
    (:func:`soft_sums`). ``score_cfg``: a :class:`steel.core.config.ScoreConfig` (actors, batch_size,
    gpus_per_actor).
    """
    if truth is not None and not edges:
        raise ValueError("truth tables need the pixel thresholds (edges) to count at")
    items = _items(image_ids, images_uri)
    factory = ProbabilityPredictor(cascade_factory, sizes, truth, tuple(float(v) for v in edges) if edges else None)
    ds = cascade_dataset(items, score_cfg, _formats(score_cfg), factory, actor=ProbabilityActor)
    got: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    extra = ("area", "inter", "soft") if truth is not None else ()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, image_id in enumerate(batch["image_id"]):
            image_id = str(image_id)
            if batch["error"][i]:
                skipped[image_id] = _skip_reason(batch, i)
                continue
            got[image_id] = {"p_defect": batch["p_defect"][i], "p_class": batch["p_class"][i],
                             **{f"seg_{k}": batch[f"seg_{k}"][i] for k in (sizes or {})},
                             **{name: batch[name][i] for name in extra}}
    kept = [str(i) for i in image_ids if str(i) in got]
    for image_id, reason in skipped.items():
        log.warning("skipping %s: %s", image_id, reason)
    out = {
        "image_ids": kept,
        "p_defect": np.asarray([got[i]["p_defect"] for i in kept], np.float32).reshape(-1),
        "p_class": np.asarray([got[i]["p_class"] for i in kept], np.float32).reshape(-1, 4),
        "seg": {k: (np.stack([got[i][f"seg_{k}"] for i in kept]) if kept else np.zeros((0, *sizes[k]), np.float16))
                for k in (sizes or {})},
        "skipped": [{"ImageId": i, "reason": skipped[i]} for i in map(str, image_ids) if i in skipped],
    }
    if truth is not None:
        p = len(set(float(v) for v in edges))
        out["edges"] = np.asarray(sorted(set(float(v) for v in edges)), np.float32)
        out["area"] = np.asarray([got[i]["area"] for i in kept], np.int64).reshape(-1, 4, p)
        out["inter"] = np.asarray([got[i]["inter"] for i in kept], np.int64).reshape(-1, 4, p)
        out["soft"] = np.asarray([got[i]["soft"] for i in kept], np.float64).reshape(-1, 4, 3)
    return out


def predict_masks(cascade_factory: Callable[[], Any], image_ids: Sequence[str], images_uri: str,
                  score_cfg) -> tuple[list[dict], list[str], dict]:
    """The thresholded cascade's submission rows for ``image_ids``, by scoring's own actor stage.

    Returns ``(rows, used_ids, gating)``: ``rows`` ImageId/ClassId/EncodedPixels (4 per used image),
    the ids that decoded, and the cascade's summed gating counts.
    """
    items = _items(image_ids, images_uri)
    ds = cascade_dataset(items, score_cfg, _formats(score_cfg), cascade_factory)
    rows: list[dict] = []
    used: list[str] = []
    gating: dict = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, image_id in enumerate(batch["image_id"]):
            if batch["stats"][i]:
                add_stats(gating, json.loads(batch["stats"][i]))
            if batch["error"][i]:
                log.warning("skipping %s: %s", image_id, _skip_reason(batch, i))
                continue
            used.append(str(image_id))
            rows.extend({"ImageId": str(image_id), "ClassId": k, "EncodedPixels": str(batch[f"mask_{k}"][i])}
                        for k in CLASSES)
    return rows, used, gating


__all__ = ["full_tables", "soft_sums", "ProbabilityPredictor", "ProbabilityActor", "predict_probabilities", "predict_masks"]
