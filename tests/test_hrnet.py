"""HRNetV2-W48 + Polarized Self-Attention backbone twins (backbones/hrnet.py): the official key names and shapes for
psa 's' / 'p' / None, identical key sets in both trees, upstream's init, PSA_p and PSA_s against their formulas in
numpy, float64 forward parity of the whole backbone (torch weights copied into Paddle), psa_from_keys."""
from __future__ import annotations

import functools

import numpy as np
import paddle
import pytest
import torch

from paddle_impl.backbones import hrnet as phrnet
from paddle_impl.checkpoint import strict_load
from tests.ckpt_factory import randomize_
from torch_ref.backbones import hrnet as thrnet
from weights_convert.keymap import torch_to_paddle_key as paddle_key

# keys every variant has, with their shapes
COMMON_KEYS = {
    "conv1.weight": (64, 3, 3, 3), "bn1.running_mean": (64,), "conv2.weight": (64, 64, 3, 3),
    "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.3.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.weight": (256,),
    "transition1.0.0.weight": (48, 256, 3, 3), "transition1.0.1.running_var": (48,),
    "transition1.1.0.0.weight": (96, 256, 3, 3), "transition2.2.0.0.weight": (192, 96, 3, 3),
    "transition3.3.0.0.weight": (384, 192, 3, 3),
    "stage2.0.branches.0.0.conv1.weight": (48, 48, 3, 3), "stage4.2.branches.3.3.bn2.bias": (384,),
    "stage2.0.fuse_layers.0.1.0.weight": (48, 96, 1, 1), "stage2.0.fuse_layers.0.1.1.running_var": (48,),
    "stage2.0.fuse_layers.1.0.0.0.weight": (96, 48, 3, 3),
    "stage3.3.fuse_layers.2.0.0.0.weight": (48, 48, 3, 3), "stage3.3.fuse_layers.2.0.1.0.weight": (192, 48, 3, 3),
    "stage4.2.fuse_layers.3.0.2.0.weight": (384, 48, 3, 3), "stage4.2.fuse_layers.0.3.0.weight": (48, 384, 1, 1),
}
# keys that must NOT exist: the None transitions / fuse diagonals, anything past stage4's 3 modules
ABSENT_PREFIXES = ("transition2.0.", "transition2.1.", "transition3.0.", "transition3.2.",
                   "stage2.0.fuse_layers.0.0.", "stage4.2.fuse_layers.3.3.", "stage2.1.", "stage3.4.", "stage4.3.",
                   "layer1.1.downsample", "stage2.0.branches.0.0.downsample")
PSA_KEYS = {
    "p": {"stage2.0.branches.0.0.deattn.conv_q_right.weight": (1, 48, 1, 1),
          "stage2.0.branches.0.0.deattn.conv_v_right.weight": (24, 48, 1, 1),
          "stage2.0.branches.0.0.deattn.conv_q_left.weight": (24, 48, 1, 1),
          "stage2.0.branches.0.0.deattn.conv_v_left.weight": (24, 48, 1, 1),
          "stage4.2.branches.3.3.deattn.conv_up.weight": (384, 192, 1, 1)},
    "s": {"stage2.0.branches.0.0.deattn.conv_q_right.weight": (1, 48, 1, 1),
          "stage3.1.branches.2.0.deattn.conv_v_left.weight": (96, 192, 1, 1),
          "stage2.0.branches.0.0.deattn.conv_up.0.weight": (6, 24, 1, 1),
          "stage2.0.branches.0.0.deattn.conv_up.0.bias": (6,),
          "stage2.0.branches.0.0.deattn.conv_up.1.weight": (6, 1, 1),
          "stage2.0.branches.0.0.deattn.conv_up.1.bias": (6, 1, 1),
          "stage4.2.branches.3.3.deattn.conv_up.1.weight": (48, 1, 1),
          "stage4.2.branches.3.3.deattn.conv_up.3.weight": (384, 48, 1, 1),
          "stage4.2.branches.3.3.deattn.conv_up.3.bias": (384,)},
    None: {},
}
VARIANTS = ["s", "p", None]


