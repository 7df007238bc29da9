"""Transforms: geometry on a known asymmetric pattern (image and label move together), padding values, PaddleSeg
semantics, Normalize presets, the build_transforms registry, determinism and per-worker reseeding."""
from __future__ import annotations

import numpy as np
import pytest

from paddle_impl import transforms as T

H, W = 12, 20


def pattern(h=H, w=W):
    """Image whose R channel encodes the row, G the column, B = 7; label = (row * w + col) % 200 (unique enough to
    track every pixel, all < 255)."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy * 10, xx * 10, np.full_like(yy, 7)], axis=-1).astype(np.uint8)
    label = ((yy * w + xx) % 200).astype(np.int64)
    return image, label


def assert_moved_together(image, label, w=W):
    """Every non-padded pixel: label agrees with the (row, col) read back from the image."""
    rows, cols = image[..., 0].astype(int) // 10, image[..., 1].astype(int) // 10
    real = (label != 255) & (image[..., 2] == 7)
    assert real.any()
    np.testing.assert_array_equal(label[real], (rows * w + cols)[real] % 200)


# ----------------------------------------------------------------------------------------------------------------------
# geometry


def test_flip_moves_image_and_label_together():
    image, label = pattern()
    img, lbl = T.RandomHorizontalFlip(p=1.0, rng=0)(image, label)
    np.testing.assert_array_equal(img, image[:, ::-1])
    np.testing.assert_array_equal(lbl, label[:, ::-1])
    assert_moved_together(img, lbl)
    img, lbl = T.RandomHorizontalFlip(prob=0.0, rng=0)(image, label)  # PaddleSeg's argument name
    np.testing.assert_array_equal(lbl, label)


def test_random_padding_crop_pads_bottom_right_with_given_values():
    image, label = pattern()
    t = T.RandomPaddingCrop(crop_size=(W + 6, H + 4), im_padding_value=(1, 2, 3), label_padding_value=255, rng=0)
    img, lbl = t(image, label)
    assert img.shape == (H + 4, W + 6, 3) and lbl.shape == (H + 4, W + 6)
    # crop size (W, H) larger than the image: the whole padded image, original at the top-left
    np.testing.assert_array_equal(img[:H, :W], image)
    np.testing.assert_array_equal(lbl[:H, :W], label)
    assert (lbl[H:] == 255).all() and (lbl[:, W:] == 255).all()
    assert (img[H:] == [1, 2, 3]).all() and (img[:, W:] == [1, 2, 3]).all()


def test_random_padding_crop_crops_w_h_order_and_keeps_alignment():
    image, label = pattern()
    seen = set()
    for seed in range(20):
        img, lbl = T.RandomPaddingCrop(crop_size=[8, 5], rng=seed)(image, label)  # (W, H)
        assert img.shape == (5, 8, 3) and lbl.shape == (5, 8)
        assert_moved_together(img, lbl)
        y0, x0 = img[0, 0, 0] // 10, img[0, 0, 1] // 10
        np.testing.assert_array_equal(lbl, label[y0:y0 + 5, x0:x0 + 8])
        seen.add((int(y0), int(x0)))
    assert len(seen) > 5  # offsets are random
    # partially padded: only one side needs padding
    img, lbl = T.RandomPaddingCrop(crop_size=(4, H + 2), im_padding_value=0, rng=1)(image, label)
    assert lbl.shape == (H + 2, 4) and (lbl[H:] == 255).all() and (img[H:] == 0).all()
    assert_moved_together(img, lbl)


def test_random_padding_crop_category_max_ratio():
    label = np.zeros((20, 20), np.int64)
    label[:, 15:] = 1
    image = np.zeros((20, 20, 3), np.uint8)
    t = T.RandomPaddingCrop(crop_size=6, category_max_ratio=0.75, loop_times=50, rng=0)
    for _ in range(10):
        _, lbl = t(image, label)
        counts = np.bincount(lbl.ravel(), minlength=2)
        assert counts.max() / counts.sum() < 0.75


def test_rotate_moves_together_and_pads():
    image, label = pattern(21, 21)
    t = T.RandomRotate(degrees=(90, 90), p=1.0, pad_value=(0, 0, 0), rng=0)
    img, lbl = t(image, label)
    # 90 degrees about (w/2, h/2) (semseg's centre, half a pixel off the pixel-centre one): np.rot90
    # (counter-clockwise, cv2's positive angle) up to a one-pixel shift, image and label alike
    rot = np.rot90(label, 1)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if np.array_equal(lbl[2:-2, 2:-2], rot[2 + dy:19 + dy, 2 + dx:19 + dx])]
    assert len(shifts) == 1
    assert_moved_together(img, lbl, w=21)
    t = T.RandomRotate(degrees=(30, 30), p=1.0, pad_value=(0, 0, 0), rng=0)
    img, lbl = t(image, label)
    assert lbl[0, 0] == 255 and (img[0, 0] == 0).all()  # corners come from outside: ignore / pad value


@pytest.mark.parametrize("cls,kw", [
    (T.RandomScale, {"scale_range": (2.0, 2.0)}),
    (T.ResizeStepScaling, {"min_scale_factor": 2.0, "max_scale_factor": 2.0}),
])
def test_scale_doubles_and_label_is_nearest(cls, kw):
    image, label = pattern()
    img, lbl = cls(**kw, rng=0)(image, label)
    assert img.shape == (2 * H, 2 * W, 3) and lbl.shape == (2 * H, 2 * W)
    np.testing.assert_array_equal(lbl, np.repeat(np.repeat(label, 2, 0), 2, 1))
    assert set(np.unique(lbl)) <= set(np.unique(label))


def test_resize_step_scaling_grid():
    t = T.ResizeStepScaling(0.5, 2.0, 0.25, rng=0)
    assert t.factors() == pytest.approx([0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    image, label = np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40), np.int64)
    sizes = {t(image, label)[1].shape[0] for _ in range(200)}
    assert sizes == {20, 30, 40, 50, 60, 70, 80}
    t = T.ResizeStepScaling(0.5, 1.0, 0.0, rng=0)
    assert t.factors() is None
    assert all(20 <= t(image, label)[1].shape[0] <= 40 for _ in range(20))
    with pytest.raises(ValueError):
        T.ResizeStepScaling(2.0, 1.0)


def test_resize_accepts_paddleseg_target_size_w_h():
    image, label = pattern()
    img, lbl = T.Resize(target_size=(40, 24))(image, label)
    assert img.shape == (24, 40, 3) and lbl.shape == (24, 40)
    assert T.Resize((24, 40)).size == (24, 40)
    with pytest.raises(ValueError, match="exactly one"):
        T.Resize()


# ----------------------------------------------------------------------------------------------------------------------
# photometric


def test_random_distort_changes_image_only_and_keeps_dtype():
    image, label = pattern()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    t = T.RandomDistort(brightness_range=0.4, brightness_prob=1, contrast_range=0.4, contrast_prob=1,
                        saturation_range=0.4, saturation_prob=1, hue_prob=1, rng=0)
    img, lbl = t(image, label)
    assert img.dtype == np.uint8 and img.shape == image.shape
    assert not np.array_equal(img, image)
    np.testing.assert_array_equal(lbl, label)
    img_f, _ = T.RandomDistort(rng=3)(image.astype(np.float32), label)
    assert img_f.dtype == np.float32
    off = T.RandomDistort(brightness_prob=0, contrast_prob=0, saturation_prob=0, hue_prob=0, rng=0)
    np.testing.assert_array_equal(off(image, label)[0], image)
    # brightness alone is PIL's ImageEnhance.Brightness: factor in [0.6, 1.4]
    b = T.RandomDistort(brightness_range=0.4, brightness_prob=1, contrast_prob=0, saturation_prob=0, hue_prob=0,
                        rng=5)
    flat = np.full((4, 4, 3), 100, np.uint8)
    out = b(flat, np.zeros((4, 4), np.int64))[0]
    assert 60 <= out[0, 0, 0] <= 140 and (out == out[0, 0, 0]).all()


def test_normalize_presets():
    px = np.array([[[10, 120, 250]]], np.uint8)
    lbl = np.zeros((1, 1), np.int64)
    semseg = T.Normalize(preset="semseg")(px, lbl)[0][0, 0]
    np.testing.assert_allclose(semseg, (px[0, 0] - np.array(T.SEMSEG_MEAN)) / np.array(T.SEMSEG_STD), rtol=1e-5)
    danet = T.Normalize(preset="danet")(px, lbl)[0][0, 0]
    np.testing.assert_allclose(danet, (px[0, 0] / 255 - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD),
                               rtol=1e-5)
    np.testing.assert_allclose(danet, semseg, rtol=1e-4, atol=1e-5)  # same numbers, different route
    d2 = T.Normalize(preset="detectron2")(px, lbl)[0][0, 0]
    np.testing.assert_allclose(d2, [250 - 103.53, 120 - 116.28, 10 - 123.675], rtol=1e-6)  # BGR, std 1
    assert T.Normalize().mean == T.SEMSEG_MEAN and not T.Normalize().to_bgr  # old default unchanged
    assert T.Normalize(preset="detectron2", to_bgr=False).to_bgr is False  # explicit overrides preset
    with pytest.raises(ValueError, match="preset"):
        T.Normalize(preset="caffe2")


# ----------------------------------------------------------------------------------------------------------------------
# registry


def test_build_transforms_paddleseg_yaml_list():
    import yaml

    specs = yaml.safe_load("""
