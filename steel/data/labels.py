"""Training labels as the seed notebook's wide table, and its train/val/test split.

The seed (section 3) outer-merges the image listing with ``train.csv`` and pivots to one row per
image::

    ImageId | Defect_1..4 (RLE, '' if none) | hasDefect_1..4 (0/1) | hasDefect (0/1) | stratify

then splits 10% test, then 20% of the rest validation, stratified, ``random_state=42``
(12,568 images -> 9,048 / 2,263 / 1,257).

``stratify`` is the image's class combination: ``"0"`` for no defect, ``"k"`` for class k alone,
classes joined by ``_`` for several (``"1_3"``, ``"1_2_3"``). Combinations too rare to stratify
(fewer than 2 images, which makes sklearn refuse) are merged into one ``"rare"`` bucket inside
:func:`split` at each of its two stages; the table itself keeps the true combination.

Bad label rows (malformed RLE, unknown class, image missing from the listing, repeated
(ImageId, ClassId)) raise :class:`LabelError` listing them, or with ``skip_bad=True`` are skipped
and reported (CSV ``row,ImageId,ClassId,reason``); they are never dropped silently. Masks of
different classes overlapping in one image are left alone.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from steel.core.names import CLASSES, IMAGE_SUFFIXES, MODEL_NAMES, SHAPE, class_of, is_segmenter
from steel.data import rle
from steel.data.submission import PROBLEM_COLUMNS, find_duplicates, format_problems, parse_rows, read_table

log = logging.getLogger(__name__)

WIDE_COLUMNS: tuple[str, ...] = (
    "ImageId", *(f"Defect_{k}" for k in CLASSES), *(f"hasDefect_{k}" for k in CLASSES), "hasDefect", "stratify",
)
RARE = "rare"
TEST_SIZE = 0.1
VAL_SIZE = 0.2
MAX_SHOWN = 20


class LabelError(ValueError):
    """Bad rows in a label CSV. ``problems`` is a DataFrame (row, ImageId, ClassId, reason)."""

    def __init__(self, message: str, problems: pd.DataFrame):
        super().__init__(message)
        self.problems = problems


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

def list_images(images: str | Iterable[str]) -> list[str]:
    """ImageIds (file names) from a folder URI, or from an iterable of ImageIds/paths."""
    if isinstance(images, str):
        from steel.core import storage

        files = storage.list_files(images, suffixes=IMAGE_SUFFIXES)
        return sorted(storage.basename(f) for f in files)
    ids = [str(i).replace("\\", "/").rsplit("/", 1)[-1] for i in images]
    return sorted(set(ids))


def load_labels(train_csv_uri: str | pd.DataFrame, images: str | Iterable[str] | None = None,
                skip_bad: bool = False, report_uri: str | None = None,
                shape: tuple[int, int] = SHAPE) -> pd.DataFrame:
    """The seed's wide label table (one row per image, sorted by ImageId).

    Args:
        train_csv_uri: label CSV (URI, or a DataFrame) in either layout: ``ImageId,ClassId,EncodedPixels``
            (defect rows only) or ``ImageId_ClassId,EncodedPixels`` (4 rows per image).
        images: the image listing: ``None`` (only images named in the CSV; with the defect-rows-only
            layout that leaves out every defect-free image, so a warning is logged), a list of
            ImageIds, or a folder URI whose image files are listed with ``steel.core.storage.list_files``.
            Listed images without label rows have no defect.
        skip_bad: skip bad rows instead of raising :class:`LabelError`.
        report_uri: with ``skip_bad``, where to write the skipped rows as CSV (row, ImageId,
            ClassId, reason). If None, a warning listing them with counts per reason is logged.
            Either way the skipped rows are in ``result.attrs["skipped"]`` (list of dicts with
            those keys; :func:`skipped_rows` gives them as a DataFrame).
        shape: image (H, W) that RLEs are checked against.

    Returns:
        DataFrame with columns ImageId, Defect_1..4 (str), hasDefect_1..4 (int 0/1), hasDefect, stratify.
    """
    table, layout, name = read_table(train_csv_uri)
    rows, problems = parse_rows(table, layout, shape)

    listing: list[str] | None = None
    if images is not None:
        listing = list_images(images)
        if not listing:
            where = f"{images} (missing or empty folder)" if isinstance(images, str) else "the images argument"
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {where}")
        missing = ~rows["ImageId"].isin(set(listing))
        if missing.any():
            problems = pd.concat([problems, pd.DataFrame({
                "row": rows.loc[missing, "row"], "ImageId": rows.loc[missing, "ImageId"],
                "ClassId": rows.loc[missing, "ClassId"].astype(str),
                "reason": "image not in the image listing"})], ignore_index=True)
            rows = rows[~missing]
    elif layout == "long":
        log.warning("%s: no image listing given; the table holds only images named in the CSV "
                    "(defect-free images are missing from a defect-rows-only file)", name)

    dups = find_duplicates(rows)
    if len(dups):
        problems = pd.concat([problems, dups], ignore_index=True)
        rows = rows[~rows["row"].isin(set(dups["row"]))]
    problems = problems.sort_values("row", kind="stable").reset_index(drop=True)

    if len(problems):
        if not skip_bad:
            raise LabelError(format_problems(problems, name, "bad label rows")
                             + "\n(pass skip_bad=True / data.skip_bad to skip them with a report)", problems)
        _report_skipped(problems, name, report_uri)

    wide = _wide(rows, listing)
    # Plain records, not a DataFrame: pandas compares attrs in concat/merge, and a DataFrame there fails.
    wide.attrs["skipped"] = [
        {"row": int(r.row), "ImageId": str(r.ImageId), "ClassId": str(r.ClassId), "reason": str(r.reason)}
        for r in problems.itertuples(index=False)
    ]
    wide.attrs["source"] = name
    wide.attrs["layout"] = layout
    return wide


def skipped_rows(wide: pd.DataFrame) -> pd.DataFrame:
    """The bad rows :func:`load_labels` skipped (row, ImageId, ClassId, reason); empty if none."""
    return pd.DataFrame(wide.attrs.get("skipped", []), columns=list(PROBLEM_COLUMNS))


def _report_skipped(problems: pd.DataFrame, name: str, report_uri: str | None) -> None:
    counts = problems["reason"].str.replace(r"(:| \(| ').*$", "", regex=True).value_counts()
    summary = ", ".join(f"{n} x {reason}" for reason, n in counts.items())
    if report_uri:
        from steel.core import storage

        storage.write_text(report_uri, problems[list(PROBLEM_COLUMNS)].to_csv(index=False))
        log.warning("%s: skipped %d bad label rows (%s); report: %s", name, len(problems), summary, report_uri)
    else:
        log.warning("%s: skipped %d bad label rows (%s); no report_uri given, the rows are in "
                    "the table's attrs['skipped']:\n%s", name, len(problems), summary,
                    format_problems(problems, name, "skipped rows"))


def _wide(rows: pd.DataFrame, listing: list[str] | None) -> pd.DataFrame:
    """Outer-merge labelled rows with the listing and pivot to one row per image."""
    ids = sorted(set(rows["ImageId"]) | set(listing or ()))
    wide = pd.DataFrame({"ImageId": pd.Series(ids, dtype=object)})
    index = pd.Index(ids)
    for k in CLASSES:
        cls = rows[(rows["ClassId"] == k) & (rows["EncodedPixels"] != "")]
        col = pd.Series("", index=index, dtype=object)
        col.loc[cls["ImageId"].to_numpy()] = cls["EncodedPixels"].to_numpy()
        wide[f"Defect_{k}"] = col.to_numpy()
    for k in CLASSES:
        wide[f"hasDefect_{k}"] = (wide[f"Defect_{k}"] != "").astype(np.int64)
    has = wide[[f"hasDefect_{k}" for k in CLASSES]].to_numpy()
    wide["hasDefect"] = has.any(axis=1).astype(np.int64)
    wide["stratify"] = [combination(r) for r in has]
    return wide[list(WIDE_COLUMNS)]


def combination(has: Iterable[int]) -> str:
    """Stratum code of an image: ``"0"`` none, ``"3"`` class 3 alone, ``"1_3"`` classes 1 and 3."""
    present = [str(k) for k, h in zip(CLASSES, has) if h]
    return "_".join(present) if present else "0"


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------

def safe_strata(strata: pd.Series, n_test: int) -> pd.Series:
    """Strata that sklearn's stratified ``train_test_split`` accepts.

    Strata with fewer than 2 members go into one ``"rare"`` bucket; if that bucket still has a
    single member it joins the largest stratum. If there are more strata than test (or train)
    rows, the smallest strata are merged into ``"rare"`` until they fit.
    """
    s = strata.astype(str).copy()
    n_train = len(s) - n_test

    def fold_single_rare():
        if (s == RARE).sum() == 1:
            s[s == RARE] = s.value_counts().idxmax()

    counts = s.value_counts()
    s[s.isin(counts[counts < 2].index)] = RARE
    fold_single_rare()
    while s.nunique() > max(1, min(n_test, n_train)):
        counts = s.value_counts(ascending=True)
        smallest = [c for c in counts.index if c != RARE][:2]
        s[s.isin(smallest)] = RARE
        fold_single_rare()
    return s


def split(wide: pd.DataFrame, seed: int = 42) -> dict[str, pd.DataFrame]:
    """Train/val/test split as the seed: 10% test, then 20% of the rest val, stratified on ``stratify``.

    Rows keep the table's columns (index reset). Deterministic for a given table and ``seed``.
    """
    from sklearn.model_selection import train_test_split

    if "stratify" not in wide.columns or "ImageId" not in wide.columns:
        raise ValueError("split needs the wide table from load_labels (columns ImageId, stratify)")
    if len(wide) < 3:
        raise ValueError(f"need at least 3 images to make train/val/test splits, got {len(wide)}")
    if wide["ImageId"].duplicated().any():
        raise ValueError("split: the table repeats ImageIds: "
                         f"{wide.loc[wide['ImageId'].duplicated(), 'ImageId'].head(MAX_SHOWN).tolist()}")

    def stage(frame: pd.DataFrame, size: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        n_test = int(np.ceil(size * len(frame)))  # sklearn's rounding for a float test_size
        strata = safe_strata(frame["stratify"], n_test)
        return train_test_split(frame, test_size=size, stratify=strata, random_state=seed)

    rest, test = stage(wide, TEST_SIZE)
    train, val = stage(rest, VAL_SIZE)
    return {name: df.reset_index(drop=True) for name, df in (("train", train), ("val", val), ("test", test))}



def fingerprint(splits: Mapping[str, pd.DataFrame | Iterable[str]]) -> str:
    """sha256 (hex) of each split's name and sorted ImageIds; same data and split -> same value."""
    h = hashlib.sha256()
    for name in sorted(splits):
        part = splits[name]
        ids = part["ImageId"].astype(str).tolist() if isinstance(part, pd.DataFrame) else [str(i) for i in part]
        h.update(f"[{name}]\n".encode())
        h.update("".join(f"{i}\n" for i in sorted(ids)).encode())
    return h.hexdigest()


