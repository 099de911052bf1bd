"""No silent CPU (steel.core.devices): GPU work where TensorFlow sees no GPU fails at once, saying so.

This machine has no GPU. The integration test starts, in a child process, a local Ray that
*advertises* one logical GPU, which is exactly the failure mode: Ray grants the GPU, TensorFlow
cannot use it. Each of the four checks (scoring and training, driver and worker/actor) must fail
fast with the message, not run on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from steel.core import devices

needs_no_gpu = pytest.mark.skipif(bool(devices.visible_gpus()), reason="TensorFlow sees a GPU here")


@needs_no_gpu
def test_require_gpu_names_the_setting_and_host():
    import socket

    with pytest.raises(devices.NoGPUError) as err:
        devices.require_gpu("train.use_gpu: true (model binary, worker 0)")
    text = str(err.value)
    assert "train.use_gpu: true (model binary, worker 0) asks for a GPU" in text
    assert "sees none" in text and socket.gethostname() in text


SCRIPT = r"""
import json, sys, time
import steel.core.keras_env
import numpy as np
import ray

from steel.core.config import ScoreConfig
from steel.core.keras_env import runtime_env

root, work, bundle = sys.argv[1], sys.argv[2], sys.argv[3]
ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
         runtime_env=runtime_env())


class Constant:
    def predict(self, images):
        return [{"p_defect": 0.0, "p_class": [0.0] * 4, "masks": [""] * 4, "areas": [0] * 4} for _ in images]


class ConstantCascade:  # BundleCascade's shape: (bundle_uri, thresholds, tta, endpoint=, threads=, weights=)
    def __init__(self, bundle_uri, thresholds, tta="none", endpoint=None, threads=None, weights=None):
        pass

    def __call__(self):
        return Constant()


factory = ConstantCascade("", {}, "none")


def attempt(fn):
    t0 = time.time()
    try:
        fn()
        return {"error": None, "seconds": time.time() - t0}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.time() - t0}


out = {}
from steel.score import run as scoring
from steel.score import stages
from steel.core import storage
from steel.core.config import config_from_dict
images = f"{root}/train_images"
cfg = ScoreConfig(gpus_per_actor=1, actors=1, batch_size=2, images_per_shard=4)
# driver check (score) and the actor's own check (the pipeline run without the driver check)
out["score_driver"] = attempt(lambda: scoring.score(bundle, images, f"{work}/scores", cfg, predictor=ConstantCascade))
files = sorted(storage.list_files(images))[:2]
items = [{"shard": "s", "image_id": f.rsplit("/", 1)[-1], "file": f} for f in files]
out["score_actor"] = attempt(lambda: stages.cascade_dataset(items, cfg, ("JPEG",), factory).take_all())

from steel.train import run as training

from steel.data import labels
train = {"output": f"{work}/ckpt", "epochs": 1, "per_worker_batch": 4, "num_workers": 1, "cpus_per_worker": 1,
         "max_failures": 0, "use_gpu": True, "models": ["binary"],
         "classifier": {"encoder": "simplecnn", "input_size": [32, 160], "encoder_weights": "none",
                        "dense_units": [8, 8, 8]}}
tcfg = config_from_dict({"name": "gpu", "data": {"root": root}, "bundle": f"{work}/bundle", "train": train})
out["train_driver"] = attempt(lambda: training.train_models(tcfg))
splits, _ = labels.load_splits(tcfg)
out["train_worker"] = attempt(lambda: training.train_one(tcfg, "binary", splits, images))
print("RESULT " + json.dumps(out))
ray.shutdown()
"""


@needs_no_gpu
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_settings_fail_at_once_where_tensorflow_sees_no_gpu(tmp_path, tiny_bundle):
    from tests.test_train_data import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data", n=8)
    script = tmp_path / "gpu_check.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "work"), tiny_bundle], env=env,
                          capture_output=True, text=True, timeout=280)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    expected = {"score_driver": "score.gpus_per_actor > 0 asks for a GPU",
                "score_actor": "score.gpus_per_actor > 0 (a cascade actor) asks for a GPU",
                "train_driver": "train.use_gpu: true asks for a GPU",
                "train_worker": "train.use_gpu: true (models binary, worker 0) asks for a GPU"}
    for name, text in expected.items():
        got = result[name]
        assert got["error"] and text in got["error"] and "sees none" in got["error"], (name, got)
        assert got["seconds"] < 60, (name, got)  # at once, not after a CPU run or a hang
    # The driver checks stop before any work: nothing written.
    assert not (tmp_path / "work" / "scores" / "shards").exists()
    assert not (tmp_path / "work" / "bundle").exists()


@pytest.mark.timeout(60)
def test_local_ray_without_gpus_fails_at_once(monkeypatch):
    """A one-machine Ray this process started has no autoscaler: no GPU can appear, so no waiting."""
    import ray

    from steel.core import devices, ray_session

    submitted = []
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "remote", lambda *a, **k: submitted.append((a, k)) or (_ for _ in ()).throw(
        AssertionError("a GPU task was submitted")))
    monkeypatch.setattr(ray_session, "_started_local", True)
    with pytest.raises(devices.NoGPUError, match="train.use_gpu: true.*this machine's Ray has none"):
        devices.check_ray_gpus("train.use_gpu: true", 1)
    assert submitted == []
