"""The one place that prepares the Keras environment.

segmentation-models only works on legacy Keras 2 (the ``tf-keras`` package), and TensorFlow decides
which Keras it uses at its first import. So ``TF_USE_LEGACY_KERAS=1`` and ``SM_FRAMEWORK=tf.keras``
must be in ``os.environ`` before ``import tensorflow`` anywhere in the process: every module of this
project that needs TensorFlow imports it through here (``from steel.core.keras_env import tf, keras``).
Ray workers are separate processes: pass :func:`runtime_env` to Ray so they get the same variables
before any of our code runs.
"""

from __future__ import annotations

import os

ENV_VARS: dict[str, str] = {
    "TF_USE_LEGACY_KERAS": "1",
    "SM_FRAMEWORK": "tf.keras",
}
_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2"}

os.environ.update(ENV_VARS)
for _k, _v in _QUIET.items():
    os.environ.setdefault(_k, _v)


def runtime_env(env_vars: dict[str, str] | None = None, **extra) -> dict:
    """A Ray ``runtime_env`` that gives worker processes the Keras variables (plus ``env_vars``)."""
    merged = {**_QUIET, **ENV_VARS, **(env_vars or {})}
    return {"env_vars": merged, **extra}


import tensorflow as tf  # noqa: E402  (must follow the environment set-up above)
import tf_keras as keras  # noqa: E402


def segmentation_models():
    """Import segmentation_models lazily (it prints a banner and is only needed for the U-Nets)."""
    import segmentation_models as sm

    return sm


__all__ = ["ENV_VARS", "runtime_env", "tf", "keras", "segmentation_models"]
