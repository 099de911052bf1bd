"""Run-length encoding of masks in the Severstal competition format.

Pixels are numbered 1..H*W top-to-bottom, then left-to-right (column-major); an encoding is a
space-separated list of ``start length`` pairs, sorted, positive, never covering a pixel twice.
Everything here is vectorised with numpy: no Python loop over runs or pixels.
"""

from __future__ import annotations

import numpy as np

from steel.core.names import SHAPE

# decode() scatters pixels when they cover less than 1/_SCATTER_RATIO of the span from the first to
# the last set pixel (measured crossover on masks like Severstal's: bench/bench_rle.py).
_SCATTER_RATIO = 32
_INT64_MAX = np.iinfo(np.int64).max
_DIGITS_AND_SPACE = b"0123456789 \t\n\r\v\f"


class RLEError(ValueError):
    """An encoding that is not a valid competition RLE for the given shape."""


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (any nonzero pixel is set) as a competition RLE string ('' if empty)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RLEError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    h, w = mask.shape
    m = mask if mask.dtype == bool else mask != 0
    # Where a run starts or stops, in column-major pixel numbers, found without transposing the
    # mask (a byte-wise transpose costs more than everything else here): down each column ...
    rows, cols = np.divmod(np.flatnonzero(m[1:] != m[:-1]), w)
    inside = cols * h + rows + 1
    # ... and from the bottom of one column to the top of the next (column 0 starts after a 0).
    top = m[0]
    above = np.empty_like(top)
    above[0] = False
    above[1:] = m[-1, :-1]
    across = np.flatnonzero(top != above) * h
    changes = np.concatenate((inside, across))
    if m[-1, -1]:
        changes = np.append(changes, h * w)
    if not changes.size:
        return ""
    changes.sort()
    changes += 1  # 1-indexed: a run is [changes[2i], changes[2i+1])
    changes[1::2] -= changes[0::2]
    return " ".join(map(str, changes.tolist()))


def parse(rle: str | float | None) -> np.ndarray:
    """Tokens of an encoding as int64; NaN/None/'' mean empty."""
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return np.empty(0, dtype=np.int64)
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}")
    if not rle.strip():
        return np.empty(0, dtype=np.int64)
    # Only digits and whitespace (checked with bytes.translate, ~3x faster than str.translate): numpy's
    # text parser reads it in one call, ~5x faster than split. A number too big for int64 comes out
    # saturated, and runs rejects it.
    if rle.isascii() and not rle.encode("ascii").translate(None, _DIGITS_AND_SPACE):
        return np.fromstring(rle, dtype=np.int64, sep=" ")
    return _parse_tokens(rle)


def _parse_tokens(rle: str) -> np.ndarray:
    tokens = rle.split()
    if not tokens:
        return np.empty(0, dtype=np.int64)
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        for token in tokens:
            try:
                value = int(token)
            except ValueError:
                raise RLEError(f"RLE token {token!r} is not an integer") from None
            if abs(value) > _INT64_MAX:
                raise RLEError(f"RLE token {token!r} is too large") from None
        raise
    return values


def runs(rle, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-indexed (starts, lengths)."""
    values = parse(rle)
    if values.size % 2:
        raise RLEError(f"RLE has an odd number of tokens ({values.size}); it must be 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    if not values.size:
        return starts, lengths
    n = int(shape[0]) * int(shape[1])
    # A few cheap tests for the valid case; the precise reason is worked out only on failure. Once
    # every number is at most n, no sum below can overflow.
    if values.min() < 1 or values.max() > n:
        _explain(rle, starts, lengths, n, shape)
    ends = starts + lengths  # exclusive, 1-indexed
    if int(ends[-1]) - 1 > n or (starts[1:] < ends[:-1]).any():
        _explain(rle, starts, lengths, n, shape)
    return starts - 1, lengths


def _explain(rle, starts, lengths, n, shape) -> None:
    if isinstance(rle, str) and max(starts.max(), lengths.max()) == _INT64_MAX:
        _parse_tokens(rle)  # saturated by the fast parser: this names the token that is too large
    if (starts < 1).any():
        raise RLEError(f"RLE start {int(starts[starts < 1][0])} is not positive (pixels are 1-indexed)")
    if (lengths < 1).any():
        raise RLEError(f"RLE run length {int(lengths[lengths < 1][0])} is not positive")
    order_bad = np.flatnonzero(starts[1:] <= starts[:-1])
    if order_bad.size:
        i = int(order_bad[0])
        raise RLEError(f"RLE runs are not sorted: start {int(starts[i + 1])} follows {int(starts[i])}")
    overlap = np.flatnonzero(starts[1:] - starts[:-1] < lengths[:-1])
    if overlap.size:
        i = int(overlap[0])
        raise RLEError(
            f"RLE runs overlap: run at {int(starts[i])} (length {int(lengths[i])}) "
            f"covers start {int(starts[i + 1])}"
        )
    i = int(np.flatnonzero(lengths > n + 1 - starts)[0])
    end = int(starts[i]) + int(lengths[i]) - 1
    raise RLEError(f"RLE run ends at pixel {end}, past the image's {n} pixels {tuple(shape)}")


def validate(rle, shape: tuple[int, int] = SHAPE) -> None:
    """Raise :class:`RLEError` with a clear reason if ``rle`` is not valid for ``shape``."""
    runs(rle, shape)


def decode(rle, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Decode an RLE into a uint8 mask of ``shape`` (H, W) with values 0/1.

    The mask is laid out column-major (Fortran order: a transposed view of a (W, H) array, as the
    seed's ``rle2mask`` returns), the encoding's own pixel order, so runs are written as contiguous
    slices with no transpose. Use ``np.ascontiguousarray`` where row-major memory matters.

    Two strategies, picked by how much of the span from the first to the last set pixel is set
    (bench/bench_rle.py): sparse masks (pits, thin cracks) scatter their pixel numbers; dense ones
    (blobs) lay the span out with one ``np.repeat`` of alternating runs and gaps.
    """
    starts, lengths = runs(rle, shape)
    h, w = int(shape[0]), int(shape[1])
    flat = np.zeros(h * w, dtype=np.uint8)
    if starts.size:
        lo, hi = int(starts[0]), int(starts[-1]) + int(lengths[-1])  # set pixels lie in [lo, hi)
        n_set = int(lengths.sum())
        if n_set * _SCATTER_RATIO < hi - lo:
            # Pixel j of run i is starts[i] + j: one repeat of (start - pixels before the run) plus
            # a running count gives every pixel number.
            before = np.cumsum(lengths)
            before -= lengths
            index = np.repeat(starts - before, lengths)
            index += np.arange(n_set)
            flat[index] = 1
        else:
            # Runs and the gaps between them alternate: repeat 1, 0, 1, ..., 1 by their lengths.
            segments = np.empty(2 * starts.size - 1, dtype=np.int64)
            segments[0::2] = lengths
            segments[1::2] = starts[1:] - starts[:-1] - lengths[:-1]
            values = np.zeros(segments.size, dtype=np.uint8)
            values[0::2] = 1
            flat[lo:hi] = np.repeat(values, segments)
    return flat.reshape(w, h).T


def area(rle, shape: tuple[int, int] = SHAPE) -> int:
    """Number of pixels an encoding covers, without decoding it."""
    _, lengths = runs(rle, shape)
    return int(lengths.sum())
