"""logreg.py's figures from what logreg.npz holds: accuracy per epoch, the ROC curves, the confusion matrix.
Fixed margins: tight_layout would cost a third of the drawing time."""
import numpy as np

from lab.roc import multiclass_roc


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
    """Test and validation accuracy per epoch, and the epoch whose weights early stopping kept."""
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
