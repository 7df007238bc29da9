"""Evaluation, prediction, export/inference (paddle_impl.engine.{evaluator,predictor,exporter}).

Fast: tiny custom Paddle models for the exactness checks, PSPNet-R50 only at 33x33 (export / size rule).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

from paddle_impl.engine import evaluator as ev
from paddle_impl.engine import exporter, predictor

ROOT = Path(__file__).resolve().parents[1]


class Conv1x1(paddle.nn.Layer):
    """Per-pixel linear classifier: its logits commute with flips and windows (exactness tests)."""

    def __init__(self, classes: int = 19, seed: int = 0):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, classes, 1)
        rng = np.random.RandomState(seed)
        self.conv.weight.set_value(rng.randn(classes, 3, 1, 1).astype("float32") * 2)
        self.conv.bias.set_value(rng.randn(classes).astype("float32"))

    def forward(self, x):
        return self.conv(x)


class ListDataset:
    def __init__(self, samples, files=None, class_names=None):
        self.samples = samples
        self.files = files or [(f"img{i}.png", f"lbl{i}.png") for i in range(len(samples))]
        if class_names is not None:
            self.class_names = class_names

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        return self.samples[i]


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    from paddle_impl.datasets import write_cityscapes

    root = tmp_path_factory.mktemp("cs")
    write_cityscapes(root, n=3, size=(48, 96), splits=("val",), seed=3)
    return root


@pytest.fixture(scope="module")
def cs_val(cityscapes_root):
    from paddle_impl.datasets import Cityscapes

    return Cityscapes(cityscapes_root, "val")


# ----------------------------------------------------------------------------------------------------------------------
# (a) IoU == cityscapesscripts


def test_iou_equals_cityscapesscripts(cs_val, tmp_path):
    from cityscapesscripts.helpers.labels import labels
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cseval

    train2label = {}
    for lb in labels:
        if 0 <= lb.trainId < 255 and lb.trainId not in train2label:
            train2label[lb.trainId] = lb
    lut = np.zeros(256, np.uint8)
    for t, lb in train2label.items():
        lut[t] = lb.id

    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    preds, gts = [], []

    def write(i, pred):
        p = pred_dir / (Path(cs_val.files[i][0]).name.replace("_leftImg8bit.png", "_pred_labelIds.png"))
        Image.fromarray(lut[pred].astype(np.uint8)).save(p)
        preds.append(str(p))
        gts.append(cs_val.files[i][1])

    model = Conv1x1(19, seed=1)
    res = ev.evaluate(model, cs_val, 19, progress=False, on_prediction=write)
    assert res["num_images"] == len(cs_val) == 3
    assert len(res["IoU"]) == 19 and np.asarray(res["confusion_matrix"]).shape == (19, 19)
    pred_classes = {c for c in range(19) if np.asarray(res["confusion_matrix"])[:, c].sum()}
    assert len(pred_classes) >= 3, "the tiny model should predict several classes"

    args = copy.deepcopy(cseval.args)
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.quiet = True
    args.colorized = False
    args.bold = args.nocol = ""
    args.predictionPath = str(pred_dir)
    args.predictionWalk = None
    args.groundTruthSearch = os.path.join(cs_val.root, "gtFine", "val", "*", "*_gtFine_labelIds.png")
    args.exportFile = str(tmp_path / "cs.json")
    out = cseval.evaluateImgLists(preds, gts, args)
    scores = out["classScores"]
    compared = 0
    for t, lb in train2label.items():
        theirs = scores[lb.name]
        ours = res["IoU"][t]
        cm = np.asarray(res["confusion_matrix"])
        present = cm[t, :].sum() + cm[:, t].sum() > 0
        if not present:
            assert np.isnan(theirs) and ours == 0.0
            continue
        assert abs(theirs - ours) <= 1e-12, (lb.name, theirs, ours)
        compared += 1
    assert compared >= 3
    their_mean = np.nanmean([scores[lb.name] for lb in train2label.values()])
    assert abs(their_mean - res["mIoU"]) <= 1e-12


# ----------------------------------------------------------------------------------------------------------------------
# (b) flip / slide / multi-scale


def _image(seed=0, h=37, w=53):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (h, w, 3)).astype(np.uint8)


def _same(a, b):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert np.array_equal(a.argmax(0), b.argmax(0))


def test_flip_and_slide_equal_whole():
    model = Conv1x1(7)
    model.eval()
    img = _image()
    whole = ev.predict_logits(model, img)
    assert whole.shape == (7, 37, 53) and whole.dtype == np.float64
    np.testing.assert_allclose(whole.sum(0), 1.0, atol=1e-6)
    # equal up to float32 rounding (a batch of 2 / a window may take another SIMD path than the whole image),
    # and the predictions are identical
    _same(ev.predict_logits(model, img, flip=True), whole)
    # windows smaller than the image in both directions, with an uneven last window; and a crop larger than the image
    for crop, stride in [((17, 21), None), (16, (5, 9)), (64, None)]:
        slide = ev.predict_logits(model, img, mode="slide", crop=crop, stride=stride, flip=True)
        _same(slide, whole)
    # the same scale twice is the single-scale result
    np.testing.assert_allclose(ev.predict_logits(model, img, scales=(1.0, 1.0)), whole, rtol=0, atol=1e-15)


def test_multiscale_uniform_image_and_dataset(cs_val):
    model = Conv1x1(19, seed=2)
    flat = np.full((24, 40, 3), (90, 140, 200), np.uint8)
    whole = ev.predict_logits(model, flat)
    ms = ev.predict_logits(model, flat, flip=True, scales=(0.5, 0.75, 1.0, 1.25, 1.5))
    np.testing.assert_allclose(ms, whole, rtol=0, atol=1e-6)

    r_whole = ev.evaluate(model, cs_val, 19, progress=False)
    r_ms = ev.evaluate(model, cs_val, 19, progress=False, flip=True, scales=(0.75, 1.0, 1.25))
    r_slide = ev.evaluate(model, cs_val, 19, progress=False, mode="slide", crop=33, flip=True)
    assert r_slide["confusion_matrix"] == r_whole["confusion_matrix"]
    assert r_slide["IoU"] == r_whole["IoU"]
    cm_w, cm_m = np.asarray(r_whole["confusion_matrix"]), np.asarray(r_ms["confusion_matrix"])
    assert cm_w.sum() == cm_m.sum()
    assert abs(r_ms["mIoU"] - r_whole["mIoU"]) < 0.05  # resampling changes only pixels at edges
    assert r_ms["settings"]["scales"] == [0.75, 1.0, 1.25] and r_ms["settings"]["flip"] is True


def test_options_are_checked():
    model = Conv1x1(3)
    img = _image()
    with pytest.raises(ValueError, match="crop"):
        ev.predict_logits(model, img, mode="slide")
    with pytest.raises(ValueError, match="mode"):
        ev.predict_logits(model, img, mode="tiles")
    with pytest.raises(ValueError, match="scales"):
        ev.predict_logits(model, img, scales=(0.0,))


def test_size_rule_padding_and_zoom():
    """A model with a size rule (PSPNet-like: (H-1)%8==0) and an output smaller than its input."""

    class Ruled(Conv1x1):
        seen = []

        @staticmethod
        def check_input(h, w):
            if (h - 1) % 8 or (w - 1) % 8:
                raise ValueError(f"bad size {h}x{w}")

        def forward(self, x):
            h, w = x.shape[2], x.shape[3]
            self.check_input(h, w)
            Ruled.seen.append((h, w))
            y = self.conv(x)
            return paddle.nn.functional.interpolate(y, size=[(h - 1) // 2 + 1, (w - 1) // 2 + 1], mode="bilinear",
                                                    align_corners=True)

    assert ev.valid_size(37, 53, Ruled.check_input) == (41, 57)
    model = Ruled(5)
    model.eval()
    img = _image()
    p = ev.predict_logits(model, img, flip=True)
    assert Ruled.seen[-1] == (41, 57)
    assert p.shape == (5, 37, 53)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)
    # without the rule the model rejects the size
    with pytest.raises(ValueError, match="bad size"):
        ev.predict_logits(model, img, size_rule=None)
    # slide with a crop the rule rejects: windows are padded
    ps = ev.predict_logits(model, img, mode="slide", crop=20)
    assert ps.shape == (5, 37, 53) and Ruled.seen[-1] == (25, 25)


# ----------------------------------------------------------------------------------------------------------------------
# (c) export + paddle.inference == dynamic (PSPNet R50, 33x33)


@pytest.fixture(scope="module")
def psp():
    import paddle_impl

    paddle.seed(0)
    m = paddle_impl.build_model("pspnet", num_classes=5, layers=50)
    m.eval()
    return m


@pytest.mark.slow
def test_export_infer_equals_dynamic(psp, tmp_path):
    from alignment.utils import set_threads

    # The same CPU thread count on both sides: dygraph follows OMP_NUM_THREADS, a predictor defaults to 1 thread, and
    # at 1 vs 2 threads the float32 GEMMs round differently (measured 1.7e-5 on logits of |18|). With equal counts
    # the exported program computes the very same numbers (measured max |diff| 0.0 at 1 and at 2 threads).
    before = int(os.environ.get("OMP_NUM_THREADS") or 1)
    set_threads(2, ("paddle",))
    try:
        x = np.random.RandomState(0).randn(1, 3, 33, 33).astype("float32")
        with paddle.no_grad():
            ref = psp(paddle.to_tensor(x)).numpy()
    finally:
        set_threads(before, ("paddle",))
    files = exporter.export(psp, tmp_path / "psp", (1, 3, 33, 33))
    assert os.path.isfile(files["model"]) and files["params"].endswith(".pdiparams")
    out = exporter.infer(tmp_path / "psp", x, threads=2)
    assert out.shape == ref.shape == (1, 5, 33, 33)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    # a fresh process (nothing traced there) gives the same logits
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np; from paddle_impl.engine.exporter import infer; "
            f"np.save({str(tmp_path / 'y.npy')!r}, "
            f"infer({str(tmp_path / 'psp')!r}, np.load({str(tmp_path / 'x.npy')!r}), threads=2))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no exported model"):
        exporter.infer(tmp_path / "missing", x)
    with pytest.raises(ValueError, match="PSPNet"):
        exporter.export(psp, tmp_path / "bad", (1, 3, 32, 32))


@pytest.mark.slow
def test_pspnet_whole_image_uses_size_rule(psp):
    img = _image(1, 30, 33)  # 30 breaks (H-1)%8; padded to 33
    p = ev.predict_logits(psp, img)
    assert p.shape == (5, 30, 33)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# (d) predictor


@pytest.mark.parametrize("palette", ["cityscapes", "voc"])
def test_predictor_writes_palette_pngs(tmp_path, palette):
    model = Conv1x1(19 if palette == "cityscapes" else 21, seed=4)
    src = tmp_path / "in"
    src.mkdir()
    imgs = [_image(s, 20 + s, 30) for s in range(2)]
    for s, im in enumerate(imgs):
        Image.fromarray(im).save(src / f"im{s}.png")
    res = predictor.predict(model, [src], tmp_path / "out", palette, flip=True)
    assert [Path(r["image"]).name for r in res] == ["im0.png", "im1.png"]
    pal = predictor.palette_for(palette)
    for r, im in zip(res, imgs):
        with Image.open(r["label"]) as lab:
            assert lab.mode == "P"
            idx = np.array(lab)
            assert np.array_equal(np.asarray(lab.getpalette()[:768], np.uint8).reshape(256, 3), pal)
        want = np.argmax(ev.predict_logits(model, im, flip=True), 0)
        assert np.array_equal(idx, want)
        assert r["overlay"].endswith("_overlay.jpg") and os.path.isfile(r["overlay"])
        with Image.open(r["overlay"]) as ov:
            assert ov.size == (im.shape[1], im.shape[0])
    if palette == "cityscapes":
        assert tuple(pal[0]) == (128, 64, 128) and tuple(pal[18]) == (119, 11, 32)  # road, bicycle
    else:
        assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[255]) == (224, 224, 192)


# ----------------------------------------------------------------------------------------------------------------------
# (e) bad inputs


def test_truncated_image_named(cityscapes_root, tmp_path):
    from paddle_impl.datasets import Cityscapes

    import shutil
    root = tmp_path / "cs"
    shutil.copytree(cityscapes_root, root)
    ds = Cityscapes(root, "val")
    bad = ds.files[1][0]
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[: len(data) // 3])
    with pytest.raises(OSError, match=os.path.basename(bad)):
        ev.evaluate(Conv1x1(19), ds, 19, progress=False)
    with pytest.raises(OSError, match="cannot read image"):
        predictor.predict(Conv1x1(19), [bad], tmp_path / "out", "cityscapes")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        predictor.predict(Conv1x1(19), [tmp_path / "nope.png"], tmp_path / "out", "cityscapes")


def test_bad_label_value_named():
    img = _image(0, 8, 8)
    lbl = np.zeros((8, 8), np.int64)
    lbl[0, 0] = 255
    lbl[2, 3] = 42
    ds = ListDataset([(img, np.zeros((8, 8), np.int64)), (img, lbl)],
                     files=[("a.png", "a_label.png"), ("b.png", "b_label.png")])
    with pytest.raises(ValueError, match=r"b_label\.png.*\[42\]"):
        ev.evaluate(Conv1x1(3), ds, 3, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# outputs


def test_table_and_json(tmp_path):
    img = _image(0, 12, 12)
    lbl = np.random.RandomState(0).randint(0, 3, (12, 12)).astype(np.int64)
    lbl[:2] = 255
    ds = ListDataset([(img, lbl)], class_names=["a", "bb", "ccc"])
    res = ev.evaluate(Conv1x1(3), ds, 3, progress=False)
    cm = np.asarray(res["confusion_matrix"])
    assert cm.sum() == 120
    tp = np.diag(cm)
    iou = tp / np.maximum(cm.sum(0) + cm.sum(1) - tp, 1)
    np.testing.assert_allclose(res["IoU"], iou, rtol=0, atol=1e-15)
    assert abs(res["Acc"] - tp.sum() / 120) < 1e-15
    table = ev.format_table(res, res["class_names"])
    assert "ccc" in table and "mIoU" in table
    path = ev.save_json(res, tmp_path / "r" / "result.json")
    back = json.loads(Path(path).read_text())
    assert back["IoU"] == res["IoU"] and back["confusion_matrix"] == res["confusion_matrix"]


# ----------------------------------------------------------------------------------------------------------------------
# command lines (in-process main(argv)); need paddle_impl.config


@pytest.mark.slow
def test_clis_eval_predict_export_infer(cityscapes_root, tmp_path, capsys):
    pytest.importorskip("paddle_impl.config")
    import paddle_impl
    from paddle_impl.engine import evaluate as eval_cli, export as export_cli, infer as infer_cli, \
        predict as predict_cli

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        "batch_size: 2\niters: 10\n"
        f"train_dataset: {{type: Cityscapes, dataset_root: {cityscapes_root}, split: val}}\n"
        f"val_dataset: {{type: Cityscapes, dataset_root: /nonexistent, split: val}}\n"
        "model: {type: pspnet, num_classes: 19, layers: 50}\n"
        "optimizer: {type: sgd, momentum: 0.9, weight_decay: 0.0001}\n"
        "lr_scheduler: {type: poly, learning_rate: 0.01, power: 0.9}\n")
    paddle.seed(1)
    weights = tmp_path / "w.pdparams"
    paddle.save(paddle_impl.build_model("pspnet", num_classes=19).state_dict(), str(weights))

    # a missing data root is a clear error (exit 2), --data-root fixes it
    assert eval_cli.main(["--config", str(cfg), "--weights", str(weights), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "result.json"
    assert eval_cli.main(["--config", str(cfg), "--weights", str(weights), "--data-root", str(cityscapes_root),
                          "--limit", "1", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == 1 and len(res["IoU"]) == 19 and "mIoU" in capsys.readouterr().out

    img = sorted(Path(cityscapes_root, "leftImg8bit", "val").glob("*/*.png"))[0]
    assert predict_cli.main(["--config", str(cfg), "--weights", str(weights), "--image", str(img),
                             "--out", str(tmp_path / "pred"), "--slide", "33", "0"]) == 0
    prefix = tmp_path / "exp" / "psp"
    assert export_cli.main(["--config", str(cfg), "--weights", str(weights), "--out", str(prefix),
                            "--input-size", "1,3,33,33"]) == 0
    deploy = json.loads(Path(str(prefix) + ".deploy.json").read_text())
    assert deploy["palette"] == "cityscapes" and deploy["custom_ops"] == []  # PSPNet's graph holds no custom op
    assert infer_cli.main(["--model", str(prefix), "--image", str(img), "--out", str(tmp_path / "inf")]) == 0
    name = img.stem + ".png"
    a = np.array(Image.open(tmp_path / "pred" / name))
    b = np.array(Image.open(tmp_path / "inf" / name))
    assert a.shape == (48, 96) and np.array_equal(a, b)  # exported model == dynamic model, same windows
    assert export_cli.main(["--config", str(cfg), "--out", str(tmp_path / "bad"), "--input-size", "1,3,32,32"]) == 2
    assert "(H-1)%8" in capsys.readouterr().err


@pytest.mark.parametrize("spec", [{"preset": "semseg"}, {"preset": "danet"}, {"preset": "mmseg"},
                                  {"preset": "detectron2"}, {"preset": "paddleseg"},
                                  {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "scale": 1 / 255, "to_rgb": True}])
def test_eval_normalisation_equals_the_configs_normalize_transform(spec):
    """segtwin eval/predict/export normalise exactly as the config's Normalize (preset, scale, channel flags)."""
    import types

    from paddle_impl.engine import _cli
    from paddle_impl.engine.evaluator import _normalize
    from paddle_impl.transforms import Normalize

    cfg = types.SimpleNamespace(raw={"val_dataset": {"transforms": [{"type": "Normalize", **spec}]}})
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    expected = Normalize(**spec)(image, np.zeros((5, 7), np.int64))[0]
    got = _normalize(image, _cli.normalize_from_config(cfg))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
