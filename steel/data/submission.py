"""Submission and label CSVs: read either Kaggle layout into one long form, write Kaggle layouts.

Two layouts exist for the same information (pixels are competition RLE, see :mod:`steel.data.rle`):

- **long**: ``ImageId,ClassId,EncodedPixels`` (any column order). Label files in this layout list
  only defect rows; submissions list 4 rows per image.
- **combined**: ``ImageId_ClassId,EncodedPixels`` with ``ImageId_ClassId`` like ``"abc.jpg_3"``
  (the original competition layout; 4 rows per image, empty ``EncodedPixels`` for no defect).

:func:`read_rows` turns either into the long form used everywhere in this package: columns
``ImageId`` (str), ``ClassId`` (int 1..4), ``EncodedPixels`` (str, ``''`` = empty), one row per
(ImageId, ClassId) pair it names. Bad rows are reported with their line number in the file (the
header is line 1), the ImageId, the ClassId and the reason; nothing is silently dropped.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pandas as pd

from steel.core.names import CLASSES, LAYOUTS, SHAPE
from steel.data import rle

LONG_COLUMNS: tuple[str, ...] = ("ImageId", "ClassId", "EncodedPixels")
COMBINED_COLUMNS: tuple[str, ...] = ("ImageId_ClassId", "EncodedPixels")
PROBLEM_COLUMNS: tuple[str, ...] = ("row", "ImageId", "ClassId", "reason")
# How a cell is cleaned: stripped, except an image's id, kept as written (the class suffix may trail spaces).
CLEAN = {"ImageId": str, "ImageId_ClassId": str.rstrip}
MAX_LISTED = 20  # offending rows spelled out in an error message; the rest are counted


class RowsError(ValueError):
    """A CSV with bad rows. ``problems`` is a DataFrame (row, ImageId, ClassId, reason)."""

    def __init__(self, message: str, problems: pd.DataFrame):
        super().__init__(message)
        self.problems = problems


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_table(src: str | pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """Read a CSV (URI) or take a DataFrame; cells as strings, blank lines dropped.

    Every cell is stripped of surrounding spaces except the image's id (``ImageId``; ``ImageId_ClassId``
    only after its class): an id is an object key as scoring listed it, and ``" a.jpg"`` is another
    image than ``"a.jpg"``.

    Returns ``(table, layout, name)``: ``layout`` is ``"long"`` or ``"combined"``; ``name`` names the
    source in messages. The table keeps a ``row`` column: the line number in the file (header = 1)
    or, for a DataFrame, its position + 2 so that numbers read the same way.
    """
    if isinstance(src, pd.DataFrame):
        name = "DataFrame"
        table = src.reset_index(drop=True).copy()
        table.columns = [str(c).strip() for c in table.columns]
        for col in table.columns:
            table[col] = [_cell(v, CLEAN.get(col, str.strip)) for v in table[col].tolist()]
        table.insert(0, "row", np.arange(2, len(table) + 2))
    else:
        from steel.core import storage

        name = str(src)
        data = storage.read_bytes(name)
        if not data.strip():
            raise ValueError(f"{name}: the file is empty (expected a header line such as "
                             f"'{','.join(LONG_COLUMNS)}')")
        try:
            table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False,
                                skip_blank_lines=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise ValueError(f"{name}: not a readable CSV file: {e}") from None
        table.columns = [str(c).strip() for c in table.columns]
        table.insert(0, "row", np.arange(2, len(table) + 2))
        cells = table.drop(columns="row")
        for col in cells.columns:
            table[col] = [_cell(v, CLEAN.get(col, str.strip)) for v in table[col].fillna("").tolist()]
        blank = (table.drop(columns="row") == "").all(axis=1)
        table = table[~blank].reset_index(drop=True)
    layout = detect_layout(table.columns.drop("row") if "row" in table.columns else table.columns, name)
    return table, layout, name


def _cell(value, clean=str.strip) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # ClassId that pandas turned into 3.0
    return clean(str(value))


def detect_layout(columns: Iterable[str], name: str = "CSV") -> str:
    """``"long"`` or ``"combined"`` from a header; ValueError naming what was found otherwise."""
    cols = [str(c) for c in columns]
    if set(LONG_COLUMNS) <= set(cols):
        return "long"
    if set(COMBINED_COLUMNS) <= set(cols):
        return "combined"
    raise ValueError(
        f"{name}: unrecognised columns {cols}; expected either "
        f"{','.join(LONG_COLUMNS)} or {','.join(COMBINED_COLUMNS)}"
    )


def parse_rows(table: pd.DataFrame, layout: str, shape: tuple[int, int] = SHAPE,
               validate_rle: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a table from :func:`read_table` into long rows and problems.

    Returns ``(rows, problems)``. ``rows`` has columns row, ImageId, ClassId (int), EncodedPixels
    and holds every row without a problem of its own (missing ImageId, bad ``ImageId_ClassId``,
    unknown class, malformed RLE). Duplicate (ImageId, ClassId) pairs are left in; see
    :func:`find_duplicates`. ``problems`` has columns row, ImageId, ClassId, reason.
    """
    n = len(table)
    row_no = table["row"].to_numpy()
    pixels = table["EncodedPixels"].to_numpy(dtype=object)
    if layout == "combined":
        keys = table["ImageId_ClassId"].to_numpy(dtype=object)
        image_ids = np.empty(n, dtype=object)
        class_raw = np.empty(n, dtype=object)
        for i, key in enumerate(keys):
            image, sep, cls = key.rpartition("_")
            image_ids[i], class_raw[i] = (image, cls) if sep else (key, "")
    else:
        image_ids = table["ImageId"].to_numpy(dtype=object)
        class_raw = table["ClassId"].to_numpy(dtype=object)

    reasons: list[list[str]] = [[] for _ in range(n)]
    class_ids = np.zeros(n, dtype=np.int64)
    allowed = ", ".join(map(str, CLASSES))
    for i in range(n):
        if layout == "combined" and "_" not in keys[i]:
            reasons[i].append(f"ImageId_ClassId {keys[i]!r} is not '<ImageId>_<ClassId>'")
        elif not image_ids[i]:
            reasons[i].append("missing ImageId")
        raw = class_raw[i]
        try:
            cls = int(raw)
        except ValueError:
            cls = None
        if cls not in CLASSES:
            if layout != "combined" or "_" in keys[i]:
                reasons[i].append(f"unknown class {raw!r} (expected {allowed})")
        else:
            class_ids[i] = cls
        if validate_rle and pixels[i]:
            try:
                rle.validate(pixels[i], shape)
            except rle.RLEError as e:
                reasons[i].append(f"malformed RLE: {e}")

    bad = np.array([bool(r) for r in reasons], dtype=bool)
    problems = pd.DataFrame({
        "row": row_no[bad].astype(int),
        "ImageId": image_ids[bad],
        "ClassId": class_raw[bad],
        "reason": ["; ".join(r) for r, b in zip(reasons, bad) if b],
    }, columns=list(PROBLEM_COLUMNS))
    good = ~bad
    rows = pd.DataFrame({
        "row": row_no[good].astype(int),
        "ImageId": image_ids[good],
        "ClassId": class_ids[good],
        "EncodedPixels": pixels[good],
    })
    return rows, problems


