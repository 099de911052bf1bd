"""The six networks of the cascade: one registry, one public factory, :func:`build`.

Layout follows qubvel/segmentation_models' ``unet.py``: utility functions, blocks (small closures),
the two model builders, the registry of the six model names, and the public factory.

- ``binary``: encoder (no top) -> GlobalAveragePooling2D -> Dense 1024 relu -> BN -> Dropout 0.3
  -> Dense 512 relu -> BN -> Dropout 0.3 -> Dense 64 relu -> Dense 1 sigmoid (the seed's Xception
  head; 23,523,497 parameters at 256x512x3).
- ``multilabel``: the same head with 4 sigmoid outputs (23,523,692 parameters).
- ``seg1`` .. ``seg4``: ``segmentation_models.Unet(encoder, classes=1, activation='sigmoid')``, one
  per defect class (efficientnetb1: 12,641,169 parameters).
- ``unified`` (``train.kind: unified``): one network instead of the six. The same U-Net with 4 sigmoid
  mask channels (one per class), and beside it a classification head on the encoder's deepest
  features (GlobalAveragePooling2D -> Dense 5 sigmoid: any defect, then classes 1..4). Two outputs,
  ``[cls (N, 5), mask (N, H, W, 4)]``; it takes the ``segmenter`` section's architecture settings.

Every model takes float32 RGB of its ``input_size``, scaled as its spec's ``preprocessing`` says
(:func:`steel.data.images.preprocess`): by default the scaling its encoder was pretrained with
(:data:`DEFAULT_PREPROCESSING`). Classifiers get ``unit`` ([0, 1], the seed's
``ImageDataGenerator(rescale=1/255)``); U-Nets get what ``segmentation_models.get_preprocessing``
does for their backbone (``efficientnetb1``: ImageNet mean/std standardisation, as the seed's
``get_preprocessing('efficientnetb1')``). The output layer always computes in float32
(``dtype='float32'``): under the ``mixed_float16`` global policy the body runs in float16 but the
sigmoid, and so the loss, stay float32 (the numerically safe set-up the Keras mixed-precision guide
asks for); under the default float32 policy this changes nothing. No ``Lambda`` layers are used, so
a bundle rebuilds every architecture from code plus a small spec (see :func:`model_spec`) and loads
weights only.

TensorFlow is imported lazily (inside the builders), so ``import steel.model.networks`` is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from steel.core.names import CLASSES, MODEL_KINDS, PREPROCESSINGS, SHAPE, UNIFIED, has_unet, model_kind
from steel.data.images import check_size

# ---------------------------------------------------------------------
#  Defaults (the seed notebook) and allowed values
# ---------------------------------------------------------------------

CLASSIFIER_DEFAULTS: dict[str, Any] = {
    "encoder": "xception",
    "input_size": (256, 512),
    "encoder_weights": "imagenet",
    "decoder_filters": None,
    "dense_units": (1024, 512, 64),
}
SEGMENTER_DEFAULTS: dict[str, Any] = {
    "encoder": "efficientnetb1",
    "input_size": SHAPE,
    "encoder_weights": "imagenet",
    "decoder_filters": (256, 128, 64, 32, 16),  # segmentation-models' default
    "dense_units": None,
}
SPEC_KEYS: tuple[str, ...] = ("encoder", "input_size", "encoder_weights", "decoder_filters", "dense_units",
                              "preprocessing")
DROPOUT = 0.3
FROM_SCRATCH_BN_MOMENTUM = 0.9  # see set_bn_momentum
UNET_DIVISOR = 32  # a U-Net downsamples 5 times: H and W must be multiples of 32
MIN_CLASSIFIER_SIDE = 32

# Classifier encoders: name -> (tf_keras.applications constructor name, extra kwargs, input scale).
# ``input_scale`` multiplies the input before the encoder: tf_keras' EfficientNets carry their own
# Rescaling(1/255) + Normalization layers and expect [0, 255] pixels, so with the classifiers' default
# ``unit`` preprocessing ([0, 1]) they get exactly what they were pretrained on.
_CLASSIFIER_ENCODERS: dict[str, tuple[str | None, dict, float]] = {
    "xception": ("Xception", {}, 1.0),
    "mobilenetv2": ("MobileNetV2", {"alpha": 1.0}, 1.0),
    "mobilenetv2_035": ("MobileNetV2", {"alpha": 0.35}, 1.0),
    "efficientnetb0": ("EfficientNetB0", {}, 255.0),
    "efficientnetb1": ("EfficientNetB1", {}, 255.0),
    "simplecnn": (None, {}, 1.0),  # 4 conv blocks, ~25k parameters: tests and the CPU quickstart
}
# U-Net encoders (segmentation-models backbones). "mobilenetv2_035" is registered below.
_SEGMENTER_ENCODERS: tuple[str, ...] = (
    "efficientnetb0", "efficientnetb1", "efficientnetb2", "efficientnetb3",
    "mobilenetv2", "mobilenetv2_035", "resnet18", "resnet34", "simplecnn",
)
CLASSIFIER_ENCODERS: tuple[str, ...] = tuple(_CLASSIFIER_ENCODERS)
SEGMENTER_ENCODERS: tuple[str, ...] = _SEGMENTER_ENCODERS

# Input preprocessing (a name of steel.core.names.PREPROCESSINGS) per (kind, encoder): what the encoder was
# pretrained with. Classifiers: the seed's /255 for every encoder (tf_keras' EfficientNets rescale
# inside the model, see input_scale). U-Nets: segmentation_models.get_preprocessing(backbone), which
# tests/test_models.py checks for every backbone; simplecnn (never pretrained) keeps [0, 1].
DEFAULT_PREPROCESSING: dict[str, dict[str, str]] = {
    "classifier": {e: "unit" for e in CLASSIFIER_ENCODERS},
    "segmenter": {
        **{f"efficientnetb{i}": "imagenet" for i in range(4)},
        "mobilenetv2": "tf", "mobilenetv2_035": "tf",
        "resnet18": "raw", "resnet34": "raw",
        "simplecnn": "unit",
    },
}
assert set(DEFAULT_PREPROCESSING["segmenter"]) == set(SEGMENTER_ENCODERS)


# ---------------------------------------------------------------------
#  Utility functions
# ---------------------------------------------------------------------

def num_outputs(name: str) -> int:
    """Sigmoid outputs of a classifier (binary 1, multilabel 4), channels of a U-Net mask (1), or of
    the unified model's classification head (5: any defect + 4 classes; its mask has 4 channels)."""
    model_kind(name)  # a ValueError naming the choices for an unknown model
    return REGISTRY[name].outputs


