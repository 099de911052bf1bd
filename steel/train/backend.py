"""Ray Train's TensorFlow set-up (each worker's ``TF_CONFIG``), without TensorFlow in the trainer's controller.
"""

from __future__ import annotations

import json
import os


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
