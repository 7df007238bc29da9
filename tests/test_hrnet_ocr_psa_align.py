"""HRNet-OCR-PSA through the harness: `segtwin align hrnet_ocr_psa` on random weights saved in NVIDIA's checkpoint
format (numpy float64 `mean_iu` / `__metric` included), the PSA / mscale variants, and both shipped recipes trained
for 10 iterations on synthetic Cityscapes.

CI budget: the default alignment (2x3x96x96, PSA(p), MscaleOCR) costs ~5 minutes with every step, 3 iterations and
the trace; here the clean run does forward, loss, schedule and 2 lockstep backward iterations without the trace, the
variants forward and loss (plain OCRNet at 2x3x64x64), the bug tests forward with the (forward) trace at 1x3x64x64.
"""
from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
torch = pytest.importorskip("torch")

import alignment  # noqa: E402
from tests.ckpt_factory import shrink_artifacts  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    # no trace here: the bug tests below check the trace's module names (NVIDIA's paths)
    v = alignment.run("hrnet_ocr_psa", out=str(out), steps=("forward", "loss", "schedule", "backward"), iters=2,
                      progress=False, trace=False)
    yield v, out
    shrink_artifacts(out)


def test_default_psa_p_mscale_passes(clean):
    v, out = clean
    assert v["passed"], {s: r.get("failures", [])[:3] for s, r in v["steps"].items() if not r["passed"]}
    prov = v["provenance"]
    assert prov["weights"].endswith("hrnet_ocr_psa_random_official.pth")
    assert prov["model_cfg"]["psa"] == "p" and prov["model_cfg"]["mscale"] is True
    assert prov["input_shape"] == [2, 3, 96, 96]
    loss_log = (out / "hrnet_ocr_psa" / "loss_diff.log").read_text()
    for term in ("main", "aux", "pred_05x", "pred_10x"):  # every NVIDIA training output and its loss term
        assert f"PASS output/{term} " in loss_log and f"PASS loss/{term} " in loss_log
    blog = (out / "hrnet_ocr_psa" / "backward_diff.log").read_text()
    # the scale attention takes part at two scales: its gradients are compared (and non-zero)
    assert "PASS iter0/grad/scale_attn.conv0.weight " in blog
    assert "PASS iter1/grad/backbone.stage4.2.branches.3.3.deattn.conv_q_left.weight " in blog


@pytest.mark.parametrize("cfg", [{"psa": "s", "mscale": False}, {"psa": None, "mscale": True}],
                         ids=["psa_s-ocrnet", "no_psa-mscale"])
def test_variants_pass_forward_and_loss(tmp_path, cfg):
    # plain OCRNet at 64x64 (its 1/32 branch is 2x2); MscaleOCR at the default 96x96 (its 0.5 scale would leave the
    # 1/32 branch 1x1 at 64x64)
    v = alignment.run("hrnet_ocr_psa", out=str(tmp_path), steps=("forward", "loss"), iters=1, progress=False,
                      trace=False, model_cfg=cfg, input_size=None if cfg["mscale"] else "2,3,64,64")
    assert v["passed"], {s: r.get("failures", [])[:3] for s, r in v["steps"].items() if not r["passed"]}
    assert v["provenance"]["model_cfg"]["psa"] == cfg["psa"]
    terms = [k for k in (tmp_path / "hrnet_ocr_psa" / "loss_diff.log").read_text().split() if k.startswith("loss/")]
    # plain OCRNet trains two outputs (main + 0.4 aux), MscaleOCR four: the loss follows the loaded model
    assert sorted(terms) == sorted(["loss/main", "loss/aux", "loss/loss"]
                                   + ([] if not cfg["mscale"] else ["loss/pred_05x", "loss/pred_10x"]))


