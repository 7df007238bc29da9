"""`segtwin x2paddle MODEL`: convert a torch model with X2Paddle (`pytorch2paddle`, trace mode) and check the
result against the torch original with segtwin's forward step and per-module trace.

X2Paddle generates a Paddle layer with its own names (`conv2d0`, `batchnorm0`, ...) and a `model.pdparams` under
those names; it checks nothing numerically. Here:

1. the torch model is built (a registered spec model: random weights with calibrated BN statistics exactly as
   `segtwin align` makes them, or `--weights` in the official format; or `module:factory` for a model of your own,
   with `--weights` a torch state_dict file read with `weights_only=True`);
2. X2Paddle converts it at the given input size (feedback to X2Paddle's servers disabled: nothing leaves the
   machine); a node it cannot convert ends the run with exit 2 and one line naming the node (a custom autograd
   Function is `prim::PythonOp`, a compiled op its `namespace::name`);
3. the generated layer is imported from the run directory and its `model.pdparams` read with the restricted
   unpickler (numpy arrays only), loaded strictly;
4. `alignment.align_models` compares the outputs (float64 copies of both where the generated code allows, else
   float32) and traces every module, matched by the labelled order-and-shape heuristic -- X2Paddle's names have
   nothing in common with torch's;
5. for a spec model, the segtwin twin is aligned on the same weights and batch too, and `three_way.csv` /
   `three_way.md` show per torch module the relative error of both ports, so a user sees which port is closer, and
   where.

Exit status: 0 the conversion agrees, 1 it does not (the report names the first divergent module), 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import io
import re
import shutil
import sys
import traceback
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .logutil import get_logger, root_logger_guard

log = get_logger(__name__)

#: Hints for nodes X2Paddle refuses in the spec models.
NODE_HINTS = {
    "segtwin::psa_mask": "the compiled PSA mask op; --cfg psa_impl=tensor uses the pure-tensor path",
    "prim::PythonOp": "a custom autograd Function (X2Paddle cannot convert Python ops)",
}


class X2PaddleError(RuntimeError):
    """X2Paddle could not convert the model; the message names the unsupported nodes or the error."""


def _quiet_x2paddle():
    with root_logger_guard():
        import paddle  # noqa: F401
        from x2paddle.convert import pytorch2paddle
    return pytorch2paddle


def convert(torch_model, example: np.ndarray, save_dir: Path, keep: bool = False):
    """X2Paddle's `pytorch2paddle` (trace mode) of `torch_model` at `example`'s shape into `save_dir`; returns the
    generated Paddle layer with X2Paddle's weights loaded (strictly, through the restricted reader). What X2Paddle
    prints goes to `save_dir/x2paddle.log`. Unless `keep`, its weights file and static-graph export are deleted
    once loaded (a ResNet-50 model writes ~360 MB); the generated code stays."""
    import torch

    from paddle_impl.checkpoint import read_state_file, strict_load

    pytorch2paddle = _quiet_x2paddle()
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    printed = io.StringIO()
    torch_model.eval()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed), root_logger_guard():
            pytorch2paddle(torch_model, save_dir=str(save_dir), jit_type="trace",
                           input_examples=[torch.from_numpy(np.ascontiguousarray(example))],
                           disable_feedback=True)
    except Exception as e:
        (save_dir / "x2paddle.log").write_text(printed.getvalue())
        nodes = re.findall(r"^=+ (\S+) =+$", printed.getvalue(), re.M)
        nodes = [n for n in nodes if "::" in n]
        if nodes:
            hints = [f"{n} ({NODE_HINTS[n]})" if n in NODE_HINTS else n for n in nodes]
            raise X2PaddleError(f"X2Paddle cannot convert {len(nodes)} node kind(s): {', '.join(hints)}") from None
        frames = traceback.extract_tb(e.__traceback__)
        if type(e).__name__ == "TracingCheckError":
            raise X2PaddleError("torch.jit.trace cannot capture the model: the traced graph differs between two "
                                "invocations (data-dependent control flow, e.g. a top-k selection); X2Paddle's "
                                "trace mode needs one static graph") from None
        mapper = next((f.name for f in reversed(frames) if re.fullmatch(r"(aten|prim)_\w+", f.name)), None)
        where = f" in its mapper for {mapper.replace('_', '::', 1)}" if mapper else ""
        if not mapper and frames:
            f = frames[-1]
            where = f" (raised at {Path(f.filename).name}:{f.lineno} in {f.name})"
        raise X2PaddleError(f"X2Paddle failed{where}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") \
            from None
    (save_dir / "x2paddle.log").write_text(printed.getvalue())
    code = save_dir / "x2paddle_code.py"
    if not code.is_file():
        raise X2PaddleError(f"X2Paddle wrote no {code}")
    spec = importlib.util.spec_from_file_location(f"x2paddle_code_{abs(hash(str(save_dir)))}", code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the code X2Paddle just generated for this run: what is being verified
    import paddle

    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, paddle.nn.Layer) and v.__module__ == module.__name__]
    if len(classes) != 1:
        raise X2PaddleError(f"{code}: expected one generated paddle.nn.Layer, found {[c.__name__ for c in classes]}")
    layer = classes[0]()
    strict_load(layer, read_state_file(save_dir / "model.pdparams"), str(save_dir / "model.pdparams"))
    layer.eval()
    if not keep:
        (save_dir / "model.pdparams").unlink()
        shutil.rmtree(save_dir / "inference_model", ignore_errors=True)
    return layer


def _factory_model(target: str, weights: Optional[str]):
    import torch

    mod_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"{target}: cannot import module {mod_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{target}: module {mod_name!r} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{target}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"--weights {weights}: {' '.join(str(e).split())[:300]}") from None
    return model.eval()


def _read_trace(path: Path) -> Dict[str, float]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["path"]: float(row["rel_err_to_max"]) for row in csv.DictReader(f)}


def write_three_way(out: Path, twin_csv: Path, x2p_csv: Path, order: Sequence[str]) -> Path:
    """Per torch module: relative error (max|diff| / max|torch|) of the segtwin twin and of X2Paddle's conversion;
    `three_way.csv` and a markdown table of the worst rows in `three_way.md`."""
    twin, x2p = _read_trace(twin_csv), _read_trace(x2p_csv)
    rows = []
    for path in order:
        a, b = twin.get(path), x2p.get(path)
        closer = "" if a is None or b is None else ("twin" if a < b else ("x2paddle" if b < a else "equal"))
        rows.append((path, a, b, closer))
    with open(out / "three_way.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "twin_rel_err", "x2paddle_rel_err", "closer"])
        w.writerows([(p, "" if a is None else f"{a:.6g}", "" if b is None else f"{b:.6g}", c) for p, a, b, c in rows])
    both = [r for r in rows if r[1] is not None and r[2] is not None]
    images = _plot_three_way(out, rows)
    lines = ["## torch reference vs segtwin twin vs X2Paddle, per module (forward trace)", "",
             f"{len(rows)} torch module outputs; twin traced at {sum(r[1] is not None for r in rows)}, X2Paddle "
             f"matched at {sum(r[2] is not None for r in rows)} (order-and-shape heuristic); closer: twin "
             f"{sum(r[3] == 'twin' for r in both)}, X2Paddle {sum(r[3] == 'x2paddle' for r in both)}, equal "
             f"{sum(r[3] == 'equal' for r in both)}.", "",
             "| torch module | twin rel. error | X2Paddle rel. error | closer |", "|---|---|---|---|"]
    worst = sorted(both, key=lambda r: -max(r[1], r[2]))[:25]
    for p, a, b, c in sorted(worst, key=lambda r: order.index(r[0])):
        lines.append(f"| `{p}` | {a:.3g} | {b:.3g} | {c} |")
    lines += ["", "(the 25 modules where either port is worst, in execution order; every module in `three_way.csv`)"]
    lines += [f"\n![{img}]({img})" for img in images]
    (out / "three_way.md").write_text("\n".join(lines) + "\n")
    if (out / "report.md").is_file():
        from .report import append_section
        append_section(out, lines)
    return out / "three_way.csv"


def _plot_three_way(out: Path, rows) -> list:
    """three_way.png: both ports' relative error per torch module, in execution order (log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return []
    fig, ax = plt.subplots(figsize=(11, 3.4))
    for col, label, style in ((1, "segtwin twin", "o"), (2, "X2Paddle", "x")):
        pts = [(i, max(r[col], 1e-17)) for i, r in enumerate(rows) if r[col] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, marker=style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("torch module output, execution order")
    ax.set_ylabel("max|diff| / max|torch|")
    ax.set_title("torch reference vs both Paddle ports, per module")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "three_way.png", dpi=90)
    plt.close(fig)
    return ["three_way.png"]


