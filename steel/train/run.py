"""Data-parallel training of the six cascade models on Ray Train (a ``DataParallelTrainer`` with
Ray's TensorFlow setup, :func:`tensorflow_backend_config`).

Two halves:

- :func:`train_loop` runs on every Ray Train worker (Ray's TensorFlow examples style: a plain
  function of a config dict): threads -> ``MultiWorkerMirroredStrategy`` -> then, for each model of
  the run in turn: model in scope -> dataset shard -> one ``fit`` over the remaining epochs, whose
  epoch-end callback validates, checkpoints and calls ``ray.train.report``.
- :func:`train_models` runs in the driver: labels and split, **one** Ray Train run for
  all the models to train (:func:`train_group`), then each model's best weights into the bundle, its
  history (CSV + plot) and TensorBoard logs.

Learning rate: Adam with the *linear scaling rule*, ``lr = base_lr * global_batch / base_batch``
where ``global_batch = per_worker_batch * num_workers`` (both per model kind:
``TrainConfig.batch_for`` / ``lr_for``), reached by a linear warm-up over the first
``warmup_epochs`` epochs (per optimizer step, :class:`WarmupSchedule`), then constant or, with
``train.lr_schedule: cosine``, decaying along half a cosine to 0 at the last epoch.

Multi-worker pitfalls handled here (each hangs or silently wastes data otherwise):

- Every worker must run the same number of steps per epoch, or the gradient all-reduce waits for
  ever. Ray splits each dataset with ``streaming_split(equal=True)`` (``DataConfig``'s default), so
  each worker gets ``rows // num_workers`` rows; the driver computes the steps from that, and
  ``train.max_steps_per_epoch`` is applied by ``Dataset.limit`` in the driver (never by a worker
  stopping early).
- Keras' ``fit`` on a plain ``tf.data.Dataset`` under MWMS treats the batch as *global* and keeps
  only this worker's ``1/num_workers`` slice of it (``to_tf`` already sets ``AutoShardPolicy.OFF``,
  which does not stop that re-batching). Ray has already sharded the data, so the loop hands Keras a
  ``strategy.distribute_datasets_from_function`` dataset: each worker's batch of
  ``per_worker_batch`` is used whole, with an explicit ``steps_per_epoch``.
- ``ray.train.report`` is a barrier: every worker reports every epoch (only rank 0 attaches the
  checkpoint), and every worker calls ``save_weights`` (non-chief into a temp dir).
- A validation split smaller than the worker count would give workers zero rows: then validation is
  not split and every worker evaluates all of it (same values on every worker).

Overhead (issue 12; measured by ``bench/bench_train_overhead.py`` against a plain Keras ``fit``):

- **Worker cache** (``train.worker_cache_mb``, on when each worker's share fits): Ray Data reads and
  decodes the images once (``steel.train.data.decode_batch``: uint8 at the model's size); each
  worker keeps its shard's rows and every epoch draws a new order and augments from memory
  (``finish_batch`` in a prefetched generator). Validation runs from the cached validation rows.
  Without it, every epoch re-runs the Ray Data pipeline (executor start, read, decode, augment) and
  a fresh validation iterator.
- **One local worker** (``train.one_local_worker``): on a Ray that ``steel train`` started itself
  (one machine), one worker with all the workers' CPUs and their global batch replaces
  ``num_workers`` workers that would only share the same cores, all-reduce every step and split
  BatchNorm statistics (:func:`local_train_config`); a single worker uses TensorFlow's default
  strategy, not MWMS.
- **Report poll**: Ray Train's controller takes a worker's ``report`` only when it polls the
  workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s) and the worker's next report waits for
  that; :func:`train_group` sets 0.25 s unless the variable is set, so a short epoch does not wait.

Checkpoint (one per epoch of any model, ``<model>_epoch_NNNN``, ``CheckpointConfig(num_to_keep=2)``):
``state.json`` (every model's epoch, best and history so far), ``<model>/best.weights.h5`` of every
model started (best epoch by ``val_f1_m`` for classifiers, ``val_dice_coef`` for segmenters) and the
current model's last ``<model>/model.weights.h5``. A retried worker group
(``FailureConfig(max_failures)``) or a re-run of the same training (same ``RunConfig(storage_path,
name)``: Train V2 restores the run) reads it with ``ray.train.get_checkpoint()``, skips the finished
models and continues the current one at its next epoch; the optimizer step counter is restored (so
the warm-up does not restart), Adam's moment estimates are not. The run's name is
``<model>-<train_key>`` for one model, ``cascade-<hash of the models' keys>`` for several
(:func:`group_run_name`): only a checkpoint of the very same training (architecture, every
hyperparameter, augmentation, data split) is resumed; a changed setting trains afresh in its own
folder and says so. A run that fails still hands its finished models to the bundle (the driver
reads its newest checkpoint), so they are not trained again.

One run for all the models (issue 12): each model's own ``TensorflowTrainer`` paid a worker group
start, a TensorFlow import per worker and a strategy set-up (25-40 s per model here); one run pays
them once. Every model's datasets are given to the run (``<model>_train``, ``<model>_val``); a
worker reads a model's shards only when it reaches that model.

Models train one after the other, never side by side: each uses every worker (and GPU) of the
cluster; running them concurrently would split the cluster into smaller MWMS groups that each
train slower, contend for the same CPUs for Ray Data, and multiply the failure handling.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from steel.core.names import is_segmenter

log = logging.getLogger(__name__)

WEIGHTS = "model.weights.h5"
BEST_WEIGHTS = "best.weights.h5"
STATE = "state.json"
FAULT_ENV = "STEEL_TRAIN_FAIL_AT"  # test hook: "epoch=E,rank=R,marker=PATH" fails once
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"  # Ray's default: 2 s


def monitor_metric(name: str) -> str:
    """Validation metric that picks the best epoch: ``val_dice_coef`` (U-Nets), ``val_f1_m``
    (classifiers) or, for the unified model, its mask's mean per-class Dice."""
    if name == "unified":
        return "val_mask_class_dice_coef"
    return "val_dice_coef" if is_segmenter(name) else "val_f1_m"


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


