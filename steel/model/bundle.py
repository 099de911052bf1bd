"""Model bundles: a folder at a URI holding the trained cascade.

::

    <bundle>/manifest.json          what is inside (below)
    <bundle>/<name>.weights.h5      weights of each model (HDF5, ``Model.save_weights``)
    <bundle>/thresholds.json        cascade thresholds (written by tuning; kept when models are saved)

No pickles and no saved architectures: :func:`load_bundle` rebuilds each network from its spec with
:func:`steel.model.networks.build` (``encoder_weights='none'``: it never downloads anything) and loads the
weights. A spec's ``preprocessing`` (``steel.data.images``) is the input scaling the model was trained
with; every consumer applies it from there (a spec without it, from an older bundle, means ``unit``:
see :func:`spec_with_preprocessing`). ``manifest.json``::

    {"format_version": 1, "created_at": ..., "updated_at": ..., "fingerprint": <data split sha256>,
     "config": {...run config...}, "versions": {"tensorflow": ..., "tf_keras": ...,
     "segmentation_models": ..., "ray": ..., "numpy": ..., "python": ..., "steel": ...},
     "models": {"binary": {"spec": {encoder, input_size, encoder_weights, decoder_filters, dense_units,
                                    preprocessing},
                           "weights": "binary.weights.h5", "sha256": ..., "params": ...,
                           "metrics": {...best epoch...}, "training_seconds": ..., "fingerprint": ...,
                           "created_at": ...}, ...},
     "extra": {...}}

Writes go through :mod:`steel.core.storage` (local, ``file://`` or ``s3://``), each file atomically; a
model's weights are written before the manifest that points at them, and the manifest records their
SHA-256, so a save interrupted between the two is reported on load instead of silently mixing an old
spec with new weights. :func:`save_model_to_bundle` updates the manifest read-modify-write: call it from
one process at a time (the training driver does).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable

from steel.core import storage
from steel.model.thresholds import bundle_thresholds

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS_SUFFIX = ".weights.h5"


class BundleError(ValueError):
    """A bundle that cannot be loaded as asked (bad manifest, unknown model, weights that do not match)."""


@dataclass
class Bundle:
    """A loaded bundle: ``models`` are ready ``tf_keras.Model`` objects, keyed by model name."""

    uri: str
    manifest: dict
    models: dict = field(default_factory=dict)
    specs: dict = field(default_factory=dict)
    thresholds: dict | None = None

    @property
    def input_sizes(self) -> dict[str, tuple[int, int]]:
        return {name: tuple(spec["input_size"]) for name, spec in self.specs.items()}

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.get("fingerprint")


# ---------------------------------------------------------------------
#  Helpers
# ---------------------------------------------------------------------

def weights_name(name: str) -> str:
    return f"{name}{WEIGHTS_SUFFIX}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays -> Python, tuples -> lists, NaN/inf -> None, dataclasses -> dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar / array
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries a bundle depends on (``None`` for one that is not installed)."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "tensorflow": version("tensorflow") or version("tensorflow-cpu"),
        "tf_keras": version("tf-keras"),
        "segmentation_models": version("segmentation-models"),
        "ray": version("ray"),
        "numpy": version("numpy"),
        "python": platform.python_version(),
        "steel": version("steel"),
    }


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_name(name: str) -> None:
    from steel.core.names import ALL_MODEL_NAMES

    if name not in ALL_MODEL_NAMES:
        raise BundleError(f"unknown model {name!r}; choose from {', '.join(ALL_MODEL_NAMES)}")


def _write_weights(uri: str, name: str, model) -> tuple[str, str]:
    """Save ``model``'s weights to a local temp file, upload it as ``<name>.weights.h5``; (file, sha256)."""
    fname = weights_name(name)
    with tempfile.TemporaryDirectory(prefix="steel-bundle-") as tmp:
        local = os.path.join(tmp, fname)
        model.save_weights(local)
        digest = _sha256(local)
        with open(local, "rb") as src, storage.open_output(storage.join(uri, fname)) as dst:
            for chunk in iter(lambda: src.read(8 << 20), b""):
                dst.write(chunk)
    return fname, digest


