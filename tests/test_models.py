"""steel.model.networks (the six architectures) and steel.model.losses (the seed's Keras metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from steel.core.config import load_config
from steel.core.keras_env import keras, tf
from steel.core.names import MODEL_NAMES, class_of, is_segmenter
from steel.data import images as image_io
from steel.model import losses as km
from steel.model import networks as models

TINY_CLS = dict(encoder="mobilenetv2_035", input_size=(64, 320), encoder_weights="none", dense_units=(32, 16))
TINY_SEG = dict(encoder="simplecnn", input_size=(64, 320), encoder_weights="none",
                decoder_filters=(16, 8, 8, 4, 4))
MOBILE_SEG = {**TINY_SEG, "encoder": "mobilenetv2_035"}


def tiny(name: str) -> dict:
    """Tiny settings; seg1 uses the smallest real segmentation-models backbone, seg2..4 simplecnn."""
    return MOBILE_SEG if name == "seg1" else TINY_SEG if is_segmenter(name) else TINY_CLS


# ---------------------------------------------------------------- seed architectures

@pytest.mark.slow
@pytest.mark.parametrize("name, params", [("binary", 23_523_497), ("multilabel", 23_523_692),
                                          ("seg1", 12_641_169)])
def test_seed_parameter_counts(name, params):
    keras.backend.clear_session()
    model = models.build(name, encoder_weights="none")
    assert model.count_params() == params
    if name == "binary":  # the seed's summary: 57,600 non-trainable (BatchNorm statistics)
        non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
        assert non_trainable == 57_600
    h, w = (256, 1600) if is_segmenter(name) else (256, 512)
    assert tuple(model.input_shape) == (None, h, w, 3)


# ---------------------------------------------------------------- tiny models

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_models_shapes_and_no_lambda(name):
    model = models.build(name, **tiny(name))
    assert model.name == name
    assert tuple(model.input_shape) == (None, 64, 320, 3)
    expected = (None, 64, 320, 1) if is_segmenter(name) else (None, 4 if name == "multilabel" else 1)
    assert tuple(model.output_shape) == expected
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Lambda)]
    out = model(np.random.default_rng(0).random((2, 64, 320, 3), dtype=np.float32), training=False).numpy()
    assert out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))


def test_simplecnn_models_are_tiny(tmp_path):
    model = models.build("multilabel", encoder="simplecnn", input_size=(32, 160), encoder_weights="none",
                         dense_units=(16,))
    assert model.count_params() < 30_000
    assert tuple(model.output_shape) == (None, 4)
    unet = models.build("seg4", encoder="simplecnn", input_size=(32, 160), encoder_weights="none",
                        decoder_filters=(16, 8, 8, 4, 4))
    assert unet.count_params() < 150_000 and tuple(unet.output_shape) == (None, 32, 160, 1)
    # the U-Net skip connections come from the encoder's blocks 5..2 (strides 16, 8, 4, 2)
    assert [unet.get_layer(f"simplecnn_block{i}_relu").output.shape[1] for i in (5, 4, 3, 2)] == [2, 4, 8, 16]
    # encoder weights from a file
    encoder = models._simplecnn_backbone(input_shape=(32, 160, 3))
    encoder.set_weights([w + 1.0 for w in encoder.get_weights()])
    encoder.save_weights(str(tmp_path / "enc.h5"))
    loaded = models.build("seg4", encoder="simplecnn", input_size=(32, 160), encoder_weights=str(tmp_path / "enc.h5"),
                          decoder_filters=(16, 8, 8, 4, 4))
    np.testing.assert_array_equal(loaded.get_layer("simplecnn_top_conv").get_weights()[0],
                                  encoder.get_layer("simplecnn_top_conv").get_weights()[0])


def test_unknown_model_and_encoder_name_allowed_values():
    with pytest.raises(ValueError, match="binary, multilabel, seg1"):
        models.build("segX")
    with pytest.raises(ValueError, match="xception.*mobilenetv2_035"):
        models.build("binary", encoder="resnet999")
    with pytest.raises(ValueError, match="efficientnetb1.*mobilenetv2.*simplecnn"):
        models.build("seg2", encoder="xception")  # segmentation-models has no xception U-Net


def test_bad_sizes_and_misplaced_options():
    with pytest.raises(ValueError, match="divisible by 32"):
        models.build("seg1", **{**TINY_SEG, "input_size": (64, 300)})
    with pytest.raises(ValueError, match="xception encoder needs"):
        models.build("binary", encoder="xception", input_size=(64, 320), encoder_weights="none")
    with pytest.raises(ValueError, match="positive integers"):
        models.build("binary", **{**TINY_CLS, "input_size": (64,)})
    with pytest.raises(ValueError, match="5 values"):
        models.build("seg1", **{**TINY_SEG, "decoder_filters": (16, 8)})
    with pytest.raises(ValueError, match="classifiers only"):
        models.build("seg1", **TINY_SEG, dense_units=(8,))
    with pytest.raises(ValueError, match="U-Nets only"):
        models.build("binary", **TINY_CLS, decoder_filters=(8, 8, 8, 8, 8))
    with pytest.raises(ValueError, match="no such file"):
        models.build("binary", **{**TINY_CLS, "encoder_weights": "/nonexistent/enc.h5"})
    with pytest.raises(ValueError, match="no ImageNet weights"):
        models.build("binary", encoder="simplecnn", input_size=(64, 320), encoder_weights="imagenet")


def test_encoder_weights_from_h5_path(tmp_path):
    encoder = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 320, 3), alpha=0.35)
    path = str(tmp_path / "encoder.h5")
    encoder.save_weights(path)
    model = models.build("binary", **{**TINY_CLS, "encoder_weights": path})
    for name in ("Conv1", "block_16_project"):
        for got, want in zip(model.get_layer(name).get_weights(), encoder.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    fresh = models.build("binary", **TINY_CLS)
    assert not np.array_equal(fresh.get_layer("Conv1").get_weights()[0], encoder.get_layer("Conv1").get_weights()[0])


@pytest.mark.timeout(180)
def test_unet_encoder_weights_staged_on_s3(s3_bucket, tmp_path):
    """A cluster without internet: the encoder's weights staged once in object storage (here the
    moto S3 server) and named by ``encoder_weights: s3://...`` end up in the U-Net's encoder."""
    from steel.core import storage

    encoder = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 160, 3), alpha=0.35)
    local = tmp_path / "mobilenet_v2_0.35_notop.h5"
    encoder.save_weights(str(local))
    uri = f"s3://{s3_bucket}/pretrained/mobilenet_v2_0.35_notop.h5"
    storage.write_bytes(uri, local.read_bytes())
    kwargs = dict(encoder="mobilenetv2_035", input_size=(32, 160), decoder_filters=(8, 8, 4, 4, 4))
    model = models.build("seg1", **kwargs, encoder_weights=uri)
    for name in ("Conv1", "block_13_expand"):
        for got, want in zip(model.get_layer(name).get_weights(), encoder.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    fresh = models.build("seg1", **kwargs, encoder_weights="none")
    assert not np.array_equal(fresh.get_layer("Conv1").get_weights()[0], encoder.get_layer("Conv1").get_weights()[0])
    with pytest.raises(FileNotFoundError):
        models.build("seg1", **kwargs, encoder_weights=f"s3://{s3_bucket}/pretrained/missing.h5")


def test_mixed_precision_output_is_float32():
    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for name in ("binary", "seg2"):
            model = models.build(name, **tiny(name))
            assert model.output.dtype == tf.float32
            assert model.layers[-2].compute_dtype == "float16"
            out = model(np.zeros((1, 64, 320, 3), np.float32), training=False)
            assert out.dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy(old)


def test_spec_from_config_and_rebuild():
    cfg = load_config(None, [
        "train.classifier.encoder=simplecnn", "train.classifier.input_size=[32,160]",
        "train.classifier.encoder_weights=none", "train.classifier.dense_units=[8]",
        "train.segmenter.encoder=mobilenetv2_035", "train.segmenter.input_size=[32,160]",
        "train.segmenter.encoder_weights=none", "train.segmenter.decoder_filters=[8,8,4,4,4]",
    ])
    spec = models.model_spec("seg3", cfg.train)
    assert spec == {"encoder": "mobilenetv2_035", "input_size": [32, 160], "encoder_weights": "none",
                    "decoder_filters": [8, 8, 4, 4, 4], "dense_units": None, "preprocessing": "tf"}
    assert models.model_spec("binary", cfg.train)["dense_units"] == [8]
    model = models.build_from_config("binary", cfg.train)
    rebuilt = models.build_from_spec("binary", models.model_spec("binary", cfg.train))
    assert model.count_params() == rebuilt.count_params()
    assert [w.shape for w in model.weights] == [w.shape for w in rebuilt.weights]


def test_default_spec_is_the_seed():
    cfg = load_config(None)
    assert models.model_spec("binary", cfg.train) == {
        "encoder": "xception", "input_size": [256, 512], "encoder_weights": "imagenet",
        "decoder_filters": None, "dense_units": [1024, 512, 64], "preprocessing": "unit"}
    assert models.model_spec("seg4", cfg.train) == {
        "encoder": "efficientnetb1", "input_size": [256, 1600], "encoder_weights": "imagenet",
        "decoder_filters": [256, 128, 64, 32, 16], "dense_units": None, "preprocessing": "imagenet"}


def test_names_helpers():
    assert [is_segmenter(n) for n in MODEL_NAMES] == [False, False, True, True, True, True]
    assert [class_of(f"seg{k}") for k in range(1, 5)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="classifier"):
        class_of("binary")
    with pytest.raises(ValueError, match="unknown model"):
        is_segmenter("seg5")


def test_resize():
    batch = np.random.default_rng(0).integers(0, 256, (2, 256, 1600, 3), dtype=np.uint8)
    small = image_io.resize(batch, (256, 512))
    assert small.shape == (2, 256, 512, 3) and small.dtype == np.uint8
    masks = (np.arange(256 * 1600).reshape(1, 256, 1600) % 7 == 0).astype(np.uint8)
    assert set(np.unique(image_io.resize(masks, (64, 320), nearest=True))) <= {0, 1}
    with pytest.raises(ValueError, match="size"):
        image_io.resize(batch, (0, 5))


def test_preprocessing_unit_and_errors():
    images = np.array([[[[0, 128, 255]]]], dtype=np.uint8)  # 1x1x1x3
    out = image_io.preprocess(images, "unit")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0, 128 / 255, 1], rtol=1e-6)
    np.testing.assert_allclose(image_io.preprocess(images, "tf").ravel(), [-1, 128 / 127.5 - 1, 1], atol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        image_io.preprocess(np.zeros((4, 4), np.uint8), "unit")
    with pytest.raises(ValueError, match="uint8"):  # scaling twice is refused
        image_io.preprocess(out, "unit")
    with pytest.raises(ValueError, match="unknown preprocessing 'torch'"):
        image_io.preprocess(images, "torch")


def test_spec_records_the_encoders_preprocessing():
    # The seed: /255 for the Xception classifiers, get_preprocessing('efficientnetb1') for the U-Nets.
    assert models.resolve_spec("binary")["preprocessing"] == "unit"
    assert models.resolve_spec("seg1")["preprocessing"] == "imagenet"
    assert models.resolve_spec("seg1", encoder="mobilenetv2")["preprocessing"] == "tf"
    assert models.resolve_spec("seg1", encoder="simplecnn", encoder_weights="none")["preprocessing"] == "unit"
    assert models.resolve_spec("seg1", preprocessing="unit")["preprocessing"] == "unit"  # explicit wins
    with pytest.raises(ValueError, match="unknown preprocessing"):
        models.resolve_spec("seg1", preprocessing="caffe")


@pytest.mark.parametrize("encoder", models.SEGMENTER_ENCODERS)
def test_unet_preprocessing_is_segmentation_models_get_preprocessing(encoder):
    """For every registered U-Net encoder, the recorded preprocessing is exactly what
    segmentation_models' get_preprocessing(backbone) does to the same pixels."""
    sm = models._sm()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 32, 160, 3), dtype=np.uint8)
    x[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [12, 200, 77]]
    spec = models.resolve_spec("seg2", encoder=encoder, input_size=(32, 160), encoder_weights="none")
    ours = image_io.preprocess(x, spec)
    theirs = np.asarray(sm.get_preprocessing(encoder)(x.astype(np.float32).copy()), np.float32)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- keras_metrics

