"""SemanticFPN + PointRend (R-101) twins: detectron2's key names and shapes, FrozenBatchNorm2d semantics, the input
rule and pipeline, config inference, and the two frameworks aligned stage by stage (coarse logits, each subdivision
step, the training points) in float64 with torch's weights copied into the Paddle twin.

Randomness PointRend depends on is injected: the inference cell selection through `stages(x, indices=...)`, the
training points through `rand` (the same numpy stream on both sides) and `chosen` (torch's top-k selection).
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as PF
import pytest
import torch
import torch.nn.functional as TF

import paddle_impl.layers as PL
import paddle_impl.models.pointrend as pp
import torch_ref.layers as TL
import torch_ref.models.pointrend as tp
from paddle_impl.checkpoint import strict_load

C = 19
FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


# ---------------------------------------------------------------------------------------------------------------
# detectron2's key set, written from its code (resnet.py, fpn.py, semantic_seg.py, point_head.py)
# ---------------------------------------------------------------------------------------------------------------

def detectron2_keys(depth: int = 101, num_classes: int = C, fc_dim: int = 256, each_layer: bool = False) -> dict:
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    keys = {}

    def conv(prefix, shape, norm="frozen", bias=False):
        keys[prefix + ".weight"] = shape
        if bias:
            keys[prefix + ".bias"] = (shape[0],)
        if norm == "frozen":
            keys.update({f"{prefix}.norm.{b}": (shape[0],) for b in FROZEN_BUFFERS})
        elif norm == "gn":
            keys.update({f"{prefix}.norm.{b}": (shape[0],) for b in ("weight", "bias")})

    bu = "backbone.bottom_up."
    conv(bu + "stem.conv1", (64, 3, 7, 7))
    in_c = 64
    for s, (n, out) in enumerate(zip(blocks, (256, 512, 1024, 2048))):
        b = out // 4
        for i in range(n):
            p = f"{bu}res{s + 2}.{i}."
            cin = in_c if i == 0 else out
            if i == 0:
                conv(p + "shortcut", (out, cin, 1, 1))
            conv(p + "conv1", (b, cin, 1, 1))
            conv(p + "conv2", (b, b, 3, 3))
            conv(p + "conv3", (out, b, 1, 1))
        in_c = out
    for k, c in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        conv(f"backbone.fpn_lateral{k}", (256, c, 1, 1), norm=None, bias=True)
        conv(f"backbone.fpn_output{k}", (256, 256, 3, 3), norm=None, bias=True)
    h = "sem_seg_head.coarse_sem_seg_head."
    for level, n in (("p2", 1), ("p3", 1), ("p4", 2), ("p5", 3)):
        for j in range(n):
            idx = 2 * j if level != "p2" else 0
            conv(f"{h}{level}.{idx}", (128, 256 if j == 0 else 128, 3, 3), norm="gn")
    conv(h + "predictor", (num_classes, 128, 1, 1), norm=None, bias=True)
    ph = "sem_seg_head.point_head."
    fc_in = 256 + num_classes
    for k in (1, 2, 3):
        conv(f"{ph}fc{k}", (fc_dim, fc_in, 1), norm=None, bias=True)
        fc_in = fc_dim + (num_classes if each_layer else 0)
    conv(ph + "predictor", (num_classes, fc_in, 1), norm=None, bias=True)
    return keys


def shapes(sd) -> dict:
    return {k: tuple(int(d) for d in v.shape) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------------------
# Models: torch with non-trivial weights, Paddle loaded from it
# ---------------------------------------------------------------------------------------------------------------

def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial FrozenBN / GN / biases. FrozenBN running stats are calibrated on a random input (each layer's
    mean and variance of what reaches it, times uniform(0.5, 2) on the variance) so that activations stay O(1e4) at
    most through 33 un-normalised blocks instead of exploding; point predictor std 0.05 (init: 0.001)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TL.FrozenBatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Conv1d)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        model.sem_seg_head.point_head.predictor.weight.normal_(0.0, 0.05, generator=g)

    def calibrate(m, inputs):
        x = inputs[0]
        m.running_mean.copy_(x.mean((0, 2, 3)) + 0.1 * torch.randn(m.num_features, generator=g))
        m.running_var.copy_(x.var((0, 2, 3)) * (0.5 + 1.5 * torch.rand(m.num_features, generator=g)))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, TL.FrozenBatchNorm2d)]
    x = torch.from_numpy(50 * np.random.default_rng(seed + 2).standard_normal((1, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        model.eval().backbone(x)
    for h in hooks:
        h.remove()
    return model


def paddle_twin(tmodel: torch.nn.Module, dtype: str = "float32", **cfg):
    pm = pp.build(**cfg)
    if dtype != "float32":
        pm.to(dtype=dtype)
    strict_load(pm, {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}, source="torch_ref")
    return pm


@pytest.fixture(scope="module")
def tmodel32():
    torch.manual_seed(0)
    return randomize_(tp.build()).eval()


@pytest.fixture(scope="module")
def pmodel32(tmodel32):
    return paddle_twin(tmodel32)


@pytest.fixture(scope="module")
def models64(tmodel32):
    import copy

    tm = copy.deepcopy(tmodel32).double().eval()
    pm = paddle_twin(tm, "float64")
    pm.eval()
    return tm, pm


def np_rand(seed: int, to_tensor):
    """rand(shape) drawing float64 uniforms from one numpy stream, as a tensor of the framework `to_tensor` makes."""
    rng = np.random.default_rng(seed)

    def rand(shape):
        return to_tensor(rng.random(tuple(shape)))
    return rand


# ---------------------------------------------------------------------------------------------------------------
# (1)-(2) keys and shapes
# ---------------------------------------------------------------------------------------------------------------

def test_torch_keys_are_detectron2s(tmodel32):
    sd = tmodel32.state_dict()
    assert shapes(sd) == detectron2_keys()
    assert len(sd) == 567
    for k, shape in {"backbone.bottom_up.res4.22.conv3.norm.running_var": (1024,),
                     "backbone.bottom_up.res2.0.shortcut.norm.running_mean": (256,),
                     "backbone.bottom_up.stem.conv1.norm.weight": (64,),
                     "sem_seg_head.coarse_sem_seg_head.p5.4.norm.bias": (128,),
                     "sem_seg_head.point_head.fc1.weight": (256, 275, 1),
                     "sem_seg_head.point_head.predictor.weight": (19, 256, 1)}.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("num_batches_tracked" in k for k in sd)
    assert sorted({k.split(".")[3] for k in sd if ".p5." in k}) == ["0", "2", "4"]
    assert "backbone.bottom_up.res2.1.shortcut.weight" not in sd  # shortcut only where in != out channels
    params = dict(tmodel32.named_parameters())
    frozen = [(n, m) for n, m in tmodel32.named_modules() if isinstance(m, TL.FrozenBatchNorm2d)]
    assert len(frozen) == 1 + 33 * 3 + 4
    for name, m in frozen:
        assert [n for n, _ in m.named_buffers()] == list(FROZEN_BUFFERS), name
        assert not list(m.parameters()), name
        assert not any(p.startswith(name + ".") for p in params), name
    # STRIDE_IN_1X1: the stride sits on the 1x1 conv1 of the first block of res3..res5
    bu = tmodel32.backbone.bottom_up
    for stage in (bu.res3, bu.res4, bu.res5):
        assert stage[0].conv1.stride == (2, 2) and stage[0].conv2.stride == (1, 1)
        assert stage[0].shortcut.stride == (2, 2) and stage[1].conv1.stride == (1, 1)
    assert bu.res2[0].conv1.stride == (1, 1) and bu.res2[0].shortcut.stride == (1, 1)
    assert all(m.dilation == (1, 1) for m in tmodel32.modules() if isinstance(m, torch.nn.Conv2d))


def test_paddle_twin_has_identical_keys_and_shapes(tmodel32, pmodel32):
    assert shapes(pmodel32.state_dict()) == shapes(tmodel32.state_dict())
    params = {n for n, _ in pmodel32.named_parameters()}
    assert params == {n for n, _ in tmodel32.named_parameters()}
    for name, m in pmodel32.named_sublayers():
        if isinstance(m, PL.FrozenBatchNorm2d):
            assert sorted(m.state_dict()) == sorted(FROZEN_BUFFERS), name
            assert not m.parameters(), name


def test_coarse_pred_each_layer_flag_changes_the_point_head_like_detectron2():
    torch.manual_seed(0)
    tm = tp.build(layers=50, num_classes=5, coarse_pred_each_layer=True).eval()
    assert shapes(tm.state_dict()) == detectron2_keys(50, 5, each_layer=True)
    pm = paddle_twin(tm, layers=50, num_classes=5, coarse_pred_each_layer=True)
    pm.eval()
    rng = np.random.default_rng(0)
    fine, coarse = rng.standard_normal((2, 256, 7)), rng.standard_normal((2, 5, 7))
    head_t, head_p = tm.sem_seg_head.point_head, pm.sem_seg_head.point_head
    with torch.no_grad():
        a = head_t(torch.from_numpy(fine).float(), torch.from_numpy(coarse).float()).numpy()
    b = head_p(paddle.to_tensor(fine, "float32"), paddle.to_tensor(coarse, "float32")).numpy()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # detectron2's StandardPointHead.forward with the flag on, in numpy: the coarse logits re-enter every fc
    sd = {k: v.numpy().astype(np.float64) for k, v in head_t.state_dict().items()}
    y = np.concatenate([fine, coarse], 1)
    for k in (1, 2, 3):
        y = np.maximum(np.einsum("oi,nip->nop", sd[f"fc{k}.weight"][..., 0], y) + sd[f"fc{k}.bias"][:, None], 0)
        y = np.concatenate([y, coarse], 1)
    ref = np.einsum("oi,nip->nop", sd["predictor.weight"][..., 0], y) + sd["predictor.bias"][:, None]
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# (3) alignment, float64
# ---------------------------------------------------------------------------------------------------------------

def _stages(tm, pm, x):
    with torch.no_grad():
        to = tm.stages(torch.from_numpy(x))
    with paddle.no_grad():
        given = pm.stages(paddle.to_tensor(x), indices=[paddle.to_tensor(i.numpy()) for i in to["indices"]])
        own = pm.stages(paddle.to_tensor(x))
    return to, given, own


def _differing(a, b) -> list:
    """Per image: how many of torch's selected cells Paddle did not select."""
    return [len(set(r.tolist()) - set(s.tolist())) for r, s in zip(a.numpy(), b.numpy())]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 64, 128), (1, 3, 96, 160)])
