"""bench/bench_unified.py's own arithmetic: the unified model's epoch budget, Dice beside the all-empty
baseline, and interleaved scoring rates (no training, no Ray)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from bench import bench_unified as bu
from steel.data import rle


def test_plan_epochs_fits_the_budget_from_the_cascade_run():
    # seg3: 2 s extra first epoch, then 4 s per epoch on 100 images; overheads 10 s per model, 20 s fixed.
    models = {"binary": {"seconds": 30.0, "epoch_seconds": [10.0, 10.0]},
              "seg3": {"seconds": 10.0 + 6 + 4 * 4, "epoch_seconds": [6.0, 4.0, 4.0, 4.0, 4.0]}}
    stage = 20.0 + 30.0 + 32.0
    epochs, est = bu.plan_epochs(200.0, stage, models, n_train=400, n_seg_train=100)
    assert est["epoch_s"] == pytest.approx(16.0)  # 4 s per 100 images -> 16 s for 400
    assert est["fixed_s"] == pytest.approx(20.0) and est["model_overhead_s"] == pytest.approx(10.0)
    assert est["first_epoch_extra_s"] == pytest.approx(2.0)
    assert epochs == (200 - 20 - 10 - 2) // 16 == 10
    # A budget below the fixed costs still trains one epoch; no seg3 history is an error, not a guess.
    assert bu.plan_epochs(5.0, stage, models, 400, 100)[0] == 1
    with pytest.raises(ValueError, match="no epoch times of seg3"):
        bu.plan_epochs(200.0, stage, {"binary": models["binary"]}, 400, 100)


def test_dice_with_baseline_scores_pred_and_all_empty_on_the_same_pairs():
    mask = np.zeros((256, 1600), np.uint8)
    mask[10:20, 100:200] = 1
    code = rle.encode(mask)
    truth = pd.DataFrame({"ImageId": ["a.jpg"], "ClassId": [3], "EncodedPixels": [code]})
    pred = pd.DataFrame({"ImageId": ["a.jpg"] * 4 + ["b.jpg"] * 4, "ClassId": [1, 2, 3, 4] * 2,
                         "EncodedPixels": ["", "", code, "", "", "", "", code]})
    out = bu.dice_with_baseline(pred, truth)
    assert out["n_images"] == 2
    assert out["per_class"] == {"1": 1.0, "2": 1.0, "3": 1.0, "4": 0.5}  # b.jpg's class 4 is a false positive
    assert out["baseline_per_class"] == {"1": 1.0, "2": 1.0, "3": 0.5, "4": 1.0}
    assert out["mean_dice"] == pytest.approx(7 / 8) and out["baseline"] == pytest.approx(7 / 8)


class _Sleeper:
    def __init__(self, seconds_per_batch: float):
        self.s, self.calls = seconds_per_batch, 0

    def predict(self, images):
        self.calls += 1
        time.sleep(self.s)
        return [{} for _ in images]


@pytest.mark.timeout(30)
def test_interleaved_rates_alternate_and_measure_each_kind():
    images = np.zeros((8, 2, 2, 3), np.uint8)
    slow, fast = _Sleeper(0.02), _Sleeper(0.005)
    out = bu.interleaved_rates({"cascade": slow, "unified": fast}, images, rounds=3, batch=4)
    assert slow.calls == fast.calls == 2 + 3 * 2  # one warm-up pass, then 2 batches per round
    assert [list(r) for r in out["per_round"]] == [["cascade", "unified"], ["unified", "cascade"],
                                                   ["cascade", "unified"]]
    assert out["unified"]["images_per_s"] > 2 * out["cascade"]["images_per_s"]
    assert out["cascade"]["images_per_s"] == pytest.approx(8 / 0.04, rel=0.5)