- type: ResizeStepScaling
  min_scale_factor: 0.5
  max_scale_factor: 2.0
  scale_step_size: 0.25
- type: RandomPaddingCrop
  crop_size: [32, 16]
- type: RandomHorizontalFlip
- type: RandomDistort
  brightness_range: 0.4
  contrast_range: 0.4
  saturation_range: 0.4
- type: Normalize
  preset: semseg
- type: ToCHW
""")
    t = T.build_transforms(specs, seed=0)
    img, lbl = t(*pattern())
    assert img.shape == (3, 16, 32) and img.dtype == np.float32 and lbl.shape == (16, 32)
    assert isinstance(T.build_transforms([{"type": "RandScale", "scale_range": [1, 1]}]).transforms[0],
                      T.RandomScale)


def test_build_transforms_unknown_type_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown transform type 'RandomPadingCrop'; did you mean 'RandomPaddingCrop'"):
        T.build_transforms([{"type": "RandomPadingCrop"}])
    with pytest.raises(ValueError, match=r"did you mean 'ResizeStepScaling'"):
        T.build_transforms([{"type": "resizestepscaling"}])
    with pytest.raises(ValueError, match="bad arguments for transform RandomPaddingCrop"):
        T.build_transforms([{"type": "RandomPaddingCrop", "crop": 3}])
    with pytest.raises(ValueError, match="'type' key"):
        T.build_transforms([{"crop_size": 3}])


# ----------------------------------------------------------------------------------------------------------------------
# determinism


def _pipeline():
    return T.build_transforms([
        {"type": "ResizeStepScaling", "min_scale_factor": 0.5, "max_scale_factor": 2.0, "scale_step_size": 0.25},
        {"type": "RandomPaddingCrop", "crop_size": [16, 10]},
        {"type": "RandomHorizontalFlip"},
        {"type": "RandomDistort"},
    ])


def _stream(t, n=6):
    image, label = pattern()
    return [t(image, label) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def test_seeded_pipeline_is_reproducible():
    a, b = _pipeline(), _pipeline()
    a.reseed(3)
    b.reseed(3)
    assert _same(_stream(a), _stream(b))
    b.reseed(4)
    a.reseed(3)
    assert not _same(_stream(a), _stream(b))


def test_per_worker_reseeding_different_but_reproducible():
    streams = {}
    for worker in (0, 1):
        for epoch in (0, 1):
            for rep in range(2):
                t = _pipeline()
                T.seed_transforms(t, base_seed=11, worker_id=worker, epoch=epoch)
                streams[worker, epoch, rep] = _stream(t)
    for key in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        assert _same(streams[key + (0,)], streams[key + (1,)])  # reproducible
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for i, k in enumerate(keys):
        for k2 in keys[i + 1:]:
            assert not _same(streams[k + (0,)], streams[k2 + (0,)])  # workers and epochs differ


class _DS:
    def __init__(self, transforms):
        self.transforms = transforms

    def __len__(self):
        return 8

    def __getitem__(self, i):
        img, lbl = self.transforms(*pattern())
        return img.astype(np.float32), lbl


def _epoch(seeder, workers):
    import paddle.io

    ds = _DS(_pipeline())
    if workers == 0:
        seeder.main(ds)
    loader = paddle.io.DataLoader(ds, batch_size=2, num_workers=workers, worker_init_fn=seeder, shuffle=False,
                                  return_list=True, use_shared_memory=False)
    return [np.asarray(lbl) for _, lbl in loader]


def test_worker_seeder_with_dataloader():
    s = T.WorkerSeeder(seed=5)
    a = _epoch(s, 2)
    b = _epoch(T.WorkerSeeder(seed=5), 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seed, same epoch: same stream
    s.set_epoch(1)
    c = _epoch(s, 2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c) if x.shape == y.shape)
    # worker 0 draws batches 0 and 2 from the (seed 5, worker 0, epoch 0) stream: the single-process stream
    z = _epoch(T.WorkerSeeder(seed=5), 0)
    np.testing.assert_array_equal(a[0], z[0])
    np.testing.assert_array_equal(a[2], z[1])
