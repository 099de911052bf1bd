"""No silent CPU: work configured for GPUs fails at once when TensorFlow sees none.

Ray hands a task or actor a GPU when the node advertises one (``num_gpus``), whether or not the
TensorFlow installed there can use it (a CPU-only wheel, missing CUDA libraries, a driver mismatch).
TensorFlow then quietly runs on the CPU, many times slower. Two checks, one implementation:

- :func:`require_gpu` runs where the model runs (every Ray Train worker, every scoring actor): it
  raises :class:`NoGPUError` when ``tf.config.list_physical_devices("GPU")`` is empty.
- :func:`check_ray_gpus` runs in the driver before any work starts: the same check in a one-off Ray
  task that asks for the same GPU share, so it lands on a GPU node of the cluster (the driver itself
  may be a CPU-only head) and the job fails in seconds instead of after building datasets.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class NoGPUError(RuntimeError):
    """GPU work was asked for, but TensorFlow on that machine sees no GPU."""


def visible_gpus() -> list[str]:
    """Names of the GPUs TensorFlow in this process can use."""
    from steel.core.keras_env import tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def require_gpu(what: str) -> list[str]:
    """Raise :class:`NoGPUError` naming ``what`` and this host when TensorFlow sees no GPU here."""
    gpus = visible_gpus()
    if not gpus:
        from steel.core.keras_env import tf

        raise NoGPUError(
            f"{what} asks for a GPU, but TensorFlow {tf.__version__} on host {socket.gethostname()} sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s}, "
            f"built with CUDA: {tf.test.is_built_with_cuda()}). Install a GPU build of TensorFlow with its CUDA "
            f"libraries on the GPU nodes, or set the setting to run on CPU (train.use_gpu: false / "
            f"score.gpus_per_actor: 0).")
    return gpus


def check_ray_gpus(what: str, num_gpus: float) -> list[str]:
    """Driver-side check: run :func:`require_gpu` in a Ray task holding ``num_gpus`` GPUs.

    On a cluster it waits, like the real work would, while there is no GPU (an autoscaler may be
    adding one); on a one-machine Ray this process started, no GPU can appear, so it raises at once.
    Raises :class:`NoGPUError` when the task's TensorFlow sees none.
    """
    import ray

    if not ray.cluster_resources().get("GPU"):
        from steel.core.ray_session import started_local

        if started_local():  # a Ray this process started on one machine: no GPU node can ever join
            raise NoGPUError(f"{what} asks for a GPU, but this machine's Ray has none "
                             f"({socket.gethostname()}: no GPU detected). Set the setting to run on CPU "
                             f"(train.use_gpu: false / score.gpus_per_actor: 0) or join a cluster with GPU nodes.")
        log.warning("%s asks for GPUs but the Ray cluster has none now; waiting for a GPU node", what)
    ref = ray.remote(num_gpus=num_gpus, num_cpus=0, max_retries=0)(require_gpu).remote(what)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), NoGPUError):
            raise NoGPUError(str(e.cause)) from None
        raise


__all__ = ["NoGPUError", "visible_gpus", "require_gpu", "check_ray_gpus"]