def find_duplicates(rows: pd.DataFrame) -> pd.DataFrame:
    """Problems for every repeat of an (ImageId, ClassId) pair after its first row.

    The first occurrence is not a problem (so skipping keeps it); each later one names the first
    row and says whether its EncodedPixels agree.
    """
    dup = rows.duplicated(["ImageId", "ClassId"], keep=False)
    if not dup.any():
        return pd.DataFrame(columns=list(PROBLEM_COLUMNS))
    out = []
    for (image, cls), group in rows[dup].groupby(["ImageId", "ClassId"], sort=False):
        first = group.iloc[0]
        for _, r in group.iloc[1:].iterrows():
            same = "identical" if r["EncodedPixels"] == first["EncodedPixels"] else "different"
            out.append((int(r["row"]), image, str(cls),
                        f"duplicate (ImageId, ClassId) of row {int(first['row'])} ({same} EncodedPixels)"))
    return pd.DataFrame(out, columns=list(PROBLEM_COLUMNS)).sort_values("row", kind="stable")


def format_problems(problems: pd.DataFrame, name: str, what: str = "bad rows",
                    limit: int = MAX_LISTED) -> str:
    """A message listing the first ``limit`` problems (row, ImageId, ClassId, reason), then a count."""
    problems = problems.sort_values("row", kind="stable")
    lines = [f"{name}: {len(problems)} {what}:"]
    for r in problems.head(limit).itertuples(index=False):
        lines.append(f"  row {r.row}: ImageId={r.ImageId!r} ClassId={r.ClassId!r}: {r.reason}")
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def read_rows(src: str | pd.DataFrame, shape: tuple[int, int] = SHAPE,
              validate_rle: bool = True) -> pd.DataFrame:
    """Read a submission or label CSV (URI or DataFrame, either layout) into the long form.

    Returns columns ImageId, ClassId (int 1..4), EncodedPixels (``''`` = empty), in file order.
    ``attrs["layout"]`` records the source layout. Raises :class:`RowsError` (a ValueError) listing
    bad rows by line number: missing ImageId, bad ``ImageId_ClassId``, unknown class, malformed
    RLE (checked against ``shape`` unless ``validate_rle=False``) or a repeated (ImageId, ClassId).
    """
    table, layout, name = read_table(src)
    rows, problems = parse_rows(table, layout, shape, validate_rle)
    problems = pd.concat([problems, find_duplicates(rows)], ignore_index=True) if len(rows) else problems
    if len(problems):
        problems = problems.sort_values("row", kind="stable").reset_index(drop=True)
        raise RowsError(format_problems(problems, name), problems)
    out = rows.drop(columns="row").reset_index(drop=True)
    out.attrs["layout"] = layout
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def to_kaggle(df: pd.DataFrame, layout: str = "long", images: Iterable[str] | None = None) -> pd.DataFrame:
    """Kaggle-ready rows: 4 per image (classes 1..4), sorted by ImageId then ClassId.

    ``df`` is long form (ImageId, ClassId, EncodedPixels; missing pairs and NaN mean empty).
    ``images`` adds images that have no row at all (all four classes empty). ``layout="long"``
    gives columns ImageId, ClassId, EncodedPixels; ``"combined"`` gives ImageId_ClassId,
    EncodedPixels. Two rows for the same pair raise ValueError.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'long' or 'combined', got {layout!r}")
    missing = [c for c in LONG_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"to_kaggle needs columns {list(LONG_COLUMNS)}; missing {missing}")
    rows = df[list(LONG_COLUMNS)].copy()
    rows["ImageId"] = rows["ImageId"].astype(str)
    rows["ClassId"] = _class_ids(rows["ClassId"])
    rows["EncodedPixels"] = [_cell(v) for v in rows["EncodedPixels"].tolist()]
    dup = rows.duplicated(["ImageId", "ClassId"], keep=False)
    if dup.any():
        pairs = rows.loc[dup, ["ImageId", "ClassId"]].drop_duplicates().head(MAX_LISTED)
        listed = ", ".join(f"{i}_{c}" for i, c in pairs.itertuples(index=False))
        raise ValueError(f"to_kaggle: {int(dup.sum())} rows repeat an (ImageId, ClassId) pair: {listed}")
    all_images = set(rows["ImageId"])
    if images is not None:
        all_images.update(str(i) for i in images)
    grid = pd.MultiIndex.from_product([sorted(all_images), list(CLASSES)], names=["ImageId", "ClassId"])
    out = (rows.set_index(["ImageId", "ClassId"])["EncodedPixels"].astype(object)
           .reindex(grid, fill_value="").reset_index())
    out["EncodedPixels"] = out["EncodedPixels"].astype(str)
    if layout == "combined":
        out.insert(0, "ImageId_ClassId", out["ImageId"] + "_" + out["ClassId"].astype(str))
        out = out[list(COMBINED_COLUMNS)]
    return out


def write_csv(df: pd.DataFrame, uri: str, layout: str = "long", images: Iterable[str] | None = None) -> int:
    """Write :func:`to_kaggle` rows to ``uri`` atomically; returns the number of rows written."""
    from steel.core import storage

    out = to_kaggle(df, layout=layout, images=images)
    storage.write_text(uri, out.to_csv(index=False))
    return len(out)


def _class_ids(values: pd.Series) -> pd.Series:
    try:
        ids = pd.Series([int(_cell(v)) for v in values.tolist()], index=values.index, dtype=np.int64)
    except ValueError:
        raise ValueError(f"ClassId values must be integers 1..4, got {sorted(set(map(str, values)))[:10]}") from None
    bad = ~ids.isin(CLASSES)
    if bad.any():
        raise ValueError(f"ClassId must be one of {list(CLASSES)}, got {sorted(set(ids[bad].tolist()))}")
    return ids
