"""Dataset readers, extended: Cityscapes labelTrainIds preference, list files, the test split; VOC2007,
reduce_zero_label (20 classes), SBD train_aug; bad-input errors that name the thing."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_impl.datasets import Cityscapes, VOCSegmentation, write_cityscapes, write_voc
from paddle_impl.datasets.synthetic import voc_colormap

SIZE = (24, 40)


@pytest.fixture(scope="module")
def cs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs_ext") / "cityscapes"
    write_cityscapes(root, n=2, size=SIZE, seed=3)
    return root


def _label_paths(root: Path, split="val"):
    return sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))


# ----------------------------------------------------------------------------------------------------------------------
# Cityscapes


def test_cityscapes_prefers_label_train_ids(cs, tmp_path):
    import shutil

    root = tmp_path / "cs"
    shutil.copytree(cs, root)
    ds = Cityscapes(root, "val")
    first = _label_paths(root)[0]
    assert ds.files[0][1] == str(first)
    mapped = ds.load(0)[1]
    # write a labelTrainIds PNG that differs from the mapping (so we can tell which one is read)
    tid = np.where(mapped == 255, 255, (mapped + 1) % 19).astype(np.uint8)
    tid_path = Path(str(first).replace("_labelIds.png", "_labelTrainIds.png"))
    Image.fromarray(tid, "L").save(tid_path)
    ds = Cityscapes(root, "val")
    assert ds.files[0][1] == str(tid_path) and ds.files[1][1].endswith("_labelIds.png")
    np.testing.assert_array_equal(ds.load(0)[1], tid.astype(np.int64))
    assert ds.load(0)[1].dtype == np.int64
    ds = Cityscapes(root, "val", prefer_train_ids=False)
    np.testing.assert_array_equal(ds.load(0)[1], mapped)
    # a trainIds value that is neither a class nor 255: value and file named
    bad = tid.copy()
    bad[0, 0] = 19
    Image.fromarray(bad, "L").save(tid_path)
    with pytest.raises(ValueError, match=rf"{tid_path.name} holds value\(s\) 19 .*0\.\.18.*ignore index 255"):
        Cityscapes(root, "val").load(0)


def test_cityscapes_list_file(cs, tmp_path):
    root = cs
    imgs = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    lbls = sorted((root / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))
    lst = tmp_path / "train_list.txt"
    lst.write_text("".join(f"{i.relative_to(root).as_posix()} {lb.relative_to(root).as_posix()}\n"
                           for i, lb in list(zip(imgs, lbls))[:2]) + "\n")
    ds = Cityscapes(root, "train", list_file=str(lst))
    assert len(ds) == 2 and ds.files[0] == (str(imgs[0]), str(lbls[0]))
    ref = Cityscapes(root, "train")
    np.testing.assert_array_equal(ds.load(0)[1], ref.load(0)[1])  # labelIds entries are mapped
    lst.write_text(f"{imgs[0].relative_to(root).as_posix()}\n")
    with pytest.raises(ValueError, match=r"train_list.txt:1: expected 'IMAGE LABEL'"):
        Cityscapes(root, "train", list_file=str(lst))
    lst.write_text(f"{imgs[0].relative_to(root).as_posix()} gtFine/nope.png\n")
    with pytest.raises(FileNotFoundError, match=r"train_list.txt:1: .*has no label.*nope.png"):
        Cityscapes(root, "train", list_file=str(lst))
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        Cityscapes(root, "train", list_file=str(tmp_path / "missing.txt"))


def test_cityscapes_test_split_without_labels_refused(tmp_path):
    root = tmp_path / "cs"
    write_cityscapes(root, n=1, size=SIZE, splits=("val",))
    os.rename(root / "leftImg8bit" / "val", root / "leftImg8bit" / "test")
    with pytest.raises(FileNotFoundError, match=r"'test' split has no labels.*not public.*cannot be used for training"):
        Cityscapes(root, "test")
    (root / "gtFine" / "test" / "frankfurt").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no labels.*first image without a label: .*_leftImg8bit.png"):
        Cityscapes(root, "test")


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; expected the official layout .*leftImg8bit"):
        Cityscapes(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; expected ROOT/VOCdevkit/VOC2007/"):
        VOCSegmentation(tmp_path / "nowhere", year=2007)


def test_unreadable_and_truncated_images_named(cs, tmp_path):
    import shutil

    root = tmp_path / "cs"
    shutil.copytree(cs, root)
    ds = Cityscapes(root, "val")
    img = Path(ds.files[0][0])
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 3])
    with pytest.raises(OSError, match=img.name):
        ds.load(0)
    img.write_bytes(b"")
    with pytest.raises(OSError, match=img.name):
        ds[0]
    # a truncated JPEG: cv2 would decode it partly grey without an error
    voc = tmp_path / "voc"
    write_voc(voc, n=1, size=(32, 32))
    v = VOCSegmentation(voc, "train")
    jpg = Path(v.files[0][0])
    data = jpg.read_bytes()
    jpg.write_bytes(data[:-2])  # only the end-of-image marker missing
    with pytest.raises(OSError, match=rf"{jpg.name}.*truncated"):
        v.load(0)
    jpg.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(OSError, match=rf"{jpg.name}.*truncated"):
        v.load(0)


# ----------------------------------------------------------------------------------------------------------------------
# VOC


@pytest.fixture(scope="module")
def voc07(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc07")
    summary = write_voc(root, n=2, size=(20, 28), seed=1, year=2007)
    return root, summary


def test_voc2007_layout_and_reduce_zero_label(voc07):
    root, summary = voc07
    assert (root / "VOCdevkit" / "VOC2007" / "JPEGImages").is_dir() and summary["year"] == 2007
    full = VOCSegmentation(root, "train", year=2007)
    assert full.voc_dir.endswith("VOC2007") and full.num_classes == 21
    with pytest.raises(FileNotFoundError, match="no VOC2012 directory"):
        VOCSegmentation(root, "train")  # default year 2012
    red = VOCSegmentation(root, "train", year=2007, reduce_zero_label=True)
    assert red.num_classes == 20 and len(red.class_names) == 20 and red.class_names[0] == "aeroplane"
    assert VOCSegmentation.num_classes == 21  # the class attribute is untouched
    for i in range(len(full)):
        raw, lbl = full.load(i)[1], red.load(i)[1]
        exp = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        np.testing.assert_array_equal(lbl, exp)
        assert lbl.dtype == np.int64 and set(np.unique(lbl)) <= set(range(20)) | {255}


def test_reduce_zero_label_exact_mapping(tmp_path):
    root = tmp_path / "v"
    write_voc(root, n=1, size=(8, 8), year=2007)
    voc = root / "VOCdevkit" / "VOC2007"
    image_id = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    raw = np.array([[0, 1, 2, 3, 19, 20, 255, 0]] * 8, np.uint8)
    im = Image.fromarray(raw, "P")
    im.putpalette(voc_colormap().reshape(-1).tolist())
    im.save(voc / "SegmentationClass" / f"{image_id}.png")
    lbl = VOCSegmentation(root, "train", year=2007, reduce_zero_label=True).load(0)[1]
    np.testing.assert_array_equal(lbl[0], [255, 0, 1, 2, 18, 19, 255, 255])
    # a value that is neither a class nor 255: value and file named
    raw[1, 1] = 21
    raw[2, 2] = 200
    im = Image.fromarray(raw, "P")
    im.putpalette(voc_colormap().reshape(-1).tolist())  # (PIL writes a palette-less "P" image as 1-bit)
    im.save(voc / "SegmentationClass" / f"{image_id}.png")
    with pytest.raises(ValueError,
                       match=rf"{image_id}.png holds value\(s\) 21, 200 that are neither a class \(0\.\.20\)"):
        VOCSegmentation(root, "train", year=2007).load(0)


def _write_aug(root: Path, ids):
    voc = root / "VOCdevkit" / "VOC2012"
    aug = voc / "SegmentationClassAug"
    aug.mkdir()
    for k, i in enumerate(ids):
        Image.fromarray(np.full((16, 16), k % 21, np.uint8), "L").save(aug / f"{i}.png")  # index PNGs, mode L
    return voc


def test_sbd_train_aug_dir_and_list(tmp_path):
    root = tmp_path / "v"
    write_voc(root, n=2, size=(16, 16))
    voc = root / "VOCdevkit" / "VOC2012"
    split = lambda s: (voc / "ImageSets/Segmentation" / f"{s}.txt").read_text().split()  # noqa: E731
    train, val = split("train"), split("val")
    with pytest.raises(FileNotFoundError, match=r"train_aug.txt or the SBD label directory .*SegmentationClassAug"):
        VOCSegmentation(root, "train_aug")
    _write_aug(root, train + val)
    ds = VOCSegmentation(root, "train_aug")  # no list: every aug PNG not in val.txt
    assert [Path(i).stem for i, _ in ds.files] == sorted(train)
    assert all("SegmentationClassAug" in lbl for _, lbl in ds.files)
    assert ds.load(0)[1].shape == (16, 16)
    # PaddleSeg / semseg style list (leading '/' tolerated), train_aug.txt picked up by split name
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in train + val[:1]))
    ds = VOCSegmentation(root, "train_aug")
    assert len(ds) == 3 and ds.files[2][1].endswith(f"SegmentationClassAug/{val[0]}.png")
    ds = VOCSegmentation(root, "x", list_file="ImageSets/Segmentation/train_aug.txt")  # relative to VOC2012
    assert len(ds) == 3


def test_existing_api_unchanged(tmp_path):
    write_voc(tmp_path, n=1, size=(16, 16))
    ds = VOCSegmentation(str(tmp_path), "train", None, None)
    assert ds.num_classes == 21 and ds.ignore_index == 255 and ds.class_names[0] == "background"
    assert len(ds.files) == 1 and ds.load(0)[0].shape == (16, 16, 3)
