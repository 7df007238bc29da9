"""RMI loss twins (torch_ref/rmi.py, paddle_impl/rmi.py), NVIDIA/semantic-segmentation's `loss/rmi.py` semantics.

Expected values come from `np_rmi_loss` below: an independent float64 numpy transcription of the loss (explicit
one-hot, loops for the pooling windows and the radius x radius shifts, np.linalg.inv / np.linalg.cholesky per image
and class), never from either twin. Gradients are checked against central differences of that reference, then the
twins against each other (float64: to rounding; float32: to a bound set from measurement).
"""
from __future__ import annotations

import numpy as np
import paddle
import pytest
import torch

from paddle_impl.rmi import RMILoss as PaddleRMILoss
from torch_ref.rmi import RMILoss as TorchRMILoss

TWINS = {"torch": TorchRMILoss, "paddle": PaddleRMILoss}


# ---------------------------------------------------------------------------------------------------------------
# The numpy reference (float64)
# ---------------------------------------------------------------------------------------------------------------

def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _pool(x, k, s, p, how):
    """NCHW pooling with zero (avg, divisor k * k whatever the padding) or -inf (max) padding, floor mode."""
    n, c, h, w = x.shape
    fill = 0.0 if how == "avg" else -np.inf
    padded = np.full((n, c, h + 2 * p, w + 2 * p), fill)
    padded[:, :, p:p + h, p:p + w] = x
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = padded[:, :, i * s:i * s + k, j * s:j * s + k]
            out[:, :, i, j] = win.sum(axis=(2, 3)) / (k * k) if how == "avg" else win.max(axis=(2, 3))
    return out


def _nearest(x, oh, ow):
    """Nearest resize: output (i, j) reads input (floor(i * H / oh), floor(j * W / ow))."""
    h, w = x.shape[2:]
    rows = [min(int(np.floor(i * h / oh)), h - 1) for i in range(oh)]
    cols = [min(int(np.floor(j * w / ow)), w - 1) for j in range(ow)]
    return x[:, :, rows][:, :, :, cols]


def _bilinear_align_corners(x, oh, ow):
    """Bilinear resize with align_corners: output (i, j) samples input (i * (H-1)/(oh-1), j * (W-1)/(ow-1))."""
    h, w = x.shape[2:]
    out = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        sy = i * (h - 1) / (oh - 1) if oh > 1 else 0.0
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(ow):
            sx = j * (w - 1) / (ow - 1) if ow > 1 else 0.0
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, :, i, j] = ((1 - fy) * (1 - fx) * x[:, :, y0, x0] + (1 - fy) * fx * x[:, :, y0, x1]
                               + fy * (1 - fx) * x[:, :, y1, x0] + fy * fx * x[:, :, y1, x1])
    return out


