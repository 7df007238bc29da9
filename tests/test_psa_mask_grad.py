"""PSA mask op gradients: torch gradcheck / gradgradcheck / opcheck, and a float64 finite-difference check for
Paddle (which has no public gradcheck)."""
from __future__ import annotations

import numpy as np
import pytest

import psa_reference as ref

# (N, mask_h, mask_w, H, W): odd, even, non-square, larger than the full window, 1xW map
GRAD_CASES = [(2, 3, 3, 3, 4), (1, 4, 4, 4, 4), (1, 3, 5, 2, 5), (1, 7, 9, 3, 3), (2, 3, 3, 1, 5)]


def _case_id(c):
    return "n{}-m{}x{}-{}x{}".format(*c)


@pytest.fixture(scope="module")
def torch_op():
    ref.require_op("torch")
    import torch

    return torch


@pytest.mark.parametrize("impl", ["cpp", "tensor"])
@pytest.mark.parametrize("psa_type", [0, 1])
@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_torch_gradcheck(torch_op, case, psa_type, impl):
    torch = torch_op
    from torch_ref.ops import psa_mask

    n, mh, mw, h, w = case
    x = torch.randn(n, mh * mw, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                    requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: psa_mask(a, psa_type, (mh, mw), impl=impl), (x,), eps=1e-6,
                                    atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("psa_type", [0, 1])
def test_torch_gradgradcheck(torch_op, psa_type):
    torch = torch_op
    from torch_ref.ops import psa_mask

    x = torch.randn(2, 12, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: psa_mask(a, psa_type, (3, 4), impl="cpp"), (x,))


@pytest.mark.parametrize("psa_type", [0, 1])
def test_torch_opcheck(torch_op, psa_type):
    torch = torch_op
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 15, 3, 5, dtype=torch.float64, requires_grad=True)
    for op, args in ((torch.ops.segtwin.psa_mask.default, (x, psa_type, 3, 4)),
                     (torch.ops.segtwin.psa_mask_backward.default, (g, psa_type, 3, 4))):
        result = torch.library.opcheck(op, args)
        assert result and all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_traces_the_op(torch_op):
    """The fake kernel lets the op go through torch.compile's graph capture (aot_eager: no C++ codegen)."""
    torch = torch_op
    from torch_ref.ops import psa_mask

    x = torch.randn(2, 12, 3, 5, requires_grad=True)
    f = torch.compile(lambda a: psa_mask(a, 1, (3, 4), impl="cpp").square().sum(), backend="aot_eager",
                      fullgraph=True)
    y = f(x)
    (gx,) = torch.autograd.grad(y, x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = psa_mask(x2, 1, (3, 4), impl="cpp").square().sum()
    (gx2,) = torch.autograd.grad(y2, x2)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)


@pytest.mark.parametrize("impl", ["cpp", "tensor"])
@pytest.mark.parametrize("psa_type", [0, 1])
@pytest.mark.parametrize("case", GRAD_CASES[:4], ids=_case_id)
def test_paddle_finite_difference_float64(case, psa_type, impl):
    """d/dx sum(w * psa_mask(x)) from paddle.grad against central differences in float64."""
    if impl == "cpp":
        ref.require_op("paddle")
    import paddle

    from paddle_impl.ops import psa_mask

    n, mh, mw, h, w = case
    rng = np.random.default_rng(11)
    x0 = rng.standard_normal((n, mh * mw, h, w))
    weight = rng.standard_normal((n, h * w, h, w))
    wt = paddle.to_tensor(weight)

    def loss_np(a: np.ndarray) -> float:
        return float((psa_mask(paddle.to_tensor(a), psa_type, (mh, mw), impl=impl) * wt).sum())

    numeric = ref.numeric_grad(loss_np, x0, eps=1e-6)
    xt = paddle.to_tensor(x0, stop_gradient=False)
    (analytic,) = paddle.grad([(psa_mask(xt, psa_type, (mh, mw), impl=impl) * wt).sum()], [xt])
    assert analytic.dtype == paddle.float64
    np.testing.assert_allclose(analytic.numpy(), numeric, rtol=1e-6, atol=1e-8)
    # the op is a copy: the exact gradient is the weight gathered back, so compare to the adjoint loop too
    np.testing.assert_array_equal(analytic.numpy(), ref.psa_mask_backward_loop(weight, psa_type, mh, mw))


def test_paddle_grad_op_with_non_contiguous_upstream_gradient():
    """The gradient that reaches the grad kernel may be a strided view; it must be read correctly."""
    ref.require_op("paddle")
    import paddle

    from paddle_impl.ops import psa_mask

    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((1, 9, 4, 4))
    xt = paddle.to_tensor(x0, stop_gradient=False)
    y = psa_mask(xt, 0, 3, impl="cpp").transpose([0, 1, 3, 2])  # backward hands the op a transposed gradient
    g = rng.standard_normal((1, 16, 4, 4))
    (gx,) = paddle.grad([y], [xt], [paddle.to_tensor(g)])
    np.testing.assert_array_equal(gx.numpy(), ref.psa_mask_backward_loop(g.transpose(0, 1, 3, 2), 0, 3, 3))