def scaled_lr(base_lr: float, per_worker_batch: int, num_workers: int, base_batch: int) -> float:
    """Linear scaling rule: ``base_lr * (per_worker_batch * num_workers) / base_batch``."""
    return float(base_lr) * per_worker_batch * num_workers / base_batch


# ---------------------------------------------------------------------------------------------
#  Worker side


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


def _set_threads(cpus: int) -> None:
    from steel.core.keras_env import tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, int(cpus)))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, int(cpus))))
    except RuntimeError as e:  # TF already initialised in this process (e.g. a reused worker)
        log.warning("could not set TensorFlow thread pools: %s", e)


def _maybe_fail(fault: dict | None, epoch: int, rank: int) -> None:
    """Test hook: raise once at the start of ``epoch`` on ``rank`` (a marker file records it)."""
    if not fault or int(fault["epoch"]) != epoch or int(fault["rank"]) != rank:
        return
    marker = fault.get("marker")
    if marker:
        if os.path.exists(marker):
            return
        with open(marker, "w") as fh:
            fh.write(f"failed at epoch {epoch} on rank {rank}\n")
    raise RuntimeError(f"injected failure at epoch {epoch} on rank {rank} ({FAULT_ENV})")


def parse_fault(text: str | None) -> dict | None:
    """``"epoch=2,rank=1,marker=/tmp/x"`` -> dict (the :data:`FAULT_ENV` test hook)."""
    if not text:
        return None
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ("epoch", "rank", "marker", "model") or not value:
            raise ValueError(f"{FAULT_ENV}: expected epoch=E,rank=R[,marker=PATH][,model=NAME], got {text!r}")
        out[key] = value
    if "epoch" not in out or "rank" not in out:
        raise ValueError(f"{FAULT_ENV}: needs epoch= and rank=, got {text!r}")
    return out


def _type_specs(name: str, input_size):
    from steel.core.keras_env import tf

    h, w = int(input_size[0]), int(input_size[1])
    image = tf.TensorSpec(shape=(None, h, w, 3), dtype=tf.float32, name="image")
    if name == "unified":
        return image, {"cls": tf.TensorSpec(shape=(None, 5), dtype=tf.float32, name="cls"),
                       "mask": tf.TensorSpec(shape=(None, h, w, 4), dtype=tf.float32, name="mask")}
    if is_segmenter(name):
        label = tf.TensorSpec(shape=(None, h, w, 1), dtype=tf.float32, name="label")
    else:
        label = tf.TensorSpec(shape=(None, 4 if name == "multilabel" else 1), dtype=tf.float32, name="label")
    return image, label


