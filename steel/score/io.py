"""The outputs of batch scoring: shards, shard files, index files, run records, the run manifest.

Nothing here imports Ray or TensorFlow; :mod:`steel.score.run` runs these pieces inside a Ray Data
pipeline, and the tests call them directly. What is read (the image ids): :mod:`steel.score.listing`.

**Shards.** The pending ids are sorted and cut into groups of ``images_per_shard``; a shard is named
``part-<first 16 hex digits of sha1(its sorted ids as a JSON list)>``, so the name depends only
on which images it holds. A shard is *complete* when ``<out>/shards/<name>.csv|parquet`` exists: it
is written (after ``<out>/errors/<name>.csv`` when the shard has errors) atomically, and only
once every image of the shard has a result; then its index file ``<out>/index/<name>.json`` (its
ImageIds and counts) is written. Which images are done comes from the index files (append-only, one
per shard; never one file rewritten nightly), else from an old ``manifest.json`` that lists them
(outputs of earlier code), else from the shard's own files (a run killed between shard and index).
Those images are never scored again, so a re-run (same input, or with new images added: the nightly
case) scores only what no complete shard holds and ends with exactly one row set per image.

**Output rows.** ``csv``: ``ImageId,ClassId,EncodedPixels``, four rows per scored image (classes
1..4, ``EncodedPixels`` empty for no defect). ``parquet``: the same rows plus per-image
``p_defect``, ``p_class_1..4`` and ``area_1..4`` (mask pixel counts), repeated on its four rows.
Parquet rows also carry ``bundle_version`` and ``scored_at``. Errors: ``ImageId,file,reason,kind`` in
``<out>/errors/<name>.csv``; ``kind`` is ``decode`` (permanent). Images left without a result
(``LEFT_KINDS``: transient, settling, gone) are never rows.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import posixpath
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from steel.core import storage
from steel.core.names import CLASSES, FORMATS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
ROW_COLUMNS: tuple[str, ...] = ("ImageId", "ClassId", "EncodedPixels")
EXTRA_COLUMNS: tuple[str, ...] = (
    "p_defect", *(f"p_class_{k}" for k in CLASSES), *(f"area_{k}" for k in CLASSES))
ERROR_COLUMNS: tuple[str, ...] = ("ImageId", "file", "reason", "kind")
# Error kinds: "decode" rows are permanent (the file itself is bad). Transient failures (storage,
# network, throttling, credentials, predictor/OOM) are never written as rows: the image stays pending.
PERMANENT_KINDS: tuple[str, ...] = ("decode",)
# Images left without a row this run: "transient" (retried next run; the run exits 1), "settling" (a
# file younger than score.settle_s that does not decode yet: next run), "gone" (deleted since the listing).
LEFT_KINDS: tuple[str, ...] = ("transient", "settling", "gone")
VERSION_COLUMNS: tuple[str, ...] = ("bundle_version", "scored_at")  # parquet only
INDEX_DIR = "index"
RUNS_DIR = "runs"


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------

def shard_name(image_ids) -> str:
    """``part-<16 hex digits>`` from the sorted ids: the same images always give the same name, and two
    different sets never share one (the ids are hashed as a JSON list: no separator an id could hold)."""
    digest = hashlib.sha1(json.dumps(sorted(image_ids)).encode("utf-8")).hexdigest()
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
    """The last run's ``manifest.json`` under ``out_uri``, or None if there is none."""
    uri = storage.join(out_uri, MANIFEST)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e}); delete it (the shard index files are the record)") from None
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
    """A shard's error rows; files written before error kinds existed get ``kind`` inferred."""
    df = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    missing = [c for c in ERROR_COLUMNS if c not in df.columns and c != "kind"]
    if missing:
        raise ValueError(f"{uri}: not an errors file (missing columns {missing})")
    if "kind" not in df.columns:
        legacy = df["reason"].str.startswith(("could not read the file", "scoring failed"))
        df["kind"] = np.where(legacy, "legacy", "decode")
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


def index_uri(out_uri: str, name: str) -> str:
    return storage.join(out_uri, INDEX_DIR, f"{name}.json")


def write_index(out_uri: str, name: str, entry: dict) -> None:
    """``<out>/index/<shard>.json``: the shard's ImageIds and counts, written once after the shard."""
    storage.write_text(index_uri(out_uri, name), json.dumps(entry, separators=(",", ":")) + "\n")


def _read_index(uri: str) -> dict:
    data = json.loads(storage.read_text(uri))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{uri}: not a shard index file (no 'images' list)")
    return data


