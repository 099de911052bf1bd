"""Threshold tuning on cached predictions: exact scoring, improvement, never-worse, and the tune job."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steel.core.names import SHAPE, is_segmenter
from steel.data import rle
from steel.eval import metrics
from steel.eval.evaluator import Evaluator
from steel.eval.predictions import PredictionCache, truth_maps
from steel.model.thresholds import bundle_thresholds, default_thresholds, validate_thresholds
from steel.tune.search import Grids, search
from tests.checks import assert_search_rose

H, W = SHAPE
CS = (16, 100)  # cache resolution in these tests: one cell = 16 x 16 full-resolution pixels
SCALE = (H * W) // (CS[0] * CS[1])


def block_rle(rows: slice, cols: slice) -> str:
    """RLE of a full-resolution rectangle given in cache cells."""
    m = np.zeros((H, W), np.uint8)
    m[rows.start * 16:rows.stop * 16, cols.start * 16:cols.stop * 16] = 1
    return rle.encode(m)


def make_cache(p_defect, p_class, seg_maps, truth_rles) -> PredictionCache:
    n = len(p_defect)
    truth_frac, truth_area = {}, np.zeros((n, 4), np.int64)
    for j, k in enumerate((1, 2, 3, 4)):
        truth_frac[k], truth_area[:, j] = truth_maps([truth_rles[i][j] for i in range(n)], CS)
    return PredictionCache(image_ids=[f"{i}.jpg" for i in range(n)], p_defect=p_defect, p_class=p_class,
                           seg={k: np.asarray(seg_maps[k], np.float16) for k in (1, 2, 3, 4)},
                           truth_frac=truth_frac, truth_area=truth_area)


def gate_set(n=80, seed=0) -> PredictionCache:
    """Half the images have a class-1..4 defect (p_defect 0.82-1.0); clean ones get p_defect 0.55-0.79
    and a confident spurious blob, so the best binary threshold is 0.8."""
    rng = np.random.default_rng(seed)
    defective = np.arange(n) % 2 == 0
    p_defect = np.where(defective, rng.uniform(0.82, 1.0, n), rng.uniform(0.55, 0.79, n)).astype(np.float32)
    p_class = np.full((n, 4), 0.9, np.float32)
    seg = {k: np.zeros((n, *CS), np.float32) for k in (1, 2, 3, 4)}
    truth = [["", "", "", ""] for _ in range(n)]
    for i in range(n):
        k = (i // 2) % 4 + 1  # every class has defective and clean images
        r0, c0 = rng.integers(0, 8), rng.integers(0, 80)
        if defective[i]:
            truth[i][k - 1] = block_rle(slice(r0, r0 + 6), slice(c0, c0 + 15))  # 90 cells = 23,040 px
            seg[k][i, r0:r0 + 6, c0:c0 + 15] = 0.85
        else:
            seg[k][i, r0:r0 + 6, c0:c0 + 15] = 0.85  # false positive
    return make_cache(p_defect, p_class, seg, truth)


def wide_open() -> dict:
    th = default_thresholds()
    for k in range(1, 5):
        th["classes"][str(k)].update(min_area=0, max_area=H * W)
    return th


def brute_force(cache: PredictionCache, th: dict) -> float:
    """Dice at full resolution with nearest-neighbour upsampled masks (exact for block maps)."""
    pred, truth = [], []
    for i, image in enumerate(cache.image_ids):
        for j, k in enumerate((1, 2, 3, 4)):
            ck = th["classes"][str(k)]
            mask = np.kron((cache.seg[k][i].astype(np.float32) >= ck["pixel"]).astype(np.uint8),
                           np.ones((16, 16), np.uint8))
            area = int(mask.sum())
            ok = (cache.p_defect[i] >= th["binary"] and cache.p_class[i, j] >= ck["prob"]
                  and ck["min_area"] <= area <= ck["max_area"])
            pred.append({"ImageId": image, "ClassId": k, "EncodedPixels": rle.encode(mask) if ok else ""})
            tm = np.kron((cache.truth_frac[k][i] > 0.5).astype(np.uint8), np.ones((16, 16), np.uint8))
            truth.append({"ImageId": image, "ClassId": k, "EncodedPixels": rle.encode(tm)})
    return metrics.mean_dice(pd.DataFrame(pred), pd.DataFrame(truth))["mean_dice"]


def test_evaluator_matches_full_resolution_dice_on_block_maps():
    rng = np.random.default_rng(3)
    n = 6
    seg = {k: np.kron(rng.random((n, 4, 10)), np.ones((1, 4, 10))).astype(np.float32) for k in (1, 2, 3, 4)}
    truth = [[block_rle(slice(0, 4), slice(10 * j, 10 * j + 20)) if (i + j) % 3 else "" for j in range(4)]
             for i in range(n)]
    cache = make_cache(rng.random(n).astype(np.float32), rng.random((n, 4)).astype(np.float32), seg, truth)
    ev = Evaluator(cache)
    for trial in range(4):
        th = wide_open()
        th["binary"] = float(rng.choice([0.0, 0.3, 0.6]))
        for k in range(1, 5):
            th["classes"][str(k)].update(prob=float(rng.choice([0.0, 0.4])), pixel=float(rng.choice([0.3, 0.5, 0.7])),
                                         min_area=int(rng.choice([0, 10000, 40000])),
                                         max_area=int(rng.choice([50000, H * W])))
        assert ev.score(th) == pytest.approx(brute_force(cache, th), abs=1e-9)


def test_search_finds_the_binary_threshold_and_raises_dice():
    cache = gate_set()
    start = wide_open()
    result = search(cache, start, rounds=3)
    assert result["thresholds"]["binary"] == pytest.approx(0.8)
    assert result["after"] > result["before"] + 0.1
    assert result["after"] == pytest.approx(1.0)  # the set is separable: every pair right
    assert result["after"] == pytest.approx(Evaluator(cache).score(result["thresholds"]))
    assert any(s["param"] == "binary" for s in result["steps"])


def test_search_moves_gates_that_only_help_together():
    # An under-confident model: p_defect is 0.17 everywhere and the segmenter's maps peak at 0.45 on
    # the true defects. Lowering t_bin alone (pixel 0.5: no masks) or the pixel threshold alone
    # (binary gate shut) changes nothing; the t_bin step re-chooses (t_k, p_k) for each candidate.
    cache = gate_set()
    n = len(cache)
    truth_on = {k: cache.truth_frac[k].astype(np.float32) > 0.5 for k in (1, 2, 3, 4)}
    seg = {k: np.where(truth_on[k], 0.45, 0.02).astype(np.float16) for k in (1, 2, 3, 4)}
    under = PredictionCache(cache.image_ids, np.full(n, 0.17, np.float32), np.full((n, 4), 0.9, np.float32),
                            seg, cache.truth_frac, cache.truth_area)
    result = search(under, wide_open(), rounds=3)
    th = result["thresholds"]
    assert th["binary"] <= 0.17 and all(th["classes"][str(k)]["pixel"] <= 0.45 for k in range(1, 5))
    assert result["before"] == pytest.approx(0.875)  # all-empty: 10 of 80 images per class have it
    assert result["after"] == pytest.approx(1.0)


def test_prob_curve_matches_class_dice():
    cache = gate_set(seed=2)
    rng = np.random.default_rng(2)
    cache.p_class[:] = rng.random(cache.p_class.shape).astype(np.float32)
    ev = Evaluator(cache)
    probs = [0.0, 0.1, float(cache.p_class[3, 1]), 0.5, 0.77, 1.0]
    for t_bin, pixel, lo, hi in ((0.0, 0.5, 0, H * W), (0.8, 0.3, 20000, 30000), (0.9, 0.85, 0, 10)):
        curve = ev.prob_curve(2, t_bin, pixel, lo, hi, probs)
        direct = [ev.class_dice(2, t_bin, q, pixel, lo, hi).mean() for q in probs]
        np.testing.assert_allclose(curve, direct, atol=1e-12)


def test_search_tunes_min_area_against_small_false_positives():
    n = 40
    seg = {k: np.zeros((n, *CS), np.float32) for k in (1, 2, 3, 4)}
    truth = [["", "", "", ""] for _ in range(n)]
    for i in range(n):
        if i % 2 == 0:  # real defect of class 1: 60 cells = 15,360 px (seed max 15,500)
            truth[i][0] = block_rle(slice(2, 8), slice(10, 20))
            seg[1][i, 2:8, 10:20] = 0.9
        else:  # a 3-cell (768 px) speck that the seed's min_area 500 lets through
            seg[1][i, 0, 0:3] = 0.9
    cache = make_cache(np.full(n, 0.9, np.float32), np.full((n, 4), 0.9, np.float32), seg, truth)
    start = default_thresholds()
    result = search(cache, start, rounds=2)
    assert 768 < result["thresholds"]["classes"]["1"]["min_area"] <= 15360
    assert result["per_class_after"][1] == pytest.approx(1.0)
    assert result["per_class_before"][1] == pytest.approx(0.5)


def test_search_from_the_optimum_stays():
    cache = gate_set(seed=5)
    first = search(cache, wide_open(), rounds=4)
    again = search(cache, first["thresholds"], rounds=4)
    assert again["steps"] == []
    assert again["after"] == again["before"] == pytest.approx(first["after"])
    assert again["thresholds"] == first["thresholds"]


def test_plateau_center_takes_the_middle_of_the_longest_tied_run():
    from steel.tune.search import plateau_center

    assert plateau_center([0.1, 0.9, 0.9, 0.9, 0.2]) == 2
    assert plateau_center([0.9, 0.1, 0.9, 0.9, 0.9, 0.9]) == 3  # the longer run, its middle (left of centre)
    assert plateau_center([0.3, 0.5, 0.4]) == 1
    assert plateau_center([0.7, 0.7, 0.1]) == 0


def test_search_puts_a_class_gate_in_the_middle_of_its_plateau():
    """Every class-1 gate from 0.15 to 0.85 separates the images equally well: the search takes the
    middle of that range, not its most permissive end (0.15), which passes the most new false positives."""
    cache = gate_set()
    n = len(cache)
    has1 = cache.truth_area[:, 0] > 0
    p_class = cache.p_class.copy()
    p_class[:, 0] = np.where(has1, 0.9, 0.1)
    split = PredictionCache(cache.image_ids, np.ones(n, np.float32), p_class, cache.seg, cache.truth_frac,
                            cache.truth_area)
    start = wide_open()
    start["binary"] = 0.0
    start["classes"]["1"]["prob"] = 0.0  # every clean image's spurious class-1 blob passes
    grids = Grids(binary=(0.0,), prob=tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)))
    result = search(split, start, grids, rounds=2)
    assert result["per_class_after"][1] == pytest.approx(1.0) and result["per_class_before"][1] < 1.0
    assert result["thresholds"]["classes"]["1"]["prob"] == pytest.approx(0.5)  # 0.15 .. 0.85: its middle


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), t_bin=st.floats(0, 1), prob=st.floats(0, 1), pixel=st.floats(0.05, 0.95),
       min_area=st.integers(0, 20_000))
def test_search_never_lowers_the_score(seed, t_bin, prob, pixel, min_area):
    rng = np.random.default_rng(seed)
    n = 12
    seg = {k: rng.random((n, *CS)).astype(np.float32) ** 3 for k in (1, 2, 3, 4)}
    truth = [[block_rle(slice(0, 3), slice(0, 10)) if rng.random() < 0.3 else "" for _ in range(4)] for _ in range(n)]
    cache = make_cache(rng.random(n).astype(np.float32), rng.random((n, 4)).astype(np.float32), seg, truth)
    start = default_thresholds()
    start["binary"] = t_bin
    for k in range(1, 5):
        c = start["classes"][str(k)]
        c.update(prob=prob, pixel=pixel, min_area=min(min_area, c["max_area"]))
    grids = Grids(binary=(0.2, 0.5, 0.8), prob=(0.3, 0.6), pixel=(0.3, 0.6), min_area=(0, 1000, 5000))
    result = search(cache, start, grids, rounds=2)
    assert_search_rose(result["before"], result["after"], result["steps"])
    assert result["before"] == pytest.approx(Evaluator(cache).score(validate_thresholds(start)))
    assert result["after"] == pytest.approx(Evaluator(cache).score(result["thresholds"]))


def test_cache_round_trip(tmp_path):
    cache = gate_set(n=8)
    cache.meta = {"cache_size": {"1": list(CS)}}
    cache.save(str(tmp_path / "c.npz"))
    back = PredictionCache.load(str(tmp_path / "c.npz"))
    assert back.image_ids == cache.image_ids and back.meta == cache.meta
    np.testing.assert_array_equal(back.seg[3], cache.seg[3])
    assert Evaluator(back).score(wide_open()) == Evaluator(cache).score(wide_open())


# ------------------------------------------------------------------------- the tune job (stub models)

def _stub_index(x):
    return np.clip(np.rint(x[:, 0, 0, 0] * 255 / 20).astype(int) - 1, 0, 7)


def _stub_binary(x):
    return np.where(_stub_index(x) % 2 == 0, 0.9, 0.78)[:, None]


def _stub_multilabel(x):
    out = np.full((len(x), 4), 0.1)
    for row, i in enumerate(_stub_index(x)):
        out[row, (i // 2) % 4] = 0.9
        out[row, (i // 2 + 1) % 4] = 0.9 if i % 2 else 0.1
    return out


def _stub_seg(x):
    out = np.zeros((len(x), 32, 160, 1), np.float32)
    out[:, :, :16] = 0.95
    return out


@dataclass
class StubCascade:
    """Picklable cascade factory (BundleCascade's constructor): stub models, built inside each Ray actor."""

    bundle_uri: str
    thresholds: dict
    tta: str = "none"
    endpoint: str | None = None
    threads: int | None = None
    weights: dict | None = None

    def __call__(self):
        from steel.model.cascade import Cascade

        models = {"binary": _stub_binary, "multilabel": _stub_multilabel, **{f"seg{k}": _stub_seg for k in range(1, 5)}}
        return Cascade(models, {n: (32, 160) for n in models}, self.thresholds, tta=self.tta)


@pytest.fixture(scope="module")
def stub_pickled_by_value():
    """Ray workers unpickle the stub factory without importing tests/."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_cache_key_and_stale_caches(tmp_path, caplog):
    from steel.eval.predictions import cache_key, load_cache

    labels = pd.DataFrame({"ImageId": ["a.jpg", "b.jpg"], **{f"Defect_{k}": ["", "1 5"] for k in (1, 2, 3, 4)}})
    sizes = {k: (16, 100) for k in (1, 2, 3, 4)}
    models = {"models": {"binary": {"sha256": "aa", "spec": {"input_size": [32, 160]}}}}
    key = cache_key(models, "none", sizes, labels)
    cache = gate_set(n=4)
    cache.meta = {"key": key}
    path = str(tmp_path / "c.npz")
    assert load_cache(path, key) is None  # no file yet
    cache.save(path)
    assert load_cache(path, key).image_ids == cache.image_ids  # same key: reused
    retrained = {"models": {"binary": {"sha256": "bb", "spec": {"input_size": [32, 160]}}}}
    other_labels = labels.assign(Defect_2=["", ""])
    for stale, what in ((cache_key(retrained, "none", sizes, labels), "models"),
                        (cache_key(models, "hv", sizes, labels), "tta"),
                        (cache_key(models, "none", {k: (8, 50) for k in (1, 2, 3, 4)}, labels), "cache_size"),
                        (cache_key(models, "none", sizes, other_labels), "labels")):
        caplog.clear()
        assert load_cache(path, stale) is None
        assert f"is stale ({what} changed)" in caplog.text
    PredictionCache(**{**cache.__dict__, "meta": {}}).save(path)  # a cache from before keys existed
    assert load_cache(path, key) is None and "made without a key" in caplog.text


@pytest.mark.timeout(300)
def test_tune_on_ray_actors_writes_thresholds_and_plots(tmp_path, ray_local, stub_pickled_by_value, tiny_bundle):
    cv2 = pytest.importorskip("cv2")
    from steel.core.config import load_config
    from steel.tune.run import tune

    # 8 images: image i has brightness 20 * (i + 1). Even images carry a class-(i//2 % 4 + 1) defect
    # in the left 160 columns; the stub binary says 0.9 for those and 0.78 for clean ones (t_bin 0.8, 0.85
    # and 0.9 separate them: the search takes the middle, 0.85),
    # and every stub segmenter marks the left 160 columns. A 9th labelled image is not a JPEG: skipped.
    root = tmp_path / "data"
    (root / "train_images").mkdir(parents=True)
    ids, truth = [], []
    left = np.zeros((H, W), np.uint8)
    left[:, :160] = 1
    for i in range(8):
        name = f"img{i}.jpg"
        cv2.imwrite(str(root / "train_images" / name), np.full((H, W, 3), 20 * (i + 1), np.uint8))
        ids.append(name)
        row = {"ImageId": name, **{f"Defect_{k}": "" for k in range(1, 5)}}
        if i % 2 == 0:
            row[f"Defect_{(i // 2) % 4 + 1}"] = rle.encode(left)
        truth.append(row)
    (root / "train_images" / "broken.jpg").write_bytes(b"not an image")
    truth.append({"ImageId": "broken.jpg", **{f"Defect_{k}": "" for k in range(1, 5)}})
    labels = pd.DataFrame(truth)

    start = wide_open()
    cfg = load_config(None, [f"data.root={root}", "score.actors=1"])
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)  # a real bundle (its manifest keys the cache); the stubs predict
    summary = tune(cfg, bundle_uri=str(bundle), stamp="stamp-1", start=start, predictor=StubCascade, labels=labels,
                   cache_size=(16, 80), cache_path=str(tmp_path / "cache.npz"), batch_size=3)
    assert summary["cache"] == "computed"
    assert summary["after"] > summary["before"]
    assert summary["thresholds"]["binary"] == pytest.approx(0.85)
    saved = json.loads((bundle / "thresholds.json").read_text())
    assert validate_thresholds(saved)["binary"] == pytest.approx(0.85)
    v = saved["validation"]
    assert v["fingerprint"] == "stamp-1" and v["n_images"] == 8 and v["skipped_images"] == 1
    assert v["after"] == pytest.approx(summary["after"]) and v["before"] == pytest.approx(summary["before"])
    assert v["full_resolution_after"]["mean_dice"] == pytest.approx(1.0)
    assert v["full_resolution_after"]["n_images"] == 8
    # The search scored the deployed cascade's own masks (exact full-resolution tables): same number.
    assert v["deployed_check"]["agree"] and v["after"] == pytest.approx(v["full_resolution_after"]["mean_dice"], abs=1e-9)
    assert v["seed"]["mean_dice"] < v["after"]  # the seed's thresholds, scored on the same images
    assert v["gating"]["multilabel_calls_saved"] == 4  # summed over the actors' batches
    assert sorted(p.name for p in (bundle / "tuning").iterdir()) == [
        "dice_vs_binary.png", *(f"dice_vs_class{k}.png" for k in range(1, 5))]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (bundle / "tuning").iterdir())
    # The actors' cache matches the stubs: binary 0.9 / 0.78, seg maps at (16, 80) with the left 16 columns hot.
    from steel.eval.predictions import PredictionCache as PC

    cache = PC.load(str(tmp_path / "cache.npz"))
    assert cache.image_ids == ids  # labels' order, the broken file left out
    np.testing.assert_allclose(cache.p_defect, [0.9 if i % 2 == 0 else 0.78 for i in range(8)], atol=1e-6)
    assert cache.seg[2].shape == (8, 16, 80) and float(cache.seg[2][0, 0, 0]) == pytest.approx(0.95, abs=1e-3)
    assert cache.meta["skipped"][0]["ImageId"] == "broken.jpg"
    assert cache.exact and cache.full_area.shape == (8, 4, len(cache.full_edges))
    assert cache.full_area[0, 0, list(cache.full_edges).index(np.float32(0.5))] == H * 160  # left 160 columns
    # A second run reuses the cached predictions and, starting from the tuned values, changes nothing.
    again = tune(cfg, bundle_uri=str(bundle), predictor=StubCascade, labels=labels, start=saved,
                 cache_path=str(tmp_path / "cache.npz"), cache_size=(16, 80), full_check=False)
    assert again["cache"] == "reused"
    assert again["changes"] == 0 and again["after"] == pytest.approx(summary["after"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_steel_tune_on_a_tiny_real_bundle(tmp_path, capsys, ray_local):
    """`steel tune` end to end on Ray actors: synthetic data, six tiny untrained Keras models in a real
    bundle; ``--cache`` is reused for the same bundle and recomputed when a model's weights change."""
    from steel.cli import main
    from steel.core.config import load_config
    from steel.core.names import MODEL_NAMES
    from steel.data.synth import write
    from steel.model import bundle
    from steel.model import networks as models
    from steel.model.predictor import cascade_from_bundle

    data = tmp_path / "data"
    write.generate(str(data), images=40, test_images=0, seed=1, workers=1, progress=False)
    tiny_cls = dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none", dense_units=(8,))
    tiny_seg = dict(encoder="mobilenetv2_035", input_size=(32, 160), encoder_weights="none",
                    decoder_filters=(8, 8, 4, 4, 4))
    specs = {n: models.resolve_spec(n, **(tiny_seg if is_segmenter(n) else tiny_cls)) for n in MODEL_NAMES}
    built = {n: models.build(n, **specs[n]) for n in MODEL_NAMES}
    uri = str(tmp_path / "bundle")
    bundle.save_bundle(uri, built, specs, load_config(None))

    # The real Keras models as Cascade.from_bundle wraps them (a traced tf.function per model).
    cas = cascade_from_bundle(SimpleNamespace(models=built, specs=specs, thresholds=None))
    img = np.random.default_rng(0).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    probs = cas.predict_probabilities(img)
    from steel.data.images import to_input

    x, x_seg = to_input(img, specs["binary"]), to_input(img, specs["seg2"])  # seg2: its own preprocessing
    np.testing.assert_allclose(probs["p_defect"], built["binary"](x, training=False).numpy()[:, 0], atol=1e-5)
    np.testing.assert_allclose(probs["seg"][2], built["seg2"](x_seg, training=False).numpy()[..., 0], atol=1e-5)
    assert len(cas.predict(img)) == 2 and len(cas.predict(img[:1])) == 1  # another batch size: no retrace needed

    cache = str(tmp_path / "cache.npz")
    args = ["tune", "--bundle", uri, "--set", f"data.root={data}", "--rounds", "2", "--cache-size", "16", "80",
            "--cache", cache, "--no-full-check"]  # the full-resolution pass on actors: the stub test above
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation mean Dice" in out and "validation predictions: computed" in out
    th = bundle_thresholds(uri)
    v = th["validation"]
    assert_search_rose(v["before"], v["after"], v["changes"])
    assert v["n_images"] >= 4
    assert (tmp_path / "bundle" / "tuning" / "dice_vs_class3.png").exists()
    # The actors computed what the models give in this process (binary probability of each image).
    from steel.data.images import read as read_image
    from steel.eval.predictions import PredictionCache

    first = PredictionCache.load(cache)
    x = to_input(np.stack([read_image(f"{data}/train_images/{i}") for i in first.image_ids[:3]]), specs["binary"])
    np.testing.assert_allclose(first.p_defect[:3], built["binary"](x, training=False).numpy()[:, 0], atol=1e-4)

    assert main(args) == 0  # same bundle, TTA, size, labels: the cache is reused
    assert "validation predictions: reused" in capsys.readouterr().out

    # Retrain one model (new weights, so a new sha256 in the manifest): the cache is stale.
    retrained = models.build("binary", **specs["binary"])
    retrained.set_weights([w + 0.05 for w in built["binary"].get_weights()])
    bundle.save_model_to_bundle(uri, "binary", retrained, specs["binary"])
    assert main(args) == 0
    assert "validation predictions: recomputed" in capsys.readouterr().out
    second = PredictionCache.load(cache)
    assert second.image_ids == first.image_ids and not np.allclose(second.p_defect, first.p_defect)
    np.testing.assert_array_equal(second.p_class, first.p_class)  # the other models did not change
    assert second.meta["key"]["models"] != first.meta["key"]["models"]


# ------------------------------------------------------------------------- exact (deployed) tables

def test_full_tables_count_what_the_cascade_deploys():
    """Area and overlap per pixel threshold equal mask_from_prob's mask (linear resize to 256x1600)."""
    from steel.model.cascade import mask_from_prob
    from steel.score.probabilities import full_tables

    rng = np.random.default_rng(5)
    prob = rng.random((8, 40)).astype(np.float32)
    truth = np.zeros((H, W), np.uint8)
    truth[40:200, 100:900] = 1
    edges = np.asarray([0.1, 0.3, 0.5, 0.7, 0.9], np.float32)
    area, inter = full_tables(prob, truth, edges)
    for j, p in enumerate(edges.tolist()):
        mask, raw = mask_from_prob(prob, p, 0, H * W)
        assert area[j] == raw == mask.sum() and inter[j] == int((mask & truth).sum())
    assert (np.diff(area) <= 0).all()  # higher threshold, smaller mask
    assert full_tables(prob, None, edges)[1].sum() == 0


def exact_cache(n=40, seed=0) -> PredictionCache:
    """A cache of exact tables only: one pixel threshold (0.5); class 1 truth areas 3000 on even images,
    predictions that match them plus huge false masks (200,000 px) on odd images."""
    rng = np.random.default_rng(seed)
    truth_area = np.zeros((n, 4), np.int64)
    area = np.zeros((n, 4, 1), np.int64)
    inter = np.zeros((n, 4, 1), np.int64)
    for i in range(n):
        if i % 2 == 0:
            truth_area[i, 0] = area[i, 0, 0] = inter[i, 0, 0] = 3000
        else:
            area[i, 0, 0] = 200_000 + int(rng.integers(0, 1000))
    return PredictionCache([f"{i}.jpg" for i in range(n)], np.ones(n, np.float32), np.ones((n, 4), np.float32),
                           {}, {}, truth_area, full_edges=np.asarray([0.5], np.float32), full_area=area,
                           full_inter=inter)


def test_search_tunes_max_area_on_exact_tables(tmp_path):
    cache = exact_cache()
    start = wide_open()
    for k in range(1, 5):
        start["classes"][str(k)].update(prob=0.5, pixel=0.5)
    result = search(cache, start, Grids(pixel=(0.5,)))
    c1 = result["thresholds"]["classes"]["1"]
    assert 3000 <= c1["max_area"] < 200_000  # the huge false masks are filtered out
    assert result["per_class_before"][1] == pytest.approx(0.5) and result["per_class_after"][1] == pytest.approx(1.0)
    assert any(step["param"] == "classes.1.max_area" for step in result["steps"])
    with pytest.raises(ValueError, match="not counted by the actors"):
        Evaluator(cache).class_dice(1, 0.5, 0.5, 0.3, 0, H * W)  # a pixel threshold the tables lack
    cache.save(str(tmp_path / "exact.npz"))
    again = PredictionCache.load(str(tmp_path / "exact.npz"))
    assert again.exact and not again.seg and Evaluator(again).score(start) == pytest.approx(Evaluator(cache).score(start))