def _distributed(strategy, shard, batch_size: int, specs, shuffle_buffer: int | None, passes: int = 1,
                 label_columns=("label",)):
    """This worker's shard as a Keras-ready distributed dataset (no re-batching, no auto-shard).

    ``passes``: the shard is read that many times in a row; every pass calls the generator again,
    which starts the next epoch of the Ray Data shard (a fresh shuffle and augmentation). The count
    must be finite and exact: after the last step the input pipeline prefetches one more element,
    and a pass started by one worker's prefetch alone waits for ever at ``streaming_split``'s epoch
    barrier (every worker must start every epoch).
    """
    image_spec, label_spec = specs
    labels = list(label_columns) if len(label_columns) > 1 else label_columns[0]
    tf_ds = shard.to_tf(
        feature_columns="image", label_columns=labels, batch_size=batch_size,
        feature_type_spec=image_spec, label_type_spec=label_spec,
        local_shuffle_buffer_size=shuffle_buffer,
    )
    if passes > 1:
        tf_ds = tf_ds.repeat(passes)
    return strategy.distribute_datasets_from_function(lambda _ctx: tf_ds)


def _read_shard(shard) -> dict:
    """Every decoded row of this worker's shard (one pass of it), as one numpy array per column."""
    import numpy as np

    parts: dict[str, list] = {}
    for b in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise RuntimeError("this worker's dataset shard is empty")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _cached(strategy, rows: dict, batch_size: int, specs, finish: dict, shuffle: bool, passes: int = 1,
            label_columns=("label",)):
    """This worker's cached decoded rows as a Keras-ready distributed dataset.

    Every pass draws a new order (``shuffle``) and runs :func:`steel.train.data.finish_batch`
    (augmentation, preprocessing) on each batch in a generator that ``prefetch`` overlaps with the
    training step; the batches are the shard's in ``batch_size`` steps (last one partial), as on the
    streaming path. Nothing is read from Ray Data any more, so no epoch barrier applies.
    """
    import numpy as np

    from steel.core.keras_env import tf
    from steel.train.data import finish_batch

    n = len(rows["image"])
    image_spec, label_spec = specs

    def batches():
        order = np.random.default_rng().permutation(n) if shuffle else np.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            out = finish_batch({k: v[idx] for k, v in rows.items()}, **finish)
            labels = out[label_columns[0]] if len(label_columns) == 1 else {c: out[c] for c in label_columns}
            yield out["image"], labels

    tf_ds = tf.data.Dataset.from_generator(batches, output_signature=(image_spec, label_spec))
    if passes > 1:
        tf_ds = tf_ds.repeat(passes)
    tf_ds = tf_ds.prefetch(2)
    return strategy.distribute_datasets_from_function(lambda _ctx: tf_ds)


def _images_metric():
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


def _compile(model, name: str, lr_schedule, seg_loss: str, cls_loss_weight: float = 1.0,
             pos_weight=None):
    from steel.core.keras_env import keras
    from steel.model import losses as km

    if name == "unified":
        # One joint loss: mask loss (per-class Dice, so rare classes count) + weighted head BCE.
        loss = {"cls": km.weighted_bce(pos_weight or [1.0] * 5), "mask": km.unified_mask_loss(seg_loss)}
        metrics = {"cls": [km.f1_m, _images_metric()], "mask": [km.class_dice_coef]}
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr_schedule), loss=loss, metrics=metrics,
                      loss_weights={"cls": float(cls_loss_weight), "mask": 1.0})
        return
    if is_segmenter(name):
        loss = km.segmenter_loss(seg_loss)
        metrics = [km.dice_coef, _images_metric()]
    else:
        loss = "binary_crossentropy"
        metrics = ["accuracy", km.precision_m, km.recall_m, km.f1_m, _images_metric()]
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
                _copy_weights(d, work, name, (WEIGHTS, BEST_WEIGHTS))
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
                _copy_weights(d, work, name, (WEIGHTS, BEST_WEIGHTS))
                states[name] = state
    if rank == 0:
        print(f"[train] {world} worker(s) ready in {time.time() - t_start:.1f}s for {', '.join(names)}", flush=True)
    for entry in config["models"]:
        _train_model(entry, train_cfg, strategy, rank, world, work, states, config.get("resume_key"))
        keras.backend.clear_session()  # the next model starts from a clean Keras state
    shutil.rmtree(work, ignore_errors=True)


