"""detectron2's training transforms (PointRend Cityscapes recipe): ResizeShortestEdge (sizes, max_size cap, rounding,
PIL bilinear / nearest), RandomCropCategoryArea (window, area rule, ignore, clipping), ColorAugSSD (draw order, each
sub-operation by hand, clipping after each step, hue mod 180); the YAML recipe end to end; argument errors."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from PIL import Image

from paddle_impl import transforms as T

CHOICES = [512, 768, 1024, 1280, 1536, 1792, 2048]


def _pil(image, w, h, resample):
    return np.asarray(Image.fromarray(image).resize((w, h), resample))


def _rand_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# ResizeShortestEdge


@pytest.mark.parametrize("size", CHOICES)
def test_resize_shortest_edge_cityscapes_sizes(size):
    t = T.ResizeShortestEdge([size], max_size=4096, rng=0)
    img, lbl = t(np.zeros((1024, 2048, 3), np.uint8), np.zeros((1024, 2048), np.int64))
    assert img.shape == (size, 2 * size, 3) and lbl.shape == (size, 2 * size)  # 2048 -> 2048x4096: at the cap
    assert img.dtype == np.uint8 and lbl.dtype == np.int64


def test_resize_shortest_edge_max_size_cap_and_rounding():
    t = T.ResizeShortestEdge(CHOICES, max_size=4096)
    assert t.output_shape(1024, 4096, 2048) == (1024, 4096)  # 2048x8192 capped by 4096/8192
    assert t.output_shape(4096, 1024, 2048) == (4096, 1024)  # portrait: same rule
    assert t.output_shape(1000, 3000, 2048) == (1365, 4096)  # 2048x6144 * 2/3 = 1365.33 x 4096
    assert t.output_shape(1024, 2048, 2048) == (2048, 4096)  # exactly max_size: no cap
    assert T.ResizeShortestEdge(5, max_size=None).output_shape(1, 10000, 5) == (5, 50000)  # no cap
    # rounding int(x + 0.5): half up (Python's round() would give 2 for 2.5)
    assert t.output_shape(2, 5, 1) == (1, 3)
    assert t.output_shape(5, 2, 1) == (3, 1)  # h >= w branch
    assert t.output_shape(333, 500, 512) == (512, 769)  # 768.77
    assert t.output_shape(500, 333, 512) == (769, 512)
    assert t.output_shape(7, 7, 3) == (3, 3)  # square: h < w is false, (scale*h, size)
    assert t.output_shape(600, 800, 1000) == (1000, 1333)  # 1333.33


def test_resize_shortest_edge_matches_pil_bilinear_and_nearest():
    image = _rand_image(37, 53)
    label = np.random.default_rng(1).choice(np.array([0, 3, 7, 255]), size=(37, 53)).astype(np.int64)
    for size in (20, 80):  # down (PIL's support widens: antialiased) and up
        img, lbl = T.ResizeShortestEdge(size, max_size=None, rng=0)(image, label)
        nh, nw = size, int(size / 37 * 53 + 0.5)
        assert img.shape == (nh, nw, 3) and lbl.shape == (nh, nw)
        np.testing.assert_array_equal(img, _pil(image, nw, nh, Image.BILINEAR))
        np.testing.assert_array_equal(lbl, _pil(label.astype(np.uint8), nw, nh, Image.NEAREST))
        assert set(np.unique(lbl)) <= {0, 3, 7, 255} and lbl.dtype == np.int64
        assert img.flags.writeable
    # cv2 linear would differ when shrinking (no antialiasing): the PIL path really is used
    small = T.ResizeShortestEdge(20, max_size=None, rng=0)(image, label)[0]
    assert not np.array_equal(small, cv2.resize(image, (small.shape[1], small.shape[0]), cv2.INTER_LINEAR))
    # values above 255 (int32 "I" path) and negative values survive
    big = np.where(label == 255, 1000, -label)
    lbl = T.ResizeShortestEdge(80, max_size=None, rng=0)(image, big)[1]
    assert set(np.unique(lbl)) <= {0, -3, -7, 1000} and lbl.dtype == np.int64
    # a single-channel image keeps its trailing axis
    img, _ = T.ResizeShortestEdge(20, max_size=None)(image[:, :, :1], label)
    assert img.shape == (20, 29, 1)


def test_resize_shortest_edge_sampling():
    image, label = np.zeros((10, 20, 3), np.uint8), np.zeros((10, 20), np.int64)
    t = T.ResizeShortestEdge([4, 8, 12], max_size=None, sample_style="choice", rng=0)
    assert {t(image, label)[1].shape[0] for _ in range(60)} == {4, 8, 12}
    r = T.ResizeShortestEdge([5, 8], max_size=None, sample_style="range", rng=0)
    assert {r(image, label)[1].shape[0] for _ in range(80)} == {5, 6, 7, 8}  # both ends included
    # the draw: one integers() call on the transform's own generator
    seq = [T.ResizeShortestEdge(CHOICES, rng=7).sample_size() for _ in range(1)]
    assert seq == [CHOICES[int(np.random.default_rng(7).integers(0, len(CHOICES)))]]
    # size 0 (detectron2's no-op) and an unchanged size return the input
    img, lbl = T.ResizeShortestEdge(0)(image, label)
    assert img is image and lbl is label
    img, lbl = T.ResizeShortestEdge(10, max_size=None)(image, label)
    assert img is image and lbl is label


def test_resize_shortest_edge_refuses_float_images():
    with pytest.raises(ValueError, match="ResizeShortestEdge works on uint8.*before ToFloat32"):
        T.ResizeShortestEdge(8)(np.zeros((4, 6, 3), np.float32), np.zeros((4, 6), np.int64))


# ----------------------------------------------------------------------------------------------------------------------
# RandomCropCategoryArea


def _coords(h, w):
    """Image: R = row, G = col, B = 7; label = row * w + col (unique per pixel)."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy, xx, np.full_like(yy, 7)], -1).astype(np.uint8)
    return image, (yy * w + xx).astype(np.int64)


