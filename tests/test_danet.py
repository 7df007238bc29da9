"""DANet twins: the official (junfu1115/DANet) checkpoint format, the explicit rule for an old checkpoint's
`pretrained.fc.*`, the encoding ResNet's dilation rule, PAM/CAM against their formulas, the loss's 255 -> -1
relabelling, alignment (forward, loss, 3-iteration backward with the gamma gradients) at the default size and at a
size with H*W >= 4096 positions in the PAM, and injected attention bugs that the harness must catch and name."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
import torch

import alignment
import paddle_impl
import paddle_impl.checkpoint as pcheckpoint
import paddle_impl.models.danet as pdanet
import torch_ref
import weights_convert
from tests.ckpt_factory import randomize_
from torch_ref.official import save_official
from weights_convert.convert import ConversionError

pytestmark = pytest.mark.slow


def _random_danet(layers: int = 50, num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_(torch_ref.build_model("danet", num_classes=num_classes, layers=layers), seed)
    with torch.no_grad():  # trained gammas are non-zero; at zero both attentions would be switched off
        model.head.sa.gamma.fill_(0.7)
        model.head.sc.gamma.fill_(-0.4)
    return model.eval()


def test_official_checkpoint_loads_strictly_and_converts(tmp_path):
    model = _random_danet(layers=101)
    sd = model.state_dict()
    shapes = {"pretrained.conv1.weight": (64, 3, 7, 7), "pretrained.layer3.22.conv2.weight": (256, 256, 3, 3),
              "head.conv5a.0.weight": (512, 2048, 3, 3), "head.sa.query_conv.weight": (64, 512, 1, 1),
              "head.sa.query_conv.bias": (64,), "head.sa.value_conv.weight": (512, 512, 1, 1),
              "head.sa.gamma": (1,), "head.sc.gamma": (1,), "head.conv51.0.weight": (512, 512, 3, 3),
              "head.conv8.1.weight": (3, 512, 1, 1), "head.conv6.1.bias": (3,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert not any(k.startswith(("pretrained.fc", "pretrained.layer0", "aux", "head.sc.query")) for k in sd)
    path = save_official("danet", model, tmp_path / "DANet101.pth.tar")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "state_dict", "optimizer", "best_pred"}
    assert not any(k.startswith("module.") for k in raw["state_dict"])  # saved from model.module
    loaded = torch_ref.load_official("danet", path)  # classes and depth read off the checkpoint
    assert loaded.num_classes == 3 and len(loaded.pretrained.layer3) == 23
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    weights_convert.convert("danet", path, tmp_path / "danet.pdparams")
    twin = paddle_impl.load_pdparams("danet", tmp_path / "danet.pdparams")
    assert float(twin.head.sa.gamma.numpy()[0]) == pytest.approx(0.7)
    assert float(twin.head.sc.gamma.numpy()[0]) == pytest.approx(-0.4)
    np.testing.assert_array_equal(twin.state_dict()["head.sa.key_conv.bias"].numpy(),
                                  sd["head.sa.key_conv.bias"].numpy())


def test_old_checkpoint_fc_keys_are_reported_and_ignored(tmp_path):
    model = _random_danet(layers=50)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pretrained.fc.weight"] = torch.randn(1000, 2048)
    state["pretrained.fc.bias"] = torch.randn(1000)
    old = tmp_path / "danet_2018.pth"
    torch.save({"epoch": 240, "state_dict": state, "optimizer": {}, "best_pred": 0.79}, old)
    with pytest.warns(UserWarning, match=r"2 key\(s\) ignored by the danet rule.*pretrained\.fc\.weight"):
        loaded = torch_ref.load_official("danet", old)
    assert float(loaded.head.sa.gamma.detach()) == pytest.approx(0.7)
    report = weights_convert.convert("danet", old, tmp_path / "old.pdparams")
    rows = {r.source: r for r in report.rows if r.source and r.source.startswith("pretrained.fc")}
    assert set(rows) == {"pretrained.fc.weight", "pretrained.fc.bias"}
    assert all(r.action == "drop" and "ImageNet classifier" in r.reason for r in rows.values())
    # the rule is explicit: any OTHER stray key is still an error, on both paths
    state["head.extra.weight"] = torch.randn(3)
    bad = tmp_path / "danet_extra.pth"
    torch.save({"epoch": 1, "state_dict": state}, bad)
    with pytest.raises(RuntimeError, match="head.extra.weight"), pytest.warns(UserWarning):
        torch_ref.load_official("danet", bad)
    with pytest.raises(ConversionError, match="head.extra.weight"):
        weights_convert.convert("danet", bad, tmp_path / "bad.pdparams")


def test_torchvision_imagenet_backbone_converts_partially(tmp_path):
    model = _random_danet(layers=50)
    sd = {k[len("pretrained."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("pretrained.")}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    torch.save(sd, tmp_path / "resnet50.pth")
    with pytest.raises(ConversionError, match="--partial"):
        weights_convert.convert("danet", tmp_path / "resnet50.pth", tmp_path / "x.pdparams", cfg={"num_classes": 19})
    report = weights_convert.convert("danet", tmp_path / "resnet50.pth", tmp_path / "init.pdparams",
                                     partial=("backbone",), cfg={"num_classes": 19})
    assert report.summary["keep-init"] == len([k for k in paddle_impl.build_model("danet", num_classes=19, layers=50)
                                               .state_dict() if k.startswith("head.")])
    assert {r.source for r in report.rows if r.action == "drop" and "ImageNet classifier" in r.reason} \
        == {"fc.weight", "fc.bias"}
    sd_p = paddle.load(str(tmp_path / "init.pdparams"))
    np.testing.assert_array_equal(sd_p["pretrained.layer4.2.conv3.weight"], sd["layer4.2.conv3.weight"].numpy())


@pytest.mark.parametrize("tree", ["torch", "paddle"])
def test_backbone_dilation_rule_as_encoding(tree):
    """--multi-grid --multi-dilation 4 8 16 --os 8 --no-deepstem: 7x7 stem, layer3 first block dilation 1 then 2,
    layer4 blocks 4, 8, 16; semseg's models keep every block of a stage dilated."""
    mod = torch_ref if tree == "torch" else paddle_impl

    def dil(conv):
        return int(conv.dilation[0]) if tree == "torch" else int(conv._dilation[0])

    def stride(conv):
        return int(conv.stride[0]) if tree == "torch" else int(conv._stride[0])

    net = mod.build_model("danet", num_classes=2, layers=101)
    assert tuple(net.pretrained.conv1.weight.shape) == (64, 3, 7, 7)
    assert [dil(b.conv2) for b in net.pretrained.layer3] == [1] + [2] * 22
    assert [dil(b.conv2) for b in net.pretrained.layer4] == [4, 8, 16]
    assert [stride(b.conv2) for b in (net.pretrained.layer2[0], net.pretrained.layer3[0], net.pretrained.layer4[0])] \
        == [2, 1, 1]
    psp = mod.build_model("pspnet", num_classes=2)
    assert {dil(b.conv2) for b in psp.layer3} == {2} and {dil(b.conv2) for b in psp.layer4} == {4}


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_attention_modules_compute_the_official_formulas():
    rng = np.random.default_rng(0)
    n, c, h, w = 2, 16, 3, 5
    x = rng.standard_normal((n, c, h, w))
    wq, bq = rng.standard_normal((c // 8, c)), rng.standard_normal(c // 8)
    wk, bk = rng.standard_normal((c // 8, c)), rng.standard_normal(c // 8)
    wv, bv = rng.standard_normal((c, c)), rng.standard_normal(c)
    flat = x.reshape(n, c, h * w)
    q = np.einsum("oc,ncp->nop", wq, flat) + bq[None, :, None]
    k = np.einsum("oc,ncp->nop", wk, flat) + bk[None, :, None]
    v = np.einsum("oc,ncp->nop", wv, flat) + bv[None, :, None]
    attn = _softmax(np.einsum("ndi,ndj->nij", q, k), -1)        # (N, HW, HW): row i = query position i
    pam = 0.7 * np.einsum("ncj,nij->nci", v, attn).reshape(n, c, h, w) + x
    energy = np.einsum("nip,njp->nij", flat, flat)              # (N, C, C)
    cam = -0.4 * np.einsum("nij,njp->nip", _softmax(-energy, -1), flat).reshape(n, c, h, w) + x

    tp, tc = torch_ref.models.danet.PAM(c).double(), torch_ref.models.danet.CAM().double()
    with torch.no_grad():
        for conv, wt, b in ((tp.query_conv, wq, bq), (tp.key_conv, wk, bk), (tp.value_conv, wv, bv)):
            conv.weight.copy_(torch.from_numpy(wt[:, :, None, None]))
            conv.bias.copy_(torch.from_numpy(b))
        tp.gamma.fill_(0.7)
        tc.gamma.fill_(-0.4)
        np.testing.assert_allclose(tp(torch.from_numpy(x)).numpy(), pam, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(tc(torch.from_numpy(x)).numpy(), cam, rtol=1e-10, atol=1e-10)
        tc.gamma.zero_()  # zero gamma: the official initial state is the identity
        assert torch.equal(tc(torch.from_numpy(x)), torch.from_numpy(x))

    pp, pc = pdanet.PAM(c), pdanet.CAM()
    pp.to(dtype="float64")
    pc.to(dtype="float64")
    pp.set_state_dict({k: paddle.to_tensor(v.double().numpy()) for k, v in tp.state_dict().items()})
    pc.set_state_dict({"gamma": paddle.to_tensor(np.array([-0.4]))})
    np.testing.assert_allclose(pp(paddle.to_tensor(x)).numpy(), pam, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pc(paddle.to_tensor(x)).numpy(), cam, rtol=1e-10, atol=1e-10)


def test_loss_ignores_255_as_the_official_minus_one():
    from paddle_impl import losses as plosses
    from torch_ref import losses as tlosses

    rng = np.random.default_rng(1)
    outs = [rng.standard_normal((2, 4, 6, 7)) for _ in range(3)]
    target = rng.integers(0, 4, (2, 6, 7))
    target[0, :2] = 255
    valid = target != 255

    def ce(logits):
        p = _softmax(logits, 1)
        picked = np.take_along_axis(p, np.where(valid, target, 0)[:, None], 1)[:, 0]
        return -np.log(picked)[valid].mean()

    expected = sum(ce(o) for o in outs)
    t_target = torch.from_numpy(target)
    tres = tlosses.compute_loss("danet", tuple(torch.from_numpy(o) for o in outs), t_target)
    pres = plosses.compute_loss("danet", tuple(paddle.to_tensor(o) for o in outs), paddle.to_tensor(target))
    assert float(tres["loss"]) == pytest.approx(expected, rel=1e-12)
    assert float(pres["loss"]) == pytest.approx(expected, rel=1e-12)
    assert float(pres["sa"]) == pytest.approx(ce(outs[1]), rel=1e-12)
    assert int((t_target == 255).sum()) == 14  # the caller's target is not relabelled in place
    # the Paddle quirk the twin works around: its own mean with a negative ignore_index counts ignored pixels
    stock = paddle.nn.functional.cross_entropy(paddle.to_tensor(outs[0]), paddle.to_tensor(np.where(valid, target, -1)),
                                               ignore_index=-1, reduction="mean", axis=1)
    assert abs(float(stock) - ce(outs[0])) > 1e-3


def test_danet_aligns_forward_loss_backward(tmp_path):
    # the module trace is exercised by the injected-bug tests below
    v = alignment.run("danet", out=str(tmp_path), input_size="2,3,65,65", iters=2, progress=False,
                      steps=("forward", "loss", "backward"), model_cfg={"layers": 50}, trace=False)
    assert v["passed"], {s: (r["worst"] or {}).get("key") for s, r in v["steps"].items()}
    assert v["provenance"]["recipe"]["config"].endswith("danet_r101_cityscapes.yml")  # the official recipe
    keys = set(np.load(tmp_path / "danet" / "backward.npz").keys())
    for it in range(2):  # the gamma gradients were compared in every iteration
        assert {f"torch/iter{it}/grad/head.sa.gamma", f"paddle/iter{it}/grad/head.sc.gamma"} <= keys


def test_danet_aligns_with_4225_pam_positions(tmp_path):
    """513x513 -> 65x65 = 4225 positions: the (4225 x 4225) PAM energy is where float32 accumulation shows."""
    v = alignment.run("danet", out=str(tmp_path), input_size="2,3,513,513", steps=("forward",), progress=False,
                      trace=False, model_cfg={"layers": 50})
    assert v["passed"], v["steps"]["forward"]["worst"]


# ------------------------------------------------------------------------------------------- injected bugs
def _pam_softmax_wrong_axis(self, x):
    n, c, h, w = x.shape
    query = paddle.transpose(paddle.reshape(self.query_conv(x), [n, -1, h * w]), [0, 2, 1])
    key = paddle.reshape(self.key_conv(x), [n, -1, h * w])
    attention = paddle.nn.functional.softmax(paddle.bmm(query, key), axis=1)  # BUG: over the queries
    value = paddle.reshape(self.value_conv(x), [n, -1, h * w])
    out = paddle.reshape(paddle.bmm(value, paddle.transpose(attention, [0, 2, 1])), [n, c, h, w])
    return self.gamma * out + x


def _cam_without_rowmax(self, x):
    n, c, h, w = x.shape
    flat = paddle.reshape(x, [n, c, -1])
    attention = paddle.nn.functional.softmax(paddle.bmm(flat, paddle.transpose(flat, [0, 2, 1])), axis=-1)  # BUG
    return self.gamma * paddle.reshape(paddle.bmm(attention, flat), [n, c, h, w]) + x


_strict_load = pcheckpoint.strict_load


def _load_without_gamma(model, state_dict, source=""):
    out = _strict_load(model, state_dict, source=source)
    model.head.sa.gamma.set_value(paddle.zeros_like(model.head.sa.gamma))  # BUG: the twin never loads gamma
    return out


@pytest.mark.parametrize("bug,module", [("pam_softmax_axis", "head.sa"), ("cam_without_rowmax", "head.sc"),
                                        ("gamma_not_loaded", "head.sa")])
def test_injected_attention_bug_is_caught_and_named(tmp_path, monkeypatch, bug, module):
    if bug == "pam_softmax_axis":
        monkeypatch.setattr(pdanet.PAM, "forward", _pam_softmax_wrong_axis)
    elif bug == "cam_without_rowmax":
        monkeypatch.setattr(pdanet.CAM, "forward", _cam_without_rowmax)
    else:
        monkeypatch.setattr(pcheckpoint, "strict_load", _load_without_gamma)
    # forward only, one image (each bug acts within an image; the forward trace names the module)
    v = alignment.run("danet", out=str(tmp_path), input_size="1,3,33,33", progress=False,
                      steps=("forward",), model_cfg={"layers": 50})
    assert not v["passed"] and not v["steps"]["forward"]["passed"]
    assert v["trace"]["first_divergent_forward"].startswith(module), v["trace"]