def _np_dice(t, p, smooth=1.0):
    t, p = t.astype(np.float64).ravel(), p.astype(np.float64).ravel()
    return (2 * (t * p).sum() + smooth) / (t.sum() + p.sum() + smooth)


def _np_prf(t, p):
    t, p = t.astype(np.float64), p.astype(np.float64)
    tp = np.round(np.clip(t * p, 0, 1)).sum()
    recall = tp / (np.round(np.clip(t, 0, 1)).sum() + 1e-7)
    precision = tp / (np.round(np.clip(p, 0, 1)).sum() + 1e-7)
    return precision, recall, 2 * precision * recall / (precision + recall + 1e-7)


def test_dice_metrics_against_numpy():
    rng = np.random.default_rng(1)
    t = (rng.random((3, 8, 16, 1)) > 0.7).astype(np.float32)
    p = rng.random((3, 8, 16, 1)).astype(np.float32)
    assert float(km.dice_coef(t, p)) == pytest.approx(_np_dice(t, p), rel=1e-5)
    assert float(km.dice_loss(t, p)) == pytest.approx(1 - _np_dice(t, p), rel=1e-5)
    # exact known values: perfect prediction -> 1; both empty -> 1 (smooth); disjoint -> 1/(n+1)
    assert float(km.dice_coef(t, t)) == pytest.approx(1.0)
    zeros = np.zeros_like(t)
    assert float(km.dice_coef(zeros, zeros)) == pytest.approx(1.0)
    assert float(km.dice_coef(t, 1 - t)) == pytest.approx(1 / (t.size + 1), rel=1e-5)
    # integer masks and float16 predictions (mixed precision) are cast to float32
    assert float(km.dice_coef(t.astype(np.uint8), tf.constant(p, tf.float16))) == pytest.approx(
        _np_dice(t, p.astype(np.float16)), rel=1e-3)
    assert km.dice_coef(t, tf.constant(p, tf.float16)).dtype == tf.float32


