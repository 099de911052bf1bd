"""steel.data.augment: the seed's classifier augmentation and the U-Nets' joint flips + defect blackout."""

from __future__ import annotations

import numpy as np
import pytest

from steel.data import augment


def steel_like(n: int, h: int = 64, w: int = 320, seed: int = 0) -> np.ndarray:
    """Grey (3 equal channels) images with a brightness gradient and grain, like the Severstal frames."""
    rng = np.random.default_rng(seed)
    base = np.linspace(70, 140, w)[None, None, :] + rng.normal(0, 8, (n, h, w))
    gray = np.clip(base, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def defect_masks(n: int, h: int = 64, w: int = 320) -> np.ndarray:
    masks = np.zeros((n, h, w), np.uint8)
    masks[:, 10:30, 40:100] = 1  # off-centre, so every flip moves it
    masks[:, 40:50, 250:260] = 1
    return masks


def test_classifier_augment_shapes_dtype_and_determinism():
    images = steel_like(4)
    before = images.copy()
    a = augment.classifier_augment(images, np.random.default_rng(7))
    b = augment.classifier_augment(images, np.random.default_rng(7))
    c = augment.classifier_augment(images, np.random.default_rng(8))
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, images)
    np.testing.assert_array_equal(images, before)  # input untouched
    assert np.array_equal(a[..., 0], a[..., 2])  # grey stays grey
    # borders replicate edge pixels (Keras' fill_mode='nearest'): no black fill appears
    assert a.min() >= images.min()


def test_classifier_pipeline_matches_seed_ranges():
    affine = augment.classifier_pipeline().transforms[0]
    assert augment.SHEAR_DEGREES == 0.2 and augment.ROTATION_DEGREES == 5 and augment.ZOOM == 0.05
    assert tuple(affine.rotate) == (-5, 5)
    assert [type(t).__name__ for t in augment.classifier_pipeline().transforms] == [
        "Affine", "HorizontalFlip", "VerticalFlip"]


def test_segmenter_flips_keep_image_and_mask_aligned():
    masks = defect_masks(16)
    images = steel_like(16)
    images[masks > 0] = 255  # paint the defect so we can follow it
    out_img, out_mask = augment.segmenter_augment(images, masks, np.random.default_rng(3), blackout_prob=0.0)
    assert out_img.shape == images.shape and out_img.dtype == images.dtype
    assert out_mask.shape == masks.shape and out_mask.dtype == masks.dtype
    moved = [not np.array_equal(out_mask[i], masks[i]) for i in range(16)]
    assert any(moved) and not all(moved)  # some flipped, some not (p = 0.5 each)
    for i in range(16):
        np.testing.assert_array_equal(out_img[i, ..., 0] == 255, out_mask[i] > 0)
        assert out_mask[i].sum() == masks[i].sum()


def test_segmenter_masks_with_channel_axis_and_affine():
    masks = defect_masks(4)[..., None].astype(np.float32)
    images = steel_like(4)
    images[masks[..., 0] > 0] = 255
    out_img, out_mask = augment.segmenter_augment(images, masks, np.random.default_rng(0), affine=True)
    assert out_mask.shape == masks.shape and out_mask.dtype == np.float32
    assert set(np.unique(out_mask)) <= {0.0, 1.0}  # nearest-neighbour for masks
    # painted pixels follow the mask through the affine too (bilinear blurs only the 1-px border)
    inside = out_img[..., 0][out_mask[..., 0] > 0]
    assert inside.size and np.mean(inside > 200) > 0.8


def test_blackout_empties_mask_and_repaints_defect():
    masks = defect_masks(3)
    images = steel_like(3)
    images[masks > 0] = 20  # dark defect
    out_img, out_mask = augment.segmenter_augment(images, masks, np.random.default_rng(1),
                                                  blackout_prob=1.0, flips=False)
    assert out_mask.sum() == 0 and out_mask.dtype == masks.dtype
    defect = masks > 0
    assert np.all(out_img[defect] != 20) and out_img[defect].mean() > 60  # painted with the background
    far = np.ones_like(defect)
    far[:, 0:40, 30:110] = False
    far[:, 30:60, 240:270] = False
    np.testing.assert_array_equal(out_img[far], images[far])  # the rest of the frame is unchanged
    assert np.array_equal(out_img[..., 0], out_img[..., 1])  # grey stays grey
    black_img, black_mask = augment.segmenter_augment(images, masks, np.random.default_rng(1), blackout_prob=1.0,
                                                      flips=False, blackout_fill="black")
    assert black_mask.sum() == 0 and np.all(black_img[defect] == 0)


def test_blackout_probability_zero_and_determinism():
    masks = defect_masks(6)
    images = steel_like(6)
    img0, mask0 = augment.segmenter_augment(images, masks, np.random.default_rng(5), blackout_prob=0.0, flips=False)
    np.testing.assert_array_equal(img0, images)
    np.testing.assert_array_equal(mask0, masks)
    a = augment.segmenter_augment(images, masks, np.random.default_rng(5), blackout_prob=0.5)
    b = augment.segmenter_augment(images, masks, np.random.default_rng(5), blackout_prob=0.5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    emptied = [a[1][i].sum() == 0 for i in range(6)]
    assert any(emptied) and not all(emptied)
    # clean images (empty masks) are never painted
    clean = np.zeros_like(masks)
    img_c, mask_c = augment.segmenter_augment(images, clean, np.random.default_rng(5), blackout_prob=1.0, flips=False)
    np.testing.assert_array_equal(img_c, images)


def test_bad_input_is_rejected_clearly():
    images = steel_like(2)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        augment.classifier_augment(images[0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="masks must be shaped"):
        augment.segmenter_augment(images, np.zeros((2, 8, 8), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="blackout_prob"):
        augment.segmenter_augment(images, defect_masks(2), np.random.default_rng(0), blackout_prob=1.5)
    with pytest.raises(TypeError, match="default_rng"):
        augment.classifier_augment(images, 42)
    with pytest.raises(ValueError, match="background, black"):
        augment.segmenter_augment(images, defect_masks(2), np.random.default_rng(0), blackout_fill="white")


def test_aliases_used_by_train_data():
    images, masks = steel_like(4), defect_masks(4)
    a = augment.augment_segmentation(images, masks, blackout_prob=0.5, rng=np.random.default_rng(9))
    b = augment.segmenter_augment(images, masks, np.random.default_rng(9), blackout_prob=0.5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(augment.augment_classifier(images, rng=np.random.default_rng(9)),
                                  augment.classifier_augment(images, np.random.default_rng(9)))
