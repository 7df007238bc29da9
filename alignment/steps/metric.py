"""Step `metric`: the evaluation metrics of both twins.

1. The two metric implementations are fed IDENTICAL predictions and labels; confusion matrix, mIoU, Acc, mAcc,
   Kappa, mDice and per-class IoU / precision / recall / Dice must agree EXACTLY (integer counts; float64 ratios of
   the same integers). The pairs fed are:
     - `torch_pred`:  the torch model's argmax on the batch;
     - `random_pred`: a seeded random prediction map on the batch;
     - four deterministic edge cases (`edge_*`, see `edge_cases`) that random maps on a big image never produce
       (every class is then present in both labels and predictions, so averaging over the wrong class set, or a
       dropped last class, goes unnoticed): a class predicted but absent from the labels (plus a class absent from
       both), a labelled class never predicted, a whole image of `ignore_index`, and the last class `C - 1`.
2. Each twin's OWN eval predictions are compared: a pixel may only disagree where the torch logits of the two
   chosen classes are within what the FORWARD step's policy tolerance for the logits allows each of them to move,
     torch[c_torch] - torch[c_paddle] <= (atol + rtol*|torch[c_torch]|) + (atol + rtol*|torch[c_paddle]|),
   i.e. at most 2 * (atol + rtol * max|logit|) for the two logits. The tolerance is the policy's, never derived from
   the observed difference (a bigger bug must not buy itself a looser check). Any other disagreement fails.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

import paddle_impl.metrics as pmetrics
import torch_ref.metrics as tmetrics

from ..compare import CompareResult, compare
from ..context import Context, StepResult
from ..policy import Tolerance
from .common import eval_outputs

#: The forward step records the first eval output under this key; the tie tolerance is looked up for it.
FORWARD_LOGITS_KEY = "logits"
#: Fraction of pixels whose prediction is replaced by a wrong class in the edge cases.
NOISE = 0.3


def _metric_pair(ctx: Context, res: StepResult, prefix: str, pred: np.ndarray, labels: np.ndarray = None) -> None:
    """Feed the same (pred, labels) to both metric implementations and compare every output exactly.

    A Paddle implementation that raises on these (valid) inputs fails the pair under `<prefix>/error`; the torch
    reference raising is a broken harness input and propagates as a step error."""
    import paddle
    import torch

    labels = ctx.labels if labels is None else labels
    cm_t = tmetrics.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(labels), ctx.num_classes,
                                     ctx.ignore_index)
    m_t = tmetrics.metrics_from_confusion(cm_t)
    try:
        cm_p = pmetrics.confusion_matrix(paddle.to_tensor(pred), paddle.to_tensor(labels), ctx.num_classes,
                                         ctx.ignore_index)
        m_p = pmetrics.metrics_from_confusion(cm_p)
    except Exception as e:  # noqa: BLE001 - any crash on valid inputs is a failure of this pair
        res.results.append(CompareResult(key=f"{prefix}/error", passed=False, failure="error",
                                         detail=f"the Paddle metrics raised on valid inputs: {type(e).__name__}: {e}"))
        return
    for k in m_t:
        b = m_t[k].numpy()
        if k not in m_p:
            res.results.append(CompareResult(key=f"{prefix}/{k}", passed=False, failure="missing key",
                                             detail=f"the Paddle metrics return no {k!r}"))
            continue
        a = m_p[k].numpy()
        res.paddle_log[f"{prefix}/{k}"] = a
        res.torch_log[f"{prefix}/{k}"] = b
        res.results.append(compare(a, b, key=f"{prefix}/{k}", rtol=0.0, atol=0.0,
                                   reason="metrics of identical predictions must be bit-identical"))


# ------------------------------------------------------------------------------------------------ edge cases
def _wrong_class(rng: np.random.Generator, true: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """For each entry of `true`, a class drawn from `allowed` that differs from it (the entry itself when `allowed`
    holds no other class)."""
    out = allowed[rng.integers(0, allowed.size, size=true.shape)]
    same = out == true
    for _ in range(8):  # redraw collisions; a couple of rounds leave none in practice
        if not same.any():
            break
        out[same] = allowed[rng.integers(0, allowed.size, size=int(same.sum()))]
        same = out == true
    if same.any():  # deterministic fallback: the next allowed class after the true one
        others = [allowed[allowed != t] for t in true[same]]
        out[same] = [o[0] if o.size else t for o, t in zip(others, true[same])]
    return out


def _noisy(rng: np.random.Generator, labels: np.ndarray, allowed: np.ndarray, ignore_index: int,
           frac: float = NOISE) -> np.ndarray:
    """Predictions equal to `labels` except a `frac` of the pixels, which get a wrong class from `allowed`;
    ignored pixels get a random class from `allowed` (the model predicts something there too)."""
    pred = labels.copy()
    ign = labels == ignore_index
    flip = (rng.random(labels.shape) < frac) & ~ign
    pred[flip] = _wrong_class(rng, labels[flip], allowed)
    pred[ign] = allowed[rng.integers(0, allowed.size, size=int(ign.sum()))]
    return pred


def edge_cases(ctx: Context) -> List[Tuple[str, np.ndarray, np.ndarray, str]]:
    """Deterministic (name, pred, labels, what) cases for part 1, shaped like `ctx.labels`, seeded by `ctx.seed`.

    Each is chosen so that a specific wrong metric implementation changes at least one compared value:
      - `edge_pred_not_in_labels`: class `a` is predicted but never labelled (IoU 0, counts towards mIoU/mDice) and,
        with C >= 3, class `b` is neither labelled nor predicted (must NOT count): catches means over "classes in
        the labels" (drops `a`) and means over all C classes (adds `b`).
      - `edge_label_never_predicted`: class `m` is labelled but never predicted (IoU 0 and recall 0, counts towards
        mIoU, mDice and mAcc): catches means over "classes predicted".
      - `edge_ignored_image`: the batch's labels with one whole image set to `ignore_index` and the predictions
        there all in one class: catches ignored pixels counted anywhere (mask not applied, ignore clipped into
        the last class, ...).
      - `edge_last_class`: class C-1 labelled on ~30 % of the pixels and predicted exactly there, plus as a false
        positive: catches an off-by-one that drops the last class from the counts or from the means.
    """
    C = int(ctx.num_classes)
    ign = int(ctx.ignore_index)
    shape = tuple(ctx.labels.shape)
    n = int(np.prod(shape))
    everything = np.arange(C, dtype=np.int64)
    cases: List[Tuple[str, np.ndarray, np.ndarray, str]] = []
    if C < 2 or n == 0:  # no class can be absent, missed or "last" in a meaningful way
        return cases

    def gen(i: int) -> np.random.Generator:
        return np.random.default_rng([int(ctx.seed), 7919, i])

    # 1. a class predicted but absent from the labels (and one absent from both).
    rng = gen(1)
    perm = rng.permutation(C)
    a = int(perm[0])
    b = int(perm[1]) if C >= 3 else None
    label_classes = np.array([c for c in range(C) if c != a and c != b], dtype=np.int64)
    labels = label_classes[rng.integers(0, label_classes.size, size=shape)]
    pred_classes = np.array([c for c in range(C) if c != b], dtype=np.int64)
    pred = _noisy(rng, labels, pred_classes, ign)
    pred.reshape(-1)[rng.choice(n, size=max(1, n // 20), replace=False)] = a  # `a` certainly predicted
    cases.append(("edge_pred_not_in_labels", pred, labels,
                  f"class {a} predicted but not labelled" + (f", class {b} neither" if b is not None else "")))

    # 2. a class in the labels never predicted.
    rng = gen(2)
    m = int(rng.integers(0, C))
    labels = rng.integers(0, C, size=shape).astype(np.int64)
    labels.reshape(-1)[rng.choice(n, size=max(1, n // 20), replace=False)] = m  # `m` certainly labelled
    pred = _noisy(rng, labels, everything, ign)
    at_m = pred == m
    pred[at_m] = _wrong_class(rng, np.full(int(at_m.sum()), m, dtype=np.int64), everything)
    cases.append(("edge_label_never_predicted", pred, labels, f"class {m} labelled but never predicted"))

    # 3. the batch's labels with one whole image ignored; the model predicts one class all over it.
    rng = gen(3)
    j = int(rng.integers(0, shape[0]))
    labels = ctx.labels.astype(np.int64).copy()
    labels[j] = ign
    pred = _noisy(rng, labels, everything, ign)
    pred[j] = int(rng.integers(0, C))
    cases.append(("edge_ignored_image", pred, labels, f"image {j} entirely ignore_index={ign}"))

    # 4. the last class, labelled and predicted.
    rng = gen(4)
    last = C - 1
    labels = rng.integers(0, C, size=shape).astype(np.int64)
    labels[rng.random(shape) < 0.3] = last
    labels.reshape(-1)[0] = last
    pred = _noisy(rng, labels, everything, ign)
    pred[labels == last] = last  # every labelled last-class pixel predicted right; false positives stay
    cases.append(("edge_last_class", pred, labels, f"class {last} = num_classes - 1 labelled and predicted"))
    return cases


# ------------------------------------------------------------------------------------------------ near ties
def tie_tolerance(ctx: Context, dtype) -> Tolerance:
    """The forward step's policy tolerance for the eval logits (same model, step 'forward', key 'logits')."""
    return ctx.policy.lookup(ctx.name, "forward", FORWARD_LOGITS_KEY, dtype)