def test_bce_dice_loss_against_numpy():
    rng = np.random.default_rng(2)
    t = (rng.random((4, 8, 16, 1)) > 0.6).astype(np.float32)
    p = np.clip(rng.random((4, 8, 16, 1)), 0.01, 0.99).astype(np.float32)
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    per_sample = km.bce_dice_loss(t, p).numpy()
    assert per_sample.shape == (4,)
    np.testing.assert_allclose(per_sample, bce.reshape(4, -1).mean(1) + 1 - _np_dice(t, p), rtol=1e-4)
    # Keras' SUM_OVER_BATCH_SIZE reduction of the per-sample values = the seed's scalar BCE + Dice loss
    assert float(per_sample.mean()) == pytest.approx(bce.mean() + 1 - _np_dice(t, p), rel=1e-4)


def test_precision_recall_f1_against_numpy():
    t = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], np.float32)
    p = np.array([[0.9, 0.2, 0.4, 0.7], [0.6, 0.8, 0.1, 0.3], [0.2, 0.1, 0.55, 0.51]], np.float32)
    # TP = 4 (0.9, 0.6, 0.8, 0.51); positives = 5; predicted positives = 6
    assert float(km.recall_m(t, p)) == pytest.approx(4 / 5, rel=1e-5)
    assert float(km.precision_m(t, p)) == pytest.approx(4 / 6, rel=1e-5)
    assert float(km.f1_m(t, p)) == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5), rel=1e-5)
    rng = np.random.default_rng(3)
    t2 = (rng.random((16, 4)) > 0.5).astype(np.float32)
    p2 = rng.random((16, 4)).astype(np.float32)
    got = [float(f(t2, p2)) for f in (km.precision_m, km.recall_m, km.f1_m)]
    np.testing.assert_allclose(got, _np_prf(t2, p2), rtol=1e-5)
    assert float(km.f1_m(t2.astype(np.int32), tf.constant(p2, tf.float16))) == pytest.approx(
        _np_prf(t2, p2.astype(np.float16))[2], rel=1e-3)


