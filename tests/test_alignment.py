"""End-to-end alignment of PSPNet, and proof that the harness catches real porting bugs.

Each bug is injected, one at a time, into the PADDLE twin only (monkeypatch; the torch reference is untouched). The
run must fail, the FIRST failing step must be the one where the bug lives (earlier steps pass), and the first
divergent module path must name the module where it was injected. A harness that passes a broken port is worse than
none, so every case also checks that the clean run with the same arguments passes.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import alignment
import paddle
import paddle.nn.functional as F
import paddle_impl.checkpoint as pcheckpoint
import paddle_impl.layers as players
import paddle_impl.models.pspnet as ppspnet
from tests.ckpt_factory import shrink_artifacts

SMALL = "2,3,33,33"
ONE = "1,3,33,33"  # forward-only bug runs: eval mode, and no bug below that shows in the forward acts across images

pytestmark = pytest.mark.slow


def _run(tmp_path, steps, iters=2, input_size=SMALL, **kw):
    return alignment.run("pspnet", out=str(tmp_path), input_size=input_size, iters=iters, steps=steps, progress=False,
                         **kw)


def _first_failed_step(v):
    return next((s for s, r in v["steps"].items() if not r["passed"]), None)


# --------------------------------------------------------------------------------------------- the injected bugs
def _ppm_align_corners_false(self, x):
    size = players.spatial_size(x)
    out = [x]
    for f in self.features:
        out.append(F.interpolate(f(x), size=list(size), mode="bilinear", align_corners=False))  # BUG
    return players.cat(out, 1)


def _bn_forward(momentum_unmapped: bool, biased: bool):
    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self._mean, self._variance, self.weight, self.bias, training=False,
                                epsilon=self.eps)
        out = F.batch_norm(x, self._mean.detach().clone(), self._variance.detach().clone(), self.weight,
                           self.bias, training=True, epsilon=self.eps)
        with paddle.no_grad():
            mean = paddle.mean(x, axis=[0, 2, 3])
            var = paddle.var(x, axis=[0, 2, 3], unbiased=not biased)
            # Paddle's convention is new = m*old + (1-m)*batch; "unmapped" passes torch's 0.1 straight in.
            keep = self.momentum if momentum_unmapped else 1.0 - self.momentum
            self._mean.set_value(keep * self._mean + (1.0 - keep) * mean)
            self._variance.set_value(keep * self._variance + (1.0 - keep) * var)
        return out
    return forward


def _strict_load_with_transposed(target_key):
    original = pcheckpoint.strict_load

    def strict_load(layer, state_dict, source="<state_dict>"):
        sd = dict(state_dict)
        w = sd[target_key]
        arr = w.numpy() if hasattr(w, "numpy") else np.asarray(w)
        sd[target_key] = np.ascontiguousarray(arr.transpose(0, 1, 3, 2))  # BUG: H and W swapped
        return original(layer, sd, source)
    return strict_load


def _pixel_cross_entropy_last_axis(logits, label, ignore_index, weight=None):
    # BUG: the softmax normalises over the LAST axis (width), Paddle's default, instead of the class axis.
    logp = F.log_softmax(logits, axis=-1)
    valid = (label != ignore_index)
    safe = paddle.where(valid, label, paddle.zeros_like(label))
    picked = paddle.take_along_axis(logp, safe.unsqueeze(1), axis=1).squeeze(1)
    return -picked * valid.astype(logits.dtype)


@pytest.fixture(scope="module")
def clean_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    yield _run(out, ("forward", "loss", "backward", "metric")), out
    shrink_artifacts(out)


def test_clean_port_passes_every_step(clean_small):
    v, _ = clean_small
    assert v["passed"], json.dumps({s: r["worst"] for s, r in v["steps"].items()}, default=str)[:4000]
    assert set(v["steps"]) == {"forward", "loss", "backward", "metric"}
    assert v["provenance"]["recipe"]["config"].endswith("pspnet_r50_cityscapes.yml")  # the official recipe
    # every parameter gradient, every parameter after the step, every BN statistic and momentum buffer, per iter
    import torch_ref
    m = torch_ref.build_model("pspnet", num_classes=19)
    n_params = len(list(m.named_parameters()))
    n_buffers = len([b for b, _ in m.named_buffers() if not b.endswith("num_batches_tracked")])
    per_iter = 2 + 3 + n_params * 3 + n_buffers  # lrs, loss terms, grad+param+momentum, buffers
    assert v["steps"]["backward"]["keys"] == 2 + 2 * per_iter + 1  # + the two groups' memberships, eval logits
    assert v["trace"]["first_divergent_forward"] is None and v["trace"]["first_divergent_backward"] is None
    assert v["trace"]["layers_forward"] > 200


def test_artifacts_and_provenance(clean_small):
    v, out = clean_small
    d = out / "pspnet"
    for step in ("forward", "loss", "backward", "metric"):
        for suffix in ("_paddle.npy", "_torch.npy", ".npz", "_diff.log"):
            assert (d / f"{step}{suffix}").is_file(), f"{step}{suffix} missing"
    for f in ("verdict.json", "report.md", "report.html", "layer_error.png", "loss_curve.png",
              "trace_forward.csv", "trace_backward.csv"):
        assert (d / f).is_file(), f
    verdict = json.loads((d / "verdict.json").read_text())
    prov = verdict["provenance"]
    for k in ("torch", "paddle", "threads", "flags", "seed", "input_shape", "weights_sha256", "git_commit"):
        assert k in prov, k
    assert prov["input_shape"] == [2, 3, 33, 33]
    npz = np.load(d / "forward.npz", allow_pickle=False)
    assert set(npz.files) == {"torch/logits", "paddle/logits"}
    assert "| forward | PASS |" in (d / "report.md").read_text()


def test_reprod_log_reads_our_files_and_agrees(clean_small, tmp_path, monkeypatch):
    """The real reprod_log package loads segtwin's .npy files; its verdict agrees with segtwin's, on a passing
    step and on a failing one."""
    from alignment.logutil import root_logger_guard
    with root_logger_guard():
        from reprod_log import ReprodDiffHelper
        from reprod_log.utils import check_print_diff

    def reprod_verdict(d, step, threshold):
        helper = ReprodDiffHelper()
        info_p = helper.load_info(str(d / f"{step}_paddle.npy"))
        info_t = helper.load_info(str(d / f"{step}_torch.npy"))
        helper.compare_info(info_p, info_t)
        with root_logger_guard():
            return check_print_diff(helper.diff_dict, diff_method="max", diff_threshold=threshold,
                                    print_func=lambda *a, **k: None)

    v, out = clean_small
    # the threshold is the forward override's atol (5e-4): reprod_log's max-abs rule is comparable to it for logits
    assert reprod_verdict(out / "pspnet", "forward", 5e-4) is True and v["steps"]["forward"]["passed"]
    monkeypatch.setattr(ppspnet.PPM, "forward", _ppm_align_corners_false)
    bad = _run(tmp_path, ("forward",), trace=False)  # reprod_log reads the step's files; the trace is not needed
    assert reprod_verdict(tmp_path / "pspnet", "forward", 5e-4) is False and not bad["steps"]["forward"]["passed"]


# ------------------------------------------------------------------------------------- each bug, one at a time
def test_catches_align_corners_flipped_in_ppm(tmp_path, monkeypatch):
    monkeypatch.setattr(ppspnet.PPM, "forward", _ppm_align_corners_false)
    v = _run(tmp_path, ("forward",), input_size=ONE)
    assert not v["passed"]
    assert _first_failed_step(v) == "forward"
    assert v["steps"]["forward"]["first_divergent"] == "ppm"
    assert v["trace"]["first_divergent_forward"] == "ppm"


def test_catches_bn_momentum_not_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(players.BatchNorm2d, "forward", _bn_forward(momentum_unmapped=True, biased=False))
    v = _run(tmp_path, ("forward", "loss", "backward"), iters=1)  # the first update shows it
    assert v["steps"]["forward"]["passed"] and v["steps"]["loss"]["passed"]
    assert _first_failed_step(v) == "backward"
    assert v["steps"]["backward"]["first_divergent"] == "layer0.1"
    failed = {f["key"] for f in v["steps"]["backward"]["failures"]}
    assert "iter0/buffer/layer0.1.running_mean" in failed


def test_catches_biased_running_variance(tmp_path, monkeypatch):
    monkeypatch.setattr(players.BatchNorm2d, "forward", _bn_forward(momentum_unmapped=False, biased=True))
    v = _run(tmp_path, ("forward", "loss", "backward"), iters=1)  # the first update shows it
    assert v["steps"]["forward"]["passed"] and v["steps"]["loss"]["passed"]
    assert _first_failed_step(v) == "backward"
    assert v["steps"]["backward"]["first_divergent"] == "layer0.1"
    failed = {f["key"] for f in v["steps"]["backward"]["failures"]}
    assert "iter0/buffer/layer0.1.running_var" in failed
    assert "iter0/buffer/layer0.1.running_mean" not in failed  # the mean update is right in this bug
    log = (tmp_path / "pspnet" / "backward_diff.log").read_text()
    assert "FAIL[tolerance] eval_logits_after" in log  # the eval difference the trap table describes


def test_catches_conv_weight_transposed_hw(tmp_path, monkeypatch):
    monkeypatch.setattr(pcheckpoint, "strict_load", _strict_load_with_transposed("layer2.1.conv2.weight"))
    v = _run(tmp_path, ("forward",), input_size=ONE)
    assert _first_failed_step(v) == "forward"
    assert v["steps"]["forward"]["first_divergent"] == "layer2.1.conv2"


def test_catches_cross_entropy_over_wrong_axis(tmp_path, monkeypatch):
    monkeypatch.setattr(players, "pixel_cross_entropy", _pixel_cross_entropy_last_axis)
    v = _run(tmp_path, ("forward", "loss"))
    assert v["steps"]["forward"]["passed"]
    assert _first_failed_step(v) == "loss"
    assert v["steps"]["loss"]["first_divergent"] == "loss.main"
    failed = {f["key"] for f in v["steps"]["loss"]["failures"]}
    assert "output/main" not in failed and "loss/main" in failed


# ------------------------------------------------------------------------------------------------------- CLI
def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "alignment", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_exit_codes_and_stderr(tmp_path):
    ok = _cli("pspnet", "--steps", "forward", "--input-size", SMALL, "--out", str(tmp_path), "--no-trace")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "pspnet: PASS" in ok.stderr
    bad = _cli("pspnet", "--input-size", "2,3,34,34", "--steps", "forward", "--out", str(tmp_path))
    assert bad.returncode == 2 and "(H-1)%8==0" in bad.stderr
    missing = _cli("pspnet", "--weights", str(tmp_path / "nope.pth"), "--out", str(tmp_path))
    assert missing.returncode == 2 and "nope.pth" in missing.stderr
    unknown = _cli("nosuchnet", "--out", str(tmp_path))
    assert unknown.returncode == 2 and "nosuchnet" in unknown.stderr
    badsteps = _cli("pspnet", "--steps", "forwardd", "--out", str(tmp_path))
    assert badsteps.returncode == 2 and "forwardd" in badsteps.stderr


def test_align_on_synthetic_cityscapes_data(tmp_path):
    """--data: the batch comes from val images in the official layout (labelIds mapped to trainIds)."""
    from paddle_impl.datasets import write_cityscapes

    write_cityscapes(tmp_path / "cs", n=2, size=(40, 80))
    v = alignment.run("pspnet", out=str(tmp_path / "out"), data=str(tmp_path / "cs"), input_size=SMALL,
                      steps=("forward", "metric"), progress=False, trace=False)
    assert v["passed"], v["steps"]
    assert v["provenance"]["inputs"].startswith("cityscapes val images")
    assert v["provenance"]["num_classes"] == 19
