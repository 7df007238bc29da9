"""PSANet twins on the PSA mask op: official-format checkpoints, mask rule, alignment per psa_type / op impl /
compact, a mask that does not cover the map, and injected bugs in the twin's PSA that the harness must catch."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
import torch

import alignment
import paddle_impl
import paddle_impl.models.psanet as ppsanet
import torch_ref
from paddle_impl.ops.psa_mask import psa_mask as paddle_psa_mask
from tests.ckpt_factory import shrink_artifacts
from torch_ref.models.psanet import full_mask

pytestmark = pytest.mark.slow


def _save_semseg(model, path):
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": {}}, path)


@pytest.mark.parametrize("mask", [59, 89])
def test_official_checkpoint_loads_strictly_and_converts(tmp_path, mask):
    torch.manual_seed(0)
    model = torch_ref.build_model("psanet", num_classes=3, mask_size=mask)
    assert tuple(model.state_dict()["psa.attention.3.weight"].shape) == (mask * mask, 512, 1, 1)
    for k in ("psa.reduce.0.weight", "psa.reduce_p.1.running_var", "psa.attention_p.3.weight",
              "psa.proj.0.weight", "cls.4.bias", "aux.0.weight"):
        assert k in model.state_dict(), k
    assert tuple(model.state_dict()["psa.proj.0.weight"].shape) == (2048, 1024, 1, 1)
    _save_semseg(model, tmp_path / "psanet.pth")
    loaded = torch_ref.load_official("psanet", tmp_path / "psanet.pth")  # mask, classes, psa_type read off it
    assert (loaded.psa.mask_h, loaded.psa.mask_w, loaded.psa.psa_type, loaded.num_classes) == (mask, mask, 2, 3)
    import weights_convert
    weights_convert.convert("psanet", tmp_path / "psanet.pth", tmp_path / "psanet.pdparams")
    twin = paddle_impl.load_pdparams("psanet", tmp_path / "psanet.pdparams")
    assert twin.psa.mask_h == mask
    w = twin.state_dict()["psa.attention.3.weight"].numpy()
    np.testing.assert_array_equal(w, model.state_dict()["psa.attention.3.weight"].numpy())


def test_mask_rule_as_semseg():
    assert full_mask(465) == 59 and full_mask(705) == 89  # VOC/ADE and Cityscapes crops, shrink 2
    for bad in (60, 1, 61):
        with pytest.raises(ValueError, match="odd, >= 3 and <= 59"):
            torch_ref.build_model("psanet", num_classes=2, mask_size=bad, crop=465)
    m = torch_ref.build_model("psanet", num_classes=2, crop=705)
    assert (m.psa.mask_h, m.psa.mask_w) == (89, 89)


def test_single_branch_checkpoint_needs_psa_type(tmp_path):
    torch.manual_seed(0)
    model = torch_ref.build_model("psanet", num_classes=2, psa_type=1, mask_size=5)
    _save_semseg(model, tmp_path / "p1.pth")
    with pytest.raises(ValueError, match="pass psa_type=0"):
        torch_ref.load_official("psanet", tmp_path / "p1.pth")
    assert torch_ref.load_official("psanet", tmp_path / "p1.pth", psa_type=1).psa.psa_type == 1


CASES = [
    # (model cfg, input size) -- 33x33: feature 5x5, shrunk 3x3; mask 3 does NOT cover it (full would be 5)
    ({"psa_type": 0, "mask_size": 3}, "2,3,33,33"),
    ({"psa_type": 1, "mask_size": 3, "psa_impl": "tensor"}, "2,3,33,33"),
    ({"psa_type": 2, "mask_size": 3, "psa_impl": "tensor"}, "2,3,33,33"),
    ({"psa_type": 2}, "2,3,65,65"),  # the default mask 59 at the default test size
    ({"psa_type": 2, "mask_size": 89}, "2,3,33,33"),  # semseg's Cityscapes mask (crop 705)
    ({"psa_type": 2, "compact": True, "crop": 33}, "2,3,33,33"),
]


@pytest.mark.parametrize("cfg,size", CASES, ids=[f"{c}-{s}" for c, s in CASES])
def test_psanet_aligns_forward_loss_backward(tmp_path, cfg, size):
    # 2 lockstep iterations for the default mask (the second one steps from a non-zero momentum), 1 for the other
    # variants (the op's gradient is what differs between them; the suite's time budget); the module trace is
    # exercised by the injected-bug tests below, which assert the module it names
    iters = 2 if cfg == {"psa_type": 2} else 1
    v = alignment.run("psanet", out=str(tmp_path), input_size=size, iters=iters, progress=False,
                      steps=("forward", "loss", "backward"), model_cfg=cfg, trace=False)
    assert v["passed"], {s: (r["worst"] or {}).get("key") for s, r in v["steps"].items()}
    # the gradients that flow through the op were compared
    assert v["steps"]["backward"]["keys"] > 2 * 300
    # under the official recipe config (tests/test_recipe.py aligns the other shipped configs)
    assert v["provenance"]["recipe"]["config"].endswith("psanet_r50_cityscapes_1024x512_80k.yml")


def test_seed_mask_on_a_map_it_does_not_cover(tmp_path):
    """The seed's 59x59 mask on a shrunken grid it does not cover. The seed's 1024x512 crops give 32x64 there (full
    coverage would need 63x127). The semseg twin needs odd feature sizes; the smallest non-square input whose grid the
    mask covers in neither direction is 481x513 -> feature 61x65 -> shrunken 31x33, where full coverage needs a 61x65
    window (one image: the forward step alone, in eval mode). The op's own tests cover grids wider than the mask."""
    h, w = 481, 513
    feat = [(s - 1) // 8 + 1 for s in (h, w)]
    shrunk = [(f - 1) // 2 + 1 for f in feat]
    assert all(f % 2 for f in feat) and shrunk == [31, 33]  # odd: the shrink and its way back restore the size
    assert [full_mask(h), full_mask(w)] == [2 * s - 1 for s in shrunk] == [61, 65]
    assert min(full_mask(h), full_mask(w)) > 59  # full coverage needs 2*s-1 > 59 in both directions: not covered
    assert full_mask(h - 16) == 59  # the next smaller valid height (feature 59, shrunken 30) would be covered
    v = alignment.run("psanet", out=str(tmp_path), input_size=f"1,3,{h},{w}", steps=("forward",), progress=False,
                      trace=False, model_cfg={"mask_size": 59})
    assert v["passed"], v["steps"]["forward"]["worst"]


# ------------------------------------------------------------------------------------------- injected PSA bugs
def _swapped(y, psa_type, mask_size, impl="auto"):
    return paddle_psa_mask(y, 1 - int(psa_type), mask_size, impl=impl)  # BUG: collect <-> distribute


def _minus_inf(y, psa_type, mask_size, impl="auto"):
    out = paddle_psa_mask(y, psa_type, mask_size, impl=impl)
    valid = paddle_psa_mask(paddle.ones_like(y), psa_type, mask_size, impl=impl)
    return paddle.where(valid > 0, out, paddle.full_like(out, float("-inf")))  # BUG: -inf, not 0, outside


def _cat_reversed(self, x):
    out = x
    x_col, h, w = self._shrink(self.reduce(x))
    x_dis, _, _ = self._shrink(self.reduce_p(x))
    x_col = self._attend(x_col, self.attention(x_col), 0, h, w)
    x_dis = self._attend(x_dis, self.attention_p(x_dis), 1, h, w)
    x = paddle.concat([x_dis, x_col], 1)  # BUG: semseg concatenates [collect, distribute]
    x = self.proj(x)
    h, w = (h - 1) * self.shrink_factor + 1, (w - 1) * self.shrink_factor + 1
    return paddle.concat([out, paddle.nn.functional.interpolate(x, size=[h, w], mode="bilinear",
                                                                align_corners=True)], 1)


@pytest.fixture(scope="module")
def clean_mask3(tmp_path_factory):
    """The clean control of the bug tests (the same run, no bug: it passes, no module diverges); its random
    semseg-format weights are kept and reused by the bug runs (no rebuilding and calibrating per bug)."""
    out = tmp_path_factory.mktemp("clean_mask3")
    v = alignment.run("psanet", out=str(out), input_size="1,3,33,33", progress=False,
                      steps=("forward",), model_cfg={"mask_size": 3}, keep_weights=True)
    assert v["passed"] and v["trace"]["first_divergent_forward"] is None, v["trace"]
    assert v["trace"]["layers_forward"] > 100
    yield str(out / "psanet" / "weights" / "psanet_random_official.pth")
    shrink_artifacts(out)


@pytest.mark.parametrize("bug", ["swapped", "minus_inf", "cat_reversed"])
def test_injected_psa_bug_is_caught_and_named(tmp_path, monkeypatch, bug, clean_mask3):
    if bug == "swapped":
        monkeypatch.setattr(ppsanet, "psa_mask", _swapped)
    elif bug == "minus_inf":
        monkeypatch.setattr(ppsanet, "psa_mask", _minus_inf)
    else:
        monkeypatch.setattr(ppsanet.PSA, "forward", _cat_reversed)
    # forward only, one image (the bugs act within an image; the forward trace names the module)
    v = alignment.run("psanet", out=str(tmp_path), input_size="1,3,33,33", progress=False,
                      steps=("forward",), weights=clean_mask3)
    assert v["provenance"]["model_cfg"]["mask_size"] == 3
    assert not v["steps"]["forward"]["passed"]
    first = v["steps"]["forward"]["first_divergent"]
    assert first is not None and first.startswith("psa"), first
    assert v["trace"]["first_divergent_forward"].startswith("psa")


def test_seed_recipe_trains_and_loss_decreases(tmp_path):
    """The seed-001 config (optimizer, schedule, losses, PSA settings) for 10 iterations on synthetic Cityscapes at a
    small crop: the loss decreases."""
    from pathlib import Path

    from paddle_impl.config import load_config
    from paddle_impl.datasets import write_cityscapes
    from paddle_impl.engine.trainer import Trainer

    write_cityscapes(tmp_path / "cs", n=4, size=(48, 64))
    cfg_path = Path(__file__).resolve().parents[1] / "paddle_impl/configs/psanet_r50_cityscapes_1024x512_80k.yml"
    cfg = load_config(cfg_path, overrides={
        "iters": 10, "batch_size": 2, "num_workers": 0, "log_iters": 5, "eval_iters": 1000, "save_iters": 1000,
        "train_dataset.dataset_root": str(tmp_path / "cs"),
        "train_dataset.transforms": [{"type": "ToFloat32"}, {"type": "CenterCrop", "size": 33},
                                     {"type": "Normalize"}, {"type": "ToCHW"}],
    })
    assert cfg.raw["model"]["mask_size"] == 59 and cfg.raw["optimizer"]["weight_decay"] == 4e-5
    cfg.raw.pop("val_dataset", None)
    tr = Trainer(cfg, str(tmp_path / "out"), progress=False)
    tr.train()
    losses = [h["loss"] for h in tr.history]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
