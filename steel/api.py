"""steel's Python API: each ``steel`` command as a function of a config, returning the run's summary dict.

The ``steel`` command (:mod:`steel.cli`) parses arguments into these calls and prints what they
return; a scheduler or a notebook calls them directly::

    from steel import api

    cfg = api.config("configs/quickstart.yaml", ["train.epochs=2"])
    api.train(cfg)                      # {"bundle": ..., "models": {"binary": {"status": "trained", ...}, ...}}
    summary = api.score(cfg)            # the scoring run's record: images_in, scored, errors, problems, ...
    if summary["problems"]: ...

Every function takes a :class:`steel.core.config.Config` (or a config path) and, where it runs models,
starts or joins Ray for the call (``ray_address``; inside ``ray job submit``, the job's cluster) and
shuts down a Ray it started. Summaries are JSON-ready (``steel ... --json`` prints them).
"""

from __future__ import annotations

from typing import Any

from steel.core import s3
from steel.core.config import Config, load_config


def config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run config: the YAML file at ``path`` (any URI; None: the built-in defaults) with ``key.path=value``
    overrides, checked strictly (:class:`steel.core.config.ConfigError` names a bad key)."""
    return load_config(path, list(overrides))


def _cfg(cfg: Config | str | None) -> Config:
    cfg = cfg if isinstance(cfg, Config) else config(cfg)
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)
    return cfg


def synth(out: str, images: int = 400, test_images: int = 100, seed: int = 0, workers: int | None = None,
          progress: bool = True) -> dict:
    """Write a synthetic Severstal-like dataset (Kaggle layout) at ``out``; :func:`steel.data.synth.write.generate`."""
    from steel.data.synth.write import generate

    return generate(out, images=images, test_images=test_images, seed=seed, workers=workers, progress=progress)


def eda(data: str, out: str, split: str | None = None, samples: int = 3, seed: int = 42, skip_bad: bool = False) -> dict:
    """The exploratory report of a dataset folder into ``out``; :func:`steel.report.eda.run_eda`."""
    from steel.report.eda import run_eda

    return run_eda(data, out, split=split, samples=samples, seed=seed, skip_bad=skip_bad)


def evaluate(submission: str, truth: str, shape: tuple[int, int] | None = None, report: str | None = None,
             images: str | None = None) -> dict:
    """Mean Dice of a submission against truth (:func:`steel.eval.evaluate.evaluate`); with ``report``, the
    report folder too. Returns ``{"mean_dice", "per_class", "n_images", "counts", ...}`` (plus ``report``)."""
    from steel.core.names import SHAPE
    from steel.eval import evaluate as ev

    shape = tuple(shape or SHAPE)
    result = ev.evaluate(submission, truth, shape=shape)
    out = {k: result[k] for k in ("mean_dice", "per_class", "n_images", "n_pairs", "counts")}
    if report:
        if shape != SHAPE:
            raise ValueError(f"a report needs the Severstal image shape {SHAPE}, got {shape}")
        from steel.eval import report as eval_report

        out["report"] = eval_report.write_report(result["pred"], result["truth"], images, report)["report"]
    return out


def train(cfg: Config | str, models: list[str] | None = None, ray_address: str | None = None) -> dict:
    """Train the config's models (or ``models``) into its bundle: :func:`steel.train.run.train_models` in a
    Ray session, generating the synthetic dataset first when ``data.synth`` asks for one.
    Returns ``{"bundle", "models": {name: {"status", "epochs", "best_epoch", "best", "monitor", "seconds",
    "train_key", "run"}}}``."""
    from steel.core.ray_session import ray_session
    from steel.data.synth.write import ensure_dataset
    from steel.train.run import train_models

    cfg = _cfg(cfg)
    if cfg.data.synth is not None:
        ensure_dataset(cfg.data)
    with ray_session(ray_address or cfg.ray_address):
        results = train_models(cfg, models)
    keep = ("status", "epochs", "best_epoch", "best", "monitor", "seconds", "train_key", "run", "files")
    return {"bundle": cfg.bundle, "models": {name: {k: r[k] for k in keep if k in r} for name, r in results.items()}}


def tune(cfg: Config | str, bundle: str | None = None, ray_address: str | None = None, **options: Any) -> dict:
    """Thresholds for the bundle, tuned on the validation split (``tune.mode: fixed``: the seed's fixed
    ones) and written into it; :func:`steel.tune.run.tune` / :func:`~steel.tune.run.write_fixed`.
    ``options``: ``tta``, ``rounds``, ``cache_size``, ``batch_size``, ``full_check``, ``cache_path``,
    ``start`` (a thresholds mapping)."""
    from steel.core.ray_session import local_cpus, ray_session
    from steel.tune import run as tuning

    cfg = _cfg(cfg)
    bundle = bundle or cfg.bundle
    with ray_session(ray_address or cfg.ray_address, num_cpus=local_cpus(cfg)):
        if cfg.tune.mode == "fixed":
            keep = {k: options[k] for k in ("full_check", "batch_size") if k in options}
            return tuning.write_fixed(cfg, bundle_uri=bundle, **keep)
        return tuning.tune(cfg, bundle_uri=bundle, **options)


def score(cfg: Config | str, bundle: str | None = None, images: str | None = None, out: str | None = None,
          thresholds: str | dict | None = None, ray_address: str | None = None) -> dict:
    """Score every image not yet scored under ``images`` (default ``score.images``, else the data's test
    images) into ``out`` (default ``score.out``) with the bundle (default ``bundle_versions``, else
    ``bundle``): :func:`steel.score.run.score`. Returns the run's record; its ``problems`` list says why
    the run must be treated as failed (empty when fine). Raises :class:`steel.score.lease.LeaseHeld`
    when another run holds the output."""
    import ray

    from steel.score.run import score as run_score

    cfg = _cfg(cfg)
    had_ray = ray.is_initialized()
    try:  # Ray starts only once the lease is taken and there is work: a second run exits at once
        return run_score(bundle or cfg.bundle_versions or cfg.bundle, images or cfg.score.images or
                         cfg.data.path("test_images"), out or cfg.score.out, cfg.score, thresholds=thresholds,
                         ray_address=ray_address or cfg.ray_address)
    finally:
        if not had_ray and ray.is_initialized():
            ray.shutdown()


def lease(out: str, break_stale: bool = False) -> dict:
    """The lease of a scoring output (``held``: False when there is none): holder, age by the store's
    clock, TTL, stale or dead. ``break_stale`` removes it when it is stale or its holder is dead (raises
    :class:`steel.score.lease.LeaseHeld` while a live run renews it)."""
    from steel.score import lease as leases

    if break_stale:
        return {"held": False, "broken": leases.break_lease(out)}
    st = leases.status(out)
    return {"held": False, "out": str(out)} if st is None else {"held": True, "out": str(out), **st}


def merge(out: str, to: str, layout: str = "long", fill_errors: bool = False, partial: bool = False) -> dict:
    """One sorted Kaggle-ready CSV from a scoring output's shards; :func:`steel.score.merge.merge`."""
    from steel.score.merge import merge as run_merge

    return run_merge(out, to, layout=layout, fill_errors=fill_errors, partial=partial)


def run(cfg: Config | str, ray_address: str | None = None) -> dict:
    """The whole pipeline (data, split, train, tune, publish, score, evaluate, report), each stage skipped
    when its outputs are already valid; :func:`steel.pipeline.run_pipeline`."""
    from steel.core.ray_session import local_cpus, ray_session
    from steel.pipeline import run_pipeline

    cfg = _cfg(cfg)
    with ray_session(ray_address or cfg.ray_address, num_cpus=local_cpus(cfg)):
        return run_pipeline(cfg)


__all__ = ["config", "synth", "eda", "evaluate", "train", "tune", "score", "merge", "run"]