def _model_entry(name: str, model, spec: dict, metrics: dict | None, seconds: float | None,
                 fingerprint: str | None, fname: str, digest: str) -> dict:
    from steel.model.networks import SPEC_KEYS, resolve_spec

    try:
        spec = resolve_spec(name, **{k: spec.get(k) for k in SPEC_KEYS})
    except (TypeError, AttributeError):
        raise BundleError(f"spec of model {name!r} must be a dict like steel.model.networks.model_spec(), got {spec!r}") from None
    return {
        "spec": spec,
        "weights": fname,
        "sha256": digest,
        "params": int(model.count_params()),
        "metrics": _plain(metrics or {}),
        "training_seconds": None if seconds is None else float(seconds),
        "fingerprint": fingerprint,
        "created_at": _now(),
    }


def _write_manifest(uri: str, manifest: dict) -> None:
    storage.write_text(storage.join(uri, MANIFEST), json.dumps(_plain(manifest), indent=2) + "\n")


def read_manifest(uri: str) -> dict:
    """The bundle's manifest; FileNotFoundError (naming the URI) when ``uri`` is not a bundle."""
    target = storage.join(uri, MANIFEST)
    try:
        text = storage.read_text(target)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: not a model bundle (no {MANIFEST})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{target}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
        raise BundleError(f"{target}: not a bundle manifest (no 'models' mapping)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{target}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")
    return manifest


# ---------------------------------------------------------------------
#  Saving
# ---------------------------------------------------------------------

def save_bundle(uri: str, models: dict, specs: dict, config: Any, metrics: dict | None = None,
                fingerprint: str | None = None, training_seconds: dict | None = None,
                extra: dict | None = None) -> dict:
    """Write a whole bundle: ``<name>.weights.h5`` for each model, then a new ``manifest.json``.

    Args:
        uri: bundle folder (local path, ``file://`` or ``s3://``); created if needed.
        models: ``{name: tf_keras.Model}`` (names from ``steel.core.names.MODEL_NAMES``).
        specs: ``{name: steel.model.networks.model_spec(...)}`` for every model (checked and normalized).
        config: the run configuration (``Config`` or its ``to_dict()``), stored for provenance.
        metrics: ``{name: {metric: value}}`` (e.g. the best epoch's validation metrics).
        fingerprint: ``steel.data.labels.fingerprint`` of the data split the models were trained on.
        training_seconds: ``{name: seconds}``.
        extra: anything else JSON-serializable to keep in the manifest.

    An existing ``thresholds.json`` is kept. Returns the manifest written.
    """
    missing = sorted(set(models) - set(specs))
    if missing:
        raise BundleError(f"no spec for model(s) {', '.join(missing)}")
    for name in models:
        _check_name(name)
    storage.makedirs(uri)
    metrics = metrics or {}
    training_seconds = training_seconds or {}
    entries = {}
    for name, model in models.items():
        fname, digest = _write_weights(uri, name, model)
        entries[name] = _model_entry(name, model, specs[name], metrics.get(name), training_seconds.get(name),
                                     fingerprint, fname, digest)
    now = _now()
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": now,
        "updated_at": now,
        "fingerprint": fingerprint,
        "config": _plain(config),
        "versions": library_versions(),
        "models": entries,
        "extra": _plain(extra or {}),
    }
    _write_manifest(uri, manifest)
    log.info("saved bundle %s (%s)", uri, ", ".join(entries))
    return manifest


def save_model_to_bundle(uri: str, name: str, model, spec: dict, metrics: dict | None = None,
                         seconds: float | None = None, *, config: Any = None, fingerprint: str | None = None,
                         extra: dict | None = None) -> dict:
    """Add or replace one model in the bundle at ``uri`` (creating the bundle if there is none).

    Writes ``<name>.weights.h5``, then the manifest with this model's entry replaced; the other models'
    entries, ``thresholds.json`` and (unless given here) the config, fingerprint and extra are kept.
    A fingerprint that differs from the bundle's is recorded on the model and logged as a warning
    (the models were trained on different splits). Returns the manifest written.
    """
    _check_name(name)
    try:
        manifest = read_manifest(uri)
    except FileNotFoundError:
        manifest = {"format_version": FORMAT_VERSION, "created_at": _now(), "fingerprint": fingerprint,
                    "config": {}, "models": {}, "extra": {}}
    storage.makedirs(uri)
    fname, digest = _write_weights(uri, name, model)
    if fingerprint is not None:
        previous = manifest.get("fingerprint")
        others = [m for m in manifest["models"] if m != name]
        if previous and previous != fingerprint and others:
            log.warning("bundle %s: model %s was trained on split %s, the bundle's other models on %s",
                        uri, name, fingerprint[:12], previous[:12])
        manifest["fingerprint"] = fingerprint
    manifest["models"][name] = _model_entry(name, model, spec, metrics, seconds, fingerprint, fname, digest)
    if config is not None:
        manifest["config"] = _plain(config)
    if extra:
        manifest["extra"] = {**manifest.get("extra", {}), **_plain(extra)}
    manifest["versions"] = library_versions()
    manifest["updated_at"] = _now()
    _write_manifest(uri, manifest)
    log.info("saved %s to bundle %s", name, uri)
    return manifest


