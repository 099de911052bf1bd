"""A Serve replica's work, without Ray: decode and score images the way batch scoring does, and the JSON answers.

Images are decoded by :func:`steel.data.images.decode` and scored by :class:`steel.score.stages.CascadeActor`
around the bundle's cascade, so an answer is the very row set batch scoring writes
(:func:`steel.score.io.result_rows`). Every failure is a :class:`RequestError` with its HTTP status
and reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
import time
from typing import Any, Callable

import numpy as np

from steel.core.config import ScoreConfig, ServeConfig
from steel.core.names import HEIGHT, IMAGE_FORMATS, WIDTH
from steel.data import images as image_io
from steel.score import io as score_io


class RequestError(Exception):
    """A request that cannot be scored: ``status`` (4xx/5xx) and the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _json_float(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def result_json(image_id: str, result: dict, version: str) -> dict:
    """One image's answer, built from the rows batch scoring writes (:func:`score_io.result_rows`)."""
    rows = score_io.result_rows(image_id, result)
    return {
        "ImageId": image_id,
        "p_defect": _json_float(rows[0]["p_defect"]),
        "classes": [{"ClassId": r["ClassId"], "p_class": _json_float(r[f"p_class_{r['ClassId']}"]),
                     "EncodedPixels": r["EncodedPixels"], "area": int(r[f"area_{r['ClassId']}"])} for r in rows],
        "bundle_version": version,
    }


def json_rows(answer: dict) -> list[dict]:
    """An answer back as the four output rows of a parquet shard (ImageId, ClassId, EncodedPixels,
    p_defect, p_class_1..4, area_1..4); for clients that store answers beside batch scores."""
    nan = float("nan")
    extra = {"p_defect": nan if answer["p_defect"] is None else answer["p_defect"]}
    for c in answer["classes"]:
        extra[f"p_class_{c['ClassId']}"] = nan if c["p_class"] is None else c["p_class"]
        extra[f"area_{c['ClassId']}"] = c["area"]
    return [{"ImageId": answer["ImageId"], "ClassId": c["ClassId"], "EncodedPixels": c["EncodedPixels"], **extra}
            for c in answer["classes"]]


class Scorer:
    """Decode and score images the way batch scoring does; one per replica.

    Args:
        factory: ``f() -> predictor`` (default in :func:`build_app`: :class:`steel.model.predictor.BundleCascade`).
        version: the bundle version put into every answer.
        score_cfg: decoding settings (``allow_resize``, ``image_formats``) shared with ``steel score``.
        max_image_bytes: largest accepted image.
    """

    def __init__(self, factory: Callable[[], Any], version: str, score_cfg: ScoreConfig | None = None,
                 max_image_bytes: int = ServeConfig.max_image_bytes):
        from steel.score.stages import CascadeActor

        cfg = score_cfg or ScoreConfig()
        self.version = version
        self.allow_resize = cfg.allow_resize
        self.formats = tuple(cfg.image_formats or IMAGE_FORMATS)
        self.max_image_bytes = max_image_bytes
        self.batches = self.images = 0  # cascade calls and images scored (mean batch size in /ready)
        self.decoded, self.decode_s, self.score_s = 0, 0.0, 0.0  # wall time decoding / in cascade calls
        self._count = threading.Lock()  # decode() runs in several worker threads at once
        t0 = time.time()
        self.actor = CascadeActor(factory)
        self.load_s = time.time() - t0
        t0 = time.time()
        self.warm_up()
        self.warmup_s = time.time() - t0

    def warm_up(self) -> None:
        """Trace every model once (the gates would skip some on a blank image) and run one predict."""
        predictor = self.actor.predictor
        for name, fn in getattr(predictor, "models", {}).items():
            h, w = predictor.input_sizes[name]
            fn(np.zeros((1, h, w, 3), np.float32))
        predictor.predict(np.full((1, HEIGHT, WIDTH, 3), 128, np.uint8))
        if hasattr(predictor, "reset_stats"):
            predictor.reset_stats()

    def decode(self, data: bytes) -> np.ndarray:
        """Bytes -> image, or RequestError: 413 when too big, 422 with batch scoring's reason."""
        if len(data) > self.max_image_bytes:
            raise RequestError(413, f"image of {len(data)} bytes is over the limit of {self.max_image_bytes} bytes")
        t0 = time.perf_counter()
        try:
            return image_io.decode(data, allow_resize=self.allow_resize, formats=self.formats)
        except image_io.BadImage as e:
            raise RequestError(422, str(e)) from None
        finally:
            with self._count:
                self.decoded += 1
                self.decode_s += time.perf_counter() - t0

    def score(self, ids: list[str], images: list[np.ndarray]) -> list[dict | RequestError]:
        """Answers for decoded images (one cascade call); a RequestError(500) for an image that failed."""
        from steel.score.stages import batch_result

        n = len(ids)
        batch = {"shard": np.full(n, "", dtype=object), "image_id": np.asarray(ids, dtype=object),
                 "file": np.asarray(ids, dtype=object), "error": np.full(n, "", dtype=object),
                 "image": np.stack(images) if n else np.zeros((0, HEIGHT, WIDTH, 3), np.uint8)}
        self.batches += 1
        self.images += n
        t0 = time.perf_counter()
        out = self.actor(batch)  # an image whose prediction failed comes back with its error (500)
        self.score_s += time.perf_counter() - t0
        answers: list[dict | RequestError] = []
        for i in range(n):
            if out["error"][i]:
                answers.append(RequestError(500, str(out["error"][i])))
                continue
            try:
                answers.append(result_json(ids[i], batch_result(out, i), self.version))
            except Exception as e:  # noqa: BLE001 - this image's failure, not its batch's
                answers.append(RequestError(500, f"scoring failed: bad cascade result: {e}"))
        return answers


def parse_batch_body(body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """``(id, bytes)`` of each image of a batch request; RequestError(400) for a malformed body."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"batch body is not JSON: {e}") from None
    items = data.get("images") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise RequestError(400, 'batch body must be {"images": [{"id": NAME, "jpeg_b64": BASE64}, ...]} '
                                "with at least one image")
    if len(items) > max_images:
        raise RequestError(413, f"{len(items)} images in one request; the limit is {max_images}")
    out, seen = [], set()
    for k, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("jpeg_b64"), str):
            raise RequestError(400, f"images[{k}]: expected {{'id': NAME, 'jpeg_b64': BASE64}}")
        image_id = str(item.get("id") or f"image-{k}")
        if image_id in seen:
            raise RequestError(400, f"images[{k}]: id {image_id!r} given twice")
        seen.add(image_id)
        try:
            raw = base64.b64decode(item["jpeg_b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"images[{k}] ({image_id}): jpeg_b64 is not base64: {e}") from None
        out.append((image_id, raw))
    return out
