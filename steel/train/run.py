"""``steel train``: the driver. Labels and split, **one** Ray Train run for every model to train, then the bundle.

:func:`train_models` reads the labels and the seed's split, skips the models the bundle already holds
with the same training key, and trains the rest one after the other in one Ray Train run
(:func:`train_group`: a ``DataParallelTrainer`` with steel's TensorFlow backend,
:mod:`steel.train.backend`, running :func:`steel.train.loop.train_loop` on every worker). Then each
model's best weights go into the bundle with its history (:mod:`steel.train.history`). A run that
fails still hands its finished models to the bundle (the driver reads its newest checkpoint,
:mod:`steel.train.checkpoints`), so they are not trained again.

One run for all the models: each model's own trainer paid a worker group start, a TensorFlow import
per worker and a strategy set-up (25-40 s per model here); one run pays them once. Every model's
datasets are given to the run (``<model>_train``, ``<model>_val``); a worker reads a model's shards
only when it reaches that model. Models train one after the other, never side by side: each uses
every worker (and GPU) of the cluster.

Overhead against a plain Keras ``fit`` (``bench/bench_train_overhead.py``):

- **Worker cache** (``train.worker_cache_mb``, on when each worker's share fits): Ray Data reads and
  decodes the images once (``steel.train.data.decode_batch``: uint8 at the model's size); each
  worker keeps its shard's rows and every epoch draws a new order and augments from memory
  (:func:`steel.train.inputs.cached_dataset`). Without it, every epoch re-runs the Ray Data pipeline.
- **One local worker** (``train.one_local_worker``): on a Ray that ``steel train`` started itself
  (one machine), one worker with all the workers' CPUs and their global batch replaces
  ``num_workers`` workers that would only share the same cores (:func:`local_train_config`).
- **Report poll**: Ray Train's controller takes a worker's ``report`` only when it polls the
  workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s) and the worker's next report waits for
  that; :func:`train_group` sets 0.25 s unless the variable is set, so a short epoch does not wait.
- ``train.max_steps_per_epoch`` is applied by ``Dataset.limit`` in the driver (never by a worker
  stopping early, which would leave the others waiting at the all-reduce).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from steel.core import faults, s3
from steel.data.labels import load_splits
from steel.train.backend import tensorflow_backend_config
from steel.train.checkpoints import (
    checkpoint_states,
    earlier_progress,
    group_run_name,
    latest_checkpoint,
    load_trained,
    other_runs,
    train_key,
)
from steel.train.history import write_history
from steel.train.loop import train_loop
from steel.train.schedule import scaled_lr

log = logging.getLogger(__name__)

REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"  # Ray's default: 2 s


def pos_weights(train_rows, max_weight: float) -> list[float]:
    """Positive weights of the unified head's 5 outputs (any defect, classes 1..4) from the training
    rows: ``neg / pos`` clipped to ``[1, max_weight]`` (a class absent from the rows gets ``max_weight``).

    Class imbalance is handled here, in the loss, rather than by sampling: every image is seen once
    per epoch (clean ones teach "no defect"), and the few class-2 positives weigh like the many
    negatives, up to the cap (an uncapped 1:300 weight makes the early epochs unstable).
    """
    cols = ["hasDefect", "hasDefect_1", "hasDefect_2", "hasDefect_3", "hasDefect_4"]
    n = len(train_rows)
    out = []
    for c in cols:
        pos = float(train_rows[c].sum())
        out.append(float(max_weight) if pos == 0 else float(min(max(( n - pos) / pos, 1.0), max_weight)))
    return out


# ---------------------------------------------------------------------------------------------
#  Driver side


def _steps(rows: int, workers: int, batch: int) -> int:
    """Batches each worker gets from an equal split of ``rows`` rows (last batch may be partial)."""
    return math.ceil((rows // workers) / batch)


def plan(name: str, sizes: dict[str, int], train_cfg) -> dict:
    """Rows used, steps per epoch and validation steps for ``name`` under ``train_cfg``."""
    workers, batch = train_cfg.num_workers, train_cfg.batch_for(name)
    train_rows = sizes["train"]
    if train_rows < workers:
        raise ValueError(f"model {name}: {train_rows} training images for {workers} workers; "
                         "need at least one image per worker")
    if train_cfg.max_steps_per_epoch:
        train_rows = min(train_rows, train_cfg.max_steps_per_epoch * batch * workers)
    val_rows = sizes.get("val", 0)
    split_val = val_rows >= workers
    val_steps = _steps(val_rows, workers, batch) if split_val else math.ceil(val_rows / batch)
    # Worker-side cache (train.worker_cache_mb): the decoded rows one worker holds, train + val.
    from steel.train.data import decoded_bytes_per_row

    held = train_rows // workers + (val_rows // workers if split_val else val_rows)
    cache_mb = held * decoded_bytes_per_row(name, train_cfg) / 2**20
    return {"train_rows": train_rows, "steps_per_epoch": _steps(train_rows, workers, batch),
            "val_rows": val_rows, "val_steps": val_steps, "split_val": split_val,
            "images_per_epoch": (train_rows // workers) * workers,
            "cache_mb": round(cache_mb, 1), "cache": 0 < cache_mb <= train_cfg.worker_cache_mb}


def local_train_config(train_cfg):
    """``train_cfg`` for a Ray that this process started on one machine (``train.one_local_worker``).

    There, ``num_workers`` CPU workers only share the same cores: each runs its own TensorFlow and
    they all-reduce every step, and BatchNorm sees per-worker batches. One worker with all their CPUs
    and their global batch (``per_worker_batch x num_workers``, so the same learning rate under the
    linear scaling rule) trains the same model without that. GPU training and joined clusters keep
    ``num_workers``. Returns ``train_cfg`` itself when nothing changes.
    """
    import dataclasses

    from steel.core.ray_session import started_local

    n = train_cfg.num_workers
    if not train_cfg.one_local_worker or n == 1 or train_cfg.use_gpu or not started_local():
        return train_cfg

    def kind(mc):
        return mc if mc.per_worker_batch is None else dataclasses.replace(mc, per_worker_batch=mc.per_worker_batch * n)

    return dataclasses.replace(train_cfg, num_workers=1, cpus_per_worker=train_cfg.cpus_per_worker * n,
                               per_worker_batch=train_cfg.per_worker_batch * n,
                               classifier=kind(train_cfg.classifier), segmenter=kind(train_cfg.segmenter))


def _storage(uri: str):
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: on S3 a pyarrow filesystem whose
    ``create_dir`` sends nothing (``steel.core.s3.PrefixOnlyHandler``: Ray Train creates directories
    before every checkpoint, and pyarrow would ask HeadBucket, which the training role may not)."""
    from steel.core import s3, storage

    if storage.is_s3(uri):
        _, path = storage.resolve(uri)
        return path, s3.prefix_only_filesystem(path.split("/", 1)[0])
    path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    os.makedirs(path, exist_ok=True)
    return path, None