def test_metric_names_and_loss_choice():
    assert [f.__name__ for f in (km.dice_coef, km.dice_loss, km.bce_dice_loss, km.precision_m,
                                 km.recall_m, km.f1_m)] == list(km.CUSTOM_OBJECTS)
    assert km.segmenter_loss("dice") is km.dice_loss
    assert km.segmenter_loss("bce_dice") is km.bce_dice_loss
    with pytest.raises(ValueError, match="dice, bce_dice"):
        km.segmenter_loss("focal")


@pytest.mark.slow
def test_fit_under_distribution_strategy_history_columns():
    """One training step of a tiny classifier and U-Net inside a strategy scope; history keys are stable."""
    strategy = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    rng = np.random.default_rng(0)
    x = rng.random((4, 32, 160, 3), dtype=np.float32)
    with strategy.scope():
        cls = models.build("binary", encoder="simplecnn", input_size=(32, 160), encoder_weights="none",
                           dense_units=(8,))
        cls.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                    metrics=list(km.CLASSIFIER_METRICS))
        seg = models.build("seg1", encoder="simplecnn", input_size=(32, 160), encoder_weights="none",
                           decoder_filters=(8, 8, 4, 4, 4))
        seg.compile(optimizer=keras.optimizers.Adam(1e-3), loss=km.bce_dice_loss, metrics=[km.dice_coef])
    h1 = cls.fit(x, np.array([[1], [0], [1], [0]], np.float32), batch_size=2, epochs=1, verbose=0,
                 validation_data=(x, np.array([[1], [0], [1], [0]], np.float32)))
    assert set(h1.history) == {"loss", "precision_m", "recall_m", "f1_m",
                               "val_loss", "val_precision_m", "val_recall_m", "val_f1_m"}
    masks = (rng.random((4, 32, 160, 1)) > 0.8).astype(np.float32)
    h2 = seg.fit(x, masks, batch_size=2, epochs=1, verbose=0)
    assert set(h2.history) == {"loss", "dice_coef"}
    assert all(np.isfinite(v[0]) for h in (h1, h2) for v in h.history.values())


