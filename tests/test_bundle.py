"""steel.model.bundle: save six tiny models, load them back (local disk and moto S3), same predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steel.core import storage
from steel.core.config import load_config
from steel.core.names import MODEL_NAMES, is_segmenter
from steel.model import bundle
from steel.model import networks as models
from steel.model.thresholds import default_thresholds, save_thresholds

TINY_CLS = dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none", dense_units=(16, 8))
TINY_SEG = dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none",
                decoder_filters=(8, 8, 4, 4, 4))
MOBILE_SEG = {**TINY_SEG, "encoder": "mobilenetv2_035"}  # seg4: one real segmentation-models backbone
FINGERPRINT = "f" * 64


def _spec(name):
    kwargs = MOBILE_SEG if name == "seg4" else TINY_SEG if is_segmenter(name) else TINY_CLS
    return models.resolve_spec(name, **kwargs)


def _perturb(model, seed):
    """Random weights everywhere (BatchNorm statistics too), so a load that misses anything shows."""
    rng = np.random.default_rng(seed)
    model.set_weights([(w + rng.normal(0, 0.05, w.shape)).astype(w.dtype) if "variance" not in v.name
                       else (np.abs(w) + rng.random(w.shape)).astype(w.dtype)
                       for w, v in zip(model.get_weights(), model.weights)])
    return model


class TinyModels(dict):
    """name -> perturbed tiny model, built on first use; ``x`` a test batch; ``preds`` their outputs on it."""

    x = np.random.default_rng(0).random((2, 32, 160, 3), dtype=np.float32)

    def __missing__(self, name):
        self[name] = _perturb(models.build(name, **_spec(name)), MODEL_NAMES.index(name))
        self.preds[name] = self[name](self.x, training=False).numpy()
        return self[name]

    def __init__(self):
        super().__init__()
        self.preds = {}

    def all(self):
        return {name: self[name] for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def tiny():
    return TinyModels()


def _save(uri, built):
    cfg = load_config(None)
    metrics = {n: {"val_loss": np.float32(0.25), "val_dice_coef" if is_segmenter(n) else "val_f1_m": 0.75,
                   "epoch": np.int64(3), "bad": float("nan")} for n in built}
    return bundle.save_bundle(uri, built, {n: _spec(n) for n in built}, cfg, metrics, FINGERPRINT,
                              {n: 1.5 for n in built}, extra={"note": "test"})


def _check_roundtrip(uri, tiny):
    built, x, preds = tiny.all(), tiny.x, tiny.preds
    manifest = _save(uri, built)
    loaded = bundle.load_bundle(uri)
    assert set(loaded.models) == set(MODEL_NAMES) and loaded.thresholds is None
    for name in MODEL_NAMES:
        np.testing.assert_allclose(loaded.models[name](x, training=False).numpy(), preds[name], atol=1e-6)
    assert loaded.specs["seg2"] == _spec("seg2") and loaded.input_sizes["binary"] == (32, 160)
    assert loaded.fingerprint == FINGERPRINT
    return manifest, loaded


@pytest.mark.slow
def test_roundtrip_local(tmp_path, tiny):
    uri = str(tmp_path / "bundle")
    manifest, loaded = _check_roundtrip(uri, tiny)
    on_disk = json.loads(storage.read_text(storage.join(uri, "manifest.json")))
    assert on_disk == loaded.manifest
    assert on_disk["format_version"] == 1 and on_disk["fingerprint"] == FINGERPRINT
    assert on_disk["config"]["train"]["classifier"]["encoder"] == "xception"
    assert {"tensorflow", "tf_keras", "segmentation_models", "ray", "python"} <= set(on_disk["versions"])
    assert on_disk["versions"]["tf_keras"] and on_disk["versions"]["segmentation_models"] == "1.0.1"
    entry = on_disk["models"]["seg3"]
    assert entry["spec"] == {"encoder": "simplecnn", "input_size": [32, 160], "encoder_weights": "none",
                             "decoder_filters": [8, 8, 4, 4, 4], "dense_units": None, "preprocessing": "unit"}
    assert on_disk["models"]["seg4"]["spec"]["encoder"] == "mobilenetv2_035"
    assert on_disk["models"]["seg4"]["spec"]["preprocessing"] == "tf"  # get_preprocessing('mobilenetv2')
    assert entry["metrics"] == {"val_loss": 0.25, "val_dice_coef": 0.75, "epoch": 3, "bad": None}
    assert entry["training_seconds"] == 1.5 and entry["weights"] == "seg3.weights.h5"
    assert entry["params"] == tiny["seg3"].count_params() and len(entry["sha256"]) == 64
    assert on_disk["extra"] == {"note": "test"} and on_disk["created_at"]
    assert sorted(storage.list_files(uri)) == sorted(
        [storage.join(uri, "manifest.json")] + [storage.join(uri, f"{n}.weights.h5") for n in MODEL_NAMES])
    # a subset loads only what is asked; a fresh (unloaded) model really differs
    part = bundle.load_bundle(uri, names=["multilabel"])
    assert list(part.models) == ["multilabel"]
    fresh = models.build("multilabel", **TINY_CLS)
    assert not np.allclose(fresh(tiny.x, training=False).numpy(), tiny.preds["multilabel"], atol=1e-6)


@pytest.mark.slow
def test_roundtrip_s3(s3_bucket, tiny):
    uri = f"s3://{s3_bucket}/runs/bundle"
    _check_roundtrip(uri, tiny)
    assert storage.exists(f"{uri}/seg4.weights.h5")


def test_save_model_to_bundle_adds_and_replaces(tmp_path, tiny, caplog):
    built, x, preds = tiny, tiny.x, tiny.preds
    uri = str(tmp_path / "b")
    bundle.save_model_to_bundle(uri, "binary", built["binary"], _spec("binary"), {"val_f1_m": 0.5}, 2.0,
                                config={"name": "t"}, fingerprint=FINGERPRINT)
    save_thresholds(uri, default_thresholds())
    first = bundle.read_manifest(uri)
    bundle.save_model_to_bundle(uri, "seg1", built["seg1"], _spec("seg1"), {"val_dice_coef": 0.4}, 3.0,
                                fingerprint=FINGERPRINT)
    # replace binary with other weights (the multilabel-shaped head would not fit: use a perturbed copy)
    other = _perturb(models.build("binary", **TINY_CLS), 99)
    with caplog.at_level("WARNING", logger="steel.model.bundle"):
        bundle.save_model_to_bundle(uri, "binary", other, _spec("binary"), {"val_f1_m": 0.9}, 4.0,
                                    fingerprint="e" * 64)
    assert "different" in caplog.text or "trained on split" in caplog.text
    manifest = bundle.read_manifest(uri)
    assert set(manifest["models"]) == {"binary", "seg1"}
    assert manifest["config"] == {"name": "t"} and manifest["created_at"] == first["created_at"]
    assert manifest["models"]["binary"]["metrics"] == {"val_f1_m": 0.9}
    assert manifest["models"]["seg1"]["fingerprint"] == FINGERPRINT
    loaded = bundle.load_bundle(uri)
    assert loaded.thresholds == default_thresholds()  # kept across model saves
    np.testing.assert_allclose(loaded.models["binary"](x, training=False).numpy(), other(x, training=False).numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.models["seg1"](x, training=False).numpy(), preds["seg1"], atol=1e-6)


def test_clear_errors(tmp_path, tiny):
    built = tiny
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        bundle.load_bundle(str(tmp_path / "nothing"))
    uri = str(tmp_path / "b")
    bundle.save_model_to_bundle(uri, "multilabel", built["multilabel"], _spec("multilabel"))
    with pytest.raises(bundle.BundleError, match="no model 'seg2'; it has multilabel"):
        bundle.load_bundle(uri, names=["seg2"])
    with pytest.raises(bundle.BundleError, match="unknown model"):
        bundle.save_model_to_bundle(uri, "seg9", built["multilabel"], _spec("multilabel"))
    weights = storage.join(uri, "multilabel.weights.h5")
    good = storage.read_bytes(weights)
    storage.write_bytes(weights, good[:-10] + b"0123456789")
    with pytest.raises(bundle.BundleError, match="sha256"):
        bundle.load_bundle(uri)
    storage.delete(weights)
    with pytest.raises(FileNotFoundError, match="multilabel.weights.h5.*missing"):
        bundle.load_bundle(uri)
    storage.write_text(storage.join(uri, "manifest.json"), "{not json")
    with pytest.raises(bundle.BundleError, match="not valid JSON"):
        bundle.load_bundle(uri)
