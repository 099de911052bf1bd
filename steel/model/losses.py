"""The seed's Keras losses and metrics, written with plain TensorFlow ops.

- ``dice_coef`` / ``dice_loss`` / ``bce_dice_loss`` for the U-Nets (the seed's ``dice_coef`` with
  ``smooth=1`` over the whole flattened batch);
- ``precision_m`` / ``recall_m`` / ``f1_m`` for the classifiers (the seed's batch-wise metrics on
  predictions rounded at 0.5).

Every function casts both arguments to float32 first, so they work under the ``mixed_float16``
policy (float16 ``y_pred``) and with integer masks/labels, and they use only ops that run inside
``MultiWorkerMirroredStrategy`` replicas. Keras names history columns after ``__name__``: the
columns are ``dice_coef``, ``dice_loss``, ``precision_m``, ``recall_m``, ``f1_m`` (each prefixed
``val_`` for validation). As in the seed, these are per-batch values that Keras averages over the
batches of an epoch (not an exact epoch-level F1 or Dice).
"""

from __future__ import annotations

SMOOTH = 1.0
EPSILON = 1e-7  # keras.backend.epsilon(), as the seed's K.epsilon()


def _tf():
    """TensorFlow and tf-keras, imported when a loss is first built or run (not when steel is imported)."""
    from steel.core.keras_env import keras, tf

    return tf, keras


def _f32(y_true, y_pred):
    tf, _ = _tf()
    return tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)


def dice_coef(y_true, y_pred, smooth: float = SMOOTH):
    """Soft Dice over the whole flattened batch: ``(2|X*Y| + s) / (|X| + |Y| + s)`` with ``s = 1``."""
    tf, _ = _tf()
    y_true, y_pred = _f32(y_true, y_pred)
    t = tf.reshape(y_true, [-1])
    p = tf.reshape(y_pred, [-1])
    intersection = tf.reduce_sum(t * p)
    return (2.0 * intersection + smooth) / (tf.reduce_sum(t) + tf.reduce_sum(p) + smooth)


def dice_loss(y_true, y_pred):
    """``1 - dice_coef`` (a scalar for the batch)."""
    return 1.0 - dice_coef(y_true, y_pred)


def bce_dice_loss(y_true, y_pred):
    """Binary cross-entropy + Dice loss.

    Returns one value per sample: the sample's mean pixel BCE plus the batch's Dice loss, so Keras'
    ``SUM_OVER_BATCH_SIZE`` reduction (which divides by the *global* batch under a distribution
    strategy) gives ``mean BCE + dice_loss`` exactly as the seed's scalar sum does on one device.
    """
    tf, keras = _tf()
    y_true, y_pred = _f32(y_true, y_pred)
    bce = keras.losses.binary_crossentropy(y_true, y_pred)  # mean over the last axis: (B, ...)
    per_sample = tf.reduce_mean(tf.reshape(bce, [tf.shape(bce)[0], -1]), axis=1)
    return per_sample + dice_loss(y_true, y_pred)


def class_dice_coef(y_true, y_pred, smooth: float = SMOOTH):
    """Mean over the last axis (classes) of each class's soft Dice over the batch.

    The unified model's mask metric and loss: a rare class counts as much as a frequent one, where
    :func:`dice_coef` over all channels at once would be mostly class 3's.
    """
    tf, _ = _tf()
    y_true, y_pred = _f32(y_true, y_pred)
    channels = tf.shape(y_true)[-1]
    t = tf.reshape(y_true, [-1, channels])
    p = tf.reshape(y_pred, [-1, channels])
    dice = (2.0 * tf.reduce_sum(t * p, axis=0) + smooth) / (tf.reduce_sum(t, axis=0) + tf.reduce_sum(p, axis=0) + smooth)
    return tf.reduce_mean(dice)


def present_class_dice_loss(y_true, y_pred, smooth: float = SMOOTH):
    """``1 -`` the mean soft Dice of the classes present in the batch; 0 when none is.

    A class absent from the batch is left out: counted, its Dice ``1 / (sum(p) + 1)`` rewards
    predicting nothing, and a rare class (absent from most batches) learns exactly that: its channel
    saturates at 0 and never recovers (measured on the quickstart: classes 1, 2 and 4 output 0.000
    everywhere). Its false positives are still paid for by the pixel BCE.
    """
    tf, _ = _tf()
    y_true, y_pred = _f32(y_true, y_pred)
    channels = tf.shape(y_true)[-1]
    t = tf.reshape(y_true, [-1, channels])
    p = tf.reshape(y_pred, [-1, channels])
    truth = tf.reduce_sum(t, axis=0)
    dice = (2.0 * tf.reduce_sum(t * p, axis=0) + smooth) / (truth + tf.reduce_sum(p, axis=0) + smooth)
    present = tf.cast(truth > 0, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(present * (1.0 - dice)), tf.reduce_sum(present))


