"""The seed's evaluation protocol: every model and the whole cascade on the train, val and test splits.

The seed notebook (sections 5-6) reports, for ``X_train``, ``X_val`` and ``X_test`` (the labelled
split of :func:`steel.data.labels.split`): each classifier's loss, accuracy, F1, precision and recall,
each U-Net's Dice, the cascade's mean Dice overall and per class, and classification reports and
confusion matrices. :func:`evaluate_splits` computes all of them from **one** pass of the models
over each split, on Ray actors through scoring's own pipeline (:func:`steel.eval.predictions.predict_cache`:
decode tasks, then the actor pool of ``score.*``):

- the classifiers' metrics come from the probabilities the cascade computes (ungated): the binary
  classifier on every image of the split (truth: any defect), the 4-label classifier on the split's
  images with a defect (the images it trains on; truth: which classes), both rounded at 0.5 as the
  seed's metrics (``tf.round``: a probability counts as positive above 0.5), loss = binary
  cross-entropy; F1/precision/recall over the whole split (the seed's Keras metrics average them
  per batch);
- each U-Net's Dice is the seed's soft ``dice_coef`` (smooth 1) over the split's images with its class,
  at the segmenter's output resolution (truth resized there by area: coverage fractions);
- the cascade's Dice, per class and image-level presence, come from the exact full-resolution tables
  of the deployed cascade (:func:`steel.score.probabilities.full_tables`), scored by tuning's
  :class:`~steel.eval.evaluator.Evaluator`, for each named thresholds set (the bundle's deployed thresholds
  and the seed's fixed ones, side by side).

For the unified model (``train.kind: unified``) the "classifiers" are its heads (``cls[:, 0]``,
``cls[:, 1:]``) and the "U-Nets" its mask channels: the same numbers from the same pass.

A split larger than ``max_images`` is sampled (deterministically, seeded) and the tables say so.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from steel.core import figures
from steel.core.names import CLASSES, class_of, is_segmenter
from steel.eval import metrics
from steel.eval import report as eval_report

log = logging.getLogger(__name__)

EPS = 1e-7  # the seed's K.epsilon(), clipping probabilities in the loss


def sample(table, max_images: int | None, seed: int = 0):
    """``table`` itself, or ``max_images`` of its rows chosen with ``seed`` (in ImageId order)."""
    if max_images is None or len(table) <= max_images:
        return table
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    return table.sample(n=max_images, random_state=seed).sort_values("ImageId").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Numbers (numpy only)
# --------------------------------------------------------------------------------------------

def classifier_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """Loss (binary cross-entropy), accuracy, F1, precision, recall of probabilities ``p`` against 0/1
    ``y`` (same shape; multi-label entries all count), positives where ``p > 0.5`` (the seed's round)."""
    y = np.asarray(y, np.float64).ravel()
    p = np.asarray(p, np.float64).ravel()
    if y.size == 0:
        return {"n": 0, "loss": float("nan"), "accuracy": float("nan"), "f1": float("nan"),
                "precision": float("nan"), "recall": float("nan")}
    q = np.clip(p, EPS, 1 - EPS)
    loss = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    pred = p > 0.5
    truth = y > 0.5
    tp = float(np.sum(pred & truth))
    precision = tp / pred.sum() if pred.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": int(y.size), "loss": loss, "accuracy": float(np.mean(pred == truth)), "f1": float(f1),
            "precision": float(precision), "recall": float(recall)}


