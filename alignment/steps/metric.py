"""Step `metric`: the evaluation metrics of both twins.

1. The two metric implementations are fed IDENTICAL predictions (the torch model's argmax, and a second seeded random
   prediction map) and the labels; confusion matrix, mIoU, Acc, mAcc, Kappa, mDice and per-class IoU / precision /
   recall / Dice must agree EXACTLY (integer counts; float64 ratios of the same integers).
2. Each twin's OWN eval predictions are compared: a pixel may only disagree where the torch logits have a near tie
   (top-1 minus top-2 below twice the forward step's largest logit difference); any other disagreement fails.
"""
from __future__ import annotations

import numpy as np

import paddle_impl.metrics as pmetrics
import torch_ref.metrics as tmetrics

from ..compare import compare
from ..context import Context, StepResult
from .common import eval_outputs


def _metric_pair(ctx: Context, res: StepResult, prefix: str, pred: np.ndarray) -> None:
    import paddle
    import torch

    cm_t = tmetrics.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(ctx.labels), ctx.num_classes,
                                     ctx.ignore_index)
    cm_p = pmetrics.confusion_matrix(paddle.to_tensor(pred), paddle.to_tensor(ctx.labels), ctx.num_classes,
                                     ctx.ignore_index)
    m_t = tmetrics.metrics_from_confusion(cm_t)
    m_p = pmetrics.metrics_from_confusion(cm_p)
    for k in m_t:
        a = m_p[k].numpy()
        b = m_t[k].numpy()
        res.paddle_log[f"{prefix}/{k}"] = a
        res.torch_log[f"{prefix}/{k}"] = b
        res.results.append(compare(a, b, key=f"{prefix}/{k}", rtol=0.0, atol=0.0,
                                   reason="metrics of identical predictions must be bit-identical"))


def run(ctx: Context) -> StepResult:
    res = StepResult("metric")
    out_t, out_p = eval_outputs(ctx)
    lt = out_t[0].numpy()
    lp = out_p[0].numpy()
    pred_t = lt.argmax(1).astype(np.int64)
    pred_p = lp.argmax(1).astype(np.int64)
    _metric_pair(ctx, res, "torch_pred", pred_t)
    rng = np.random.default_rng(ctx.seed + 7)
    _metric_pair(ctx, res, "random_pred", rng.integers(0, ctx.num_classes, size=ctx.labels.shape).astype(np.int64))
    # 2. own predictions: disagreements only at near ties.
    srt = np.sort(lt, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    tie_tol = 2.0 * float(np.abs(lt - lp).max())
    disagree = pred_t != pred_p
    not_tie = disagree & (gap > tie_tol)
    res.torch_log["own_pred"] = pred_t
    res.paddle_log["own_pred"] = pred_p
    res.notes.append(f"own predictions: {int(disagree.sum())} of {disagree.size} pixels differ "
                     f"({int(not_tie.sum())} outside near ties, tie tolerance {tie_tol:.3g})")
    r = compare(np.where(not_tie, pred_p, pred_t), pred_t, key="own_pred (outside near ties)", rtol=0.0, atol=0.0,
                reason="argmax may flip only where the top-2 logit gap is below twice the forward max difference")
    res.results.append(r)
    return res
