"""`alignment.align_models`: the harness on any pair of models (alignment/any_port.py, docs/align-your-model.md).

A small net ported to Paddle by hand passes; injected port bugs (a Linear weight copied without its transpose, a
wrong BN epsilon, a renamed module without a key map) fail the right step and name the module; the trace matches
modules by path, by an explicit map, or by the labelled order-and-shape heuristic; the docs' example runs as
printed."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch

from alignment import align_models
from alignment.any_port import copy_torch_weights
from alignment.runner import AlignmentSetupError

ROOT = Path(__file__).resolve().parents[1]


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Conv2d(8, 4, 1)
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.head(torch.relu(self.bn(self.conv(x))))
        return self.fc(y.mean((2, 3))), y


class PaddleNet(paddle.nn.Layer):
    def __init__(self, bn_eps=1e-5, fc_name="fc"):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(8, momentum=0.9, epsilon=bn_eps)
        self.head = paddle.nn.Conv2D(8, 4, 1)
        self.fc_name = fc_name
        setattr(self, fc_name, paddle.nn.Linear(4, 4))

    def forward(self, x):
        y = self.head(paddle.nn.functional.relu(self.bn(self.conv(x))))
        return getattr(self, self.fc_name)(y.mean((2, 3))), y


class RenamedPaddleNet(paddle.nn.Layer):
    """The same net with a converter's naming: one Sequential of generated names and a functional ReLU."""

    def __init__(self, bn_eps=1e-5):
        super().__init__()
        self.body = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, padding=1),
                                         paddle.nn.BatchNorm2D(8, momentum=0.9, epsilon=bn_eps))
        self.x2 = paddle.nn.Conv2D(8, 4, 1)
        self.x3 = paddle.nn.Linear(4, 4)

    def forward(self, x):
        y = self.x2(paddle.nn.functional.relu(self.body(x)))
        return self.x3(y.mean((2, 3))), y


RENAMED = {"conv.weight": "body.0.weight", "conv.bias": "body.0.bias", "bn.weight": "body.1.weight",
           "bn.bias": "body.1.bias", "bn.running_mean": "body.1._mean", "bn.running_var": "body.1._variance",
           "head.weight": "x2.weight", "head.bias": "x2.bias", "fc.weight": "x3.weight", "fc.bias": "x3.bias"}


def torch_loss(outputs, labels):
    return {"loss": torch.nn.functional.cross_entropy(outputs[0], labels) + 0.1 * outputs[1].square().mean(),
            "ce": torch.nn.functional.cross_entropy(outputs[0], labels)}


def paddle_loss(outputs, labels):
    return {"loss": paddle.nn.functional.cross_entropy(outputs[0], labels) + 0.1 * outputs[1].square().mean(),
            "ce": paddle.nn.functional.cross_entropy(outputs[0], labels)}


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 3, 12, 12)).astype("float32"), np.array([1, 3])


def nets(seed=0, **kw):
    torch.manual_seed(seed)
    paddle.seed(seed)
    return TorchNet(), PaddleNet(**kw)


def failing_keys(v, step):
    return {f["key"] for f in v["steps"][step]["failures"]}


def test_hand_port_passes_every_step_with_the_artifacts_of_segtwin_align(tmp_path):
    tm, pm = nets()
    v = align_models(tm, pm, batch(), loss=(torch_loss, paddle_loss), copy_weights=True, dtype="float64",
                     out=tmp_path, name="mynet",
                     optimizer=(lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                                lambda m: paddle.optimizer.SGD(learning_rate=0.1, parameters=m.parameters())),
                     iters=2)
    assert v["passed"], {s: r["failures"][:2] for s, r in v["steps"].items()}
    assert list(v["steps"]) == ["weights", "forward", "loss", "backward"]
    assert v["steps"]["weights"]["keys"] == 10  # 4 conv/linear weights + biases, BN weight/bias/mean/var
    assert v["trace"]["matching"] == "module paths" and v["trace"]["first_divergent_forward"] is None
    out = tmp_path / "mynet"
    blog = (out / "backward_diff.log").read_text()
    for key in ("iter0/grad/fc.weight", "iter1/param/conv.weight", "iter1/loss/ce"):
        assert re.search(rf"^PASS {re.escape(key)} ", blog, re.M), key
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["provenance"]["weights"].startswith("copied") and verdict["provenance"]["input_shape"] == [2, 3,
                                                                                                              12, 12]
    for name in ("forward_torch.npy", "forward_paddle.npy", "forward.npz", "report.md", "trace_forward.csv",
                 "trace_backward.csv"):
        assert (out / name).is_file(), name
    # the models the user passed are untouched by the float64 comparison
    assert next(tm.parameters()).dtype == torch.float32


def test_linear_weight_copied_without_its_transpose_is_named(tmp_path):
    tm, pm = nets()
    copy_torch_weights(tm, pm)
    pm.fc.weight.set_value(paddle.to_tensor(tm.fc.weight.detach().numpy()))  # BUG: torch's (out, in) layout as is
    v = align_models(tm, pm, batch(), out=tmp_path, dtype="float64", name="t")
    assert not v["passed"]
    assert failing_keys(v, "weights") == {"weights/fc.weight"}
    assert v["steps"]["weights"]["first_divergent"] == "fc"
    assert failing_keys(v, "forward") == {"out/0"}  # the head output `y` is untouched
    assert v["trace"]["first_divergent_forward"] == "fc"


