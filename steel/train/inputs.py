"""What a training worker feeds Keras: its Ray Data shard, or its cached decoded rows, as a distributed dataset.

Keras' ``fit`` on a plain ``tf.data.Dataset`` under ``MultiWorkerMirroredStrategy`` treats the batch as
*global* and keeps only this worker's ``1/num_workers`` slice of it (``to_tf`` already sets
``AutoShardPolicy.OFF``, which does not stop that re-batching). Ray has already sharded the data, so
both adapters hand Keras a ``strategy.distribute_datasets_from_function`` dataset: each worker's
batch of ``per_worker_batch`` is used whole, with an explicit ``steps_per_epoch``.
"""

from __future__ import annotations

from steel.core.names import is_segmenter


def type_specs(name: str, input_size):
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


def shard_dataset(strategy, shard, batch_size: int, specs, shuffle_buffer: int | None, passes: int = 1,
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


def read_shard(shard) -> dict:
    """Every decoded row of this worker's shard (one pass of it), as one numpy array per column."""
    import numpy as np

    parts: dict[str, list] = {}
    for b in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise RuntimeError("this worker's dataset shard is empty")
    return {k: np.concatenate(v) for k, v in parts.items()}


def cached_dataset(strategy, rows: dict, batch_size: int, specs, finish: dict, shuffle: bool, passes: int = 1,
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