def _copy_weights(src: str, dst: str, name: str, files) -> None:
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
            _copy_weights(work, d, other, files)
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
        _compile(model, name, schedule, train_cfg.seg_loss, train_cfg.cls_loss_weight, entry.get("pos_weight"))
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

    specs = _type_specs(name, models.model_config(name, train_cfg).input_size)
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
        rows = _read_shard(train_shard)
        val_rows = _read_shard(val_shard) if val_shard is not None else None
        if rank == 0:
            print(f"[{name}] cached {len(rows['image'])} train + {len(val_rows['image']) if val_rows else 0} val "
                  f"decoded images per worker in {time.time() - t_read:.1f}s", flush=True)
        train_ds = _cached(strategy, rows, batch, specs, finish_kwargs(name, train_cfg, "train"), shuffle=True,
                           passes=passes, label_columns=columns)
        if val_rows is not None:
            val_ds = _cached(strategy, val_rows, batch, specs, finish_kwargs(name, train_cfg, "val"), shuffle=False,
                             label_columns=columns)

            def validate():
                return model.evaluate(val_ds, steps=val_steps, verbose=0, return_dict=True)
    else:
        train_ds = _distributed(strategy, train_shard, batch, specs, shuffle_buffer, passes=passes,
                                label_columns=columns)
        if val_shard is not None:
            def validate():
                val_ds = _distributed(strategy, val_shard, batch, specs, None, label_columns=columns)
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

    reporter = _epoch_reporter(end_of_epoch, lambda epoch: _maybe_fail(entry.get("fault"), epoch, rank),
                               validate)
    model.fit(train_ds, epochs=epochs, initial_epoch=start_epoch, steps_per_epoch=steps, verbose=0,
              callbacks=[reporter])


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
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: explicit pyarrow fs for S3."""
    from steel.core import storage

    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        return path, fs
    path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    os.makedirs(path, exist_ok=True)
    return path, None


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


def tensorflow_backend_config():
    """What Ray's ``TensorflowTrainer`` sets up (each worker's ``TF_CONFIG`` for
    ``MultiWorkerMirroredStrategy``), without importing TensorFlow outside the workers.

    ``ray.train.tensorflow`` imports TensorFlow in its package ``__init__``, so the trainer's controller
    actor, which unpickles the backend config, imported it too: 4-5 s of every run's start (before any
    worker starts) and ~0.5 GB in a process that never runs a model. The classes are defined here, not
    at module level, to keep ``steel`` free of Ray at import time.
    """
    from ray.train.backend import Backend, BackendConfig
    from ray.train.v2._internal.util import TrainingFramework

    def address():
        from ray._common.network_utils import build_address
        from ray.train._internal.utils import get_address_and_port

        return build_address(*get_address_and_port())

    def set_tf_config(addresses, index):
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                              "task": {"type": "worker", "index": index}})

    class TensorflowBackend(Backend):
        def on_start(self, worker_group, backend_config):
            import ray

            addresses = worker_group.execute(address)
            ray.get([worker_group.execute_single_async(i, set_tf_config, addresses, i)
                     for i in range(len(worker_group))])

    class TensorflowBackendConfig(BackendConfig):
        @property
        def backend_cls(self):
            return TensorflowBackend

        @property
        def framework(self):
            return TrainingFramework.TENSORFLOW

    return TensorflowBackendConfig()


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


def history_frame(history: list[dict]):
    import pandas as pd

    frame = pd.DataFrame(history)
    cols = ["epoch"] + [c for c in frame.columns if c != "epoch"]
    return frame[cols].sort_values("epoch").reset_index(drop=True)


def plot_history(frame, name: str, path: str) -> None:
    """Loss and the monitored metric vs epoch, train and val (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric = monitor_metric(name)[len("val_"):]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", metric)):
        for col, style in ((key, "o-"), (f"val_{key}", "s--")):
            if col in frame:
                ax.plot(frame["epoch"], frame[col], style, label=col)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{name}: {key}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_tensorboard(frame, logdir: str) -> None:
    """Per-epoch scalars (train under ``train/``, val under ``val/``) as TensorBoard event files.

    Written with the low-level ``tf.summary.write`` and TensorBoard's ``scalars`` plugin metadata, so
    the ``tensorboard`` package is needed only to view them, not to train.
    """
    from steel.core.keras_env import tf

    metadata = tf.compat.v1.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"

    writers = {"train": tf.summary.create_file_writer(os.path.join(logdir, "train")),
               "val": tf.summary.create_file_writer(os.path.join(logdir, "val"))}
    for row in frame.to_dict("records"):
        for col, value in row.items():
            if col == "epoch" or value is None or not isinstance(value, (int, float)):
                continue
            split, key = ("val", col[4:]) if col.startswith("val_") else ("train", col)
            with writers[split].as_default():
                tf.summary.write(key, tf.constant(float(value), tf.float32), step=int(row["epoch"]),
                                 metadata=metadata)
    for w in writers.values():
        w.flush()
        w.close()


def write_history(bundle_uri: str, name: str, history: list[dict]) -> dict:
    """``history/<name>.csv`` + ``.png`` and ``logs/<name>/`` (TensorBoard) under the bundle."""
    from steel.core import storage

    frame = history_frame(history)
    with tempfile.TemporaryDirectory(prefix="steel-hist-") as d:
        csv_path = os.path.join(d, f"{name}.csv")
        png_path = os.path.join(d, f"{name}.png")
        frame.to_csv(csv_path, index=False)
        plot_history(frame, name, png_path)
        storage.makedirs(storage.join(bundle_uri, "history"))
        for path in (csv_path, png_path):
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(bundle_uri, "history", os.path.basename(path)), fh.read())
        logs_uri = storage.join(bundle_uri, "logs", name)
        if storage.exists(logs_uri) or storage.list_files(logs_uri, recursive=True):
            storage.delete(logs_uri, recursive=True, missing_ok=True)  # a re-run replaces, not appends
        tb = os.path.join(d, "tb")
        write_tensorboard(frame, tb)
        storage.copy_local_dir_to(tb, logs_uri)
    return {"csv": storage.join(bundle_uri, "history", f"{name}.csv"),
            "png": storage.join(bundle_uri, "history", f"{name}.png"), "logs": logs_uri}


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