@functools.lru_cache(maxsize=None)
def _pair(psa):
    """(torch model, Paddle model, facts about the Paddle model's fresh init) of one variant, built once."""
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = thrnet.HRNetV2(psa=psa), phrnet.HRNetV2(psa=psa)
    return tm, pm, {"torch": _init_facts(tm.state_dict()), "paddle": _init_facts(pm.state_dict())}


def _init_facts(sd) -> dict:
    """What upstream's init_weights promises, read off a freshly built state dict."""
    arr = {k: np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v.numpy()) for k, v in sd.items()}
    conv_w = np.concatenate([v.ravel() for k, v in arr.items() if v.ndim == 4])
    bn = [k[:-len(".weight")] for k, v in arr.items() if v.ndim == 1 and k.endswith(".weight")]  # BN only
    psa_q = [v for k, v in arr.items() if k.endswith("deattn.conv_q_left.weight")]
    biases = [(v, arr[k[:-len(".bias")] + ".weight"]) for k, v in arr.items() if k.endswith(("conv_up.0.bias",
                                                                                             "conv_up.3.bias"))]
    ln = [v for k, v in arr.items() if k.endswith("conv_up.1.weight")]
    return {
        "conv_std": float(conv_w.std()), "conv_absmax": float(np.abs(conv_w).max()),
        "psa_q_std": float(np.concatenate([v.ravel() for v in psa_q]).std()) if psa_q else None,
        "bn_identity": all(np.all(arr[b + ".weight"] == 1) and np.all(arr[b + ".bias"] == 0) for b in bn),
        "n_bn": len(bn),
        # torch's default conv bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels (1x1 kernels)
        "bias_in_bound": all(np.all(np.abs(b) <= 1 / np.sqrt(w.shape[1])) for b, w in biases),
        "bias_spread": float(np.mean([np.abs(b).max() * np.sqrt(w.shape[1]) for b, w in biases])) if biases else None,
        "ln_identity": all(np.all(v == 1) for v in ln)
        and all(np.all(arr[k] == 0) for k in arr if k.endswith("conv_up.1.bias")),
    }


# ------------------------------------------------------------------------------------------------- key names
@pytest.mark.slow  # builds the full W48 in both frameworks per variant (~7 s each)
@pytest.mark.parametrize("psa", VARIANTS)
def test_official_key_names_and_shapes(psa):
    tm, pm, _ = _pair(psa)
    sd = tm.state_dict()
    for k, shape in {**COMMON_KEYS, **PSA_KEYS[psa]}.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape))
    assert not [k for k in sd if k.startswith(ABSENT_PREFIXES)]
    q_right = {k for k in sd if k.endswith(".deattn.conv_q_right.weight")}
    assert len(q_right) == (0 if psa is None else 104)  # 1 x 2 x 4 + 4 x 3 x 4 + 3 x 4 x 4 blocks
    if psa is None:
        assert not [k for k in sd if ".deattn." in k]
    assert ("stage2.0.branches.0.0.deattn.conv_up.1.weight" in sd) == (psa == "s")
    assert ("stage2.0.branches.0.0.deattn.conv_up.weight" in sd) == (psa == "p")
    assert tm.high_level_ch == pm.high_level_ch == 720
    assert tm.transition2[0] is None and pm.transition2[0] is None
    assert tm.stage3[0].fuse_layers[1][1] is None and pm.stage3[0].fuse_layers[1][1] is None