@contextlib.contextmanager
def _local_weights(encoder_weights: str | None) -> Iterator[str | None]:
    """``imagenet`` | ``none``/None | path or URI of an .h5 file -> what Keras' ``weights=`` takes.

    A URI that is not local (``s3://...``) is downloaded to a temporary file for the duration of the
    build (Keras reads local paths only); a missing local file is a ValueError naming it.
    """
    if encoder_weights is None or str(encoder_weights).lower() == "none":
        yield None
        return
    if str(encoder_weights).lower() == "imagenet":
        yield "imagenet"
        return
    path = str(encoder_weights)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        from steel.core import storage

        with tempfile.TemporaryDirectory(prefix="steel-encoder-") as tmp:
            local = os.path.join(tmp, storage.basename(path) or "weights.h5")
            storage.download_to(path, local)
            yield local
        return
    if not os.path.isfile(path):
        raise ValueError(
            f"encoder_weights: expected 'imagenet', 'none' or the path of an .h5 file; "
            f"no such file: {encoder_weights!r}")
    yield path


def _norm_tuple(value, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of positive integers, got {value!r}") from None
    if any(v <= 0 for v in out) or list(out) != list(value):
        raise ValueError(f"{what} must be a list of positive integers, got {value!r}")
    return out


def resolve_spec(name: str, encoder: str | None = None, input_size=None, encoder_weights=None,
                 decoder_filters=None, dense_units=None, preprocessing=None) -> dict:
    """The complete, checked architecture spec of ``name`` (``None`` arguments -> the seed's defaults).

    ``preprocessing`` (one of ``steel.core.names.PREPROCESSINGS``) defaults to the encoder's
    (:data:`DEFAULT_PREPROCESSING`).

    Returns a JSON-friendly dict with the keys of :data:`SPEC_KEYS` (tuples become lists). This is
    what a bundle manifest stores and what :func:`build` accepts back as keyword arguments.
    """
    seg = has_unet(name)
    defaults = SEGMENTER_DEFAULTS if seg else CLASSIFIER_DEFAULTS
    encoder = defaults["encoder"] if encoder is None else str(encoder).lower()
    allowed = SEGMENTER_ENCODERS if seg else CLASSIFIER_ENCODERS
    if encoder not in allowed:
        kind = "U-Net (seg1..seg4, unified)" if seg else "classifier (binary, multilabel)"
        raise ValueError(f"unknown {kind} encoder {encoder!r} for model {name!r}; "
                         f"choose from {', '.join(allowed)}")
    h, w = check_size(defaults["input_size"] if input_size is None else input_size, "input_size")
    if seg and (h % UNET_DIVISOR or w % UNET_DIVISOR):
        raise ValueError(f"input_size {h}x{w} for U-Net {name!r}: height and width must be divisible "
                         f"by {UNET_DIVISOR} (e.g. {max(32, h // 32 * 32)}x{max(32, w // 32 * 32)})")
    if not seg and min(h, w) < MIN_CLASSIFIER_SIDE:
        raise ValueError(f"input_size {h}x{w} for classifier {name!r}: both sides must be >= {MIN_CLASSIFIER_SIDE}")
    if not seg and encoder == "xception" and min(h, w) < 71:
        raise ValueError(f"input_size {h}x{w}: the xception encoder needs both sides >= 71")
    weights = defaults["encoder_weights"] if encoder_weights is None else str(encoder_weights)
    if weights.lower() in ("none", "imagenet"):
        weights = weights.lower()
    if weights == "imagenet" and encoder == "simplecnn":
        raise ValueError("encoder 'simplecnn' has no ImageNet weights; use encoder_weights='none'")
    if seg:
        if dense_units is not None:
            raise ValueError(f"dense_units applies to classifiers only, not to U-Net {name!r}")
        filters = _norm_tuple(defaults["decoder_filters"] if decoder_filters is None else decoder_filters,
                              "decoder_filters")
        if len(filters) != 5:
            raise ValueError(f"decoder_filters must have 5 values (one per U-Net upsampling block), got {filters}")
        units = None
    else:
        if decoder_filters is not None:
            raise ValueError(f"decoder_filters applies to U-Nets only, not to classifier {name!r}")
        units = _norm_tuple(defaults["dense_units"] if dense_units is None else dense_units, "dense_units")
        filters = None
    if preprocessing is None:
        preprocessing = DEFAULT_PREPROCESSING["segmenter" if seg else "classifier"][encoder]
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {preprocessing!r} for model {name!r}; "
                         f"choose from {', '.join(PREPROCESSINGS)}")
    return {
        "encoder": encoder,
        "input_size": [h, w],
        "encoder_weights": weights,
        "decoder_filters": list(filters) if filters is not None else None,
        "dense_units": list(units) if units is not None else None,
        "preprocessing": preprocessing,
    }