def _expected_window(seed, h, w, ch, cw, label, max_area, ignore, tries=10):
    """Independent re-statement of detectron2's loop (np.unique counting)."""
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        if tries == 1:
            break
        vals, cnt = np.unique(label[y0:y0 + ch, x0:x0 + cw], return_counts=True)
        if ignore is not None:
            cnt = cnt[vals != ignore]
        if len(cnt) > 1 and cnt.max() < cnt.sum() * max_area:
            break
    return y0, x0


@pytest.mark.parametrize("max_area", [1.0, 0.75])
def test_crop_size_and_same_window_for_image_and_label(max_area):
    image, label = _coords(40, 60)
    seen = set()
    for seed in range(12):
        img, lbl = T.RandomCropCategoryArea((10, 25), max_area, rng=seed)(image, label)
        assert img.shape == (10, 25, 3) and lbl.shape == (10, 25)
        y0, x0 = int(img[0, 0, 0]), int(img[0, 0, 1])
        np.testing.assert_array_equal(img, image[y0:y0 + 10, x0:x0 + 25])
        np.testing.assert_array_equal(lbl, label[y0:y0 + 10, x0:x0 + 25])
        # all labels unique: the first window is accepted; offsets y then x from integers(0, n + 1)
        assert (y0, x0) == _expected_window(seed, 40, 60, 10, 25, label, max_area, 255, tries=1)
        seen.add((y0, x0))
    assert len(seen) > 6
    img, lbl = T.RandomCropCategoryArea((10, 25), rng=0)(image.astype(np.float32), label)  # any image dtype
    assert img.dtype == np.float32 and img.shape == (10, 25, 3)