@pytest.mark.slow  # the same two W48 builds per variant (5-8 s each)
@pytest.mark.parametrize("psa", VARIANTS)
def test_paddle_twin_has_the_same_keys_modulo_bn_renames(psa):
    tm, pm, _ = _pair(psa)
    expected = {paddle_key(k): tuple(v.shape) for k, v in tm.state_dict().items() if paddle_key(k)}
    got = {k: tuple(v.shape) for k, v in pm.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("module", [thrnet, phrnet], ids=["torch", "paddle"])
def test_psa_value_is_validated(module):
    with pytest.raises(ValueError, match=r"\['s', 'p', None\].*got 'x'"):
        module.HRNetV2(psa="x")
    with pytest.raises(ValueError, match=r"\['s', 'p', None\].*got 'P'"):
        module.BasicBlock(8, 8, psa="P")


@pytest.mark.parametrize("psa", VARIANTS)
def test_init_is_upstreams(psa):
    """Conv weights N(0, 0.001^2) (PSA's kaiming init overwritten), BN identity, PSA_s biases in torch's default
    range and not zero (Paddle's own default), LayerNorm identity; both trees."""
    facts = _pair(psa)[2]
    for side in ("torch", "paddle"):
        f = facts[side]
        assert f["conv_std"] == pytest.approx(0.001, rel=0.01), side
        assert f["conv_absmax"] < 0.0075, side
        assert f["bn_identity"] and f["n_bn"] > 300, side
        if psa is not None:  # kaiming fan_in would give std sqrt(2 / C) >= 0.07
            assert f["psa_q_std"] == pytest.approx(0.001, rel=0.02), side
        if psa == "s":
            assert f["bias_in_bound"] and f["ln_identity"], side
            assert 0.5 < f["bias_spread"] <= 1.0, side  # the max of U(-b, b) draws is close to b


# ---------------------------------------------------------------------------------------------- PSA formulas
def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _psa_weights(rng, c, variant):
    ci, cb = c // 2, c // 8
    w = {"conv_q_right.weight": rng.standard_normal((1, c)), "conv_v_right.weight": rng.standard_normal((ci, c)),
         "conv_q_left.weight": rng.standard_normal((ci, c)), "conv_v_left.weight": rng.standard_normal((ci, c))}
    if variant == "p":
        w["conv_up.weight"] = rng.standard_normal((c, ci))
    else:
        w.update({"conv_up.0.weight": rng.standard_normal((cb, ci)), "conv_up.0.bias": rng.standard_normal(cb),
                  "conv_up.1.weight": 0.5 + rng.random(cb), "conv_up.1.bias": rng.standard_normal(cb),
                  "conv_up.3.weight": rng.standard_normal((c, cb)), "conv_up.3.bias": rng.standard_normal(c)})
    return {k: v * (0.3 if k.endswith("weight") and v.ndim == 2 else 1.0) for k, v in w.items()}


def _as_state(w):
    """numpy formula weights -> state-dict arrays: 1x1 conv weights (out, in, 1, 1), LayerNorm (C/8, 1, 1)."""
    out = {}
    for k, v in w.items():
        if v.ndim == 2:
            v = v[:, :, None, None]
        elif k.startswith("conv_up.1."):
            v = v[:, None, None]
        out[k] = np.ascontiguousarray(v)
    return out


def _channel_mask(x, w, variant):
    """The mask upstream computes in `spatial_pool`: (N, C)."""
    q = _softmax(np.einsum("oc,ncp->nop", w["conv_q_right.weight"], x), -1)  # (N, 1, HW) over positions
    v = np.einsum("oc,ncp->nop", w["conv_v_right.weight"], x)                # (N, C/2, HW)
    ctx = np.einsum("nip,np->ni", v, q[:, 0])                                # (N, C/2)
    if variant == "p":
        return _sigmoid(ctx @ w["conv_up.weight"].T)
    h = ctx @ w["conv_up.0.weight"].T + w["conv_up.0.bias"]                  # (N, C/8)
    mu, var = h.mean(1, keepdims=True), h.var(1, keepdims=True)               # LayerNorm across the C/8 channels
    h = (h - mu) / np.sqrt(var + 1e-5) * w["conv_up.1.weight"] + w["conv_up.1.bias"]
    return _sigmoid(np.maximum(h, 0) @ w["conv_up.3.weight"].T + w["conv_up.3.bias"])


def _spatial_mask(x, w, variant):
    """The mask upstream computes in `channel_pool`: (N, HW)."""
    g = np.einsum("oc,ncp->nop", w["conv_q_left.weight"], x).mean(-1)        # (N, C/2), the average pool
    theta = np.einsum("oc,ncp->nop", w["conv_v_left.weight"], x)             # (N, C/2, HW)
    if variant == "p":
        return _sigmoid(_softmax(np.einsum("ni,nip->np", g, theta), -1))
    return _sigmoid(np.einsum("ni,nip->np", g, _softmax(theta, -1)))


def _psa_formula(x, w, variant):
    n, c, h, wd = x.shape
    flat = x.reshape(n, c, h * wd)
    if variant == "p":
        out = flat * _channel_mask(flat, w, "p")[:, :, None] + flat * _spatial_mask(flat, w, "p")[:, None, :]
    else:
        y = flat * _channel_mask(flat, w, "s")[:, :, None]
        out = y * _spatial_mask(y, w, "s")[:, None, :]
    return out.reshape(n, c, h, wd)


@pytest.mark.parametrize("variant", ["p", "s"])
def test_psa_blocks_compute_their_formulas(variant):
    """C = 32 (C/8 = 4 channels under the LayerNorm: with 1 it would output its bias whatever came in), 3 x 5."""
    rng = np.random.default_rng(7)
    c = 32
    x = rng.standard_normal((2, c, 3, 5))
    w = _psa_weights(rng, c, variant)
    expected = _psa_formula(x, w, variant)
    state = _as_state(w)
    cls_name = "PSA_p" if variant == "p" else "PSA_s"

    tblock = getattr(thrnet, cls_name)(c, c).double()
    tblock.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(tblock(torch.from_numpy(x)).numpy(), expected, rtol=1e-12, atol=1e-12)

    pblock = getattr(phrnet, cls_name)(c, c)
    pblock.to(dtype="float64")
    strict_load(pblock, {k: v for k, v in state.items()})
    np.testing.assert_allclose(pblock(paddle.to_tensor(x)).numpy(), expected, rtol=1e-12, atol=1e-12)

    # the mask each method applies (the names are swapped relative to what they compute)
    flat = x.reshape(2, c, 15)
    masked = {"spatial_pool": flat * _channel_mask(flat, w, variant)[:, :, None],
              "channel_pool": flat * _spatial_mask(flat, w, variant)[:, None, :]}
    for method, want in masked.items():
        with torch.no_grad():
            got_t = getattr(tblock, method)(torch.from_numpy(x)).numpy()
        got_p = getattr(pblock, method)(paddle.to_tensor(x)).numpy()
        np.testing.assert_allclose(got_t.reshape(2, c, 15), want, rtol=1e-12, atol=1e-12, err_msg=method)
        np.testing.assert_allclose(got_p.reshape(2, c, 15), want, rtol=1e-12, atol=1e-12, err_msg=method)


def test_layer_norm_vocabulary_is_torchs_in_float64():
    """L.LayerNorm: weight/bias of the full normalized shape (C, 1, 1) in both trees, biased variance, eps 1e-5 in
    float64 (Paddle's layer_norm kernel rounds eps to float32: ~1e-9 off on a near-constant input like row 0)."""
    from paddle_impl import layers as pl
    from torch_ref import layers as tl

    x = np.array([[1.0, 1.0 + 1e-4, 1.0 - 2e-4, 1.0 + 3e-4], [0.3, -2.0, 5.0, 1.0]])
    w, b = np.array([0.5, 1.5, -1.0, 2.0]), np.array([0.1, -0.2, 0.3, 0.0])
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    expected = ((x - mu) / np.sqrt(var + 1e-5) * w + b).reshape(2, 4, 1, 1)
    tln = tl.LayerNorm((4, 1, 1)).double()
    pln = pl.LayerNorm((4, 1, 1))
    pln.to(dtype="float64")
    assert tuple(tln.weight.shape) == tuple(pln.weight.shape) == tuple(pln.bias.shape) == (4, 1, 1)
    assert isinstance(pln, pl.NORM_LAYERS) and isinstance(tln, tl.NORM_LAYERS)  # the norm weight-decay group
    with torch.no_grad():
        tln.weight.copy_(torch.from_numpy(w.reshape(4, 1, 1)))
        tln.bias.copy_(torch.from_numpy(b.reshape(4, 1, 1)))
        got_t = tln(torch.from_numpy(x.reshape(2, 4, 1, 1))).numpy()
    strict_load(pln, {"weight": w.reshape(4, 1, 1), "bias": b.reshape(4, 1, 1)})
    got_p = pln(paddle.to_tensor(x.reshape(2, 4, 1, 1))).numpy()
    np.testing.assert_allclose(got_t, expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(got_p, expected, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------- forward parity
def _randomize_convs_(model, seed):
    """Conv weights ~ N(0, 0.25 / fan_in) (upstream's 0.001 would shrink the activations to subnormal numbers and
    compare nothing), LayerNorm affine random; BN and conv biases random by `randomize_`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (0.5 / m.weight[0].numel() ** 0.5))
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return randomize_(model, seed)


@pytest.mark.slow
@pytest.mark.parametrize("psa", VARIANTS)
def test_forward_parity_float64(psa):
    tm, pm, _ = _pair(psa)
    _randomize_convs_(tm, seed=3).double().eval()
    pm.to(dtype="float64")
    strict_load(pm, {paddle_key(k): v.numpy() for k, v in tm.state_dict().items() if paddle_key(k)})
    pm.eval()
    assert pm.stage2[0].branches[0][0].bn1._mean.dtype == paddle.float64  # BN statistics not rounded to float32
    x = np.random.default_rng(4).standard_normal((1, 3, 64, 64))
    with torch.no_grad():
        t_out = tm(torch.from_numpy(x)).numpy()
    p_out = pm(paddle.to_tensor(x)).numpy()
    assert t_out.shape == p_out.shape == (1, 720, 16, 16)
    assert np.abs(t_out).max() > 1.0 and np.abs(t_out).std() > 0.1  # non-trivial activations
    # measured ~1.2e-14 (|out| up to ~14); with the float32-rounded eps of Paddle's BN / LayerNorm kernels it was
    # 4e-12 to 9e-12, which this bound catches
    diff = float(np.abs(t_out - p_out).max())
    assert diff < 1e-12, diff


def test_output_size_is_ceil_quarter():
    """Branch 0 is at stride 4 (ceil for odd sizes); branches 1..3 are resized to it."""
    tm = _pair(None)[0].eval()
    with torch.no_grad():
        out = tm(torch.zeros(1, 3, 37, 50, dtype=tm.conv1.weight.dtype))
    assert tuple(out.shape) == (1, 720, 10, 13)


# ------------------------------------------------------------------------------------------------ psa_from_keys
@pytest.mark.parametrize("module", [thrnet, phrnet], ids=["torch", "paddle"])
@pytest.mark.parametrize("psa", VARIANTS)
def test_psa_from_keys(module, psa):
    keys = list(_pair(psa)[0].state_dict().keys())
    assert module.psa_from_keys(keys) == psa
    prefixed = ["backbone." + k for k in keys] + ["ocr.cls_head.weight", "scale_attn.conv0.weight"]
    assert module.psa_from_keys(prefixed, "backbone.") == psa
    assert module.psa_from_keys(prefixed, prefix="backbone.") == psa
    assert module.psa_from_keys(keys, "backbone.") is None  # nothing under the prefix
    paddle_keys = [paddle_key(k) for k in keys if paddle_key(k)]
    assert module.psa_from_keys(paddle_keys) == psa
