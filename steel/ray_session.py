"""Connect to Ray once per process, with the Keras environment for every worker.

Jobs call ``with ray_session(address): ...``. If Ray is already initialised (a test, or a pipeline
calling several stages), it is reused and left running; otherwise it is started or joined here and
shut down at the end. Inside ``ray job submit`` RAY_ADDRESS points at the job's cluster, so
``address=None`` joins it; on a laptop ``None`` starts a local Ray.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> bool:
    """Initialise Ray if needed; returns True if this call started the session."""
    import ray

    from steel.keras_env import runtime_env

    if ray.is_initialized():
        return False
    ray.init(address=address, runtime_env=runtime_env(), log_to_driver=True,
             logging_level=logging.WARNING)
    log.info("Ray resources: %s", ray.cluster_resources())
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None):
    import ray

    started = ensure_ray(address)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
