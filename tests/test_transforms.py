"""Transforms: geometry on a known asymmetric pattern (image and label move together), padding values, PaddleSeg
semantics, Normalize presets, the build_transforms registry, determinism and per-worker reseeding; semseg's
pad/crop/rotate/scale and its train pipeline; DANet's RandomResizeLong and RandomColorJitter."""
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
    assert lbl.dtype == np.int64
    img, lbl = T.RandomHorizontalFlip(prob=0.0, rng=0)(image, label)  # PaddleSeg's argument name
    np.testing.assert_array_equal(lbl, label)
    img, lbl = T.RandomHorizontalFlip(p=0.0)(image, label)
    np.testing.assert_array_equal(img, image)
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
    with pytest.raises(ValueError,
                       match=r"unknown transform type 'RandomPadingCrop'; did you mean 'RandomPaddingCrop'"):
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


# ----------------------------------------------------------------------------------------------------------------------
# semseg's transforms on a small asymmetric label (pad / crop values, label values kept, seeded pipeline)

def _asym():
    label = np.zeros((6, 8), np.int64)
    label[:, :3] = 1
    label[0, 0] = 7
    image = np.stack([label * 10, label * 20, np.arange(48).reshape(6, 8)], -1).astype(np.uint8)
    return image, label


def test_pad_and_crops_use_ignore_and_mean():
    image, label = _asym()
    im, lb = T.PadToSize((10, 12))(image.astype(np.float32), label)
    assert lb.shape == (10, 12) and im.shape == (10, 12, 3)
    assert (lb[:2] == 255).all() and (lb[-2:] == 255).all() and (lb[:, :2] == 255).all()
    np.testing.assert_array_equal(lb[2:8, 2:10], label)
    np.testing.assert_allclose(im[0, 0], T.SEMSEG_MEAN, rtol=1e-6)
    np.testing.assert_array_equal(im[2:8, 2:10], image)
    im, lb = T.PadToSize((10, 12))(image, label)  # uint8: mean rounded
    assert tuple(im[0, 0]) == tuple(int(round(m)) for m in T.SEMSEG_MEAN)
    im, lb = T.CenterCrop((4, 4))(image, label)
    np.testing.assert_array_equal(lb, label[1:5, 2:6])
    np.testing.assert_array_equal(im, image[1:5, 2:6])
    im, lb = T.RandomCrop((8, 8), rng=0)(image, label)
    assert lb.shape == (8, 8) and (lb == 255).sum() == 8 * 8 - 6 * 8
    # the crop window lands on the same pixels of image and label
    for seed in range(5):
        im, lb = T.RandomCrop((3, 5), rng=seed)(image, label)
        ys, xs = np.nonzero(np.all(image == im[0, 0], axis=-1) & (label == lb[0, 0]))
        assert any((image[y:y + 3, x:x + 5] == im).all() and (label[y:y + 3, x:x + 5] == lb).all()
                   for y, x in zip(ys, xs))


def test_rotate_scale_resize_keep_label_values_and_alignment():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 19, (30, 40)).astype(np.int64)
    image = np.repeat((label * 12).astype(np.uint8)[..., None], 3, -1)  # image encodes the label
    for t in (T.RandomRotate(25, p=1.0, rng=1), T.RandomScale((0.5, 2.0), rng=2), T.Resize((17, 23), "nearest")):
        im, lb = t(image, label)
        assert lb.dtype == np.int64 and im.shape[:2] == lb.shape
        valid = lb != 255
        assert set(np.unique(lb[valid]).tolist()) <= set(range(19))
        if isinstance(t, T.RandomRotate):
            assert (lb == 255).any()  # corners filled with ignore
            assert lb[0, 0] == 255 and tuple(im[0, 0]) == tuple(int(round(m)) for m in T.SEMSEG_MEAN)
        if isinstance(t, T.Resize):  # both nearest: image still encodes the label exactly
            np.testing.assert_array_equal(im[..., 0], (lb * 12).astype(np.uint8))
    # a rotation by 0 degrees is the identity
    im, lb = T.RandomRotate((0, 0), p=1.0)(image, label)
    np.testing.assert_array_equal(lb, label)


