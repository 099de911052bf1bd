"""The competition metric: mean Dice over every (ImageId, ClassId) pair, 1 when both masks are empty.

Dice is computed from the run-length encodings directly, without decoding masks: two sorted lists of
runs intersect in ``sum(max(0, min(end) - max(start)))`` over the run pairs that overlap, and
``np.searchsorted`` finds those pairs. :func:`mean_dice` parses every encoding of a submission in one
pass and lays all pairs end to end on one axis (pair ``k`` owns pixels ``[k*H*W, (k+1)*H*W)``), so a
whole test set (5,506 images x 4 classes) is a handful of numpy calls.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from steel.core.names import CLASSES, SHAPE
from steel.data import rle

_BLOCK_PAIRS = 2048  # pairs scored together (512 images)
_COLUMNS = ("ImageId", "ClassId", "EncodedPixels")


def dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Dice of two masks of the same shape (any nonzero pixel is set); 1.0 when both are empty."""
    pred_mask, true_mask = np.asarray(pred_mask), np.asarray(true_mask)
    if pred_mask.shape != true_mask.shape:
        raise ValueError(f"mask shapes differ: pred {pred_mask.shape} vs truth {true_mask.shape}")
    p, t = pred_mask.astype(bool), true_mask.astype(bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def presence(rows: pd.DataFrame, images: list[str]) -> np.ndarray:
    """(N, 4) int: 1 where an image has a non-empty mask of that class."""
    out = np.zeros((len(images), len(CLASSES)), dtype=int)
    index = {img: i for i, img in enumerate(images)}
    nonempty = rows[rows["EncodedPixels"].fillna("").astype(str).str.strip() != ""]
    for img, cls in zip(nonempty["ImageId"], nonempty["ClassId"]):
        if img in index:
            out[index[img], int(cls) - 1] = 1
    return out


def all_empty(present: np.ndarray) -> tuple[float, dict[str, float]]:
    """Mean Dice (overall, per class) of predicting no defect anywhere: 1 on every (image, class) pair
    whose truth is empty, 0 on the others. ``present``: (images, 4) truth presence (nonzero: a defect)."""
    empty = ~np.asarray(present).astype(bool).reshape(-1, len(CLASSES))
    if not len(empty):
        return float("nan"), {str(k): float("nan") for k in CLASSES}
    return float(empty.mean()), {str(k): float(empty[:, j].mean()) for j, k in enumerate(CLASSES)}


def dice_rle(pred_rle, true_rle, shape: tuple[int, int] = SHAPE) -> float:
    """Dice of two encodings (''/NaN/None = empty) without decoding them; 1.0 when both are empty."""
    p_start, p_len = rle.runs(pred_rle, shape)
    t_start, t_len = rle.runs(true_rle, shape)
    total = int(p_len.sum()) + int(t_len.sum())
    if total == 0:
        return 1.0
    inter = _overlap(p_start, p_start + p_len, np.zeros(p_start.size, np.int64),
                     t_start, t_start + t_len, 1)[0]
    return 2.0 * float(inter) / total


def mean_dice(pred: pd.DataFrame, truth: pd.DataFrame, shape: tuple[int, int] = SHAPE) -> dict:
    """Mean Dice of a submission against the truth, both in long layout.

    Both frames have columns ImageId, ClassId (1..4) and EncodedPixels (''/NaN = empty). The pairs
    scored are every image in ``pred`` times the 4 classes; a missing row is an empty mask. Truth rows
    of images that ``pred`` lacks raise ValueError, as do duplicate (ImageId, ClassId) rows, class ids
    outside 1..4 and invalid encodings (the message names the row).

    Returns ``{"mean_dice", "per_class": {1..4: float}, "n_images", "n_pairs",
    "per_pair": DataFrame(ImageId, ClassId, dice)}``.
    """
    pred = _checked(pred, "pred")
    truth = _checked(truth, "truth")
    images = pd.Index(pd.unique(pred["ImageId"])).sort_values()
    if images.empty:
        raise ValueError("pred has no rows: nothing to score")
    missing = pd.unique(truth["ImageId"][images.get_indexer(truth["ImageId"]) < 0])
    if missing.size:
        raise ValueError(f"{missing.size} image(s) in truth are not in pred: {_few(missing)}")

    n_pairs = images.size * len(CLASSES)
    sides = [_Encodings(pred, images, "pred"), _Encodings(truth, images, "truth")]
    scores = np.empty(n_pairs)
    # A block of pairs at a time keeps the arrays small (cache-sized, no page-fault churn).
    for lo in range(0, n_pairs, _BLOCK_PAIRS):
        hi = min(lo + _BLOCK_PAIRS, n_pairs)
        (p_start, p_end, p_pair, p_area), (t_start, t_end, _, t_area) = (
            side.runs(lo, hi, shape) for side in sides)
        inter = _overlap(p_start, p_end, p_pair, t_start, t_end, hi - lo)
        total = p_area + t_area
        scores[lo:hi] = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))

    per_pair = pd.DataFrame({
        "ImageId": np.repeat(images.to_numpy(), len(CLASSES)),
        "ClassId": np.tile(np.array(CLASSES, dtype=np.int64), images.size),
        "dice": scores,
    })
    by_class = scores.reshape(images.size, len(CLASSES)).mean(axis=0)
    return {
        "mean_dice": float(scores.mean()),
        "per_class": {c: float(v) for c, v in zip(CLASSES, by_class)},
        "n_images": int(images.size),
        "n_pairs": int(n_pairs),
        "per_pair": per_pair,
    }