def run(model: str, weights=None, model_cfg=None, input_size=None, out="segtwin_out", threads=None,
        three_way: bool = True, seed: int = 0, keep: bool = False) -> dict:
    """The whole route (module docstring). Returns X2Paddle's verdict (from `align_models`) with `three_way` added
    (the CSV path, or None)."""
    with root_logger_guard():
        import paddle  # noqa: F401

    from .any_port import align_models
    from .runner import AlignmentSetupError, _drop_weights, prepare
    from .specs import SPECS
    from .utils import parse_size, set_threads

    out = Path(out)
    if ":" in model:
        set_threads(threads)
        if input_size is None:
            raise AlignmentSetupError(f"{model}: give --input-size N,C,H,W for a model of your own")
        try:
            tm = _factory_model(model, weights)
        except ValueError as e:
            raise AlignmentSetupError(str(e)) from None
        try:
            size = parse_size(input_size, "--input-size", "NCHW")  # any N and C: only eval forwards run here
        except ValueError as e:
            raise AlignmentSetupError(str(e)) from None
        images = np.random.default_rng(seed).standard_normal(size).astype("float32")
        twin, name = None, re.sub(r"[^A-Za-z0-9_.-]", "_", model)
    elif model in SPECS:
        ctx, _ = prepare(model, weights=weights, out=str(out), input_size=input_size, seed=seed, threads=threads,
                         iters=1, model_cfg=model_cfg)
        tm, twin, images, name = ctx.torch_model, ctx.paddle_model, ctx.images, model
        tm.eval()
        if not keep:
            _drop_weights(ctx.out_dir / "weights", weights)  # the models are built; the files only cost disk
    else:
        raise AlignmentSetupError(f"unknown model {model!r}: a registered model ({', '.join(SPECS)}) or "
                                  "module:factory")
    run_dir = out / f"{name}_x2paddle"
    pm = convert(tm, images, run_dir / "x2paddle", keep=keep)
    try:
        verdict = align_models(tm, pm, images, steps=("forward",), out=out, name=f"{name}_x2paddle",
                               dtype="float64")
    except Exception as e:  # generated code with float32 constants: compare as given
        log.warning("float64 copies of X2Paddle's layer fail (%s: %s); comparing in float32", type(e).__name__, e)
        verdict = align_models(tm, pm, images, steps=("forward",), out=out, name=f"{name}_x2paddle")
    verdict["three_way"] = None
    if twin is not None and three_way:
        align_models(tm, twin, images, steps=("forward",), out=out, name=f"{name}_twin", dtype="float64")
        order = list(_read_trace(out / f"{name}_twin" / "trace_forward.csv"))
        verdict["three_way"] = str(write_three_way(run_dir, out / f"{name}_twin" / "trace_forward.csv",
                                                   run_dir / "trace_forward.csv", order))
    return verdict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segtwin x2paddle", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a registered model (pspnet, danet, ...) or module:factory returning a torch model")
    p.add_argument("--weights", help="official checkpoint (spec model) or torch state_dict file (factory); default: "
                                     "random weights as segtwin align makes them")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE", help="model option (spec models)")
    p.add_argument("--input-size", help="N,C,H,W (default: the model's alignment input)")
    p.add_argument("--out", default="segtwin_out")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-three-way", action="store_true", help="skip the segtwin twin's trace (spec models)")
    p.add_argument("--keep-weights", action="store_true",
                   help="keep the random official weights, the twin's .pdparams and X2Paddle's weights and "
                        "static-graph export (default: deleted once loaded)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .runner import AlignmentSetupError, parse_model_cfg

    args = build_parser().parse_args(argv)
    try:
        cfg = parse_model_cfg(args.cfg) if args.cfg else None
        v = run(args.model, weights=args.weights, model_cfg=cfg, input_size=args.input_size, out=args.out,
                threads=args.threads, three_way=not args.no_three_way, keep=args.keep_weights)
    except (AlignmentSetupError, X2PaddleError, FileNotFoundError, ValueError) as e:
        print(f"segtwin x2paddle: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    tr = v["trace"]
    print(f"{args.model} via X2Paddle: {'PASS' if v['passed'] else 'FAIL'}; forward worst "
          f"{(v['steps']['forward'].get('worst') or {}).get('max_abs_diff')}; first divergent module "
          f"{tr['first_divergent_forward'] or 'none'}; worst module {tr['worst_forward']} ({tr['matching']}, "
          f"{tr['matched_modules']} module outputs matched) -> {v['out_dir']}/report.md"
          + (f"; three-way view {v['three_way']}" if v.get("three_way") else ""))
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
