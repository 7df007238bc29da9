"""The twin rule, checked: a `torch_ref/` module and its Paddle twin of the same path in `paddle_impl/` must read
alike line by line, statement for statement, once the framework vocabulary is spelled one way.

    python tests/twin_rule.py [--root DIR]        (or: python -m tests.twin_rule)

prints one line per difference, `paddle_impl/x.py:LINE vs torch_ref/x.py:LINE: ...`, and exits 1 when there is any
(0 otherwise). It reads text only: neither framework is imported.

Which files
-----------
Every `torch_ref/**/*.py` that has a file of the same relative path under `paddle_impl/`, except two kinds:

* `layers.py`: the per-framework adapter layer. It exists so that the model files can be identical; every line of it
  is a framework spelling (the module base class, conv/BatchNorm constructors and conventions, resize, reshape), so
  comparing it would only list the whole file.
* package `__init__.py` files: they hold each tree's registry and re-exports (the Paddle tree also exposes its engine,
  datasets and config, which have no torch counterpart), change whenever a package is added, and contain no model
  code, so they are not twins line by line.

How
---
1. Each line is normalised (`normalise`): trailing blanks stripped, blank lines and the bare `import torch` /
   `import paddle` lines dropped, then the substitutions of VOCABULARY applied, the same ones to both files.
2. Lines named by an ALLOW entry are set aside on the side(s) the entry names. An entry is keyed by file and by
   distinctive fragments of the raw lines (never by line numbers) and carries the reason the difference is required.
3. difflib compares the remaining normalised lines; every non-equal line is a difference, reported with its line
   number in both files (for a line present on one side only, the other number is the line it would follow).

An ALLOW entry that no longer matches (a fragment not found, or found more than once), or whose lines now read the
same on both sides, is itself reported, so the list cannot outlive the differences it excuses.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

TORCH = "torch_ref"
PADDLE = "paddle_impl"
ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# Which files
# ---------------------------------------------------------------------------------------------------------------

EXCLUDED = {
    "layers.py": "the per-framework adapter layer: every line is a framework spelling by design",
    "__init__.py": "package registries / re-exports that differ per tree and change as packages are added",
}


def excluded_reason(rel: str) -> Optional[str]:
    """Why the twin pair at relative path `rel` is not compared (None: it is compared)."""
    if rel == "layers.py":
        return EXCLUDED["layers.py"]
    if rel.rsplit("/", 1)[-1] == "__init__.py":
        return EXCLUDED["__init__.py"]
    return None


def twin_pairs(root: Path = ROOT) -> list:
    """Relative paths (posix, e.g. 'models/pspnet.py') present in both trees and not excluded, sorted."""
    torch_root, paddle_root = Path(root) / TORCH, Path(root) / PADDLE
    out = []
    for path in sorted(torch_root.rglob("*.py")):
        rel = path.relative_to(torch_root).as_posix()
        if (paddle_root / rel).is_file() and excluded_reason(rel) is None:
            out.append(rel)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Normalisation: the framework vocabulary, one spelling each. Only what the twin files actually contain.
# ---------------------------------------------------------------------------------------------------------------

DROPPED_LINES = frozenset({"import torch", "import paddle"})

# (what it covers, pattern, replacement); applied in this order, to both files alike.
VOCABULARY = [
    ("the two package names (imports, the '(twin: ...)' / 'Twin of ...' docstring markers)",
     re.compile(r"\b(?:torch_ref|paddle_impl)\b"), "<pkg>"),
    ("module docstrings naming the tree's own models ('of the reference models' / 'of the Paddle twins')",
     re.compile(r"\bthe (?:reference models|Paddle twins)\b"), "the <tree's> models"),
    ("framework names in prose ('for PyTorch' / 'for PaddlePaddle', 'pure-PyTorch' / 'pure-Paddle')",
     re.compile(r"\b(?:PyTorch|PaddlePaddle|Paddle)\b"), "<Framework>"),
    ("the framework module itself (torch.where / paddle.where, torch.nn.functional / paddle.nn.functional, ...)",
     re.compile(r"\b(?:torch|paddle)\b"), "<fw>"),
    ("dtype casts: t.to(torch.int64) / t.astype(paddle.int64)",
     re.compile(r"\.(?:to|astype)\((<fw>\.(?:bool|u?int\d+|b?float\d+))\)"), r".astype(\1)"),
    ("the axis keyword: dim= / axis=",
     re.compile(r"\b(?:dim|axis)="), "axis="),
    ("concatenation: torch.cat / paddle.concat",
     re.compile(r"<fw>\.(?:cat|concat)\("), "<fw>.concat("),
]


def normalise(line: str) -> Optional[str]:
    """One raw line -> its framework-neutral spelling, or None for a line that is not compared."""
    line = line.rstrip()
    if not line.strip() or line in DROPPED_LINES:
        return None
    for _, pattern, replacement in VOCABULARY:
        line = pattern.sub(replacement, line)
    return line


# ---------------------------------------------------------------------------------------------------------------
# The allow-list: differences that are genuinely required, keyed by file and by fragments of the raw lines.
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    """The one line containing `fragment` (searched inside the body of `within` when given)."""
    fragment: str
    within: Optional[str] = None


@dataclass(frozen=True)
class Span:
    """From the one line containing `start` through the first line at or after it containing `end`."""
    start: str
    end: str
    within: Optional[str] = None


@dataclass(frozen=True)
class Body:
    """The one line containing `header` (a def/class/if/...) and every following line indented deeper than it."""
    header: str
    within: Optional[str] = None


Spec = Union[Line, Span, Body]


@dataclass(frozen=True)
class Allow:
    """Lines of the twin pair at `path` that may differ; `torch` / `paddle`: the specs of each side (none: that side
    has nothing in their place)."""
    path: str
    reason: str
    torch: Sequence[Spec] = ()
    paddle: Sequence[Spec] = ()


ALLOW = (
    # -- ops/psa_mask.py --------------------------------------------------------------------------------------------
    Allow("ops/psa_mask.py",
          "module doc: each side describes its own compiled-op mechanism (torch.ops registration with Python fake "
          "kernels and autograd; Paddle PD_BUILD_OP/PD_BUILD_GRAD_OP, usable under to_static, jit.save, inference)",
          torch=(Span('* "cpp": the compiled operator `torch.ops.segtwin.psa_mask`', "fake kernels for torch"),),
          paddle=(Span('* "cpp": the compiled custom operator `psa_mask`', "in `paddle.inference` once `load_op()`"),)),
    Allow("ops/psa_mask.py",
          "Paddle only: @unified marks psa_mask as valid in both dynamic and static mode, so paddle.jit.to_static "
          "(SOT/AST) calls it as is instead of rewriting its Python control flow; torch has no such transform",
          paddle=(Line("from paddle.jit.marker import unified"), Line("@unified"))),
    Allow("ops/psa_mask.py",
          "torch only: the fake kernels (torch.compile / opcheck) and autograd formulas of the compiled ops are "
          "registered from Python; Paddle declares the gradient op in C++ (PD_BUILD_GRAD_OP) and needs no fake kernel",
          torch=(Body("def _register_python_parts("),)),
    Allow("ops/psa_mask.py",
          "loading the compiled op: torch's loader registers it into torch.ops (load_op returns nothing, the state is "
          "a flag); Paddle's loader returns the module holding the op's entry point, which load_op caches and returns",
          torch=(Line('_state = {"registered": False'), Body("def load_op(")),
          paddle=(Line('_state = {"module": None'), Body("def load_op("))),
    Allow("ops/psa_mask.py",
          "where the input lives: torch.device.type vs Paddle's Place predicates, each build's CUDA query and version "
          "diagnostics, and Paddle's static mode (the place is only known when the program runs)",
          torch=(Span('"""Why the compiled operator has no kernel for x\'s device', "has CPU and CUDA kernels only"),),
          paddle=(Span('"""Why the compiled operator has no kernel for x\'s place', "has CPU and CUDA kernels only"),)),
    Allow("ops/psa_mask.py",
          "under paddle.jit.to_static the input is a static-graph value, not a paddle.Tensor: the type check applies "
          "in dynamic mode only",
          torch=(Line("if not isinstance(x, torch.Tensor):"),),
          paddle=(Line("if paddle.in_dynamic_mode() and not isinstance(x, paddle.Tensor):"),)),
    Allow("ops/psa_mask.py",
          "Paddle static mode: unknown dimensions are -1 under to_static, and the index map needs H and W",
          paddle=(Span("if h < 0 or w < 0:", "H and W must be known"),)),
    Allow("ops/psa_mask.py",
          "Paddle workaround (commented there): its CPU kernels lack float16 index_select and bfloat16 concat_grad; "
          "the float32 round trip is exact for copied values",
          paddle=(Span("if x.dtype in (paddle.float16, paddle.bfloat16) and paddle.in_dynamic_mode()",
                       "return _psa_mask_tensor(x.astype(paddle.float32)"),)),
    Allow("ops/psa_mask.py",
          "the index map: cached per device in dynamic mode (torch.device vs Paddle place); in Paddle's static mode it "
          "is built as a constant of the program",
          torch=(Line("index = _index_tensor(int(h), int(w), mask_h, mask_w, psa_type, x.device)"),),
          paddle=(Span("if paddle.in_dynamic_mode():", "index = paddle.to_tensor(gather_index("),)),
    Allow("ops/psa_mask.py",
          "the warn-once key names the input's device: torch.device.type vs Paddle's place",
          torch=(Line('_warn_once(f"device:{x.device.type}"'),),
          paddle=(Line('_warn_once(f"device:{x.place}"'),)),
    Allow("ops/psa_mask.py",
          "calling the compiled op: torch reaches it through torch.ops.segtwin, Paddle through the module load_op "
          "returns",
          torch=(Line("load_op()", within="def psa_mask("), Line("return torch.ops.segtwin.psa_mask(x, t, mask_h")),
          paddle=(Line("module = load_op()"), Line("return module.psa_mask(x, t, mask_h, mask_w)"))),
    # -- ops/psa_attend.py ------------------------------------------------------------------------------------------
    Allow("ops/psa_attend.py",
          "Paddle only: @unified lets paddle.jit.to_static (segtwin export of PSANet's fused path) call psa_attend as "
          "is; rewritten by the AST transform, its Python control flow (and load_op's) fails on undefined values",
          paddle=(Line("from paddle.jit.marker import unified"), Line("@unified"))),
    Allow("ops/psa_attend.py",
          "Paddle static mode: a to_static value has no place (its .device is None), so the CPU check applies in "
          "dynamic mode only and the op's kernel checks the place when the program runs, as psa_mask does",
          torch=(Line('if str(feat.device) != "cpu" or str(attn_logits.device) != "cpu":'),),
          paddle=(Span("# A static program (paddle.jit.to_static / jit.save) has no place yet",
                       'if paddle.in_dynamic_mode() and (str(feat.device) != "cpu"'),)),
    # -- optim.py ---------------------------------------------------------------------------------------------------
    Allow("optim.py",
          "Paddle only: its Adam/Momentum state lives in named accumulators (velocity, moment1/2, beta pow), one "
          "step ahead for the bias-correction powers; and the math import for reading the step off them",
          torch=(),
          paddle=(Span("# Paddle's accumulator names for the state above", '"beta2_pow": "beta2_pow_acc"}'),
                  Line("import math", within=None))),
    Allow("optim.py",
          "torch only: clip_gradients computes the global norm with math.sqrt",
          torch=(Line("import math"),), paddle=()),
    Allow("optim.py",
          "optimizer construction: torch takes an absolute lr per parameter group; a Paddle group's learning_rate "
          "MULTIPLIES the optimizer's lr and is not reported back (the multipliers are kept for current_lrs); "
          "betas vs beta1/beta2, eps vs epsilon; a Paddle group's float weight_decay is its coupled L2 coefficient",
          torch=(Span('specs = [{"params": [p for _, p in params], "lr": base_lr * mult',
                      'has no builder here (sgd, adam, adamw)")'),),
          paddle=(Span('specs = [{"params": [p for _, p in params], "learning_rate": mult',
                       "kept here for current_lrs."),)),
    Allow("optim.py",
          "applying the scheduled lr: torch writes every group's absolute lr, Paddle sets the optimizer's lr once "
          "and the groups scale it",
          torch=(Span("for g in optimizer.param_groups:", 'g["lr"] = base_lr * g["lr_mult"]'),),
          paddle=(Line("optimizer.set_lr(base_lr)"),)),
    Allow("optim.py",
          "reading the per-group lr: torch's param_groups vs Paddle's get_lr() times the kept multipliers",
          torch=(Line('return [float(g["lr"]) for g in optimizer.param_groups]'),),
          paddle=(Line('return [float(optimizer.get_lr()) * m for m in optimizer._segtwin["lr_mults"]]'),)),
    Allow("optim.py",
          "scaling a gradient in place: torch's mul_ vs Paddle's set_value (Paddle refuses in-place ops on a leaf "
          "that requires grad)",
          torch=(Line("g.mul_(scale)"),), paddle=(Line("g.set_value(g * scale)"),)),
    Allow("optim.py",
          "releasing the gradients after a step (not zero-filling them): zero_grad(set_to_none=True) vs "
          "clear_grad(set_to_zero=False)",
          torch=(Line("optimizer.zero_grad(set_to_none=True)"),),
          paddle=(Line("optimizer.clear_grad(set_to_zero=False)"),)),
    Allow("optim.py",
          "reading the optimizer state: torch's optimizer.state[p] dict (momentum_buffer; exp_avg, exp_avg_sq, step) "
          "vs Paddle's accumulators keyed by the parameter's name (velocity; moment1/2 and beta pows, from which "
          "the step is read)",
          torch=(Span("names = {id(p): n for n, p in model.named_parameters()}", "return out"),),
          paddle=(Span("names = {p.name: n for n, p in model.named_parameters()}", "return out"),)),
    Allow("optim.py",
          "writing the optimizer state: optimizer.state[p] entries vs the accumulators (Paddle's beta pows one step "
          "ahead, its step implied by them)",
          torch=(Span("for sname, values in state.items():", 'st["step"] = torch.tensor('),),
          paddle=(Span('betas = dict(zip(("beta1_pow", "beta2_pow")', "target.set_value("),)),
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _body_range(lines: Sequence[str], i: int) -> range:
    """Line i and the lines after it indented deeper (blank lines inside included, trailing ones not)."""
    last, j = i, i + 1
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > _indent(lines[i])):
        if lines[j].strip():
            last = j
        j += 1
    return range(i, last + 1)


