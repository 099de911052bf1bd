"""From a bundle to a running cascade: the one way every stage (scoring, tuning, evaluation, serving) builds it.

- :func:`traced_callable`: a Keras model as ``f(batch) -> np.ndarray`` through one ``tf.function`` whose
  input signature leaves the batch size open. The gates hand each model a different number of
  images every batch; ``predict_on_batch`` retraces its graph for each new batch shape (seconds per
  trace for the seed's models), this traces once per model.
- :func:`cascade_from_bundle`: a loaded bundle (or its URI) -> :class:`~steel.model.cascade.Cascade`
  with each model's input size and preprocessing from its spec, the thresholds given or the
  bundle's (else the seed's), and the TTA they were tuned with.
- :class:`BundleCascade`: the picklable factory a Ray actor or a Serve replica calls once to build
  that cascade where it runs (models loaded once per process).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from steel.core import s3
from steel.model import thresholds as th
from steel.model.cascade import Cascade


def to_numpy(out: Any):
    """A model's output as numpy: one array, or a tuple of arrays for a multi-output model (unified)."""
    if isinstance(out, (list, tuple)):
        return tuple(to_numpy(o) for o in out)
    return np.asarray(out.numpy() if hasattr(out, "numpy") else out)


def traced_callable(model: Any) -> Callable[[np.ndarray], Any]:
    """``f(batch) -> np.ndarray`` (a tuple for the unified model) running ``model`` through one
    ``tf.function`` traced once for any batch size. ``model`` must have a known input shape
    (``(None, H, W, 3)``); ``f.model`` is the model."""
    from steel.core.keras_env import tf

    shape = getattr(model, "input_shape", None)
    if not (isinstance(shape, tuple) and len(shape) == 4 and all(v is not None for v in shape[1:])):
        raise ValueError(f"traced_callable needs a model with a known input shape (N, H, W, C), got {shape!r}")
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, *shape[1:]), tf.float32)])

    def call(x: np.ndarray):
        return to_numpy(fn(tf.convert_to_tensor(x, dtype=tf.float32)))

    call.model = model  # type: ignore[attr-defined]
    call.traces = fn.experimental_get_tracing_count  # type: ignore[attr-defined]  (graphs traced so far)
    return call


def cascade_from_bundle(bundle: Any, thresholds: dict | str | None = None, tta: str | Mapping[str, str] | None = None,
                        batch_size: int | None = None, weights: Mapping[str, str | None] | None = None) -> Cascade:
    """The cascade of a loaded ``steel.model.bundle.Bundle`` (or a bundle URI, loaded here).

    ``thresholds``: a mapping or a thresholds URI; default the bundle's ``thresholds.json``, else the
    seed's. ``tta`` defaults to the thresholds' own ``tta`` (what they were tuned with). ``weights``
    (``{model: sha256}``, what the driver read): the loaded bundle must hold exactly these, so a
    folder replaced while a run is under way fails the actor instead of scoring with other models.
    """
    if isinstance(bundle, str):
        from steel.model.bundle import load_bundle

        bundle = load_bundle(bundle)
    if weights is not None:
        check_weights(bundle, weights)
    used = th.resolve(None, getattr(bundle, "thresholds", None) if thresholds is None else thresholds)
    specs = bundle.specs
    missing = [name for name, spec in specs.items() if "input_size" not in spec]
    if missing:
        raise ValueError(f"bundle spec of {missing[0]!r} has no input_size")
    return Cascade({name: traced_callable(model) for name, model in bundle.models.items()},
                   {name: tuple(spec["input_size"]) for name, spec in specs.items()}, used,
                   tta=used.get("tta", "none") if tta is None else tta, batch_size=batch_size,
                   preprocessing={name: spec.get("preprocessing") for name, spec in specs.items()})


def check_weights(bundle: Any, expected: Mapping[str, str | None]) -> None:
    """Raise :class:`~steel.model.bundle.BundleError` unless ``bundle`` holds the models of ``expected``."""
    from steel.model.bundle import BundleError

    got = {name: m.get("sha256") for name, m in bundle.manifest.get("models", {}).items()}
    if got != dict(expected):
        changed = sorted(n for n in set(got) | set(expected) if got.get(n) != expected.get(n))
        raise BundleError(
            f"{bundle.uri}: the bundle changed after this run started (models {', '.join(changed)} differ "
            f"from what the driver read): score from a published version (bundles/versions/<v>/ or a "
            f"CURRENT pointer), which is never rewritten, or run again")


@dataclass
class BundleCascade:
    """Picklable factory: ``BundleCascade(uri, thresholds, tta)()`` loads the bundle where it is called
    (a Ray actor, a Serve replica) and returns its cascade.

    Every stage that runs models takes a factory class of this shape (``(bundle_uri, thresholds, tta,
    endpoint=, threads=, weights=)``, an instance building an object with ``predict(images)`` and ``stats``), so
    a test hands in a light stand-in through the same door.
    """

    bundle_uri: str
    thresholds: dict
    tta: str = "none"
    endpoint: str | None = None  # the driver's S3 endpoint (workers do not share set_endpoint)
    threads: int | None = None  # TensorFlow intra-op threads (CPU actors sharing a node)
    weights: dict | None = None  # {model: sha256} the driver read: the actor must load the same

    def __call__(self) -> Cascade:

        if self.endpoint:
            s3.set_endpoint(self.endpoint)
        if self.threads:
            from steel.core.keras_env import tf

            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
                tf.config.threading.set_inter_op_parallelism_threads(min(2, self.threads))
            except RuntimeError:  # TF already initialised in this worker: keep its pools
                pass
        return cascade_from_bundle(self.bundle_uri, self.thresholds, self.tta, weights=self.weights)


__all__ = ["BundleCascade", "cascade_from_bundle", "check_weights", "traced_callable", "to_numpy"]
