"""Batch scoring on Ray Data: images URI -> decode -> gated cascade (actor pool) -> submission shards.

:func:`score` lists every file under the images URI, works out which images no complete shard holds
yet (see :mod:`steel.score.io` for ids, shard names, resume and the nightly/incremental mode), and
streams only those through a Ray Data pipeline::

    from_items(pending files)                         one row per file (shard, ImageId, path)
      .map_batches(decode_batch)                      CPU tasks: bytes -> uint8 256x1600x3, or an error reason
      .map_batches(CascadeActor, ActorPoolStrategy)   models loaded once per actor; gated cascade
      .iter_batches()                                 driver: group rows by shard; write each shard
                                                      atomically the moment all its images are in

A shard is written only when every one of its images has a result, errors file first, rows file
next and its index file last, so a killed run leaves only complete shards and a re-run scores only
the rest. A run holds the output's lease (:mod:`steel.score.lease`) from start to end, removes ``_SUCCESS``
before writing anything, and at the end writes ``<out>/runs/<run_id>.json`` (its record),
``<out>/manifest.json`` (the last run's settings and totals) and - only when no image failed
transiently - ``<out>/_SUCCESS``.

Bad input never stops the job: files that are empty, not images, truncated, of another format or
colour mode, or of the wrong size get a row in ``<out>/errors/<shard>.csv`` (ImageId, file, reason,
kind=decode). Everything else that fails (storage, network, predictor, OOM) is transient: retried
with backoff, and if it still fails the image is not recorded (the next run scores it) and the run
reports a problem. The counts add up: images in = scored + errors + transient failures.

Test hooks: with ``STEEL_SCORE_FAIL_AFTER_SHARDS=N`` in the driver's environment the run raises after
writing N shards (a crash between shards); ``STEEL_SCORE_PAUSE_AT`` pauses it at a named point so a
test can SIGKILL it there (see :func:`_hook`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from steel.core import storage
from steel.core.config import ScoreConfig
from steel.core.names import CLASSES, FORMATS, HEIGHT, IMAGE_FORMATS, WIDTH
from steel.core.retry import retry
from steel.data import images as image_io
from steel.score import io as score_io

log = logging.getLogger(__name__)

FAIL_AFTER_ENV = "STEEL_SCORE_FAIL_AFTER_SHARDS"
PAUSE_AT_ENV = "STEEL_SCORE_PAUSE_AT"
PAUSE_FILE_ENV = "STEEL_SCORE_PAUSE_FILE"


# --------------------------------------------------------------------------------------------
# Pipeline stages (run in Ray workers)
# --------------------------------------------------------------------------------------------

def decode_batch(batch: dict, filesystem=None, allow_resize: bool = False,
                 formats=IMAGE_FORMATS, retries: int = 0, backoff_s: float = 1.0) -> dict:
    """Ray Data stage: read and decode each file of a batch.

    In: columns ``shard``, ``image_id``, ``file`` (URI), ``path`` (path on ``filesystem``). Out: the
    same ids plus ``image`` (N x 256 x 1600 x 3 uint8; zeros for failed rows), ``error`` (the reason,
    '' when the image decoded) and ``error_kind``: ``decode`` (the file is bad: a permanent error
    row) or ``transient`` (the read failed ``retries + 1`` times: not recorded, retried next run).
    """
    n = len(batch["image_id"])
    images = np.zeros((n, HEIGHT, WIDTH, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    kinds = np.full(n, "", dtype=object)
    for i in range(n):
        path = str(batch["path"][i])

        def read(path=path, uri=str(batch["file"][i])) -> bytes:
            if filesystem is not None:
                with filesystem.open_input_stream(path) as fh:
                    return fh.read()
            return storage.read_bytes(uri)

        try:
            # A file deleted since listing is not retried (nor recorded: the next listing decides).
            data = retry(read, retries=retries, backoff_s=backoff_s, what=f"reading {path}",
                                  permanent=(FileNotFoundError,))
        except Exception as e:  # noqa: BLE001 - transient: this image stays pending, not the job's end
            errors[i], kinds[i] = f"could not read the file: {type(e).__name__}: {e}", "transient"
            continue
        try:
            images[i] = image_io.decode(data, allow_resize=allow_resize, formats=formats)
        except image_io.BadImage as e:
            errors[i], kinds[i] = str(e), "decode"
    return {
        "shard": np.asarray(batch["shard"], dtype=object),
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "file": np.asarray(batch["file"], dtype=object),
        "image": images,
        "error": errors,
        "error_kind": kinds,
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
        from steel.core.keras_env import tf

        if self.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
                tf.config.threading.set_inter_op_parallelism_threads(min(2, self.threads))
            except RuntimeError:  # TF already initialised in this worker: keep its pools
                pass
        from steel.model.bundle import load_bundle
        from steel.model.cascade import Cascade

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
    from steel.core.keras_env import tf

    shape = [None, *model.input_shape[1:]]
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec(shape, tf.float32)])

    def call(x: np.ndarray) -> np.ndarray:
        from steel.model.cascade import to_numpy

        return to_numpy(fn(tf.convert_to_tensor(x, dtype=tf.float32)))

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


def is_oom(exc: BaseException) -> bool:
    """TensorFlow's ``ResourceExhaustedError`` (GPU/host out of memory) or a Python MemoryError."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError"


