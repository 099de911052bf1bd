"""Run-length encoding of masks in the Severstal competition format.

Pixels are numbered 1..H*W top-to-bottom, then left-to-right (column-major); an encoding is a
space-separated list of ``start length`` pairs, sorted, positive, never covering a pixel twice.
Everything here is vectorised with numpy: no Python loop over runs or pixels.
"""

from __future__ import annotations

import numpy as np

SHAPE: tuple[int, int] = (256, 1600)


class RLEError(ValueError):
    """An encoding that is not a valid competition RLE for the given shape."""


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (any nonzero pixel is set) as a competition RLE string ('' if empty)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RLEError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    pixels = np.ravel(mask, order="F").astype(bool)
    if not pixels.any():
        return ""
    padded = np.concatenate(([False], pixels, [False]))
    changes = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-indexed boundaries
    starts, ends = changes[0::2], changes[1::2]
    runs = np.empty(changes.size, dtype=np.int64)
    runs[0::2] = starts
    runs[1::2] = ends - starts
    return " ".join(map(str, runs.tolist()))


def _parse(rle: str | float | None) -> np.ndarray:
    """Tokens of an encoding as int64; NaN/None/'' mean empty."""
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return np.empty(0, dtype=np.int64)
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if not tokens:
        return np.empty(0, dtype=np.int64)
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not _is_int(t))
        raise RLEError(f"RLE token {bad!r} is not an integer") from None
    return values


def _is_int(token: str) -> bool:
    try:
        int(token)
        return True
    except ValueError:
        return False


def _runs(rle, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-indexed (starts, lengths)."""
    values = _parse(rle)
    if values.size % 2:
        raise RLEError(f"RLE has an odd number of tokens ({values.size}); it must be 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    if starts.size == 0:
        return starts, lengths
    if (starts < 1).any():
        raise RLEError(f"RLE start {int(starts[starts < 1][0])} is not positive (pixels are 1-indexed)")
    if (lengths < 1).any():
        raise RLEError(f"RLE run length {int(lengths[lengths < 1][0])} is not positive")
    ends = starts + lengths  # exclusive, 1-indexed
    if starts.size > 1:
        order_bad = np.flatnonzero(starts[1:] <= starts[:-1])
        if order_bad.size:
            i = int(order_bad[0])
            raise RLEError(f"RLE runs are not sorted: start {int(starts[i + 1])} follows {int(starts[i])}")
        overlap = np.flatnonzero(starts[1:] < ends[:-1])
        if overlap.size:
            i = int(overlap[0])
            raise RLEError(
                f"RLE runs overlap: run at {int(starts[i])} (length {int(lengths[i])}) "
                f"covers start {int(starts[i + 1])}"
            )
    n = int(shape[0]) * int(shape[1])
    if int(ends[-1]) - 1 > n:
        raise RLEError(f"RLE run ends at pixel {int(ends[-1]) - 1}, past the image's {n} pixels {tuple(shape)}")
    return starts - 1, lengths


def validate(rle, shape: tuple[int, int] = SHAPE) -> None:
    """Raise :class:`RLEError` with a clear reason if ``rle`` is not valid for ``shape``."""
    _runs(rle, shape)


def decode(rle, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Decode an RLE into a uint8 mask of ``shape`` (H, W) with values 0/1."""
    starts, lengths = _runs(rle, shape)
    h, w = int(shape[0]), int(shape[1])
    flat = np.zeros(h * w + 1, dtype=np.int8)
    if starts.size:
        # Difference array: +1 at each run start, -1 just after its end, then a cumulative sum.
        np.add.at(flat, starts, 1)
        np.add.at(flat, starts + lengths, -1)
        flat = np.cumsum(flat[:-1], dtype=np.int8)
    else:
        flat = flat[:-1]
    return flat.astype(np.uint8).reshape((w, h)).T.copy()


def area(rle, shape: tuple[int, int] = SHAPE) -> int:
    """Number of pixels an encoding covers, without decoding it."""
    _, lengths = _runs(rle, shape)
    return int(lengths.sum())