# ----------------------------------------------------------------------------------------------
# Helpers


def _few(values, limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def _checked(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Columns present, ClassId an integer in 1..4, no duplicate (ImageId, ClassId)."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name} must be a DataFrame, got {type(df).__name__}")
    absent = [c for c in _COLUMNS if c not in df.columns]
    if absent:
        raise ValueError(f"{name} lacks column(s) {', '.join(absent)}; has {', '.join(map(str, df.columns))}")
    df = df.loc[:, list(_COLUMNS)].copy()
    df["ImageId"] = df["ImageId"].astype(str)
    cls = pd.to_numeric(df["ClassId"], errors="coerce")
    bad = cls.isna() | (cls != cls.round()) | ~cls.isin(CLASSES)
    if bad.any():
        rows = df.loc[bad, ["ImageId", "ClassId"]].itertuples(index=False)
        raise ValueError(f"{name}: ClassId must be 1..4, got {_few(f'{i} class {c!r}' for i, c in rows)}")
    df["ClassId"] = cls.astype(np.int64)
    dup = df.duplicated(["ImageId", "ClassId"], keep=False)
    if dup.any():
        counts = df.loc[dup].groupby(["ImageId", "ClassId"]).size()
        raise ValueError(f"{name}: duplicate (ImageId, ClassId) rows: "
                         f"{_few(f'{i} class {c} x{n}' for (i, c), n in counts.items())}")
    return df


class _Encodings:
    """The non-empty encodings of a frame, ordered by pair (``image index * 4 + class - 1``)."""

    def __init__(self, df: pd.DataFrame, images: pd.Index, name: str):
        pair = images.get_indexer(df["ImageId"]) * len(CLASSES) + (df["ClassId"].to_numpy() - 1)
        encoded = df["EncodedPixels"].to_numpy(dtype=object)
        keep = np.flatnonzero(pd.notna(encoded) & (encoded != "") & (pair >= 0))
        keep = keep[np.argsort(pair[keep], kind="stable")]
        self.df, self.name, self.rows = df, name, keep
        self.strings = encoded[keep]
        self.pairs = pair[keep].astype(np.int64)

    def fail(self, k: int):
        """Raise the reason encoding ``k`` is invalid, naming its row."""
        row = self.df.iloc[self.rows[k]]
        where = f"{self.name} EncodedPixels of {row.ImageId} class {row.ClassId}"
        try:
            rle.validate(self.strings[k], self.shape)
        except rle.RLEError as e:
            raise rle.RLEError(f"{where}: {e}") from None
        raise rle.RLEError(f"{where} is invalid")

    def runs(self, lo: int, hi: int, shape):
        """Runs of pairs lo..hi-1 on one axis: (starts, ends, pair - lo of each run, area per pair).

        Starts/ends are 0-indexed, half-open, offset by ``(pair - lo) * H * W``, sorted.
        """
        self.shape = shape
        n_pixels = int(shape[0]) * int(shape[1])
        first, last = np.searchsorted(self.pairs, [lo, hi])
        strings, pair_of_string = self.strings[first:last], self.pairs[first:last] - lo
        parsed = _parse_many(strings)
        if parsed is None:  # unusual spacing or characters: one string at a time, naming a bad one
            parts = []
            for k in range(strings.size):
                try:
                    parts.append(rle.parse(strings[k]))
                except rle.RLEError:
                    self.fail(first + k)
            values = np.concatenate(parts) if parts else np.empty(0, np.int64)
            counts = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        else:
            values, counts = parsed
        odd = np.flatnonzero(counts % 2)
        if odd.size:
            self.fail(first + int(odd[0]))
        starts, lengths = values[0::2], values[1::2]
        run_pair = np.repeat(pair_of_string, counts // 2)  # one string per pair: duplicates were refused
        # Written so that no sum can overflow (numpy's parser saturates values too big for int64).
        bad = (starts < 1) | (lengths < 1) | (lengths > n_pixels + 1 - starts)
        bad[1:] |= (run_pair[1:] == run_pair[:-1]) & (starts[1:] - starts[:-1] < lengths[:-1])
        if bad.any():
            self.fail(first + int(np.searchsorted(np.cumsum(counts // 2), np.argmax(bad), side="right")))
        begin = run_pair * n_pixels + starts - 1
        area = np.bincount(run_pair, weights=lengths, minlength=hi - lo)
        return begin, begin + lengths, run_pair, area


def _parse_many(strings: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Every integer of many encodings in one pass: (values, number of tokens per string).

    For encodings written the usual way (tokens separated by single spaces); None for anything else,
    and the caller parses those one at a time.
    """
    if strings.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if not all(isinstance(s, str) for s in strings):
        return None
    big = " ".join(strings)
    if any(ch in big for ch in "\t\n\r\x0b\x0c"):
        return None
    # With single spaces only, a string has count(" ") + 1 tokens; extra spaces can only make that
    # count bigger, so if the counts add up to the number of values parsed, every count is right.
    counts = np.fromiter((s.count(" ") + 1 for s in strings), dtype=np.int64, count=strings.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (and stops) at anything it cannot parse
        try:
            values = np.fromstring(big, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    if values.size != counts.sum():
        return None
    return values, counts


def _overlap(a_start, a_end, a_pair, b_start, b_end, n_pairs: int) -> np.ndarray:
    """Pixels shared per pair by two sorted lists of disjoint half-open runs.

    Run ``i`` of A meets runs ``j0 <= j < j1`` of B, where ``b_end[j0]`` is the first end past
    ``a_start[i]`` and ``b_start[j1]`` the first start at or past ``a_end[i]``; there are at most
    ``len(A) + len(B)`` such meetings in all.
    """
    j0 = np.searchsorted(b_end, a_start, side="right")
    j1 = np.searchsorted(b_start, a_end, side="left")
    count = np.maximum(j1 - j0, 0)
    total = int(count.sum())
    if total == 0:
        return np.zeros(n_pairs)
    ia = np.repeat(np.arange(a_start.size), count)
    first = np.cumsum(count) - count
    ib = np.repeat(j0 - first, count) + np.arange(total)
    shared = np.minimum(a_end[ia], b_end[ib]) - np.maximum(a_start[ia], b_start[ib])
    return np.bincount(a_pair[ia], weights=shared, minlength=n_pairs)
