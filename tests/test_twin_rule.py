"""The twin rule on the real tree, and proof that its checker (tests/twin_rule.py) bites.

Every `torch_ref/**/*.py` with a same-path file under `paddle_impl/` must read alike line by line once the
framework vocabulary is spelled one way (twin_rule.VOCABULARY); the only other differences allowed are the entries of
twin_rule.ALLOW, each keyed by file and line fragments and carrying its reason. Two kinds of files are not compared:

* `layers.py` is the per-framework adapter layer: it exists so that the model files can be identical, and every line
  of it is a framework spelling, so a comparison would only list the whole file.
* package `__init__.py` files hold each tree's registry and re-exports (the Paddle tree also exposes engine, datasets
  and config, which have no torch counterpart) and change whenever a package is added; they carry no model code.

Text only: neither framework is imported, and the whole module runs in well under a second.
"""
from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import twin_rule as tr

PAIRS = tr.twin_pairs(tr.ROOT)


# ---------------------------------------------------------------------------------------------------------------
# The real tree
# ---------------------------------------------------------------------------------------------------------------

def test_the_expected_pairs_are_compared():
    expected = {"backbones/resnet.py", "models/danet.py", "models/psanet.py", "models/pspnet.py",
                "models/semseg.py", "ops/psa_mask.py", "losses.py", "metrics.py", "optim.py"}
    assert expected <= set(PAIRS), f"twin pairs missing from the check: {sorted(expected - set(PAIRS))}"
    assert "layers.py" not in PAIRS
    assert not [p for p in PAIRS if p.endswith("__init__.py")]


@pytest.mark.parametrize("rel", PAIRS)
def test_twin_pair_reads_alike(rel):
    differences = [f for f in tr.check_pair(tr.ROOT, rel) if isinstance(f, tr.Difference)]
    assert not differences, (f"{len(differences)} non-framework difference(s) between {tr.PADDLE}/{rel} and "
                             f"{tr.TORCH}/{rel}:\n" + "\n".join(map(str, differences)))


def test_allow_list_is_current():
    problems = [f for f in tr.check_tree(tr.ROOT) if isinstance(f, tr.AllowProblem)]
    assert not problems, "stale allow-list entries:\n" + "\n".join(map(str, problems))


def test_allow_entries_are_well_formed():
    for entry in tr.ALLOW:
        assert len(entry.reason) > 20, entry
        assert entry.torch or entry.paddle, entry
        assert isinstance(entry.torch, tuple) and isinstance(entry.paddle, tuple), entry


# ---------------------------------------------------------------------------------------------------------------
# The normalisation
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("torch_line, paddle_line", [
    ('"""Losses of the reference models (twin: paddle_impl/losses.py).',
     '"""Losses of the Paddle twins (twin: torch_ref/losses.py).'),
    ("from torch_ref.ops import psa_mask", "from paddle_impl.ops import psa_mask"),
    ("* pure-PyTorch gather", "* pure-Paddle gather"),
    ("op for PyTorch.", "op for PaddlePaddle."),
    ("    m = mask.to(torch.float64)", "    m = mask.astype(paddle.float64)"),
    ("    pred = torch.argmax(logits, dim=1)", "    pred = paddle.argmax(logits, axis=1)"),
    ("    y = torch.cat([a, b], dim=1)", "    y = paddle.concat([a, b], axis=1)"),
    ("import torch.nn.functional as F", "import paddle.nn.functional as F"),
])
def test_vocabulary_maps_both_spellings_to_one(torch_line, paddle_line):
    assert tr.normalise(torch_line) == tr.normalise(paddle_line)


def test_vocabulary_keeps_real_differences():
    assert tr.normalise("x.to(device)") != tr.normalise("x.astype(device)")  # only dtype casts are one spelling
    assert tr.normalise("align_corners=True") != tr.normalise("align_corners=False")
    assert tr.normalise("    x = 1") != tr.normalise("x = 1")  # indentation is structure
    assert tr.normalise("import torch") is None and tr.normalise("import paddle") is None
    assert tr.normalise("   ") is None


# ---------------------------------------------------------------------------------------------------------------
# It bites: inject non-framework differences into a temporary copy of a real Paddle twin
# ---------------------------------------------------------------------------------------------------------------

def _copy_pair(tmp_path: Path, rel: str) -> Path:
    for side in (tr.TORCH, tr.PADDLE):
        dst = tmp_path / side / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tr.ROOT / side / rel, dst)
    return tmp_path / tr.PADDLE / rel


def _line_of(lines, pattern: str) -> int:
    """1-based number of the first code line (not prose) matching the regex."""
    for i, line in enumerate(lines):
        if re.search(pattern, line) and not line.lstrip().startswith(("#", "*", '"')):
            return i + 1
    raise AssertionError(f"no line matches {pattern!r}")