def done_images(out_uri: str, manifest: dict | None = None, threads: int = 16,
                retry_call=None) -> tuple[dict[str, dict], dict[str, str]]:
    """Complete shards and who holds each image.

    Returns ``(shards, owner)``: ``shards`` maps each complete shard to its entry (``images``,
    ``scored``, ``errors``, ...) read from its index file ``<out>/index/<shard>.json``; a shard with
    no index file (a killed run wrote the shard but not its index, or an output from before index
    files) is taken from the old ``manifest.json`` if that lists it, else read from the shard's own
    files and marked ``recovered`` (the caller writes its index). ``owner`` maps every ImageId held by
    a complete shard to that shard; an image in two shards belongs to the one written first (the other's
    entry lists it under ``ignored``). ``retry_call(fn)`` wraps each read (transient storage faults).
    """
    with _no_gc():  # a million ids in small lists: the cyclic GC's passes would double the time (no cycles here)
        return _done_images(out_uri, manifest, threads, retry_call or (lambda fn: fn()))


@contextlib.contextmanager
def _no_gc():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _done_images(out_uri, manifest, threads, call):
    complete = call(lambda: complete_shards(out_uri))
    try:
        index_files = call(lambda: storage.list_files(storage.join(out_uri, INDEX_DIR), suffixes=".json"))
    except FileNotFoundError:
        index_files = []
    indexed = {posixpath.splitext(storage.basename(u))[0]: u for u in index_files}
    recorded = (manifest or {}).get("shards", {})
    shards: dict[str, dict] = {}
    wanted = [n for n in complete if n in indexed]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for name, entry in zip(wanted, pool.map(lambda n: call(lambda: _read_index(indexed[n])), wanted)):
            shards[name] = entry
    for name, uri in complete.items():
        if name in shards:
            shards[name]["file"] = storage.basename(uri)
            continue
        entry = recorded.get(name)
        if entry is None or "images" not in entry:
            entry = {**call(lambda: shard_contents(out_uri, name, uri)), "recovered": True}
        else:
            entry = {**entry, "legacy": True}
        shards[name] = {**entry, "file": storage.basename(uri)}
    owner: dict[str, str] = {}
    twice: dict[str, list[str]] = {}
    # An image in two shards (two runs wrote it: a lease lost without fencing, by older code): the
    # shard written first owns it; the other shard's rows for it are ignored, and the output says so.
    for name in sorted(shards, key=lambda n: (str(shards[n].get("written_at") or ""), n)):
        for image_id in shards[name]["images"]:
            if image_id in owner:
                twice.setdefault(image_id, [owner[image_id]]).append(name)
            else:
                owner[image_id] = name
    if twice:
        log.warning("%s: %d images are in two shards (e.g. %s in %s): each counts once, from the first shard "
                    "written", out_uri, len(twice), *next(iter(twice.items())))
    for image_id, names in twice.items():
        for name in names[1:]:
            shards[name].setdefault("ignored", []).append(image_id)
    return shards, owner


# --------------------------------------------------------------------------------------------
# Run records
# --------------------------------------------------------------------------------------------

