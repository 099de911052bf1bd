"""Merge scoring shards into one sorted, Kaggle-ready submission CSV.

    steel merge OUT --to submission.csv [--layout long|combined] [--fill-errors] [--partial]

Reads every complete shard under ``OUT/shards`` (csv or parquet), checks that each image has
exactly four rows (ClassId 1..4 once each) and that every RLE is valid, and writes the rows sorted by ImageId, ClassId (atomically). Images that failed to score
(``OUT/errors``) are not in the shards: they are reported, and with ``--fill-errors`` written with
four empty rows so the file covers every input image. A run without ``_SUCCESS`` is refused unless
``--partial``. An image in two shards (two runs wrote it: older code, or a run that lost its lease
before fencing existed) is taken from the shard that owns it, the one scoring itself counts
(:func:`steel.score.io.done_images`: the first written); the summary counts the ignored copies.
"""

from __future__ import annotations

import logging

from steel.core.names import LAYOUTS

log = logging.getLogger(__name__)


class MergeError(ValueError):
    """Shards that do not make a valid submission; the message lists what is wrong."""


def _problems_text(title: str, items: list[str], limit: int = 10) -> str:
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title}:\n  " + "\n  ".join(items[:limit]) + more


def load_shards(out_uri: str, partial: bool = False):
    """All shard rows (long layout + ``shard`` column) and all error rows of a scoring output, each
    image's from the shard that owns it; the number of images whose other copies were left out; and the
    images an index lists that its shard's files do not hold (one line each)."""
    import pandas as pd

    from steel.core import storage
    from steel.score import io as score_io

    if not partial and not storage.exists(storage.join(out_uri, score_io.SUCCESS)):
        raise MergeError(f"{out_uri}: the scoring run has not finished (no {score_io.SUCCESS}); "
                         "run `steel score` again to complete it, or pass --partial")
    shards = score_io.complete_shards(out_uri)
    if not shards:
        raise MergeError(f"{out_uri}: no shards found under {storage.join(out_uri, 'shards')}")
    entries, owner = score_io.done_images(out_uri, score_io.read_manifest(out_uri))
    frames, errors = [], []
    for name, uri in sorted(shards.items()):
        df = score_io.read_rows_file(uri)[list(score_io.ROW_COLUMNS)]
        df["shard"] = name
        frames.append(df)
        err_uri = score_io.errors_uri(out_uri, name)
        if storage.exists(err_uri):
            e = score_io.read_errors_file(err_uri)
            e["shard"] = name
            errors.append(e)
    rows = pd.concat(frames, ignore_index=True)
    errs = pd.concat(errors, ignore_index=True) if errors else pd.DataFrame(
        columns=[*score_io.ERROR_COLUMNS, "shard"])
    ignored = sum(len(e.get("ignored", ())) for e in entries.values())
    rows, errs = _owned(rows, owner), _owned(errs, owner)
    # An index that promises an image its shard's files do not hold: never dropped silently.
    lost = [f"{i}: listed by the index of {owner[i]} but not in its files"
            for i in sorted(set(owner) - set(rows["ImageId"]) - set(errs["ImageId"]))]
    return rows, errs, ignored, lost


def _owned(frame, owner: dict[str, str]):
    """The rows of ``frame`` whose shard owns their image (an image no index lists keeps its rows)."""
    import numpy as np

    keep = np.array([owner.get(str(i), s) == s for i, s in zip(frame["ImageId"], frame["shard"])], dtype=bool)
    return frame.loc[keep].reset_index(drop=True)


def check_rows(rows, problems: list[str] | None = None) -> None:
    """Raise :class:`MergeError` unless every image has exactly one row for each class 1..4,
    every image is in one shard only, every EncodedPixels is a valid RLE and ``problems`` (found
    before) is empty."""
    from steel.data import rle

    problems = list(problems or [])
    shards_per_image = rows.groupby("ImageId")["shard"].nunique()
    for image_id in shards_per_image[shards_per_image > 1].index:
        names = sorted(set(rows.loc[rows["ImageId"] == image_id, "shard"]))
        problems.append(f"{image_id}: in {len(names)} shards ({', '.join(names)})")
    class_ids = rows["ClassId"].astype("int64")
    bad_class = rows[~class_ids.isin([1, 2, 3, 4])]
    for r in bad_class.head(10).itertuples(index=False):
        problems.append(f"{r.ImageId}: ClassId {r.ClassId} is not 1..4 (shard {r.shard})")
    counts = rows.assign(ClassId=class_ids).groupby("ImageId")["ClassId"].agg(["size", "nunique"])
    for image_id, (size, unique) in counts[(counts["size"] != 4) | (counts["nunique"] != 4)].iterrows():
        problems.append(f"{image_id}: {size} rows with {unique} distinct classes (expected 4 rows, classes 1..4)")
    for r in rows.itertuples(index=False):
        try:
            rle.validate(r.EncodedPixels)
        except rle.RLEError as e:
            problems.append(f"{r.ImageId} class {r.ClassId}: invalid EncodedPixels ({e}) in shard {r.shard}")
            if len(problems) > 50:
                break
    if problems:
        raise MergeError(_problems_text(f"{len(problems)} problems in the shards", problems))


def merge(out_uri: str, to_uri: str, layout: str = "long", fill_errors: bool = False,
          partial: bool = False) -> dict:
    """Write the merged submission of a scoring output to ``to_uri``; returns a summary dict
    (``images``, ``rows``, ``errors``, ``filled``, ``shards``, ``to``)."""
    from steel.core import storage
    from steel.data import submission

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'long' or 'combined', got {layout!r}")
    rows, errors, ignored, lost = load_shards(out_uri, partial=partial)
    check_rows(rows, lost)
    scored = set(rows["ImageId"])
    error_ids = sorted(set(errors["ImageId"]) - scored)
    both = sorted(set(errors["ImageId"]) & scored)
    if both:
        raise MergeError(_problems_text(f"{len(both)} images both scored and in an errors file", both))
    table = submission.to_kaggle(rows, layout=layout, images=error_ids if fill_errors else None)
    storage.write_text(to_uri, table.to_csv(index=False))
    summary = {"to": str(to_uri), "images": len(scored) + (len(error_ids) if fill_errors else 0),
               "rows": len(table), "errors": len(error_ids), "filled": len(error_ids) if fill_errors else 0,
               "shards": int(rows["shard"].nunique()), "layout": layout, "duplicates_ignored": ignored}
    if ignored:
        log.warning("%d images were in two shards: each merged once, from the shard written first", ignored)
    if error_ids and not fill_errors:
        log.warning("%d images failed to score and are not in %s (e.g. %s); --fill-errors writes them "
                    "as empty", len(error_ids), to_uri, ", ".join(error_ids[:3]))
    return summary


__all__ = ["merge", "load_shards", "check_rows", "MergeError"]