def test_crop_area_rule_picks_first_valid_window_else_the_tenth():
    # 100x100, class 0 except columns 80..99 class 1: a 20x20 window is valid only if it holds 6..14 columns of
    # class 1 (max count < 0.75 * 400), so most random windows are 100% class 0
    label = np.zeros((100, 100), np.int64)
    label[:, 80:] = 1
    image = np.zeros((100, 100, 3), np.uint8)
    t = T.RandomCropCategoryArea((20, 20), 0.75, 255)
    accepted = 0
    for seed in range(40):
        t.reseed(seed)
        _, lbl = t(image, label)
        ey, ex = _expected_window(seed, 100, 100, 20, 20, label, 0.75, 255)
        np.testing.assert_array_equal(lbl, label[ey:ey + 20, ex:ex + 20])
        counts = np.bincount(lbl.ravel(), minlength=2)
        if t.accepts(lbl):
            accepted += 1
            assert counts.min() > 0 and counts.max() < 0.75 * counts.sum()
    assert 5 < accepted < 40  # sometimes found within 10 tries, sometimes not


def test_crop_area_rule_impossible_uses_tenth_window():
    label = np.full((30, 40), 4, np.int64)
    label[:5] = 255  # one class plus ignore: never two categories
    image, _ = _coords(30, 40)
    for seed in range(5):
        t = T.RandomCropCategoryArea((8, 16), 0.75, 255, rng=seed)
        img, lbl = t(image, label)
        assert img.shape == (8, 16, 3) and lbl.shape == (8, 16)
        ref = np.random.default_rng(seed)
        draws = [int(ref.integers(0, n)) for _ in range(10) for n in (30 - 8 + 1, 40 - 16 + 1)]
        assert (int(img[0, 0, 0]), int(img[0, 0, 1])) == (draws[-2], draws[-1])  # the 10th window
        assert t.rng.integers(0, 2 ** 62) == ref.integers(0, 2 ** 62)  # exactly 20 draws consumed


def test_crop_ignore_pixels_are_not_counted():
    label = np.zeros((10, 10), np.int64)
    label[:, 6:] = 255  # 60 class 0 + 40 ignore
    t = T.RandomCropCategoryArea((10, 10), 0.75, ignore_index=255)
    assert not t.accepts(label)  # one category once 255 is left out
    assert T.RandomCropCategoryArea((10, 10), 0.75, ignore_index=None).accepts(label)  # 0.6 < 0.75
    label[:, 8:] = 1  # 60 class 0, 20 ignore, 20 class 1: 60 / 80 = 0.75 -> not < 0.75
    assert not t.accepts(label)
    assert T.RandomCropCategoryArea((10, 10), 0.76).accepts(label)
    assert T.RandomCropCategoryArea((10, 10), 0.75, ignore_index=None).accepts(label)  # 60 / 100
    assert not t.accepts(np.full((4, 4), 255, np.int64))  # all ignore: no category
    neg = np.where(label == 255, -1, label)  # the np.unique path (negative values)
    assert not T.RandomCropCategoryArea((10, 10), 0.75, ignore_index=-1).accepts(neg)


def test_crop_larger_than_image_is_clipped_not_padded():
    image, label = _coords(30, 50)
    img, lbl = T.RandomCropCategoryArea((512, 1024), rng=0)(image, label)
    np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(lbl, label)
    img, lbl = T.RandomCropCategoryArea((20, 1024), rng=0)(image, label)
    assert img.shape == (20, 50, 3) and lbl.shape == (20, 50) and img[0, 0, 1] == 0


# ----------------------------------------------------------------------------------------------------------------------
# ColorAugSSD


