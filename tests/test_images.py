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


@pytest.fixture(scope="module")
def tiny_keras():
    """Six tiny Keras models (random weights): what the production bundle-to-cascade path wraps."""
    from steel.core.names import model_kind
    from tests.conftest import TINY_SPECS

    return {n: models.build(n, **TINY_SPECS[model_kind(n)]) for n in MODEL_NAMES}


@pytest.mark.parametrize("encoder", models.SEGMENTER_ENCODERS)
def test_one_jpeg_identical_arrays_on_training_tuning_and_scoring_paths(tmp_path, encoder, tiny_keras):
    """The same file bytes give bit-identical model inputs through training's two Ray Data stages
    (prepare_batch, and decode_batch + finish_batch for the worker cache) and, through scoring's decode
    stage (stages.decode_batch, which tuning's probability pass runs too), the cascade that
    steel.model.predictor builds from a bundle, for each U-Net encoder's preprocessing and the classifier's."""
    from steel.score import stages
    from steel.train.data import decode_batch, finish_batch, prepare_batch

    data = _jpeg()
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    seg = models.resolve_spec("seg1", encoder=encoder, input_size=(64, 320), encoder_weights="none")
    cls = models.resolve_spec("binary", encoder="simplecnn", input_size=(64, 160), encoder_weights="none")
    specs = {n: seg if is_segmenter(n) else cls for n in MODEL_NAMES}

    batch = {"path": np.array([str(path)], dtype=object), "bytes": np.array([data], dtype=object)}
    labels = {n: {"a.jpg": "" if n == "seg1" else np.float32([1])} for n in ("binary", "seg1")}
    train, cached = {}, {}
    for n in ("binary", "seg1"):
        size, prep = tuple(specs[n]["input_size"]), specs[n]["preprocessing"]
        train[n] = prepare_batch(batch, name=n, labels=labels[n], input_size=size, preprocessing=prep)["image"]
        rows = decode_batch(batch, name=n, labels=labels[n], input_size=size)
        cached[n] = finish_batch(rows, name=n, preprocessing=prep)["image"]

    cas = cascade_from_bundle(SimpleNamespace(models=tiny_keras, specs=specs, thresholds=None))
    decoded = stages.decode_batch({"shard": ["s"], "image_id": ["a.jpg"], "file": [str(path)]})
    assert decoded["error"][0] == ""
    served = {n: cas._inputs(decoded["image"], n, {}) for n in ("binary", "seg1")}

    for n in ("binary", "seg1"):
        assert train[n].dtype == cached[n].dtype == served[n].dtype == np.float32
        np.testing.assert_array_equal(train[n], cached[n])
        np.testing.assert_array_equal(train[n], served[n])
        np.testing.assert_array_equal(train[n][0], images.load(data, specs[n]))
    if seg["preprocessing"] != "unit":  # the U-Net really gets its own scaling, not the classifier's
        assert train["seg1"].min() < 0 or train["seg1"].max() > 1


@pytest.mark.timeout(300)
def test_a_saved_bundle_answers_alike_on_the_tuning_and_scoring_actors(tmp_path, ray_local):
    """One JPEG through the real paths end to end: the bundle on disk, steel.model.predictor.BundleCascade
    in Ray actors for tuning's probability pass and for ``steel score``'s rows, against the model run in
    this process on training's prepared input: the same probabilities."""
    import pandas as pd

    from steel.core.config import ScoreConfig
    from steel.core.names import model_kind
    from steel.model.predictor import BundleCascade
    from steel.score import io as score_io
    from steel.score.probabilities import predict_probabilities
    from steel.score.run import score
    from steel.train.data import prepare_batch
    from tests.conftest import TINY_SPECS

    specs = {n: models.resolve_spec(n, **TINY_SPECS[model_kind(n)],
                                    preprocessing="imagenet" if is_segmenter(n) else None) for n in MODEL_NAMES}
    built = {n: models.build(n, **specs[n]) for n in MODEL_NAMES}
    uri = str(tmp_path / "bundle")
    bundle.save_bundle(uri, built, specs, load_config(None))
    folder = tmp_path / "images"
    folder.mkdir()
    data = _jpeg(5)
    (folder / "a.jpg").write_bytes(data)
    batch = {"path": np.array([str(folder / "a.jpg")], dtype=object), "bytes": np.array([data], dtype=object)}
    x = {n: prepare_batch(batch, name=n, labels={"a.jpg": "" if is_segmenter(n) else np.float32([1])},
                          input_size=tuple(specs[n]["input_size"]), preprocessing=specs[n]["preprocessing"])["image"]
         for n in ("binary", "seg2")}
    reloaded = bundle.load_bundle(uri)  # what the actors load
    p_binary = float(reloaded.models["binary"](x["binary"], training=False).numpy()[0, 0])
    seg2 = reloaded.models["seg2"](x["seg2"], training=False).numpy()[0, ..., 0]

    cfg = ScoreConfig(actors=1, batch_size=1)
    everything = {**default_thresholds(), "binary": 0.0}
    for c in everything["classes"].values():
        c.update(prob=0.0)
    tuned = predict_probabilities(BundleCascade(uri, everything, "none"), ["a.jpg"], str(folder),
                                  {k: tuple(specs[f"seg{k}"]["input_size"]) for k in (1, 2, 3, 4)}, cfg)
    assert tuned["image_ids"] == ["a.jpg"]
    np.testing.assert_allclose(tuned["p_defect"][0], p_binary, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tuned["seg"][2][0].astype(np.float32), seg2, atol=2e-3)  # stored as float16

    out = str(tmp_path / "scores")
    summary = score(uri, str(folder), out, ScoreConfig(actors=1, batch_size=1, format="parquet"), thresholds=everything)
    assert summary["scored"] == 1
    rows = pd.concat([score_io.read_rows_file(u) for u in score_io.complete_shards(out).values()])
    np.testing.assert_allclose(rows["p_defect"].iloc[0], p_binary, rtol=1e-5, atol=1e-6)


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
