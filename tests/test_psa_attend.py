"""Fused PSA aggregation (torch_ref/ops/psa_attend.py, paddle_impl/ops/psa_attend.py): the compiled kernels against
the reference path bmm(feat, softmax(psa_mask(logits), dim=1)) / nf -- float64 to 1e-12 forward and for both
gradients, gradcheck, float32 within a measured tolerance, Paddle <-> torch, bad input, and PSANet's psa_impl."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import psa_reference as ref

FRAMEWORKS = ["torch", "paddle"]
# (N, C, H, W, mask_h, mask_w): odd / even / non-square masks, smaller and larger than the full (2H-1, 2W-1)
# window, H != W, N > 1
CASES = [
    (2, 3, 4, 5, 3, 3),     # odd, smaller than the map's full window, N=2
    (1, 2, 5, 3, 4, 2),     # even, non-square
    (2, 4, 3, 4, 7, 9),     # larger than the full window (5, 7)
    (1, 3, 6, 6, 11, 11),   # exactly the full window
    (1, 2, 9, 7, 3, 5),     # H != W, small non-square mask (most pairs outside the window)
    (1, 5, 17, 3, 5, 3),    # thin map
    (1, 3, 5, 37, 5, 7),    # small mask on a wide map
    (2, 2, 4, 20, 9, 41),   # wide mask, larger than the full window (7, 39)
    (1, 2, 3, 131, 3, 5),   # rows wider than one 128-pixel group of the kernels' loops (the last group partial)
]


def _case_id(c):
    return "n{}-c{}-{}x{}-m{}x{}".format(*c)


def _data(case, seed=0):
    n, c, h, w, mh, mw = case
    rng = np.random.default_rng(seed)
    # logits of a few units: large enough that the max subtraction matters, with positive and negative values
    return (rng.standard_normal((n, c, h, w)), 3.0 * rng.standard_normal((n, mh * mw, h, w)),
            rng.standard_normal((n, c, h, w)))


def _run(framework, impl, f, lg, g, psa_type, mask, nf=1.0, dtype="float64"):
    """(out, grad_feat, grad_logits) as float64 numpy."""
    if framework == "torch":
        import torch

        from torch_ref.ops.psa_attend import psa_attend

        ft = torch.tensor(f.astype(dtype), requires_grad=True)
        lt = torch.tensor(lg.astype(dtype), requires_grad=True)
        out = psa_attend(ft, lt, psa_type, mask, normalization_factor=nf, impl=impl)
        gf, gl = torch.autograd.grad(out, (ft, lt), torch.tensor(g.astype(dtype)))
        return tuple(a.detach().numpy().astype(np.float64) for a in (out, gf, gl))
    import paddle

    from paddle_impl.ops.psa_attend import psa_attend

    fp = paddle.to_tensor(f.astype(dtype), stop_gradient=False)
    lp = paddle.to_tensor(lg.astype(dtype), stop_gradient=False)
    out = psa_attend(fp, lp, psa_type, mask, normalization_factor=nf, impl=impl)
    gf, gl = paddle.grad([out], [fp, lp], [paddle.to_tensor(g.astype(dtype))])
    return tuple(a.numpy().astype(np.float64) for a in (out, gf, gl))


@pytest.mark.parametrize("psa_type", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fused_equals_reference_float64(framework, case, psa_type):
    ref.require_op(framework)
    f, lg, g = _data(case)
    mask = case[4:]
    fused = _run(framework, "fused", f, lg, g, psa_type, mask, nf=3.0)
    expected = _run(framework, "reference", f, lg, g, psa_type, mask, nf=3.0)
    for name, a, b in zip(("out", "grad_feat", "grad_logits"), fused, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=name)
    # the logits' gradient is zero exactly where the window cell falls outside the image (no pair, no logit)
    assert np.count_nonzero(fused[2]) > 0


@pytest.mark.parametrize("tile_bytes", ["1", "2000"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fused_many_bands(framework, tile_bytes, monkeypatch):
    """The kernels cut the map into bands of whole rows whose weight tile fits $SEGTWIN_PSA_ATTEND_TILE_BYTES
    (8 MiB by default: one band at these sizes). 1 byte forces one row per band; 2000 bytes a few rows (float64:
    2 rows of a 9x19 map). Every band boundary must give the same numbers as the reference."""
    ref.require_op(framework)
    monkeypatch.setenv("SEGTWIN_PSA_ATTEND_TILE_BYTES", tile_bytes)
    for case in [(1, 3, 9, 19, 5, 7), (2, 2, 7, 5, 13, 9)]:
        f, lg, g = _data(case, seed=11)
        for psa_type in (0, 1):
            fused = _run(framework, "fused", f, lg, g, psa_type, case[4:])
            expected = _run(framework, "reference", f, lg, g, psa_type, case[4:])
            for name, a, b in zip(("out", "grad_feat", "grad_logits"), fused, expected):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=f"{case} {psa_type} {name}")


@pytest.mark.parametrize("psa_type", [0, 1])
def test_fused_softmax_is_semseg_zero_filled(psa_type):
    """An independent check of the semantics: one pixel's softmax worked out by hand in numpy -- window pairs get
    exp(logit), every other pixel of the map exp(0) -- for a 3x3 mask on a 3x4 map (out-of-window pairs exist)."""
    ref.require_op("torch")
    case = (1, 2, 3, 4, 3, 3)
    f, lg, g = _data(case, seed=4)
    out = _run("torch", "fused", f, lg, g, psa_type, (3, 3))[0]
    h, w = 3, 4
    for p in range(h * w):
        ph, pw = divmod(p, w)
        logit = np.zeros(h * w)  # L[p, q] over q
        for i in range(3):
            for j in range(3):
                if psa_type == 0:  # q = p + cell - 1, logit stored at p
                    qh, qw, at = ph + i - 1, pw + j - 1, (ph, pw)
                else:  # p = q + cell - 1, logit stored at q
                    qh, qw = ph - i + 1, pw - j + 1
                    at = (qh, qw)
                if 0 <= qh < h and 0 <= qw < w:
                    logit[qh * w + qw] = lg[0, i * 3 + j, at[0], at[1]]
        a = np.exp(logit - logit.max())
        a /= a.sum()
        np.testing.assert_allclose(out[0, :, ph, pw], f[0].reshape(2, -1) @ a, rtol=0, atol=1e-13)


@pytest.mark.parametrize("psa_type", [0, 1])
@pytest.mark.parametrize("case", [(2, 2, 3, 4, 3, 3), (1, 2, 4, 3, 2, 5)], ids=_case_id)
def test_torch_gradcheck(case, psa_type):
    ref.require_op("torch")
    import torch

    from torch_ref.ops.psa_attend import psa_attend

    f, lg, _ = _data(case, seed=2)
    ft = torch.tensor(f, requires_grad=True)
    lt = torch.tensor(lg, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: psa_attend(a, b, psa_type, case[4:], normalization_factor=2.0),
                                    (ft, lt), eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fused_float32(framework):
    """float32 against the float64 reference. Measured worst absolute errors at this case (torch and Paddle alike):
    fused 1.3e-6 out, 1.2e-6 grad_feat, 1.7e-6 grad_logits; the float32 reference path itself 3.9e-6. The bound,
    2e-5 on values of order 1, leaves >10x headroom over the fused kernels' error."""
    ref.require_op(framework)
    case = (2, 8, 9, 11, 9, 9)
    f, lg, g = _data(case, seed=5)
    for t in (0, 1):
        exact = _run(framework, "reference", f, lg, g, t, (9, 9))
        got = _run(framework, "fused", f, lg, g, t, (9, 9), dtype="float32")
        for name, a, b in zip(("out", "grad_feat", "grad_logits"), got, exact):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("psa_type", [0, 1])
