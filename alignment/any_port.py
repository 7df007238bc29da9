"""Align ANY pair of models -- a user's own hand-made port, or a converter's output -- with segtwin's comparison
core, policy, artifacts and trace: `align_models(torch_model, paddle_model, batch, ...)`.

`segtwin align NAME` aligns the twins of a registered spec (alignment/specs.py): it knows their official weights,
recipe and key map. Here nothing is known but the two models and a batch, so everything model-specific is an
argument:

* weights: compared as given (step `weights`: every torch state_dict entry against the Paddle entry it maps to), or
  copied torch -> Paddle first (`copy_weights=True`) through the converter's own planner
  (`weights_convert.keymap.plan_conversion`: BN renames, nn.Linear transposes, every key matched, every shape
  checked -- a key that cannot be placed is an error naming it, nothing is dropped silently).
* `key_map`: torch state_dict key -> Paddle key, for ports whose names differ: a dict (entries it lacks follow the
  generic rule: BN `running_mean/var` -> `_mean/_variance`, `num_batches_tracked` dropped; a value None drops the
  key) or a callable (full control). Default: the generic rule alone.
* `loss=(torch_fn, paddle_fn)`: fn(outputs, labels) -> a scalar tensor or a dict of them with the total under
  "loss"; enables the `loss` and `backward` steps and the backward trace.
* `optimizer=(torch_opt, paddle_opt)`: optimizer instances bound to the models as given, or factories
  model -> optimizer (required with `dtype=`, which works on copies); enables parameter comparison after each step.
  Iterations run free (a generic optimizer's state cannot be mapped, so there is no lockstep reset as in
  `segtwin align`): differences may compound; iteration 0 is the strict comparison.
* `dtype`: None compares the models as given; "float64" compares float64 copies of both (the way `segtwin align`
  separates port errors from float32 rounding).
* Trace: per-module outputs (eval) and output gradients (train) matched by, in this order of preference, an
  explicit `trace_map` (torch module path -> Paddle path), identical module paths, or -- a HEURISTIC, labelled as such
  in the verdict and the report -- execution order and output shape over leaf modules of the same kind (Conv2d ~
  Conv2D, BatchNorm2d ~ BatchNorm2D, ...). The verdict's `trace.matching` says which was used.

Steps and tolerances: `weights` (exact unless the policy says otherwise), `forward`, `loss`, `backward` and `trace`
read `alignment/tolerances.yaml` (or `policy=`) with `model=name`.
"""
from __future__ import annotations

import copy
import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from weights_convert.keymap import ModelKeymap, materialize, plan_conversion, torch_to_paddle_key

from .compare import to_numpy
from .context import StepResult, disable_dropout
from .logutil import get_logger, root_logger_guard
from .policy import Policy
from .runner import AlignmentSetupError, _tree_bytes, human_bytes
from .steps.common import record
from .trace import Trace, _compare_layers, _named, _Recorder

__all__ = ["align_models", "copy_torch_weights", "PORT_STEPS"]

log = get_logger(__name__)

#: The steps of `align_models`, in order (`weights` always runs; `loss`/`backward` need `loss=`).
PORT_STEPS = ("weights", "forward", "loss", "backward")
KeyMap = Union[None, Mapping[str, Optional[str]], Callable[[str], Optional[str]]]


@dataclass(frozen=True)
class _UserKeymap(ModelKeymap):
    """A ModelKeymap whose torch -> Paddle rename is the user's (dict entries first, then the generic rule)."""
    mapping: Optional[Callable[[str], Optional[str]]] = None

    def to_paddle(self, torch_key: str) -> Optional[str]:
        return self.mapping(torch_key) if self.mapping is not None else torch_to_paddle_key(torch_key)


