"""The Ray Train worker: every model of the run, one after the other, in one process (one TensorFlow start, one strategy).

:func:`train_loop` is a plain function of a config dict (Ray's TensorFlow examples style): threads ->
``MultiWorkerMirroredStrategy`` -> for each model in turn: model in scope -> dataset shard -> one ``fit``
over the remaining epochs, whose epoch-end callback validates, checkpoints and calls ``ray.train.report``.

Multi-worker pitfalls handled here (each hangs or silently wastes data otherwise):

- Every worker must run the same number of steps per epoch, or the gradient all-reduce waits for
  ever: the driver computes them from ``streaming_split(equal=True)``'s share (``steel.train.run.plan``).
- ``ray.train.report`` is a barrier: every worker reports every epoch (only rank 0 attaches the
  checkpoint), and every worker calls ``save_weights`` (non-chief into its own folder).
- A validation split smaller than the worker count would give workers zero rows: then validation is
  not split and every worker evaluates all of it (same values on every worker).
- One ``fit`` for the remaining epochs: a ``fit`` per epoch tears the MWMS input iterators down every
  epoch (4-10 s each on the quickstart).

A retried worker group (``FailureConfig(max_failures)``) or a re-run of the same training reads the
run's checkpoint (:mod:`steel.train.checkpoints`) with ``ray.train.get_checkpoint()``, skips the
finished models and continues the current one at its next epoch; the optimizer step counter is
restored (so the warm-up does not restart), and Adam's moment estimates load with the weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time

from steel.core import faults
from steel.core.names import is_segmenter
from steel.train.checkpoints import BEST_WEIGHTS, STATE, WEIGHTS, checkpoint_files, copy_weights, monitor_metric
from steel.train.inputs import cached_dataset, read_shard, shard_dataset, type_specs
from steel.train.schedule import scaled_lr, warmup_schedule

log = logging.getLogger(__name__)


def _set_threads(cpus: int) -> None:
    from steel.core.keras_env import tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, int(cpus)))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, int(cpus))))
    except RuntimeError as e:  # TF already initialised in this process (e.g. a reused worker)
        log.warning("could not set TensorFlow thread pools: %s", e)


def images_metric():
    """Keras metric ``images``: samples seen this epoch, summed over all workers (checks the sharding)."""
    from steel.core.keras_env import keras, tf

    class Images(keras.metrics.Metric):
        def __init__(self, name="images", **kwargs):
            super().__init__(name=name, **kwargs)
            self.count = self.add_weight(name="count", initializer="zeros", dtype=tf.float32)

        def update_state(self, y_true, y_pred, sample_weight=None):
            self.count.assign_add(tf.cast(tf.shape(y_true)[0], tf.float32))

        def result(self):
            return tf.identity(self.count)

    return Images()


def _epoch_reporter(on_end, on_begin, validate=None):
    """Keras callback: ``on_begin(epoch)`` before each epoch; after it, ``validate()`` (a dict of
    validation metrics, or None) and ``on_end(epoch, logs, seconds, train_seconds)`` (1-based epochs;
    ``train_seconds`` excludes validation)."""
    from steel.core.keras_env import keras

    class EpochReporter(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            on_begin(epoch + 1)
            self._t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            train_seconds = time.time() - self._t0
            if validate is not None:
                logs.update({f"val_{k}": v for k, v in validate().items()})
            on_end(epoch + 1, logs, time.time() - self._t0, train_seconds)

    return EpochReporter()


def compile_model(model, name: str, lr_schedule, seg_loss: str, cls_loss_weight: float = 1.0,
             pos_weight=None):
    from steel.core.keras_env import keras
    from steel.model import losses as km

    if name == "unified":
        # One joint loss: mask loss (per-class Dice, so rare classes count) + weighted head BCE.
        loss = {"cls": km.weighted_bce(pos_weight or [1.0] * 5), "mask": km.unified_mask_loss(seg_loss)}
        metrics = {"cls": [km.f1_m, images_metric()], "mask": [km.class_dice_coef]}
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr_schedule), loss=loss, metrics=metrics,
                      loss_weights={"cls": float(cls_loss_weight), "mask": 1.0})
        return
    if is_segmenter(name):
        loss = km.segmenter_loss(seg_loss)
        metrics = [km.dice_coef, images_metric()]
    else:
        loss = "binary_crossentropy"
        metrics = ["accuracy", km.precision_m, km.recall_m, km.f1_m, images_metric()]
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr_schedule), loss=loss, metrics=metrics)


def _is_better(value: float | None, best: float | None) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return best is None or value > best


def train_loop(config: dict) -> None:
    """One Ray Train worker: the models of ``config["models"]`` one after the other (see the module
    docstring), in this one process: one TensorFlow start and one distribution strategy for all.

    ``config`` keys: ``train`` (``TrainConfig`` as a dict), ``resume_key`` (the run's key),
    ``models``: one dict per model with ``name``, ``epochs``, ``steps_per_epoch``, ``val_steps``
    (0: no validation), ``cache``, ``pos_weight`` (unified only) and ``fault`` (test hook).
    """
    t_start = time.time()
    import ray.train

    from steel.core.config import config_from_dict

    train_cfg = config_from_dict({"train": config["train"]}).train
    _set_threads(train_cfg.cpus_per_worker)

    from steel.core.keras_env import keras, tf

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    names = [m["name"] for m in config["models"]]
    if train_cfg.use_gpu:  # Ray gave this worker a GPU; TensorFlow must be able to use it
        from steel.core.devices import require_gpu

        require_gpu(f"train.use_gpu: true (models {', '.join(names)}, worker {rank})")
    if train_cfg.use_gpu and train_cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    tf.get_logger().setLevel("ERROR")  # MWMS logs every collective at INFO
    # One worker has nothing to all-reduce: the default strategy skips MWMS' collectives. A process
    # creates MWMS once (TensorFlow fixes its collective context): every model of the run shares it.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync != world:  # no TF_CONFIG (tensorflow_backend_config): no all-reduce
        raise RuntimeError(f"worker {rank}: TensorFlow sees {strategy.num_replicas_in_sync} replica(s) in sync "
                           f"for a group of {world} workers: TF_CONFIG was not set up "
                           f"({os.environ.get('TF_CONFIG')!r})")

    work = tempfile.mkdtemp(prefix=f"steel-train-r{rank}-")
    states: dict[str, dict] = {}  # model -> its state (epoch, best, history, ...), from the checkpoint on
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            with open(os.path.join(d, STATE)) as fh:
                saved = json.load(fh)
            if config.get("resume_key") and saved.get("resume_key") != config["resume_key"]:
                # The run folder is named after the key, so this means a folder copied or renamed by hand.
                raise ValueError(
                    f"models {', '.join(names)}: the checkpoint in this run folder has training key "
                    f"{saved.get('resume_key')}, this training {config['resume_key']}; it is not resumed "
                    "(remove the folder to start afresh)")
            for name, state in saved["models"].items():
                copy_weights(d, work, name, (WEIGHTS, BEST_WEIGHTS))
                states[name] = state
    else:
        # A fresh run: a model's progress checkpointed by an earlier run of other models (the same
        # model and training key; found by the driver, :func:`earlier_progress`) is continued.
        wanted = {m["name"]: m.get("resume_key") for m in config["models"]}
        for name, seed in config.get("seeds") or []:
            with seed.as_directory() as d:
                with open(os.path.join(d, STATE)) as fh:
                    state = json.load(fh)["models"][name]
                finished = int(state["epoch"]) >= int(state["epochs"])
                if state.get("resume_key") != wanted.get(name) or (
                        not finished and not os.path.exists(os.path.join(d, name, WEIGHTS))):
                    continue
                copy_weights(d, work, name, (WEIGHTS, BEST_WEIGHTS))
                states[name] = state
    if rank == 0:
        print(f"[train] {world} worker(s) ready in {time.time() - t_start:.1f}s for {', '.join(names)}", flush=True)
    for entry in config["models"]:
        _train_model(entry, train_cfg, strategy, rank, world, work, states, config.get("resume_key"))
        keras.backend.clear_session()  # the next model starts from a clean Keras state
    shutil.rmtree(work, ignore_errors=True)


def _report(name: str, metrics: dict, work: str, states: dict, resume_key, rank: int, epoch: int) -> None:
    """``ray.train.report`` of one epoch of ``name`` (a barrier: every worker calls it); rank 0 attaches
    the run's checkpoint: ``state.json`` (every model's state so far) and the weight files of
    :func:`checkpoint_files`."""
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="steel-ckpt-") as d:
        for other, files in checkpoint_files(name, states, lambda m: os.path.exists(
                os.path.join(work, m, BEST_WEIGHTS))).items():
            copy_weights(work, d, other, files)
        with open(os.path.join(d, STATE), "w") as fh:
            json.dump({"resume_key": resume_key, "models": states}, fh)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"{name}_epoch_{epoch:04d}")


def _train_model(entry: dict, train_cfg, strategy, rank: int, world: int, work: str, states: dict,
                 resume_key) -> None:
    """Train one model of the run in this worker: build and compile it in ``strategy``'s scope,
    continue from its state in ``states`` (a finished model is skipped), fit, report every epoch."""
    t_start = time.time()
    from steel.model import networks as models
    from steel.train.data import finish_kwargs, label_columns

    name = entry["name"]
    epochs = int(entry["epochs"])
    steps = int(entry["steps_per_epoch"])
    val_steps = int(entry["val_steps"])
    state = states.get(name)
    if state and int(state["epoch"]) >= epochs:
        if rank == 0:
            print(f"[{name}] finished before this attempt (epoch {state['epoch']}/{epochs}): not trained again",
                  flush=True)
        return
    import ray.train

    batch = train_cfg.batch_for(name)
    monitor = monitor_metric(name)
    if not val_steps:
        monitor = monitor[len("val_"):]
    peak_lr = scaled_lr(train_cfg.lr_for(name), batch, world, train_cfg.base_batch)
    with strategy.scope():
        model = models.build_from_config(name, train_cfg)
        decay = epochs * steps if train_cfg.lr_schedule == "cosine" else None
        schedule = warmup_schedule(peak_lr, int(round(train_cfg.warmup_epochs * steps)), decay)
        compile_model(model, name, schedule, train_cfg.seg_loss, train_cfg.cls_loss_weight, entry.get("pos_weight"))
    if rank == 0:
        print(f"[{name}] model built in {time.time() - t_start:.1f}s (peak lr {peak_lr:.2e}, {steps} steps/epoch, "
              f"{val_steps} val steps)", flush=True)

    folder = os.path.join(work, name)
    os.makedirs(folder, exist_ok=True)
    best_local = os.path.join(folder, BEST_WEIGHTS)
    start_epoch, best, best_epoch, history, seconds_before = 0, None, None, [], 0.0
    if state:
        with strategy.scope():
            # Build the optimizer's slots first: the .h5 holds Adam's moments too, which then load.
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(folder, WEIGHTS))
        start_epoch = int(state["epoch"])
        best, best_epoch = state.get("best"), state.get("best_epoch")
        history = [h for h in state.get("history", []) if h["epoch"] <= start_epoch]
        seconds_before = float(state.get("seconds", 0.0))
        model.optimizer.iterations.assign(start_epoch * steps)  # warm-up continues, not restarts
        if rank == 0:
            print(f"[{name}] resuming after epoch {start_epoch} (best {monitor}={best} at epoch {best_epoch})",
                  flush=True)

    specs = type_specs(name, models.model_config(name, train_cfg).input_size)
    train_shard = ray.train.get_dataset_shard(f"{name}_train")
    val_shard = ray.train.get_dataset_shard(f"{name}_val") if val_steps else None
    shuffle_buffer = batch * 4 if train_cfg.augment else None
    # One fit() for the remaining epochs over that many passes of the training shard: each pass of
    # its generator is one epoch of the Ray Data shard, and steps_per_epoch (= the shard's batches
    # per pass) keeps Keras' epochs on those boundaries. A fit() per epoch tears the MWMS input iterators down every epoch,
    # which cost 4-10 s per epoch on the quickstart. Validation runs from the epoch callback on a
    # fresh pass of the validation shard (a repeated one lets workers' prefetching reach different
    # epochs of it, and streaming_split then waits for ever at its epoch barrier).
    columns = label_columns(name)
    passes = max(1, epochs - start_epoch)
    validate = None
    if entry.get("cache"):
        # Decoded rows read once, kept here; augmentation and validation run from memory every epoch.
        t_read = time.time()
        rows = read_shard(train_shard)
        val_rows = read_shard(val_shard) if val_shard is not None else None
        if rank == 0:
            print(f"[{name}] cached {len(rows['image'])} train + {len(val_rows['image']) if val_rows else 0} val "
                  f"decoded images per worker in {time.time() - t_read:.1f}s", flush=True)
        train_ds = cached_dataset(strategy, rows, batch, specs, finish_kwargs(name, train_cfg, "train"), shuffle=True,
                           passes=passes, label_columns=columns)
        if val_rows is not None:
            val_ds = cached_dataset(strategy, val_rows, batch, specs, finish_kwargs(name, train_cfg, "val"), shuffle=False,
                             label_columns=columns)

            def validate():
                return model.evaluate(val_ds, steps=val_steps, verbose=0, return_dict=True)
    else:
        train_ds = shard_dataset(strategy, train_shard, batch, specs, shuffle_buffer, passes=passes,
                                label_columns=columns)
        if val_shard is not None:
            def validate():
                val_ds = shard_dataset(strategy, val_shard, batch, specs, None, label_columns=columns)
                return model.evaluate(val_ds, steps=val_steps, verbose=0, return_dict=True)

    def end_of_epoch(epoch: int, logs: dict, seconds: float, train_seconds: float) -> None:
        nonlocal best, best_epoch
        metrics = {k: float(v) for k, v in logs.items()}
        metrics.update(epoch=epoch, seconds=round(seconds, 3),
                       lr=float(schedule(model.optimizer.iterations - 1)),
                       train_seconds=round(train_seconds, 3),
                       images_per_s_per_worker=round(metrics.get("images", metrics.get("cls_images", steps * batch * world)) / world
                                                     / max(train_seconds, 1e-9), 3))
        improved = _is_better(metrics.get(monitor), best)
        if improved:
            best, best_epoch = metrics[monitor], epoch
        history.append(metrics)
        states[name] = {"name": name, "resume_key": entry.get("resume_key"), "epoch": epoch, "epochs": epochs,
                        "best": best, "best_epoch": best_epoch, "monitor": monitor, "history": history,
                        "seconds": round(seconds_before + time.time() - t_start, 3)}
        # Every worker saves (MWMS may run collectives while reading variables); only rank 0 keeps it.
        t_save = time.time()
        model.save_weights(os.path.join(folder, WEIGHTS))
        if improved:
            shutil.copyfile(os.path.join(folder, WEIGHTS), best_local)
        t_report = time.time()
        _report(name, metrics, work, states, resume_key, rank, epoch)
        if rank == 0:
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                             if k not in ("epoch", "seconds") and isinstance(v, float))
            print(f"[{name}] epoch {epoch}/{epochs} {seconds:.1f}s {shown}{' *best*' if improved else ''} "
                  f"(checkpoint: save {t_report - t_save:.1f}s, report {time.time() - t_report:.1f}s)", flush=True)

    reporter = _epoch_reporter(end_of_epoch, lambda epoch: faults.maybe_fail(entry.get("fault"), epoch, rank),
                               validate)
    model.fit(train_ds, epochs=epochs, initial_epoch=start_epoch, steps_per_epoch=steps, verbose=0,
              callbacks=[reporter])
