"""Mini datasets in the official layouts: writers, readers, transforms, eval_batch, the synth CLI."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cityscapesscripts.helpers.labels import labels as CS_LABELS

from paddle_impl import transforms as T
from paddle_impl.datasets import (DATASETS, Cityscapes, VOCSegmentation, make_cityscapes_sample, make_voc_sample,
                                  voc_colormap, write_cityscapes, write_voc)
from paddle_impl.datasets.__main__ import main as synth_main

CS_SIZE = (40, 72)
VOC_SIZE = (36, 52)


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs") / "cityscapes"
    summary = write_cityscapes(root, n=3, size=CS_SIZE, seed=7)
    return root, summary


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "voc"
    summary = write_voc(root, n=3, size=VOC_SIZE, seed=3)
    return root, summary


def _independent_trainid(label_id: int) -> int:
    """labelId -> trainId straight from cityscapesscripts' table (not through the reader's LUT)."""
    for lb in CS_LABELS:
        if lb.id == label_id:
            return 255 if lb.trainId in (255, -1) else lb.trainId
    return 255


# ----------------------------------------------------------------------------------------------------------------------
# Cityscapes

def test_cityscapes_layout_official_names(cs_root):
    root, summary = cs_root
    assert summary["splits"]["train"] == {"images": 3, "cities": ["aachen", "bochum"]}
    assert summary["splits"]["val"] == {"images": 3, "cities": ["frankfurt"]}
    for stem, split in (("aachen_000000_000019", "train"), ("bochum_000000_000019", "train"),
                        ("aachen_000001_000019", "train"), ("frankfurt_000002_000019", "val")):
        city = stem.split("_")[0]
        assert (root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png").is_file()
        for suffix in ("labelIds.png", "instanceIds.png", "color.png", "polygons.json"):
            assert (root / "gtFine" / split / city / f"{stem}_gtFine_{suffix}").is_file(), suffix
    img = Image.open(root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png")
    lbl = Image.open(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png")
    assert (img.mode, img.size) == ("RGB", CS_SIZE[::-1])
    assert (lbl.mode, lbl.size) == ("L", CS_SIZE[::-1])
    assert Image.open(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png").mode == "I;16"
    doc = json.loads((root / "gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json").read_text())
    assert (doc["imgHeight"], doc["imgWidth"]) == CS_SIZE
    assert {"car", "license plate", "ego vehicle"} <= {o["label"] for o in doc["objects"]}


def test_cityscapes_label_ids_from_table(cs_root):
    root, summary = cs_root
    valid = {lb.id for lb in CS_LABELS if 0 <= lb.id <= 255}
    present = set(summary["label_ids"])
    assert present <= valid
    # void ids (trainId 255) are written, and a car is in every frame
    assert {0, 1, 26} <= present
    for p in root.glob("gtFine/*/*/*_gtFine_labelIds.png"):
        ids = np.unique(np.array(Image.open(p)))
        assert set(ids.tolist()) <= valid
        assert 26 in ids


def test_cityscapes_pngs_match_cityscapesscripts_rasterisation(cs_root):
    """The JSON polygons, drawn by cityscapesscripts' own code, give exactly the written PNGs."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    root, _ = cs_root
    jsons = sorted(root.glob("gtFine/*/*/*_gtFine_polygons.json"))
    assert len(jsons) == 6
    for j in jsons[:3]:
        ann = Annotation()
        ann.fromJsonFile(str(j))
        base = str(j)[: -len("polygons.json")]
        np.testing.assert_array_equal(np.array(createLabelImage(ann, "ids")), np.array(Image.open(base + "labelIds.png")))
        np.testing.assert_array_equal(np.array(createLabelImage(ann, "color")), np.array(Image.open(base + "color.png")))
        np.testing.assert_array_equal(np.array(createInstanceImage(ann, "ids")),
                                      np.array(Image.open(base + "instanceIds.png")).astype(np.int32))