# ---------------------------------------------------------------------
#  Loading
# ---------------------------------------------------------------------

def load_model(uri: str, name: str, manifest: dict | None = None, verify: bool = True):
    """Rebuild model ``name`` of the bundle at ``uri`` from its spec and load its weights."""
    from steel.model.networks import build_from_spec

    manifest = manifest if manifest is not None else read_manifest(uri)
    entry = manifest["models"].get(name)
    if entry is None:
        raise BundleError(f"{uri}: bundle has no model {name!r}; it has {', '.join(manifest['models']) or 'none'}")
    fname = entry.get("weights") or weights_name(name)
    remote = storage.join(uri, fname)
    model = build_from_spec(name, entry["spec"], encoder_weights="none")
    if entry.get("params") is not None and model.count_params() != entry["params"]:
        raise BundleError(f"{uri}: model {name!r} rebuilt from its spec has {model.count_params():,} parameters, "
                          f"the manifest says {entry['params']:,} (code and bundle disagree)")
    with tempfile.TemporaryDirectory(prefix="steel-bundle-") as tmp:
        local = os.path.join(tmp, fname)
        try:
            storage.download_to(remote, local)
        except FileNotFoundError:
            raise FileNotFoundError(f"{remote}: weights of model {name!r} missing from bundle {uri}") from None
        if verify and entry.get("sha256") and _sha256(local) != entry["sha256"]:
            raise BundleError(f"{remote}: weights do not match the manifest's sha256 "
                              f"(an interrupted save? save model {name!r} again)")
        try:
            model.load_weights(local)
        except (ValueError, OSError) as e:
            raise BundleError(f"{remote}: cannot load into the rebuilt {name!r}: {e}") from None
    return model


def spec_with_preprocessing(spec: dict) -> dict:
    """A copy of a manifest's model spec that names its input preprocessing.

    Bundles saved before the spec recorded it (no ``preprocessing`` key) were trained and tuned on
    [0, 1] pixels whatever the encoder: they get ``steel.data.images.LEGACY_PREPROCESSING`` (``unit``).
    """
    from steel.core.names import LEGACY_PREPROCESSING

    out = dict(spec)
    if not out.get("preprocessing"):
        out["preprocessing"] = LEGACY_PREPROCESSING
    return out


def load_bundle(uri: str, names: Iterable[str] | None = None, verify: bool = True) -> Bundle:
    """Load the bundle at ``uri``: every model in it, or only ``names``.

    Each architecture is rebuilt with ``steel.model.networks.build`` from the manifest's spec (no downloads),
    then its weights are loaded. ``thresholds`` is the bundle's ``thresholds.json`` or ``None``.
    Raises FileNotFoundError for a missing manifest or weights file, BundleError (a ValueError) for an
    unknown model name, a bad manifest, or weights that do not match it.
    """
    uri = str(uri)
    manifest = read_manifest(uri)
    available = list(manifest["models"])
    wanted = available if names is None else list(names)
    unknown = [n for n in wanted if n not in manifest["models"]]
    if unknown:
        raise BundleError(f"{uri}: bundle has no model {', '.join(map(repr, unknown))}; "
                          f"it has {', '.join(available) or 'none'}")
    models = {name: load_model(uri, name, manifest, verify=verify) for name in wanted}
    specs = {name: spec_with_preprocessing(manifest["models"][name]["spec"]) for name in wanted}
    return Bundle(uri=uri, manifest=manifest, models=models, specs=specs, thresholds=bundle_thresholds(uri))


# ---------------------------------------------------------------------
#  Versions: immutable version folders + an atomically replaced pointer
# ---------------------------------------------------------------------

POINTER = "CURRENT"
VERSIONS = "versions"


@dataclass(frozen=True)
class ResolvedBundle:
    """A bundle folder to load (``uri``) and its version string; ``pointer`` when it came from one."""

    uri: str
    version: str
    pointer: str | None = None