def test_random_transforms_deterministic_under_seed():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3)).astype(np.uint8)
    label = rng.integers(0, 19, (48, 64)).astype(np.int64)
    state = np.random.get_state()
    outs = []
    for _ in range(2):
        tf = T.semseg_train_transforms((32, 32), seed=123)
        outs.append([tf(image, label) for _ in range(4)])
    for (ia, la), (ib, lb) in zip(*outs):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert ia.shape == (3, 32, 32) and ia.dtype == np.float32 and la.shape == (32, 32) and la.dtype == np.int64
    assert not all(np.array_equal(outs[0][0][1], o[1]) for o in outs[0][1:])  # draws differ between calls
    other = T.semseg_train_transforms((32, 32), seed=124)
    assert not all(np.array_equal(a[0], other(image, label)[0]) for a in outs[0])
    assert np.all(np.random.get_state()[1] == state[1])  # the global numpy state is untouched
    # state_dict / set_state_dict resume the exact stream
    tf = T.semseg_train_transforms((32, 32), seed=9)
    tf(image, label)
    saved = tf.state_dict()
    nxt = tf(image, label)
    tf2 = T.semseg_train_transforms((32, 32), seed=0)
    tf2.set_state_dict(saved)
    again = tf2(image, label)
    np.testing.assert_array_equal(nxt[0], again[0])
    np.testing.assert_array_equal(nxt[1], again[1])


def test_normalize_and_build_transforms():
    image = np.full((2, 2, 3), 255, np.uint8)
    image[..., 0] = 0
    im, _ = T.Normalize()(image, np.zeros((2, 2), np.int64))
    np.testing.assert_allclose(im[0, 0], (np.array([0, 255, 255]) - np.array(T.SEMSEG_MEAN)) / np.array(T.SEMSEG_STD),
                               rtol=1e-6)
    im, _ = T.Normalize(T.DETECTRON2_MEAN_BGR, T.DETECTRON2_STD_BGR, to_bgr=True)(image, np.zeros((2, 2), np.int64))
    np.testing.assert_allclose(im[0, 0], np.array([255, 255, 0]) - np.array(T.DETECTRON2_MEAN_BGR), rtol=1e-6)
    tf = T.build_transforms([{"type": "RandomHorizontalFlip", "p": 1.0}, {"type": "Normalize"}, {"type": "ToCHW"}],
                            seed=0)
    im, lb = tf(image, np.zeros((2, 2), np.int64))
    assert im.shape == (3, 2, 2) and im.dtype == np.float32
    with pytest.raises(ValueError, match="unknown transform"):
        T.build_transforms([{"type": "Nope"}])




class _CropProbe:
    """Map-style dataset whose sample is the top-left pixel of a random crop of a 10x10 ramp (reveals the draw)."""

    def __init__(self):
        self.transforms = T.Compose([T.RandomCrop((4, 4))], seed=0)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        img = np.arange(100, dtype=np.float32).reshape(10, 10, 1)
        return self.transforms(img, np.zeros((10, 10), np.int64))[0][0, 0, 0]


def test_reseed_worker_gives_workers_distinct_reproducible_streams():
    import paddle

    class Probe(_CropProbe, paddle.io.Dataset):
        pass

    state = np.random.get_state()
    try:
        runs = {}
        for fn in (None, T.reseed_worker, T.reseed_worker):
            np.random.seed(0)  # the loader's base seed comes from numpy's global state
            loader = paddle.io.DataLoader(Probe(), batch_size=1, num_workers=2, worker_init_fn=fn)
            runs.setdefault(fn, []).append([float(x.item()) for x in loader])
    finally:
        np.random.set_state(state)
    plain = runs[None][0]
    assert plain[0::2] == plain[1::2]  # without it, both workers replay the same augmentations
    a, b = runs[T.reseed_worker]
    assert a == b and a[0::2] != a[1::2]


# ----------------------------------------------------------------------------------------------------------------------
# RandomResizeLong

@pytest.mark.parametrize("shape,base,expect", [
    ((50, 80), 100, (63, 100)),    # short 50*100/80 = 62.5 -> int(63.0) = 63 (round() would give 62)
    ((80, 50), 100, (100, 63)),    # portrait: the height is the long side
    ((40, 40), 30, (30, 30)),      # square
    ((30, 97), 200, (62, 200)),    # 30*200/97 = 61.86 -> 62
])
def test_resize_long_sizes(shape, base, expect):
    t = T.RandomResizeLong(base, scale_range=(1.0, 1.0), rng=0)
    img = np.zeros(shape + (3,), np.uint8)
    x, y = t(img, np.zeros(shape, np.int64))
    assert x.shape == expect + (3,) and y.shape == expect