def load_splits(cfg, report_uri: str | None = None) -> tuple[dict[str, pd.DataFrame], str]:
    """The labels of ``cfg.data`` (``train_csv`` over the ``train_images`` listing), split as the seed
    does (:func:`split` with ``data.seed``), and the split's :func:`fingerprint`.

    With ``data.skip_bad`` bad label rows are skipped and written to ``report_uri`` (else a warning
    lists them); without it they raise :class:`LabelError`.
    """
    data = cfg.data
    wide = load_labels(data.path("train_csv"), images=data.path("train_images"), skip_bad=data.skip_bad,
                       report_uri=report_uri if data.skip_bad else None)
    splits = split(wide, seed=data.seed)
    return splits, fingerprint(splits)


def subset(wide_df: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """Rows a model trains on: binary = all, multilabel = images with a defect, segK = images with class K."""
    if model_name in ("binary", "unified"):  # the unified model learns from every image
        return wide_df
    if model_name == "multilabel":
        return wide_df[wide_df["hasDefect"] == 1]
    if model_name in MODEL_NAMES and is_segmenter(model_name):
        k = class_of(model_name)
        return wide_df[wide_df[f"hasDefect_{k}"] == 1]
    raise ValueError(f"unknown model name {model_name!r}; expected one of {', '.join(MODEL_NAMES)}")


# --------------------------------------------------------------------------------------------
# Mask areas (the seed's EDA, section 4.1: the area filter's bounds)
# --------------------------------------------------------------------------------------------

PERCENTILES: tuple[float, float] = (2.0, 98.0)


def mask_areas(wide: pd.DataFrame, shape: tuple[int, int] = SHAPE) -> pd.DataFrame:
    """One row per (image, class) defect: ImageId, ClassId, area (pixels)."""
    out = []
    for k in CLASSES:
        col = wide[f"Defect_{k}"]
        sel = col != ""
        areas = [rle.area(v, shape) for v in col[sel].tolist()]
        out.append(pd.DataFrame({"ImageId": wide.loc[sel, "ImageId"].to_numpy(), "ClassId": k,
                                 "area": np.asarray(areas, dtype=np.int64)}))
    return pd.concat(out, ignore_index=True)


def area_thresholds(areas: pd.DataFrame, percentiles: tuple[float, float] = PERCENTILES) -> dict:
    """``{"k": {"min_area": p_low, "max_area": p_high}}`` (ints) for each class with examples."""
    out = {}
    for k in CLASSES:
        a = areas.loc[areas["ClassId"] == k, "area"].to_numpy()
        if a.size == 0:
            continue
        lo, hi = np.percentile(a, percentiles)
        out[str(k)] = {"min_area": int(np.floor(lo)), "max_area": int(np.ceil(hi))}
    return out