def oversample_rare(splits: dict, name: str, workers: int) -> dict:
    """Repeat ``name``'s training rows when there are fewer than workers.

    Every worker must get at least one image per epoch (MWMS steps in lockstep). A rare class on a
    small dataset (class 2 is ~3% of defect images) can have a single training image; repeating it
    lets the model train (and says so) instead of failing the whole run. No rows at all is an error.
    """
    import pandas as pd

    from steel.train import data as train_data

    rows = train_data.model_rows(splits["train"], name)
    if len(rows) == 0:
        raise ValueError(f"model {name}: no training images for it in the train split; add labelled "
                         "images of that class or leave the model out of train.models")
    if len(rows) >= workers:
        return splits
    repeats = math.ceil(workers / len(rows))
    print(f"[{name}] only {len(rows)} training image(s) for {workers} workers: repeating them {repeats}x",
          flush=True)
    return {**splits, "train": pd.concat([splits["train"], *[rows] * (repeats - 1)], ignore_index=True)}


def train_group(cfg, names: list[str], splits: dict, images_uri: str, fault: dict | None = None,
                keys: dict[str, str] | None = None) -> dict:
    """Train ``names`` one after the other in **one** Ray Train run (one worker group, one TensorFlow
    start per worker, one checkpoint series); returns ``{"checkpoint", "states", "plans", "seconds",
    "run"}`` (``states``: per model, its final state; ``seconds``: the whole run).

    ``keys``: each model's :func:`train_key` (default: computed from ``cfg`` and ``splits``). The
    run lives in ``<train.output>/<group_run_name>``; its checkpoints hold every model's state, so a
    retried worker group or a re-run of the same command continues the unfinished model and does not
    train the finished ones again.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from steel.core import storage
    from steel.core.keras_env import runtime_env
    from steel.data import labels as dataset
    from steel.train import data as train_data

    tc = cfg.train
    keys = keys or {n: train_key(n, cfg, dataset.fingerprint(splits)) for n in names}
    run = group_run_name({n: keys[n] for n in names})
    prefix = names[0] if len(names) == 1 else "cascade"
    others = other_runs(tc.output, prefix, run[len(prefix) + 1:])
    if others:
        print(f"[{'+'.join(names)}] {storage.join(tc.output, run)}: training key differs from the earlier run(s) "
              f"{', '.join(others)} (architecture, hyperparameters, augmentation or data changed): their "
              f"checkpoints are not resumed; this run starts from its own folder", flush=True)
    seeds = [] if latest_checkpoint(tc.output, run) else earlier_progress(tc.output, run, {n: keys[n] for n in names})
    if seeds:
        print(f"[{'+'.join(names)}] continuing from earlier runs' checkpoints of the same training: "
              f"{', '.join(f'{n} epoch {e} ({r})' for n, e, r, _ in seeds)}", flush=True)
    entries, datasets, to_split, plans = [], {}, [], {}
    for name in names:
        own = oversample_rare(splits, name, tc.num_workers)
        p = plans[name] = plan(name, train_data.split_sizes(own, name), tc)
        built = train_data.build_datasets(own, images_uri, name, tc, decoded=p["cache"])
        if p["train_rows"] < train_data.split_sizes(own, name)["train"]:
            built["train"] = built["train"].limit(p["train_rows"])
        if not p["val_rows"]:
            built.pop("val", None)
        for split, ds in built.items():
            # Per-epoch progress bars of the ingest pipelines would flood the log; the loop prints epochs.
            ds.context.enable_progress_bars = False
            datasets[f"{name}_{split}"] = ds
            if split == "train" or p["split_val"]:
                to_split.append(f"{name}_{split}")
        entries.append({"name": name, "epochs": tc.epochs_for(name), "steps_per_epoch": p["steps_per_epoch"],
                        "val_steps": p["val_steps"], "cache": p["cache"], "resume_key": keys[name],
                        "pos_weight": pos_weights(splits["train"], tc.max_pos_weight) if name == "unified" else None,
                        "fault": fault if fault and fault.get("model", name) == name else None})
        print(f"[{name}] training: {p['train_rows']} train images ({p['steps_per_epoch']} steps/epoch x "
              f"{tc.num_workers} workers x batch {tc.batch_for(name)}), {p['val_rows']} val images, "
              f"{tc.epochs_for(name)} epochs, {'cached in the workers' if p['cache'] else 'streamed'} "
              f"({p['cache_mb']:.0f} MB decoded per worker), peak lr "
              f"{scaled_lr(tc.lr_for(name), tc.batch_for(name), tc.num_workers, tc.base_batch):.2e}", flush=True)
    storage_path, fs = _storage(tc.output)
    # Ray Train's controller takes a worker's report only when it polls the workers, every 2 s by
    # default, and a worker's next report waits for that (a queue of one): every epoch then costs at
    # least 2 s, most of an epoch on the quickstart. The driver's value reaches the controller.
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    trainer = DataParallelTrainer(
        train_loop,
        backend_config=tensorflow_backend_config(),
        train_loop_config={"train": cfg.to_dict()["train"], "models": entries, "resume_key": run,
                           "seeds": [(n, c) for n, _, _, c in seeds]},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=RunConfig(
            name=run, storage_path=storage_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env=runtime_env(),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=to_split),
    )
    t0 = time.time()
    result = trainer.fit()
    seconds = time.time() - t0
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"models {', '.join(names)}: training produced no checkpoint")
    states = checkpoint_states(checkpoint)
    missing = [n for n in names if n not in states or states[n]["epoch"] < states[n]["epochs"]]
    if missing:
        raise RuntimeError(f"run {run} ended without finishing {', '.join(missing)}")
    return {"checkpoint": checkpoint, "states": states, "plans": plans, "seconds": seconds, "run": run}


def train_one(cfg, name: str, splits: dict, images_uri: str, fault: dict | None = None,
              key: str | None = None) -> dict:
    """Train ``name`` alone; returns ``{"checkpoint", "state", "plan", "seconds", "run"}``
    (:func:`train_group` of one model)."""
    out = train_group(cfg, [name], splits, images_uri, fault, {name: key} if key else None)
    return {"checkpoint": out["checkpoint"], "state": out["states"][name], "plan": out["plans"][name],
            "seconds": out["seconds"], "run": out["run"]}


def _completed(bundle_uri: str, name: str, key: str) -> bool:
    """True when the bundle already holds ``name`` trained with the same ``train_key``."""
    from steel.core import storage
    from steel.model import bundle

    try:
        manifest = bundle.read_manifest(bundle_uri)
    except FileNotFoundError:
        return False
    entry = (manifest.get("models") or {}).get(name) or {}
    metrics = entry.get("metrics") or {}
    return metrics.get("train_key") == key and storage.exists(storage.join(bundle_uri, f"{name}.weights.h5"))


def _check_bundle_kind(bundle_uri: str, names: list[str]) -> None:
    """A bundle holds one kind: the cascade's models or the unified one (a Cascade runs either, not both)."""
    from steel.model import bundle

    try:
        have = list(bundle.read_manifest(bundle_uri)["models"])
    except FileNotFoundError:
        return
    unified = {n == "unified" for n in names}
    if have and len(unified) == 1 and {n == "unified" for n in have} != unified:
        raise ValueError(f"bundle {bundle_uri} holds {', '.join(have)}: it cannot also hold "
                         f"{', '.join(names)} (one bundle, one kind); choose another bundle URI "
                         f"(e.g. --set bundle=...) or remove that one")
    if len(unified) > 1:
        raise ValueError(f"models {', '.join(names)}: train the cascade's models and 'unified' into separate bundles")