def test_resize_long_draws_every_integer_of_the_inclusive_range():
    t = T.RandomResizeLong(40, scale_range=(0.75, 2.0), rng=123)
    assert t.long_range == (30, 80)
    img = np.zeros((6, 10, 3), np.uint8)
    lbl = np.zeros((6, 10), np.int64)
    longs = []
    for _ in range(3000):
        x, y = t(img, lbl)
        longs.append(x.shape[1])
        assert x.shape[0] == int(6 * x.shape[1] / 10 + 0.5) and y.shape == x.shape[:2]
    assert set(longs) == set(range(30, 81))  # 51 values, 3000 draws: both ends included, nothing outside
    # roughly uniform: no value more than twice as frequent as another
    counts = np.bincount(longs)[30:]
    assert counts.max() < 2 * counts.min()


def test_resize_long_label_nearest_and_image_linear():
    rng = np.random.default_rng(1)
    lbl = rng.choice([0, 7, 255], size=(12, 16)).astype(np.int64)
    img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    t = T.RandomResizeLong(16, scale_range=(2.0, 2.0), rng=0)
    x, y = t(img, lbl)
    assert y.shape == (24, 32) and y.dtype == np.int64 and set(np.unique(y)) <= {0, 7, 255}
    assert np.array_equal(y[::2, ::2], lbl)  # x2 nearest: every source pixel becomes a 2x2 block
    assert x.dtype == np.uint8 and x.shape == (24, 32, 3)


@pytest.mark.parametrize("kw,match", [({"base_size": 0}, "base_size"), ({"base_size": 10, "scale_range": (2, 1)},
                                      "scale_range"), ({"base_size": 10, "scale_range": (0.01, 1)}, "below one pixel")])
def test_resize_long_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        T.RandomResizeLong(**kw)


def test_danet_pad_crop_pads_label_with_ignore():
    """The recipe's crop after a downscale: image padded bottom/right with black, label with 255."""
    t = T.Compose([T.RandomResizeLong(20, scale_range=(1.0, 1.0)),
                   T.RandomPaddingCrop(crop_size=(24, 24), im_padding_value=(0, 0, 0), label_padding_value=255)],
                  seed=0)
    img = np.full((10, 40, 3), 200, np.uint8)
    lbl = np.full((10, 40), 3, np.int64)
    x, y = t(img, lbl)  # resized to 5 x 20, padded to 24 x 24
    assert x.shape == (24, 24, 3) and y.shape == (24, 24)
    assert (y[:5, :20] == 3).all() and (y[5:] == 255).all() and (y[:, 20:] == 255).all()
    assert (x[:5, :20] == 200).all() and (x[5:] == 0).all() and (x[:, 20:] == 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# RandomColorJitter

def _rgb(seed=0, h=6, w=7, hi=150):
    return np.random.default_rng(seed).integers(0, hi, (h, w, 3)).astype(np.uint8)


def test_jitter_fixed_factors_match_hand_formulas():
    img = _rgb().astype(np.float32)
    lbl = np.arange(42).reshape(6, 7)
    off = dict(brightness=0, contrast=0, saturation=0, hue=0)
    gray = 0.2989 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]

    x, y = T.RandomColorJitter(p=1, **dict(off, brightness=(0.5, 0.5)), rng=0)(img, lbl)
    np.testing.assert_allclose(x, img * 0.5, rtol=1e-6)
    assert y is lbl  # the label is never touched
    x, _ = T.RandomColorJitter(p=1, **dict(off, contrast=(0.5, 0.5)), rng=0)(img, lbl)
    np.testing.assert_allclose(x, 0.5 * img + 0.5 * gray.mean(), rtol=1e-5)
    x, _ = T.RandomColorJitter(p=1, **dict(off, saturation=(0.0, 0.0)), rng=0)(img, lbl)
    for c in range(3):
        np.testing.assert_allclose(x[..., c], gray, rtol=1e-5, atol=1e-3)
    # brightness 2 clips at 255
    x, _ = T.RandomColorJitter(p=1, **dict(off, brightness=(2.0, 2.0)), rng=0)(np.full((2, 2, 3), 200.0, np.float32),
                                                                               lbl[:2, :2])
    assert (x == 255).all()


@pytest.mark.parametrize("hue,expect", [(1 / 3, (0, 255, 0)), (-1 / 3, (0, 0, 255)), (0.5, (0, 255, 255))])
def test_jitter_hue_rotates_colours_and_keeps_grey(hue, expect):
    t = T.RandomColorJitter(p=1, brightness=0, contrast=0, saturation=0, hue=(hue, hue), rng=0)
    img = np.array([[[255, 0, 0], [90, 90, 90]]], np.uint8)  # red, grey
    x, _ = t(img, np.zeros((1, 2), np.int64))
    assert x.dtype == np.uint8
    assert tuple(int(v) for v in x[0, 0]) == expect
    assert tuple(int(v) for v in x[0, 1]) == (90, 90, 90)


