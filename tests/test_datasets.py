"""Mini datasets in the official layouts: writers, readers, eval_batch and the DataLoader over them, the synth CLI.
(The transforms themselves are tested in test_transforms.py.)"""
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
    assert sum(_independent_trainid(i) != 255 for i in present) >= 2  # something to learn besides the car
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
        np.testing.assert_array_equal(np.array(createLabelImage(ann, "ids")),
                                      np.array(Image.open(base + "labelIds.png")))
        np.testing.assert_array_equal(np.array(createLabelImage(ann, "color")),
                                      np.array(Image.open(base + "color.png")))
        np.testing.assert_array_equal(np.array(createInstanceImage(ann, "ids")),
                                      np.array(Image.open(base + "instanceIds.png")).astype(np.int32))


def test_cityscapes_reader_maps_label_ids_to_train_ids(cs_root):
    root, _ = cs_root
    ds = Cityscapes(root, "train")
    assert len(ds) == 3 and ds.num_classes == 19 and ds.ignore_index == 255
    assert DATASETS["cityscapes"](str(root), split="train").files == ds.files  # registry name, str root
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
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        Cityscapes(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
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
    assert tuple(pal[0]) == (0, 0, 0) and tuple(pal[1]) == (128, 0, 0) and tuple(pal[15]) == (192, 128, 128)
    assert tuple(pal[255]) == (224, 224, 192)
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
    val = DATASETS["voc"](str(root), split="val")
    assert val.num_classes == 21 and len(val) == 3
    for k, (_, label_path) in enumerate(val.files):
        np.testing.assert_array_equal(val[k][1], np.array(Image.open(label_path)).astype(np.int64))


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
    assert "--size must be positive" in capsys.readouterr().err
    assert synth_main(["voc", str(tmp_path / "v"), "--n", "1"]) == 0
    assert "wrote voc" in capsys.readouterr().out
    assert len(DATASETS["voc"](tmp_path / "v", "trainval")) == 2


# ----------------------------------------------------------------------------------------------------------------------
# the readers through the transforms: eval_batch, paddle.io.DataLoader

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
    assert images.min() > -2.2 and images.max() < 2.7  # (x - mean) / std of 8-bit RGB, semseg's statistics
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
