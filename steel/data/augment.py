"""Training augmentation, batch-wise on numpy arrays (no TensorFlow: runs in Ray Data ``map_batches``).

- :func:`classifier_augment`: the seed's ``ImageDataGenerator`` transform for the two classifiers,
  redone with albumentations (Keras' generator is deprecated): random shear, zoom, rotation, width and
  height shift, horizontal and vertical flips, borders filled by replicating the edge pixels (Keras'
  default ``fill_mode='nearest'``).
- :func:`segmenter_augment`: for the U-Nets, horizontal/vertical flips applied to image and mask
  together (optionally the same affine as the classifiers, jointly) plus **defect blackout**: with
  probability ``blackout_prob`` an image's defect pixels are painted out and its mask emptied, which
  turns a defect image into a clean one (the "defect blackout" of the seed's future work and of the
  competition's top solutions). It teaches the U-Net to predict nothing on clean steel, which the
  per-class training sets (images *with* that class only) otherwise never show it.

Blackout paint: not literal black. A black blob on a grey steel surface is not a believable clean
image (the network would learn "black blob = no defect", which never occurs at test time, and the
sharp edge is itself a new artefact). Instead the defect region, dilated by a few pixels, is filled
with the *local background*: the mean of the clean pixels around it (normalized box filtering at
growing window sizes, so large regions still get a local value), plus Gaussian grain with the
standard deviation of the image's own clean texture, blended in with a soft edge. The result keeps the
local brightness gradient of the strip and its noise level. ``blackout_fill="black"`` gives the
literal variant.

Seed semantics, checked in Keras 2's ``ImageDataGenerator`` source: ``shear_range=0.2`` is a shear
angle of up to **0.2 degrees** (``apply_affine_transform`` calls ``np.deg2rad(shear)``), not 0.2
radians (about 11 degrees, the Keras 1 meaning). We keep the seed's actual behaviour
(:data:`SHEAR_DEGREES`); ``zoom_range=0.05`` scales each axis independently by 0.95..1.05,
``rotation_range=5`` rotates by up to 5 degrees, ``width/height_shift_range=0.2`` shift by up to 20%.

Determinism: every random choice comes from the ``np.random.Generator`` passed in (albumentations is
re-seeded from it once per batch), so the same generator state gives the same output.
"""

from __future__ import annotations

import numpy as np

SHEAR_DEGREES = 0.2  # Keras 2: shear_range=0.2 -> uniform(-0.2, 0.2) degrees
ZOOM = 0.05
ROTATION_DEGREES = 5.0
SHIFT = 0.2
BLACKOUT_DILATE_PX = 3
BLACKOUT_FILLS = ("background", "black")


def _affine(shear_degrees: float = SHEAR_DEGREES):
    import albumentations as A
    import cv2

    return A.Affine(
        scale=(1.0 - ZOOM, 1.0 + ZOOM), translate_percent=(-SHIFT, SHIFT), rotate=(-ROTATION_DEGREES, ROTATION_DEGREES),
        shear=(-shear_degrees, shear_degrees), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_REPLICATE, keep_ratio=False, p=1.0,
    )


def classifier_pipeline(shear_degrees: float = SHEAR_DEGREES):
    """The albumentations ``Compose`` behind :func:`classifier_augment` (affine, then h/v flips)."""
    import albumentations as A

    return A.Compose([_affine(shear_degrees), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])


def _check_images(images) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected a batch of images shaped (N, H, W, 3), got {arr.shape}")
    return arr


def _seed(rng: np.random.Generator) -> int:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    return int(rng.integers(0, 2**31 - 1))


def classifier_augment(images: np.ndarray, rng: np.random.Generator,
                       shear_degrees: float = SHEAR_DEGREES) -> np.ndarray:
    """Randomly shear/zoom/rotate/shift/flip each image of ``images`` (``N x H x W x 3``).

    Returns a new array of the same shape and dtype (uint8 stays uint8); ``images`` is not modified.
    """
    arr = _check_images(images)
    pipeline = classifier_pipeline(shear_degrees)
    pipeline.set_random_seed(_seed(rng))
    out = np.empty_like(arr)
    for i in range(len(arr)):
        out[i] = pipeline(image=np.ascontiguousarray(arr[i]))["image"].reshape(arr.shape[1:])
    return out