def test_cityscapes_reader_maps_label_ids_to_train_ids(cs_root):
    root, _ = cs_root
    ds = Cityscapes(root, "train")
    assert len(ds) == 3 and ds.num_classes == 19 and ds.ignore_index == 255
    assert ds.class_names[0] == "road" and ds.class_names[13] == "car" and len(ds.class_names) == 19
    assert [Path(i).name for i, _ in ds.files] == sorted(Path(i).name for i, _ in ds.files)
    # the LUT agrees with the table on every id
    for lid in range(256):
        assert ds.lut[lid] == _independent_trainid(lid), lid
    assert _independent_trainid(26) == 13 and _independent_trainid(0) == 255 and _independent_trainid(7) == 0
    for i in range(len(ds)):
        image, label = ds[i]
        img_path, lbl_path = ds.files[i]
        ids = np.array(Image.open(lbl_path))
        assert image.dtype == np.uint8 and image.shape == CS_SIZE + (3,)
        assert label.dtype == np.int64 and label.shape == CS_SIZE
        np.testing.assert_array_equal(image, np.array(Image.open(img_path)))
        expected = np.vectorize(_independent_trainid)(ids)
        np.testing.assert_array_equal(label, expected)
        assert (label[ids == 26] == 13).all() and (label[ids == 0] == 255).all() and (label[ids == 1] == 255).all()
        assert set(np.unique(label).tolist()) <= set(range(19)) | {255}


def test_cityscapes_round_trip_equals_in_memory_sample(cs_root):
    root, _ = cs_root
    ds = Cityscapes(root, "val")
    s = make_cityscapes_sample(7, "val", 1, CS_SIZE)
    assert Path(ds.files[1][0]).name == "frankfurt_000001_000019_leftImg8bit.png"
    image, label = ds[1]
    np.testing.assert_array_equal(image, s["image"])
    np.testing.assert_array_equal(label, ds.lut[s["label_ids"]])


def test_cityscapes_clear_errors(cs_root, tmp_path):
    root, _ = cs_root
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit[/\\]test.*expected the official layout"):
        Cityscapes(root, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Cityscapes(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="mode"):
        Cityscapes(root, mode="medium")
    # an image without its label: both paths named
    bad = tmp_path / "bad"
    write_cityscapes(bad, n=1, size=(16, 24), splits=("val",))
    lbl = bad / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    lbl.unlink()
    with pytest.raises(FileNotFoundError) as e:
        Cityscapes(bad, "val")
    assert "frankfurt_000000_000019_leftImg8bit.png" in str(e.value) and str(lbl) in str(e.value)
    # zero images
    (bad / "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png").unlink()
    with pytest.raises(FileNotFoundError, match="no images found"):
        Cityscapes(bad, "val")


# ----------------------------------------------------------------------------------------------------------------------
# VOC

def test_voc_colormap_standard():
    cmap = voc_colormap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    assert tuple(cmap[0]) == (0, 0, 0)
    assert tuple(cmap[1]) == (128, 0, 0)
    assert tuple(cmap[2]) == (0, 128, 0)
    assert tuple(cmap[15]) == (192, 128, 128)
    assert tuple(cmap[20]) == (0, 64, 128)
    assert tuple(cmap[255]) == (224, 224, 192)
    assert len({tuple(c) for c in cmap}) == 256


def test_voc_layout_palette_and_round_trip(voc_root):
    root, summary = voc_root
    voc = root / "VOCdevkit" / "VOC2012"
    lists = {s: (voc / "ImageSets/Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval")}
    assert len(lists["train"]) == 3 and len(lists["val"]) == 3
    assert sorted(lists["train"] + lists["val"]) == lists["trainval"]
    assert not set(lists["train"]) & set(lists["val"])
    for image_id in lists["trainval"]:
        assert len(image_id) == 11 and image_id[4] == "_" and image_id[:4].isdigit() and image_id[5:].isdigit()
        assert (voc / "JPEGImages" / f"{image_id}.jpg").is_file()
    png = Image.open(voc / "SegmentationClass" / f"{lists['train'][0]}.png")
    assert png.mode == "P"
    pal = np.array(png.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[15]) == (192, 128, 128) and tuple(pal[255]) == (224, 224, 192)
    assert Image.open(voc / "JPEGImages" / f"{lists['train'][0]}.jpg").format == "JPEG"

    ds = VOCSegmentation(root, "train")
    assert ds.num_classes == 21 and ds.ignore_index == 255 and ds.class_names[15] == "person"
    seen = set()
    for k in range(3):
        image, label = ds[k]
        s = make_voc_sample(3, k, VOC_SIZE)
        assert image.dtype == np.uint8 and image.shape == VOC_SIZE + (3,)
        assert label.dtype == np.int64 and label.shape == VOC_SIZE
        np.testing.assert_array_equal(label, s["label"].astype(np.int64))  # indices, not colours
        # JPEG: the pixel noise is partly lost, the content is not (compare 5x5 local means)
        blur = [cv2.blur(x, (5, 5)).astype(float) for x in (image, s["image"])]
        assert np.abs(blur[0] - blur[1]).mean() < 3
        seen |= set(np.unique(label).tolist())
    assert 255 in seen and 0 in seen and seen <= set(range(21)) | {255}


def test_voc_root_variants_and_list_file(voc_root, tmp_path):
    root, _ = voc_root
    voc = root / "VOCdevkit" / "VOC2012"
    a = VOCSegmentation(root, "val")
    b = VOCSegmentation(root / "VOCdevkit", "val")
    c = VOCSegmentation(voc, "val")
    assert a.files == b.files == c.files and len(a) == 3
    ids = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    lst = tmp_path / "pairs.txt"
    lst.write_text("".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in ids[:2]))
    d = VOCSegmentation(root, list_file=str(lst))
    assert d.files == VOCSegmentation(root, "train").files[:2]