def provenance(uri: str, version: str | None = None) -> dict:
    """What a scoring run records about the bundle it used (from its manifest; no TensorFlow): URI,
    version, format, dates, data fingerprint, and per model its encoder, input size and weights sha256."""
    manifest = read_manifest(uri)
    info = {"uri": str(uri), "version": version}
    for key in ("format_version", "created_at", "updated_at", "fingerprint"):
        if key in manifest:
            info[key] = manifest[key]
    info["models"] = {name: {"encoder": m.get("spec", {}).get("encoder"),
                             "input_size": m.get("spec", {}).get("input_size"), "sha256": m.get("sha256")}
                      for name, m in manifest.get("models", {}).items()}
    return info


def content_version(manifest: dict, thresholds: dict | None) -> str:
    """``b-<12 hex>``: a hash of the models' weight sha256s and the thresholds (same content, same version)."""
    models = {name: m.get("sha256") for name, m in sorted(manifest.get("models", {}).items())}
    text = json.dumps({"models": models, "thresholds": thresholds}, sort_keys=True, default=str)
    return "b-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def resolve_bundle(uri: str) -> ResolvedBundle:
    """Resolve a bundle URI once: a direct bundle folder (``manifest.json``) is itself, with its
    manifest's ``version`` or else :func:`content_version`; a versioned root (``CURRENT`` pointer
    beside ``versions/``) resolves to the immutable folder the pointer names *now*. Load from the
    returned ``uri``, never from ``uri`` again, so a promotion during a run cannot mix versions."""
    if storage.exists(storage.join(uri, MANIFEST)):
        manifest = read_manifest(uri)
        return ResolvedBundle(str(uri), manifest.get("version") or content_version(manifest, bundle_thresholds(uri)))
    try:
        pointer = json.loads(storage.read_text(storage.join(uri, POINTER)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: not a model bundle (no {MANIFEST}) nor a versioned bundle root "
                                f"(no {POINTER})") from None
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if not version:
        raise BundleError(f"{storage.join(uri, POINTER)}: no 'version' in the pointer")
    folder = storage.join(uri, VERSIONS, version)
    if not storage.exists(storage.join(folder, MANIFEST)):
        raise BundleError(f"{storage.join(uri, POINTER)} points at {version}, which has no {MANIFEST}")
    return ResolvedBundle(folder, version, pointer=storage.join(uri, POINTER))


def publish_bundle(src_uri: str, root_uri: str, promote: bool = True) -> ResolvedBundle:
    """Copy the bundle at ``src_uri`` into the immutable ``<root>/versions/<version>/`` (manifest last,
    with its ``version``), then (``promote``) point ``<root>/CURRENT`` at it in one atomic write.

    Publishing the same content again reuses its version folder; a version folder is never rewritten.
    """
    manifest = read_manifest(src_uri)
    version = content_version(manifest, bundle_thresholds(src_uri))
    dest = storage.join(root_uri, VERSIONS, version)
    if not storage.exists(storage.join(dest, MANIFEST)):
        for f in storage.list_files(src_uri, recursive=True):
            rel = f[len(str(src_uri).rstrip("/")):].lstrip("/")
            if rel != MANIFEST:
                storage.write_bytes(storage.join(dest, rel), storage.read_bytes(f))
        _write_manifest(dest, {**manifest, "version": version, "published_at": _now(), "source": str(src_uri)})
        log.info("published bundle %s as %s", src_uri, dest)
    if promote:
        promote_bundle(root_uri, version)
    return ResolvedBundle(dest, version, pointer=storage.join(root_uri, POINTER) if promote else None)


def promote_bundle(root_uri: str, version: str) -> None:
    """Point ``<root>/CURRENT`` at an existing version (one atomic write: readers see old or new)."""
    folder = storage.join(root_uri, VERSIONS, version)
    if not storage.exists(storage.join(folder, MANIFEST)):
        raise FileNotFoundError(f"{folder}: no such bundle version")
    storage.write_text(storage.join(root_uri, POINTER),
                       json.dumps({"version": version, "promoted_at": _now()}) + "\n")
    log.info("promoted %s -> %s", storage.join(root_uri, POINTER), version)


__all__ = ["ResolvedBundle", "resolve_bundle", "provenance", "publish_bundle", "promote_bundle", "content_version",
           "POINTER", "VERSIONS", "Bundle", "BundleError", "FORMAT_VERSION", "save_bundle", "save_model_to_bundle", "load_bundle",
           "load_model", "read_manifest", "spec_with_preprocessing", "library_versions",
           "weights_name"]
