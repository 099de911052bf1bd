"""Cascade gates, thresholds, area filters, call savings and flip TTA, with stub models of known outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from steel.core.names import SHAPE
from steel.data import rle
from steel.model.cascade import Cascade, mask_from_prob, rows_from_predictions
from steel.model.thresholds import (
    ThresholdError,
    default_thresholds,
    from_area_json,
    load_thresholds,
    merge_areas,
    save_thresholds,
    validate_thresholds,
)

H, W = SHAPE
CLS = (32, 160)  # classifier input size in these tests


def make_images(n: int) -> np.ndarray:
    """Image i is uniform with value i + 1, so a stub can tell which image it got (after any resize)."""
    return np.stack([np.full((H, W, 3), i + 1, dtype=np.uint8) for i in range(n)])


def index_of(x: np.ndarray) -> np.ndarray:
    return np.rint(x[:, 0, 0, 0] * 255).astype(int) - 1


class Stubs:
    """Stub models with per-image outputs; every call records the image indices it received."""

    def __init__(self, p_bin, p_cls, areas, seg_value=0.9, seg_size=(H, W)):
        self.p_bin = np.asarray(p_bin, dtype=np.float32)
        self.p_cls = np.asarray(p_cls, dtype=np.float32)
        self.areas = np.asarray(areas, dtype=int)  # (N, 4) pixels set in segmenter k's map
        self.seg_value = seg_value
        self.seg_size = seg_size
        self.calls: dict[str, list[list[int]]] = {}

    def _record(self, name, x):
        idx = index_of(x)
        self.calls.setdefault(name, []).append(idx.tolist())
        return idx

    def binary(self, x):
        return self.p_bin[self._record("binary", x)][:, None]

    def multilabel(self, x):
        return self.p_cls[self._record("multilabel", x)]

    def seg(self, k):
        def f(x):
            idx = self._record(f"seg{k}", x)
            h, w = self.seg_size
            out = np.zeros((len(idx), h * w), dtype=np.float32)
            for row, i in enumerate(idx):
                out[row, : self.areas[i, k - 1]] = self.seg_value  # first pixels in column-major order
            return out.reshape(len(idx), w, h).transpose(0, 2, 1)[..., None]
        return f

    def models(self):
        return {"binary": self.binary, "multilabel": self.multilabel, **{f"seg{k}": self.seg(k) for k in range(1, 5)}}

    def sizes(self):
        return {"binary": CLS, "multilabel": CLS, **{f"seg{k}": self.seg_size for k in range(1, 5)}}

    def seen(self, name):
        return sorted(i for call in self.calls.get(name, []) for i in call)


def thresholds(**over):
    th = default_thresholds()
    for k in range(1, 5):
        th["classes"][str(k)].update(min_area=10, max_area=1000)
    th.update(over)
    return th


def test_all_gates_open_gives_exact_masks_and_stats():
    areas = [[100, 200, 300, 400], [50, 60, 70, 80]]
    stubs = Stubs([0.9, 0.8], [[0.9] * 4, [0.7] * 4], areas)
    cas = Cascade(stubs.models(), stubs.sizes(), thresholds())
    out = cas.predict(make_images(2), image_ids=["a.jpg", "b.jpg"])
    assert [o["ImageId"] for o in out] == ["a.jpg", "b.jpg"]
    for i in range(2):
        assert out[i]["masks"] == [f"1 {a}" for a in areas[i]]
        assert out[i]["rle"] == out[i]["masks"]
        assert out[i]["areas"] == areas[i]
        assert out[i]["p_defect"] == pytest.approx(stubs.p_bin[i])
        assert out[i]["p_class"] == pytest.approx(stubs.p_cls[i].tolist())
    assert cas.stats["seg_calls"] == 8 and cas.stats["seg_calls_saved"] == 0
    assert cas.stats["multilabel_calls_saved"] == 0
    rows = rows_from_predictions(out)
    assert len(rows) == 8 and rows[0] == {"ImageId": "a.jpg", "ClassId": 1, "EncodedPixels": "1 100"}


def test_binary_gate_skips_multilabel_and_segmenters():
    # t_bin = 0.5: image 0 below, image 1 exactly at the threshold (kept: p >= t), image 2 above.
    stubs = Stubs([0.49, 0.5, 0.95], [[0.9] * 4] * 3, [[100] * 4] * 3)
    cas = Cascade(stubs.models(), stubs.sizes(), thresholds())
    out = cas.predict(make_images(3))
    assert out[0]["masks"] == ["", "", "", ""] and all(math.isnan(p) for p in out[0]["p_class"])
    assert out[1]["masks"] == ["1 100"] * 4 and out[2]["masks"] == ["1 100"] * 4
    assert stubs.seen("binary") == [0, 1, 2]
    assert stubs.seen("multilabel") == [1, 2]
    for k in range(1, 5):
        assert stubs.seen(f"seg{k}") == [1, 2]
        assert len(stubs.calls[f"seg{k}"]) == 1  # the passing images are batched into one call
    s = cas.stats
    assert (s["images"], s["multilabel_calls"], s["multilabel_calls_saved"]) == (3, 2, 1)
    assert (s["seg_calls"], s["seg_calls_saved"]) == (8, 4)


def test_class_gate_only_runs_the_passing_segmenters():
    p_cls = [[0.9, 0.2, 0.6, 0.59], [0.1, 0.8, 0.59, 0.6]]
    th = thresholds()
    th["classes"]["3"]["prob"] = 0.6
    th["classes"]["4"]["prob"] = 0.6
    stubs = Stubs([0.9, 0.9], p_cls, [[100, 200, 300, 400]] * 2)
    cas = Cascade(stubs.models(), stubs.sizes(), th)
    out = cas.predict(make_images(2))
    assert out[0]["masks"] == ["1 100", "", "1 300", ""]
    assert out[1]["masks"] == ["", "1 200", "", "1 400"]
    assert [stubs.seen(f"seg{k}") for k in range(1, 5)] == [[0], [1], [0], [1]]
    assert cas.stats["seg_calls"] == 4 and cas.stats["seg_calls_saved"] == 4
    assert cas.stats["seg_calls_per_class"] == {1: 1, 2: 1, 3: 1, 4: 1}


def test_all_images_gated_makes_no_further_calls():
    stubs = Stubs([0.1, 0.2], [[0.9] * 4] * 2, [[100] * 4] * 2)
    cas = Cascade(stubs.models(), stubs.sizes(), thresholds())
    out = cas.predict(make_images(2))
    assert all(o["masks"] == [""] * 4 for o in out)
    assert set(stubs.calls) == {"binary"}
    assert cas.stats["seg_calls_saved"] == 8 and cas.stats["multilabel_calls_saved"] == 2


@pytest.mark.parametrize(
    "area, kept",
    [(9, False), (10, True), (500, True), (1000, True), (1001, False)],
)
def test_area_bounds(area, kept):
    stubs = Stubs([0.9], [[0.9] * 4], [[area] * 4])
    out = Cascade(stubs.models(), stubs.sizes(), thresholds()).predict(make_images(1))[0]
    assert out["masks"] == ([f"1 {area}"] * 4 if kept else [""] * 4)
    assert out["areas"] == ([area] * 4 if kept else [0] * 4)
    assert out["raw_areas"] == [area] * 4


def test_area_bounds_are_per_class():
    th = thresholds()
    th["classes"]["2"].update(min_area=250)
    th["classes"]["4"].update(max_area=150)
    stubs = Stubs([0.9], [[0.9] * 4], [[200] * 4])
    out = Cascade(stubs.models(), stubs.sizes(), th).predict(make_images(1))[0]
    assert out["masks"] == ["1 200", "", "1 200", ""]


@pytest.mark.parametrize("pixel, kept", [(0.69, True), (0.7, True), (0.71, False)])
def test_pixel_threshold(pixel, kept):
    th = thresholds()
    th["classes"]["1"]["pixel"] = pixel
    stubs = Stubs([0.9], [[0.9] * 4], [[100] * 4], seg_value=np.float32(0.7))
    out = Cascade(stubs.models(), stubs.sizes(), th).predict(make_images(1))[0]
    assert out["masks"][0] == ("1 100" if kept else "")


def test_low_resolution_maps_are_resized_back_with_linear_interpolation():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    prob = rng.random((32, 160)).astype(np.float32)

    def seg(x):
        return np.repeat(prob[None, :, :, None], len(x), axis=0)

    models = {"binary": lambda x: np.ones((len(x), 1)), "multilabel": lambda x: np.ones((len(x), 4)),
              **{f"seg{k}": seg for k in range(1, 5)}}
    th = thresholds()
    for k in range(1, 5):
        th["classes"][str(k)].update(min_area=0, max_area=H * W, pixel=0.6)
    out = Cascade(models, {n: (32, 160) for n in models}, th).predict(make_images(1))[0]
    expected = cv2.resize(prob, (W, H), interpolation=cv2.INTER_LINEAR) >= 0.6
    assert np.array_equal(rle.decode(out["masks"][0]), expected.astype(np.uint8))
    mask, area = mask_from_prob(prob, 0.6, 0, H * W)
    assert area == int(expected.sum()) and np.array_equal(mask, expected)


def test_inputs_are_resized_with_inter_area_and_scaled_to_unit_range():
    cv2 = pytest.importorskip("cv2")
    seen = {}

    def binary(x):
        seen["x"] = x
        return np.ones((len(x), 1))

    models = {"binary": binary, "multilabel": lambda x: np.zeros((len(x), 4)),
              **{f"seg{k}": (lambda x: np.zeros((len(x), 8, 32, 1))) for k in range(1, 5)}}
    img = np.random.default_rng(1).integers(0, 256, (1, H, W, 3), dtype=np.uint8)
    Cascade(models, {n: (64, 320) for n in models}, thresholds()).predict(img)
    expected = cv2.resize(img[0], (320, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    assert seen["x"].dtype == np.float32 and seen["x"].shape == (1, 64, 320, 3)
    np.testing.assert_allclose(seen["x"][0], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------- TTA

def _tta_models(seg):
    def binary(x):  # left-right asymmetric: mean of the left half of channel 0
        return x[:, :, : x.shape[2] // 2, 0].mean(axis=(1, 2))[:, None]

    return {"binary": binary, "multilabel": lambda x: np.ones((len(x), 4)),
            **{f"seg{k}": seg for k in range(1, 5)}}


def _asym_images():
    img = np.zeros((1, H, W, 3), dtype=np.uint8)
    img[:, :128, :400] = 255  # top-left block only
    return img


@pytest.mark.parametrize("mode", ["h", "v", "hv"])
def test_tta_undoes_flips_of_segmentation_maps(mode):
    # The segmenter echoes its (flipped) input: un-flipping must give back exactly the top-left block.
    def seg(x):
        return x[..., :1]

    th = thresholds(binary=0.1)  # the binary stub gives 0.25 (0.125 flipped) on these images
    for k in range(1, 5):
        th["classes"][str(k)].update(min_area=0, max_area=H * W, pixel=0.99)
    sizes = {n: (H, W) for n in ("binary", "multilabel", "seg1", "seg2", "seg3", "seg4")}
    img = _asym_images()
    plain = Cascade(_tta_models(seg), sizes, th, tta="none").predict(img)[0]
    flipped = Cascade(_tta_models(seg), sizes, th, tta={"seg1": mode, "seg2": mode, "seg3": mode, "seg4": mode}).predict(img)[0]
    expected = np.zeros((H, W), np.uint8)
    expected[:128, :400] = 1
    assert np.array_equal(rle.decode(plain["masks"][0]), expected)
    assert flipped["masks"] == plain["masks"]


def test_tta_averages_over_views():
    # A segmenter that ignores its input and always marks the left half: with h-TTA the un-flipped
    # view marks the right half, so the average is 0.5 everywhere.
    def seg(x):
        out = np.zeros((len(x), H, W, 1), np.float32)
        out[:, :, : W // 2] = 1.0
        return out

    th = thresholds(binary=0.1)
    for k in range(1, 5):
        th["classes"][str(k)].update(min_area=0, max_area=H * W, pixel=0.6)
    sizes = {n: (H, W) for n in ("binary", "multilabel", "seg1", "seg2", "seg3", "seg4")}
    img = _asym_images()
    none = Cascade(_tta_models(seg), sizes, th, tta="none")
    h = Cascade(_tta_models(seg), sizes, th, tta="h")
    p_none = none.predict_probabilities(img)
    p_h = h.predict_probabilities(img)
    # binary: left-half mean of channel 0 is 0.25 (block covers half the rows, 400 of 800 columns);
    # flipped, the left half holds no block: the average is 0.125.
    assert p_none["p_defect"][0] == pytest.approx(0.25)
    assert p_h["p_defect"][0] == pytest.approx(0.125)
    assert np.allclose(p_h["seg"][1], 0.5)
    assert h.predict(img)[0]["masks"] == [""] * 4  # 0.5 < pixel 0.6 everywhere
    assert none.predict(img)[0]["masks"][0] == f"1 {H * W // 2}"
    assert h.stats["forward_passes"] == 2 * none.stats["forward_passes"]


def test_predict_probabilities_is_ungated_and_downsamples():
    stubs = Stubs([0.1, 0.9], [[0.1] * 4, [0.9] * 4], [[256 * 10] * 4, [256 * 20] * 4])
    cas = Cascade(stubs.models(), stubs.sizes(), thresholds())
    p = cas.predict_probabilities(make_images(2), seg_size=(64, 400), seg_dtype=np.float16)
    assert p["p_defect"].tolist() == pytest.approx([0.1, 0.9])
    assert p["p_class"].shape == (2, 4)
    assert stubs.seen("seg1") == [0, 1]
    assert p["seg"][1].shape == (2, 64, 400) and p["seg"][1].dtype == np.float16
    # Area is preserved up to the scale factor: 10 full columns of 0.9 -> 2.5 low-res columns.
    scale = (H * W) / (64 * 400)
    assert float(p["seg"][1][0].astype(np.float64).sum()) * scale == pytest.approx(0.9 * 256 * 10, rel=1e-3)


# ------------------------------------------------------------------------------ bad input

def test_bad_input_errors():
    stubs = Stubs([0.9], [[0.9] * 4], [[10] * 4])
    cas = Cascade(stubs.models(), stubs.sizes(), thresholds())
    with pytest.raises(ValueError, match="N x 256 x 1600 x 3"):
        cas.predict(np.zeros((1, 128, 800, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        cas.predict(np.zeros((1, H, W, 3), np.float32))
    with pytest.raises(ValueError, match="batch axis"):
        cas.predict(np.zeros((H, W, 3), np.uint8))
    with pytest.raises(ValueError, match="image_ids"):
        cas.predict(make_images(1), image_ids=["a", "b"])
    models = stubs.models()
    del models["seg3"]
    with pytest.raises(ValueError, match="missing seg3"):
        Cascade(models, stubs.sizes(), thresholds())
    with pytest.raises(ValueError, match="tta"):
        Cascade(stubs.models(), stubs.sizes(), thresholds(), tta="x")
    bad = stubs.models()
    bad["multilabel"] = lambda x: np.ones((len(x), 3))
    with pytest.raises(ValueError, match=r"multilabel model must return \(N, 4\)"):
        Cascade(bad, stubs.sizes(), thresholds()).predict(make_images(1))
    assert Cascade(stubs.models(), stubs.sizes(), thresholds()).predict(np.zeros((0, H, W, 3), np.uint8)) == []


# ------------------------------------------------------------------------------ thresholds

def test_default_thresholds_are_the_seed():
    th = validate_thresholds(default_thresholds())
    assert th["binary"] == 0.5 and th["tta"] == "none"
    assert [(c["min_area"], c["max_area"]) for c in th["classes"].values()] == [
        (500, 15500), (700, 10000), (1100, 160000), (2800, 127000)]
    assert all(c["prob"] == 0.5 and c["pixel"] == 0.5 for c in th["classes"].values())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("binary"), "missing key 'binary'"),
        (lambda d: d.update(binary=1.5), r"binary: must be a probability in \[0, 1\]"),
        (lambda d: d.update(binary="0.5"), "binary: expected a number"),
        (lambda d: d["classes"].pop("3"), "missing class 3"),
        (lambda d: d["classes"].update({"5": d["classes"]["1"]}), "unknown class '5'"),
        (lambda d: d["classes"]["2"].update(pixel=-0.1), "classes.2.pixel"),
        (lambda d: d["classes"]["2"].update(min_area=20000), "min_area 20000 is larger than max_area 10000"),
        (lambda d: d["classes"]["1"].update(min_area=1.5), "classes.1.min_area: must be a non-negative whole"),
        (lambda d: d["classes"]["1"].update(prb=0.3), "unknown key 'prb'"),
        (lambda d: d["classes"]["4"].pop("max_area"), "classes.4: missing key 'max_area'"),
        (lambda d: d.update(tta="flip"), "tta: must be one of"),
        (lambda d: d.update(binary=float("nan")), "binary: must be finite"),
        # thresholds.json's `"max_area": 1e400` reads as inf; a 401-digit integer overflows float()
        (lambda d: d["classes"]["1"].update(max_area=float("inf")), "classes.1.max_area: must be finite"),
        (lambda d: d["classes"]["1"].update(max_area=10**400), "classes.1.max_area: must be finite, got an integer"),
    ],
)
def test_validate_thresholds_errors(change, message):
    d = default_thresholds()
    change(d)
    with pytest.raises(ThresholdError, match=message):
        validate_thresholds(d)


def test_validate_accepts_int_class_keys_and_keeps_extra_keys():
    d = default_thresholds()
    d["classes"] = {int(k): v for k, v in d["classes"].items()}
    d["validation"] = {"dice_after": 0.9}
    out = validate_thresholds(d)
    assert list(out["classes"]) == ["1", "2", "3", "4"] and out["validation"] == {"dice_after": 0.9}


def test_area_json_and_round_trip(tmp_path):
    pytest.importorskip("steel.core.storage")
    path = tmp_path / "area_thresholds.json"
    path.write_text(json.dumps({"1": {"min_area": 600, "max_area": 20000}, "4": {"min_area": 2000, "max_area": 99999}}))
    th = from_area_json(str(path))
    assert th["classes"]["1"]["min_area"] == 600 and th["classes"]["4"]["max_area"] == 99999
    assert th["classes"]["2"]["min_area"] == 700  # untouched classes keep the seed's values
    (tmp_path / "bundle").mkdir()
    target = save_thresholds(str(tmp_path / "bundle"), th)
    assert target.endswith("thresholds.json")
    assert load_thresholds(str(tmp_path / "bundle")) == validate_thresholds(th)
    path.write_text(json.dumps({"1": {"min_area": 600, "max": 5}}))
    with pytest.raises(ThresholdError, match="unknown key 'max'"):
        from_area_json(str(path))
    with pytest.raises(ThresholdError, match="larger than max_area"):
        merge_areas(default_thresholds(), {"2": {"min_area": 50000}})