def _unique(lines: Sequence[str], fragment: str, scope: range) -> tuple:
    """(index, None) of the one line in scope containing fragment, or (None, why not)."""
    hits = [i for i in scope if fragment in lines[i]]
    if len(hits) == 1:
        return hits[0], None
    if not hits:
        return None, f"{fragment!r} not found"
    return None, f"{fragment!r} is on {len(hits)} lines ({', '.join(str(i + 1) for i in hits)}): make it distinctive"


def resolve(spec: Spec, lines: Sequence[str]) -> tuple:
    """The 0-based line indices a spec names in `lines`, or (None, why it names nothing)."""
    scope = range(len(lines))
    if spec.within is not None:
        head, problem = _unique(lines, spec.within, scope)
        if problem:
            return None, f"within: {problem}"
        scope = _body_range(lines, head)
    if isinstance(spec, Line):
        i, problem = _unique(lines, spec.fragment, scope)
        return (None, problem) if problem else ([i], None)
    if isinstance(spec, Body):
        i, problem = _unique(lines, spec.header, scope)
        return (None, problem) if problem else (list(_body_range(lines, i)), None)
    i, problem = _unique(lines, spec.start, scope)
    if problem:
        return None, problem
    for j in range(i, scope.stop):
        if spec.end in lines[j]:
            return list(range(i, j + 1)), None
    return None, f"end {spec.end!r} not found after line {i + 1}"


