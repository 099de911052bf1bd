"""Cascade thresholds: the ``thresholds.json`` of a model bundle.

Schema (every number is checked by :func:`validate_thresholds`)::

    {
      "binary": 0.5,                       # t_bin: image is defective iff p_defect >= t_bin
      "classes": {                         # one entry per defect class "1".."4"
        "1": {"prob": 0.5,                 # t_k: class kept iff multilabel p_k >= t_k
              "pixel": 0.5,                # p_k: mask = segmenter probability >= p_k
              "min_area": 500,             # mask emptied if its area (full-resolution pixels)
              "max_area": 15500},          #   is outside [min_area, max_area]
        ...
      },
      "tta": "none",                       # flip test-time augmentation: none | h | v | hv
      "validation": {...}                  # optional: how the values were chosen (scores, grids)
    }

Other top-level keys (``validation``, ``source``, ...) are kept as they are. The defaults are the
seed notebook's: t_bin 0.5, prob 0.5, pixel 0.5, areas 500-15,500 / 700-10,000 / 1,100-160,000 /
2,800-127,000 (section 4.1: 2nd-98th percentile of the training mask areas, rounded).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from typing import Any

from steel.core.names import CLASSES, SEED_AREAS, TTA_MODES

log = logging.getLogger(__name__)

FILENAME = "thresholds.json"

CLASS_KEYS: tuple[str, ...] = ("prob", "pixel", "min_area", "max_area")


class ThresholdError(ValueError):
    """A thresholds mapping that does not follow the schema; the message names the key."""


def default_thresholds() -> dict:
    """The seed's thresholds (a fresh dict each call)."""
    return {
        "binary": 0.5,
        "classes": {
            str(k): {"prob": 0.5, "pixel": 0.5, "min_area": lo, "max_area": hi}
            for k, (lo, hi) in SEED_AREAS.items()
        },
        "tta": "none",
    }


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ThresholdError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond any float (10**400 in a YAML file)
        raise ThresholdError(f"{key}: must be finite, got an integer of {len(str(abs(value)))} digits") from None
    if not math.isfinite(value):
        raise ThresholdError(f"{key}: must be finite, got {value!r}")
    return value


def _probability(value: Any, key: str) -> float:
    value = _number(value, key)
    if not 0.0 <= value <= 1.0:
        raise ThresholdError(f"{key}: must be a probability in [0, 1], got {value!r}")
    return value


def _area(value: Any, key: str) -> int:
    value = _number(value, key)
    if value < 0 or value != int(value):
        raise ThresholdError(f"{key}: must be a non-negative whole number of pixels, got {value!r}")
    return int(value)


