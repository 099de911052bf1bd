"""Connect to Ray once per process, with the Keras environment for every worker.

Jobs call ``with ray_session(address, num_cpus=...): ...``. If Ray is already initialised (a test, or
a pipeline running several stages), it is reused and left running; otherwise it is started or joined
here and shut down at the end. Inside ``ray job submit`` RAY_ADDRESS points at the job's cluster, so
``address=None`` joins it; on a laptop ``None`` starts a local Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)


def local_cpus(cfg=None) -> int:
    """Logical CPUs for a Ray started on this machine.

    Ray Train workers each hold their CPUs for the whole run, and Ray Data needs at least one more to
    read and augment the images they consume: with 2 workers on a 2-core laptop, a Ray that
    advertises only the 2 physical cores never schedules a read task and training waits forever.
    So a local Ray advertises at least workers x cpus_per_worker + 2 logical CPUs (the OS shares the
    physical cores among them; TensorFlow's thread pools are sized per worker, see steel.train.run).
    """
    need = 4
    if cfg is not None:
        need = max(need, cfg.train.num_workers * cfg.train.cpus_per_worker + 2, cfg.score.actors + 2)
    return max(os.cpu_count() or 1, need)


_started_local = False  # ensure_ray started a one-machine Ray here (no autoscaler can add nodes to it)


def started_local() -> bool:
    """True when this process started its own single-machine Ray (rather than joining a cluster)."""
    return _started_local


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Initialise Ray if needed; returns True if this call started the session."""
    global _started_local
    import ray

    from steel.core.keras_env import runtime_env

    if ray.is_initialized():
        return False
    joining = bool(address) or bool(os.environ.get("RAY_ADDRESS"))
    env = _driver_runtime_env(runtime_env())
    kwargs = {}
    if not joining:
        kwargs = {"num_cpus": num_cpus or local_cpus(), "include_dashboard": False}
        env = {**(env or {}), "worker_process_setup_hook": "steel.core.ray_session.quiet_worker_logs"}
    ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, **kwargs)
    _started_local = not joining
    log.info("Ray resources: %s", ray.cluster_resources())
    return True


# Loggers that flood a local run's console with nothing to act on (a quickstart printed ~700 lines):
# - Ray Train's placement-group cleaner asks the state API (served by the dashboard, which a local
#   session here does not start) whether the train controller is alive, every second, and warns
#   each time it cannot: ~800 lines in one quickstart before this;
# - Ray Data's executor logs three INFO lines per dataset pass, i.e. per epoch per split.
# Warnings and errors of the executor still show; the training loop prints its own epoch lines.
_QUIET_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
}
# Ray Train V2 logs "Reporting training result N: <every metric>" per worker per epoch (the loop's own
# epoch line says the same) through a logger named after its file, not its module.
_RAY_TRAIN_REPORT_LOGGER = ("train", "v2", "_internal", "execution", "context.py")


def quiet_worker_logs() -> None:
    """``worker_process_setup_hook`` of a local session: lowers the loggers above to warnings."""
    import ray

    levels = dict(_QUIET_LOGGERS)
    levels[os.path.join(os.path.dirname(ray.__file__), *_RAY_TRAIN_REPORT_LOGGER)] = logging.WARNING
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _driver_runtime_env(wanted: dict) -> dict | None:
    """The part of ``wanted`` a job's own runtime_env lacks.

    Inside ``ray job submit`` Ray merges the job's runtime_env with the one given to ``ray.init``
    and refuses any key set by both (even to the same value), so only missing variables are added.
    """
    import json

    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job:
        return wanted
    try:
        have = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        have = {}
    missing = {k: v for k, v in wanted["env_vars"].items() if k not in have}
    return {"env_vars": missing} if missing else None


def ensure_ray_for_actors(address: str | None, gpus_per_actor: float, what: str) -> None:
    """Start or join Ray for actors that run the models (:func:`ensure_ray`), and with GPU actors
    check at once that the GPU nodes' TensorFlow sees a GPU (``steel.core.devices.check_ray_gpus``)."""
    ensure_ray(address)
    if gpus_per_actor > 0:
        from steel.core.devices import check_ray_gpus

        check_ray_gpus(f"score.gpus_per_actor > 0 ({what})", gpus_per_actor)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    import ray

    started = ensure_ray(address, num_cpus)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