# ---------------------------------------------------------------------
#  Blocks
# ---------------------------------------------------------------------

def DenseBlock(units: int, name: str, normalize: bool):
    """Dense relu [-> BatchNorm -> Dropout 0.3], as the seed's classification head."""
    from steel.core.keras_env import keras

    def wrapper(x):
        x = keras.layers.Dense(units, activation="relu", name=f"{name}_dense")(x)
        if normalize:
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
            x = keras.layers.Dropout(DROPOUT, name=f"{name}_dropout")(x)
        return x

    return wrapper


def ConvBlock(filters: int, name: str):
    """Conv 3x3 -> BatchNorm -> ReLU -> MaxPool 2x2 (the ``simplecnn`` encoder's unit)."""
    from steel.core.keras_env import keras

    def wrapper(x):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
        return keras.layers.MaxPooling2D(2, name=f"{name}_pool")(x)

    return wrapper


def _simplecnn_backbone(input_shape=None, weights=None, include_top=False, input_tensor=None, **_modules):
    """Tiny U-Net encoder (5 conv blocks, stride 32) in segmentation-models' backbone calling convention.

    Skip connections are the ReLU outputs of blocks 5..2 (strides 16, 8, 4, 2), like the real backbones'.
    ~35k parameters and ~20 layers: builds, traces and saves in a fraction of a MobileNet's time.
    """
    from steel.core.keras_env import keras

    inputs = keras.layers.Input(shape=input_shape, tensor=input_tensor, name="input_1")
    x = inputs
    for i, filters in enumerate(_SIMPLECNN_SEG_FILTERS):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"simplecnn_block{i + 1}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"simplecnn_block{i + 1}_bn")(x)
        x = keras.layers.Activation("relu", name=f"simplecnn_block{i + 1}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"simplecnn_block{i + 1}_pool")(x)
    x = keras.layers.Conv2D(_SIMPLECNN_SEG_FILTERS[-1], 3, padding="same", activation="relu",
                            name="simplecnn_top_conv")(x)
    model = keras.Model(inputs, x, name="simplecnn")
    if weights not in (None, "imagenet"):
        model.load_weights(weights)
    return model


_SIMPLECNN_SEG_FILTERS = (8, 16, 32, 32, 64)


def _classifier_encoder(encoder: str, inputs, weights: str | None):
    """Encoder feature map (no top) on ``inputs``."""
    from steel.core.keras_env import keras

    ctor_name, extra, scale = _CLASSIFIER_ENCODERS[encoder]
    x = inputs
    if scale != 1.0:
        x = keras.layers.Rescaling(scale, name="to_255")(x)
    if ctor_name is None:  # simplecnn
        for i, filters in enumerate((8, 16, 32, 64)):
            x = ConvBlock(filters, f"simplecnn_block{i + 1}")(x)
        return x
    ctor = getattr(keras.applications, ctor_name)
    base = ctor(include_top=False, weights=weights, input_tensor=x, **extra)
    return base.output


# ---------------------------------------------------------------------
#  Model builders
# ---------------------------------------------------------------------

def _build_classifier(name: str, spec: dict, weights: str | None):
    from steel.core.keras_env import keras

    h, w = spec["input_size"]
    inputs = keras.layers.Input(shape=(h, w, 3), name="image")
    x = _classifier_encoder(spec["encoder"], inputs, weights)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    units = spec["dense_units"]
    for i, u in enumerate(units):
        x = DenseBlock(u, f"head{i + 1}", normalize=i < len(units) - 1)(x)
    # float32 output: the sigmoid and the loss stay float32 under mixed precision.
    outputs = keras.layers.Dense(num_outputs(name), activation="sigmoid", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _build_segmenter(name: str, spec: dict, weights: str | None):
    from steel.core.keras_env import keras

    sm = _sm()
    h, w = spec["input_size"]
    unet = sm.Unet(
        spec["encoder"], classes=1, activation="sigmoid", input_shape=(h, w, 3),
        encoder_weights=weights,
        decoder_filters=tuple(spec["decoder_filters"]),
    )
    # Same network, but the final sigmoid computes in float32 (matters under mixed_float16 only).
    logits = unet.get_layer("final_conv").output
    outputs = keras.layers.Activation("sigmoid", dtype="float32", name="mask")(logits)
    return keras.Model(unet.input, outputs, name=name)


def _build_unified(name: str, spec: dict, weights: str | None):
    """U-Net with 4 sigmoid mask channels + a 5-output sigmoid head on the encoder's deepest features.

    The head reads the tensor the decoder starts from (the input of ``decoder_stage0_upsampling``:
    ``top_activation`` for EfficientNets, ``simplecnn_top_conv`` for simplecnn), so it works for every
    registered backbone without a per-encoder layer name.
    """
    from steel.core.keras_env import keras

    sm = _sm()
    h, w = spec["input_size"]
    unet = sm.Unet(
        spec["encoder"], classes=4, activation="sigmoid", input_shape=(h, w, 3),
        encoder_weights=weights, decoder_filters=tuple(spec["decoder_filters"]),
    )
    mask = keras.layers.Activation("sigmoid", dtype="float32", name="mask")(unet.get_layer("final_conv").output)
    deepest = unet.get_layer("decoder_stage0_upsampling").input
    x = keras.layers.GlobalAveragePooling2D(name="cls_pool")(deepest)
    x = keras.layers.Dropout(DROPOUT, name="cls_dropout")(x)
    cls = keras.layers.Dense(5, activation="sigmoid", dtype="float32", name="cls")(x)
    return keras.Model(unet.input, [cls, mask], name=name)


def _unit_preprocessing(x, **_kwargs):
    """``simplecnn``'s preprocessing as segmentation_models' ``get_preprocessing`` hands it out."""
    from steel.data.images import preprocess as _preprocess

    return _preprocess(np.asarray(x, np.uint8), "unit")


@functools.lru_cache(maxsize=1)
def _sm():
    """segmentation_models, with two extra backbones registered.

    - ``mobilenetv2_035``: MobileNetV2 with alpha=0.35. segmentation-models 1.0.1 (its last release,
      pinned) passes no ``alpha`` through ``Unet``; its backbone registry (``Backbones``) is the
      extension point: same layers and skip connections as ``mobilenetv2``, a third of the width.
    - ``simplecnn``: :func:`_simplecnn_backbone`, for tests and smoke runs.
    """
    from steel.core.keras_env import segmentation_models

    sm = segmentation_models()
    backbones = sm.Backbones
    if "mobilenetv2_035" not in backbones._models_update:
        base_fn, base_pre = backbones.get("mobilenetv2")
        backbones._models_update["mobilenetv2_035"] = [functools.partial(base_fn, alpha=0.35), base_pre]
        backbones._default_feature_layers["mobilenetv2_035"] = backbones._default_feature_layers["mobilenetv2"]
    if "simplecnn" not in backbones._models_update:
        backbones._models_update["simplecnn"] = [_simplecnn_backbone, _unit_preprocessing]
        backbones._default_feature_layers["simplecnn"] = tuple(
            f"simplecnn_block{i}_relu" for i in range(len(_SIMPLECNN_SEG_FILTERS), 1, -1))
    return sm


# ---------------------------------------------------------------------
#  Registry of the six models
# ---------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "classifier" | "segmenter" | "unified"
    outputs: int
    builder: Callable[[str, dict, str | None], Any]  # (name, resolved spec, Keras weights arg) -> Model
    description: str


_BUILDERS = {"classifier": _build_classifier, "segmenter": _build_segmenter, "unified": _build_unified}
_OUTPUTS = {"binary": 1, "multilabel": 4, UNIFIED: 5}  # segmenters: one mask channel
_DESCRIPTIONS = {
    "binary": "defect / no defect, trained on all images",
    "multilabel": "which of the 4 classes, trained on defect images only",
    **{f"seg{k}": f"U-Net mask of class {k}, trained on images with class {k}" for k in CLASSES},
    UNIFIED: "one network: 4-class U-Net + any-defect/4-class head, trained on all images",
}
# Each model's kind is steel.core.names.MODEL_KINDS's; the registry adds how to build it.
REGISTRY: dict[str, ModelEntry] = {
    name: ModelEntry(name, kind, _OUTPUTS.get(name, 1), _BUILDERS[kind], _DESCRIPTIONS[name])
    for name, kind in MODEL_KINDS.items()
}


# ---------------------------------------------------------------------
#  Public factory
# ---------------------------------------------------------------------

def build(name: str, encoder: str | None = None, input_size=None, encoder_weights: str | None = None,
          decoder_filters=None, dense_units=None, preprocessing: str | None = None):
    """Build one of the six cascade models (uncompiled ``tf_keras.Model``).

    Args:
        name: one of ``binary``, ``multilabel``, ``seg1``, ``seg2``, ``seg3``, ``seg4``, ``unified``
            (U-Net settings: encoder, input size, decoder filters as the segmenters).
        encoder: backbone name. Classifiers: ``xception`` (default, the seed), ``efficientnetb0``,
            ``efficientnetb1``, ``mobilenetv2`` (alpha 1.0), ``mobilenetv2_035`` (alpha 0.35),
            ``simplecnn`` (4 conv blocks: tests and the CPU quickstart). U-Nets: ``efficientnetb1`` (default, the seed),
            ``efficientnetb0``, ``efficientnetb2``, ``efficientnetb3``, ``mobilenetv2``,
            ``mobilenetv2_035``, ``resnet18``, ``resnet34``, ``simplecnn`` (tests, CPU quickstart).
        input_size: ``(H, W)`` of the network input; default ``(256, 512)`` for classifiers and
            ``(256, 1600)`` for U-Nets. U-Net sides must be divisible by 32.
        encoder_weights: ``imagenet`` (default; downloaded by Keras, needs internet), ``none``
            (random init; tests, quickstart, and every bundle reload) or the path/URI of an ``.h5``
            file with encoder weights (downloaded to a temporary file first when it is on S3).
        decoder_filters: U-Nets only: 5 filter counts of the decoder blocks, default
            ``(256, 128, 64, 32, 16)``; tiny test setting ``(16, 8, 8, 4, 4)``.
        dense_units: classifiers only: widths of the relu Dense layers of the head, default
            ``(1024, 512, 64)``; every layer but the last is followed by BatchNorm and Dropout 0.3.
        preprocessing: the input scaling the model is trained and run with (checked here, applied
            outside the network by ``steel.data.images.preprocess``); default: the encoder's.

    Returns:
        ``tf_keras.Model`` named ``name``: input float32 ``(H, W, 3)`` scaled per ``preprocessing``; output
        ``(1,)`` / ``(4,)`` sigmoid probabilities for classifiers, ``(H, W, 1)`` sigmoid mask for
        U-Nets, ``[cls (5,), mask (H, W, 4)]`` for ``unified``; always float32.

    Raises:
        ValueError: unknown model or encoder (the message lists the allowed values), bad input size,
            a missing weights file, or a setting that does not apply to the model kind.
    """
    spec = resolve_spec(name, encoder, input_size, encoder_weights, decoder_filters, dense_units, preprocessing)
    with _local_weights(spec["encoder_weights"]) as weights:
        model = REGISTRY[name].builder(name, spec, weights)
    if spec["encoder_weights"] == "none":
        set_bn_momentum(model, FROM_SCRATCH_BN_MOMENTUM)
    return model


def set_bn_momentum(model, momentum: float) -> int:
    """Set the moving-average momentum of every BatchNormalization layer; returns how many.

    Keras' encoders use 0.99 (MobileNetV2, EfficientNet: 0.999 in places) because they expect
    ImageNet statistics to start from. Trained from scratch for a few hundred steps, such moving
    averages are still mostly their initial values (mean 0, variance 1) at validation time, and the
    network predicts one class for everything; 0.9 lets them follow the data within ~20 steps.
    It only changes training dynamics: no weights, parameter counts or inference results.
    """
    from steel.core.keras_env import keras

    count = 0
    for layer in model.submodules:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            count += 1
    return count


def model_config(name: str, train_cfg):
    """The ``ModelConfig`` section of ``train_cfg`` that applies to ``name`` (classifier or segmenter)."""
    return train_cfg.section(name)


def model_spec(name: str, train_cfg) -> dict:
    """Resolved architecture spec of ``name`` under ``train_cfg`` (what the bundle manifest stores)."""
    mc = model_config(name, train_cfg)
    return resolve_spec(name, mc.encoder, mc.input_size, mc.encoder_weights, mc.decoder_filters,
                        mc.dense_units, mc.preprocessing)


def build_from_config(name: str, train_cfg):
    """``build(name, **model_spec(name, train_cfg))``: the model a training run with ``train_cfg`` uses."""
    return build(name, **model_spec(name, train_cfg))


def build_from_spec(name: str, spec: dict, encoder_weights: str | None = "none"):
    """Rebuild ``name`` from a stored spec; ``encoder_weights`` overrides the spec's (``none``: never download)."""
    kwargs = {k: spec.get(k) for k in SPEC_KEYS}
    missing = [k for k in ("encoder", "input_size") if kwargs[k] is None]
    if missing:
        raise ValueError(f"spec of model {name!r} lacks {', '.join(missing)}: {spec!r}")
    if encoder_weights is not None:
        kwargs["encoder_weights"] = encoder_weights
    return build(name, **kwargs)


__all__ = [
    "REGISTRY", "CLASSIFIER_ENCODERS", "SEGMENTER_ENCODERS", "SPEC_KEYS",
    "build", "build_from_config", "build_from_spec", "model_spec", "model_config", "resolve_spec",
    "DEFAULT_PREPROCESSING", "num_outputs",
]