# ------------------------------------------------------------------------------------------------- training
CONFIGS = {  # CI-sized overrides of each shipped recipe: batch 2, 64x64 crops of 64x128 synthetic images
    "hrnet48_ocr_psa_cityscapes.yml": ["train_dataset.transforms.2.crop_size=[64, 64]",
                                       "lr_scheduler.warmup_iters=0"],
    "hrnet48_ocr_psa_cityscapes_nvidia.yml": ["train_dataset.transforms.2.crop_size=[64, 64]", "model.scales=null"],
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_shipped_recipe_trains_ten_iterations(tmp_path, config):
    """Each shipped recipe through `segtwin train`'s Trainer (its transforms, SGD, poly-2 schedule and the RMI /
    BCE loss terms of MscaleOCR) on synthetic Cityscapes from random weights: 10 iterations, the loss goes down,
    the evaluation runs and a checkpoint is written."""
    from paddle_impl.config import load_config, parse_opts
    from paddle_impl.datasets import write_cityscapes
    from paddle_impl.engine.trainer import Trainer

    root = tmp_path / "cs"
    write_cityscapes(root, n=4, size=(64, 128))
    opts = parse_opts(CONFIGS[config] + [
        "batch_size=2", "iters=10", "num_workers=0", "log_iters=1", "eval_iters=10", "save_iters=10",
        f"train_dataset.dataset_root={root}", f"val_dataset.dataset_root={root}"])
    cfg = load_config(f"paddle_impl/configs/{config}", opts)
    paddle.seed(0)
    tr = Trainer(cfg, tmp_path / "out", progress=False)
    result = tr.train()
    losses = [h["loss"] for h in tr.history]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert set(tr.history[0]) >= {"main", "aux", "pred_05x", "pred_10x", "loss"}
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert result["iteration"] == 10 and 0.0 <= result["best_miou"] <= 1.0
    assert (tmp_path / "out" / "latest").read_text().strip() == "iter_10"


# ------------------------------------------------------------------------------------- the bugs, one at a time
# Each bug is injected into the PADDLE twin only. Forward-only runs of plain OCRNet at 1x3x64x64 (eval mode, where
# the small size and the single image are harmless: no bug here acts across the batch, and a forward-only run at N=1
# traces the forward alone) keep them cheap; the n-scale bug needs MscaleOCR with evaluation scales.
import importlib  # noqa: E402

phr = importlib.import_module("paddle_impl.backbones.hrnet")
pho = importlib.import_module("paddle_impl.models.hrnet_ocr_psa")
wconvert = importlib.import_module("weights_convert.convert")  # the package re-exports a function of that name
SMALL = {"mscale": False}


def _run(tmp_path, cfg, steps=("forward",), weights=None):
    return alignment.run("hrnet_ocr_psa", out=str(tmp_path), steps=steps, iters=1, progress=False,
                         input_size="1,3,64,64", model_cfg=None if weights else cfg, weights=weights)


@pytest.fixture(scope="module")
def plain_p(tmp_path_factory):
    """The clean control of the forward bug tests: PSA(p) OCRNet passes (trace included); its random NVIDIA-format
    weights are kept and reused by the bug runs (no rebuilding and calibrating per bug)."""
    out = tmp_path_factory.mktemp("plain_p")
    v = alignment.run("hrnet_ocr_psa", out=str(out), steps=("forward",), iters=1, progress=False,
                      input_size="1,3,64,64", model_cfg={"psa": "p", "mscale": False}, keep_weights=True)
    assert v["passed"] and v["trace"]["first_divergent_forward"] is None, v["trace"]
    yield str(out / "hrnet_ocr_psa" / "weights" / "hrnet_ocr_psa_random_official.pth")
    shrink_artifacts(out)


def _failed(v, step):
    return {f["key"] for f in v["steps"][step]["failures"]}


def test_catches_psa_s_built_where_psa_p_is_configured(tmp_path, monkeypatch):
    from weights_convert import ConversionError

    monkeypatch.setitem(phr.PSA_BLOCKS, "p", phr.PSA_s)  # BUG: the sequential block for psa: p
    monkeypatch.setattr(wconvert, "_TWIN_SIGNATURES", {})  # the converter caches twin shapes per (model, cfg)
    with pytest.raises(ConversionError, match=r"backbone\.stage2\.0\.branches\.0\.0\.deattn\.conv_up"):
        _run(tmp_path, dict(SMALL, psa="p"))


def test_catches_layer_norm_over_channels_only(tmp_path, monkeypatch):
    from weights_convert import ConversionError

    def conv_up_c_only(self):  # BUG: LayerNorm(C/8) -- over the last axis of an NCHW map -- not ((C/8, 1, 1))
        bottleneck = self.inter_planes // 4
        return phr.L.Sequential(phr.L.Conv2d(self.inter_planes, bottleneck, 1), phr.L.LayerNorm((bottleneck,)),
                                phr.L.ReLU(), phr.L.Conv2d(bottleneck, self.planes, 1))
    monkeypatch.setattr(phr.PSA_s, "_make_conv_up", conv_up_c_only)
    monkeypatch.setattr(wconvert, "_TWIN_SIGNATURES", {})
    with pytest.raises(ConversionError, match=r"mis-shaped keys: (backbone\.stage2\.0\.branches\.0\.0"
                       r"\.deattn\.conv_up\.1\.weight) \[6, 1, 1\] -> \1 \[6\]"):
        _run(tmp_path, dict(SMALL, psa="s"))


def test_catches_spatial_softmax_over_channels(tmp_path, monkeypatch, plain_p):
    monkeypatch.setattr(phr.PSA_p, "_spatial_logits",  # BUG: softmax over the channel axis, not the positions
                        lambda self, avg_x, theta_x: phr.L.softmax(phr.L.matmul(avg_x, theta_x), 1))
    v = _run(tmp_path, None, weights=plain_p)
    assert "logits" in _failed(v, "forward")
    # the first PSA block of the first branch, at its spatial mask (the second sigmoid it calls)
    assert v["trace"]["first_divergent_forward"].startswith("backbone.stage2.0.branches.0.0.deattn")


def test_catches_ocr_attention_without_key_scaling(tmp_path, monkeypatch, plain_p):
    forward = pho.ObjectAttentionBlock.forward

    def unscaled(self, x, proxy):  # BUG: the similarities not multiplied by key_channels ** -0.5
        keys = self.key_channels
        try:
            self.key_channels = _NoScale(keys)
            return forward(self, x, proxy)
        finally:
            self.key_channels = keys
    monkeypatch.setattr(pho.ObjectAttentionBlock, "forward", unscaled)
    v = _run(tmp_path, None, weights=plain_p)
    assert "logits" in _failed(v, "forward")
    # the softmax is functional: the first module output after it is the attention block's f_up conv
    assert v["trace"]["first_divergent_forward"] == "ocr.ocr_distri_head.object_context_block.f_up.0"


class _NoScale(int):
    """An int whose -0.5 power is 1: the block's reshapes see the key width, its scaling disappears."""

    def __pow__(self, exponent):
        return 1.0 if exponent == -0.5 else int(self) ** exponent


def test_catches_nscale_combination_processed_low_to_high(tmp_path, monkeypatch):
    import builtins

    monkeypatch.setattr(pho, "sorted", lambda seq, reverse=False: builtins.sorted(seq), raising=False)  # BUG
    # two scales: the order already decides which scale's attention weighs which prediction (2.0 would cost 4x 1.0)
    v = _run(tmp_path, {"psa": None, "mscale": True, "scales": [0.5, 1.0]})
    assert "logits" in _failed(v, "forward")
    # the scales run in the other order, so the very first module call (the stem conv) already sees the 0.5-scale
    # input where torch's sees the 1.0-scale one
    assert v["trace"]["first_divergent_forward"] == "backbone.conv1"


def test_catches_align_corners_true_in_one_fuse_layer(tmp_path, monkeypatch, plain_p):
    forward = phr.HighResolutionModule.forward
    interpolate = phr.L.interpolate

    def bugged(self, x):  # BUG: the 1/16 -> 1/4 resize of the 3-branch modules with align_corners=True
        if self.num_branches != 3:
            return forward(self, x)
        phr.L.interpolate = lambda t, size, align_corners: interpolate(
            t, size, align_corners or int(size[0]) == 4 * int(t.shape[2]))
        try:
            return forward(self, x)
        finally:
            phr.L.interpolate = interpolate
    monkeypatch.setattr(phr.HighResolutionModule, "forward", bugged)
    v = _run(tmp_path, None, weights=plain_p)
    assert "logits" in _failed(v, "forward")
    # the resize is functional inside the module's forward: the ReLU of the fused sum is the first output to differ
    assert v["trace"]["first_divergent_forward"] == "backbone.stage3.0.relu"
