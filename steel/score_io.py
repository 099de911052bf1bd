"""Inputs and outputs of batch scoring: listing, shards, image decoding, shard files, the run manifest.

Nothing here imports Ray or TensorFlow; :mod:`steel.scoring` runs these pieces inside a Ray Data
pipeline, and the tests call them directly.

**Image ids.** Every *file* under the images URI (recursively) is an input. Its ``ImageId`` is its
path relative to that URI, with ``/`` separators: for the usual flat folder that is the file name
(``0002cc93b.jpg``, as Kaggle's), and two files with the same name in different subfolders get
different ids (``2026-11-23/a.jpg`` and ``2026-11-24/a.jpg``), so an image can never be scored twice
under one id. Files that are not images are still inputs: they get an error row, never a silent skip.

**Shards.** The pending ids are sorted and cut into groups of ``images_per_shard``; a shard is named
``part-<first 16 hex digits of sha1(its sorted ids joined by newlines)>``, so the name depends only
on which images it holds. A shard is *complete* when ``<out>/shards/<name>.csv|parquet`` exists: it
is written last (after ``<out>/errors/<name>.csv`` when the shard has errors), atomically, and only
once every image of the shard has a result. The images a complete shard holds come from
``manifest.json`` or, for shards a killed run left behind, from the shard files themselves; those
images are never scored again, so a re-run (same input, or with new images added: the nightly case)
scores only what no complete shard holds and ends with exactly one row set per image.

**Output rows.** ``csv``: ``ImageId,ClassId,EncodedPixels``, four rows per scored image (classes
1..4, ``EncodedPixels`` empty for no defect). ``parquet``: the same rows plus per-image
``p_defect``, ``p_class_1..4`` and ``area_1..4`` (mask pixel counts), repeated on its four rows.
Errors: ``ImageId,file,reason`` in ``<out>/errors/<name>.csv``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from steel import images, storage

CLASSES: tuple[int, ...] = (1, 2, 3, 4)
HEIGHT, WIDTH = images.HEIGHT, images.WIDTH
FORMATS: tuple[str, ...] = ("csv", "parquet")
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
ROW_COLUMNS: tuple[str, ...] = ("ImageId", "ClassId", "EncodedPixels")
EXTRA_COLUMNS: tuple[str, ...] = (
    "p_defect", *(f"p_class_{k}" for k in CLASSES), *(f"area_{k}" for k in CLASSES))
ERROR_COLUMNS: tuple[str, ...] = ("ImageId", "file", "reason")
DEFAULT_IMAGE_FORMATS = images.DEFAULT_IMAGE_FORMATS
ACCEPTED_MODES = images.ACCEPTED_MODES
BadImage = images.BadImage  # an input file that cannot be scored; the message is the error row's reason


# --------------------------------------------------------------------------------------------
# Listing and shards
# --------------------------------------------------------------------------------------------

def list_inputs(images_uri: str, exclude: str | None = None) -> dict[str, str]:
    """``{ImageId: file URI}`` for every file under ``images_uri`` (recursively), sorted by id.

    ``exclude`` (a URI) drops files under it, so an output folder inside the input is not re-read.
    A folder that does not exist raises FileNotFoundError naming it.
    """
    root = str(images_uri).rstrip("/")
    files = storage.list_files(root, recursive=True)
    if not files and not storage.exists(root):
        raise FileNotFoundError(f"{images_uri}: no such folder (or S3 prefix)")
    skip = str(exclude).rstrip("/") + "/" if exclude else None
    out: dict[str, str] = {}
    for uri in files:
        if skip and uri.startswith(skip):
            continue
        rel = uri[len(root):].lstrip("/")
        if not rel:
            raise ValueError(f"{images_uri}: expected a folder (or S3 prefix) of images, got a file")
        out[rel] = uri
    return dict(sorted(out.items()))


def shard_name(image_ids) -> str:
    """``part-<16 hex digits>`` from the sorted ids: the same images always give the same name."""
    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()
    return f"part-{digest[:16]}"


@dataclass
class Shard:
    name: str
    image_ids: list[str]


def plan_shards(image_ids, per_shard: int) -> list[Shard]:
    """Sorted ids cut into shards of ``per_shard`` (the last one may be smaller)."""
    if per_shard < 1:
        raise ValueError(f"images_per_shard must be at least 1, got {per_shard}")
    ids = sorted(image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("plan_shards: repeated image ids")
    groups = [ids[i:i + per_shard] for i in range(0, len(ids), per_shard)]
    return [Shard(shard_name(g), g) for g in groups]


def shard_uri(out_uri: str, name: str, fmt: str) -> str:
    return storage.join(out_uri, "shards", f"{name}.{fmt}")


def errors_uri(out_uri: str, name: str) -> str:
    return storage.join(out_uri, "errors", f"{name}.csv")


def complete_shards(out_uri: str) -> dict[str, str]:
    """``{shard name: rows file URI}`` of the complete shards under ``out_uri`` (either format)."""
    try:
        files = storage.list_files(storage.join(out_uri, "shards"))
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for uri in files:
        base = storage.basename(uri)
        stem, _, ext = base.rpartition(".")
        if ext not in FORMATS or not stem.startswith("part-"):
            continue
        if stem in out:
            raise ValueError(f"{out_uri}: shard {stem} exists in two formats ({storage.basename(out[stem])}, "
                             f"{base}); delete one")
        out[stem] = uri
    return out


def read_manifest(out_uri: str) -> dict | None:
    """The previous run's ``manifest.json`` under ``out_uri``, or None if there is none."""
    uri = storage.join(out_uri, MANIFEST)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e}); delete it to rebuild it from the shard files") from None
    if not isinstance(data, dict) or not isinstance(data.get("shards", {}), dict):
        raise ValueError(f"{uri}: not a scoring manifest (no 'shards' mapping)")
    return data


