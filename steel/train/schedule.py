"""The learning rate: the linear scaling rule and a warm-up, then constant or cosine decay.

``lr = base_lr * global_batch / base_batch`` where ``global_batch = per_worker_batch * num_workers``
(both per model kind: ``TrainConfig.batch_for`` / ``lr_for``), reached by a linear warm-up over the
first ``warmup_epochs`` epochs (per optimizer step), then constant or, with ``train.lr_schedule:
cosine``, decaying along half a cosine to 0 at the last epoch.
"""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, per_worker_batch: int, num_workers: int, base_batch: int) -> float:
    """Linear scaling rule: ``base_lr * (per_worker_batch * num_workers) / base_batch``."""
    return float(base_lr) * per_worker_batch * num_workers / base_batch


def _warmup_schedule_class():
    from steel.core.keras_env import keras, tf

    class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then constant or cosine decay.

        Warm-up: ``peak_lr * min(1, (step + 1) / warmup_steps)``. With ``decay_steps`` (the total
        number of steps), the rate after warm-up follows half a cosine from ``peak_lr`` down to 0 at
        step ``decay_steps``: large steps early, small ones that settle the weights at the end.
        """

        def __init__(self, peak_lr: float, warmup_steps: int, decay_steps: int | None = None):
            self.peak_lr = float(peak_lr)
            self.warmup_steps = int(warmup_steps)
            self.decay_steps = int(decay_steps) if decay_steps else None

        def __call__(self, step):
            step = tf.cast(step, tf.float32)
            lr = tf.constant(self.peak_lr, tf.float32)
            if self.warmup_steps > 0:
                lr = lr * tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
            if self.decay_steps and self.decay_steps > self.warmup_steps:
                done = (step - float(self.warmup_steps)) / float(self.decay_steps - self.warmup_steps)
                done = tf.clip_by_value(done, 0.0, 1.0)
                lr = lr * 0.5 * (1.0 + tf.cos(math.pi * done))
            return lr

        def get_config(self):
            return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps}

    return WarmupSchedule


def warmup_schedule(peak_lr: float, warmup_steps: int, decay_steps: int | None = None):
    """A Keras ``LearningRateSchedule``: linear warm-up to ``peak_lr`` over ``warmup_steps``, then
    constant, or cosine decay to 0 at step ``decay_steps`` when it is given."""
    return _warmup_schedule_class()(peak_lr, warmup_steps, decay_steps)