class Script:
    """A stand-in generator returning scripted values and recording the calls."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = []

    def integers(self, lo, hi):
        self.calls.append(("integers", lo, hi))
        return self.values.pop(0)

    def uniform(self, lo, hi):
        self.calls.append(("uniform", lo, hi))
        return self.values.pop(0)


def _label():
    return np.arange(48, dtype=np.int64).reshape(6, 8)


def test_color_aug_convert_clips_and_truncates():
    x = np.array([0, 100, 250, 255], np.uint8)
    np.testing.assert_array_equal(T.ColorAugSSD.convert(x, beta=10.7), [10, 110, 255, 255])  # 110.7 -> 110
    np.testing.assert_array_equal(T.ColorAugSSD.convert(x, beta=-32.0), [0, 68, 218, 223])
    np.testing.assert_array_equal(T.ColorAugSSD.convert(x, alpha=1.3), [0, 130, 255, 255])
    np.testing.assert_array_equal(T.ColorAugSSD.convert(x, alpha=0.55), [0, 55, 137, 140])  # 137.5, 140.25
    assert T.ColorAugSSD.convert(x, 1.5).dtype == np.uint8


def test_color_aug_saturation_and_hue_by_hand():
    red = np.full((2, 3, 3), (200, 0, 0), np.uint8)  # HSV (0, 255, 200)
    half = T.ColorAugSSD.scale_saturation(red, 0.5)  # S 127: min channel = 200 * (1 - 127/255) = 100.4
    assert np.abs(half.astype(int) - (200, 100, 100)).max() <= 1
    np.testing.assert_array_equal(T.ColorAugSSD.scale_saturation(red, 1.5), red)  # S clipped at 255
    # hue -18 steps of 2 degrees: 0 -> 162 (324 deg): R = V, G = 0, B = V * (1 - 24 / 60) = 120
    shifted = T.ColorAugSSD.shift_hue(red, -18)
    assert np.abs(shifted.astype(int) - (200, 0, 120)).max() <= 1
    # wrap: H 170 + 18 -> 8 (mod 180, cv2 8-bit hue), S and V kept
    hsv = np.full((1, 1, 3), (170, 255, 255), np.uint8)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    back = cv2.cvtColor(T.ColorAugSSD.shift_hue(rgb, 18), cv2.COLOR_RGB2HSV)[0, 0].astype(int)
    assert back[0] == (int(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[0, 0, 0]) + 18) % 180 == 8
    assert tuple(back[1:]) == (255, 255)
    back = cv2.cvtColor(T.ColorAugSSD.shift_hue(rgb, 10), cv2.COLOR_RGB2HSV)[0, 0, 0]
    assert back == 0


def test_color_aug_draw_order_contrast_first():
    image = _rand_image(6, 8, seed=2)
    t = T.ColorAugSSD()
    t.rng = Script([1, 10.5, 1, 1, 1.2, 1, 0.5, 1, 7])
    img, lbl = t(image, _label())
    c = T.ColorAugSSD
    expected = c.shift_hue(c.scale_saturation(c.convert(c.convert(image, beta=10.5), alpha=1.2), 0.5), 7)
    np.testing.assert_array_equal(img, expected)
    assert t.rng.calls == [("integers", 0, 2), ("uniform", -32.0, 32.0), ("integers", 0, 2),
                           ("integers", 0, 2), ("uniform", 0.5, 1.5),      # contrast
                           ("integers", 0, 2), ("uniform", 0.5, 1.5),      # saturation
                           ("integers", 0, 2), ("integers", -18, 19)]      # hue, both ends included
    np.testing.assert_array_equal(lbl, _label())
    assert img.dtype == np.uint8 and img.shape == image.shape


def test_color_aug_draw_order_contrast_last_and_skips():
    image = _rand_image(6, 8, seed=3)
    c = T.ColorAugSSD
    t = T.ColorAugSSD(brightness_delta=10, hue_delta=5)
    t.rng = Script([0, 0, 1, 0.7, 1, -3, 1, 1.4])  # no brightness; saturation, hue, contrast
    img, _ = t(image, _label())
    np.testing.assert_array_equal(img, c.convert(c.shift_hue(c.scale_saturation(image, 0.7), -3), alpha=1.4))
    assert [k for k, *_ in t.rng.calls] == ["integers", "integers", "integers", "uniform", "integers", "integers",
                                           "integers", "uniform"]
    assert t.rng.calls[4:6] == [("integers", 0, 2), ("integers", -5, 6)]
    t.rng = Script([0, 1, 0, 0, 0])  # every coin 0: nothing happens, five draws
    img, _ = t(image, _label())
    assert img is image and t.rng.values == []


def test_color_aug_clips_after_each_step():
    image = np.full((2, 2, 3), 250, np.uint8)
    t = T.ColorAugSSD()
    t.rng = Script([1, 20.0, 1, 1, 0.5, 0, 0])  # brightness +20 then contrast 0.5
    img, _ = t(image, np.zeros((2, 2), np.int64))
    assert (img == 127).all()  # clip(270) = 255, * 0.5 = 127.5 -> 127 (not 270 * 0.5 = 135)


def test_color_aug_seeded_and_label_untouched():
    image, label = _rand_image(16, 24, seed=4), _label().repeat(3, 0).repeat(3, 1)[:16, :24]
    a, b, other = T.ColorAugSSD(rng=3), T.ColorAugSSD(rng=3), T.ColorAugSSD(rng=4)
    outs_a = [a(image, label) for _ in range(6)]
    outs_b = [b(image, label) for _ in range(6)]
    outs_o = [other(image, label) for _ in range(6)]
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(outs_a, outs_b))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(outs_a, outs_o))
    assert any(not np.array_equal(x[0], image) for x in outs_a)
    for img, lbl in outs_a:
        assert lbl is label and img.dtype == np.uint8 and img.shape == image.shape
    np.testing.assert_array_equal(image, _rand_image(16, 24, seed=4))  # input not modified in place


def test_color_aug_refuses_float_and_non_rgb():
    t = T.ColorAugSSD(rng=0)
    with pytest.raises(ValueError, match="ColorAugSSD works on uint8.*before ToFloat32"):
        t(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match="HxWx3"):
        t(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.int64))


# ----------------------------------------------------------------------------------------------------------------------
# the recipe from YAML, registry, repr, argument errors

RECIPE = """
- {type: ResizeShortestEdge, short_edge_length: [512, 768, 1024, 1280, 1536, 1792, 2048], max_size: 4096,
   sample_style: choice}