def _save_trained(cfg, name: str, checkpoint, state: dict, key: str, fp: str) -> dict:
    """``name``'s best weights from the run's checkpoint into the bundle, with its history files."""
    from steel.model import bundle

    model, spec = load_trained(name, checkpoint, cfg.train)
    best_row = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    metrics = {"monitor": state["monitor"], "best": state["best"], "best_epoch": state["best_epoch"],
               "epochs": state["epoch"], "train_key": key, "data_fingerprint": fp,
               **{k: v for k, v in best_row.items() if k not in ("epoch",)}}
    # History first: the manifest entry written by save_model_to_bundle marks the model complete.
    files = write_history(cfg.bundle, name, state["history"])
    bundle.save_model_to_bundle(cfg.bundle, name, model, spec, metrics, state.get("seconds"),
                                config=cfg.to_dict(), fingerprint=fp)
    return files


def _save_finished(cfg, run: str, names: list[str], keys: dict, fp: str) -> list[str]:
    """After a failed run: the models its newest checkpoint holds as finished, saved to the bundle."""
    try:
        checkpoint = latest_checkpoint(cfg.train.output, run)
        if checkpoint is None:
            return []
        states = checkpoint_states(checkpoint)
        done = [n for n in names if n in states and int(states[n]["epoch"]) >= int(states[n]["epochs"])
                and states[n].get("resume_key") == keys[n]]
        for name in done:
            _save_trained(cfg, name, checkpoint, states[name], keys[name], fp)
        return done
    except Exception as e:  # never hide the run's own error behind this one
        log.warning("could not save the finished models of run %s: %s", run, e)
        return []


