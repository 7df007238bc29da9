"""PSPNet twins: official key names and shapes, OS8 dilation, input rule, BN semantics, metrics, optimizer."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
import torch

import paddle_impl
import torch_ref
from alignment.compare import assert_aligned
from weights_convert.keymap import torch_to_paddle_key as paddle_key

# (key, shape) pairs of semseg's PSPNet50 (docs/references.md, section 2); C = num_classes
SEMSEG_KEYS = {
    "layer0.0.weight": (64, 3, 3, 3), "layer0.1.running_var": (64,), "layer0.3.weight": (64, 64, 3, 3),
    "layer0.6.weight": (128, 64, 3, 3), "layer0.7.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 128, 1, 1), "layer1.0.downsample.0.weight": (256, 128, 1, 1),
    "layer1.0.downsample.1.running_mean": (256,), "layer3.5.conv2.weight": (256, 256, 3, 3),
    "layer4.2.bn3.bias": (2048,), "ppm.features.0.1.weight": (512, 2048, 1, 1),
    "ppm.features.3.2.running_mean": (512,), "cls.0.weight": (512, 4096, 3, 3), "cls.1.weight": (512,),
    "cls.4.weight": (5, 512, 1, 1), "cls.4.bias": (5,), "aux.0.weight": (256, 1024, 3, 3),
    "aux.4.weight": (5, 256, 1, 1), "aux.4.bias": (5,),
}


@pytest.fixture(scope="module")
def tmodel():
    torch.manual_seed(0)
    return torch_ref.build_model("pspnet", num_classes=5).eval()


@pytest.fixture(scope="module")
def pmodel(tmodel):
    m = paddle_impl.build_model("pspnet", num_classes=5)
    from paddle_impl.checkpoint import strict_load
    strict_load(m, {paddle_key(k): v.numpy() for k, v in tmodel.state_dict().items() if paddle_key(k)})
    m.eval()
    return m


def test_torch_keys_are_semsegs(tmodel):
    sd = tmodel.state_dict()
    for k, shape in SEMSEG_KEYS.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape))
    assert not any(k.startswith(("fc.", "avgpool", "layer0.2", "layer0.9")) for k in sd)  # no params there
    assert len([k for k in sd if k.startswith("layer3.") and k.endswith("conv1.weight")]) == 6  # ResNet-50


def test_paddle_twin_has_the_same_keys_modulo_bn_renames(tmodel, pmodel):
    expected = {paddle_key(k): tuple(v.shape) for k, v in tmodel.state_dict().items() if paddle_key(k)}
    got = {k: tuple(v.shape) for k, v in pmodel.state_dict().items()}
    assert got == expected


def test_dilation_os8_without_contraction(tmodel):
    for name, m in tmodel.named_modules():
        if name.startswith(("layer3.", "layer4.")) and name.endswith("conv2"):
            d = 2 if name.startswith("layer3") else 4
            assert m.dilation == (d, d) and m.padding == (d, d) and m.stride == (1, 1), name
        if name.startswith(("layer3.0.downsample.0", "layer4.0.downsample.0")):
            assert m.stride == (1, 1), name
    assert tmodel.layer2[0].conv2.stride == (2, 2) and tmodel.layer2[0].conv1.stride == (1, 1)
    x = torch.zeros(1, 3, 33, 33)
    feats = tmodel.layer4(tmodel.layer3(tmodel.layer2(tmodel.layer1(tmodel.layer0(x)))))
    assert tuple(feats.shape) == (1, 2048, 5, 5)  # (33 - 1) / 8 + 1


def test_paddle_dilation_matches(pmodel):
    conv = pmodel.layer4[1].conv2
    assert list(conv._dilation) == [4, 4] and list(conv._stride) == [1, 1] and conv._padding in (4, [4, 4])


@pytest.mark.parametrize("hw", [(34, 33), (33, 40)])
def test_input_rule_is_enforced_on_both_sides(tmodel, pmodel, hw):
    x = np.zeros((1, 3, *hw), np.float32)
    with pytest.raises(ValueError, match=r"\(H-1\)%8==0"):
        tmodel(torch.from_numpy(x))
    with pytest.raises(ValueError, match=r"\(H-1\)%8==0"):
        pmodel(paddle.to_tensor(x))


def test_train_mode_returns_aux_and_output_size(tmodel, pmodel):
    x = np.random.default_rng(0).standard_normal((2, 3, 33, 33)).astype(np.float32)
    tmodel.train()
    try:
        out, aux = tmodel(torch.from_numpy(x))
    finally:
        tmodel.eval()
    assert tuple(out.shape) == tuple(aux.shape) == (2, 5, 33, 33)
    assert tuple(pmodel(paddle.to_tensor(x)).shape) == (2, 5, 33, 33)


def test_load_official_semseg_format(tmp_path, tmodel):
    ck = {"epoch": 7, "state_dict": {"module." + k: v for k, v in tmodel.state_dict().items()},
          "optimizer": {}}
    torch.save(ck, tmp_path / "train_epoch_7.pth")
    m = torch_ref.load_official("pspnet", tmp_path / "train_epoch_7.pth")
    assert m.num_classes == 5  # read from cls.4.weight
    for k, v in m.state_dict().items():
        assert torch.equal(v, tmodel.state_dict()[k]), k


def _bn_pair(momentum=0.1):
    from paddle_impl.layers import BatchNorm2d as PB
    return torch.nn.BatchNorm2d(6, momentum=momentum), PB(6, momentum=momentum)


def test_bn_twin_matches_torch_training_semantics():
    t, p = _bn_pair()
    stock = paddle.nn.BatchNorm2D(6, momentum=0.9)  # Paddle's own BN with the momentum mapped correctly
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = (rng.standard_normal((2, 6, 3, 4)) * 3 + 1).astype(np.float32)
        yt = t(torch.from_numpy(x))
        yp = p(paddle.to_tensor(x))
        stock(paddle.to_tensor(x))
        assert_aligned(yp, yt.detach(), key="bn train output")
    assert_aligned(p._mean, t.running_mean, key="running_mean")
    assert_aligned(p._variance, t.running_var, key="running_var")
    # the trap is real: Paddle's stock BN updates the variance with the BIASED estimate (n = 24 here)
    assert np.abs(stock._variance.numpy() - t.running_var.numpy()).max() > 1e-2
    t.eval()
    p.eval()
    x = rng.standard_normal((2, 6, 3, 4)).astype(np.float32)
    assert_aligned(p(paddle.to_tensor(x)), t(torch.from_numpy(x)).detach(), key="bn eval output")


def test_bn_rejects_single_value_per_channel():
    _, p = _bn_pair()
    with pytest.raises(ValueError, match="more than 1 value"):
        p(paddle.ones([1, 6, 1, 1]))


def test_metrics_hand_computed_both_sides():
    import paddle_impl.metrics as pm
    import torch_ref.metrics as tm
    # 2 classes; label 255 ignored. pred/target pixels: (t,p) = (0,0) x3, (0,1) x1, (1,1) x2, (1,0) x2
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1, 255], np.int64)
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1], np.int64)
    # hand: cm = [[3,1],[2,2]]; IoU0 = 3/(3+2+1) = .5, IoU1 = 2/(2+1+2) = .4; Acc = 5/8; recall = 3/4, 2/4
    # precision = 3/5, 2/3; Dice0 = 6/9, Dice1 = 4/7; p_e = (4*5 + 4*3)/64 = .5; kappa = (5/8 - .5)/.5 = .25
    expect = {"mIoU": 0.45, "Acc": 0.625, "mAcc": 0.625, "Kappa": 0.25, "mDice": (6 / 9 + 4 / 7) / 2}
    for mod, conv in ((tm, torch.from_numpy), (pm, paddle.to_tensor)):
        cm = mod.confusion_matrix(conv(pred), conv(target), 2)
        assert cm.numpy().tolist() == [[3, 1], [2, 2]]
        m = mod.metrics_from_confusion(cm)
        for k, v in expect.items():
            assert abs(float(m[k]) - v) < 1e-15, (mod.__name__, k, float(m[k]), v)
        np.testing.assert_allclose(m["precision"].numpy(), [3 / 5, 2 / 3], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="outside"):
        tm.confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 2)
