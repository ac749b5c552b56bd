"""ROC curves and their areas, from scratch in numpy (no library ROC): one binary problem, and
the one-vs-rest curves of a multi-class classifier with their micro and macro averages.
tests/test_logreg.py checks them against sklearn.metrics."""
import math

import numpy as np


def roc_curve(y_true, score):
    """ROC of one binary problem: (fpr, tpr, thresholds). The thresholds are +inf (the curve starts at
    (0, 0)), then every distinct score in decreasing order: tied scores move the curve in one diagonal
    step, never in an order-dependent staircase."""
    y_true = np.asarray(y_true).reshape(-1).astype(bool)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if y_true.shape != score.shape:
        raise ValueError("y_true and score must have the same length")
    order = np.argsort(-score, kind="stable")
    score, y_true = score[order], y_true[order]
    # last index of each run of equal scores: the curve's points
    ends = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
    tps = np.cumsum(y_true)[ends].astype(np.float64)
    fps = (ends + 1) - tps
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):   # one class absent: nan, as sklearn
        tpr = tps / tps[-1]
        fpr = fps / fps[-1]
    return fpr, tpr, np.r_[np.inf, score[ends]]


def auc(x, y):
    """Area under the curve (x, y) by the trapezoid rule; x must be monotonic."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = np.diff(x)
    direction = 1.0
    if np.any(dx < 0):
        if np.all(dx <= 0):
            direction = -1.0
        else:
            raise ValueError("auc needs x sorted (increasing or decreasing)")
    return direction * float(np.sum(dx * (y[1:] + y[:-1]) / 2.0))


def multiclass_roc(labels, probs):
    """One-vs-rest ROC per class, micro average (all class-score pairs pooled) and macro
    average (mean of per-class AUCs; curve = mean of the per-class curves interpolated on
    the union of their FPRs).

    A class that no test sample has (or that every one has) has no one-vs-rest ROC: its AUC is
    NaN, ``undefined`` maps it to the reason, and the macro average is over the other classes.
    """
    labels = np.asarray(labels).reshape(-1)
    onehot = (labels[:, None] == np.arange(probs.shape[1])).astype(np.float64)
    curves, aucs, undefined = [], [], {}
    for k in range(probs.shape[1]):
        fpr, tpr, _ = roc_curve(onehot[:, k], probs[:, k])
        curves.append((fpr, tpr))
        aucs.append(auc(fpr, tpr))
        positives = int(onehot[:, k].sum())
        if positives in (0, len(labels)):
            undefined[k] = f"{'no' if positives == 0 else 'every'} test sample is class {k}"
    defined = [k for k in range(len(curves)) if k not in undefined]
    micro_fpr, micro_tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    grid = np.unique(np.concatenate([curves[k][0] for k in defined] or [[0.0, 1.0]]))
    # np.interp on a curve with vertical jumps takes the upper tpr at the jump's fpr: fine on a grid
    macro_tpr = np.mean([np.interp(grid, *curves[k]) for k in defined] or [np.full(grid.shape, np.nan)], axis=0)
    return {
        "per_class": curves, "per_class_auc": aucs, "undefined": undefined,
        "micro": (micro_fpr, micro_tpr), "micro_auc": auc(micro_fpr, micro_tpr),
        "macro": (grid, macro_tpr),
        "macro_auc": float(np.mean([aucs[k] for k in defined])) if defined else math.nan,
    }