def _new_findings(tmp_path: Path, rel: str, edit) -> list:
    """Findings the edit of the Paddle copy adds to those of the unedited pair (matched by their text, since an
    inserted or deleted line shifts the line numbers after it)."""
    paddle = _copy_pair(tmp_path, rel)
    before = tr.check_pair(tmp_path, rel)
    lines = paddle.read_text(encoding="utf-8").splitlines()
    edit(lines)
    paddle.write_text("\n".join(lines) + "\n", encoding="utf-8")
    after = tr.check_pair(tmp_path, rel)

    def key(f):
        return (type(f).__name__, f.paddle_text, f.torch_text) if isinstance(f, tr.Difference) else str(f)

    left = collections.Counter(map(key, before))
    new = []
    for f in after:
        if left[key(f)]:
            left[key(f)] -= 1
        else:
            new.append(f)
    return new


def test_bites_on_a_flipped_flag(tmp_path):
    rel = "models/pspnet.py"
    n = _line_of((tr.ROOT / tr.PADDLE / rel).read_text().splitlines(), r"align_corners=True")
    t = _line_of((tr.ROOT / tr.TORCH / rel).read_text().splitlines(), r"align_corners=True")

    def edit(lines):
        lines[n - 1] = lines[n - 1].replace("align_corners=True", "align_corners=False")

    new = _new_findings(tmp_path, rel, edit)
    assert len(new) == 1, new
    (d,) = new
    assert (d.path, d.paddle_line, d.torch_line) == (rel, n, t)
    assert "align_corners=False" in d.paddle_text and "align_corners=True" in d.torch_text
    assert str(d).startswith(f"paddle_impl/models/pspnet.py:{n} vs torch_ref/models/pspnet.py:{t}: ")


def test_bites_on_a_changed_constant(tmp_path):
    rel = "models/pspnet.py"
    n = _line_of((tr.ROOT / tr.PADDLE / rel).read_text().splitlines(), r"bn_momentum: float = 0\.1\b")
    t = _line_of((tr.ROOT / tr.TORCH / rel).read_text().splitlines(), r"bn_momentum: float = 0\.1\b")

    def edit(lines):
        lines[n - 1] = re.sub(r"bn_momentum: float = 0\.1\b", "bn_momentum: float = 0.2", lines[n - 1])

    new = _new_findings(tmp_path, rel, edit)
    assert [(d.paddle_line, d.torch_line) for d in new] == [(n, t)], new
    assert "0.2" in new[0].paddle_text and "0.1" in new[0].torch_text


def _adjacent_statements(lines) -> int:
    """1-based number of the first of two adjacent, distinct, simple statements at the same indentation."""
    simple = re.compile(r"^\s+[A-Za-z_][\w.]*(?:, [\w.]+)* = [^=].*[^:(\[{,\\]$")
    for i in range(len(lines) - 1):
        a, b = lines[i], lines[i + 1]
        if simple.match(a) and simple.match(b) and tr._indent(a) == tr._indent(b) and a.strip() != b.strip():
            return i + 1
    raise AssertionError("no two adjacent simple statements")


def test_bites_on_swapped_statements(tmp_path):
    rel = "models/pspnet.py"
    n = _adjacent_statements((tr.ROOT / tr.PADDLE / rel).read_text().splitlines())

    def edit(lines):
        lines[n - 1], lines[n] = lines[n], lines[n - 1]

    new = _new_findings(tmp_path, rel, edit)
    assert new, "a swap of two statements went unnoticed"
    assert all(isinstance(d, tr.Difference) for d in new)
    assert {d.paddle_line for d in new} <= {n, n + 1}, new
    assert {d.torch_line for d in new} <= {n - 1, n, n + 1}, new


def test_bites_on_a_deleted_statement_next_to_allowed_differences(tmp_path):
    rel = "optim.py"  # a pair with allow-list entries all around
    paddle_lines = (tr.ROOT / tr.PADDLE / rel).read_text().splitlines()
    n = _line_of(paddle_lines, r"^\s+optimizer\.step\(\)$")
    t = _line_of((tr.ROOT / tr.TORCH / rel).read_text().splitlines(), r"^\s+optimizer\.step\(\)$")

    def edit(lines):
        del lines[n - 1]

    new = _new_findings(tmp_path, rel, edit)
    assert len(new) == 1, new
    (d,) = new
    assert d.paddle_text is None and d.torch_line == t and d.paddle_line == n - 1  # it would follow `def step`
    assert str(d) == (f"paddle_impl/optim.py:{n - 1} vs torch_ref/optim.py:{t}: only in torch_ref "
                      f"(after paddle_impl line {n - 1}): optimizer.step()")


# ---------------------------------------------------------------------------------------------------------------
# The allow-list mechanics (synthetic files)
# ---------------------------------------------------------------------------------------------------------------