# ---------------------------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    """One differing line. A line on one side only has text None on the other side, whose line number is then the
    line it would follow (0: the start of the file)."""
    path: str
    paddle_line: int
    torch_line: int
    paddle_text: Optional[str]
    torch_text: Optional[str]

    def __str__(self) -> str:
        where = f"{PADDLE}/{self.path}:{self.paddle_line} vs {TORCH}/{self.path}:{self.torch_line}"
        if self.torch_text is None:
            return f"{where}: only in {PADDLE} (after {TORCH} line {self.torch_line}): {self.paddle_text.strip()}"
        if self.paddle_text is None:
            return f"{where}: only in {TORCH} (after {PADDLE} line {self.paddle_line}): {self.torch_text.strip()}"
        return f"{where}: {PADDLE}: {self.paddle_text.strip()}  |  {TORCH}: {self.torch_text.strip()}"


@dataclass(frozen=True)
class AllowProblem:
    """An allow-list entry that names nothing, or no longer excuses a difference."""
    path: str
    reason: str
    message: str

    def __str__(self) -> str:
        return (f"{PADDLE}/{self.path} vs {TORCH}/{self.path}: allow-list entry ({self.reason[:60]}...): "
                f"{self.message}")


Finding = Union[Difference, AllowProblem]


def _read(path: Path) -> list:
    return path.read_text(encoding="utf-8").splitlines()


def compare_lines(path: str, torch_lines: Sequence[str], paddle_lines: Sequence[str],
                  allow: Sequence[Allow] = ()) -> list:
    """The findings of one twin pair given as line lists (`allow`: the entries for this pair)."""
    findings: list = []
    excused = {TORCH: set(), PADDLE: set()}
    for entry in allow:
        named, broken = {}, False
        for side, specs, lines in ((TORCH, entry.torch, torch_lines), (PADDLE, entry.paddle, paddle_lines)):
            named[side] = []
            for spec in specs:
                idx, problem = resolve(spec, lines)
                if problem:
                    findings.append(AllowProblem(path, entry.reason, f"{side}/{path}: {problem}"))
                    broken = True
                else:
                    named[side].extend(idx)
        excused[TORCH].update(named[TORCH])
        excused[PADDLE].update(named[PADDLE])
        if broken:
            continue
        t = [n for n in (normalise(torch_lines[i]) for i in sorted(set(named[TORCH]))) if n is not None]
        p = [n for n in (normalise(paddle_lines[i]) for i in sorted(set(named[PADDLE]))) if n is not None]
        if t == p:
            findings.append(AllowProblem(path, entry.reason, "not needed any more: its lines read the same on both "
                                                             "sides"))

    def kept(lines, side):
        return [(i + 1, raw, n) for i, raw in enumerate(lines)
                if i not in excused[side] and (n := normalise(raw)) is not None]

    tk, pk = kept(torch_lines, TORCH), kept(paddle_lines, PADDLE)
    matcher = difflib.SequenceMatcher(None, [n for *_, n in tk], [n for *_, n in pk], autojunk=False)
    t_last = p_last = 0  # the last line seen on each side: where a one-sided line is anchored on the other
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            t_last, p_last = tk[i2 - 1][0], pk[j2 - 1][0]
            continue
        for t, p in _pair_up(tk[i1:i2], pk[j1:j2]):
            if t is not None and p is not None:
                findings.append(Difference(path, p[0], t[0], p[1], t[1]))
            elif t is not None:
                findings.append(Difference(path, p_last, t[0], None, t[1]))
            else:
                findings.append(Difference(path, p[0], t_last, p[1], None))
            t_last, p_last = (t or (t_last,))[0], (p or (p_last,))[0]
    return findings


def _pair_up(t: Sequence[tuple], p: Sequence[tuple], cutoff: float = 0.5) -> list:
    """Align the lines of one differing block, in order: the most similar pair first (as difflib.Differ does),
    then the parts before and after it; (line, None) / (None, line) for lines of one side only."""
    if not t or not p:
        return [(x, None) for x in t] + [(None, y) for y in p]
    best, bi, bj = cutoff, -1, -1
    sm = difflib.SequenceMatcher(autojunk=False)
    for j, y in enumerate(p):
        sm.set_seq2(y[2])
        for i, x in enumerate(t):
            sm.set_seq1(x[2])
            if sm.real_quick_ratio() > best and sm.quick_ratio() > best and sm.ratio() > best:
                best, bi, bj = sm.ratio(), i, j
    if bi < 0:  # nothing alike: the block was rewritten; pair it line by line
        n = min(len(t), len(p))
        return list(zip(t[:n], p[:n])) + [(x, None) for x in t[n:]] + [(None, y) for y in p[n:]]
    return _pair_up(t[:bi], p[:bj], cutoff) + [(t[bi], p[bj])] + _pair_up(t[bi + 1:], p[bj + 1:], cutoff)


def check_pair(root: Path, rel: str, allow: Sequence[Allow] = ALLOW) -> list:
    """Findings (differences and allow-list problems) of the twin pair at relative path `rel` under `root`."""
    root = Path(root)
    return compare_lines(rel, _read(root / TORCH / rel), _read(root / PADDLE / rel),
                         [a for a in allow if a.path == rel])


def check_tree(root: Path = ROOT, allow: Sequence[Allow] = ALLOW) -> list:
    """Findings of every twin pair under `root`, plus the allow-list entries whose path is no compared pair."""
    pairs = twin_pairs(root)
    findings: list = []
    for rel in pairs:
        findings.extend(check_pair(root, rel, allow))
    for entry in allow:
        if entry.path not in pairs:
            findings.append(AllowProblem(entry.path, entry.reason, "no compared twin pair has this path"))
    return findings


def main(argv: Optional[Sequence[str]] = None, allow: Sequence[Allow] = ALLOW) -> int:
    parser = argparse.ArgumentParser(description="Check the twin rule between torch_ref/ and paddle_impl/.")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    findings = check_tree(args.root, allow)
    for f in findings:
        print(f)
    pairs = len(twin_pairs(args.root))
    if findings:
        print(f"twin rule: {len(findings)} finding(s) over {pairs} twin pairs", file=sys.stderr)
        return 1
    print(f"twin rule: {pairs} twin pairs read alike", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