def validate_thresholds(d: Any) -> dict:
    """Check ``d`` against the schema; return a normalised deep copy.

    Class keys may be ints or strings ("1".."4"); they come back as strings. Probabilities become
    floats, areas ints; ``tta`` defaults to "none". Raises :class:`ThresholdError` naming the key.
    """
    if not isinstance(d, dict):
        raise ThresholdError(f"thresholds must be a mapping, got {type(d).__name__}")
    for key in ("binary", "classes"):
        if key not in d:
            raise ThresholdError(f"thresholds: missing key {key!r} (need 'binary' and 'classes')")
    out = copy.deepcopy(d)
    out["binary"] = _probability(d["binary"], "binary")
    classes = d["classes"]
    if not isinstance(classes, dict):
        raise ThresholdError(f"classes: expected a mapping of class id -> thresholds, got {type(classes).__name__}")
    norm: dict[str, dict] = {}
    for raw_key, entry in classes.items():
        key = str(raw_key)
        if key not in {str(k) for k in CLASSES}:
            raise ThresholdError(f"classes: unknown class {raw_key!r}; classes are 1, 2, 3, 4")
        if key in norm:
            raise ThresholdError(f"classes: class {key} given twice")
        if not isinstance(entry, dict):
            raise ThresholdError(f"classes.{key}: expected a mapping, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(CLASS_KEYS))
        if unknown:
            raise ThresholdError(f"classes.{key}: unknown key {unknown[0]!r}; keys are {', '.join(CLASS_KEYS)}")
        missing = [k for k in CLASS_KEYS if k not in entry]
        if missing:
            raise ThresholdError(f"classes.{key}: missing key {missing[0]!r}")
        item = {
            "prob": _probability(entry["prob"], f"classes.{key}.prob"),
            "pixel": _probability(entry["pixel"], f"classes.{key}.pixel"),
            "min_area": _area(entry["min_area"], f"classes.{key}.min_area"),
            "max_area": _area(entry["max_area"], f"classes.{key}.max_area"),
        }
        if item["min_area"] > item["max_area"]:
            raise ThresholdError(
                f"classes.{key}: min_area {item['min_area']} is larger than max_area {item['max_area']}"
            )
        norm[key] = item
    missing_classes = [str(k) for k in CLASSES if str(k) not in norm]
    if missing_classes:
        raise ThresholdError(f"classes: missing class {missing_classes[0]} (need all of 1, 2, 3, 4)")
    out["classes"] = {str(k): norm[str(k)] for k in CLASSES}
    tta = d.get("tta", "none")
    if tta not in TTA_MODES:
        raise ThresholdError(f"tta: must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    out["tta"] = tta
    if "validation" in d and not isinstance(d["validation"], dict):
        raise ThresholdError(f"validation: expected a mapping, got {type(d['validation']).__name__}")
    return out


def class_thresholds(d: dict, k: int) -> dict:
    """Thresholds of class ``k`` (1..4) from a validated mapping."""
    return d["classes"][str(int(k))]


def merge_areas(d: dict, areas: dict) -> dict:
    """Copy of ``d`` with min/max areas from ``{"1": {"min_area", "max_area"}, ...}`` (any subset)."""
    out = validate_thresholds(d)
    if not isinstance(areas, dict):
        raise ThresholdError(f"area thresholds must be a mapping of class -> {{min_area, max_area}}, got {type(areas).__name__}")
    for raw_key, entry in areas.items():
        key = str(raw_key)
        if key not in out["classes"]:
            raise ThresholdError(f"area thresholds: unknown class {raw_key!r}; classes are 1, 2, 3, 4")
        if not isinstance(entry, dict):
            raise ThresholdError(f"area thresholds.{key}: expected a mapping, got {type(entry).__name__}")
        unknown = sorted(set(entry) - {"min_area", "max_area"})
        if unknown:
            raise ThresholdError(f"area thresholds.{key}: unknown key {unknown[0]!r}; keys are min_area, max_area")
        for name in ("min_area", "max_area"):
            if name in entry:
                out["classes"][key][name] = entry[name]
    return validate_thresholds(out)


def from_area_json(path: str, base: dict | None = None) -> dict:
    """Thresholds ``base`` (default: the seed's) with the areas of EDA's ``area_thresholds.json``.

    The file maps class ids to ``{"min_area": int, "max_area": int}``; classes it leaves out keep
    the base values. ``path`` is any storage URI.
    """
    from steel.core import storage

    text = storage.read_text(path)
    try:
        areas = json.loads(text)
    except json.JSONDecodeError as e:
        raise ThresholdError(f"{path}: not valid JSON: {e}") from None
    try:
        return merge_areas(base if base is not None else default_thresholds(), areas)
    except ThresholdError as e:
        raise ThresholdError(f"{path}: {e}") from None


def _file_uri(uri: str) -> str:
    """``uri`` itself if it names a .json file, else ``<uri>/thresholds.json`` (a bundle folder)."""
    from steel.core import storage

    return uri if str(uri).endswith(".json") else storage.join(uri, FILENAME)


def load_thresholds(uri: str) -> dict:
    """Read and validate thresholds from a .json URI or a bundle folder URI."""
    from steel.core import storage

    target = _file_uri(uri)
    text = storage.read_text(target)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ThresholdError(f"{target}: not valid JSON: {e}") from None
    try:
        return validate_thresholds(data)
    except ThresholdError as e:
        raise ThresholdError(f"{target}: {e}") from None


def bundle_thresholds(bundle_uri: str) -> dict | None:
    """The validated ``thresholds.json`` of the bundle at ``bundle_uri``, or None when it has none."""
    try:
        return load_thresholds(bundle_uri)
    except FileNotFoundError:
        return None


def resolve(bundle_uri: str | None, thresholds: dict | str | None = None) -> dict:
    """The thresholds a run uses: ``thresholds`` (a mapping, or a .json URI) when given, else the
    bundle's ``thresholds.json``, else the seed's (:func:`default_thresholds`, with a warning naming
    the bundle). Always validated."""
    if isinstance(thresholds, dict):
        return validate_thresholds(thresholds)
    if isinstance(thresholds, str):
        return load_thresholds(thresholds)
    if thresholds is not None:
        raise ThresholdError(f"thresholds must be a mapping or a URI, got {type(thresholds).__name__}")
    found = bundle_thresholds(bundle_uri) if bundle_uri else None
    if found is not None:
        return found
    if bundle_uri:
        log.warning("%s has no %s: using the seed's default thresholds", bundle_uri, FILENAME)
    return default_thresholds()


def dumps(d: dict) -> str:
    return json.dumps(validate_thresholds(d), indent=2, sort_keys=False) + "\n"


def save_thresholds(uri: str, d: dict) -> str:
    """Validate and write thresholds (atomically) to a .json URI or into a bundle folder; return the URI."""
    from steel.core import storage

    target = _file_uri(uri)
    storage.write_text(target, dumps(d))
    return target


__all__ = [
    "FILENAME", "ThresholdError", "default_thresholds",
    "validate_thresholds", "class_thresholds", "resolve", "bundle_thresholds", "merge_areas", "from_area_json", "load_thresholds",
    "save_thresholds", "dumps",
]
