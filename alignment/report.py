"""Artifacts of an alignment run.

OUT/MODEL/
  STEP_paddle.npy, STEP_torch.npy   reprod_log.ReprodLogger files (the real package reads and compares them)
  STEP.npz                          the same data without pickle ("torch/<key>", "paddle/<key>"); segtwin reads these
  STEP_diff.log                     one line per compared key, failures first
  trace_forward.csv, trace_backward.csv   per-layer error along the network
  layer_error.png, loss_curve.png   plots
  verdict.json                      pass/fail per step, worst key, first divergent layer, provenance
  report.md, report.html            tables per step, plots

Large arrays are stored in the .npy/.npz files as a fixed strided sample (identical indices on both sides; limits
in `context.artifact_value`); the comparison itself always uses every element. `--full-artifacts` stores them whole.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .context import StepResult, artifact_value as _artifact_value
from .logutil import root_logger_guard


def write_step(out: Path, res: StepResult, full: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with root_logger_guard():
        from reprod_log import ReprodLogger
        for side, log in (("paddle", res.paddle_log), ("torch", res.torch_log)):
            rl = ReprodLogger()
            for k, v in log.items():
                rl.add(k, np.asarray(_artifact_value(v, full, res.step)))
            rl.save(str(out / f"{res.step}_{side}.npy"))
    arrays = {}
    for side, log in (("torch", res.torch_log), ("paddle", res.paddle_log)):
        for k, v in log.items():
            arrays[f"{side}/{k}"] = _artifact_value(v, full, res.step)
    np.savez(out / f"{res.step}.npz", **arrays)
    lines = [f"step {res.step}: {'PASS' if res.passed else 'FAIL'} ({len(res.results)} keys, "
             f"{len(res.failed_results)} failed, {res.seconds:.1f} s)"]
    if res.error:
        lines.append(f"ERROR {res.error}")
    lines += [f"note: {n}" for n in res.notes]
    ordered = res.failed_results + [r for r in res.results if r.passed]
    lines += [r.summary() for r in ordered]
    (out / f"{res.step}_diff.log").write_text("\n".join(lines) + "\n")


def utilization(r) -> float:
    """|a-b| / allowed at the worst element: < 1 passes, > 1 fails; inf for structural failures."""
    if r.failure in ("shape mismatch", "dtype mismatch", "non-finite", "missing key", "unexpected key"):
        return float("inf")
    try:
        d = abs(float(r.actual_at_worst) - float(r.expected_at_worst))
        allowed = float(r.allowed_at_worst)
    except (TypeError, ValueError):
        return 0.0 if r.passed else float("inf")
    if allowed > 0:
        return d / allowed
    return 0.0 if d == 0 else float("inf")


def step_summary(res: StepResult) -> dict:
    worst = max(res.results, key=utilization).to_dict() if res.results else None
    return {
        "passed": res.passed,
        "keys": len(res.results),
        "failed": len(res.failed_results),
        "error": res.error,
        "notes": res.notes,
        "first_divergent": res.first_divergent,
        "worst": worst,
        "failures": [r.to_dict() for r in res.failed_results[:50]],
        "seconds": round(res.seconds, 3),
    }


def write_trace_csv(out: Path, trace) -> None:
    rows = ["index,path,passed,max_abs_diff,rel_err_to_max,mismatch_fraction"]
    for i, p in enumerate(trace.order):
        r = trace.results[p]
        rows.append(f"{i},{p},{r.passed},{r.max_abs_diff},{trace.rel_err[p]:.6g},{r.mismatch_fraction}")
    (out / f"trace_{trace.direction}.csv").write_text("\n".join(rows) + "\n")


def plot(out: Path, traces, curves: Optional[dict]) -> List[str]:
    """layer_error.png (per-layer relative error, fwd and bwd) and loss_curve.png; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if traces:
        fig, axes = plt.subplots(len(traces), 1, figsize=(11, 3.2 * len(traces)), squeeze=False)
        for ax, tr in zip(axes[:, 0], traces):
            vals = [max(tr.rel_err[p], 1e-12) for p in tr.order]
            colors = ["tab:red" if not tr.results[p].passed else "tab:blue" for p in tr.order]
            ax.scatter(range(len(vals)), vals, s=6, c=colors)
            ax.set_yscale("log")
            ax.set_ylabel("max|Δ| / max|ref|")
            first = tr.first_divergent
            ax.set_title(f"{tr.direction} trace ({len(vals)} module outputs"
                         + (f"; first divergent: {first}" if first else "; none divergent") + ")")
            ax.set_xlabel("module output in execution order" if tr.direction == "forward"
                          else "gradient w.r.t. module output, in backward order")
        fig.tight_layout()
        fig.savefig(out / "layer_error.png", dpi=90)
        plt.close(fig)
        written.append("layer_error.png")
    if curves and curves.get("growth"):  # a free run: both loss curves and the divergence against the reference
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
        it = curves["iteration"]
        for side, style in (("torch", "-"), ("paddle", "--"), ("torch32", ":")):
            ax[0].plot(it, curves["loss"][side], style, label=side if side != "torch32" else "torch float32")
        ax[0].set_title("training loss (free run)")
        ax[0].set_xlabel("iteration")
        ax[0].legend()
        g = curves["growth"]
        ax[1].semilogy(it, [max(v, 1e-300) for v in curves["twin"]["param"]], "-",
                       label=f"Paddle vs torch (x{g['twin']:.3g}/iter)")
        ax[1].semilogy(it, [max(v, 1e-300) for v in curves["reference"]["param"]], "--",
                       label=f"torch f32 vs f64 (x{g['reference']:.3g}/iter)")
        ax[1].set_title("parameter divergence ||a-b|| / ||b||")
        ax[1].set_xlabel("iteration")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(out / "free_run.png", dpi=90)
        plt.close(fig)
        written.append("free_run.png")
    elif curves and curves.get("torch"):
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
        it = list(range(len(curves["torch"])))
        ax[0].plot(it, curves["torch"], "o-", label="torch")
        ax[0].plot(it, curves["paddle"], "x--", label="paddle")
        ax[0].set_title("training loss")
        ax[0].set_xlabel("iteration")
        ax[0].legend()
        ax[1].plot(it, curves["lr"], "o-")
        ax[1].set_title("scheduled base lr")
        ax[1].set_xlabel("iteration")
        fig.tight_layout()
        fig.savefig(out / "loss_curve.png", dpi=90)
        plt.close(fig)
        written.append("loss_curve.png")
    return written


