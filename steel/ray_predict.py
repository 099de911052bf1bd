"""Validation predictions for threshold tuning, on Ray: scoring's pipeline with a probability stage.

Tuning needs two passes of the cascade over the labelled validation images: the raw (ungated)
probabilities of every model, and, after the search, the tuned cascade's masks at full resolution.
Both run on the cluster through the very pipeline batch scoring uses
(:func:`steel.scoring.cascade_dataset`: ``from_items -> decode_batch -> actor pool``, GPU actors
when ``score.gpus_per_actor > 0``); the driver only collects small results:

- :func:`predict_probabilities`: :class:`ProbabilityActor` (a :class:`~steel.scoring.CascadeActor`
  returning per image ``p_defect``, ``p_class`` and each segmenter's map already reduced to the
  cache resolution, float16: ~200 KB per image instead of 6.5 MB);
- :func:`predict_masks`: scoring's own :class:`~steel.scoring.CascadeActor` with the tuned
  thresholds (the same masks ``steel score`` would write).

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

from steel import storage
from steel.scoring import CascadeActor, _add_stats, cascade_dataset
from steel.thresholds import CLASSES

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Actor side
# --------------------------------------------------------------------------------------------

class _Probabilities:
    """Predictor: every model's raw probabilities, segmenter maps reduced to ``sizes[k]``."""

    def __init__(self, cascade, sizes: dict[int, tuple[int, int]]):
        self.cascade = cascade
        self.sizes = sizes

    def predict(self, images: np.ndarray) -> list[dict]:
        from steel.cascade import resize_prob

        p = self.cascade.predict_probabilities(images, seg_size=None, seg_dtype=np.float32)
        return [{"p_defect": float(p["p_defect"][i]), "p_class": np.asarray(p["p_class"][i], np.float32),
                 "seg": {k: resize_prob(p["seg"][k][i], self.sizes[k], "area").astype(np.float16) for k in CLASSES}}
                for i in range(len(images))]


@dataclass
class ProbabilityPredictor:
    """Picklable factory: ``cascade_factory()`` (e.g. :class:`~steel.scoring.BundleCascade`) wrapped to
    return probabilities at cache resolution ``sizes`` ({class: (h, w)})."""

    cascade_factory: Callable[[], Any]
    sizes: dict[int, tuple[int, int]]

    def __call__(self) -> _Probabilities:
        return _Probabilities(self.cascade_factory(), {int(k): tuple(v) for k, v in self.sizes.items()})


class ProbabilityActor(CascadeActor):
    """Ray Data actor stage of the tuning pass: probabilities instead of thresholded masks.

    In: :func:`~steel.scoring.decode_batch`'s columns. Out: ``image_id``, ``error`` (decode error or
    ''), ``p_defect``, ``p_class`` (N x 4) and ``seg_<k>`` (N x h_k x w_k float16; zeros on error rows).
    """

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image_id"])
        ids = [str(v) for v in batch["image_id"]]
        errors = np.asarray(batch["error"], dtype=object).copy()
        sizes = self.predictor.sizes
        out = {"image_id": np.asarray(ids, dtype=object), "error": errors,
               "error_kind": np.asarray(batch.get("error_kind", np.where(errors == "", "", "decode")), dtype=object),
               "p_defect": np.full(n, np.nan, np.float32), "p_class": np.full((n, 4), np.nan, np.float32),
               **{f"seg_{k}": np.zeros((n, *sizes[k]), np.float16) for k in CLASSES}}
        ok = np.flatnonzero(errors == "")
        if ok.size:
            results = self._predict(np.asarray(batch["image"])[ok])
            for i, res in zip(ok, results):
                if isinstance(res, Exception):
                    raise RuntimeError(f"{batch['file'][i]}: the cascade failed on this validation image: "
                                       f"{type(res).__name__}: {res}") from res
                out["p_defect"][i] = res["p_defect"]
                out["p_class"][i] = res["p_class"]
                for k in CLASSES:
                    out[f"seg_{k}"][i] = res["seg"][k]
        return out


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------

def _items(image_ids: Sequence[str], images_uri: str) -> tuple[list[dict], Any]:
    fs, _ = storage.resolve(images_uri)
    items = []
    for image_id in image_ids:
        uri = storage.join(images_uri, image_id)
        items.append({"shard": "validation", "image_id": str(image_id), "file": uri, "path": storage.resolve(uri)[1]})
    return items, fs