def test_paddle_fused_equals_torch_fused(psa_type):
    for fw in FRAMEWORKS:
        ref.require_op(fw)
    case = (2, 4, 5, 7, 5, 9)
    f, lg, g = _data(case, seed=9)
    a = _run("torch", "fused", f, lg, g, psa_type, case[4:], nf=7.0)
    b = _run("paddle", "fused", f, lg, g, psa_type, case[4:], nf=7.0)
    for name, x, y in zip(("out", "grad_feat", "grad_logits"), a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_input_and_softmax_false(framework):
    ref.require_op(framework)
    s = ref.side(framework)
    if framework == "torch":
        from torch_ref.ops.psa_attend import psa_attend
    else:
        from paddle_impl.ops.psa_attend import psa_attend
    f, lg, g = _data((1, 2, 3, 4, 3, 3))
    ft, lt = s.tensor(f), s.tensor(lg)
    with pytest.raises(ValueError, match=r"impl must be one of \('fused', 'reference'\)"):
        psa_attend(ft, lt, 0, 3, impl="cpp")
    with pytest.raises(ValueError, match=r"attn_logits have 9 channels but the mask \(2, 2\) needs"):
        psa_attend(ft, lt, 0, 2)
    with pytest.raises(ValueError, match=r"must share N, H and W"):
        psa_attend(s.tensor(f[:, :, :2]), lt, 0, 3)
    with pytest.raises(ValueError, match=r"psa_type must be"):
        psa_attend(ft, lt, 2, 3)
    with pytest.raises(ValueError, match=r"normalization_factor must be non-zero"):
        psa_attend(ft, lt, 0, 3, normalization_factor=0)
    with pytest.warns(RuntimeWarning, match=r"reference path because softmax=False"):
        out = psa_attend(ft, lt, 0, 3, softmax=False)
    np.testing.assert_allclose(s.numpy(out), s.numpy(psa_attend(ft, lt, 0, 3, softmax=False, impl="reference")),
                               rtol=0, atol=0)


def test_compiled_ops_reject_bad_input_directly():
    ref.require_op("torch")
    ref.require_op("paddle")
    import paddle
    import torch

    from paddle_impl.ops.psa_mask import load_op

    op = torch.ops.segtwin.psa_attend
    with pytest.raises(RuntimeError, match=r"logits have 9 channels but the mask \(3689348814741910325, 5\)|at most|"
                                           r"mask size must be in"):
        op(torch.zeros(1, 2, 3, 3), torch.zeros(1, 9, 3, 3), 0, 3689348814741910325, 5)
    with pytest.raises(RuntimeError, match=r"float32 or float64"):
        op(torch.zeros(1, 2, 3, 3, dtype=torch.float16), torch.zeros(1, 9, 3, 3, dtype=torch.float16), 0, 3, 3)
    with pytest.raises(RuntimeError, match=r"must share N, H, W"):
        op(torch.zeros(1, 2, 3, 3), torch.zeros(1, 9, 3, 4), 0, 3, 3)
    with pytest.raises(Exception, match=r"logits have 9 channels but the mask \(2, 2\)"):
        load_op().psa_attend(paddle.zeros([1, 2, 3, 3]), paddle.zeros([1, 9, 3, 3]), 0, 2, 2)
    # the backward checks its own operands: grad and out must match feat in shape, dtype and device
    bwd = torch.ops.segtwin.psa_attend_backward
    x, lg = torch.zeros(1, 2, 3, 3), torch.zeros(1, 9, 3, 3)
    with pytest.raises(RuntimeError, match=r"psa_attend_backward: grad and out must have feat's shape"):
        bwd(torch.zeros(1, 2, 3, 4), x, lg, x, 0, 3, 3)
    with pytest.raises(RuntimeError, match=r"psa_attend_backward: grad and out must have feat's dtype"):
        bwd(x, x, lg, x.double(), 0, 3, 3)
    with pytest.raises(RuntimeError, match=r"psa_attend_backward: .*mask size must be in"):
        bwd(x, x, lg, x, 0, 0, 3)
    gx, gl = bwd(torch.zeros(1, 0, 3, 3), torch.zeros(1, 0, 3, 3), lg, torch.zeros(1, 0, 3, 3), 0, 3, 3)
    assert gx.shape == (1, 0, 3, 3) and gl.shape == lg.shape and not gl.any()  # no features: zero logit gradient


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_psanet_psa_impl_fused(framework):
    """PSA with psa_impl='fused' equals psa_impl='cpp' (the reference softmax + bmm) in float64, both types; a bad
    psa_impl is refused."""
    ref.require_op(framework)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16, 9, 7))
    outs = {}
    for impl in ("cpp", "fused"):
        if framework == "torch":
            import torch

            from torch_ref.models.psanet import PSA

            torch.manual_seed(0)
            m = PSA(16, 8, psa_type=2, mask_h=5, mask_w=3, psa_impl=impl).double().eval()
            outs[impl] = m(torch.tensor(x)).detach().numpy()
        else:
            import paddle

            from paddle_impl.models.psanet import PSA

            paddle.seed(0)
            m = PSA(16, 8, psa_type=2, mask_h=5, mask_w=3, psa_impl=impl)
            m.to(dtype="float64")  # parameters and BN buffers
            m.eval()
            outs[impl] = m(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(outs["fused"], outs["cpp"], rtol=0, atol=1e-12)
    cls = PSA
    with pytest.raises(ValueError, match=r"psa_impl must be one of \('auto', 'cpp', 'tensor', 'fused'\)"):
        cls(16, 8, psa_impl="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cls(16, 8, psa_type=0, mask_h=3, mask_w=3, psa_impl="fused")  # no warning outside compact mode
    with pytest.warns(RuntimeWarning, match="compact mode"):
        cls(16, 8, psa_type=0, compact=True, mask_h=3, mask_w=3, psa_impl="fused")