def new_run_id() -> str:
    """``YYYYmmddTHHMMSSZ-<6 hex>``: sorts by start time, unique across hosts."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + hashlib.sha1(
        f"{time.time_ns()}{random.random()}".encode()).hexdigest()[:6]


def run_record_uri(out_uri: str, run_id: str) -> str:
    return storage.join(out_uri, RUNS_DIR, f"{run_id}.json")


def read_run_records(out_uri: str) -> list[dict]:
    """Every ``<out>/runs/<run_id>.json``, oldest first (unreadable ones are skipped with a warning)."""
    try:
        files = storage.list_files(storage.join(out_uri, RUNS_DIR), suffixes=".json")
    except FileNotFoundError:
        return []
    records = []
    for uri in files:
        try:
            records.append(json.loads(storage.read_text(uri)))
        except (ValueError, OSError) as e:
            log.warning("%s: skipped (%s)", uri, e)
    return sorted(records, key=lambda r: (str(r.get("started_at")), str(r.get("run_id"))))


def carried_pending(out_uri: str) -> dict[str, str]:
    """``{ImageId: URI}`` the newest finished run left pending (failed transiently, still settling, or
    carried over from before it): retried by the next run whatever its ``since``. Runs killed before
    their record leave the previous record in charge; a record from before pending was kept has none."""
    try:
        files = storage.list_files(storage.join(out_uri, RUNS_DIR), suffixes=".json")
    except FileNotFoundError:
        return {}
    for uri in reversed(files):  # run ids sort by start time
        try:
            record = json.loads(storage.read_text(uri))
        except (ValueError, OSError) as e:
            log.warning("%s: skipped (%s)", uri, e)
            continue
        if isinstance(record.get("pending"), dict):
            return {str(k): str(v) for k, v in record["pending"].items()}
    return {}


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
    """File content of a shard's rows, sorted by ImageId, ClassId (header only when empty).

    Parquet also carries the per-image probabilities and areas, and ``bundle_version`` and
    ``scored_at`` ('' when the rows do not have them)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    columns = list(ROW_COLUMNS) if fmt == "csv" else list(ROW_COLUMNS + EXTRA_COLUMNS + VERSION_COLUMNS)
    df = pd.DataFrame(rows, columns=columns)
    df = df.sort_values(["ImageId", "ClassId"], kind="stable").reset_index(drop=True)
    df["ClassId"] = df["ClassId"].astype("int64")
    if fmt == "csv":
        return df.to_csv(index=False).encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    for col in ("ImageId", "EncodedPixels", *VERSION_COLUMNS):
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
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
    """What a shard collected so far; :meth:`write` commits it (errors, rows file, then index).

    An image left without a result (:meth:`add_left`: a transient failure, a file still settling, a
    file gone) keeps the shard from being written whole in this run: the run writes the rest as a
    shard of their own (:meth:`recorded_part`) and the left images stay pending.
    """

    name: str
    image_ids: list[str]
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    seen: set = field(default_factory=set)
    # ImageId -> (kind, reason) of the images without a result this run, each kind in LEFT_KINDS.
    left: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.left and len(self.seen) == len(self.image_ids)

    @property
    def settled(self) -> bool:
        """Every image has a result or was left: nothing more will come for this shard."""
        return len(self.seen) + len(self.left) >= len(self.image_ids)

    @property
    def failed(self) -> dict[str, str]:
        """ImageId -> reason of the transient failures."""
        return self.left_as("transient")

    def left_as(self, kind: str) -> dict[str, str]:
        return {i: reason for i, (k, reason) in self.left.items() if k == kind}

    def add_scored(self, image_id: str, result: dict, extra: dict | None = None) -> None:
        if self._first(image_id):
            self.rows.extend({**r, **(extra or {})} for r in result_rows(image_id, result))

    def add_error(self, image_id: str, file: str, reason: str, kind: str = "decode") -> None:
        if kind not in PERMANENT_KINDS:
            raise ValueError(f"error kind {kind!r} is not permanent ({', '.join(PERMANENT_KINDS)}): "
                             "use add_left")
        if self._first(image_id):
            self.errors.append({"ImageId": image_id, "file": file, "reason": reason, "kind": kind})

    def add_left(self, image_id: str, kind: str, reason: str) -> None:
        """No result for ``image_id`` this run (``kind`` in LEFT_KINDS); a later result wins."""
        if kind not in LEFT_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(LEFT_KINDS)}")
        if image_id not in self.seen:
            self.left.setdefault(image_id, (kind, reason))

    def add_failure(self, image_id: str, reason: str) -> None:
        self.add_left(image_id, "transient", reason)

    def _first(self, image_id: str) -> bool:
        if image_id in self.seen:  # a retried Ray task must not give an image two row sets
            return False
        self.left.pop(image_id, None)
        self.seen.add(image_id)
        return True

    def recorded_part(self) -> "ShardResult | None":
        """The images of a settled shard that did not fail (nor vanish), as a shard of their own (named
        by its ids like any other), or None when none is left: written so that only the failed images
        stay pending and the next run scores exactly those."""
        ids = sorted(self.seen)
        if not ids:
            return None
        return ShardResult(shard_name(ids), ids, list(self.rows), list(self.errors), set(ids))

    def entry(self, fmt: str) -> dict:
        return {"images": sorted(self.image_ids), "scored": len(self.image_ids) - len(self.errors),
                "errors": len(self.errors), "file": f"{self.name}.{fmt}"}

    def write(self, out_uri: str, fmt: str, index_extra: dict | None = None, before_commit=None,
              between=None) -> dict:
        """Write the shard atomically (errors file, rows file, then its index file); returns its entry.

        ``before_commit()`` runs before the first file and again before the index, and may raise to
        write nothing more (the lease's fence); ``between()`` runs after the rows file (a test hook)."""
        if not self.complete:
            missing = sorted(set(self.image_ids) - self.seen)[:5]
            raise RuntimeError(f"shard {self.name} is not complete (missing e.g. {missing})")
        if before_commit is not None:
            before_commit()
        err_uri = errors_uri(out_uri, self.name)
        if self.errors:
            storage.write_bytes(err_uri, encode_errors(self.errors))
        else:  # a stale errors file from an interrupted attempt would count twice
            storage.delete(err_uri, missing_ok=True)
        storage.write_bytes(shard_uri(out_uri, self.name, fmt), encode_rows(self.rows, fmt))
        if between is not None:
            between()
        if before_commit is not None:
            before_commit()
        entry = self.entry(fmt)
        write_index(out_uri, self.name, {**entry, **(index_extra or {})})
        return entry


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
    "MANIFEST", "SUCCESS", "ROW_COLUMNS", "EXTRA_COLUMNS", "ERROR_COLUMNS",
    "PERMANENT_KINDS", "LEFT_KINDS", "VERSION_COLUMNS", "index_uri", "write_index", "new_run_id", "run_record_uri",
    "read_run_records", "carried_pending",
    "Shard", "ShardResult", "shard_name",
    "plan_shards", "shard_uri", "errors_uri", "complete_shards", "read_manifest", "read_rows_file",
    "read_errors_file", "shard_contents", "done_images", "result_rows", "encode_rows",
    "encode_errors", "remove_orphan_errors",
]