def read_rows_file(uri: str) -> pd.DataFrame:
    """A shard's rows (csv or parquet) with ``EncodedPixels`` as str ('' = empty)."""
    if str(uri).endswith(".parquet"):
        import pyarrow.parquet as pq

        df = pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pandas()
    else:
        df = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype={"ImageId": str, "EncodedPixels": str},
                         keep_default_na=False)
    missing = [c for c in ROW_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{uri}: not a shard file (missing columns {missing})")
    df["EncodedPixels"] = df["EncodedPixels"].fillna("").astype(str)
    df["ImageId"] = df["ImageId"].astype(str)
    return df


def read_errors_file(uri: str) -> pd.DataFrame:
    df = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    missing = [c for c in ERROR_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{uri}: not an errors file (missing columns {missing})")
    return df


def shard_contents(out_uri: str, name: str, rows_uri: str) -> dict:
    """``{"images": [ids], "scored": n, "errors": n}`` of a complete shard, read from its files."""
    rows = read_rows_file(rows_uri)
    scored = sorted(set(rows["ImageId"]))
    err_uri = errors_uri(out_uri, name)
    failed: list[str] = []
    if storage.exists(err_uri):
        failed = sorted(set(read_errors_file(err_uri)["ImageId"]))
    return {"images": sorted(scored + failed), "scored": len(scored), "errors": len(failed)}


def done_images(out_uri: str, manifest: dict | None) -> tuple[dict[str, dict], dict[str, str]]:
    """Complete shards and who holds each image.

    Returns ``(shards, owner)``: ``shards`` maps each complete shard to its manifest entry
    (``images``, ``scored``, ``errors``, ...) - from the manifest when it lists the shard, else read
    from the shard's files (a shard a killed run wrote before its manifest) - and ``owner`` maps
    every ImageId held by a complete shard to that shard. An image in two shards is an error.
    """
    recorded = (manifest or {}).get("shards", {})
    shards: dict[str, dict] = {}
    for name, uri in complete_shards(out_uri).items():
        entry = recorded.get(name)
        if entry is None or "images" not in entry:
            entry = {**shard_contents(out_uri, name, uri), "recovered": True}
        shards[name] = {**entry, "file": storage.basename(uri)}
    owner: dict[str, str] = {}
    for name, entry in sorted(shards.items()):
        for image_id in entry["images"]:
            if image_id in owner:
                raise ValueError(f"{out_uri}: image {image_id!r} is in two shards ({owner[image_id]}, {name}); "
                                 "delete one of them and run again")
            owner[image_id] = name
    return shards, owner


# --------------------------------------------------------------------------------------------
# Decoding: one decoder for training, tuning and scoring (steel.images)
# --------------------------------------------------------------------------------------------

decode_image = images.decode


# --------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------

def result_rows(image_id: str, result: dict) -> list[dict]:
    """The four output rows of one scored image from a cascade result
    (``p_defect``, ``p_class`` [4], ``masks`` [4 RLE], ``areas`` [4])."""
    masks = list(result["masks"])
    if len(masks) != len(CLASSES):
        raise ValueError(f"{image_id}: cascade returned {len(masks)} masks, expected {len(CLASSES)}")
    p_class = [float(v) for v in result.get("p_class", [np.nan] * 4)]
    areas = [int(v) for v in result.get("areas", [0] * 4)]
    extra = {"p_defect": float(result.get("p_defect", np.nan)),
             **{f"p_class_{k}": p_class[k - 1] for k in CLASSES},
             **{f"area_{k}": areas[k - 1] for k in CLASSES}}
    return [{"ImageId": image_id, "ClassId": k, "EncodedPixels": masks[k - 1] or "", **extra} for k in CLASSES]


def encode_rows(rows: list[dict], fmt: str) -> bytes:
    """File content of a shard's rows, sorted by ImageId, ClassId (header only when empty)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    columns = list(ROW_COLUMNS) if fmt == "csv" else list(ROW_COLUMNS + EXTRA_COLUMNS)
    df = pd.DataFrame(rows, columns=columns)
    df = df.sort_values(["ImageId", "ClassId"], kind="stable").reset_index(drop=True)
    df["ClassId"] = df["ClassId"].astype("int64")
    if fmt == "csv":
        return df.to_csv(index=False).encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    df["ImageId"] = df["ImageId"].astype(str)
    df["EncodedPixels"] = df["EncodedPixels"].astype(str)
    for k in CLASSES:
        df[f"area_{k}"] = df[f"area_{k}"].astype("int64")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    return buf.getvalue()


def encode_errors(errors: list[dict]) -> bytes:
    df = pd.DataFrame(errors, columns=list(ERROR_COLUMNS)).sort_values("ImageId", kind="stable")
    return df.to_csv(index=False).encode("utf-8")


@dataclass
class ShardResult:
    """What a shard collected so far; :meth:`write` commits it (errors first, rows file last)."""

    name: str
    image_ids: list[str]
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    seen: set = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return len(self.seen) == len(self.image_ids)

    def add_scored(self, image_id: str, result: dict) -> None:
        if self._first(image_id):
            self.rows.extend(result_rows(image_id, result))

    def add_error(self, image_id: str, file: str, reason: str) -> None:
        if self._first(image_id):
            self.errors.append({"ImageId": image_id, "file": file, "reason": reason})

    def _first(self, image_id: str) -> bool:
        if image_id in self.seen:  # a retried Ray task must not give an image two row sets
            return False
        self.seen.add(image_id)
        return True

    def write(self, out_uri: str, fmt: str) -> dict:
        """Write the shard atomically; returns its manifest entry."""
        if not self.complete:
            missing = sorted(set(self.image_ids) - self.seen)[:5]
            raise RuntimeError(f"shard {self.name} is not complete (missing e.g. {missing})")
        err_uri = errors_uri(out_uri, self.name)
        if self.errors:
            storage.write_bytes(err_uri, encode_errors(self.errors))
        else:  # a stale errors file from an interrupted attempt would count twice
            storage.delete(err_uri, missing_ok=True)
        storage.write_bytes(shard_uri(out_uri, self.name, fmt), encode_rows(self.rows, fmt))
        return {"images": sorted(self.image_ids), "scored": len(self.image_ids) - len(self.errors),
                "errors": len(self.errors), "file": f"{self.name}.{fmt}"}


def remove_orphan_errors(out_uri: str, complete: set[str]) -> list[str]:
    """Delete ``errors/<name>.csv`` files whose shard never completed (left by a killed run)."""
    try:
        files = storage.list_files(storage.join(out_uri, "errors"), suffixes=".csv")
    except FileNotFoundError:
        return []
    removed = []
    for uri in files:
        name = posixpath.splitext(storage.basename(uri))[0]
        if name not in complete:
            storage.delete(uri, missing_ok=True)
            removed.append(name)
    return removed


__all__ = [
    "CLASSES", "FORMATS", "MANIFEST", "SUCCESS", "ROW_COLUMNS", "EXTRA_COLUMNS", "ERROR_COLUMNS",
    "DEFAULT_IMAGE_FORMATS", "BadImage", "Shard", "ShardResult", "list_inputs", "shard_name",
    "plan_shards", "shard_uri", "errors_uri", "complete_shards", "read_manifest", "read_rows_file",
    "read_errors_file", "shard_contents", "done_images", "decode_image", "result_rows", "encode_rows",
    "encode_errors", "remove_orphan_errors",
]