def _skip_reason(batch: dict, i: int) -> str:
    """The reason to leave row ``i`` out: only an undecodable file is skipped. A transient failure
    (storage, network, predictor) that outlived scoring's retries fails the pass instead, so tuning
    never quietly drops validation images."""
    reason = str(batch["error"][i])
    if str(batch.get("error_kind", [""] * (i + 1))[i]) == "transient":
        raise RuntimeError(f"{batch['image_id'][i]}: failed after retries ({reason}); tuning needs every "
                           f"validation image: run it again once the store answers")
    return reason


def _formats(score_cfg) -> tuple[str, ...]:
    from steel import score_io

    return tuple(getattr(score_cfg, "image_formats", None) or score_io.DEFAULT_IMAGE_FORMATS)


def predict_probabilities(cascade_factory: Callable[[], Any], image_ids: Sequence[str], images_uri: str,
                          sizes: dict[int, tuple[int, int]], score_cfg) -> dict:
    """Every model's probabilities for ``image_ids`` under ``images_uri``, computed by Ray actors.

    Returns ``{"image_ids": [...] (in the given order, undecodable ones left out), "p_defect": (N,),
    "p_class": (N, 4), "seg": {k: (N, h_k, w_k) float16}, "skipped": [{"ImageId", "reason"}]}``.
    ``score_cfg``: a :class:`steel.config.ScoreConfig` (actors, batch_size, gpus_per_actor).
    """
    items, fs = _items(image_ids, images_uri)
    factory = ProbabilityPredictor(cascade_factory, sizes)
    ds = cascade_dataset(items, score_cfg, fs, _formats(score_cfg), factory, actor=ProbabilityActor)
    got: dict[str, tuple] = {}
    skipped: dict[str, str] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, image_id in enumerate(batch["image_id"]):
            image_id = str(image_id)
            if batch["error"][i]:
                skipped[image_id] = _skip_reason(batch, i)
                continue
            got[image_id] = (batch["p_defect"][i], batch["p_class"][i], [batch[f"seg_{k}"][i] for k in CLASSES])
    kept = [str(i) for i in image_ids if str(i) in got]
    for image_id, reason in skipped.items():
        log.warning("skipping %s: %s", image_id, reason)
    return {
        "image_ids": kept,
        "p_defect": np.asarray([got[i][0] for i in kept], np.float32).reshape(-1),
        "p_class": np.asarray([got[i][1] for i in kept], np.float32).reshape(-1, 4),
        "seg": {k: (np.stack([got[i][2][j] for i in kept]) if kept else np.zeros((0, *sizes[k]), np.float16))
                for j, k in enumerate(CLASSES)},
        "skipped": [{"ImageId": i, "reason": skipped[i]} for i in map(str, image_ids) if i in skipped],
    }


def predict_masks(cascade_factory: Callable[[], Any], image_ids: Sequence[str], images_uri: str,
                  score_cfg) -> tuple[list[dict], list[str], dict]:
    """The thresholded cascade's submission rows for ``image_ids``, by scoring's own actor stage.

    Returns ``(rows, used_ids, gating)``: ``rows`` ImageId/ClassId/EncodedPixels (4 per used image),
    the ids that decoded, and the cascade's summed gating counts.
    """
    items, fs = _items(image_ids, images_uri)
    ds = cascade_dataset(items, score_cfg, fs, _formats(score_cfg), cascade_factory)
    rows: list[dict] = []
    used: list[str] = []
    gating: dict = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, image_id in enumerate(batch["image_id"]):
            if batch["stats"][i]:
                _add_stats(gating, json.loads(batch["stats"][i]))
            if batch["error"][i]:
                log.warning("skipping %s: %s", image_id, _skip_reason(batch, i))
                continue
            used.append(str(image_id))
            rows.extend({"ImageId": str(image_id), "ClassId": k, "EncodedPixels": str(batch[f"mask_{k}"][i])}
                        for k in CLASSES)
    return rows, used, gating


__all__ = ["ProbabilityPredictor", "ProbabilityActor", "predict_probabilities", "predict_masks"]
