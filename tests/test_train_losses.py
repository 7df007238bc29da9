"""Training losses (paddle_impl/losses.py and its torch twin): CE averaging modes, OHEM selection, MultiLoss,
build_loss from a config section. Hand-computed values on the Paddle side; the twins agree in float64."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

import paddle_impl.losses as plosses
import torch_ref.losses as tlosses
from alignment.recipe import RecipeError
from paddle_impl.losses import CrossEntropyLoss, MultiLoss, OhemCrossEntropyLoss, build_loss


def cross_entropy(logits, label):
    return CrossEntropyLoss()(logits, label)


def _data(seed=0, n=2, c=5, h=6, w=7, ignore_frac=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c, h, w)).astype(np.float32)
    label = rng.integers(0, c, (n, h, w)).astype(np.int64)
    label[rng.random((n, h, w)) < ignore_frac] = 255
    return logits, label


def _np_pixel_ce(logits, label):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    valid = label != 255
    lbl = np.where(valid, label, 0)
    ce = -np.take_along_axis(logp, lbl[:, None], 1)[:, 0]
    return np.where(valid, ce, 0.0), valid


def test_ce_valid_equals_twin_cross_entropy():
    logits, label = _data()
    lg, lb = paddle.to_tensor(logits), paddle.to_tensor(label)
    ours = float(CrossEntropyLoss()(lg, lb))
    np.testing.assert_allclose(ours, float(cross_entropy(lg, lb)), rtol=1e-6)
    ce, valid = _np_pixel_ce(logits, label)
    np.testing.assert_allclose(ours, ce.sum() / valid.sum(), rtol=1e-5)


def test_ce_all_is_mean_over_all_pixels():
    # hand-computed: 1 image, 2 classes, 1x2 pixels; logits (0, 0) -> CE ln 2; second pixel ignored
    logits = paddle.zeros([1, 2, 1, 2])
    label = paddle.to_tensor(np.array([[[1, 255]]], np.int64))
    np.testing.assert_allclose(float(CrossEntropyLoss(avg="all")(logits, label)), np.log(2) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(CrossEntropyLoss(avg="valid")(logits, label)), np.log(2), rtol=1e-6)
    logits, label = _data(1)
    ce, _ = _np_pixel_ce(logits, label)
    got = float(CrossEntropyLoss(avg="all")(paddle.to_tensor(logits), paddle.to_tensor(label)))
    np.testing.assert_allclose(got, ce.mean(), rtol=1e-5)


def test_ce_all_ignored_is_zero_not_nan_and_errors():
    logits = paddle.zeros([1, 3, 2, 2])
    label = paddle.full([1, 2, 2], 255, dtype="int64")
    assert float(CrossEntropyLoss()(logits, label)) == 0.0
    with pytest.raises(ValueError, match="avg"):
        CrossEntropyLoss(avg="mean")
    with pytest.raises(ValueError, match="upsample"):
        CrossEntropyLoss()(paddle.zeros([1, 3, 4, 4]), paddle.zeros([1, 2, 2], dtype="int64"))


def test_ce_gradient_flows_only_through_valid_pixels():
    logits, label = _data(2)
    lg = paddle.to_tensor(logits, stop_gradient=False)
    CrossEntropyLoss()(lg, paddle.to_tensor(label)).backward()
    g = lg.grad.numpy()
    ign = label == 255
    assert np.abs(g.transpose(1, 0, 2, 3)[:, ign]).max() == 0 and np.abs(g).max() > 0


def test_ohem_keeps_the_hardest_pixels():
    # 1 image, 2 classes, 1x6 pixels, all labelled 0; p(true class) increases left to right; one pixel ignored
    margins = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, 4.0], np.float32)  # logit0 - logit1
    logits = np.zeros((1, 2, 1, 6), np.float32)
    logits[0, 0, 0] = margins
    label = np.zeros((1, 1, 6), np.int64)
    label[0, 0, 5] = 255
    p = 1 / (1 + np.exp(-margins))  # 0.12 0.27 0.5 0.73 0.95 (ignored)
    ce = -np.log(p)
    lg, lb = paddle.to_tensor(logits), paddle.to_tensor(label)
    # thresh 0.7, min_kept 2: the 2nd smallest p (0.27) <= thresh -> keep p < 0.7: pixels 0, 1, 2
    ohem = OhemCrossEntropyLoss(thresh=0.7, min_kept=2)
    np.testing.assert_array_equal(ohem.kept_mask(lg, lb).numpy()[0, 0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_allclose(float(ohem(lg, lb)), ce[:3].mean(), rtol=1e-5)
    # min_kept 4: 4th smallest p (0.73) > thresh -> threshold 0.73, strict '<' (PaddleSeg): pixels 0..2
    ohem = OhemCrossEntropyLoss(thresh=0.7, min_kept=4)
    np.testing.assert_array_equal(ohem.kept_mask(lg, lb).numpy()[0, 0], [1, 1, 1, 0, 0, 0])
    # thresh 0.3: p < 0.3 keeps only pixels 0, 1 (min_kept 1 does not raise the threshold)
    ohem = OhemCrossEntropyLoss(thresh=0.3, min_kept=1)
    np.testing.assert_allclose(float(ohem(lg, lb)), ce[:2].mean(), rtol=1e-5)
    # min_kept >= number of valid pixels: no mining, plain CE over the valid pixels
    ohem = OhemCrossEntropyLoss(thresh=0.3, min_kept=5)
    np.testing.assert_allclose(float(ohem(lg, lb)), ce[:5].mean(), rtol=1e-5)


def test_multiloss_coefs_and_terms():
    logits, label = _data(3)
    main, aux = paddle.to_tensor(logits), paddle.to_tensor(logits[:, ::-1].copy())
    lb = paddle.to_tensor(label)
    ml = MultiLoss([CrossEntropyLoss(), CrossEntropyLoss()], [1.0, 0.4], ["main", "aux"])
    out = ml((main, aux), lb)
    assert set(out) == {"main", "aux", "loss"}
    m, a = float(cross_entropy(main, lb)), float(cross_entropy(aux, lb))
    np.testing.assert_allclose([float(out["main"]), float(out["aux"])], [m, a], rtol=1e-6)
    np.testing.assert_allclose(float(out["loss"]), m + 0.4 * a, rtol=1e-6)
    with pytest.raises(ValueError, match="returned 1 outputs, its loss expects 2"):
        ml(main, lb)


def test_build_loss_from_a_config_section():
    import yaml

    spec = yaml.safe_load("""