def test_wrong_bn_epsilon_fails_from_the_bn_on(tmp_path):
    tm, pm = nets(bn_eps=1e-3)
    v = align_models(tm, pm, batch(), loss=(torch_loss, paddle_loss), copy_weights=True, dtype="float64",
                     out=tmp_path, name="t")
    assert not v["passed"] and v["steps"]["weights"]["passed"]
    assert failing_keys(v, "forward") == {"out/0", "out/1"}
    assert v["trace"]["first_divergent_forward"] == "bn"
    trace = (tmp_path / "t" / "trace_forward.csv").read_text().splitlines()
    assert trace[1].startswith("0,conv,True")  # the layer before it is still exact


def test_renamed_port_needs_a_key_map_and_the_trace_falls_back_to_the_labelled_heuristic(tmp_path):
    torch.manual_seed(0)
    tm = TorchNet()
    with pytest.raises(AlignmentSetupError, match="conv.weight"):  # names differ: every key is an error
        copy_torch_weights(tm, RenamedPaddleNet())
    v = align_models(tm, RenamedPaddleNet(), batch(), copy_weights=True, key_map=RENAMED, dtype="float64",
                     out=tmp_path, name="t", loss=(torch_loss, paddle_loss))
    assert v["passed"], {s: r["failures"][:2] for s, r in v["steps"].items()}
    assert v["trace"]["matching"].startswith("heuristic")
    assert v["trace"]["matched_modules"] == 4  # the leaves conv, bn, head, fc (torch.relu is no module)
    bad = align_models(tm, RenamedPaddleNet(bn_eps=1e-3), batch(), copy_weights=True, key_map=RENAMED,
                       dtype="float64", out=tmp_path, name="t2")
    assert bad["trace"]["first_divergent_forward"] == "bn"  # named by the TORCH module path
    assert "heuristic" in (tmp_path / "t2" / "report.md").read_text()
    # an explicit trace map wins over the heuristic
    tmap = {"conv": "body.0", "bn": "body.1", "head": "x2", "fc": "x3", "<model>": "<model>"}
    bad = align_models(tm, RenamedPaddleNet(bn_eps=1e-3), batch(), copy_weights=True, key_map=RENAMED,
                       dtype="float64", out=tmp_path, name="t3", trace_map=tmap)
    assert bad["trace"]["matching"] == "explicit map" and bad["trace"]["first_divergent_forward"] == "bn"


def test_renamed_module_with_a_partial_dict_key_map(tmp_path):
    tm, pm = nets(fc_name="classifier")
    v = align_models(tm, pm, batch(), copy_weights=True, out=tmp_path, name="t", dtype="float64",
                     key_map={"fc.weight": "classifier.weight", "fc.bias": "classifier.bias"})
    assert v["passed"] and v["steps"]["weights"]["keys"] == 10


def test_float32_as_given_uses_the_policy_defaults(tmp_path):
    tm, pm = nets()
    v = align_models(tm, pm, batch(), copy_weights=True, out=tmp_path, name="t", trace=False)
    assert v["passed"] and v["provenance"]["dtypes"]["forward"] == "float32"
    assert v["trace"]["matching"] is None


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": ["forward", "metric"]}, "unknown step"),
    ({"steps": ["backward"]}, "need loss="),
    ({"loss": (torch_loss, paddle_loss), "batch": np.zeros((2, 3, 12, 12), "float32")}, "needs labels"),
    ({"optimizer": (None, None)}, "needs loss="),
    ({"dtype": "float16"}, "dtype must be"),
    ({"name": "../x"}, "plain file name"),
    ({"key_map": 3}, "key_map must be"),
])
def test_bad_arguments_are_one_clear_error(tmp_path, kwargs, message):
    tm, pm = nets()
    b = kwargs.pop("batch", batch())
    with pytest.raises(AlignmentSetupError, match=message):
        align_models(tm, pm, b, out=tmp_path, **kwargs)


def test_optimizer_instances_cannot_follow_float64_copies(tmp_path):
    tm, pm = nets()
    opts = (torch.optim.SGD(tm.parameters(), lr=0.1), paddle.optimizer.SGD(0.1, parameters=pm.parameters()))
    with pytest.raises(AlignmentSetupError, match="factory"):
        align_models(tm, pm, batch(), loss=(torch_loss, paddle_loss), optimizer=opts, dtype="float64",
                     copy_weights=True, out=tmp_path)


@pytest.mark.slow
def test_docs_example_runs_as_printed(tmp_path):
    text = (ROOT / "docs" / "align-your-model.md").read_text(encoding="utf-8")
    example = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    printed = re.search(r"It prints:\n\n```\n(.*?)```", text, re.S).group(1)
    (tmp_path / "example.py").write_text(example)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout == printed
    assert "bn" in (tmp_path / "segtwin_out" / "mynet_bug" / "report.md").read_text()