def split_tables(cache, thresholds: dict[str, dict]) -> dict:
    """Every table of one split from a :class:`steel.eval.predictions.PredictionCache` with exact tables and
    soft sums (``full_*``): ``{"n_images", "models": {...}, "cascade": {name: {...}}}``."""
    from steel.eval.evaluator import Evaluator

    if not cache.exact or cache.full_soft is None:
        raise ValueError("split_tables needs a cache with the exact full-resolution tables and soft sums")
    y_class = (cache.truth_area > 0).astype(int)  # (N, 4)
    y_any = y_class.max(axis=1)
    defect = y_any == 1
    models: dict[str, dict] = {
        "binary": classifier_metrics(y_any, cache.p_defect),
        "multilabel": {**classifier_metrics(y_class[defect], cache.p_class[defect]), "images": int(defect.sum())},
    }
    models["binary"]["images"] = len(cache)
    for j, k in enumerate(CLASSES):
        has = y_class[:, j] == 1
        inter, pred, truth = cache.full_soft[has, j].sum(axis=0) if has.any() else (0.0, 0.0, 0.0)
        models[f"seg{k}"] = {"images": int(has.sum()),
                             "dice": float((2 * inter + 1) / (pred + truth + 1)) if has.any() else float("nan")}
    ev = Evaluator(cache)
    cascade = {}
    for name, th in thresholds.items():
        per_class = ev.per_class(th)
        y_pred = np.stack([ev.kept(k, th["binary"], **{key: th["classes"][str(k)][key] for key in
                                                        ("prob", "pixel", "min_area", "max_area")})
                           for k in CLASSES], axis=1).astype(int)
        report, text = eval_report.classification_reports(y_class, y_pred)
        cascade[name] = {"mean_dice": float(np.mean(list(per_class.values()))),
                         "per_class": {str(k): float(v) for k, v in per_class.items()},
                         "baseline_all_empty": metrics.all_empty(y_class)[0],
                         "confusion": eval_report.confusion(y_class, y_pred),
                         "classification_report": report, "classification_text": text}
    return {"n_images": len(cache), "models": models, "cascade": cascade}


# --------------------------------------------------------------------------------------------
# Ray: one pass per split
# --------------------------------------------------------------------------------------------

def reusable(cache, key: dict, pixels) -> bool:
    """Whether a saved exact cache (e.g. tuning's validation pass) is what a new pass would compute:
    same models, TTA and labelled images as ``key`` (:func:`steel.eval.predictions.cache_key`), soft sums, and
    tables at every pixel threshold in ``pixels``."""
    have = cache.meta.get("key") or {}
    if not cache.exact or cache.full_soft is None:
        return False
    if any(have.get(name) != key.get(name) for name in ("models", "tta", "labels")):
        return False
    edges = set(np.asarray(cache.full_edges, np.float32).tolist())
    return all(float(np.float32(p)) in edges for p in pixels)


def evaluate_splits(splits: dict, images_uri: str, cascade_factory, thresholds: dict[str, dict], score_cfg,
                    max_images: int | None = None, seed: int = 0, kind: str = "cascade",
                    identity: dict | None = None, reuse: dict | None = None) -> dict:
    """The seed's tables for each split (see the module docstring).

    Args:
        splits: {name: wide label table} (``steel.data.labels.split``'s), evaluated in this order.
        images_uri: folder holding the images (the training images).
        cascade_factory: picklable ``f() -> Cascade`` (e.g. :class:`steel.model.predictor.BundleCascade`; its
            thresholds are not used: only probabilities leave the actors).
        thresholds: {name: thresholds mapping} scored side by side (e.g. ``deployed`` and ``seed``).
        score_cfg: :class:`steel.core.config.ScoreConfig` of the actor pool.
        max_images: images per split at most (a seeded sample above it); None: all.
        kind: ``cascade`` or ``unified`` (names the models in the tables).
        identity, reuse: the bundle's :func:`steel.eval.predictions.bundle_identity` and {split: saved
            :class:`~steel.eval.predictions.PredictionCache`}: a split whose saved cache is :func:`reusable`
            (tuning's validation pass of the same models and images) is not predicted again.
    Returns ``{"splits": {name: split_tables(...) + "of" (split size), "sampled", "skipped",
    "reused"}, "kind", "max_images", "thresholds": {name: {binary, classes}}, "seconds"}``.
    """
    from steel.eval.predictions import cache_key, pixel_values, predict_cache

    pixels = pixel_values(*thresholds.values())
    out: dict[str, Any] = {"splits": {}, "kind": kind, "max_images": max_images,
                           "thresholds": {n: {k: th[k] for k in ("binary", "classes")} for n, th in thresholds.items()}}
    t0 = time.time()
    for name, table in splits.items():
        chosen = sample(table, max_images, seed)
        cache = (reuse or {}).get(name)
        tta = getattr(cascade_factory, "tta", None)
        if cache is None or identity is None or not reusable(cache, cache_key(identity, tta, None, chosen), pixels):
            cache = predict_cache(cascade_factory, chosen, images_uri, None, score_cfg, pixels=pixels)
        tables = split_tables(cache, thresholds)
        tables.update(split=name, of=len(table), sampled=len(chosen) < len(table),
                      skipped=[s["ImageId"] for s in cache.meta.get("skipped", [])],
                      reused=bool(reuse and cache is reuse.get(name)))
        out["splits"][name] = tables
        log.info("%s split: %d images, cascade mean Dice %s", name, len(cache),
                 ", ".join(f"{n} {t['mean_dice']:.4f}" for n, t in tables["cascade"].items()))
    out["seconds"] = round(time.time() - t0, 1)
    return out


