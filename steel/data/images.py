"""Image loading: the one path from file bytes to a model's input, shared by training, tuning and scoring.

::

    bytes --decode()--> uint8 256x1600x3 --resize(size)--> uint8 HxWx3 --preprocess(spec)--> float32 model input

- :func:`decode`: PIL, JPEG only by default, exactly 1600x256 (or bilinear-resized to it with
  ``allow_resize``); every rejection is a :class:`BadImage` whose message is the reason written to a
  scoring error row.
- :func:`resize`: OpenCV, ``INTER_AREA`` when shrinking (anti-aliased), ``INTER_LINEAR`` when
  enlarging, ``INTER_NEAREST`` for masks.
- :func:`preprocess`: the pixel scaling recorded in the model's spec (``spec["preprocessing"]``,
  one of :data:`PREPROCESSINGS`). A spec without that key (a bundle saved before preprocessing was
  recorded) gets :data:`LEGACY_PREPROCESSING`, ``unit`` ([0, 1]), which is what such bundles were
  trained on.
- :func:`load`: the three in a row, for one file and one model spec.

Training augments between :func:`resize` and :func:`preprocess` (on uint8 pixels); the cascade
resizes once per input size and preprocesses once per (size, preprocessing). No TensorFlow here: this
runs in Ray Data CPU workers.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from steel.core.names import HEIGHT, IMAGE_FORMATS, LEGACY_PREPROCESSING, PREPROCESSINGS, WIDTH

ACCEPTED_MODES: tuple[str, ...] = ("RGB", "L")  # grayscale becomes 3 equal channels, like the data

# ImageNet statistics of torchvision-style ("torch" mode) preprocessing, in RGB order.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# What each of steel.core.names.PREPROCESSINGS does to uint8 pixels x (as float32). Each equals a library function:
#   unit      x / 255                         Keras ImageDataGenerator(rescale=1/255): the seed's classifiers
#   imagenet  (x / 255 - mean) / std          sm.get_preprocessing('efficientnetb*') (efficientnet's 'torch' mode)
#   tf        x / 127.5 - 1                   sm.get_preprocessing('mobilenetv2') (Keras' 'tf' mode)
#   raw       x (0..255 as float)             sm.get_preprocessing('resnet18'/'resnet34') (identity)


class BadImage(ValueError):
    """An input file that cannot be used; the message is the reason written to the error row."""


def decode(data: bytes, allow_resize: bool = False, formats=IMAGE_FORMATS) -> np.ndarray:
    """Bytes of an image file -> uint8 array (256, 1600, 3); :class:`BadImage` with the reason.

    Accepted: the ``formats`` (PIL names, default JPEG only) in mode RGB or L (grayscale is
    repeated into 3 channels), exactly 1600x256 pixels - or any size with ``allow_resize``
    (bilinear resize to 1600x256). Rejected, each with its own reason: an empty file, bytes no
    image library recognises (e.g. a text file named .jpg), a truncated or corrupt file, another
    format (PNG, ...), another colour mode, another size. Note that JPEG decoders tolerate some
    damage (garbled entropy data decodes to garbled pixels without an error): only what the decoder
    rejects can be reported.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = bytes(data[:8])
        raise BadImage(f"not an image: no image format recognised ({len(data)} bytes, starting {head!r})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of this file
        raise BadImage(f"unreadable image header: {type(e).__name__}: {e}") from None
    fmt = img.format or "unknown"
    allowed = tuple(f.upper() for f in formats)
    if fmt.upper() not in allowed:
        raise BadImage(f"{fmt} image: only {', '.join(allowed)} accepted (the --image-formats option "
                       f"adds formats)")
    if img.mode not in ACCEPTED_MODES:
        raise BadImage(f"unsupported colour mode {img.mode} (expected RGB or L)")
    width, height = img.size
    if (width, height) != (WIDTH, HEIGHT) and not allow_resize:
        raise BadImage(f"wrong size {width}x{height} (expected {WIDTH}x{HEIGHT}; --allow-resize resizes)")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise BadImage(f"corrupt or truncated {fmt}: {type(e).__name__}: {e}") from None
    if (width, height) != (WIDTH, HEIGHT):
        img = img.resize((WIDTH, HEIGHT), Image.BILINEAR)
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (HEIGHT, WIDTH, 3):  # defensive: PIL promised RGB of this size
        raise BadImage(f"decoded to shape {arr.shape}, expected {(HEIGHT, WIDTH, 3)}")
    return arr


def read(uri: str, allow_resize: bool = False, formats=IMAGE_FORMATS) -> np.ndarray:
    """The image file at ``uri`` (any storage URI) decoded by :func:`decode`; :class:`BadImage` naming
    the file when it cannot be used. The one image read of training, tuning, evaluation and reports."""
    from steel.core import storage

    try:
        return decode(storage.read_bytes(uri), allow_resize=allow_resize, formats=formats)
    except BadImage as e:
        raise BadImage(f"{uri}: {e}") from None


def check_size(size, what: str = "size") -> tuple[int, int]:
    """``(h, w)`` from a pair of positive integers; ValueError naming ``what`` otherwise."""
    try:
        h, w = (int(v) for v in size)
        ok = [h, w] == list(size)
    except (TypeError, ValueError):
        ok = False
    if not ok or h <= 0 or w <= 0:
        raise ValueError(f"{what} must be two positive integers (H, W), got {size!r}")
    return h, w


def resize(images: np.ndarray, size, nearest: bool = False) -> np.ndarray:
    """Resize a batch ``N x H x W`` or ``N x H x W x C`` to ``size=(H, W)`` (no-op when equal).

    ``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when enlarging; ``nearest=True`` (masks) uses
    ``INTER_NEAREST``. The dtype is kept.
    """
    import cv2

    h, w = check_size(size)
    arr = np.asarray(images)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected a batch shaped (N, H, W) or (N, H, W, C), got {arr.shape}")
    if arr.shape[1:3] == (h, w):
        return arr
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if arr.shape[1] >= h and arr.shape[2] >= w else cv2.INTER_LINEAR
    out = np.empty((arr.shape[0], h, w, *arr.shape[3:]), dtype=arr.dtype)
    for i in range(arr.shape[0]):
        out[i] = cv2.resize(arr[i], (w, h), interpolation=interp).reshape(out.shape[1:])
    return out


def preprocessing_of(spec: Mapping | str | None) -> str:
    """The preprocessing name of a model spec (or a name); a spec without one is :data:`LEGACY_PREPROCESSING`."""
    if spec is None:
        name = LEGACY_PREPROCESSING
    elif isinstance(spec, str):
        name = spec
    else:
        name = spec.get("preprocessing") or LEGACY_PREPROCESSING
    if name not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {name!r}; choose from {', '.join(PREPROCESSINGS)}")
    return name


def preprocess(images: np.ndarray, spec: Mapping | str | None) -> np.ndarray:
    """uint8 RGB pixels (``N x H x W x 3`` or one ``H x W x 3``) -> float32 model input per ``spec``.

    ``spec`` is a model spec (``steel.model.networks.resolve_spec``; its ``preprocessing`` key) or a
    preprocessing name (see :data:`PREPROCESSINGS`). Only uint8 input is accepted: scaling twice is
    the classic silent bug this refuses.
    """
    name = preprocessing_of(spec)
    arr = np.asarray(images)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"expected RGB images shaped (N, H, W, 3) or (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0..255), got dtype {arr.dtype}")
    x = arr.astype(np.float32)
    if name == "unit":
        return x * np.float32(1.0 / 255.0)
    if name == "tf":
        x /= np.float32(127.5)
        x -= np.float32(1.0)
        return x
    if name == "imagenet":  # the same operations, in the same order, as keras' 'torch' mode
        x /= np.float32(255.0)
        x -= np.asarray(IMAGENET_MEAN, np.float32)
        x /= np.asarray(IMAGENET_STD, np.float32)
        return x
    return x  # raw


def to_input(images: np.ndarray, spec: Mapping) -> np.ndarray:
    """Decoded uint8 images -> the float32 input of the model ``spec`` describes (resize + preprocess)."""
    arr = np.asarray(images)
    one = arr.ndim == 3
    batch = resize(arr[None] if one else arr, spec["input_size"])
    out = preprocess(batch, spec)
    return out[0] if one else out


def load(data: bytes, spec: Mapping, allow_resize: bool = False, formats=IMAGE_FORMATS) -> np.ndarray:
    """File bytes -> the float32 ``H x W x 3`` input of the model ``spec`` describes."""
    return to_input(decode(data, allow_resize=allow_resize, formats=formats), spec)


__all__ = ["BadImage", "decode", "read", "resize", "preprocess", "preprocessing_of", "to_input", "load", "ACCEPTED_MODES"]