def load_splits(cfg) -> tuple[dict, str]:
    """Labels of ``cfg.data``, the seed's split, and its fingerprint."""
    from steel.core import storage
    from steel.data import labels as dataset

    images = cfg.data.path("train_images")
    wide = dataset.load_labels(cfg.data.path("train_csv"), images=images, skip_bad=cfg.data.skip_bad,
                               report_uri=storage.join(cfg.train.output, "skipped_labels.csv")
                               if cfg.data.skip_bad else None)
    splits = dataset.split(wide, seed=cfg.data.seed)
    return splits, dataset.fingerprint(splits)


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
        storage.set_endpoint(cfg.storage_endpoint)
    local = local_train_config(cfg.train)
    if local is not cfg.train:
        import dataclasses

        print(f"one machine (a Ray started here): 1 worker with {local.cpus_per_worker} CPUs and batch x"
              f"{cfg.train.num_workers} instead of {cfg.train.num_workers} workers (train.one_local_worker)", flush=True)
        cfg = dataclasses.replace(cfg, train=local)
    _check_bundle_kind(cfg.bundle, names)
    fault = parse_fault(os.environ.get(FAULT_ENV))
    if cfg.train.use_gpu:  # before reading any data: fail at once when the GPU nodes' TensorFlow sees none
        from steel.core.devices import check_ray_gpus

        check_ray_gpus("train.use_gpu: true", 1)
    splits, fp = load_splits(cfg)
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


__all__ = ["train_loop", "train_models", "train_one", "train_group", "group_run_name", "checkpoint_states",
           "latest_checkpoint", "earlier_progress", "checkpoint_files", "plan", "scaled_lr", "warmup_schedule", "monitor_metric",
           "load_trained", "write_history", "history_frame", "plot_history", "write_tensorboard", "train_key",
           "run_name", "other_runs", "local_train_config",
           "parse_fault", "load_splits", "pos_weights", "FAULT_ENV"]
