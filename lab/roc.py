"""ROC curves and their areas, from scratch in numpy (no library ROC): one binary problem, and
the one-vs-rest curves of a multi-class classifier with their micro and macro averages; and the
figures of a classifier's test predictions. tests/test_logreg.py checks them against sklearn.metrics."""
import math

import numpy as np


def roc_curve(y_true, score):
    """ROC of one binary problem: (fpr, tpr, thresholds).

    Thresholds are the distinct scores in decreasing order, preceded by +inf so
    that the curve starts at (0, 0); tied scores move the curve in one step
    (a diagonal segment), never in an order-dependent staircase. Every distinct
    score gives a point (no collinear points are dropped).
    """
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


def plot_roc(plt, labels, probs, suffix):
    """The ROC curves on linear axes, and with the false-positive rate on a log scale, where curves
    that all hug the corner come apart."""
    roc = multiclass_roc(labels, probs)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 6.0),
                             gridspec_kw=dict(left=0.055, right=0.985, bottom=0.09, top=0.89, wspace=0.16))
    low = 1.0 / max(len(labels) - np.bincount(labels, minlength=probs.shape[1]).max(), 1)   # the least FPR above 0
    macro = "macro avg" + (f" of {probs.shape[1] - len(roc['undefined'])} classes" if roc["undefined"] else "")
    names = [f"class {k}: AUC undefined ({roc['undefined'][k]})" if k in roc["undefined"]
             else f"class {k} (AUC {roc['per_class_auc'][k]:.4f})" for k in range(probs.shape[1])]
    for axis in axes:
        for k, (fpr, tpr) in enumerate(roc["per_class"]):
            axis.plot(fpr, tpr, lw=1, color=f"C{k}", label=names[k])
        axis.plot(*roc["micro"], lw=2.5, color="black", linestyle=":", label=f"micro avg (AUC {roc['micro_auc']:.4f})")
        axis.plot(*roc["macro"], lw=2.5, color="navy", linestyle="--", label=f"{macro} (AUC {roc['macro_auc']:.4f})")
        axis.plot([low, 1], [low, 1], color="lightgray", lw=1, linestyle="--", label="chance")
        axis.set(xlabel="false positive rate", ylabel="true positive rate", ylim=(0, 1.01))
        axis.grid(alpha=0.3)
    axes[0].set(xlim=(0, 1), title=f"One-vs-rest ROC, MNIST test set{suffix}")
    axes[1].set(xscale="log", xlim=(low, 1), title="the same, false positive rate on a log scale")
    axes[0].legend(fontsize=8, loc="lower right")
    return fig


def plot_confusion(plt, labels, probs, suffix):
    """The confusion matrix of the predicted classes, each cell's count written on it."""
    k, predicted = probs.shape[1], np.argmax(probs, axis=1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, predicted), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.8), gridspec_kw=dict(left=0.1, right=0.9, bottom=0.09, top=0.89))
    fig.colorbar(ax.imshow(cm, cmap="Blues"), ax=ax, fraction=0.046)
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, count, ha="center", va="center", fontsize=7, color="white" if count > cm.max() / 2 else "black")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=f"Confusion matrix, accuracy {np.mean(predicted == labels):.4f}{suffix}")
    return fig


def plot_history(plt, test_acc, val_acc, best_epoch, title):
    """Test and validation accuracy per epoch, and the epoch whose weights early stopping kept. Fixed
    margins here and below: tight_layout would cost a third of the drawing time."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), gridspec_kw=dict(left=0.11, right=0.97, bottom=0.11, top=0.86))
    epochs = np.arange(1, len(test_acc) + 1)
    ax.plot(epochs, test_acc, marker=".", label="test accuracy")
    if np.any(np.isfinite(val_acc)):
        ax.plot(epochs, val_acc, marker=".", linestyle="--", label="validation accuracy")
    if best_epoch != len(epochs):
        ax.axvline(best_epoch, color="gray", linestyle=":", label=f"kept: epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