def train_models(cfg, models: list[str] | None = None) -> dict[str, dict]:
    """Train ``models`` (default ``cfg.train.models``) in one Ray Train run; returns per-model results.

    Needs a connected Ray (``ray.init`` with ``steel.core.keras_env.runtime_env()``). The models not yet
    in the bundle train one after the other in one Ray Train run (:func:`train_group`:
    ``RunConfig(storage_path=cfg.train.output, name=<group_run_name>)``; re-running the same
    training after a crash continues from its last checkpoint, finished models included; a changed
    architecture, hyperparameter, augmentation or data split trains afresh in a new folder). Then
    each model's best weights go into the bundle at ``cfg.bundle``
    (``steel.model.bundle.save_model_to_bundle``) with ``history/<model>.csv|png`` and ``logs/<model>/``.
    When the run fails, the models it finished are saved to the bundle before the error is raised.
    A model already in the bundle with the same spec, training settings and data split is skipped.
    Result per model: ``{"status": "trained"|"skipped", "best_epoch", "best", "monitor", "epochs",
    "seconds", "history"}``.
    """
    from steel.core import storage
    from steel.core.names import ALL_MODEL_NAMES

    names = list(models or cfg.train.model_names())
    unknown = [n for n in names if n not in ALL_MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(ALL_MODEL_NAMES)}")
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)
    local = local_train_config(cfg.train)
    if local is not cfg.train:
        import dataclasses

        print(f"one machine (a Ray started here): 1 worker with {local.cpus_per_worker} CPUs and batch x"
              f"{cfg.train.num_workers} instead of {cfg.train.num_workers} workers (train.one_local_worker)", flush=True)
        cfg = dataclasses.replace(cfg, train=local)
    _check_bundle_kind(cfg.bundle, names)
    fault = faults.train_fault()
    if cfg.train.use_gpu:  # before reading any data: fail at once when the GPU nodes' TensorFlow sees none
        from steel.core.devices import check_ray_gpus

        check_ray_gpus("train.use_gpu: true", 1)
    splits, fp = load_splits(cfg, report_uri=storage.join(cfg.train.output, "skipped_labels.csv"))
    images_uri = cfg.data.path("train_images")
    print(f"data: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test images "
          f"(fingerprint {fp[:12]}); models: {', '.join(names)}", flush=True)

    results: dict[str, dict] = {}
    keys = {name: train_key(name, cfg, fp) for name in names}
    todo = []
    for name in names:
        if _completed(cfg.bundle, name, keys[name]):
            print(f"[{name}] already in bundle {cfg.bundle} with the same config and data: skipped", flush=True)
            results[name] = {"status": "skipped", "skipped": True, "train_key": keys[name]}
        else:
            todo.append(name)
    if todo:
        run = group_run_name({n: keys[n] for n in todo})
        try:
            out = train_group(cfg, todo, splits, images_uri, fault, keys={n: keys[n] for n in todo})
        except Exception:
            # Keep what the failed run finished: its models go into the bundle now, so that a re-run
            # (even one with another setting for the unfinished model) does not train them again.
            kept = _save_finished(cfg, run, todo, keys, fp)
            if kept:
                print(f"run {run} failed; finished models saved to the bundle: {', '.join(kept)}", flush=True)
            raise
        for name in todo:
            state = out["states"][name]
            results[name] = {"status": "trained", "skipped": False, "best_epoch": state["best_epoch"],
                             "best": state["best"], "monitor": state["monitor"], "epochs": state["epoch"],
                             "seconds": state.get("seconds", out["seconds"]), "history": state["history"],
                             "train_key": keys[name], "checkpoint": out["checkpoint"], "run": out["run"],
                             "files": _save_trained(cfg, name, out["checkpoint"], state, keys[name], fp)}
    _print_summary(results)
    return results


def _print_summary(results: dict[str, dict]) -> None:
    lines = ["", f"{'model':<11}{'status':<9}{'epochs':>7}{'best epoch':>11}  {'best':<22}{'seconds':>9}"]
    for name, r in results.items():
        if r["status"] == "skipped":
            lines.append(f"{name:<11}{'skipped':<9}")
            continue
        best = f"{r['monitor']}={r['best']:.4f}" if r["best"] is not None else "-"
        lines.append(f"{name:<11}{r['status']:<9}{r['epochs']:>7}{str(r['best_epoch']):>11}  {best:<22}"
                     f"{r['seconds']:>9.1f}")
    print("\n".join(lines), file=sys.stdout, flush=True)


__all__ = ["train_models", "train_group", "train_one", "plan", "local_train_config", "oversample_rare", "pos_weights"]