TORCH_SRC = ["import torch", "", "def f(x):", "    y = torch.ones([3])", "    return y + x", ""]
PADDLE_SRC = ["import paddle", "", "def f(x):", "    # why", "    y = paddle.full([3], 1.0)", "    return y + x"]
ENTRY = tr.Allow("m.py", "a reason long enough to be one",
                 torch=(tr.Line("y = torch.ones([3])"),), paddle=(tr.Span("# why", "paddle.full("),))


def test_an_allow_entry_excuses_its_lines():
    assert [type(f) for f in tr.compare_lines("m.py", TORCH_SRC, PADDLE_SRC)] == [tr.Difference] * 2
    assert tr.compare_lines("m.py", TORCH_SRC, PADDLE_SRC, [ENTRY]) == []


def test_an_allow_entry_that_matches_nothing_fails():
    paddle = [line.replace("# why", "# reason moved") for line in PADDLE_SRC]
    (problem, *rest) = tr.compare_lines("m.py", TORCH_SRC, paddle, [ENTRY])
    assert isinstance(problem, tr.AllowProblem) and "'# why' not found" in problem.message
    assert all(isinstance(f, tr.Difference) for f in rest) and rest  # the unexcused lines are reported too


def test_an_allow_entry_that_is_no_longer_needed_fails():
    paddle = ["import paddle", "def f(x):", "    # why", "    y = paddle.ones([3])", "    return y + x"]
    torch = ["import torch", "def f(x):", "    # why", "    y = torch.ones([3])", "    return y + x"]
    entry = tr.Allow("m.py", "a reason long enough to be one",
                     torch=(tr.Span("# why", "torch.ones("),), paddle=(tr.Span("# why", "paddle.ones("),))
    (problem,) = tr.compare_lines("m.py", torch, paddle, [entry])
    assert isinstance(problem, tr.AllowProblem) and "not needed" in problem.message


def test_an_ambiguous_fragment_fails_and_within_disambiguates():
    torch = ["def f():", "    g()", "def h():", "    g()"]
    paddle = ["def f():", "    g()", "def h():", "    k = g()"]
    ambiguous = tr.Allow("m.py", "a reason long enough to be one", torch=(tr.Line("g()"),),
                         paddle=(tr.Line("k = g()"),))
    scoped = tr.Allow("m.py", "a reason long enough to be one", torch=(tr.Line("g()", within="def h("),),
                      paddle=(tr.Line("k = g()"),))
    problems = [f for f in tr.compare_lines("m.py", torch, paddle, [ambiguous]) if isinstance(f, tr.AllowProblem)]
    assert len(problems) == 1 and "on 2 lines (2, 4)" in problems[0].message
    assert tr.compare_lines("m.py", torch, paddle, [scoped]) == []


def test_an_allow_entry_for_a_file_that_is_no_pair_fails(tmp_path):
    (tmp_path / tr.TORCH).mkdir()
    (tmp_path / tr.PADDLE).mkdir()
    (problem,) = tr.check_tree(tmp_path, [tr.Allow("gone.py", "a reason long enough to be one",
                                                   paddle=(tr.Line("x"),))])
    assert isinstance(problem, tr.AllowProblem) and "no compared twin pair" in problem.message


def test_excluded_files_are_not_pairs(tmp_path):
    for side in (tr.TORCH, tr.PADDLE):
        for rel in ("layers.py", "__init__.py", "models/__init__.py", "models/m.py"):
            (tmp_path / side / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / side / rel).write_text(f"# {side}\n")
    assert tr.twin_pairs(tmp_path) == ["models/m.py"]


# ---------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------

def _tree(tmp_path: Path, paddle_body: str) -> Path:
    for side, body in ((tr.TORCH, "y = torch.cat([a, b], dim=1)\n"), (tr.PADDLE, paddle_body)):
        (tmp_path / side).mkdir(parents=True)
        (tmp_path / side / "m.py").write_text(f"import {side.split('_')[0]}\n{body}")
    return tmp_path


def test_main_exit_codes_and_output(tmp_path, capsys):
    clean = _tree(tmp_path / "clean", "y = paddle.concat([a, b], axis=1)\n")
    assert tr.main(["--root", str(clean)], allow=()) == 0
    assert capsys.readouterr().out == ""
    dirty = _tree(tmp_path / "dirty", "y = paddle.concat([b, a], axis=1)\n")
    assert tr.main(["--root", str(dirty)], allow=()) == 1
    assert capsys.readouterr().out == ("paddle_impl/m.py:2 vs torch_ref/m.py:2: paddle_impl: y = paddle.concat([b, a], "
                                       "axis=1)  |  torch_ref: y = torch.cat([a, b], dim=1)\n")


@pytest.mark.parametrize("how", [["tests/twin_rule.py"], ["-m", "tests.twin_rule"]])
def test_runs_as_a_script(how):
    findings = tr.check_tree(tr.ROOT)
    proc = subprocess.run([sys.executable, *how], cwd=tr.ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (1 if findings else 0), proc.stderr
    assert proc.stdout.splitlines() == [str(f) for f in findings]
