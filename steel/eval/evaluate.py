"""Mean Dice of a submission against truth (the competition metric), overall and per class.

``steel evaluate --submission SUB.csv --truth TRUTH.csv [--json] [--shape H W]``

Both files may be in either layout (``ImageId,ClassId,EncodedPixels`` or
``ImageId_ClassId,EncodedPixels``). Pairs are every submission image x classes 1..4; a pair with no
row is empty. Truth is usually train.csv-style with only defect rows, which says nothing about
defect-free images: a submission image the truth does not name counts as defect-free. A truth that
also lists empty pairs (4 rows per image) names its images, so a submission image missing from it
is an error. Truth images missing from the submission are always an error (listed).
"""

from __future__ import annotations

import logging

import pandas as pd

from steel.core.names import CLASSES, SHAPE
from steel.data.submission import MAX_LISTED, read_rows

log = logging.getLogger(__name__)


def _listed(names, limit: int = MAX_LISTED) -> str:
    names = sorted(names)
    text = ", ".join(names[:limit])
    return text + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def evaluate(submission: str | pd.DataFrame, truth: str | pd.DataFrame,
             shape: tuple[int, int] = SHAPE) -> dict:
    """Score a submission (URI or DataFrame, either layout) against truth (same).

    Returns a dict with ``mean_dice`` (float), ``per_class`` ({"1": float, ..., "4": float}),
    ``n_images``, ``n_pairs``, ``counts`` ({"1": {"truth": images with that defect,
    "pred": images predicted with it}, ...}) and, for further reporting, ``per_pair`` (DataFrame
    ImageId, ClassId, dice), ``pred`` and ``truth`` (the long-form rows that were scored).
    Raises ValueError for unreadable input, bad rows, or images the two sides disagree on.
    """
    from steel.eval import metrics

    pred = read_rows(submission, shape=shape)
    true = read_rows(truth, shape=shape)
    sub_images = set(pred["ImageId"])
    if not sub_images:
        raise ValueError(f"{_name(submission)}: the submission has no rows")
    missing = set(true["ImageId"]) - sub_images
    if missing:
        raise ValueError(f"{len(missing)} truth images are missing from the submission "
                         f"(add rows for them, empty if no defect): {_listed(missing)}")
    truth_lists_empty = bool((true["EncodedPixels"] == "").any())
    unknown = sub_images - set(true["ImageId"])
    if unknown:
        if truth_lists_empty:
            raise ValueError(f"{len(unknown)} submission images are not in the truth, which lists its "
                             f"images with empty rows: {_listed(unknown)}")
        log.info("%d submission images have no truth rows: scored as defect-free", len(unknown))

    result = metrics.mean_dice(pred, true, shape=shape)
    per_class = {str(k): float(v) for k, v in result["per_class"].items()}
    counts = {}
    for k in CLASSES:
        counts[str(k)] = {
            "truth": int(((true["ClassId"] == k) & (true["EncodedPixels"] != "")).sum()),
            "pred": int(((pred["ClassId"] == k) & (pred["EncodedPixels"] != "")).sum()),
        }
    return {
        "mean_dice": float(result["mean_dice"]),
        "per_class": {str(k): per_class[str(k)] for k in CLASSES},
        "n_images": int(result["n_images"]),
        "n_pairs": int(result["n_pairs"]),
        "counts": counts,
        "per_pair": result["per_pair"],
        "pred": pred,
        "truth": true,
    }


def _name(src) -> str:
    return src if isinstance(src, str) else "DataFrame"


def summary(result: dict) -> dict:
    """The JSON-able summary printed by ``--json``: mean_dice, per_class, n_images."""
    return {"mean_dice": result["mean_dice"], "per_class": result["per_class"], "n_images": result["n_images"]}


def format_table(result: dict) -> str:
    """Human-readable result: overall mean Dice, then one line per class."""
    lines = [
        f"mean Dice {result['mean_dice']:.4f} over {result['n_images']} images ({result['n_pairs']} pairs)",
        "",
        "class    dice   truth images   predicted images",
    ]
    for k in CLASSES:
        c = result["counts"][str(k)]
        lines.append(f"{k:>5}  {result['per_class'][str(k)]:.4f}   {c['truth']:>12}   {c['pred']:>16}")
    return "\n".join(lines)
