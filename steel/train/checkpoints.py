"""A training run's name, its checkpoints, and finding the progress of earlier runs.

Checkpoint (one per epoch of any model, ``<model>_epoch_NNNN``, ``CheckpointConfig(num_to_keep=2)``):
``state.json`` (every model's epoch, best and history so far), ``<model>/best.weights.h5`` of every
model started (best epoch by :func:`monitor_metric`) and the last ``<model>/model.weights.h5`` of every
model still to be continued (:func:`checkpoint_files`).

The run's name is ``<model>-<train_key>`` for one model, ``cascade-<hash of the models' keys>`` for
several (:func:`group_run_name`): only a checkpoint of the very same training (architecture, every
hyperparameter, augmentation, data split: :func:`train_key`) is resumed; a changed setting trains
afresh in its own folder. A model's progress checkpointed by another run of the same training key
(another set of models) is continued too (:func:`earlier_progress`).
"""

from __future__ import annotations

import json
import os
import shutil

from steel.core.names import is_segmenter

WEIGHTS = "model.weights.h5"
BEST_WEIGHTS = "best.weights.h5"
STATE = "state.json"


def monitor_metric(name: str) -> str:
    """Validation metric that picks the best epoch: ``val_dice_coef`` (U-Nets), ``val_f1_m``
    (classifiers) or, for the unified model, its mask's mean per-class Dice."""
    if name == "unified":
        return "val_mask_class_dice_coef"
    return "val_dice_coef" if is_segmenter(name) else "val_f1_m"


def copy_weights(src: str, dst: str, name: str, files) -> None:
    """``src/<name>/<f>`` -> ``dst/<name>/<f>`` for each of ``files`` that exists."""
    os.makedirs(os.path.join(dst, name), exist_ok=True)
    for f in files:
        if os.path.exists(os.path.join(src, name, f)):
            shutil.copyfile(os.path.join(src, name, f), os.path.join(dst, name, f))


def checkpoint_files(current: str, states: dict, has_best) -> dict[str, list[str]]:
    """Weight files each model of ``states`` keeps in a checkpoint taken while ``current`` trains.

    Every model's best weights (``has_best(model)``); the last weights, with the optimizer's state,
    of every model still to be continued: the current one, or one continued from an earlier run that
    this run has not reached yet. Of a finished model with no best (no epoch had a finite monitored
    value) the last weights stand in for the best.
    """
    out = {}
    for name, state in states.items():
        unfinished = name == current or int(state["epoch"]) < int(state["epochs"])
        best = bool(has_best(name))
        out[name] = [BEST_WEIGHTS] * best + [WEIGHTS] * (unfinished or not best)
    return out


def run_name(name: str, key: str) -> str:
    """Ray Train run (checkpoint folder under ``train.output``) of ``name`` trained with ``key``.

    One folder per :func:`train_key`: a re-run of the same training resumes its checkpoints; any
    change to the architecture, hyperparameters, augmentation or data starts a fresh run beside it.
    """
    return f"{name}-{key}"


def other_runs(output: str, name: str, key: str) -> list[str]:
    """Checkpoint folders of ``name`` under ``output`` trained with another key (or before keys)."""
    import pyarrow.fs as pafs

    from steel.core import storage

    fs, path = storage.resolve(output)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    own = run_name(name, key)
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name != own
                  and (i.base_name == name or i.base_name.startswith(f"{name}-")))


def group_run_name(keys: dict[str, str]) -> str:
    """Ray Train run of the models ``keys`` (``{model: train_key}``) trained together.

    One model: :func:`run_name`. Several: ``cascade-<hash of their names and keys>``: the run resumes
    only a checkpoint of the very same models trained the very same way.
    """
    if len(keys) == 1:
        (name, key), = keys.items()
        return run_name(name, key)
    import hashlib

    payload = json.dumps(sorted(keys.items())).encode()
    return f"cascade-{hashlib.sha256(payload).hexdigest()[:16]}"


def checkpoint_states(checkpoint) -> dict[str, dict]:
    """Every model's state (epoch, epochs, best, history, seconds) in a run's checkpoint."""
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE)) as fh:
            return json.load(fh)["models"]


def earlier_progress(output: str, run: str, keys: dict[str, str]) -> list[tuple]:
    """Progress on ``keys``' models (same model, same :func:`train_key`) that other runs under
    ``output`` checkpointed: ``[(model, epoch, run folder, checkpoint)]``, the furthest one per model.

    A run trains a set of models; when the set changes (a finished model went to the bundle, one
    model was asked for alone), the new run's folder differs, but a model's progress is the same
    training and is continued, not repeated."""
    import pyarrow.fs as pafs

    from steel.core import storage

    fs, path = storage.resolve(output)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    prefixes = tuple(f"{n}-" for n in keys) + ("cascade-",)
    found: dict[str, tuple] = {}
    for info in infos:
        if info.type != pafs.FileType.Directory or info.base_name == run or not info.base_name.startswith(prefixes):
            continue
        checkpoint = latest_checkpoint(output, info.base_name)
        if checkpoint is None:
            continue
        for name, state in checkpoint_states(checkpoint).items():
            epoch = int(state["epoch"])
            if keys.get(name) == state.get("resume_key") and epoch > (found[name][1] if name in found else 0):
                found[name] = (name, epoch, info.base_name, checkpoint)
    return [found[n] for n in keys if n in found]


def latest_checkpoint(output: str, run: str):
    """The newest checkpoint of ``run`` under ``output`` (the most epochs recorded), or None.

    Used after a failed run, whose ``Result`` the driver never gets, to keep what it finished."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from steel.core import storage

    fs, path = storage.resolve(storage.join(output, run))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    best, best_done = None, -1
    for info in infos:
        if info.type != pafs.FileType.Directory or "_epoch_" not in info.base_name:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE}") as fh:
                models = json.loads(fh.read())["models"]
        except (FileNotFoundError, OSError, ValueError, KeyError):
            continue  # a checkpoint still being written when the run died
        done = sum(int(s["epoch"]) for s in models.values())
        if done > best_done:
            best, best_done = Checkpoint(path=info.path, filesystem=fs), done
    return best


def load_trained(name: str, checkpoint, train_cfg, best: bool = True):
    """Rebuild ``name`` (no pretrained download) and load the checkpoint's best (or last) weights."""
    from steel.model import networks as models

    spec = models.model_spec(name, train_cfg)
    model = models.build_from_spec(name, spec, encoder_weights="none")
    with checkpoint.as_directory() as d:
        path = os.path.join(d, name, BEST_WEIGHTS if best else WEIGHTS)
        if not os.path.exists(path):
            path = os.path.join(d, name, WEIGHTS)
        model.load_weights(path)
    return model, spec


def train_key(name: str, cfg, data_fingerprint: str) -> str:
    """Hash of everything that determines a trained model: spec, training settings, data split."""
    import hashlib

    from steel.model import networks as models

    train = cfg.to_dict()["train"]
    # Only what shapes this model: its own epochs count, not the other models' (epochs_by_model);
    # the unified model's loss settings only for it (cascade keys stay what they were before them).
    skip = {"output", "models", "max_failures", "epochs", "epochs_by_model", "kind", "worker_cache_mb",
            "one_local_worker"}
    if name != "unified":
        skip |= {"cls_loss_weight", "max_pos_weight"}
    relevant = {k: v for k, v in train.items() if k not in skip}
    relevant["epochs"] = cfg.train.epochs_for(name)
    payload = json.dumps({"name": name, "spec": models.model_spec(name, cfg.train), "train": relevant,
                          "data": data_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