class _Metrics:
    """``ray.util.metrics`` counters (exported on each node's Prometheus endpoint); no-ops outside Ray."""

    def __init__(self):
        self.ok = False
        try:
            import ray
            from ray.util.metrics import Counter

            if ray.is_initialized():
                self.scored = Counter("steel_images_scored", "images the cascade scored")
                self.errors = Counter("steel_score_errors", "images not scored, by kind "
                                      "(decode: permanent error row; transient: retried next run)",
                                      tag_keys=("kind",))
                self.defects = Counter("steel_defect_images", "scored images with a mask of the class",
                                       tag_keys=("class_id",))
                self.ok = True
        except Exception as e:  # noqa: BLE001 - metrics must never stop scoring
            log.warning("metrics disabled: %s", e)

    def inc(self, name: str, value: float = 1.0, tags: dict | None = None) -> None:
        if self.ok and value:
            try:
                getattr(self, name).inc(value, tags=tags)
            except Exception:  # noqa: BLE001
                pass


class CascadeActor:
    """Ray Data actor stage: one predictor per actor, applied to the decoded images of each batch.

    Rows whose decode failed pass through with their reason and kind. Every predictor failure is
    transient: an out-of-memory error first retries with half the batch (down to single images);
    other failures retry the batch ``retries`` times with backoff; if it still fails, its images are
    tried one at a time so a single bad image cannot fail its neighbours. Images that still fail come
    out with ``error_kind = "transient"``: they are not recorded and the next run scores them.
    """

    def __init__(self, factory: Callable[[], Any], require_gpu: bool = False, retries: int = 0,
                 backoff_s: float = 1.0):
        if require_gpu:  # the pool asked Ray for GPUs: fail now rather than run on the CPU
            from steel.core.devices import require_gpu as check

            check("score.gpus_per_actor > 0 (a cascade actor)")
        self.predictor = factory()
        self.retries, self.backoff_s = retries, backoff_s
        self.metrics = _Metrics()

    def _stats(self) -> dict:
        stats = getattr(self.predictor, "stats", None)
        return dict(stats) if isinstance(stats, dict) else {}

    def _predict_once(self, images: np.ndarray) -> list:
        results = list(self.predictor.predict(images))
        if len(results) != len(images):
            raise RuntimeError(f"predictor returned {len(results)} results for {len(images)} images")
        return results

    def _predict_split(self, images: np.ndarray) -> list:
        """Predict; on OOM, halve the batch (recursively) before giving up."""
        try:
            return self._predict_once(images)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e) or len(images) == 1:
                raise
            half = len(images) // 2
            log.warning("out of memory on a batch of %d images; retrying as %d + %d", len(images), half,
                        len(images) - half)
            return self._predict_split(images[:half]) + self._predict_split(images[half:])

    def _predict(self, images: np.ndarray) -> list:
        """One result dict per image, or an exception instance for images that still failed."""
        try:
            return retry(lambda: self._predict_split(images), retries=self.retries,
                                  backoff_s=self.backoff_s, what=f"predicting {len(images)} images")
        except Exception as e:  # noqa: BLE001 - isolate the failing image(s) below
            if len(images) == 1:
                return [e]
        out: list = []
        for i in range(len(images)):
            try:
                out.extend(self._predict_split(images[i:i + 1]))
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image_id"])
        errors = np.asarray(batch["error"], dtype=object).copy()
        kinds = np.asarray(batch.get("error_kind", np.where(errors == "", "", "decode")), dtype=object).copy()
        ids = [str(v) for v in batch["image_id"]]
        ok = np.flatnonzero(errors == "")
        p_defect = np.full(n, np.nan)
        p_class = np.full((n, 4), np.nan)
        areas = np.zeros((n, 4), dtype=np.int64)
        masks = np.full((n, 4), "", dtype=object)
        before = self._stats()
        if ok.size:
            images = np.asarray(batch["image"])
            results = self._predict(images if ok.size == n else images[ok])  # no copy when all decoded
            for i, res in zip(ok, results):
                if isinstance(res, Exception):
                    errors[i], kinds[i] = f"scoring failed: {type(res).__name__}: {res}", "transient"
                    continue
                try:
                    rows = score_io.result_rows(ids[i], res)
                except Exception as e:  # noqa: BLE001
                    errors[i], kinds[i] = f"scoring failed: bad cascade result: {e}", "transient"
                    continue
                p_defect[i] = rows[0]["p_defect"]
                for j in range(4):
                    p_class[i, j] = rows[0][f"p_class_{j + 1}"]
                    areas[i, j] = rows[0][f"area_{j + 1}"]
                    masks[i, j] = rows[j]["EncodedPixels"]
        scored = errors == ""
        self.metrics.inc("scored", int(scored.sum()))
        for kind in ("decode", "transient"):
            self.metrics.inc("errors", int((kinds == kind).sum()), {"kind": kind})
        for j in range(4):
            self.metrics.inc("defects", int((scored & (masks[:, j] != "")).sum()), {"class_id": str(j + 1)})
        stats = np.full(n, "", dtype=object)
        if n:
            stats[0] = json.dumps(_stats_delta(before, self._stats()))
        out = {
            "shard": np.asarray(batch["shard"], dtype=object),
            "image_id": np.asarray(ids, dtype=object),
            "file": np.asarray(batch["file"], dtype=object),
            "error": errors,
            "error_kind": kinds,
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
    :func:`steel.score.io.result_rows` takes it (batch shards and the Serve endpoint both use this)."""
    return {
        "p_defect": batch["p_defect"][i],
        "p_class": [batch[f"p_class_{k}"][i] for k in CLASSES],
        "areas": [batch[f"area_{k}"][i] for k in CLASSES],
        "masks": [str(batch[f"mask_{k}"][i]) for k in CLASSES],
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def _check_cfg(cfg: ScoreConfig) -> None:
    if cfg.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.tta not in (None, "none", "h", "v", "hv"):
        raise ValueError(f"tta must be one of none, h, v, hv; got {cfg.tta!r}")
    for name in ("actors", "batch_size", "images_per_shard"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.gpus_per_actor < 0:
        raise ValueError(f"gpus_per_actor must not be negative, got {cfg.gpus_per_actor}")
    if cfg.retries < 0 or cfg.retry_backoff_s < 0:
        raise ValueError(f"retries and retry_backoff_s must not be negative, got {cfg.retries}, {cfg.retry_backoff_s}")
    if not 0 <= cfg.max_error_rate <= 1:
        raise ValueError(f"max_error_rate must be between 0 and 1, got {cfg.max_error_rate}")
    if cfg.lock_ttl_s <= 0:
        raise ValueError(f"lock_ttl_s must be positive, got {cfg.lock_ttl_s}")
    if cfg.since is not None:
        score_io.check_since(cfg.since)


def _bundle_info(bundle_uri: str, version: str | None = None) -> dict:
    """Provenance of the bundle for the manifest (read from its manifest.json; no TensorFlow)."""
    from steel.model.bundle import read_manifest

    manifest = read_manifest(bundle_uri)
    info = {"uri": str(bundle_uri), "version": version}
    for key in ("format_version", "created_at", "updated_at", "fingerprint"):
        if key in manifest:
            info[key] = manifest[key]
    info["models"] = {name: {"encoder": m.get("spec", {}).get("encoder"),
                             "input_size": m.get("spec", {}).get("input_size"), "sha256": m.get("sha256")}
                      for name, m in manifest.get("models", {}).items()}
    return info


def _resolve_thresholds(bundle_uri: str, thresholds) -> dict:
    from steel.model import thresholds as th

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


_hook_hits: Counter = Counter()


def _hook(point: str) -> None:
    """Test hook at a named point of a run (``listed``, ``mid_shard``, ``shard_written`` - between a
    shard's rows file and its index -, ``before_success``). With ``STEEL_SCORE_PAUSE_AT=point[:n]``
    the n-th time (default 1st) the driver writes ``<point> <pid>`` to ``STEEL_SCORE_PAUSE_FILE`` and sleeps, so a test
    can SIGKILL it exactly there. Tests in this process may also monkeypatch this function."""
    spec = os.environ.get(PAUSE_AT_ENV, "")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _hook_hits[point] += 1
    if _hook_hits[point] != int(nth or 1):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        with open(marker, "w") as fh:
            fh.write(f"{point} {os.getpid()}")
    log.warning("test hook: paused at %s (%s)", point, PAUSE_AT_ENV)
    while True:
        time.sleep(3600)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def resolve_for_run(bundle_uri: str, predictor_factory) -> "Any":
    """The bundle resolved once for the run (pointer -> version folder). With a stand-in predictor
    (tests) a URI that is not a bundle is accepted as version ``unversioned``."""
    from steel.model import bundle as bundle_lib

    try:
        return bundle_lib.resolve_bundle(bundle_uri)
    except FileNotFoundError:
        if predictor_factory is None:
            raise
        return bundle_lib.ResolvedBundle(str(bundle_uri), "unversioned")


def score(bundle_uri: str, images_uri: str, out_uri: str, score_cfg: ScoreConfig | None = None,
          thresholds: dict | str | None = None, *, predictor_factory: Callable[[], Any] | None = None,
          ray_address: str | None = None, expect_new: bool | None = None) -> dict:
    """Score every not-yet-scored image under ``images_uri`` with the bundle's cascade into ``out_uri``.

    Args:
        bundle_uri: a model bundle folder (``manifest.json``, weights, ``thresholds.json``) or a
            versioned bundle root (``CURRENT`` pointer + ``versions/``, see :mod:`steel.model.bundle`),
            resolved once at the start: the whole run uses one version.
        images_uri: folder or S3 prefix; every file under it (recursively) is an input
            (only date partitions on or after ``score.since`` when that is set).
        out_uri: output folder: ``shards/``, ``errors/``, ``index/``, ``runs/``, ``manifest.json``,
            ``_SUCCESS``, and ``_LOCK`` while a run holds it.
        score_cfg: :class:`steel.core.config.ScoreConfig`; default values if None.
        thresholds: a thresholds mapping or URI; default the bundle's ``thresholds.json``, else
            the seed's defaults. The values used are recorded in the manifest.
        predictor_factory: picklable ``f() -> object with .predict(images) (and .stats)`` built
            once per actor; default :class:`BundleCascade` (tests pass light stand-ins).
        ray_address: Ray to start or join when this process has not initialised Ray yet.
        expect_new: no new images is a problem (default ``score.expect_new``).

    Takes the output's lease (:class:`steel.score.lease.LeaseHeld` if another run holds it), removes
    ``_SUCCESS``, scores, writes the run record ``runs/<run_id>.json`` and writes ``_SUCCESS`` only
    when no transient failure is left. Returns the summary (also the run record): ``images_listed``,
    ``images_already_scored``, ``images_in`` (new this run) = ``scored`` + ``errors`` (permanent) +
    ``transient_failures``, ``problems`` (reasons the run must exit non-zero; empty when fine) ...
    """
    from steel.score.lease import Lease, LeaseHeld

    cfg = score_cfg or ScoreConfig()
    _check_cfg(cfg)
    expect_new = cfg.expect_new if expect_new is None else expect_new
    run_id = score_io.new_run_id()
    started_at, t_start = _now_iso(), time.time()
    resolved = resolve_for_run(bundle_uri, predictor_factory)
    bundle = (_bundle_info(resolved.uri, resolved.version) if predictor_factory is None
              else {"uri": resolved.uri, "version": resolved.version})
    used_thresholds = _resolve_thresholds(resolved.uri, thresholds) if predictor_factory is None else (
        thresholds if isinstance(thresholds, dict) else None)
    formats = tuple(getattr(cfg, "image_formats", None) or IMAGE_FORMATS)
    tuned_tta = (used_thresholds or {}).get("tta", "none")
    if cfg.tta is None:  # not chosen: score with the TTA the thresholds were tuned for
        cfg = dataclasses.replace(cfg, tta=tuned_tta)
    if tuned_tta != cfg.tta:
        log.warning("scoring with tta=%s but the thresholds were tuned with tta=%s (set score.tta / --tta %s "
                    "to match)", cfg.tta, tuned_tta, tuned_tta)

    def call(fn, what=""):
        return retry(fn, retries=cfg.retries, backoff_s=cfg.retry_backoff_s, what=what,
                              permanent=(FileNotFoundError, ValueError))

    lease = Lease(out_uri, run_id, ttl_s=cfg.lock_ttl_s, retries=cfg.retries, backoff_s=cfg.retry_backoff_s)
    call_lease = dict(retries=cfg.retries, backoff_s=cfg.retry_backoff_s, what="taking the lease")
    retry(lease.acquire, permanent=(LeaseHeld, ValueError), **call_lease)
    record = {"run_id": run_id, "started_at": started_at, "host": socket.gethostname(),
              "images_uri": str(images_uri), "out": str(out_uri), "since": cfg.since, "bundle": bundle,
              "status": "running"}
    try:
        if lease.took_over:
            record["took_over_from"] = lease.took_over
        # Nothing of this run is written before this: the output no longer looks finished.
        call(lambda: storage.delete(storage.join(out_uri, score_io.SUCCESS), missing_ok=True), "removing _SUCCESS")
        summary = _score_locked(record, resolved, bundle, used_thresholds, images_uri, out_uri, cfg, formats,
                                predictor_factory, ray_address, expect_new, lease, call, t_start)
        return summary
    except BaseException as e:
        record.update(status="failed", ended_at=_now_iso(), error=f"{type(e).__name__}: {e}"[:2000])
        try:
            storage.write_text(score_io.run_record_uri(out_uri, run_id), json.dumps(record, indent=1, default=str))
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    finally:
        lease.release()


def _score_locked(record, resolved, bundle, used_thresholds, images_uri, out_uri, cfg, formats,
                  predictor_factory, ray_address, expect_new, lease, call, t_start) -> dict:
    inputs = call(lambda: score_io.list_inputs(images_uri, exclude=out_uri, since=cfg.since), "listing inputs")
    _hook("listed")
    previous = call(lambda: score_io.read_manifest(out_uri), "reading the manifest")
    done, owner = score_io.done_images(out_uri, previous, retry_call=lambda fn: call(fn, "reading the index"))
    for name, entry in done.items():  # shards a killed run (or older code) left without an index file
        if entry.get("recovered") or entry.get("legacy"):
            lease.check()
            call(lambda: score_io.write_index(out_uri, name, {k: v for k, v in entry.items()
                                                              if k not in ("recovered", "legacy")}),
                 "writing an index")
    pending = [i for i in inputs if i not in owner]
    plan = score_io.plan_shards(pending, cfg.images_per_shard)
    t_listed = time.time()
    if not inputs and not done and not cfg.since:
        raise ValueError(f"{images_uri}: no files to score")
    log.info("%d files under %s%s: %d already in complete shards, %d to score in %d shards (run %s, bundle %s)",
             len(inputs), images_uri, f" since {cfg.since}" if cfg.since else "", len(inputs) - len(pending),
             len(pending), len(plan), record["run_id"], bundle.get("version"))

    written: dict[str, dict] = {}
    gating: dict = {}
    error_reasons: Counter = Counter()
    error_examples: list[dict] = []
    failures: dict[str, str] = {}
    defects: Counter = Counter()
    if plan:
        factory = predictor_factory or BundleCascade(
            str(resolved.uri), used_thresholds, cfg.tta, endpoint=storage.current_endpoint(),
            threads=(max(1, (os.cpu_count() or 1) // cfg.actors) if cfg.gpus_per_actor == 0 and cfg.actors > 1
                     else None))
        from steel.core.ray_session import ensure_ray

        ensure_ray(ray_address)  # no-op when the caller (a job, the pipeline, a test) already started Ray
        if cfg.gpus_per_actor > 0:  # fail before any work when the GPU nodes' TensorFlow sees no GPU
            from steel.core.devices import check_ray_gpus

            check_ray_gpus("score.gpus_per_actor > 0", cfg.gpus_per_actor)
        extra = {"bundle_version": str(resolved.version), "scored_at": record["started_at"]}
        index_extra = {"run_id": record["run_id"], "bundle_version": str(resolved.version),
                       "written_at": record["started_at"]}
        for entry in _run_pipeline(plan, inputs, images_uri, out_uri, cfg, formats, factory, gating, extra,
                                   index_extra, lease, call, failures):
            written[entry["name"]] = entry
            for k, n in entry.pop("defects").items():
                defects[k] += n
            for err in entry.pop("error_rows"):
                error_reasons[_reason_kind(err["reason"])] += 1
                if len(error_examples) < 20:
                    error_examples.append(err)
    t_scored = time.time()
    lease.check()
    call(lambda: score_io.remove_orphan_errors(out_uri, set(done) | set(written)), "removing orphan errors")

    scored = sum(e["scored"] for e in written.values())
    errors = sum(e["errors"] for e in written.values())
    if scored + errors + len(failures) != len(pending):  # guard: every pending image is accounted for
        raise RuntimeError(f"internal error: {len(pending)} images pending but {scored} scored + {errors} errors "
                           f"+ {len(failures)} transient failures")
    score_seconds = t_scored - t_listed
    summary = {
        **record,
        "images_listed": len(inputs),
        "images_already_scored": len(inputs) - len(pending),
        "images_in": len(pending),
        "scored": scored,
        "errors": errors,
        "transient_failures": len(failures),
        "shards_written": len(written),
        "shards_skipped": len(done),
        "error_reasons": dict(error_reasons),
        "error_examples": error_examples,
        "transient_reasons": dict(Counter(_reason_kind(r) for r in failures.values())),
        "transient_examples": [{"ImageId": k, "reason": v} for k, v in sorted(failures.items())[:20]],
        "defect_image_rate": {str(k): round(defects[k] / scored, 6) if scored else None for k in CLASSES},
        "defect_images": {str(k): defects[k] for k in CLASSES},
        "gating": gating,
        "timings": {
            "list_s": round(t_listed - t_start, 3),
            "score_s": round(score_seconds, 3),
            "total_s": round(time.time() - t_start, 3),
            "images_per_s": round(len(pending) / score_seconds, 3) if pending and score_seconds > 0 else None,
        },
    }
    summary["problems"] = exit_problems(summary, cfg, expect_new)
    summary["status"] = "incomplete" if failures else ("problems" if summary["problems"] else "ok")
    summary["ended_at"] = _now_iso()
    lease.check()
    call(lambda: storage.write_text(score_io.run_record_uri(out_uri, record["run_id"]),
                                    json.dumps(summary, indent=1, default=str) + "\n"), "writing the run record")
    call(lambda: _write_manifest(out_uri, done, written, summary, bundle, used_thresholds, cfg, formats),
         "writing the manifest")
    _hook("before_success")
    if not failures:  # every listed input has its rows or a permanent error row
        lease.check()
        call(lambda: storage.write_text(storage.join(out_uri, score_io.SUCCESS), record["run_id"] + "\n"),
             "writing _SUCCESS")
    return summary


def exit_problems(summary: dict, cfg: ScoreConfig, expect_new: bool = False) -> list[str]:
    """Why a finished run must exit non-zero (empty list: it must not). One line per rule."""
    problems = []
    n_in = summary["images_in"]
    if summary.get("transient_failures"):
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(summary.get("transient_reasons", {}).items()))
        problems.append(f"{summary['transient_failures']} images failed after {cfg.retries} retries and were not "
                        f"recorded (the next run scores them): {reasons}")
    if n_in and summary["scored"] == 0 and summary["errors"]:
        problems.append("no image could be scored")
    if n_in and summary["errors"] / n_in > cfg.max_error_rate:
        problems.append(f"permanent-error rate {summary['errors'] / n_in:.1%} ({summary['errors']}/{n_in}) is above "
                        f"score.max_error_rate {cfg.max_error_rate:.1%}")
    if expect_new and n_in == 0:
        problems.append(f"no new images under {summary['images_uri']}"
                        + (f" since {cfg.since}" if cfg.since else "") + " (--expect-new): is the camera feed stopped?")
    return problems


def _reason_kind(reason: str) -> str:
    """Short category of an error reason for the summary ("wrong size", "empty file", ...)."""
    return reason.split(":")[0].split("(")[0].strip()


def _write_manifest(out_uri, done, written, summary, bundle, used_thresholds, cfg, formats) -> None:
    """``manifest.json``: the last run's settings and counts (fixed size: which images are done lives in
    the per-shard index files, the history in ``runs/``)."""
    entries = list(done.values()) + list(written.values())
    manifest = {
        "kind": "steel-scores",
        "format_version": 2,
        "run_id": summary["run_id"],
        "finished_at": _now_iso(),
        "bundle": bundle,
        "images_uri": summary["images_uri"],
        "thresholds": used_thresholds,
        "settings": {"format": cfg.format, "tta": cfg.tta, "allow_resize": cfg.allow_resize,
                     "images_per_shard": cfg.images_per_shard, "batch_size": cfg.batch_size,
                     "actors": cfg.actors, "gpus_per_actor": cfg.gpus_per_actor, "image_formats": list(formats),
                     "since": cfg.since},
        "counts": {k: summary[k] for k in ("images_listed", "images_already_scored", "images_in", "scored",
                                           "errors", "transient_failures", "shards_written", "shards_skipped")},
        "totals": {"shards": len(entries), "images": sum(len(s["images"]) for s in entries),
                   "scored": sum(s["scored"] for s in entries), "errors": sum(s["errors"] for s in entries)},
        "error_reasons": summary["error_reasons"],
        "gating": summary["gating"],
        "timings": summary["timings"],
    }
    storage.write_text(storage.join(out_uri, score_io.MANIFEST), json.dumps(manifest, indent=1, default=str) + "\n")


def _run_pipeline(plan, inputs, images_uri, out_uri, cfg, formats, factory, gating, extra, index_extra, lease,
                  call, failures):
    """Stream the planned shards through Ray Data; yields each shard's entry once written.

    Images with a transient failure go into ``failures`` (ImageId -> reason) and their shard is not
    written; a shard whose write still fails after retries counts all its images as failures."""
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
    n_written = n_rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["image_id"])):
            if batch["stats"][i]:
                _add_stats(gating, json.loads(batch["stats"][i]))
            name = str(batch["shard"][i])
            shard = open_shards.get(name)
            if shard is None:
                raise RuntimeError(f"internal error: a result for shard {name} after it was written")
            image_id = str(batch["image_id"][i])
            n_rows += 1
            if n_rows == 2:
                _hook("mid_shard")
            if batch["error"][i] and batch["error_kind"][i] == "transient":
                shard.add_failure(image_id, str(batch["error"][i]))
            elif batch["error"][i]:
                shard.add_error(image_id, str(batch["file"][i]), str(batch["error"][i]),
                                kind=str(batch["error_kind"][i]) or "decode")
            else:
                shard.add_scored(image_id, batch_result(batch, i), extra)
            if not shard.settled:
                continue
            del open_shards[name]
            if not shard.complete:
                failures.update(shard.failed)
                log.warning("shard %s: %d of its %d images failed transiently (e.g. %s: %s); they stay pending",
                            name, len(shard.failed), len(shard.image_ids), *next(iter(shard.failed.items())))
                shard = shard.recorded_part()
                if shard is None:
                    continue
                name = shard.name
            try:
                lease.check()
                entry = call(lambda: shard.write(out_uri, cfg.format, index_extra,
                                                 between=lambda: _hook("shard_written")), f"writing shard {name}")
            except Exception as e:  # noqa: BLE001 - lease lost is re-raised; storage faults fail the shard
                if type(e).__name__ == "LeaseLost":
                    raise
                failures.update({i: f"could not write the shard: {type(e).__name__}: {e}" for i in shard.image_ids})
                log.error("shard %s not written after %d retries: %s", name, cfg.retries, e)
                continue
            n_written += 1
            log.info("shard %s written: %d images (%d scored, %d errors) [%d/%d]", name,
                     len(shard.image_ids), entry["scored"], entry["errors"], n_written, len(plan))
            defects = Counter(r["ClassId"] for r in shard.rows if r["EncodedPixels"])
            yield {"name": name, **entry, "error_rows": shard.errors, "defects": defects}
            if fail_after is not None and n_written >= fail_after:
                raise RuntimeError(f"injected failure after {n_written} shards ({FAIL_AFTER_ENV})")
    if open_shards:
        missing = {n: len(s.image_ids) - len(s.seen) - len(s.failed) for n, s in open_shards.items()}
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
                        fn_kwargs={"filesystem": filesystem, "allow_resize": cfg.allow_resize, "formats": formats,
                                   "retries": cfg.retries, "backoff_s": cfg.retry_backoff_s})
    actor_args: dict = {}
    if cfg.gpus_per_actor > 0:
        actor_args["num_gpus"] = cfg.gpus_per_actor
    return ds.map_batches(actor or CascadeActor,
                          fn_constructor_kwargs={"factory": factory, "require_gpu": cfg.gpus_per_actor > 0,
                                                 "retries": cfg.retries, "backoff_s": cfg.retry_backoff_s},
                          batch_size=cfg.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=cfg.actors), **actor_args)


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    t = summary["timings"]
    lines = [
        f"scored {summary['images_in']} images from {summary['images_uri']}: {summary['scored']} scored, "
        f"{summary['errors']} errors ({summary['images_listed']} listed, {summary['images_already_scored']} "
        f"already scored in {summary['shards_skipped']} complete shards)",
        f"shards written: {summary['shards_written']} -> {summary['out']} (run {summary.get('run_id')}, "
        f"bundle version {(summary.get('bundle') or {}).get('version')})",
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
    if summary.get("transient_failures"):
        lines.append(f"transient failures (not recorded; the next run retries them): {summary['transient_failures']} "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(summary["transient_reasons"].items())))
        for e in summary["transient_examples"][:5]:
            lines.append(f"  {e['ImageId']}: {e['reason']}")
    return "\n".join(lines)


__all__ = ["score", "decode_batch", "CascadeActor", "cascade_dataset", "BundleCascade", "batch_result",
           "format_summary", "exit_problems", "is_oom", "FAIL_AFTER_ENV", "PAUSE_AT_ENV", "PAUSE_FILE_ENV"]