def segmenter_augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                      blackout_prob: float = 0.0, flips: bool = True, affine: bool = False,
                      blackout_fill: str = "background") -> tuple[np.ndarray, np.ndarray]:
    """Joint image+mask augmentation for the U-Nets, batch-wise.

    Args:
        images: ``N x H x W x 3`` (uint8 or float).
        masks: ``N x H x W`` or ``N x H x W x C`` (any dtype; > 0 is defect; C > 1: one channel per
            class, as the unified model's targets: blackout paints out every class and empties all).
        rng: the source of all randomness (same state -> same result).
        blackout_prob: chance, per image with a non-empty mask, to paint the defect out and empty the mask.
        flips: random horizontal and vertical flips (each with probability 0.5), image and mask together.
        affine: also apply the classifiers' shear/zoom/rotation/shift (mask: nearest neighbour).
        blackout_fill: ``background`` (local background + grain, the default) or ``black``.

    Returns:
        ``(images, masks)``: new arrays with the input shapes and dtypes.
    """
    arr = _check_images(images)
    m = np.asarray(masks)
    if m.shape[:3] != arr.shape[:3] or m.ndim not in (3, 4):
        raise ValueError(f"masks must be shaped (N, H, W) or (N, H, W, C) matching images {arr.shape}, got {m.shape}")
    if not 0.0 <= blackout_prob <= 1.0:
        raise ValueError(f"blackout_prob must be in [0, 1], got {blackout_prob}")
    if blackout_fill not in BLACKOUT_FILLS:
        raise ValueError(f"blackout_fill must be one of {', '.join(BLACKOUT_FILLS)}, got {blackout_fill!r}")
    if not isinstance(rng, np.random.Generator):
        _seed(rng)  # raises the clear TypeError
    n = len(arr)
    out_img = arr.copy()
    out_mask = m.copy()
    if affine:
        pipeline = _affine()
        pipeline.set_random_seed(_seed(rng))
        for i in range(n):
            res = pipeline(image=np.ascontiguousarray(out_img[i]), mask=np.ascontiguousarray(out_mask[i]))
            out_img[i] = res["image"].reshape(arr.shape[1:])
            out_mask[i] = res["mask"].reshape(m.shape[1:])
    if flips:
        hflip = rng.random(n) < 0.5
        vflip = rng.random(n) < 0.5
        for i in range(n):
            if hflip[i]:
                out_img[i] = out_img[i][:, ::-1]
                out_mask[i] = out_mask[i][:, ::-1]
            if vflip[i]:
                out_img[i] = out_img[i][::-1]
                out_mask[i] = out_mask[i][::-1]
    if blackout_prob > 0:
        chosen = rng.random(n) < blackout_prob
        for i in np.flatnonzero(chosen):
            defect = (out_mask[i].reshape(*arr.shape[1:3], -1) > 0).any(axis=-1)
            if not defect.any():
                continue
            out_img[i] = blackout(out_img[i], defect, rng, fill=blackout_fill)
            out_mask[i] = 0
    return out_img, out_mask


