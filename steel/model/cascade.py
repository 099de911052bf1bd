"""The thresholded cascade: binary gate -> 4-label gate -> per-class U-Net -> pixel/area thresholds -> RLE.

For a batch of uint8 images (N x 256 x 1600 x 3):

1. the binary classifier runs on every image: defective iff ``p_defect >= t_bin``;
2. the multilabel classifier runs only on the defective images: class k passes iff also
   ``p_k >= t_k`` (``p_class`` stays NaN for images the binary gate stopped);
3. segmenter k runs only on the images where class k passed (batched together); its probability
   map is resized back to 256 x 1600 (``cv2.INTER_LINEAR`` on probabilities), thresholded at the
   pixel threshold ``p_k``, and emptied if its area is outside ``[min_area_k, max_area_k]``;
4. each mask is run-length encoded (:func:`steel.data.rle.encode`).

Models are plain callables ``f(batch) -> np.ndarray`` taking float32 NHWC at that model's input size,
scaled by that model's preprocessing (``steel.data.images.to_input``: the same resize and scaling as
training), and returning probabilities: ``(N, 1)`` binary, ``(N, 4)`` multilabel, ``(N, H, W, 1)``
segmenters. A bundle's Keras models are wrapped by :func:`steel.model.predictor.cascade_from_bundle`.

Flip test-time augmentation (``tta``: none | h | v | hv, for all models or per model as a dict)
averages each model's probabilities over flipped copies of its input; segmentation outputs are
flipped back before averaging. ``hv`` uses four views: identity, h, v and both.

The ``unified`` kind (one network, ``steel.model.networks``): ``models`` is ``{"unified": f}`` with ``f``
returning ``[cls (N, 5), mask (N, H, W, 4)]``. Each batch goes through it once (per TTA view), and
the steps above read that one output instead of calling models: the binary gate is ``cls[:, 0]``,
the class probabilities ``cls[:, 1:]``, the class-k map ``mask[..., k - 1]``; thresholds, area
filters, RLE and :meth:`Cascade.predict_probabilities` (tuning) are the same code for both kinds.

:attr:`Cascade.stats` counts the work done and the work the gates saved (in images; for the unified
kind ``forward_passes`` is the real work, the gate counts say which outputs were used).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from steel.core.names import CLASSES, MODEL_NAMES, SHAPE, TTA_MODES, TTA_VIEWS, UNIFIED, class_of
from steel.data import images as image_io
from steel.data import rle
from steel.model.thresholds import validate_thresholds


def _cv2():
    import cv2

    return cv2


def resize_prob(prob: np.ndarray, size: tuple[int, int] = SHAPE, interpolation: str = "linear") -> np.ndarray:
    """Resize a 2-D probability map to ``size`` (H, W): ``linear`` (upsampling) or ``area`` (downsampling)."""
    h, w = int(size[0]), int(size[1])
    prob = np.asarray(prob, dtype=np.float32)
    if prob.shape == (h, w):
        return prob
    cv2 = _cv2()
    flag = cv2.INTER_LINEAR if interpolation == "linear" else cv2.INTER_AREA
    return cv2.resize(prob, (w, h), interpolation=flag)


def mask_from_prob(prob: np.ndarray, pixel: float, min_area: int, max_area: int,
                   shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, int]:
    """Full-resolution mask from a (possibly low-res) probability map: resize, threshold, area filter.

    Returns ``(mask uint8, raw_area)``; the mask is all zero when ``raw_area`` is outside
    ``[min_area, max_area]``.
    """
    full = resize_prob(prob, shape, "linear")
    mask = (full >= pixel).astype(np.uint8)
    area = int(mask.sum())
    if area < min_area or area > max_area:
        mask[:] = 0
    return mask, area


def _normalise_tta(tta: str | Mapping[str, str] | None, names: Sequence[str] = MODEL_NAMES) -> dict[str, str]:
    if tta is None:
        tta = "none"
    if isinstance(tta, str):
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
        return {name: tta for name in names}
    if not isinstance(tta, Mapping):
        raise ValueError(f"tta must be a mode string or a mapping model name -> mode, got {type(tta).__name__}")
    unknown = sorted(set(tta) - set(names))
    if unknown:
        raise ValueError(f"tta: unknown model {unknown[0]!r}; models are {', '.join(names)}")
    out = {}
    for name in names:
        mode = tta.get(name, "none")
        if mode not in TTA_MODES:
            raise ValueError(f"tta[{name!r}] must be one of {', '.join(TTA_MODES)}; got {mode!r}")
        out[name] = mode
    return out


def _as_batch(images: Any) -> np.ndarray:
    if isinstance(images, (list, tuple)):
        if not images:
            return np.zeros((0, *SHAPE, 3), dtype=np.uint8)
        images = np.stack([np.asarray(i) for i in images])
    images = np.asarray(images)
    if images.ndim == 3:
        raise ValueError(f"images must be a batch N x 256 x 1600 x 3; got one image of shape {images.shape} "
                         "(add a batch axis)")
    if images.ndim != 4 or images.shape[1:] != (*SHAPE, 3):
        raise ValueError(f"images must have shape N x {SHAPE[0]} x {SHAPE[1]} x 3, got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {images.dtype}")
    return images


class Cascade:
    """Gated inference with six models, or the one unified model, and a thresholds mapping (see the
    module docstring).

    Args:
        models: model name (binary, multilabel, seg1..seg4) -> callable(float32 NHWC) -> probabilities;
            or ``{"unified": callable -> [cls (N, 5), mask (N, H, W, 4)]}``.
        input_sizes: model name -> (H, W) the model takes.
        thresholds: a thresholds mapping (:mod:`steel.model.thresholds` schema); validated here.
        tta: none | h | v | hv, or a mapping model name -> mode (missing models: none).
        batch_size: largest batch handed to one model call (None: the whole gated subset at once).
        preprocessing: model name -> input scaling (``steel.data.images.PREPROCESSINGS``); missing
            models, or None: ``unit`` ([0, 1], what bundles without a recorded preprocessing used).
    """

    def __init__(self, models: Mapping[str, Callable[[np.ndarray], Any]],
                 input_sizes: Mapping[str, Sequence[int]], thresholds: dict,
                 tta: str | Mapping[str, str] = "none", batch_size: int | None = None,
                 preprocessing: Mapping[str, str] | None = None):
        self.kind = UNIFIED if UNIFIED in models else "cascade"
        names = (UNIFIED,) if self.kind == UNIFIED else MODEL_NAMES
        self.names = names
        missing = [n for n in names if n not in models]
        if missing:
            raise ValueError(f"Cascade needs all six models (or one 'unified'); missing {', '.join(missing)}")
        unknown = sorted(set(models) - set(names))
        if unknown:
            raise ValueError(f"Cascade: unknown model {unknown[0]!r}; models are {', '.join(names)}")
        for name in names:
            if not callable(models[name]):
                raise ValueError(f"model {name!r} is not callable (got {type(models[name]).__name__})")
        self.models = dict(models)
        self.input_sizes: dict[str, tuple[int, int]] = {}
        for name in names:
            if name not in input_sizes:
                raise ValueError(f"input_sizes: missing the input size (H, W) of model {name!r}")
            size = tuple(int(v) for v in input_sizes[name])
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"input_sizes[{name!r}] must be (H, W) with positive values, got {input_sizes[name]!r}")
            self.input_sizes[name] = size  # type: ignore[assignment]
        preprocessing = dict(preprocessing or {})
        unknown = sorted(set(preprocessing) - set(names))
        if unknown:
            raise ValueError(f"preprocessing: unknown model {unknown[0]!r}; models are {', '.join(names)}")
        self.preprocessing = {name: image_io.preprocessing_of(preprocessing.get(name)) for name in names}
        self.thresholds = validate_thresholds(thresholds)
        self.tta = _normalise_tta(tta, names)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.reset_stats()

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        self._stats = {
            "images": 0,
            "binary_calls": 0,
            "multilabel_calls": 0,
            "multilabel_calls_saved": 0,
            "seg_calls": 0,
            "seg_calls_saved": 0,
            "seg_calls_per_class": {k: 0 for k in CLASSES},
            "forward_passes": 0,  # images through any model, counting every TTA view
        }

    @property
    def stats(self) -> dict:
        """Cumulative counts over :meth:`predict` calls (in images; a gated call saves one image)."""
        s = dict(self._stats)
        s["seg_calls_per_class"] = dict(self._stats["seg_calls_per_class"])
        return s

    # ------------------------------------------------------------------ model calls
    def _call(self, name: str, x: np.ndarray) -> np.ndarray:
        """One model over ``x`` (already resized, float32), TTA-averaged, in chunks of batch_size."""
        n = x.shape[0]
        step = self.batch_size or n
        parts = []
        for start in range(0, n, step):
            chunk = x[start:start + step]
            acc = None
            views = TTA_VIEWS[self.tta[name]]
            for flip_v, flip_h in views:
                view = chunk
                if flip_v:
                    view = view[:, ::-1]
                if flip_h:
                    view = view[:, :, ::-1]
                outs = self._check_output(name, self.models[name](np.ascontiguousarray(view)), view.shape[0])
                outs = list(outs) if isinstance(outs, tuple) else [outs]
                for i, out in enumerate(outs):
                    if out.ndim >= 3:  # segmentation map (n, h, w[, c]): undo the flip
                        if flip_v:
                            out = out[:, ::-1]
                        if flip_h:
                            out = out[:, :, ::-1]
                        outs[i] = out
                acc = outs if acc is None else [a + o for a, o in zip(acc, outs)]
                self._stats["forward_passes"] += view.shape[0]
            parts.append([a / np.float32(len(views)) for a in acc])
        joined = [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))] if parts else []
        if name == UNIFIED:
            return tuple(joined) if joined else (np.zeros((0, 5), np.float32),
                                                 np.zeros((0, *self.input_sizes[name], 4), np.float32))
        return joined[0]

    @staticmethod
    def _check_output(name: str, out: Any, n: int):
        if name == UNIFIED:
            if not isinstance(out, (list, tuple)) or len(out) != 2:
                raise ValueError(f"unified model must return [cls (N, 5), mask (N, H, W, 4)], got {type(out).__name__}")
            cls, mask = (np.asarray(o.numpy() if hasattr(o, "numpy") else o, dtype=np.float32) for o in out)
            if cls.shape != (n, 5) or mask.ndim != 4 or mask.shape[0] != n or mask.shape[3] != 4:
                raise ValueError(f"unified model must return [cls (N, 5), mask (N, H, W, 4)], got shapes "
                                 f"{cls.shape}, {mask.shape} for a batch of {n} images")
            return cls, mask
        if hasattr(out, "numpy"):
            out = out.numpy()
        out = np.asarray(out, dtype=np.float32)
        if out.shape[:1] != (n,):
            raise ValueError(f"model {name!r} returned shape {out.shape} for a batch of {n} images")
        if name == "binary":
            if out.ndim == 2 and out.shape[1] == 1:
                out = out[:, 0]
            if out.ndim != 1:
                raise ValueError(f"binary model must return (N, 1) probabilities, got shape {out.shape}")
        elif name == "multilabel":
            if out.shape != (n, 4):
                raise ValueError(f"multilabel model must return (N, 4) probabilities, got shape {out.shape}")
        else:
            if out.ndim == 4 and out.shape[3] == 1:
                out = out[..., 0]
            if out.ndim != 3:
                raise ValueError(f"segmenter {name!r} must return (N, H, W, 1) probabilities, got shape {out.shape}")
        return out

    def _inputs(self, images: np.ndarray, name: str, cache: dict) -> np.ndarray:
        """``images`` as the model's input (``steel.data.images``: resize, then its preprocessing).

        Resized once per input size and scaled once per (size, preprocessing) in a batch.
        """
        size, prep = self.input_sizes[name], self.preprocessing[name]
        if (size, prep) not in cache:
            if size not in cache:
                cache[size] = image_io.resize(images, size)
            cache[(size, prep)] = image_io.preprocess(cache[size], prep)
        return cache[(size, prep)]

    def _run(self, name: str, images: np.ndarray, index: np.ndarray, cache: dict) -> np.ndarray:
        if self.kind == UNIFIED:  # one forward pass of every image per batch; the steps read its outputs
            if UNIFIED not in cache:
                cache[UNIFIED] = self._call(UNIFIED, self._inputs(images, UNIFIED, cache))
            cls, mask = cache[UNIFIED]
            if name == "binary":
                out = cls[:, 0]
            elif name == "multilabel":
                out = cls[:, 1:]
            else:
                out = mask[..., class_of(name) - 1]
            return out if index.size == out.shape[0] else out[index]
        x = self._inputs(images, name, cache)
        if index.size != x.shape[0]:
            x = x[index]
        return self._call(name, x)

    # ------------------------------------------------------------------ public inference
    def predict(self, images: Any, image_ids: Sequence[str] | None = None) -> list[dict]:
        """Gated predictions for a batch of uint8 images N x 256 x 1600 x 3.

        Returns one dict per image: ``p_defect`` (float), ``p_class`` (4 floats; NaN where the
        binary gate skipped the multilabel model), ``masks`` (4 RLE strings, '' = empty; ``rle`` is
        the same list), ``areas`` (4 ints: area of each final mask), ``raw_areas`` (area before the
        area filter; 0 where the segmenter was gated), and ``ImageId`` when ``image_ids`` is given.
        """
        images = _as_batch(images)
        n = images.shape[0]
        if image_ids is not None and len(image_ids) != n:
            raise ValueError(f"image_ids has {len(image_ids)} entries for {n} images")
        th = self.thresholds
        cache: dict = {}
        everyone = np.arange(n)
        p_defect = self._run("binary", images, everyone, cache) if n else np.zeros(0, np.float32)
        defective = np.flatnonzero(p_defect >= th["binary"])
        p_class = np.full((n, 4), np.nan, dtype=np.float32)
        if defective.size:
            p_class[defective] = self._run("multilabel", images, defective, cache)
        masks = [["" for _ in CLASSES] for _ in range(n)]
        areas = np.zeros((n, 4), dtype=np.int64)
        raw_areas = np.zeros((n, 4), dtype=np.int64)
        seg_calls = 0
        for j, k in enumerate(CLASSES):
            ck = th["classes"][str(k)]
            with np.errstate(invalid="ignore"):
                passed = np.flatnonzero(p_class[:, j] >= ck["prob"])  # NaN (not defective) never passes
            if not passed.size:
                continue
            probs = self._run(f"seg{k}", images, passed, cache)
            seg_calls += passed.size
            self._stats["seg_calls_per_class"][k] += int(passed.size)
            for row, i in enumerate(passed):
                mask, raw = mask_from_prob(probs[row], ck["pixel"], ck["min_area"], ck["max_area"])
                raw_areas[i, j] = raw
                if mask.any():
                    areas[i, j] = raw
                    masks[i][j] = rle.encode(mask)
        s = self._stats
        s["images"] += n
        s["binary_calls"] += n
        s["multilabel_calls"] += int(defective.size)
        s["multilabel_calls_saved"] += n - int(defective.size)
        s["seg_calls"] += seg_calls
        s["seg_calls_saved"] += 4 * n - seg_calls
        out = []
        for i in range(n):
            item = {
                "p_defect": float(p_defect[i]),
                "p_class": [float(v) for v in p_class[i]],
                "masks": masks[i],
                "rle": masks[i],
                "areas": [int(v) for v in areas[i]],
                "raw_areas": [int(v) for v in raw_areas[i]],
            }
            if image_ids is not None:
                item = {"ImageId": image_ids[i], **item}
            out.append(item)
        return out

    def predict_probabilities(self, images: Any, seg_size: Sequence[int] | None = None,
                              seg_dtype: Any = np.float32) -> dict:
        """Raw, ungated probabilities of every model for every image (for threshold tuning).

        Returns ``{"p_defect": (N,), "p_class": (N, 4), "seg": {k: (N, h, w)}}`` with each
        segmenter's map at its output resolution, or resized to ``seg_size`` (H, W) with
        ``cv2.INTER_AREA`` (averaging, so areas scale by (256*1600)/(H*W)), as ``seg_dtype``.
        """
        images = _as_batch(images)
        n = images.shape[0]
        cache: dict = {}
        everyone = np.arange(n)
        result: dict = {"p_defect": np.zeros(0, np.float32), "p_class": np.zeros((0, 4), np.float32), "seg": {}}
        if n:
            result["p_defect"] = self._run("binary", images, everyone, cache)
            result["p_class"] = self._run("multilabel", images, everyone, cache)
        for k in CLASSES:
            name = f"seg{k}"
            if not n:
                h, w = seg_size or self.input_sizes[self.names[-1]]
                result["seg"][k] = np.zeros((0, int(h), int(w)), dtype=seg_dtype)
                continue
            probs = self._run(name, images, everyone, cache)
            if seg_size is not None:
                probs = np.stack([resize_prob(p, seg_size, "area") for p in probs])
            result["seg"][k] = probs.astype(seg_dtype, copy=False)
        s = self._stats
        s["images"] += n
        s["binary_calls"] += n
        s["multilabel_calls"] += n
        s["seg_calls"] += 4 * n
        for k in CLASSES:
            s["seg_calls_per_class"][k] += n
        return result


def rows_from_predictions(predictions: Sequence[dict]) -> list[dict]:
    """Long-layout rows (ImageId, ClassId, EncodedPixels) from :meth:`Cascade.predict` output with ImageIds."""
    rows = []
    for item in predictions:
        if "ImageId" not in item:
            raise ValueError("predictions have no ImageId; pass image_ids to Cascade.predict")
        for j, k in enumerate(CLASSES):
            rows.append({"ImageId": item["ImageId"], "ClassId": k, "EncodedPixels": item["masks"][j]})
    return rows


__all__ = ["Cascade", "resize_prob", "mask_from_prob", "rows_from_predictions"]