def np_rmi_loss(logits, labels, num_classes, radius=3, pool_way=1, pool=4, lam=0.5, lambda_way=1, do_rmi=True):
    """The whole loss in float64 numpy, written from the paper's construction as NVIDIA's code applies it."""
    logits = logits.astype(np.float64)
    n, c, h, w = logits.shape
    valid = (labels < num_classes).astype(np.float64)                          # (N, H, W)
    onehot = np.zeros((n, c, h, w))
    for k in range(c):
        onehot[:, k] = (labels == k) * valid
    bce = np.maximum(logits, 0) - logits * onehot + np.log1p(np.exp(-np.abs(logits)))
    bce = (bce * valid[:, None]).sum() / (valid.sum() + 1.0)
    if not do_rmi:
        return bce

    probs = _sigmoid(logits) * valid[:, None] + 1e-6
    ya, pa = onehot, probs
    if pool > 1:
        if pool_way == 2:
            ya, pa = _nearest(ya, h // pool, w // pool), _bilinear_align_corners(pa, h // pool, w // pool)
        else:
            how = "avg" if pool_way == 1 else "max"
            ya, pa = _pool(ya, pool, pool, pool // 2, how), _pool(pa, pool, pool, pool // 2, how)
    ph, pw = ya.shape[2:]
    mh, mw = ph - radius + 1, pw - radius + 1
    d = radius * radius
    alpha = 5e-4 * np.eye(d)
    rmi = np.zeros((n, c))
    for i in range(n):
        for k in range(c):
            yv = np.zeros((d, mh * mw))
            pv = np.zeros((d, mh * mw))
            for dy in range(radius):
                for dx in range(radius):
                    yv[dy * radius + dx] = ya[i, k, dy:dy + mh, dx:dx + mw].ravel()
                    pv[dy * radius + dx] = pa[i, k, dy:dy + mh, dx:dx + mw].ravel()
            yv -= yv.mean(axis=1, keepdims=True)
            pv -= pv.mean(axis=1, keepdims=True)
            syp = yv @ pv.T
            cond = yv @ yv.T - syp @ np.linalg.inv(pv @ pv.T + alpha) @ syp.T
            chol = np.linalg.cholesky(cond + alpha)
            rmi[i, k] = 0.5 * 2.0 * np.log(np.diag(chol) + 1e-8).sum()
    rmi_loss = (rmi.mean(axis=0) / d).sum()
    return lam * bce + (1 - lam) * rmi_loss if lambda_way == 1 else bce + lam * rmi_loss


# ---------------------------------------------------------------------------------------------------------------
# Running the twins
# ---------------------------------------------------------------------------------------------------------------

def run_twin(name, logits, labels, dtype="float64", do_rmi=True, **kwargs):
    """(loss as float, loss dtype name, d loss / d logits as float64 numpy) of one twin."""
    criterion = TWINS[name](logits.shape[1], **kwargs)
    if name == "torch":
        x = torch.tensor(logits.astype(dtype), requires_grad=True)
        loss = criterion(x, torch.tensor(labels), do_rmi=do_rmi)
        loss.backward()
        return loss.item(), str(loss.dtype).split(".")[-1], x.grad.numpy().astype(np.float64)
    x = paddle.to_tensor(logits.astype(dtype), stop_gradient=False)
    loss = criterion(x, paddle.to_tensor(labels), do_rmi=do_rmi)
    loss.backward()
    return loss.item(), str(loss.dtype).split(".")[-1], x.grad.numpy().astype(np.float64)


def tiny_case(seed=0, n=2, c=3, h=21, w=18):
    """Random logits; labels with 255 and labels >= C (both ignored) and a spatially coherent part."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, (n, h, w))
    labels[:, : h // 2, : w // 2] = 1
    labels[rng.random((n, h, w)) < 0.15] = 255
    labels[0, 3, 4], labels[1, 10, 7], labels[1, 0, 0] = c, c + 4, 255
    logits = rng.normal(size=(n, c, h, w)) + 2.0 * np.eye(c)[np.minimum(labels, c - 1)].transpose(0, 3, 1, 2)
    return logits, labels


def medium_case(seed=0, n=2, c=19, h=64, w=64):
    """8 x 8 label blocks, logits favouring the label plus noise, 20 % of the pixels ignored."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, c, (n, h // 8, w // 8)), np.ones((8, 8), dtype=np.int64))
    logits = 3.0 * np.eye(c)[labels].transpose(0, 3, 1, 2) - 1.5 + rng.normal(size=(n, c, h, w))
    labels[rng.random(labels.shape) < 0.2] = 255
    return logits, labels


# ---------------------------------------------------------------------------------------------------------------
# Values against the reference
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("twin", sorted(TWINS))
@pytest.mark.parametrize("do_rmi", [True, False])
@pytest.mark.parametrize("lambda_way", [0, 1])
def test_float64_loss_matches_numpy(twin, do_rmi, lambda_way):
    logits, labels = tiny_case()
    expected = np_rmi_loss(logits, labels, 3, lambda_way=lambda_way, lam=0.3, do_rmi=do_rmi)
    loss, dtype, _ = run_twin(twin, logits, labels, do_rmi=do_rmi, lambda_way=lambda_way, loss_weight_lambda=0.3)
    assert dtype == "float64"
    np.testing.assert_allclose(loss, expected, rtol=1e-10)


@pytest.mark.parametrize("twin", sorted(TWINS))
@pytest.mark.parametrize("pool_way, pool, radius", [(0, 4, 3), (2, 4, 3), (1, 2, 2), (1, 1, 3), (0, 3, 4)])
def test_float64_pool_ways_and_radii_match_numpy(twin, pool_way, pool, radius):
    logits, labels = tiny_case(seed=1)
    expected = np_rmi_loss(logits, labels, 3, radius=radius, pool_way=pool_way, pool=pool)
    loss, _, _ = run_twin(twin, logits, labels, rmi_radius=radius, rmi_pool_way=pool_way, rmi_pool_size=pool,
                          rmi_pool_stride=pool)
    np.testing.assert_allclose(loss, expected, rtol=1e-10)


def test_bce_term_is_not_weighted_by_lambda():
    logits, labels = tiny_case()
    for twin in TWINS:
        bce, _, _ = run_twin(twin, logits, labels, do_rmi=False, loss_weight_lambda=0.2)
        np.testing.assert_allclose(bce, np_rmi_loss(logits, labels, 3, do_rmi=False), rtol=1e-12)


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_float64_gradient_matches_central_differences(twin):
    logits, labels = tiny_case(seed=2)
    _, _, grad = run_twin(twin, logits, labels)
    rng = np.random.default_rng(5)
    valid = np.argwhere(labels < 3)
    picks = [(i, int(rng.integers(0, 3)), y, x) for i, y, x in valid[rng.choice(len(valid), 6, replace=False)]]
    step = 1e-5
    for idx in picks:
        plus, minus = logits.copy(), logits.copy()
        plus[idx] += step
        minus[idx] -= step
        numeric = (np_rmi_loss(plus, labels, 3) - np_rmi_loss(minus, labels, 3)) / (2 * step)
        np.testing.assert_allclose(grad[idx], numeric, rtol=1e-5, atol=1e-9, err_msg=f"{twin} at {idx}")
    ignored = labels >= 3  # no term reaches an ignored pixel: exactly zero gradient on every class
    assert np.all(grad.transpose(0, 2, 3, 1)[ignored] == 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Twin against twin
# ---------------------------------------------------------------------------------------------------------------

def test_twins_agree_float64_loss_and_gradient():
    logits, labels = medium_case()
    t_loss, _, t_grad = run_twin("torch", logits, labels)
    p_loss, _, p_grad = run_twin("paddle", logits, labels)
    print(f"float64 torch vs paddle: loss {abs(t_loss - p_loss):.2e} (of {t_loss:.6f}), "
          f"gradient max abs {np.abs(t_grad - p_grad).max():.2e} (max |grad| {np.abs(t_grad).max():.2e})")
    np.testing.assert_allclose(p_loss, t_loss, rtol=1e-12)
    assert np.abs(t_grad - p_grad).max() < 1e-10


def test_twins_agree_float32_loss_and_gradient():
    logits, labels = medium_case()
    t_loss, t_dtype, t_grad = run_twin("torch", logits, labels, dtype="float32")
    p_loss, p_dtype, p_grad = run_twin("paddle", logits, labels, dtype="float32")
    assert t_dtype == p_dtype == "float32"
    loss_rel = abs(t_loss - p_loss) / abs(t_loss)
    grad_rel = np.abs(t_grad - p_grad).max() / np.abs(t_grad).max()
    print(f"float32 torch vs paddle: loss {abs(t_loss - p_loss):.2e} (relative {loss_rel:.1e}), gradient max abs "
          f"{np.abs(t_grad - p_grad).max():.2e} (relative to max |grad|: {grad_rel:.1e})")
    # Measured on this and 17 other 2 x 19 x 64 x 64 inputs (random and block labels, logit scales 1 to 10, the
    # BCE + RMI loss and the RMI term alone): loss <= 2.2e-7 relative, gradient <= 2.9e-7 of max |grad|, i.e. a
    # couple of float32 roundings (the float64 block sees inputs that differ by the float32 rounding of the pooled
    # maps only). The bound leaves a 17x margin.
    assert loss_rel < 5e-6
    assert grad_rel < 5e-6
    # and both stay as close to the float64 reference value
    reference = np_rmi_loss(logits, labels, 19)
    np.testing.assert_allclose([t_loss, p_loss], reference, rtol=5e-6)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    (dict(rmi_radius=0), "0"), (dict(rmi_radius=11), "11"), (dict(rmi_radius=2.0), "2.0"),
    (dict(rmi_pool_size=4, rmi_pool_stride=2), "4 and 2"), (dict(rmi_pool_way=5), "5"),
    (dict(lambda_way=2), "2"), (dict(ignore_index=7), "7"), (dict(rmi_pool_size=0, rmi_pool_stride=0), "0"),
])
@pytest.mark.parametrize("twin", sorted(TWINS))
def test_bad_arguments_raise_value_error(twin, kwargs, named):
    with pytest.raises(ValueError, match=f"got {named}"):
        TWINS[twin](19, **kwargs)


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_bad_class_count_and_undefined_pool_way(twin):
    with pytest.raises(ValueError, match="got 0"):
        TWINS[twin](0)
    with pytest.raises(NotImplementedError, match="rmi_pool_way 3"):
        TWINS[twin](19, rmi_pool_way=3)
    TWINS[twin](19, rmi_pool_way=3, rmi_pool_size=1, rmi_pool_stride=1)  # no downsampling: upstream accepts it


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_bad_inputs_raise_value_error(twin):
    logits, labels = tiny_case()
    with pytest.raises(ValueError, match="4 channels, num_classes is 3"):
        TWINS[twin](3)(*_as(twin, np.concatenate([logits, logits[:, :1]], 1), labels))
    with pytest.raises(ValueError, match="differ in N, H or W"):
        TWINS[twin](3)(*_as(twin, logits, labels[:, :-1]))
    bad = labels.copy()
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="minimum -1"):
        TWINS[twin](3)(*_as(twin, logits, bad))
    with pytest.raises(ValueError, match="downsampled to 2 x 2"):
        TWINS[twin](3)(*_as(twin, logits[:, :, :5, :5], labels[:, :5, :5]))


def _as(twin, logits, labels):
    if twin == "torch":
        return torch.tensor(logits), torch.tensor(labels)
    return paddle.to_tensor(logits), paddle.to_tensor(labels)
