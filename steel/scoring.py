"""Batch scoring on Ray Data: images URI -> decode -> gated cascade (actor pool) -> submission shards.

:func:`score` lists every file under the images URI, works out which images no complete shard holds
yet (see :mod:`steel.score_io` for ids, shard names, resume and the nightly/incremental mode), and
streams only those through a Ray Data pipeline::

    from_items(pending files)                         one row per file (shard, ImageId, path)
      .map_batches(decode_batch)                      CPU tasks: bytes -> uint8 256x1600x3, or an error reason
      .map_batches(CascadeActor, ActorPoolStrategy)   models loaded once per actor; gated cascade
      .iter_batches()                                 driver: group rows by shard; write each shard
                                                      atomically the moment all its images are in

A shard is written only when every one of its images has a result, errors file first and rows file
last, so a killed run leaves only complete shards and a re-run scores only the rest. At the end
``<out>/manifest.json`` (bundle, thresholds, counts, gating stats, timings, the ImageIds of every
shard) and ``<out>/_SUCCESS`` are written.

Bad input never stops the job: files that are empty, not images, truncated, of another format or
colour mode, or of the wrong size get a row in ``<out>/errors/<shard>.csv`` (ImageId, file, reason)
and the counts add up: images in = scored + errors.

Test hook: with ``STEEL_SCORE_FAIL_AFTER_SHARDS=N`` in the driver's environment the run raises after
writing N shards (simulates a crash between shards; used by the resume tests).
"""

from __future__ import annotations

import dataclasses

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from steel import score_io, storage
from steel.config import ScoreConfig

log = logging.getLogger(__name__)

FAIL_AFTER_ENV = "STEEL_SCORE_FAIL_AFTER_SHARDS"


# --------------------------------------------------------------------------------------------
# Pipeline stages (run in Ray workers)
# --------------------------------------------------------------------------------------------

