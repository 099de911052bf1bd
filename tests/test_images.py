"""steel.data.images: one decoder, one resize, one preprocessing record, shared by training, tuning and scoring."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from steel.core.config import load_config
from steel.core.names import MODEL_NAMES, is_segmenter
from steel.data import images
from steel.data.synth import render
from steel.model import bundle
from steel.model import networks as models
from steel.model.cascade import Cascade
from steel.model.predictor import cascade_from_bundle
from steel.model.thresholds import default_thresholds

H, W = 256, 1600


def _jpeg(seed: int = 0) -> bytes:
    """A colour JPEG (4:2:0 chroma): the case where decoders and colour conversions could differ."""
    gray, _ = render.render(seed, "train", 3, (3,))
    rgb = np.stack([gray, np.roll(gray, 11, axis=1), gray[::-1]], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _recording_cascade(specs: dict) -> tuple[Cascade, dict]:
    """A cascade of stand-in models that record the input each one is handed."""
    seen: dict[str, np.ndarray] = {}

    def model(name):
        def call(x):
            seen[name] = x.copy()
            n = len(x)
            if name == "binary":
                return np.ones((n, 1), np.float32)
            if name == "multilabel":
                return np.ones((n, 4), np.float32)
            return np.zeros((n, *x.shape[1:3], 1), np.float32)
        return call

    cas = Cascade({n: model(n) for n in MODEL_NAMES}, {n: specs[n]["input_size"] for n in MODEL_NAMES},
                  default_thresholds(), preprocessing={n: specs[n]["preprocessing"] for n in MODEL_NAMES})
    return cas, seen


@pytest.mark.parametrize("encoder", models.SEGMENTER_ENCODERS)
def test_one_jpeg_identical_arrays_on_training_tuning_and_scoring_paths(tmp_path, encoder):
    """The same file bytes give bit-identical model inputs through training's Ray Data stage
    (train_data.prepare_batch), tuning's reader (tuning.read_image -> cascade) and scoring's Ray
    Data stage (stages.decode_batch -> cascade), for each U-Net encoder's preprocessing and the
    classifier's."""
    from steel.score import stages
    from steel.train.data import prepare_batch

    data = _jpeg()
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    seg = models.resolve_spec("seg1", encoder=encoder, input_size=(64, 320), encoder_weights="none")
    cls = models.resolve_spec("binary", encoder="simplecnn", input_size=(64, 160), encoder_weights="none")
    specs = {n: seg if is_segmenter(n) else cls for n in MODEL_NAMES}

    batch = {"path": np.array([str(path)], dtype=object), "bytes": np.array([data], dtype=object)}
    train = {
        n: prepare_batch(batch, name=n, labels={"a.jpg": "" if n == "seg1" else np.float32([1])},
                         input_size=tuple(specs[n]["input_size"]), preprocessing=specs[n]["preprocessing"])["image"]
        for n in ("binary", "seg1")
    }

    cas, seen = _recording_cascade(specs)
    cas.predict_probabilities(images.read(str(path))[None])
    tune = {n: seen["binary"] if n == "binary" else seen["seg1"] for n in ("binary", "seg1")}

    decoded = stages.decode_batch({"shard": ["s"], "image_id": ["a.jpg"], "file": [str(path)], "path": [str(path)]})
    assert decoded["error"][0] == ""
    seen.clear()
    cas.predict(decoded["image"])
    score = {"binary": seen["binary"], "seg1": seen["seg1"]}  # the gates pass everything here

    for n in ("binary", "seg1"):
        assert train[n].dtype == tune[n].dtype == score[n].dtype == np.float32
        np.testing.assert_array_equal(train[n], tune[n])
        np.testing.assert_array_equal(train[n], score[n])
        np.testing.assert_array_equal(train[n][0], images.load(data, specs[n]))
    if seg["preprocessing"] != "unit":  # the U-Net really gets its own scaling, not the classifier's
        assert train["seg1"].min() < 0 or train["seg1"].max() > 1


def test_decoder_reasons_are_permanent_errors():
    with pytest.raises(images.BadImage, match="empty file"):
        images.decode(b"")
    with pytest.raises(images.BadImage, match="not an image"):
        images.decode(b"hello, not a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (160, 32)).save(buf, format="JPEG")
    with pytest.raises(images.BadImage, match="wrong size 160x32"):
        images.decode(buf.getvalue())
    assert images.decode(buf.getvalue(), allow_resize=True).shape == (H, W, 3)
    assert images.load(_jpeg(), {"input_size": [32, 160], "preprocessing": "imagenet"}).shape == (32, 160, 3)


@pytest.mark.timeout(120)
def test_bundle_records_preprocessing_and_old_bundles_load_as_unit(tmp_path):
    kw_cls = dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none", dense_units=(8,))
    kw_seg = dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none", decoder_filters=(8, 8, 4, 4, 4))
    specs = {n: models.resolve_spec(n, **(kw_seg if is_segmenter(n) else kw_cls),
                                    preprocessing="imagenet" if is_segmenter(n) else None)
             for n in MODEL_NAMES}
    built = {n: models.build(n, **specs[n]) for n in MODEL_NAMES}
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    for uri in (new, old):
        bundle.save_bundle(uri, built, specs, load_config(None))
    loaded = bundle.load_bundle(new)
    assert loaded.specs["seg2"]["preprocessing"] == "imagenet" and loaded.specs["binary"]["preprocessing"] == "unit"
    cas = cascade_from_bundle(loaded)
    assert cas.preprocessing["seg2"] == "imagenet" and cas.preprocessing["binary"] == "unit"

    # A bundle written before specs recorded preprocessing: the same manifest without the field.
    manifest_path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["models"].values():
        del entry["spec"]["preprocessing"]
    manifest_path.write_text(json.dumps(manifest))
    legacy = bundle.load_bundle(old, names=["binary", "seg1"])
    assert {s["preprocessing"] for s in legacy.specs.values()} == {"unit"}  # what it was trained on
    np.testing.assert_array_equal(legacy.models["seg1"].get_weights()[0], built["seg1"].get_weights()[0])
    cas = cascade_from_bundle(SimpleNamespace(models=built, thresholds=None, specs={
        n: bundle.spec_with_preprocessing(e["spec"]) for n, e in bundle.read_manifest(old)["models"].items()}))
    assert set(cas.preprocessing.values()) == {"unit"}
    x = cas._inputs(np.full((1, H, W, 3), 255, np.uint8), "seg1", {})
    assert x.min() == x.max() == 1.0  # [0, 1] scaling (imagenet would give (1 - mean) / std > 2)