def _keymap(key_map: KeyMap, name: str) -> _UserKeymap:
    if key_map is None:
        return _UserKeymap(model=name)
    if isinstance(key_map, Mapping):
        table = dict(key_map)
        return _UserKeymap(model=name, mapping=lambda k: table[k] if k in table else torch_to_paddle_key(k))
    if callable(key_map):
        return _UserKeymap(model=name, mapping=key_map)
    raise AlignmentSetupError(f"key_map must be None, a dict or a callable, got {type(key_map).__name__}")


def _plan(torch_model, paddle_model, keymap: ModelKeymap) -> list:
    sd = torch_model.state_dict()
    psd = paddle_model.state_dict()
    return plan_conversion(torch_model, {k: tuple(v.shape) for k, v in sd.items()}, keymap,
                           target_shapes={k: tuple(v.shape) for k, v in psd.items()},
                           dtypes={k: str(v.dtype).replace("torch.", "") for k, v in sd.items()},
                           target_dtypes={k: str(v.dtype).replace("paddle.", "") for k, v in psd.items()})


def _plan_problems(rows) -> List[str]:
    return [f"{r.source or r.target}: {r.action} ({r.reason})" for r in rows if not r.ok]


def copy_torch_weights(torch_model, paddle_model, key_map: KeyMap = None, name: str = "custom") -> list:
    """Copy every torch state_dict entry into the Paddle model through the converter's planner; returns the plan
    (one `KeyAction` per key). Raises AlignmentSetupError naming the keys that cannot be placed (a Paddle key no
    torch key fills, a torch key with no Paddle counterpart, a shape mismatch)."""
    import paddle

    rows = _plan(torch_model, paddle_model, _keymap(key_map, name))
    problems = _plan_problems(rows)
    if problems:
        raise AlignmentSetupError(f"copy_weights: {len(problems)} of {len(rows)} keys cannot be copied: "
                                  + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
    sd = torch_model.state_dict()
    psd = paddle_model.state_dict()
    values = {}
    for r in rows:
        if r.source is not None and r.target is not None:
            values[r.target] = paddle.to_tensor(materialize(r, sd[r.source],
                                                            str(psd[r.target].dtype).replace("paddle.", "")))
    paddle_model.set_state_dict(values)
    return rows


# ------------------------------------------------------------------------------------------------- the pair


class _Pair:
    """Both models (as given, or float64 copies), their initial states, the batch on each side."""

    def __init__(self, torch_model, paddle_model, images: np.ndarray, labels: Optional[np.ndarray],
                 dtype: Optional[str]):
        import paddle
        import torch

        if dtype is not None:
            tm = copy.deepcopy(torch_model).to(getattr(torch, dtype))
            pm = copy.deepcopy(paddle_model)
            pm.to(dtype=dtype)
        else:
            tm, pm = torch_model, paddle_model
        self.tm, self.pm = tm, pm
        self.dtype = dtype or next((str(p.dtype).replace("torch.", "") for p in tm.parameters()), "float32")
        self.t_init = {k: v.detach().clone() for k, v in tm.state_dict().items()}
        self.p_init = {k: v.clone() for k, v in pm.state_dict().items()}
        self.images = images.astype(self.dtype) if images.dtype.kind == "f" else images
        self.labels = labels
        self.xt, self.xp = torch.from_numpy(self.images.copy()), paddle.to_tensor(self.images)
        self.yt = torch.from_numpy(labels.copy()) if labels is not None else None
        self.yp = paddle.to_tensor(labels) if labels is not None else None

    def reset(self) -> None:
        self.tm.load_state_dict(self.t_init)
        self.pm.set_state_dict(self.p_init)
        self.tm.zero_grad(set_to_none=True)
        self.pm.clear_gradients()


@dataclass
class _PortContext:
    """What `steps.common.record` and the trace comparison need of a context."""
    name: str
    policy: Policy
    full_artifacts: bool = False

    def compare(self, step: str, key: str, actual, expected, floor=None):
        return self.policy.compare(actual, expected, model=self.name, step=step, key=key, floor=floor)


def _flatten_outputs(out, prefix: str = "out") -> Dict[str, Any]:
    """A model's outputs as {key: tensor}: a tensor -> "out", a tuple/list -> "out/0", ..., a dict -> "out/<key>"."""
    if isinstance(out, Mapping):
        items = {}
        for k, v in out.items():
            items.update(_flatten_outputs(v, f"{prefix}/{k}"))
        return items
    if isinstance(out, (tuple, list)):
        items = {}
        for i, v in enumerate(out):
            items.update(_flatten_outputs(v, f"{prefix}/{i}"))
        return items
    return {prefix: out} if hasattr(out, "shape") else {}


def _loss_terms(value, side: str) -> Dict[str, Any]:
    if isinstance(value, Mapping):
        if "loss" not in value:
            raise AlignmentSetupError(f"the {side} loss function returned a dict without a 'loss' entry (the total "
                                      f"to differentiate); keys: {sorted(value)}")
        return dict(value)
    if not hasattr(value, "shape"):
        raise AlignmentSetupError(f"the {side} loss function must return a scalar tensor or a dict of them, got "
                                  f"{type(value).__name__}")
    return {"loss": value}


def _optimizer(spec, model, dtype_given: bool, side: str):
    if spec is None:
        return None
    if hasattr(spec, "step"):
        if dtype_given:
            raise AlignmentSetupError(f"the {side} optimizer is an instance bound to the model as given, but dtype= "
                                      "compares copies: pass a factory (model -> optimizer) instead")
        return spec
    if callable(spec):
        return spec(model)
    raise AlignmentSetupError(f"the {side} optimizer must be an optimizer or a factory model -> optimizer")


# ------------------------------------------------------------------------------------------------- the steps


def _step_weights(ctx: _PortContext, pair: _Pair, keymap: ModelKeymap) -> StepResult:
    res = StepResult("weights", dtype=pair.dtype)
    rows = _plan(pair.tm, pair.pm, keymap)
    problems = _plan_problems(rows)
    if problems:
        res.error = (f"{len(problems)} of {len(rows)} keys do not correspond: " + "; ".join(problems[:6])
                     + (" ..." if len(problems) > 6 else ""))
        return res
    sd = pair.tm.state_dict()
    psd = pair.pm.state_dict()
    for r in rows:
        if r.source is None or r.target is None:
            continue
        expected = materialize(r, sd[r.source], str(psd[r.target].dtype).replace("paddle.", ""))
        record(ctx, res, f"weights/{r.source}", psd[r.target], expected)
    res.notes.append(f"{len(res.results)} state entries compared through the key map "
                     f"({sum(r.transpose for r in rows)} nn.Linear weights transposed, "
                     f"{sum(r.action == 'rename' for r in rows)} renamed, {sum(r.action == 'drop' for r in rows)} "
                     "dropped by rule)")
    return res


def _step_forward(ctx: _PortContext, pair: _Pair) -> StepResult:
    import paddle
    import torch

    res = StepResult("forward", dtype=pair.dtype)
    pair.reset()
    pair.tm.eval()
    pair.pm.eval()
    with torch.no_grad():
        out_t = _flatten_outputs(pair.tm(pair.xt))
    with paddle.no_grad():
        out_p = _flatten_outputs(pair.pm(pair.xp))
    if set(out_t) != set(out_p):
        res.error = f"the outputs differ in structure: torch {sorted(out_t)}, Paddle {sorted(out_p)}"
        return res
    for key in out_t:
        record(ctx, res, key, out_p[key], out_t[key])
    return res


def _param_names(pair: _Pair, keymap: ModelKeymap) -> List[Tuple[str, str, bool]]:
    """(torch name, Paddle name, transposed) of every trainable parameter."""
    rows = {r.source: r for r in _plan(pair.tm, pair.pm, keymap) if r.source is not None}
    out = []
    for name, _ in pair.tm.named_parameters():
        r = rows.get(name)
        if r is None or r.target is None:
            raise AlignmentSetupError(f"parameter {name!r} has no Paddle counterpart through the key map")
        out.append((name, r.target, r.transpose))
    return out


def _step_train(ctx: _PortContext, pair: _Pair, keymap: ModelKeymap, loss, optimizer, iters: int,
                dtype_given: bool) -> Tuple[StepResult, StepResult]:
    """The `loss` step (iteration 0's loss terms and training outputs) and the `backward` step (per iteration:
    loss terms, every parameter gradient, and with an optimizer every parameter after the step)."""
    res_loss = StepResult("loss", dtype=pair.dtype)
    res_bwd = StepResult("backward", dtype=pair.dtype)
    pair.reset()
    disable_dropout(pair.tm)
    disable_dropout(pair.pm)
    pair.tm.train()
    pair.pm.train()
    topt = _optimizer(optimizer[0] if optimizer else None, pair.tm, dtype_given, "torch")
    popt = _optimizer(optimizer[1] if optimizer else None, pair.pm, dtype_given, "Paddle")
    try:
        names = _param_names(pair, keymap)
    except AlignmentSetupError as e:
        res_loss.error = res_bwd.error = str(e)
        return res_loss, res_bwd
    p_params = dict(pair.pm.named_parameters())
    t_params = dict(pair.tm.named_parameters())
    n_iters = iters if topt is not None else 1
    curves = {"torch": [], "paddle": [], "lr": []}
    for it in range(n_iters):
        out_t = pair.tm(pair.xt)
        out_p = pair.pm(pair.xp)
        lt = _loss_terms(loss[0](out_t, pair.yt), "torch")
        lp = _loss_terms(loss[1](out_p, pair.yp), "Paddle")
        if set(lt) != set(lp):
            res_bwd.error = f"the loss terms differ: torch {sorted(lt)}, Paddle {sorted(lp)}"
            return res_loss, res_bwd
        if it == 0:
            ft, fp = _flatten_outputs(out_t, "train_out"), _flatten_outputs(out_p, "train_out")
            for key in ft:
                if key in fp:
                    record(ctx, res_loss, key, fp[key].detach(), ft[key].detach())
            for term in lt:
                record(ctx, res_loss, f"loss/{term}", lp[term].detach(), lt[term].detach())
        for term in lt:
            record(ctx, res_bwd, f"iter{it}/loss/{term}", lp[term].detach(), lt[term].detach())
        curves["torch"].append(float(lt["loss"].detach()))
        curves["paddle"].append(float(lp["loss"].detach()))
        curves["lr"].append(float("nan"))
        lt["loss"].backward()
        lp["loss"].backward()
        for tname, pname, transposed in names:
            gt = t_params[tname].grad
            gp = p_params[pname].grad
            if gt is None or gp is None:
                res_bwd.error = (f"iteration {it}: parameter {tname} received no gradient on the "
                                 f"{'torch' if gt is None else 'Paddle'} side")
                return res_loss, res_bwd
            a = to_numpy(gp)
            record(ctx, res_bwd, f"iter{it}/grad/{tname}", a.T if transposed else a, gt)
        if topt is not None:
            topt.step()
            popt.step()
            topt.zero_grad(set_to_none=True)
            popt.clear_grad()
            for tname, pname, transposed in names:
                a = to_numpy(p_params[pname].detach())
                record(ctx, res_bwd, f"iter{it}/param/{tname}", a.T if transposed else a, t_params[tname].detach())
    res_bwd.series = curves
    res_bwd.notes.append(f"{n_iters} iteration(s), {'with' if topt is not None else 'without'} an optimizer step; "
                         "iterations run free (no lockstep reset): iteration 0 is the strict comparison")
    return res_loss, res_bwd


# ------------------------------------------------------------------------------------------------- the trace

_KIND = re.compile(r"[123]d$")


def _kind(module) -> str:
    """A module's kind across frameworks: Conv2d ~ Conv2D -> 'conv', BatchNorm2d ~ BatchNorm2D -> 'batchnorm'."""
    return _KIND.sub("", type(module).__name__.lower())


def _leaf_info(model) -> Dict[str, str]:
    named = _named(model)
    info = {}
    for path, m in named:
        children = list(m.children()) if hasattr(m, "children") else list(m.sublayers(include_self=False))
        if not children:
            info[path or "<model>"] = _kind(m)
    return info


_SUFFIX = re.compile(r"^(?P<path>.*?)(?P<rest>(#\d+)?(:\d+)?)$")


def _split(key: str) -> Tuple[str, str]:
    m = _SUFFIX.match(key)
    return m.group("path"), m.group("rest")


def _match_modules(tm, pm, t_order: List[str], p_order: List[str], t_out: Dict[str, np.ndarray],
                   p_out: Dict[str, np.ndarray], trace_map: Optional[Mapping[str, str]]) -> Tuple[Dict[str, str], str]:
    """torch output key -> Paddle output key, and how they were matched."""
    if trace_map is not None:
        out = {}
        for key in t_order:
            path, rest = _split(key)
            if path in trace_map and trace_map[path] + rest in p_out:
                out[key] = trace_map[path] + rest
        return out, "explicit map"
    t_paths = {p or "<model>" for p, _ in _named(tm)}
    p_paths = {p or "<model>" for p, _ in _named(pm)}
    if t_paths <= p_paths:
        return {k: k for k in t_order if k in p_out}, "module paths"
    t_leaf, p_leaf = _leaf_info(tm), _leaf_info(pm)
    ts = [k for k in t_order if _split(k)[0] in t_leaf]
    ps = [k for k in p_order if _split(k)[0] in p_leaf]
    out, j = {}, 0
    for key in ts:
        kind, shape = t_leaf[_split(key)[0]], t_out[key].shape
        for jj in range(j, min(j + 16, len(ps))):  # look a few outputs ahead: a port may add or fuse a module
            pk = ps[jj]
            if p_leaf[_split(pk)[0]] == kind and p_out[pk].shape == shape:
                out[key] = pk
                j = jj + 1
                break
    return out, "heuristic: execution order and output shape of leaf modules of the same kind"


def _trace(ctx: _PortContext, pair: _Pair, loss, trace_map) -> Tuple[Trace, Optional[Trace], str, Dict[str, str]]:
    import paddle
    import torch

    pair.reset()
    pair.tm.eval()
    pair.pm.eval()
    rt, rp = _Recorder(pair.tm, "torch", False), _Recorder(pair.pm, "paddle", False)
    try:
        with torch.no_grad():
            pair.tm(pair.xt)
        with paddle.no_grad():
            pair.pm(pair.xp)
    finally:
        rt.remove()
        rp.remove()
    match, how = _match_modules(pair.tm, pair.pm, rt.order, rp.order, rt.outputs, rp.outputs, trace_map)
    order = [k for k in rt.order if k in match]
    fwd = _compare_layers(ctx, "forward", order, {k: rp.outputs[match[k]] for k in order},
                          {k: rt.outputs[k] for k in order})
    bwd = None
    if loss is not None:
        pair.reset()
        pair.tm.train()
        pair.pm.train()
        rt, rp = _Recorder(pair.tm, "torch", True), _Recorder(pair.pm, "paddle", True)
        try:
            _loss_terms(loss[0](pair.tm(pair.xt), pair.yt), "torch")["loss"].backward()
            _loss_terms(loss[1](pair.pm(pair.xp), pair.yp), "Paddle")["loss"].backward()
        finally:
            rt.remove()
            rp.remove()
        border = [k for k in rt.grad_order if k in match and match[k] in rp.grads]
        bwd = _compare_layers(ctx, "backward", border, {k: rp.grads[match[k]] for k in border},
                              {k: rt.grads[k] for k in border})
        pair.reset()
    return fwd, bwd, how, match


# ------------------------------------------------------------------------------------------------- entry point


def _batch(batch) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise AlignmentSetupError(f"batch must be images or (images, labels), got a sequence of {len(batch)}")
        images, labels = batch
    else:
        images, labels = batch, None
    images = np.ascontiguousarray(to_numpy(images))
    labels = None if labels is None else np.ascontiguousarray(to_numpy(labels))
    if images.ndim < 1 or images.size == 0:
        raise AlignmentSetupError(f"batch images must be a non-empty array, got shape {images.shape}")
    return images, labels


def _state_sha256(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def align_models(torch_model, paddle_model, batch, *, loss=None, optimizer=None, key_map: KeyMap = None,
                 copy_weights: bool = False, steps: Optional[Sequence[str]] = None, policy: Optional[Policy] = None,
                 out: Union[str, Path] = "segtwin_out", name: str = "custom", dtype: Optional[str] = None,
                 iters: int = 1, trace: bool = True, trace_map: Optional[Mapping[str, str]] = None,
                 full_artifacts: bool = False) -> dict:
    """Align `paddle_model` against `torch_model` on `batch` (images, or (images, labels)); returns the verdict dict
    (`verdict["passed"]`) and writes the same artifacts as `segtwin align` to OUT/NAME (module docstring)."""
    with root_logger_guard():
        import paddle
        import torch

    t0 = time.time()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise AlignmentSetupError(f"name must be a plain file name (letters, digits, _ . -), got {name!r}")
    if dtype not in (None, "float32", "float64"):
        raise AlignmentSetupError(f"dtype must be None, 'float32' or 'float64', got {dtype!r}")
    if iters < 1:
        raise AlignmentSetupError(f"iters must be >= 1, got {iters}")
    for what, pair in (("loss", loss), ("optimizer", optimizer)):
        if pair is not None and (not isinstance(pair, (tuple, list)) or len(pair) != 2):
            raise AlignmentSetupError(f"{what} must be a (torch, paddle) pair")
    if optimizer is not None and loss is None:
        raise AlignmentSetupError("optimizer= needs loss= (the step is taken on the loss)")
    wanted = list(steps) if steps is not None else [s for s in PORT_STEPS if loss is not None or s in
                                                       ("weights", "forward")]
    unknown = [s for s in wanted if s not in PORT_STEPS]
    if unknown:
        raise AlignmentSetupError(f"unknown step(s) {unknown}; choose from {', '.join(PORT_STEPS)}")
    if loss is None and {"loss", "backward"} & set(wanted):
        raise AlignmentSetupError("the loss and backward steps need loss=(torch_fn, paddle_fn)")
    if not isinstance(torch_model, torch.nn.Module) or not isinstance(paddle_model, paddle.nn.Layer):
        raise AlignmentSetupError(f"expected a torch.nn.Module and a paddle.nn.Layer, got "
                                  f"{type(torch_model).__name__} and {type(paddle_model).__name__}")
    images, labels = _batch(batch)
    if loss is not None and labels is None:
        raise AlignmentSetupError("loss= needs labels: pass batch=(images, labels)")
    policy = policy or Policy.load()
    keymap = _keymap(key_map, name)
    out_dir = Path(out) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    if copy_weights:
        copy_torch_weights(torch_model, paddle_model, key_map, name)
    ctx = _PortContext(name=name, policy=policy, full_artifacts=full_artifacts)
    pair = _Pair(torch_model, paddle_model, images, labels, dtype)
    results: Dict[str, StepResult] = {}
    order = [s for s in PORT_STEPS if s in wanted]
    for step in order:
        if step in results:  # the loss step already ran with backward (one training pass gives both)
            continue
        ts = time.time()
        try:
            if step == "weights":
                results[step] = _step_weights(ctx, pair, keymap)
            elif step == "forward":
                results[step] = _step_forward(ctx, pair)
            else:
                res_loss, res_bwd = _step_train(ctx, pair, keymap, loss, optimizer, iters, dtype is not None)
                for s, r in (("loss", res_loss), ("backward", res_bwd)):
                    if s in wanted:
                        r.seconds = time.time() - ts
                        results[s] = r
                continue
        except AlignmentSetupError:
            raise
        except Exception as e:  # a side that crashes is a failed step, reported with its error
            results[step] = StepResult(step, error=f"{type(e).__name__}: {e}")
        results[step].seconds = time.time() - ts
    fwd = bwd = None
    how, matched = None, {}
    if trace:
        try:
            fwd, bwd, how, matched = _trace(ctx, pair, loss, trace_map)
        except Exception as e:
            log.warning("trace failed: %s: %s", type(e).__name__, e)
    from . import report as rep

    for res in results.values():
        res.first_divergent = fwd.first_divergent if (fwd and res.step in ("forward", "weights")) else \
            (bwd.first_divergent if (bwd and res.step in ("loss", "backward")) else None)
        if res.step == "weights" and res.failed_results:
            res.first_divergent = res.failed_results[0].key.split("/", 1)[1].rsplit(".", 1)[0]
        rep.write_step(out_dir, res, full=full_artifacts)
    for tr in (fwd, bwd):
        if tr is not None:
            rep.write_trace_csv(out_dir, tr)
    images_written = []
    try:
        images_written = rep.plot(out_dir, [t for t in (fwd, bwd) if t is not None], None)
    except Exception as e:  # plots are a convenience
        log.warning("plots not written: %s", e)
    verdict = {
        "model": name,
        "passed": bool(results) and all(r.passed for r in results.values()),
        "steps": {s: rep.step_summary(r) for s, r in results.items()},
        "trace": {
            "matching": how,
            "matched_modules": len(matched),
            "first_divergent_forward": fwd.first_divergent if fwd else None,
            "first_divergent_backward": bwd.first_divergent if bwd else None,
            "layers_forward": len(fwd.order) if fwd else 0,
            "layers_backward": len(bwd.order) if bwd else 0,
            "worst_forward": _worst_layer(fwd),
        },
        "out_dir": str(out_dir),
        "seconds": round(time.time() - t0, 2),
        "provenance": {
            "model": name, "torch_module": f"{type(torch_model).__module__}.{type(torch_model).__name__}",
            "paddle_module": f"{type(paddle_model).__module__}.{type(paddle_model).__name__}",
            "torch": torch.__version__, "paddle": paddle.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "seed": None, "input_shape": list(images.shape),
            "inputs": "the batch given to align_models", "dtypes": {s: r.dtype for s, r in results.items()},
            "weights": "copied torch -> Paddle (copy_weights=True)" if copy_weights else "as given",
            "weights_sha256": _state_sha256(pair.tm), "key_map": type(key_map).__name__ if key_map else "generic",
            "threads": {"torch": torch.get_num_threads()}, "command": " ".join(sys.argv),
        },
    }
    verdict["artifacts_bytes"] = _tree_bytes(out_dir)
    rep.write_verdict(out_dir, verdict)
    rep.write_report(out_dir, verdict, results, images_written)
    if how is not None:
        rep.append_section(out_dir, [f"Trace matching: **{how}** ({len(matched)} module outputs matched"
                                     + (f"; worst forward layer: `{verdict['trace']['worst_forward']}`" if fwd
                                        else "") + ")."])
    for step, res in results.items():
        if not res.passed:
            log.error("%s: step %s FAILED: %s; first divergent module: %s", name, step,
                      res.error or f"{len(res.failed_results)} of {len(res.results)} keys failed", res.first_divergent)
    log.info("%s: %s in %.1f s -> %s (%s)", name, "PASS" if verdict["passed"] else "FAIL", verdict["seconds"],
             out_dir / "report.md", human_bytes(verdict["artifacts_bytes"]))
    return verdict


def _worst_layer(tr: Optional[Trace]) -> Optional[str]:
    if tr is None or not tr.order:
        return None
    return max(tr.order, key=lambda p: tr.rel_err[p] if np.isfinite(tr.rel_err[p]) else float("inf"))
