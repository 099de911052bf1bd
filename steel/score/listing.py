"""What a scoring run reads: every file under the images URI, or with ``--since`` the date partitions of
its window, each id exactly the key the store holds (see :class:`Listing`).

The ids are the paths below the images URI with ``/`` separators: for the usual flat folder the file
name (``0002cc93b.jpg``, as Kaggle's); two files with the same name in different subfolders get
different ids. Files that are not images are still inputs: they get an error row, never a silent skip.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import time
from dataclasses import dataclass, field

from steel.core import storage

log = logging.getLogger(__name__)


@dataclass
class Listing:
    """What one listing of the images found.

    ``inputs``: ``{ImageId: URI}`` to score (ImageId = the path below the images folder exactly as the
    store holds it). ``young``: the ids of files the store wrote less than ``score.settle_s`` ago: if
    one does not decode, a copy may still be writing it, so it stays pending instead of becoming an
    error row. ``unplaced``: with ``since``, entries at the top that are no
    date partition (a stray file, a folder named otherwise): not scored, and the run reports them.
    ``partitions``: the date partitions listed.
    """

    inputs: dict[str, str] = field(default_factory=dict)
    young: set[str] = field(default_factory=set)
    unplaced: list[str] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)


# A date partition directly under the images folder: dt=YYYY-MM-DD, date=YYYY-MM-DD or YYYY-MM-DD; or the
# nested form YYYY/MM/DD.
PARTITION = re.compile(r"^(?:dt=|date=)?(\d{4}-\d{2}-\d{2})$")
YEAR, TWO_DIGITS = re.compile(r"^\d{4}$"), re.compile(r"^\d{2}$")


def list_inputs(images_uri: str, exclude: str | None = None, since: str | None = None, lookback_days: int = 0,
                settle_s: float = 0.0) -> Listing:
    """Every file under ``images_uri`` (recursively) as a :class:`Listing`, ids sorted.

    ``exclude`` (a URI) drops files under it, so an output folder inside the input is not re-read.
    ``since`` (``YYYY-MM-DD``) lists only the date partitions on or after that day minus
    ``lookback_days`` (a late upload into yesterday's partition is still found); anything else at the
    top is ``unplaced``. Files the store wrote less than ``settle_s`` ago are ``young``.
    A folder that does not exist raises FileNotFoundError naming it.
    """
    root = str(images_uri).rstrip("/")
    listing = Listing()
    if since is None:
        entries, now = storage.list_entries(root, recursive=True)
    else:
        first = (datetime.date.fromisoformat(check_since(since)) - datetime.timedelta(days=lookback_days)).isoformat()
        entries, now = [], time.time()
        top, now = storage.list_entries(root, recursive=False)
        listing.unplaced += [e.name for e in top]
        for part, day in _partitions(root, listing.unplaced):
            if day >= first:
                found, now = storage.list_entries(storage.join(root, part), recursive=True)
                entries += [dataclasses.replace(e, name=f"{part}/{e.name}") for e in found]
                listing.partitions.append(part)
    if not entries and not listing.unplaced and not storage.exists(root):
        raise FileNotFoundError(f"{images_uri}: no such folder (or S3 prefix)")
    skip = str(exclude).rstrip("/") + "/" if exclude else None
    for e in entries:
        if skip and e.uri.startswith(skip):
            continue
        listing.inputs[e.name] = e.uri
        if now - e.modified < settle_s:
            listing.young.add(e.name)
    listing.inputs = dict(sorted(listing.inputs.items()))
    listing.unplaced.sort()
    if listing.unplaced:
        log.warning("%s: %d entries are not date partitions (dt=/date=YYYY-MM-DD, YYYY-MM-DD or YYYY/MM/DD): "
                    "not scored with --since (e.g. %s)", root, len(listing.unplaced), listing.unplaced[0])
    return listing


def check_since(since: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(since)):
        raise ValueError(f"since must be a date YYYY-MM-DD, got {since!r}")
    return str(since)


def _partitions(root: str, unplaced: list[str]) -> list[tuple[str, str]]:
    """``(path below root, YYYY-MM-DD)`` of every date partition; folders that are none go to ``unplaced``."""
    out = []
    for name in storage.list_dirs(root):
        m = PARTITION.match(name)
        if m:
            out.append((name, m.group(1)))
            continue
        if not YEAR.match(name):
            unplaced.append(name + "/")
            continue
        for month in storage.list_dirs(storage.join(root, name)):
            for day in storage.list_dirs(storage.join(root, name, month)) if TWO_DIGITS.match(month) else []:
                if TWO_DIGITS.match(day):
                    out.append((f"{name}/{month}/{day}", f"{name}-{month}-{day}"))
                else:
                    unplaced.append(f"{name}/{month}/{day}/")
            if not TWO_DIGITS.match(month):
                unplaced.append(f"{name}/{month}/")
    return sorted(out)


__all__ = ["Listing", "list_inputs", "check_since", "PARTITION"]
