"""Mini datasets in the OFFICIAL Cityscapes / VOC layouts, their readers, the eval batch, and `segtwin synth`."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from paddle_impl.datasets import DATASETS, write_cityscapes, write_voc
from paddle_impl.datasets.__main__ import main as synth_main
from paddle_impl.transforms import SEMSEG_MEAN, SEMSEG_STD, eval_batch


def _cs_table():
    from cityscapesscripts.helpers.labels import labels
    return {l.id: (255 if l.trainId in (255, -1) else l.trainId) for l in labels if l.id >= 0}


def test_cityscapes_layout_and_label_ids(tmp_path):
    write_cityscapes(tmp_path, n=3, size=(33, 65), seed=1)
    imgs = sorted((tmp_path / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    assert len(imgs) == 3
    table = _cs_table()
    seen = set()
    for img in imgs:
        stem = img.name[: -len("_leftImg8bit.png")]
        city = img.parent.name
        assert stem.startswith(city + "_")
        gt = tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"
        assert gt.is_file(), gt
        for extra in ("_gtFine_instanceIds.png", "_gtFine_color.png", "_gtFine_polygons.json"):
            assert (gt.parent / (stem + extra)).is_file(), extra
        im = Image.open(img)
        assert im.mode == "RGB" and im.size == (65, 33)
        lab = np.array(Image.open(gt))
        assert lab.dtype == np.uint8 and lab.shape == (33, 65)
        ids = set(np.unique(lab).tolist())
        assert ids <= set(table), f"label ids not in cityscapesscripts' table: {ids - set(table)}"
        seen |= ids
    assert any(table[i] == 255 for i in seen), "no ignored labelId was written (e.g. 0 unlabeled, 4 static)"
    assert sum(table[i] != 255 for i in seen) >= 2


def test_cityscapes_reader_maps_label_ids_to_train_ids(tmp_path):
    write_cityscapes(tmp_path, n=2, size=(33, 65))
    ds = DATASETS["cityscapes"](str(tmp_path), split="train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.ignore_index == 255
    table = _cs_table()
    lut = np.full(256, 255, np.int64)
    for k, v in table.items():
        lut[k] = v
    for i, (img_path, label_path) in enumerate(ds.files):
        image, label = ds[i]
        raw = np.array(Image.open(label_path))
        assert image.shape == (33, 65, 3) and image.dtype == np.uint8
        assert label.dtype == np.int64
        np.testing.assert_array_equal(label, lut[raw])  # independent per-pixel lookup
    assert lut[26] == 13 and lut[7] == 0 and lut[0] == 255  # car, road, unlabeled


def test_voc_layout_palette_and_reader(tmp_path):
    write_voc(tmp_path, n=3, size=(33, 41), seed=2)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    ids = {s: (voc / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val",
                                                                                            "trainval")}
    assert set(ids["trainval"]) == set(ids["train"]) | set(ids["val"]) and len(ids["val"]) == 3
    for i in ids["val"]:
        assert (voc / "JPEGImages" / f"{i}.jpg").is_file()
        png = Image.open(voc / "SegmentationClass" / f"{i}.png")
        assert png.mode == "P"
        pal = np.array(png.getpalette()[: 256 * 3]).reshape(-1, 3)
        assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[15]) == (192, 128, 128) and tuple(pal[0]) == (0, 0, 0)
        idx = np.array(png)
        assert set(np.unique(idx).tolist()) <= set(range(21)) | {255}
    ds = DATASETS["voc"](str(tmp_path), split="val")
    assert ds.num_classes == 21 and len(ds) == 3
    found_border = False
    for k, (img_path, label_path) in enumerate(ds.files):
        _, label = ds[k]
        np.testing.assert_array_equal(label, np.array(Image.open(label_path)).astype(np.int64))  # indices, not colours
        found_border |= bool((label == 255).any())
    assert found_border, "VOC labels should carry 255 border pixels"


def test_writer_refuses_non_empty_dir_and_reader_names_missing_split(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(Exception, match="non-empty"):
        write_voc(tmp_path, n=1)
    assert (tmp_path / "keep.txt").read_text() == "user data"
    with pytest.raises(Exception) as e:
        DATASETS["cityscapes"](str(tmp_path / "nowhere"), split="val")
    assert "nowhere" in str(e.value)


def test_eval_batch_shapes_and_normalisation(tmp_path):
    write_cityscapes(tmp_path, n=2, size=(40, 80))
    ds = DATASETS["cityscapes"](str(tmp_path), split="val")
    images, labels = eval_batch(ds, 2, (33, 33), SEMSEG_MEAN, SEMSEG_STD)
    assert images.shape == (2, 3, 33, 33) and images.dtype == np.float32
    assert labels.shape == (2, 33, 33) and labels.dtype == np.int64
    assert images.min() > -2.2 and images.max() < 2.7  # (x - mean) / std of 8-bit RGB
    assert set(np.unique(labels).tolist()) <= set(range(19)) | {255}
    again = eval_batch(ds, 2, (33, 33), SEMSEG_MEAN, SEMSEG_STD)
    np.testing.assert_array_equal(images, again[0])
    with pytest.raises(ValueError, match="3"):
        eval_batch(ds, 3, (33, 33))


def test_synth_cli(tmp_path, capsys):
    assert synth_main(["cityscapes", str(tmp_path / "cs"), "--n", "2", "--size", "33,65"]) == 0
    assert len(list((tmp_path / "cs" / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))) == 2
    assert synth_main(["voc", str(tmp_path / "voc"), "--n", "2"]) == 0
    assert (tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").is_file()
    assert synth_main(["voc", str(tmp_path / "voc"), "--n", "2"]) == 2  # non-empty: refused
    assert synth_main(["voc", str(tmp_path / "v2"), "--size", "0,10"]) == 2
    out, err = capsys.readouterr()
    assert "wrote voc" in out and "non-empty" in err and "--size must be positive" in err