def test_jitter_factor_ranges():
    """brightness 0.4 only: every output is the input times one factor drawn in [0.6, 1.4], spread over the range."""
    img = _rgb(3).astype(np.float32) + 1
    t = T.RandomColorJitter(p=1, brightness=0.4, contrast=0, saturation=0, hue=0, rng=5)
    factors = []
    for _ in range(400):
        x, _ = t(img, np.zeros(img.shape[:2], np.int64))
        f = x / img
        assert np.ptp(f) < 1e-5
        factors.append(float(f.mean()))
    assert 0.6 <= min(factors) < 0.65 and 1.35 < max(factors) <= 1.4
    assert T.RandomColorJitter(brightness=0.4).brightness == (0.6, 1.4)
    assert T.RandomColorJitter(brightness=1.5).brightness == (0.0, 2.5)  # torchvision: max(0, 1 - b)
    assert T.RandomColorJitter(hue=0.1).hue == (-0.1, 0.1)
    assert T.RandomColorJitter(brightness=0, contrast=(1, 1), saturation=0, hue=0).brightness is None


def test_jitter_probability_gate():
    img = _rgb(1)
    lbl = np.zeros(img.shape[:2], np.int64)

    def changed_fraction(p, seed, n=1000):
        t = T.RandomColorJitter(p=p, rng=seed)
        return np.mean([not np.array_equal(t(img, lbl)[0], img) for _ in range(n)])

    assert changed_fraction(0.0, 0) == 0.0
    assert changed_fraction(1.0, 0, 200) == 1.0
    frac = changed_fraction(0.3, 7)
    assert 0.25 < frac < 0.35  # binomial(1000, 0.3): sd 0.0145
    # same seed, same decisions and outputs
    a, b = T.RandomColorJitter(p=0.3, rng=11), T.RandomColorJitter(p=0.3, rng=11)
    for _ in range(50):
        assert np.array_equal(a(img, lbl)[0], b(img, lbl)[0])


def test_jitter_dtypes_and_bad_arguments():
    img = _rgb(2)
    lbl = np.zeros(img.shape[:2], np.int64)
    t = T.RandomColorJitter(p=1, rng=0)
    assert t(img, lbl)[0].dtype == np.uint8
    assert t(img.astype(np.float32), lbl)[0].dtype == np.float32
    for kw, match in [({"brightness": -0.1}, "brightness"), ({"hue": 0.7}, "hue"), ({"contrast": (1.5, 1.2)},
                      "contrast"), ({"p": 1.5}, "p must be"), ({"saturation": "x"}, "saturation")]:
        with pytest.raises(ValueError, match=match):
            T.RandomColorJitter(**kw)
    with pytest.raises(ValueError, match="HxWx3"):
        t(img[..., :1], lbl)


def test_registered_for_configs():
    c = T.build_transforms([{"type": "RandomResizeLong", "base_size": 64},
                            {"type": "RandomColorJitter", "p": 0.5, "hue": 0.0}])
    assert [type(t).__name__ for t in c.transforms] == ["RandomResizeLong", "RandomColorJitter"]
    with pytest.raises(ValueError, match="RandomColorJitter"):
        T.build_transforms([{"type": "RandomColorJiter"}])


# ----------------------------------------------------------------------------------------------------------------------
# resume / reseed determinism of a DANet-like pipeline (the recipe's transforms)

def _danet_pipeline(seed):
    return T.Compose([T.RandomHorizontalFlip(0.5), T.RandomResizeLong(32, scale_range=(0.75, 2.0)),
                      T.RandomColorJitter(p=0.5), T.RandomGaussianBlur(p=0.3),
                      T.RandomPaddingCrop(crop_size=(33, 33), im_padding_value=(0, 0, 0)), T.Normalize(),
                      T.ToCHW()], seed=seed)


def test_state_dict_resume_and_reseed_are_exact():
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), rng.integers(0, 19, (20, 30)).astype(np.int64))
               for _ in range(6)]
    a = _danet_pipeline(5)
    first = [a(*s) for s in samples[:3]]
    state = a.state_dict()
    rest = [a(*s) for s in samples[3:]]
    b = _danet_pipeline(999)  # another seed, then the saved state: continues exactly
    b.set_state_dict(state)
    for (x1, y1), s in zip(rest, samples[3:]):
        x2, y2 = b(*s)
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    a.reseed(5)  # reseeding replays from the start
    for (x1, y1), s in zip(first, samples[:3]):
        x2, y2 = a(*s)
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    c = _danet_pipeline(6)
    outs = [c(*s)[0] for s in samples[:3]]
    assert any(not np.array_equal(o, f[0]) for o, f in zip(outs, first))