def _f(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else ("–" if v is None else str(v))


def _md_table(res: StepResult, limit: int = 25) -> List[str]:
    lines = ["| key | pass | max abs | at index | max rel | mismatched | cosine | rtol / atol | diff / allowed |",
             "|---|---|---|---|---|---|---|---|---|"]
    ordered = sorted(res.results, key=lambda r: (r.passed, -utilization(r)))
    for r in ordered[:limit]:
        verdict = "✅" if r.passed else "❌ " + (r.failure or "")
        lines.append(f"| `{r.key}` | {verdict} | {_f(r.max_abs_diff)} | {_f(r.max_abs_diff_index)} | "
                     f"{_f(r.max_rel_diff)} | {r.mismatch_count}/{r.numel} | {_f(r.cosine)} | "
                     f"{_f(r.rtol)} / {_f(r.atol)} | {_f(utilization(r))} |")
    if len(ordered) > limit:
        lines.append(f"| … {len(ordered) - limit} more keys (all in `{res.step}_diff.log`) | | | | | | | | |")
    return lines


def write_report(out: Path, verdict: dict, results: Dict[str, StepResult], images: List[str]) -> None:
    v = verdict
    md = [f"# segtwin alignment: {v['model']} — {'PASS' if v['passed'] else 'FAIL'}", ""]
    pv = v["provenance"]
    dtypes = ", ".join(f"{step} {dt}" for step, dt in (pv.get("dtypes") or {}).items() if dt)
    mode = {True: "lockstep", False: "free-running", None: None}[pv.get("lockstep")]
    md.append(f"Input {pv['input_shape']} ({pv['inputs']}), weights "
              f"`{pv['weights']}` (sha256 {pv['weights_sha256'][:12]}…), "
              f"torch {pv['torch']}, paddle {pv['paddle']}, device {pv.get('device', {}).get('paddle_get_device')}, "
              f"{pv.get('threads', {}).get('torch')} torch threads, seed {pv['seed']}"
              + (f"; dtypes: {dtypes}" if dtypes else "") + (f"; backward {mode}" if mode else "") + ".")
    md.append("")
    md.append("| step | verdict | keys | failed | worst key | worst max abs | first divergent |")
    md.append("|---|---|---|---|---|---|---|")
    for name, s in v["steps"].items():
        w = s.get("worst") or {}
        md.append(f"| {name} | {'PASS' if s['passed'] else 'FAIL'} | {s['keys']} | {s['failed']} | "
                  f"`{w.get('key', '')}` | {w.get('max_abs_diff', '')} | {s.get('first_divergent') or ''} |")
    md.append("")
    for tag in ("forward", "backward"):
        tr = v.get("trace", {})
        fd = tr.get(f"first_divergent_{tag}")
        ran = fd or tr.get(f"layers_{tag}", 1)  # 0 layers: the trace was not run (--no-trace, or N=1 backward)
        md.append(f"- first divergent module ({tag} trace): **{fd or ('none' if ran else 'not run')}**")
    md.append("")
    for img in images:
        md += [f"![{img}]({img})", ""]
    for name, res in results.items():
        md += [f"## step `{name}` — {'PASS' if res.passed else 'FAIL'}", ""]
        if res.error:
            md += [f"**error:** {res.error}", ""]
        md += [f"- {n}" for n in res.notes]
        md += [""] + _md_table(res) + [""]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    _write_html(out, text)


def append_section(out: Path, lines: List[str]) -> None:
    """Add a section (markdown lines, images as `![name](file)`) to OUT/report.md and re-render report.html."""
    text = (out / "report.md").read_text() + "\n" + "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    _write_html(out, text)


def _write_html(out: Path, text: str) -> None:
    body = []
    for line in text.splitlines():
        if line.startswith("![") and "](" in line:
            src = line.split("](", 1)[1].rstrip(")")
            body.append(f'<img src="{html.escape(src)}" style="max-width:100%">')
        elif line.startswith("#"):
            lvl = len(line) - len(line.lstrip("#"))
            body.append(f"<h{lvl}>{html.escape(line.lstrip('#').strip())}</h{lvl}>")
        else:
            body.append(f"<pre style='margin:0'>{html.escape(line)}</pre>" if line.startswith("|")
                        else f"<p>{html.escape(line)}</p>")
    (out / "report.html").write_text("<!doctype html><meta charset='utf-8'><title>segtwin report</title>"
                                     "<body style='font-family:sans-serif'>" + "\n".join(body) + "</body>")


def write_verdict(out: Path, verdict: dict) -> None:
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2, allow_nan=False, default=str) + "\n")