def decode_batch(batch: dict, filesystem=None, allow_resize: bool = False,
                 formats=score_io.DEFAULT_IMAGE_FORMATS) -> dict:
    """Ray Data stage: read and decode each file of a batch.

    In: columns ``shard``, ``image_id``, ``file`` (URI), ``path`` (path on ``filesystem``). Out: the
    same ids plus ``image`` (N x 256 x 1600 x 3 uint8; zeros for failed rows) and ``error`` (the
    reason, '' when the image decoded).
    """
    n = len(batch["image_id"])
    images = np.zeros((n, score_io.HEIGHT, score_io.WIDTH, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    for i in range(n):
        path = str(batch["path"][i])
        try:
            if filesystem is not None:
                with filesystem.open_input_stream(path) as fh:
                    data = fh.read()
            else:
                data = storage.read_bytes(str(batch["file"][i]))
        except Exception as e:  # noqa: BLE001 - an unreadable file is this file's error, not the job's
            errors[i] = f"could not read the file: {type(e).__name__}: {e}"
            continue
        try:
            images[i] = score_io.decode_image(data, allow_resize=allow_resize, formats=formats)
        except score_io.BadImage as e:
            errors[i] = str(e)
    return {
        "shard": np.asarray(batch["shard"], dtype=object),
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "file": np.asarray(batch["file"], dtype=object),
        "image": images,
        "error": errors,
    }


@dataclass
class BundleCascade:
    """Picklable factory: builds the cascade from a bundle inside an actor (models loaded once)."""

    bundle_uri: str
    thresholds: dict
    tta: str = "none"
    endpoint: str | None = None  # the driver's S3 endpoint (workers do not share set_endpoint)
    threads: int | None = None  # TensorFlow intra-op threads (CPU actors sharing a node)

    def __call__(self):
        if self.endpoint:
            storage.set_endpoint(self.endpoint)
        from steel.keras_env import tf

        if self.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
                tf.config.threading.set_inter_op_parallelism_threads(min(2, self.threads))
            except RuntimeError:  # TF already initialised in this worker: keep its pools
                pass
        from steel.bundle import load_bundle
        from steel.cascade import Cascade

        bundle = load_bundle(self.bundle_uri)
        return Cascade({name: static_callable(model) for name, model in bundle.models.items()},
                       {name: tuple(spec["input_size"]) for name, spec in bundle.specs.items()},
                       self.thresholds, tta=self.tta,
                       preprocessing={name: spec["preprocessing"] for name, spec in bundle.specs.items()})


def static_callable(model) -> Callable[[np.ndarray], np.ndarray]:
    """``f(batch) -> np.ndarray`` running a Keras model through one ``tf.function`` whose input
    signature leaves the batch size open.

    The gates hand each model a different number of images every batch; ``predict_on_batch``
    retraces its graph for each new batch shape (seconds per trace for the seed's models), while
    this traces once per model.
    """
    from steel.keras_env import tf

    shape = [None, *model.input_shape[1:]]
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec(shape, tf.float32)])

    def call(x: np.ndarray) -> np.ndarray:
        return fn(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()

    call.model = model  # type: ignore[attr-defined]
    return call


def _stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for key, value in after.items():
        if isinstance(value, dict):
            out[key] = _stats_delta(before.get(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value - before.get(key, 0)
    return out


def _add_stats(total: dict, delta: dict) -> None:
    for key, value in delta.items():
        if isinstance(value, dict):
            _add_stats(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


class CascadeActor:
    """Ray Data actor stage: one predictor per actor, applied to the decoded images of each batch.

    Rows whose decode failed pass through with their reason. If the predictor raises on a batch,
    its images are retried one at a time so a single bad image cannot fail its neighbours; an
    image that still fails gets an error row with the exception.
    """

    def __init__(self, factory: Callable[[], Any], require_gpu: bool = False):
        if require_gpu:  # the pool asked Ray for GPUs: fail now rather than run on the CPU
            from steel.devices import require_gpu as check

            check("score.gpus_per_actor > 0 (a cascade actor)")
        self.predictor = factory()

    def _stats(self) -> dict:
        stats = getattr(self.predictor, "stats", None)
        return dict(stats) if isinstance(stats, dict) else {}

    def _predict(self, images: np.ndarray, ids: list[str]) -> list:
        """One result dict per image, or an exception instance for images that failed."""
        try:
            results = list(self.predictor.predict(images))
            if len(results) != len(ids):
                raise RuntimeError(f"predictor returned {len(results)} results for {len(ids)} images")
            return results
        except Exception:  # noqa: BLE001 - isolate the failing image(s) below
            if len(ids) == 1:
                raise
        out: list = []
        for i in range(len(ids)):
            try:
                out.extend(self._predict(images[i:i + 1], ids[i:i + 1]))
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image_id"])
        errors = np.asarray(batch["error"], dtype=object).copy()
        ids = [str(v) for v in batch["image_id"]]
        ok = np.flatnonzero(errors == "")
        p_defect = np.full(n, np.nan)
        p_class = np.full((n, 4), np.nan)
        areas = np.zeros((n, 4), dtype=np.int64)
        masks = np.full((n, 4), "", dtype=object)
        before = self._stats()
        if ok.size:
            results = self._predict(np.asarray(batch["image"])[ok], [ids[i] for i in ok])
            for i, res in zip(ok, results):
                if isinstance(res, Exception):
                    errors[i] = f"scoring failed: {type(res).__name__}: {res}"
                    continue
                try:
                    rows = score_io.result_rows(ids[i], res)
                except Exception as e:  # noqa: BLE001
                    errors[i] = f"scoring failed: bad cascade result: {e}"
                    continue
                p_defect[i] = rows[0]["p_defect"]
                for j in range(4):
                    p_class[i, j] = rows[0][f"p_class_{j + 1}"]
                    areas[i, j] = rows[0][f"area_{j + 1}"]
                    masks[i, j] = rows[j]["EncodedPixels"]
        stats = np.full(n, "", dtype=object)
        if n:
            stats[0] = json.dumps(_stats_delta(before, self._stats()))
        out = {
            "shard": np.asarray(batch["shard"], dtype=object),
            "image_id": np.asarray(ids, dtype=object),
            "file": np.asarray(batch["file"], dtype=object),
            "error": errors,
            "p_defect": p_defect,
            "stats": stats,
        }
        for j in range(4):
            out[f"p_class_{j + 1}"] = p_class[:, j]
            out[f"area_{j + 1}"] = areas[:, j]
            out[f"mask_{j + 1}"] = masks[:, j]
        return out


def batch_result(batch: dict, i: int) -> dict:
    """The cascade result of row ``i`` of a :class:`CascadeActor` output batch, as
    :func:`steel.score_io.result_rows` takes it (batch shards and the Serve endpoint both use this)."""
    return {
        "p_defect": batch["p_defect"][i],
        "p_class": [batch[f"p_class_{k}"][i] for k in score_io.CLASSES],
        "areas": [batch[f"area_{k}"][i] for k in score_io.CLASSES],
        "masks": [str(batch[f"mask_{k}"][i]) for k in score_io.CLASSES],
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def _check_cfg(cfg: ScoreConfig) -> None:
    if cfg.format not in score_io.FORMATS:
        raise ValueError(f"format must be one of {', '.join(score_io.FORMATS)}, got {cfg.format!r}")
    if cfg.tta not in (None, "none", "h", "v", "hv"):
        raise ValueError(f"tta must be one of none, h, v, hv; got {cfg.tta!r}")
    for name in ("actors", "batch_size", "images_per_shard"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.gpus_per_actor < 0:
        raise ValueError(f"gpus_per_actor must not be negative, got {cfg.gpus_per_actor}")


def _bundle_info(bundle_uri: str) -> dict:
    """Provenance of the bundle for the manifest (read from its manifest.json; no TensorFlow)."""
    from steel.bundle import read_manifest

    manifest = read_manifest(bundle_uri)
    info = {"uri": str(bundle_uri)}
    for key in ("format_version", "created_at", "updated_at", "fingerprint"):
        if key in manifest:
            info[key] = manifest[key]
    info["models"] = {name: {"encoder": m.get("spec", {}).get("encoder"),
                             "input_size": m.get("spec", {}).get("input_size"), "sha256": m.get("sha256")}
                      for name, m in manifest.get("models", {}).items()}
    return info


def _resolve_thresholds(bundle_uri: str, thresholds) -> dict:
    from steel import thresholds as th

    if thresholds is None:
        try:
            return th.load_thresholds(bundle_uri)
        except FileNotFoundError:
            log.warning("%s has no thresholds.json: using the seed's default thresholds", bundle_uri)
            return th.default_thresholds()
    if isinstance(thresholds, str):
        return th.load_thresholds(thresholds)
    return th.validate_thresholds(thresholds)


def _fail_after() -> int | None:
    value = os.environ.get(FAIL_AFTER_ENV)
    return int(value) if value not in (None, "") else None


def score(bundle_uri: str, images_uri: str, out_uri: str, score_cfg: ScoreConfig | None = None,
          thresholds: dict | str | None = None, *, predictor_factory: Callable[[], Any] | None = None,
          ray_address: str | None = None) -> dict:
    """Score every not-yet-scored image under ``images_uri`` with the bundle's cascade into ``out_uri``.

    Args:
        bundle_uri: model bundle folder (``manifest.json``, weights, ``thresholds.json``).
        images_uri: folder or S3 prefix; every file under it (recursively) is an input.
        out_uri: output folder: ``shards/``, ``errors/``, ``manifest.json``, ``_SUCCESS``.
        score_cfg: :class:`steel.config.ScoreConfig` (actors, batch_size, gpus_per_actor, format,
            tta, allow_resize, images_per_shard, image_formats); default values if None.
        thresholds: a thresholds mapping or URI; default the bundle's ``thresholds.json``, else
            the seed's defaults. The values used are recorded in the manifest.
        predictor_factory: picklable ``f() -> object with .predict(images) (and .stats)`` built
            once per actor; default :class:`BundleCascade` (tests pass light stand-ins).
        ray_address: Ray to start or join when this process has not initialised Ray yet.

    Returns the summary (also in the manifest): ``images_listed``, ``images_already_scored``,
    ``images_in`` (pending this run) = ``scored`` + ``errors``, ``shards_written``,
    ``shards_skipped``, ``gating``, ``timings``, ``error_reasons`` ...
    """
    cfg = score_cfg or ScoreConfig()
    _check_cfg(cfg)
    t_start = time.time()
    bundle = _bundle_info(bundle_uri) if predictor_factory is None else {"uri": str(bundle_uri)}
    used_thresholds = _resolve_thresholds(bundle_uri, thresholds) if predictor_factory is None else (
        thresholds if isinstance(thresholds, dict) else None)
    formats = tuple(getattr(cfg, "image_formats", None) or score_io.DEFAULT_IMAGE_FORMATS)
    tuned_tta = (used_thresholds or {}).get("tta", "none")
    if cfg.tta is None:  # not chosen: score with the TTA the thresholds were tuned for
        cfg = dataclasses.replace(cfg, tta=tuned_tta)
    if tuned_tta != cfg.tta:
        log.warning("scoring with tta=%s but the thresholds were tuned with tta=%s (set score.tta / --tta %s "
                    "to match)", cfg.tta, tuned_tta, tuned_tta)

    inputs = score_io.list_inputs(images_uri, exclude=out_uri)
    previous = score_io.read_manifest(out_uri)
    done, owner = score_io.done_images(out_uri, previous)
    pending = [i for i in inputs if i not in owner]
    plan = score_io.plan_shards(pending, cfg.images_per_shard)
    t_listed = time.time()
    if not inputs and not done:
        raise ValueError(f"{images_uri}: no files to score")
    before = (previous or {}).get("bundle", {})
    if plan and predictor_factory is None and before.get("created_at") not in (None, bundle.get("created_at")):
        log.warning("%s holds shards scored with another bundle (created %s; this one %s): new shards use "
                    "this bundle, old shards are kept (the manifest records each shard's bundle)",
                    out_uri, before.get("created_at"), bundle.get("created_at"))
    log.info("%d files under %s: %d already in %d complete shards, %d to score in %d shards",
             len(inputs), images_uri, len(inputs) - len(pending), len(done), len(pending), len(plan))

    written: dict[str, dict] = {}
    gating: dict = {}
    error_reasons: Counter = Counter()
    error_examples: list[dict] = []
    if plan:
        factory = predictor_factory or BundleCascade(
            str(bundle_uri), used_thresholds, cfg.tta, endpoint=storage.current_endpoint(),
            threads=(max(1, (os.cpu_count() or 1) // cfg.actors) if cfg.gpus_per_actor == 0 and cfg.actors > 1
                     else None))
        from steel.ray_session import ensure_ray

        ensure_ray(ray_address)  # no-op when the caller (a job, the pipeline, a test) already started Ray
        if cfg.gpus_per_actor > 0:  # fail before any work when the GPU nodes' TensorFlow sees no GPU
            from steel.devices import check_ray_gpus

            check_ray_gpus("score.gpus_per_actor > 0", cfg.gpus_per_actor)
        for entry in _run_pipeline(plan, inputs, images_uri, out_uri, cfg, formats, factory, gating):
            written[entry["name"]] = entry
            for err in entry.pop("error_rows"):
                error_reasons[_reason_kind(err["reason"])] += 1
                if len(error_examples) < 20:
                    error_examples.append(err)
    t_scored = time.time()
    score_io.remove_orphan_errors(out_uri, set(done) | set(written))

    scored = sum(e["scored"] for e in written.values())
    errors = sum(e["errors"] for e in written.values())
    if scored + errors != len(pending):  # guard: every pending image is in exactly one new shard
        raise RuntimeError(f"internal error: {len(pending)} images pending but {scored} scored + {errors} errors")
    score_seconds = t_scored - t_listed
    summary = {
        "images_uri": str(images_uri),
        "out": str(out_uri),
        "images_listed": len(inputs),
        "images_already_scored": len(inputs) - len(pending),
        "images_in": len(pending),
        "scored": scored,
        "errors": errors,
        "shards_written": len(written),
        "shards_skipped": len(done),
        "error_reasons": dict(error_reasons),
        "error_examples": error_examples,
        "gating": gating,
        "timings": {
            "list_s": round(t_listed - t_start, 3),
            "score_s": round(score_seconds, 3),
            "total_s": round(time.time() - t_start, 3),
            "images_per_s": round(len(pending) / score_seconds, 3) if pending and score_seconds > 0 else None,
        },
    }
    _write_manifest(out_uri, previous, done, written, summary, bundle, used_thresholds, cfg, formats)
    storage.write_text(storage.join(out_uri, score_io.SUCCESS), "")
    return summary


def _reason_kind(reason: str) -> str:
    """Short category of an error reason for the summary ("wrong size", "empty file", ...)."""
    return reason.split(":")[0].split("(")[0].strip()


def _write_manifest(out_uri, previous, done, written, summary, bundle, used_thresholds, cfg, formats) -> None:
    shards = {}
    for name, entry in sorted(done.items()):
        shards[name] = {k: v for k, v in entry.items()}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, entry in written.items():
        shards[name] = {"images": entry["images"], "scored": entry["scored"], "errors": entry["errors"],
                        "file": entry["file"], "bundle_created_at": bundle.get("created_at"), "written_at": now}
    runs = list((previous or {}).get("runs", []))
    run = {k: summary[k] for k in ("images_listed", "images_already_scored", "images_in", "scored", "errors",
                                   "shards_written", "shards_skipped", "timings")}
    runs.append({"finished_at": now, "bundle": bundle, **run})
    manifest = {
        "kind": "steel-scores",
        "finished_at": now,
        "bundle": bundle,
        "images_uri": summary["images_uri"],
        "thresholds": used_thresholds,
        "settings": {"format": cfg.format, "tta": cfg.tta, "allow_resize": cfg.allow_resize,
                     "images_per_shard": cfg.images_per_shard, "batch_size": cfg.batch_size,
                     "actors": cfg.actors, "gpus_per_actor": cfg.gpus_per_actor, "image_formats": list(formats)},
        "counts": {k: summary[k] for k in ("images_listed", "images_already_scored", "images_in", "scored",
                                           "errors", "shards_written", "shards_skipped")},
        "totals": {"shards": len(shards), "images": sum(len(s["images"]) for s in shards.values()),
                   "scored": sum(s["scored"] for s in shards.values()),
                   "errors": sum(s["errors"] for s in shards.values())},
        "error_reasons": summary["error_reasons"],
        "gating": summary["gating"],
        "timings": summary["timings"],
        "runs": runs[-50:],
        "shards": shards,
    }
    storage.write_text(storage.join(out_uri, score_io.MANIFEST), json.dumps(manifest, indent=1, default=str) + "\n")


def _run_pipeline(plan, inputs, images_uri, out_uri, cfg, formats, factory, gating):
    """Stream the planned shards through Ray Data; yields each shard's manifest entry once written."""
    fs, _ = storage.resolve(images_uri)
    items = []
    for shard in plan:
        for image_id in shard.image_ids:
            uri = inputs[image_id]
            items.append({"shard": shard.name, "image_id": image_id, "file": uri,
                          "path": storage.resolve(uri)[1]})
    ds = cascade_dataset(items, cfg, fs, formats, factory)

    open_shards = {s.name: score_io.ShardResult(s.name, s.image_ids) for s in plan}
    fail_after = _fail_after()
    n_written = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["image_id"])):
            if batch["stats"][i]:
                _add_stats(gating, json.loads(batch["stats"][i]))
            name = str(batch["shard"][i])
            shard = open_shards.get(name)
            if shard is None:
                raise RuntimeError(f"internal error: a result for shard {name} after it was written")
            image_id = str(batch["image_id"][i])
            if batch["error"][i]:
                shard.add_error(image_id, str(batch["file"][i]), str(batch["error"][i]))
            else:
                shard.add_scored(image_id, batch_result(batch, i))
            if shard.complete:
                entry = shard.write(out_uri, cfg.format)
                n_written += 1
                log.info("shard %s written: %d images (%d scored, %d errors) [%d/%d]", name,
                         len(shard.image_ids), entry["scored"], entry["errors"], n_written, len(plan))
                yield {"name": name, **entry, "error_rows": shard.errors}
                del open_shards[name]
                if fail_after is not None and n_written >= fail_after:
                    raise RuntimeError(f"injected failure after {n_written} shards ({FAIL_AFTER_ENV})")
    if open_shards:
        missing = {n: len(s.image_ids) - len(s.seen) for n, s in open_shards.items()}
        raise RuntimeError(f"scoring ended with incomplete shards (images missing per shard): {missing}")


def cascade_dataset(items: list[dict], cfg: ScoreConfig, filesystem, formats, factory, actor=None):
    """The Ray Data pipeline ``from_items -> decode_batch -> actor pool`` (lazy; nothing runs yet).

    ``items``: one dict per file with ``shard``, ``image_id``, ``file`` (URI), ``path`` (on
    ``filesystem``). ``actor``: the actor stage class, :class:`CascadeActor` or a subclass
    (threshold tuning's probability stage); built once per actor with ``factory``, on
    ``cfg.gpus_per_actor`` GPUs (and then it refuses to start without one).
    """
    import ray

    blocks = max(1, min(len(items), math.ceil(len(items) / cfg.batch_size), 2000))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # Decoding is light (I/O + libjpeg): half a CPU per task. The differing resources also keep Ray
    # from fusing it into the actor stage, so decoding overlaps inference in separate CPU tasks.
    ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"filesystem": filesystem, "allow_resize": cfg.allow_resize, "formats": formats})
    actor_args: dict = {}
    if cfg.gpus_per_actor > 0:
        actor_args["num_gpus"] = cfg.gpus_per_actor
    return ds.map_batches(actor or CascadeActor,
                          fn_constructor_kwargs={"factory": factory, "require_gpu": cfg.gpus_per_actor > 0},
                          batch_size=cfg.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=cfg.actors), **actor_args)


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    t = summary["timings"]
    lines = [
        f"scored {summary['images_in']} images from {summary['images_uri']}: {summary['scored']} scored, "
        f"{summary['errors']} errors ({summary['images_listed']} listed, {summary['images_already_scored']} "
        f"already scored in {summary['shards_skipped']} complete shards)",
        f"shards written: {summary['shards_written']} -> {summary['out']}",
        f"time: {t['total_s']:.1f} s" + (f" ({t['images_per_s']:.2f} images/s)" if t.get("images_per_s") else ""),
    ]
    g = summary.get("gating") or {}
    if g.get("images"):
        lines.append(f"gating: multilabel ran on {g.get('multilabel_calls', 0)}/{g['images']} images, "
                     f"segmenters on {g.get('seg_calls', 0)}/{4 * g['images']} image-classes "
                     f"({g.get('seg_calls_saved', 0)} saved)")
    if summary["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(summary["error_reasons"].items())))
        for e in summary["error_examples"][:5]:
            lines.append(f"  {e['file']}: {e['reason']}")
    return "\n".join(lines)


__all__ = ["score", "decode_batch", "CascadeActor", "cascade_dataset", "BundleCascade", "batch_result",
           "format_summary", "FAIL_AFTER_ENV"]