# --------------------------------------------------------------------------------------------
# Tables (Markdown and plain text)
# --------------------------------------------------------------------------------------------

def _model_label(name: str, kind: str) -> str:
    if kind != "unified":
        labels = {"binary": "binary classifier", "multilabel": "4-label classifier"}
        return labels[name] if name in labels else f"U-Net class {class_of(name)}"
    labels = {"binary": "unified: defect head cls[0]", "multilabel": "unified: class heads cls[1:5]"}
    return labels[name] if name in labels else f"unified: mask channel {class_of(name)}"


def _f(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def _images(t: dict) -> str:
    return f"{t['n_images']} of {t['of']} (sampled)" if t.get("sampled") else str(t["n_images"])


def cascade_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, t in result["splits"].items():
        for th_name, c in t["cascade"].items():
            rows.append([name, _images(t), th_name, _f(c["mean_dice"]), *(_f(c["per_class"][str(k)]) for k in CLASSES),
                         _f(c["baseline_all_empty"])])
    return rows


def model_rows(result: dict) -> list[list[str]]:
    rows = []
    for model in ("binary", "multilabel", *(f"seg{k}" for k in CLASSES)):
        for name, t in result["splits"].items():
            m = t["models"][model]
            if is_segmenter(model):
                rows.append([_model_label(model, result["kind"]), name, str(m["images"]), "", "", "", "", "",
                             _f(m["dice"])])
            else:
                rows.append([_model_label(model, result["kind"]), name, str(m["images"]), _f(m["loss"]),
                             _f(m["accuracy"]), _f(m["f1"]), _f(m["precision"]), _f(m["recall"]), ""])
    return rows


CASCADE_HEAD = ["split", "images", "thresholds", "mean Dice", "class 1", "class 2", "class 3", "class 4", "all-empty"]
MODEL_HEAD = ["model", "split", "images", "loss", "accuracy", "F1", "precision", "recall", "Dice"]


def _text(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    numeric = [i for i, h in enumerate(head) if h not in ("split", "images", "thresholds", "model")]
    fmt = lambda r: "  ".join(v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(head)] + [fmt(r) for r in rows]


def _note(result: dict) -> str:
    cap = result.get("max_images")
    return ("Labelled splits of the training data (the seed's X_train / X_val / X_test; the thresholds were "
            "tuned on val). One pass of the models per split on Ray actors"
            + (f"; at most {cap} images per split (a seeded sample)" if cap else "") + ". Classifier metrics at "
            "0.5 over the split (4-label classifier: images with a defect); U-Net Dice: the seed's soft dice_coef "
            "over the images with that class; cascade Dice: the deployed 256x1600 masks, every (image, class) pair.")


def format_text(result: dict) -> str:
    """The tables as plain text (what ``steel run`` prints)."""
    lines = ["The seed's protocol: cascade mean Dice per split", *_text(CASCADE_HEAD, cascade_rows(result)), "",
             "Each model on each split", *_text(MODEL_HEAD, model_rows(result))]
    return "\n".join(lines)


def markdown(result: dict) -> list[str]:
    """Report section: cascade table, model table, then per split confusion and classification report."""
    lines = ["## The seed's protocol: train / val / test splits", "", _note(result), "",
             "### Cascade mean Dice", "", *figures.markdown_table(CASCADE_HEAD, cascade_rows(result)), "",
             "### Each model", "", *figures.markdown_table(MODEL_HEAD, model_rows(result)), ""]
    for name, t in result["splits"].items():
        for th_name, c in t["cascade"].items():
            lines += [f"### {name} split, {th_name} thresholds: image-level confusion and classification report", "",
                      *eval_report.confusion_table(c["confusion"])]
            lines += ["", "```", c["classification_text"].rstrip(), "```", ""]
    return lines


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=float) + "\n"


__all__ = ["sample", "reusable", "classifier_metrics", "split_tables", "evaluate_splits", "format_text", "markdown",
           "to_json"]