def test_stages_align_float64(models64, shape):
    tm, pm = models64
    x = 50 * np.random.default_rng(1).standard_normal(shape)
    to, given, own = _stages(tm, pm, x)
    n, _, h, w = shape
    assert tuple(to["coarse"].shape) == (n, C, h // 4, w // 4)
    assert tuple(to["step1"].shape) == (n, C, h // 2, w // 2) and tuple(to["step2"].shape) == (n, C, h, w)
    k1, k2 = min(h * w // 4, 8192), min(h * w, 8192)
    assert [tuple(i.shape) for i in to["indices"]] == [(n, k1), (n, k2)]
    coarse = to["coarse"].numpy()
    # Measured (torch under no_grad: eval batch_norm in its FrozenBN; Paddle: the formula): coarse 4.9e-13 abs on
    # logits ~20 (2.5e-14 relative); steps 1.3e-9 / 3.4e-9 abs on point logits ~4e4 / ~1e5 (3.5e-14 relative).
    assert np.abs(given["coarse"].numpy() - coarse).max() <= 1e-12 * max(1.0, np.abs(coarse).max())
    scale = np.abs(to["step2"].numpy()).max()
    for step in ("step1", "step2"):
        err = np.abs(given[step].numpy() - to[step].numpy()).max()
        assert err <= 1e-12 * scale, (step, err, scale)
    differing = [_differing(to["indices"][s], own["indices"][s]) for s in range(2)]
    assert max(max(d) for d in differing) <= 8, differing  # measured: 0 at both sizes, both steps
    if not any(any(d) for d in differing):
        np.testing.assert_allclose(own["step2"].numpy(), to["step2"].numpy(), rtol=0, atol=1e-12 * scale)
    if h * w == 8192:  # 64x128: both steps re-predict every cell (32*64 <= 8192 and 64*128 == 8192)
        for s, (hh, ww) in enumerate(((h // 2, w // 2), (h, w))):
            np.testing.assert_array_equal(np.sort(to["indices"][s].numpy(), 1), np.tile(np.arange(hh * ww), (n, 1)))
    # eval forward is the last stage
    with torch.no_grad():
        final = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(final, to["step2"].numpy())


@pytest.mark.slow
def test_training_points_align_float64(models64):
    tm, pm = models64
    x = 50 * np.random.default_rng(2).standard_normal((2, 3, 64, 128))
    tm.train()
    pm.train()
    try:
        with torch.no_grad():
            coarse_up_t, logits_t, coords_t = tm(torch.from_numpy(x), rand=np_rand(7, torch.from_numpy))
            coarse_t = tm.sem_seg_head.coarse_sem_seg_head.layers(tm.backbone(torch.from_numpy(x)))
            # torch's own selection, re-drawn from the same stream: the `chosen` handed to Paddle
            coords_again, chosen_t = tp.get_uncertain_point_coords_with_randomness(
                coarse_t, 2048, 3, 0.75, rand=np_rand(7, torch.from_numpy))
        np.testing.assert_array_equal(coords_again.numpy(), coords_t.numpy())
        with paddle.no_grad():
            to_p = paddle.to_tensor
            coarse_up_p, logits_p, coords_p = pm(to_p(x), rand=np_rand(7, to_p), chosen=to_p(chosen_t.numpy()))
            coarse_p = pm.sem_seg_head.coarse_sem_seg_head.layers(pm.backbone(to_p(x)))
            _, chosen_p = pp.get_uncertain_point_coords_with_randomness(coarse_p, 2048, 3, 0.75, rand=np_rand(7, to_p))
    finally:
        tm.eval()
        pm.eval()
    assert tuple(coarse_up_t.shape) == (2, C, 64, 128)
    assert tuple(logits_t.shape) == (2, C, 2048) and tuple(coords_t.shape) == (2, 2048, 2)
    assert tuple(chosen_t.shape) == (2, 1536)
    # measured: coarse x4 4.8e-13 abs (logits ~20), point logits 9.9e-10 abs on ~5e4 (2e-14 relative)
    np.testing.assert_allclose(coarse_up_p.numpy(), coarse_up_t.numpy(), rtol=0,
                               atol=1e-12 * np.abs(coarse_up_t.numpy()).max())
    np.testing.assert_array_equal(coords_p.numpy(), coords_t.numpy())  # same numbers, same selection: exact
    ref = logits_t.numpy()
    assert np.abs(logits_p.numpy() - ref).max() <= 1e-12 * np.abs(ref).max()
    assert _differing(chosen_t, chosen_p) == [0, 0]  # Paddle's own top-k picks the same 1536 of 6144 points
    # the last 512 points are the fresh uniforms of the second draw
    rng = np.random.default_rng(7)
    rng.random((2, 6144, 2))
    np.testing.assert_array_equal(coords_t.numpy()[:, 1536:], rng.random((2, 512, 2)))

    label = np.random.default_rng(3).integers(0, C, (2, 64, 128))
    label[:, :5] = 255
    tt = tp.point_targets(torch.from_numpy(label), coords_t)
    pt = pp.point_targets(paddle.to_tensor(label), paddle.to_tensor(coords_t.numpy()))
    assert tt.dtype == torch.int64 and pt.dtype == paddle.int64 and tuple(tt.shape) == (2, 2048)
    np.testing.assert_array_equal(pt.numpy(), tt.numpy())
    c = coords_t.numpy()  # nearest with align_corners=False: cell floor(x * W), floor(y * H) (no exact halves here)
    ref_t = label[np.arange(2)[:, None], np.floor(c[..., 1] * 64).astype(int), np.floor(c[..., 0] * 128).astype(int)]
    np.testing.assert_array_equal(tt.numpy(), ref_t)
    assert (tt.numpy() == 255).any()


# ---------------------------------------------------------------------------------------------------------------
# framework primitives the twins rely on (cheap; they would catch a Paddle behaviour change first)
# ---------------------------------------------------------------------------------------------------------------

def test_primitives_agree_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8, 12))
    coords = rng.random((2, 40, 2))
    coords[0, :12, 0] = np.arange(12) / 12  # x * W - 0.5 exactly half-integral: rounding of 'nearest'
    coords[0, :8, 1] = np.arange(8) / 8
    coords[1, :4] = [[0.0, 0.0], [0.999999, 0.999999], [1e-9, 0.5], [0.04, 0.97]]  # zero-padded borders
    for mode in ("bilinear", "nearest"):
        a = TL.point_sample(torch.from_numpy(x), torch.from_numpy(coords), mode=mode).numpy()
        b = PL.point_sample(paddle.to_tensor(x), paddle.to_tensor(coords), mode=mode).numpy()
        assert a.shape == b.shape == (2, 5, 40)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-14)
    for scale, mode in ((2, "bilinear"), (4, "bilinear"), (2, "nearest")):
        a = TL.scale_interpolate(torch.from_numpy(x), scale, mode).numpy()
        b = PL.scale_interpolate(paddle.to_tensor(x), scale, mode).numpy()
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-14)
        c = PL.Upsample(scale, mode)(paddle.to_tensor(x)).numpy()
        np.testing.assert_allclose(c, a, rtol=0, atol=1e-14)
    src = rng.standard_normal((2, 5, 6))
    idx = np.stack([rng.permutation(96)[:6] for _ in range(2)])[:, None, :].repeat(5, 1)
    base = x.reshape(2, 5, 96)
    a = TL.scatter(torch.from_numpy(base), 2, torch.from_numpy(idx), torch.from_numpy(src)).numpy()
    b = PL.scatter(paddle.to_tensor(base), 2, paddle.to_tensor(idx), paddle.to_tensor(src)).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.array_equal(a[0, :, idx[0, 0]].T, src[0]) and np.array_equal(base, x.reshape(2, 5, 96))
    ties = np.array([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0]])
    assert TL.topk(torch.from_numpy(ties), 3, 1)[1].tolist() == PL.topk(paddle.to_tensor(ties), 3, 1)[1].tolist()
    unc_t = tp.calculate_uncertainty(torch.from_numpy(x))
    unc_p = pp.calculate_uncertainty(paddle.to_tensor(x))
    assert tuple(unc_t.shape) == (2, 1, 8, 12) and (unc_t.numpy() <= 0).all()
    np.testing.assert_array_equal(unc_p.numpy(), unc_t.numpy())
    srt = np.sort(x, axis=1)
    np.testing.assert_array_equal(unc_t.numpy()[:, 0], srt[:, -2] - srt[:, -1])


def test_grid_points_are_cell_centres():
    unc = torch.zeros(1, 1, 4, 6, dtype=torch.float64)
    unc[0, 0, 2, 5] = 1.0
    unc[0, 0, 0, 1] = 0.5
    idx, coords = tp.get_uncertain_point_coords_on_grid(unc, 2)
    assert idx.tolist() == [[17, 1]]
    np.testing.assert_allclose(coords.numpy(), [[[5.5 / 6, 2.5 / 4], [1.5 / 6, 0.5 / 4]]], rtol=0, atol=1e-15)
    idx_all, _ = tp.get_uncertain_point_coords_on_grid(unc, 8192)
    assert tuple(idx_all.shape) == (1, 24)  # k = min(H * W, num_points)
    # sampling a map at its own cell centres returns the map
    m = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    _, all_coords = tp.get_uncertain_point_coords_on_grid(torch.zeros(1, 1, 4, 6, dtype=torch.float64), 24,
                                                          torch.arange(24).reshape(1, 24))
    np.testing.assert_allclose(TL.point_sample(m, all_coords).numpy(), m.reshape(1, 3, 24).numpy(), atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# (4) FrozenBatchNorm2d
# ---------------------------------------------------------------------------------------------------------------

def test_frozen_bn_both_paths_both_sides():
    """detectron2's two forward paths (x * scale + shift when the input requires grad, eval batch_norm otherwise)
    give (x - mean) / sqrt(var + eps) * weight + bias on both sides."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 5))
    w, b, mean, var = rng.random(4) + 0.5, rng.standard_normal(4), rng.standard_normal(4), rng.random(4) + 0.5
    tb, pb = TL.FrozenBatchNorm2d(4).double(), PL.FrozenBatchNorm2d(4)
    pb.to(dtype="float64")
    np.testing.assert_allclose(tb.running_var.numpy(), 1 - 1e-5)  # identity at init
    np.testing.assert_allclose(tb(torch.from_numpy(x)).numpy(), x, atol=1e-12)
    np.testing.assert_allclose(pb(paddle.to_tensor(x)).numpy(), x, atol=1e-12)
    tb.load_state_dict({k: torch.from_numpy(v) for k, v in zip(FROZEN_BUFFERS, (w, b, mean, var))})
    pb.set_state_dict({k: paddle.to_tensor(v) for k, v in zip(FROZEN_BUFFERS, (w, b, mean, var))})
    ref = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) * w[:, None, None] + b[:, None, None]
    for requires_grad in (False, True):
        xt = torch.from_numpy(x).requires_grad_(requires_grad)
        xp = paddle.to_tensor(x, stop_gradient=not requires_grad)
        np.testing.assert_allclose(tb(xt).detach().numpy(), ref, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(pb(xp).detach().numpy(), ref, rtol=1e-13, atol=1e-13)


@pytest.mark.slow
def test_frozen_bn_is_untouched_by_a_training_step():
    torch.manual_seed(0)
    cfg = dict(layers=50, num_classes=5, train_num_points=64)
    tm = randomize_(tp.build(**cfg))
    pm = paddle_twin(tm, **cfg)
    x = 50 * np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    label = np.random.default_rng(1).integers(0, 5, (1, 64, 64))
    frozen_t = {k: v.clone() for k, v in tm.state_dict().items() if ".norm." in k and "bottom_up" in k}
    before_p = {k: v.numpy().copy() for k, v in pm.state_dict().items()}
    conv_key = "backbone.bottom_up.res3.0.conv1.weight"

    tm.train()
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    coarse, logits, coords = tm(torch.from_numpy(x))
    target = tp.point_targets(torch.from_numpy(label), coords)
    loss = TF.cross_entropy(coarse, torch.from_numpy(label), ignore_index=255) + TF.cross_entropy(
        logits, target, ignore_index=255)
    loss.backward()
    for name, m in tm.named_modules():
        if isinstance(m, TL.FrozenBatchNorm2d):
            assert all(b.grad is None and not b.requires_grad for b in m.buffers()), name
    assert tm.get_parameter(conv_key).grad is not None  # FREEZE_AT 0: the convs train
    opt.step()
    after = tm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_t.items())
    assert not torch.equal(after[conv_key], torch.from_numpy(before_p[conv_key]))

    pm.train()
    popt = paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters())
    coarse, logits, coords = pm(paddle.to_tensor(x))
    target = pp.point_targets(paddle.to_tensor(label), coords)
    loss = PF.cross_entropy(coarse, paddle.to_tensor(label), ignore_index=255, axis=1) + PF.cross_entropy(
        logits, target, ignore_index=255, axis=1)
    loss.backward()
    for name, m in pm.named_sublayers():
        if isinstance(m, PL.FrozenBatchNorm2d):
            assert all(b.stop_gradient and b.grad is None for b in m.buffers()), name
    popt.step()
    after_p = pm.state_dict()
    for k in frozen_t:
        np.testing.assert_array_equal(after_p[k].numpy(), before_p[k], err_msg=k)
    assert not np.array_equal(after_p[conv_key].numpy(), before_p[conv_key])


# ---------------------------------------------------------------------------------------------------------------
# (5)-(7) input rule, preprocessing, config inference
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [tp.PointRendSemSeg, pp.PointRendSemSeg])
def test_check_input(cls):
    cls.check_input(64, 128)
    cls.check_input(1024, 2048)
    for hw in ((65, 128), (64, 130)):
        with pytest.raises(ValueError, match="multiple of 32"):
            cls.check_input(*hw)


def test_forward_rejects_unpadded_input(tmodel32):
    with pytest.raises(ValueError, match="65x128"):
        tmodel32(torch.zeros(1, 3, 65, 128))


@pytest.mark.parametrize("mod", [tp, pp])
def test_preprocess_pads_to_32_after_mean_subtraction(mod):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (33, 100, 3), dtype=np.uint8)]
    batch, sizes = mod.preprocess(images)
    batch = batch.numpy()
    assert sizes == [(50, 70), (33, 100)] and batch.shape == (2, 3, 64, 128) and batch.dtype == np.float32
    mean = np.array([103.53, 116.28, 123.675], np.float32)
    for i, (img, (h, w)) in enumerate(zip(images, sizes)):
        np.testing.assert_array_equal(batch[i, :, :h, :w], (img.astype(np.float32) - mean).transpose(2, 0, 1))
        assert not batch[i, :, h:].any() and not batch[i, :, :, w:].any()  # zeros AFTER the mean subtraction
    assert tuple(int(d) for d in mod.preprocess([np.zeros((64, 32, 3), np.uint8)])[0].shape) == (1, 3, 64, 32)


def test_infer_config(tmodel32):
    sd = tmodel32.state_dict()
    assert tp.infer_config(sd) == {"num_classes": 19, "layers": 101, "coarse_pred_each_layer": False}
    assert pp.infer_config({k: v.numpy() for k, v in sd.items()}) == tp.infer_config(sd)
    assert tp.infer_config(sd, given={"layers": 50, "num_classes": 3}) == {"coarse_pred_each_layer": False}
    keys = detectron2_keys(50, 7, each_layer=True)
    fake = {k: np.zeros(s, np.float32) for k, s in keys.items()}
    assert tp.infer_config(fake) == {"num_classes": 7, "layers": 50, "coarse_pred_each_layer": True}
    fake = {k: v for k, v in fake.items() if not k.startswith("backbone.bottom_up.res4.5.")}
    with pytest.raises(ValueError, match="5 blocks in backbone.bottom_up.res4"):
        tp.infer_config(fake)
    with pytest.raises(KeyError, match="predictor"):
        tp.infer_config({})


# ---------------------------------------------------------------------------------------------------------------
# (8) the twin rule covers the new pairs
# ---------------------------------------------------------------------------------------------------------------

def test_new_twin_pairs_read_alike():
    import twin_rule as tr

    pairs = tr.twin_pairs(tr.ROOT)
    for rel in ("models/pointrend.py", "backbones/d2_resnet.py"):
        assert rel in pairs
        assert tr.check_pair(tr.ROOT, rel) == [], rel