def test_encoder_weights_from_s3(tmp_path, s3_bucket):
    from steel.core import storage

    encoder = models._simplecnn_backbone(input_shape=(32, 160, 3))
    encoder.set_weights([w - 0.5 for w in encoder.get_weights()])
    encoder.save_weights(str(tmp_path / "enc.h5"))
    uri = f"s3://{s3_bucket}/weights/enc.h5"
    storage.write_bytes(uri, (tmp_path / "enc.h5").read_bytes())
    unet = models.build("seg1", encoder="simplecnn", input_size=(32, 160), encoder_weights=uri,
                        decoder_filters=(8, 8, 4, 4, 4))
    np.testing.assert_array_equal(unet.get_layer("simplecnn_block3_conv").get_weights()[0],
                                  encoder.get_layer("simplecnn_block3_conv").get_weights()[0])


def test_from_scratch_models_use_fast_batchnorm_statistics():
    """Random-init encoders get BN momentum 0.9 so validation statistics follow the data quickly."""
    from steel.core.keras_env import keras

    model = models.build("seg3", encoder="simplecnn", input_size=(32, 160), encoder_weights="none",
                         decoder_filters=(16, 8, 8, 4, 4))
    momenta = {layer.momentum for layer in model.submodules
               if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {models.FROM_SCRATCH_BN_MOMENTUM}
    before = model.count_params()
    assert models.set_bn_momentum(model, 0.99) > 0 and model.count_params() == before
