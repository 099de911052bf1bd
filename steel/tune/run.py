"""``steel tune``: thresholds for a bundle, tuned on the validation split to maximise mean Dice.

The models run once over the validation images on Ray actors (:func:`steel.eval.predictions.predict_cache`,
scoring's own pipeline; the driver runs no model); the search (:mod:`steel.tune.search`) runs in this
process on the cached predictions and scores what the cascade deploys (:mod:`steel.eval.evaluator`).
:func:`tune` writes ``thresholds.json`` into the bundle (with the validation score before and after,
and the seed's fixed thresholds' score beside them), ``tuning/*.png`` plots of Dice against each
threshold (:mod:`steel.tune.plots`), and, with ``full_check``, the tuned cascade's full-resolution
Dice on the same images, which must agree with the search's score (:data:`AGREEMENT`).
``tune.mode: fixed`` searches nothing: :func:`write_fixed` writes the seed's hand-set thresholds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

from steel.core import s3
from steel.core.names import CLASSES
from steel.core.ray_session import ensure_ray_for_actors
from steel.eval.predictions import (
    bundle_identity,
    cache_key,
    cache_sizes,
    full_resolution_dice,
    load_cache,
    pixel_values,
    predict_cache,
)
from steel.model import thresholds as th_lib
from steel.model.predictor import BundleCascade
from steel.model.thresholds import validate_thresholds
from steel.tune.plots import plot_curves
from steel.tune.search import Grids, search

log = logging.getLogger(__name__)


AGREEMENT = 0.001  # tuning's score and the deployed cascade's must agree this closely


def pixel_grid(grids: Grids, *thresholds: dict) -> list[float]:
    """The pixel thresholds the actors count at: the grid's and every given thresholds set's."""
    return pixel_values(*thresholds, grid=grids.pixel)





def validation_labels(cfg) -> tuple[Any, str]:
    """The validation split (wide table) of the config's data and the data fingerprint."""
    from steel.data.labels import load_splits

    splits, fp = load_splits(cfg)
    return splits["val"], fp


def tune(cfg, bundle_uri: str | None = None, stamp: str | None = None, *, start: dict | None = None,
         grids: Grids | None = None, rounds: int = 4, cache_size: Sequence[int] | None = None,
         batch_size: int = 8, full_check: bool = True, cache_path: str | None = None, tta: str | None = None,
         predictor: Callable[..., Callable[[], Any]] = BundleCascade, labels=None, ray_address: str | None = None,
         seed_thresholds: dict | None = None) -> dict:
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
        predictor: the factory class of the actors' cascade, called as ``predictor(bundle_uri,
            thresholds, tta, endpoint=)`` (default :class:`steel.model.predictor.BundleCascade`).
        labels: the labelled images (wide table) to tune on; default the config's validation split.
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
    from steel.model.bundle import read_manifest

    t0 = time.time()
    bundle_uri = bundle_uri or cfg.bundle
    tta = tta or cfg.tune.tta
    data_fp = None
    if labels is None:
        labels, data_fp = validation_labels(cfg)
    manifest_fp = read_manifest(bundle_uri).get("fingerprint")
    if data_fp and manifest_fp and manifest_fp != data_fp:
        log.warning("the bundle was trained on a different split (fingerprint %s, data now %s): "
                    "validation images may have been seen in training", manifest_fp[:12], data_fp[:12])
    start = th_lib.resolve(bundle_uri, start)
    factory = predictor(str(bundle_uri), start, tta, endpoint=s3.current_endpoint())
    sizes = cache_sizes({}, cache_size) if cache_size else None
    grids = grids or Grids()
    seed = seed_thresholds if seed_thresholds is not None else (
        fixed_thresholds(cfg) if data_fp else th_lib.default_thresholds())
    pixels = pixel_grid(grids, start, seed)
    identity = bundle_identity(bundle_uri)
    key = cache_key(identity, tta, sizes, labels, pixels)
    score_cfg = dataclasses.replace(cfg.score, batch_size=batch_size, tta=tta, allow_resize=False)
    images_uri = cfg.data.path("train_images")

    checked: list[bool] = []

    def ray_ready():  # once, and only when a model has to run
        if not checked:
            ensure_ray_for_actors(ray_address or cfg.ray_address, score_cfg.gpus_per_actor, "tuning")
            checked.append(True)

    cache = load_cache(cache_path, key) if cache_path else None
    if cache is not None:
        cache_state = "reused"
        log.info("reusing %d cached validation predictions from %s", len(cache), cache_path)
    else:
        cache_state = "recomputed" if cache_path and os.path.exists(cache_path) else "computed"
        ray_ready()
        cache = predict_cache(factory, labels, images_uri, sizes, score_cfg, key=key, pixels=pixels)
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
        tuned = predictor(str(bundle_uri), validate_thresholds(final), tta, endpoint=s3.current_endpoint())
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
    th_lib.save_thresholds(bundle_uri, final)
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
    if cfg.tune.area_thresholds:
        th = th_lib.from_area_json(cfg.tune.area_thresholds)
        source = {"mode": "fixed", "areas": cfg.tune.area_thresholds}
    else:
        from steel.data import labels as dataset

        train = dataset.load_splits(cfg)[0]["train"]
        areas = dataset.area_thresholds(dataset.mask_areas(train))
        th = th_lib.merge_areas(th_lib.default_thresholds(), areas)
        source = {"mode": "fixed", "areas": f"train split ({len(train)} images, seed {cfg.data.seed}), "
                                            f"percentiles {list(dataset.PERCENTILES)}"}
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
        from steel.model.predictor import BundleCascade

        labels, data_fp = validation_labels(cfg)
        score_cfg = dataclasses.replace(cfg.score, batch_size=batch_size, tta=th["tta"], allow_resize=False)
        ensure_ray_for_actors(ray_address or cfg.ray_address, score_cfg.gpus_per_actor, "tuning")
        predictor = BundleCascade(str(bundle_uri), th, th["tta"], endpoint=s3.current_endpoint())
        full = full_resolution_dice(predictor, labels, cfg.data.path("train_images"), score_cfg)
        th["validation"] = {"split": "val", "fingerprint": stamp, "data_fingerprint": data_fp, "mean_dice": full["mean_dice"],
                            "per_class": full["per_class"], "n_images": full["n_images"]}
        summary["validation"] = th["validation"]
    th_lib.save_thresholds(bundle_uri, th)
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


__all__ = ["tune", "write_fixed", "fixed_thresholds", "validation_labels", "pixel_grid", "format_summary", "AGREEMENT"]
