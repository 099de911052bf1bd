"""Smoke check of the image: TensorFlow, tf-keras and segmentation-models import, and (with
--require-gpu) TensorFlow sees a GPU and runs on it. Exit status 0 only when all hold.

    python infra/gpu_smoke.py                 # build time (no GPU on the build machine)
    python infra/gpu_smoke.py --require-gpu   # on a GPU node: docker run --gpus all IMAGE python infra/gpu_smoke.py --require-gpu
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--require-gpu", action="store_true", help="fail unless TensorFlow runs on a GPU")
    args = parser.parse_args(argv)

    import tensorflow as tf

    import steel.core.keras_env as keras_env  # sets TF_USE_LEGACY_KERAS / SM_FRAMEWORK before TensorFlow

    build = tf.sysconfig.get_build_info()
    print(f"tensorflow {tf.__version__} (built for CUDA {build.get('cuda_version', 'none')}, "
          f"cuDNN {build.get('cudnn_version', 'none')}); keras {keras_env.keras.__version__}", flush=True)
    sm = keras_env.segmentation_models()
    gpus = tf.config.list_physical_devices("GPU")
    print(f"GPUs: {[g.name for g in gpus] or 'none'}", flush=True)
    if args.require_gpu and not gpus:
        print("FAIL: no GPU visible to TensorFlow (driver too old for its CUDA, or no --gpus on docker run; "
              "TensorFlow's 'Skipping registering GPU devices' warning above says why)", flush=True)
        return 1
    device = "/GPU:0" if gpus else "/CPU:0"
    with tf.device(device):
        a = tf.random.uniform((2048, 2048))
        t0 = time.perf_counter()
        s = float(tf.reduce_sum(tf.matmul(a, a)))
        mm = time.perf_counter() - t0
        model = sm.Unet("efficientnetb0", classes=1, activation="sigmoid", encoder_weights=None,
                        input_shape=(64, 320, 3))
        out = model(tf.zeros((2, 64, 320, 3)), training=False)
    where = out.device if hasattr(out, "device") else device
    print(f"matmul 2048^2 on {device}: {mm * 1e3:.0f} ms (sum {s:.3g}); Unet forward {tuple(out.shape)} on {where}",
          flush=True)
    if args.require_gpu and "GPU" not in str(where).upper():
        print("FAIL: the model did not run on the GPU", flush=True)
        return 1
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