def unified_mask_loss(kind: str):
    """Mask loss of the unified model: per-sample mean pixel BCE (``bce_dice``) + :func:`present_class_dice_loss`."""
    if kind not in ("dice", "bce_dice"):
        raise ValueError(f"unknown segmentation loss {kind!r}; choose from dice, bce_dice")

    def unified_mask_loss(y_true, y_pred):
        tf, keras = _tf()
        y_true, y_pred = _f32(y_true, y_pred)
        dice = present_class_dice_loss(y_true, y_pred)
        if kind == "dice":
            return dice
        bce = keras.losses.binary_crossentropy(y_true, y_pred)
        return tf.reduce_mean(tf.reshape(bce, [tf.shape(bce)[0], -1]), axis=1) + dice

    return unified_mask_loss


def weighted_bce(pos_weight):
    """Binary cross-entropy per sample with a positive weight per output (class imbalance).

    ``-(w_k y log p + (1 - y) log(1 - p))`` averaged over the outputs: with ``w_k = neg_k / pos_k``
    a rare class's few positives weigh as much in the loss as its many negatives.
    """
    tf, _ = _tf()
    weights = tf.constant([float(w) for w in pos_weight], tf.float32)

    def weighted_bce(y_true, y_pred):
        tf, _ = _tf()
        y_true, y_pred = _f32(y_true, y_pred)
        p = tf.clip_by_value(y_pred, EPSILON, 1.0 - EPSILON)
        loss = -(weights * y_true * tf.math.log(p) + (1.0 - y_true) * tf.math.log(1.0 - p))
        return tf.reduce_mean(loss, axis=-1)

    return weighted_bce


def _rounded_count(x):
    """Entries of ``x`` that round to 1 (the seed's Keras metrics count positives at 0.5)."""
    tf, _ = _tf()
    return tf.reduce_sum(tf.round(tf.clip_by_value(x, 0.0, 1.0)))


def recall_m(y_true, y_pred):
    """Recall of predictions rounded at 0.5: ``TP / (P + eps)`` over the batch."""
    y_true, y_pred = _f32(y_true, y_pred)
    return _rounded_count(y_true * y_pred) / (_rounded_count(y_true) + EPSILON)


def precision_m(y_true, y_pred):
    """Precision of predictions rounded at 0.5: ``TP / (predicted P + eps)`` over the batch."""
    y_true, y_pred = _f32(y_true, y_pred)
    return _rounded_count(y_true * y_pred) / (_rounded_count(y_pred) + EPSILON)


def f1_m(y_true, y_pred):
    """Harmonic mean of :func:`precision_m` and :func:`recall_m` (the seed's ``f1_score_m``)."""
    precision = precision_m(y_true, y_pred)
    recall = recall_m(y_true, y_pred)
    return 2.0 * ((precision * recall) / (precision + recall + EPSILON))


CUSTOM_OBJECTS: dict = {f.__name__: f for f in
                        (dice_coef, dice_loss, bce_dice_loss, precision_m, recall_m, f1_m)}
CLASSIFIER_METRICS = (precision_m, recall_m, f1_m)
SEGMENTER_METRICS = (dice_coef,)


def segmenter_loss(kind: str):
    """``"dice"`` -> :func:`dice_loss`, ``"bce_dice"`` -> :func:`bce_dice_loss` (``train.seg_loss``)."""
    losses = {"dice": dice_loss, "bce_dice": bce_dice_loss}
    if kind not in losses:
        raise ValueError(f"unknown segmentation loss {kind!r}; choose from {', '.join(losses)}")
    return losses[kind]


__all__ = ["class_dice_coef", "present_class_dice_loss", "unified_mask_loss", "weighted_bce", "dice_coef", "dice_loss", "bce_dice_loss", "precision_m", "recall_m", "f1_m",
           "CUSTOM_OBJECTS", "CLASSIFIER_METRICS", "SEGMENTER_METRICS", "segmenter_loss"]