def blackout(image: np.ndarray, defect: np.ndarray, rng: np.random.Generator,
             fill: str = "background") -> np.ndarray:
    """Paint the ``defect`` pixels (bool ``H x W``) of one ``H x W x C`` image out; returns a new image.

    ``fill="background"``: the defect region, dilated by a few pixels, is replaced by the local mean
    of the clean pixels (normalized box filtering on a 4x smaller copy, windows of about 32, 128 and
    512 px, then the clean-pixel mean for regions wider than that), plus Gaussian grain with the
    standard deviation of the clean texture around the region, blended in with a soft 1-2 px edge.
    Equal channels (grey steel stored as RGB) stay equal. ``fill="black"``: defect pixels set to 0.
    Pixels away from the (dilated) region are never changed.
    """
    import cv2

    img = np.asarray(image)
    defect = np.asarray(defect, dtype=bool)
    if defect.shape != img.shape[:2]:
        raise ValueError(f"defect mask {defect.shape} does not match image {img.shape[:2]}")
    out = img.copy()
    if not defect.any():
        return out
    if fill == "black":
        out[defect] = 0
        return out
    if fill != "background":
        raise ValueError(f"fill must be one of {', '.join(BLACKOUT_FILLS)}, got {fill!r}")
    h, w = defect.shape
    region = cv2.dilate(defect.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=BLACKOUT_DILATE_PX) > 0
    # Work inside the region's bounding box (plus the soft edge); everything else stays untouched.
    ys, xs = np.nonzero(region)
    y0, y1 = max(0, ys.min() - 4), min(h, ys.max() + 5)
    x0, x1 = max(0, xs.min() - 4), min(w, xs.max() + 5)
    planes = img[..., None] if img.ndim == 2 else img
    gray = planes.shape[-1] == 1 or all(np.array_equal(planes[..., 0], planes[..., c])
                                        for c in range(1, planes.shape[-1]))
    work = planes[..., :1] if gray else planes
    clean = (~region).astype(np.float32)
    # Local background: normalized convolution of the clean pixels, computed at 1/4 resolution.
    f = 4
    small_size = (max(1, w // f), max(1, h // f))
    clean_s = cv2.resize(clean, small_size, interpolation=cv2.INTER_AREA)
    alpha = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 1.0)[y0:y1, x0:x1]
    alpha = np.maximum(alpha, defect[y0:y1, x0:x1].astype(np.float32))[..., None]
    grain = rng.standard_normal((y1 - y0, x1 - x0)).astype(np.float32)  # one field: grey stays grey
    # Texture level: clean pixels in a margin around the region.
    my0, my1, mx0, mx1 = max(0, y0 - 32), min(h, y1 + 32), max(0, x0 - 32), min(w, x1 + 32)
    near_clean = clean[my0:my1, mx0:mx1] > 0
    painted = np.empty((y1 - y0, x1 - x0, work.shape[-1]), np.float32)
    for c in range(work.shape[-1]):
        p = work[..., c].astype(np.float32)
        if clean.any():
            num_s = cv2.resize(p * clean, small_size, interpolation=cv2.INTER_AREA)
            filled = np.full(clean_s.shape, np.nan, np.float32)
            for k in (9, 33, 129):
                num = cv2.blur(num_s, (k, k), borderType=cv2.BORDER_REFLECT)
                den = cv2.blur(clean_s, (k, k), borderType=cv2.BORDER_REFLECT)
                todo = np.isnan(filled) & (den > 1e-3)
                filled[todo] = num[todo] / den[todo]
            filled[np.isnan(filled)] = float(p[clean > 0].mean())
            background = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR)[y0:y1, x0:x1]
        else:  # the whole frame is defect: nothing local to copy
            background = np.full((y1 - y0, x1 - x0), float(p.mean()), np.float32)
        sigma = 0.0
        if near_clean.sum() > 1:
            local = p[my0:my1, mx0:mx1]
            smooth = cv2.blur(local, (9, 9), borderType=cv2.BORDER_REFLECT)
            sigma = float((local - smooth)[near_clean].std())
        painted[..., c] = background + grain * sigma
    box = work[y0:y1, x0:x1].astype(np.float32)
    mixed = box * (1.0 - alpha) + painted * alpha
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        mixed = np.clip(np.rint(mixed), info.min, info.max)
    else:  # float pixels: stay inside the image's own range (e.g. [0, 1])
        mixed = np.clip(mixed, float(work.min()), float(work.max()))
    mixed = mixed.astype(img.dtype)
    if gray and planes.shape[-1] > 1:
        mixed = np.repeat(mixed, planes.shape[-1], axis=-1)
    if img.ndim == 2:
        out[y0:y1, x0:x1] = mixed[..., 0]
    else:
        out[y0:y1, x0:x1] = mixed
    return out


def augment_classifier(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Alias of :func:`classifier_augment` (keyword form used by ``steel.train.data``)."""
    return classifier_augment(images, rng)


def augment_segmentation(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                         blackout_prob: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Alias of :func:`segmenter_augment` with the defaults (flips, no affine, background blackout)."""
    return segmenter_augment(images, masks, rng, blackout_prob=blackout_prob)


__all__ = ["classifier_augment", "segmenter_augment", "augment_classifier", "augment_segmentation", "blackout", "classifier_pipeline",
           "SHEAR_DEGREES", "ZOOM", "ROTATION_DEGREES", "SHIFT"]