- {type: RandomCropCategoryArea, crop_size: [512, 1024], single_category_max_area: 0.75, ignore_index: 255}
- {type: ColorAugSSD}
- {type: RandomHorizontalFlip}
- {type: Normalize, preset: detectron2}
- {type: ToCHW}
"""


def test_detectron2_recipe_from_yaml_end_to_end():
    import yaml

    t = T.build_transforms(yaml.safe_load(RECIPE), seed=0)
    assert [type(x).__name__ for x in t.transforms[:3]] == ["ResizeShortestEdge", "RandomCropCategoryArea",
                                                           "ColorAugSSD"]
    rng = np.random.default_rng(0)
    grid = rng.choice(np.array([0, 1, 2, 8, 10, 13, 255]), size=(16, 32)).astype(np.int64)
    label = np.kron(grid, np.ones((64, 64), np.int64))  # 1024 x 2048 blocks
    image = rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
    start = time.perf_counter()
    for _ in range(3):
        img, lbl = t(image, label)
        assert img.shape == (3, 512, 1024) and img.dtype == np.float32
        assert lbl.shape == (512, 1024) and lbl.dtype == np.int64
        assert set(np.unique(lbl)) <= set(np.unique(grid))
    assert time.perf_counter() - start < 30  # about a second on a small CPU
    # detectron2's own class names are accepted as aliases
    alias = T.build_transforms([{"type": "RandomCrop_CategoryAreaConstraint", "crop_size": [4, 4]},
                                {"type": "ColorAugSSDTransform"}])
    assert isinstance(alias.transforms[0], T.RandomCropCategoryArea)
    assert isinstance(alias.transforms[1], T.ColorAugSSD)
    for name in ("ResizeShortestEdge", "RandomCropCategoryArea", "ColorAugSSD"):
        assert T.TRANSFORMS[name] is getattr(T, name) and name in T.__all__


def test_repr():
    assert repr(T.ResizeShortestEdge([512, 1024], max_size=4096)) == (
        "ResizeShortestEdge(short_edge_length=[512, 1024], max_size=4096, sample_style='choice', "
        "interp='bilinear')")
    assert repr(T.RandomCropCategoryArea([512, 1024])) == (
        "RandomCropCategoryArea(crop_size=(512, 1024), single_category_max_area=0.75, ignore_index=255)")
    assert repr(T.ColorAugSSD()) == (
        "ColorAugSSD(brightness_delta=32, contrast_low=0.5, contrast_high=1.5, saturation_low=0.5, "
        "saturation_high=1.5, hue_delta=18)")
    assert repr(eval(repr(T.ColorAugSSD(brightness_delta=8.5)), vars(T))) == repr(T.ColorAugSSD(8.5))


@pytest.mark.parametrize("cls,kw,match", [
    (T.ResizeShortestEdge, {"sample_style": "uniform"}, "sample_style must be 'choice' or 'range', got 'uniform'"),
    (T.ResizeShortestEdge, {"short_edge_length": [512, 1.5]}, r"short_edge_length .*got \[512, 1.5\]"),
    (T.ResizeShortestEdge, {"short_edge_length": []}, "short_edge_length must be an int or a non-empty list"),
    (T.ResizeShortestEdge, {"short_edge_length": "512"}, "short_edge_length must be an int or a list"),
    (T.ResizeShortestEdge, {"short_edge_length": [-1, 512]}, r"short_edge_length values must be >= 0"),
    (T.ResizeShortestEdge, {"short_edge_length": [1, 2, 3], "sample_style": "range"}, r"\[min, max\]"),
    (T.ResizeShortestEdge, {"short_edge_length": [9, 2], "sample_style": "range"}, "min <= max, got"),
    (T.ResizeShortestEdge, {"max_size": 0}, r"max_size must be a positive int or None \(no cap\), got 0"),
    (T.ResizeShortestEdge, {"max_size": 40.5}, r"max_size must be a positive int or None \(no cap\), got 40.5"),
    (T.ResizeShortestEdge, {"interp": "area"}, "interp must be one of .*got 'area'"),
    (T.RandomCropCategoryArea, {"crop_size": [512, 0]}, "crop_size must be positive"),
    (T.RandomCropCategoryArea, {"crop_size": [1, 2, 3]}, "crop_size must be H,W"),
    (T.RandomCropCategoryArea, {"single_category_max_area": 0}, "single_category_max_area must be .*got 0"),
    (T.RandomCropCategoryArea, {"single_category_max_area": "0.75"}, "single_category_max_area must be"),
    (T.RandomCropCategoryArea, {"ignore_index": 2.5}, "ignore_index must be an int or None, got 2.5"),
    (T.ColorAugSSD, {"brightness_delta": -1}, "brightness_delta must be a number >= 0, got -1"),
    (T.ColorAugSSD, {"contrast_low": 2.0}, "contrast_low / contrast_high .*contrast_low=2.0, contrast_high=1.5"),
    (T.ColorAugSSD, {"saturation_low": -0.5}, "saturation_low / saturation_high .*saturation_low=-0.5"),
    (T.ColorAugSSD, {"hue_delta": 18.5}, "hue_delta must be an int >= 0.*got 18.5"),
    (T.ColorAugSSD, {"hue_delta": -2}, "hue_delta must be an int >= 0.*got -2"),
])
def test_argument_errors(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_unknown_argument_from_yaml_names_the_transform():
    with pytest.raises(ValueError, match="bad arguments for transform ColorAugSSD"):
        T.build_transforms([{"type": "ColorAugSSD", "hue": 18}])
