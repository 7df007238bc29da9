"""Segmentation metrics (twin: torch_ref/metrics.py), computed with framework ops in float64.

confusion_matrix[t, p] counts pixels of true class t predicted as p (ignored pixels excluded). From it:
IoU_c = TP / (TP + FP + FN), precision_c = TP / (TP + FP), recall_c = TP / (TP + FN) (= per-class accuracy),
Dice_c = 2 TP / (2 TP + FP + FN), Acc = trace / total, mIoU/mAcc/mDice = means over classes present (TP+FN+FP > 0
for IoU/Dice, TP+FN > 0 for recall), Kappa = (p_o - p_e) / (1 - p_e).
"""
from __future__ import annotations

import paddle

from .layers import exact_divide


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255):
    """pred, target: int tensors of equal shape -> (num_classes, num_classes) int64."""
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"confusion_matrix: prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
    pred = pred.reshape([-1]).astype(paddle.int64)
    target = target.reshape([-1]).astype(paddle.int64)
    keep = target != ignore_index
    pred = pred[keep]
    target = target[keep]
    bad = (target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"confusion_matrix: labels/predictions outside [0, {num_classes}) other than "
                         f"ignore_index={ignore_index}")
    counts = paddle.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape([num_classes, num_classes])


def _safe_div(a, b):
    return paddle.where(b > 0, exact_divide(a, paddle.where(b > 0, b, paddle.ones_like(b))), paddle.zeros_like(a))


def _ordered_sum(v):
    """Left-to-right sum of a 1-D float64 tensor: the same IEEE operations in both frameworks, so the result is
    bit-identical (a library reduction may sum in any order and differ in the last bit)."""
    total = v[0]
    for i in range(1, int(v.shape[0])):
        total = total + v[i]
    return total


def _masked_mean(v, mask):
    m = mask.astype(paddle.float64)
    return _safe_div(_ordered_sum(v * m), _ordered_sum(m))


def metrics_from_confusion(cm) -> dict:
    """cm (C, C) int -> dict of float64 tensors (scalars and per-class vectors)."""
    cm = cm.astype(paddle.float64)
    tp = paddle.diagonal(cm)
    gt = cm.sum(1)
    pr = cm.sum(0)
    total = cm.sum()
    fp = pr - tp
    fn = gt - tp
    iou = _safe_div(tp, tp + fp + fn)
    precision = _safe_div(tp, pr)
    recall = _safe_div(tp, gt)
    dice = _safe_div(2 * tp, 2 * tp + fp + fn)
    present = (tp + fp + fn) > 0
    p_o = _safe_div(_ordered_sum(tp), total)
    p_e = _ordered_sum(_safe_div(gt, total) * _safe_div(pr, total))
    kappa = _safe_div(p_o - p_e, 1 - p_e)
    return {
        "confusion_matrix": cm.astype(paddle.int64),
        "mIoU": _masked_mean(iou, present),
        "Acc": p_o,
        "mAcc": _masked_mean(recall, gt > 0),
        "Kappa": kappa,
        "mDice": _masked_mean(dice, present),
        "IoU": iou,
        "precision": precision,
        "recall": recall,
        "Dice": dice,
    }


def evaluate(logits, target, num_classes: int, ignore_index: int = 255) -> dict:
    """logits (N, C, H, W) -> metrics of argmax over C against target (N, H, W)."""
    pred = paddle.argmax(logits, axis=1)
    return metrics_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))