def own_prediction_check(ctx: Context, res: StepResult, lt: np.ndarray, lp: np.ndarray) -> Dict[str, object]:
    """Part 2: compare argmax(lt) (torch) with argmax(lp) (Paddle); a pixel may differ only at a policy near tie."""
    tol = tie_tolerance(ctx, lt.dtype)
    pred_t = lt.argmax(1).astype(np.int64)
    pred_p = lp.argmax(1).astype(np.int64)
    lt64 = lt.astype(np.float64)
    top_t = np.take_along_axis(lt64, pred_t[:, None], axis=1)[:, 0]  # torch logit of torch's class
    at_p = np.take_along_axis(lt64, pred_p[:, None], axis=1)[:, 0]  # torch logit of Paddle's class
    # Paddle can prefer its class only if both logits may move towards each other by the forward tolerance.
    allowed = (tol.atol + tol.rtol * np.abs(top_t)) + (tol.atol + tol.rtol * np.abs(at_p))
    disagree = pred_t != pred_p
    not_tie = disagree & ((top_t - at_p) > allowed)
    srt = np.sort(lt64, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    res.torch_log["own_pred"] = pred_t
    res.paddle_log["own_pred"] = pred_p
    rule = (f"near tie: torch[c_torch] - torch[c_paddle] <= 2*atol + rtol*(|torch[c_torch]| + |torch[c_paddle]|) "
            f"with the forward policy tolerance for {FORWARD_LOGITS_KEY!r} ({lt.dtype}): rtol={tol.rtol:.3g} "
            f"atol={tol.atol:.3g} [{tol.source}]")
    res.notes.append(f"own predictions: {int(disagree.sum())} of {disagree.size} pixels differ, "
                     f"{int(not_tie.sum())} outside near ties; {rule}; tolerance reason: {tol.reason}")
    res.notes.append(f"own predictions: {int((gap <= 2 * (tol.atol + tol.rtol * np.abs(srt[:, -1]))).sum())} "
                     f"pixels have a torch top-1/top-2 gap within the forward tolerance")
    res.results.append(compare(np.where(not_tie, pred_p, pred_t), pred_t, key="own_pred (outside near ties)",
                               rtol=0.0, atol=0.0, tolerance_source=f"forward/{FORWARD_LOGITS_KEY}: {tol.source}",
                               reason=f"argmax may flip only at a {rule}: {tol.reason}"))
    return {"rtol": tol.rtol, "atol": tol.atol, "source": tol.source, "disagree": int(disagree.sum()),
            "outside_ties": int(not_tie.sum())}


def run(ctx: Context) -> StepResult:
    res = StepResult("metric", dtype="float32")
    out_t, out_p = eval_outputs(ctx)
    lt = out_t[0].numpy()
    lp = out_p[0].numpy()
    pred_t = lt.argmax(1).astype(np.int64)
    # 1. identical predictions -> identical metrics.
    _metric_pair(ctx, res, "torch_pred", pred_t)
    rng = np.random.default_rng(ctx.seed + 7)
    _metric_pair(ctx, res, "random_pred", rng.integers(0, ctx.num_classes, size=ctx.labels.shape).astype(np.int64))
    for name, pred, labels, what in edge_cases(ctx):
        res.notes.append(f"{name}: {what}")
        _metric_pair(ctx, res, name, pred, labels)
    # 2. own predictions: disagreements only at near ties of the forward policy.
    own_prediction_check(ctx, res, lt, lp)
    return res
