"""The stages of scoring's Ray Data pipeline, run in Ray workers: decode tasks, then the cascade actor pool.

::

    from_items(files)                                  one row per file (shard, image_id, file)
      .map_batches(decode_batch)                       CPU tasks: bytes -> uint8 256x1600x3, or an error reason
      .map_batches(CascadeActor, ActorPoolStrategy)    models loaded once per actor; the gated cascade

:func:`cascade_dataset` builds it (lazily); batch scoring (:mod:`steel.score.run`), tuning's and
evaluation's probability passes (:mod:`steel.score.probabilities`) and the Serve endpoint (the same
actor class) all run these stages, so their answers cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable

import numpy as np

from steel.core import s3, storage
from steel.core.config import ScoreConfig
from steel.core.names import CLASSES, HEIGHT, IMAGE_FORMATS, WIDTH
from steel.core.retry import retry
from steel.data import images as image_io
from steel.score import io as score_io

log = logging.getLogger(__name__)


def decode_batch(batch: dict, allow_resize: bool = False, formats=IMAGE_FORMATS, retries: int = 0,
                 backoff_s: float = 1.0, endpoint: str | None = None) -> dict:
    """Ray Data stage: read and decode each file of a batch.

    In: columns ``shard``, ``image_id``, ``file`` (the URI exactly as listed: an S3 key is read as it
    is, so ``a//b.jpg`` and ``a/b.jpg`` stay two images) and optionally ``young`` (the store wrote the
    file less than ``score.settle_s`` ago). ``endpoint``: the S3 endpoint of the driver
    (a worker process has none set). Out: the same ids plus ``image`` (N x 256 x 1600 x 3 uint8; zeros
    for failed rows), ``error`` (the reason, '' when the image decoded) and ``error_kind``:

    - ``decode``: the file is bad, or it is still listed yet its key cannot be read: a permanent error row;
    - ``settling``: a young file that does not decode (a copy may still be writing it): no row, next run;
    - ``gone``: deleted since it was listed: no row, and the next listing decides;
    - ``transient``: the read failed ``retries + 1`` times: no row, retried next run.
    """
    n = len(batch["image_id"])
    images = np.zeros((n, HEIGHT, WIDTH, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    kinds = np.full(n, "", dtype=object)
    young = batch.get("young", np.zeros(n, dtype=bool))
    for i in range(n):
        uri = str(batch["file"][i])
        try:
            data = retry(lambda: storage.read_bytes(uri, endpoint), retries=retries, backoff_s=backoff_s,
                         what=f"reading {uri}", permanent=(FileNotFoundError,))
        except FileNotFoundError as e:
            errors[i], kinds[i] = _missing(uri, e, endpoint)
            continue
        except Exception as e:  # noqa: BLE001 - transient: this image stays pending, not the job's end
            errors[i], kinds[i] = f"could not read the file: {type(e).__name__}: {e}", "transient"
            continue
        try:
            images[i] = image_io.decode(data, allow_resize=allow_resize, formats=formats)
        except image_io.BadImage as e:
            errors[i], kinds[i] = str(e), "settling" if young[i] else "decode"
    return {
        "shard": np.asarray(batch["shard"], dtype=object),
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "file": np.asarray(batch["file"], dtype=object),
        "image": images,
        "error": errors,
        "error_kind": kinds,
    }


def _missing(uri: str, exc: FileNotFoundError, endpoint: str | None) -> tuple[str, str]:
    """``(reason, kind)`` for a listed file whose read said "not found"."""
    try:
        listed = storage.exists(uri, endpoint)
    except Exception as e:  # noqa: BLE001 - cannot tell: leave it pending
        return f"could not read the file: {exc}; and could not check it: {type(e).__name__}: {e}", "transient"
    if listed:  # a key the store lists but will not serve by that name: it would fail every night
        return f"listed but cannot be read by its own key: {exc}", "decode"
    return f"deleted since it was listed: {exc}", "gone"


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for key, value in after.items():
        if isinstance(value, dict):
            out[key] = stats_delta(before.get(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value - before.get(key, 0)
    return out


def add_stats(total: dict, delta: dict) -> None:
    for key, value in delta.items():
        if isinstance(value, dict):
            add_stats(total.setdefault(key, {}), value)
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
                self.errors = Counter("steel_score_errors", "images not scored, by kind (decode: permanent "
                                      "error row; transient, settling: retried next run; gone: deleted)",
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
        for kind in (*score_io.PERMANENT_KINDS, *score_io.LEFT_KINDS):
            self.metrics.inc("errors", int((kinds == kind).sum()), {"kind": kind})
        for j in range(4):
            self.metrics.inc("defects", int((scored & (masks[:, j] != "")).sum()), {"class_id": str(j + 1)})
        stats = np.full(n, "", dtype=object)
        if n:
            stats[0] = json.dumps(stats_delta(before, self._stats()))
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



def cascade_dataset(items: list[dict], cfg: ScoreConfig, formats, factory, actor=None):
    """The Ray Data pipeline ``from_items -> decode_batch -> actor pool`` (lazy; nothing runs yet).

    ``items``: one dict per file with ``shard``, ``image_id`` and ``file`` (its URI), optionally
    ``young`` (see :func:`decode_batch`). ``actor``: the actor stage class, :class:`CascadeActor` or a subclass
    (threshold tuning's probability stage); built once per actor with ``factory``, on
    ``cfg.gpus_per_actor`` GPUs (and then it refuses to start without one).
    """
    import ray

    blocks = max(1, min(len(items), math.ceil(len(items) / cfg.batch_size), 2000))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # Decoding is light (I/O + libjpeg): half a CPU per task. The differing resources also keep Ray
    # from fusing it into the actor stage, so decoding overlaps inference in separate CPU tasks.
    ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"allow_resize": cfg.allow_resize, "formats": formats, "retries": cfg.retries,
                                   "backoff_s": cfg.retry_backoff_s, "endpoint": s3.current_endpoint()})
    actor_args: dict = {}
    if cfg.gpus_per_actor > 0:
        actor_args["num_gpus"] = cfg.gpus_per_actor
    return ds.map_batches(actor or CascadeActor,
                          fn_constructor_kwargs={"factory": factory, "require_gpu": cfg.gpus_per_actor > 0,
                                                 "retries": cfg.retries, "backoff_s": cfg.retry_backoff_s},
                          batch_size=cfg.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=cfg.actors), **actor_args)
