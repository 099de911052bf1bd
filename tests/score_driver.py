"""A scoring job for the kill tests: scores with the light stand-in predictor on the Ray it runs in.

    python -m tests.score_driver BUNDLE IMAGES OUT      (submitted as a Ray job by tests/test_nightly.py)

Exits 1 when the run reports problems (like ``steel score``). With ``STEEL_SCORE_PAUSE_AT`` set the
run pauses at that point and writes ``<point> <pid>`` to ``STEEL_SCORE_PAUSE_FILE``; the test then
SIGKILLs this process's group (see ``steel.core.faults.pause_point``). ``STEEL_TEST_LOCK_TTL_S``
sets score.lock_ttl_s (default: long, so that only a dead holder's lease is taken over at once).
"""

from __future__ import annotations

import os
import sys

TTL_ENV = "STEEL_TEST_LOCK_TTL_S"


def main(argv: list[str]) -> int:
    bundle, images, out = argv
    import ray
    import ray.cloudpickle

    import steel.core.keras_env  # noqa: F401
    import tests.test_scoring as mod
    from steel.core.config import ScoreConfig
    from steel.score.run import format_summary, score

    ray.cloudpickle.register_pickle_by_value(mod)
    ray.init(log_to_driver=False)
    cfg = ScoreConfig(batch_size=2, images_per_shard=3, lock_ttl_s=float(os.environ.get(TTL_ENV, 600)), retries=1, retry_backoff_s=0.01)
    from steel.score.lease import LeaseLost

    try:
        summary = score(bundle, images, out, cfg, predictor=mod.BrightCascade)
    except LeaseLost as e:
        print("lease lost:", e)
        return 3
    print(format_summary(summary))
    for p in summary["problems"]:
        print("problem:", p)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