def test_voc_clear_errors(voc_root, tmp_path):
    root, _ = voc_root
    with pytest.raises(FileNotFoundError, match=r"test\.txt not found.*splits present"):
        VOCSegmentation(root, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VOCSegmentation(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no VOC2012 directory"):
        VOCSegmentation(tmp_path)
    # a colour-coded label is refused (never converted)
    bad = tmp_path / "bad"
    write_voc(bad, n=1, size=(16, 16))
    voc = bad / "VOCdevkit/VOC2012"
    image_id = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    p = voc / "SegmentationClass" / f"{image_id}.png"
    Image.open(p).convert("RGB").save(p)
    with pytest.raises(ValueError, match="mode 'RGB'"):
        VOCSegmentation(bad, "train")[0]
    p.unlink()
    with pytest.raises(FileNotFoundError, match="has no label"):
        VOCSegmentation(bad, "train")


# ----------------------------------------------------------------------------------------------------------------------
# writers: determinism, refusal, overwrite

def test_writers_deterministic_and_prefix_stable():
    a = make_cityscapes_sample(5, "train", 2, (32, 48))
    b = make_cityscapes_sample(5, "train", 2, (32, 48))
    c = make_cityscapes_sample(6, "train", 2, (32, 48))
    for k in ("image", "label_ids", "instance_ids"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])
    np.testing.assert_array_equal(make_voc_sample(1, 0, (24, 24))["label"], make_voc_sample(1, 0, (24, 24))["label"])


def test_refuse_non_empty_dir_and_overwrite(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(target)):
        write_voc(target, n=1, size=(16, 16))
    with pytest.raises(FileExistsError, match="non-empty"):
        write_cityscapes(target, n=1, size=(16, 16))
    first = write_cityscapes(target, n=2, size=(16, 16), overwrite=True)
    assert first["removed"] == 0
    second = write_cityscapes(target, n=1, size=(16, 16), overwrite=True)
    assert second["removed"] == first["files"]  # the previous synthetic files, and only them
    assert (target / "keep.txt").read_text() == "user data"
    assert len(Cityscapes(target, "train")) == 1
    with pytest.raises(ValueError, match="size"):
        write_voc(tmp_path / "small", size=(4, 4))
    with pytest.raises(ValueError, match="split"):
        write_cityscapes(tmp_path / "s", splits=("nope",))


# ----------------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cs"
    assert synth_main(["cityscapes", str(out), "--n", "2", "--size", "24,40", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "train" in text and "leftImg8bit/{split}" in text
    assert len(Cityscapes(out, "val")) == 2 and Cityscapes(out, "val")[0][1].shape == (24, 40)
    assert synth_main(["cityscapes", str(out)]) == 2  # non-empty without --overwrite
    assert "non-empty" in capsys.readouterr().err
    assert synth_main(["cityscapes", str(out), "--overwrite", "--n", "1", "--size", "24x40"]) == 0
    assert len(Cityscapes(out, "train")) == 1
    assert synth_main(["voc", str(tmp_path / "v"), "--size", "banana"]) == 2
    assert "--size" in capsys.readouterr().err
    assert synth_main(["voc", str(tmp_path / "v"), "--size", "0,5"]) == 2
    assert synth_main(["voc", str(tmp_path / "v"), "--n", "1"]) == 0
    assert len(DATASETS["voc"](tmp_path / "v", "trainval")) == 2


# ----------------------------------------------------------------------------------------------------------------------
# transforms

def _asym():
    label = np.zeros((6, 8), np.int64)
    label[:, :3] = 1
    label[0, 0] = 7
    image = np.stack([label * 10, label * 20, np.arange(48).reshape(6, 8)], -1).astype(np.uint8)
    return image, label


def test_flip_keeps_alignment():
    image, label = _asym()
    im2, lb2 = T.RandomHorizontalFlip(p=1.0)(image, label)
    np.testing.assert_array_equal(lb2, label[:, ::-1])
    np.testing.assert_array_equal(im2, image[:, ::-1])
    assert lb2[0, -1] == 7 and lb2.dtype == np.int64
    im3, lb3 = T.RandomHorizontalFlip(p=0.0)(image, label)
    np.testing.assert_array_equal(lb3, label)


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


def test_eval_batch(cs_root, voc_root):
    root, _ = cs_root
    ds = Cityscapes(root, "train", transforms=T.semseg_train_transforms((8, 8), seed=0))  # ignored by eval_batch
    images, labels = T.eval_batch(ds, 2, (33, 33))
    assert images.shape == (2, 3, 33, 33) and images.dtype == np.float32 and images.flags.c_contiguous
    assert labels.shape == (2, 33, 33) and labels.dtype == np.int64
    again = T.eval_batch(ds, 2, (33, 33))
    np.testing.assert_array_equal(images, again[0])
    np.testing.assert_array_equal(labels, again[1])
    assert (labels != 255).any() and set(np.unique(labels).tolist()) <= set(range(19)) | {255}
    # cover mode: no padding; fit mode pads with ignore
    assert not (labels == 255).all(axis=(1, 2)).any()
    vimg, vlbl = T.eval_batch(VOCSegmentation(voc_root[0], "val"), 3, (40, 40), mode="fit")
    assert vimg.shape == (3, 3, 40, 40) and (vlbl[:, :2] == 255).all()
    # crop mode on an image of the exact size is the identity (then normalised)
    raw_img, raw_lbl = ds.load(0)
    cimg, clbl = T.eval_batch(ds, 1, CS_SIZE, mode="crop")
    np.testing.assert_array_equal(clbl[0], raw_lbl)
    np.testing.assert_allclose(cimg[0], T.Normalize()(raw_img, raw_lbl)[0].transpose(2, 0, 1), rtol=1e-6)
    with pytest.raises(ValueError, match="has 3"):
        T.eval_batch(ds, 4, (8, 8))


def test_paddle_dataloader_batches(cs_root):
    import paddle

    root, _ = cs_root
    ds = Cityscapes(root, "train", transforms=T.semseg_train_transforms((24, 24), seed=0))
    assert isinstance(ds, paddle.io.Dataset)
    loader = paddle.io.DataLoader(ds, batch_size=2, shuffle=False, num_workers=0, drop_last=True)
    images, labels = next(iter(loader))
    assert images.shape == [2, 3, 24, 24] and str(images.dtype).endswith("float32")
    assert labels.shape == [2, 24, 24] and str(labels.dtype).endswith("int64")


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
