"""Per-layer capture by module path on both sides, and the first divergent layer (forward and backward).

Forward: every module's output (eval mode) is recorded under its module path ("layer2.1.conv2"; a module called
several times gets "#2", "#3" suffixes; tuple outputs get ":i"). Backward: the gradient of the loss with respect to
every module output (train mode, dropout p=0), captured with tensor hooks registered in forward hooks -- the same
mechanism on both sides (Paddle has no module backward hook).

Paths are identical on both sides by the twin rule. Divergence of a layer is judged with the policy's `trace`
step tolerance, in the run's training dtype (float64 by default: rounding noise then stays ~1e-12 relative and any
real divergence stands out by orders of magnitude); the first divergent layer is the first in torch's execution
order (forward) or in the order the gradients arrive (backward, i.e. from the loss towards the input).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .compare import CompareResult, to_numpy
from .context import Context, disable_dropout


@dataclass
class Trace:
    direction: str  # "forward" | "backward"
    order: List[str] = field(default_factory=list)
    results: Dict[str, CompareResult] = field(default_factory=dict)
    rel_err: Dict[str, float] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)

    @property
    def first_divergent(self) -> Optional[str]:
        for p in self.order:
            r = self.results.get(p)
            if r is not None and not r.passed:
                return p
        return self.missing[0] if self.missing else None


def _named(model):
    if hasattr(model, "named_modules"):
        return list(model.named_modules())
    return list(model.named_sublayers(include_self=True))


def _flatten(out) -> List[Tuple[str, object]]:
    if isinstance(out, (tuple, list)):
        return [(f":{i}", o) for i, o in enumerate(out)]
    return [("", out)]


class _Recorder:
    def __init__(self, model, framework: str, want_grads: bool):
        self.framework = framework
        self.want_grads = want_grads
        self.outputs: Dict[str, np.ndarray] = {}
        self.grads: Dict[str, np.ndarray] = {}
        self.order: List[str] = []
        self.grad_order: List[str] = []
        self.calls: Dict[str, int] = {}
        self.handles = []
        for name, m in _named(model):
            path = name or "<model>"
            if framework == "torch":
                self.handles.append(m.register_forward_hook(self._hook(path)))
            else:
                self.handles.append(m.register_forward_post_hook(self._hook(path)))

    def _hook(self, path: str):
        def hook(module, inputs, output):
            n = self.calls.get(path, 0) + 1
            self.calls[path] = n
            base = path if n == 1 else f"{path}#{n}"
            for suffix, o in _flatten(output):
                if not hasattr(o, "shape"):
                    continue
                key = base + suffix
                self.order.append(key)
                self.outputs[key] = to_numpy(o.detach() if hasattr(o, "detach") else o).copy()
                if self.want_grads:
                    requires = o.requires_grad if self.framework == "torch" else not o.stop_gradient
                    if requires:
                        o.register_hook(self._grad_hook(key))
            return None
        return hook

    def _grad_hook(self, key: str):
        def hook(g):
            self.grad_order.append(key)
            self.grads[key] = to_numpy(g).copy()
            return None
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _compare_layers(ctx: Context, direction: str, order: List[str], a: Dict[str, np.ndarray],
                    b: Dict[str, np.ndarray]) -> Trace:
    tr = Trace(direction)
    for key in order:
        if key not in a:
            tr.missing.append(key)
            continue
        tr.order.append(key)
        r = ctx.policy.compare(a[key], b[key], model=ctx.name, step="trace", key=key)
        tr.results[key] = r
        scale = float(np.abs(b[key]).max()) if b[key].size else 0.0
        diff = r.max_abs_diff if r.max_abs_diff is not None else float("nan")
        tr.rel_err[key] = float(diff) / scale if scale > 0 else float(diff)
    return tr


def run_trace(ctx: Context, backward: bool = True) -> Tuple[Trace, Optional[Trace]]:
    """Forward trace (eval) and backward trace (train, dropout 0, the model's loss) of both twins; the backward
    trace is None when `backward` is False (a batch of one image: training-mode BatchNorm needs N >= 2)."""
    import paddle
    import torch


    from .steps.common import train_outputs

    tm, pm = ctx.models(ctx.train_dtype)
    xt, yt = ctx.torch_inputs(ctx.train_dtype)
    xp, yp = ctx.paddle_inputs(ctx.train_dtype)
    # forward, eval
    tm.eval()
    pm.eval()
    rt, rp = _Recorder(tm, "torch", False), _Recorder(pm, "paddle", False)
    try:
        with torch.no_grad():
            tm(xt)
        with paddle.no_grad():
            pm(xp)
    finally:
        rt.remove()
        rp.remove()
    fwd = _compare_layers(ctx, "forward", rt.order, rp.outputs, rt.outputs)
    if not backward:  # eval mode changed nothing: no reset needed
        return fwd, None
    # backward, train
    disable_dropout(tm)
    disable_dropout(pm)
    tm.train()
    pm.train()
    rt, rp = _Recorder(tm, "torch", True), _Recorder(pm, "paddle", True)
    try:
        out_t, out_p = train_outputs(ctx, tm, pm, xt, xp)
        ctx.recipe.torch_loss()(out_t, yt)["loss"].backward()
        ctx.recipe.paddle_loss()(out_p, yp)["loss"].backward()
    finally:
        rt.remove()
        rp.remove()
    bwd = _compare_layers(ctx, "backward", rt.grad_order, rp.grads, rt.grads)
    ctx.models(ctx.train_dtype)
    return fwd, bwd