types:
  - type: CrossEntropyLoss
coef: [1, 0.4]
""")
    ml = build_loss("pspnet", spec)
    assert len(ml.losses) == 2 and ml.coefs == [1.0, 0.4] and ml.names == ["main", "aux"]
    ml = build_loss("pspnet", {"types": [{"type": "OhemCrossEntropyLoss", "min_kept": 3},
                                         {"type": "CrossEntropyLoss", "avg": "all"}], "coef": [1, 0.4]},
                    ignore_index=254)
    assert isinstance(ml.losses[0], OhemCrossEntropyLoss) and ml.losses[0].min_kept == 3
    assert ml.losses[1].avg == "all" and ml.losses[1].ignore_index == 254
    assert build_loss("danet").names == ["sasc", "sa", "sc"]  # the spec's terms, official weights
    with pytest.raises(RecipeError, match="did you mean 'CrossEntropyLoss'.*known: CrossEntropyLoss, Ohem"):
        build_loss("pspnet", {"types": [{"type": "CrossEntropy"}], "coef": [1, 1]})
    with pytest.raises(RecipeError, match="loss.types has 2 entries, model danet has 3 loss terms"):
        build_loss("danet", {"types": [{"type": "CrossEntropyLoss"}] * 2, "coef": [1, 1, 1]})
    with pytest.raises(RecipeError, match="loss.coef has 3 values, model pspnet has 2"):
        build_loss("pspnet", {"types": ["CrossEntropyLoss"], "coef": [1, 1, 1]})
    with pytest.raises(RecipeError, match=r"loss.types\[0\] \(CrossEntropyLoss\): key 'axis' does not apply"):
        build_loss("pspnet", {"types": [{"type": "CrossEntropyLoss", "axis": 1}]})


@pytest.mark.parametrize("section", [
    None,
    {"types": [{"type": "CrossEntropyLoss", "avg": "all"}, "CrossEntropyLoss"], "coef": [0.6, 0.4]},
    {"types": [{"type": "CrossEntropyLoss", "weight": [1, 2, 0.5, 1, 3]}]},
    {"types": [{"type": "OhemCrossEntropyLoss", "thresh": 0.3, "min_kept": 20}], "coef": [1, 0.4]},
    {"types": [{"type": "OhemCrossEntropyLoss", "thresh": 0.05, "min_kept": 20}], "coef": [1, 0.4]},
])
def test_loss_twins_agree_in_float64(section):
    """torch_ref.losses and paddle_impl.losses from the same section give the same terms (float64)."""
    import torch

    logits, label = _data(4, n=2, c=5, h=6, w=7)
    logits = logits.astype(np.float64) * 3
    aux = logits[:, ::-1].copy()
    tl = tlosses.build_loss("pspnet", section)((torch.from_numpy(logits), torch.from_numpy(aux)),
                                               torch.from_numpy(label))
    pl = plosses.build_loss("pspnet", section)((paddle.to_tensor(logits), paddle.to_tensor(aux)),
                                               paddle.to_tensor(label))
    assert set(tl) == set(pl) == {"main", "aux", "loss"}
    for k in tl:
        np.testing.assert_allclose(float(pl[k]), float(tl[k]), rtol=1e-13, err_msg=k)


def test_danet_official_loss_relabels_to_its_own_ignore_label():
    """DANet's criterion ignores -1: the target's 255 become -1 for the terms that keep the default ignore_index, and
    the mean stays over the valid pixels (Paddle's own 'mean' would divide by all of them)."""
    logits, label = _data(5, c=5)
    outs = tuple(paddle.to_tensor(logits * k) for k in (1.0, 2.0, 0.5))
    res = plosses.build_loss("danet")(outs, paddle.to_tensor(label))
    ce, valid = _np_pixel_ce(logits, label)
    np.testing.assert_allclose(float(res["sasc"]), ce.sum() / valid.sum(), rtol=1e-5)
    assert plosses.build_loss("danet").relabelled == {"sasc", "sa", "sc"}
