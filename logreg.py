"""Q2: multinomial logistic regression on the extracted features, and its ROC curves, from scratch in numpy.

    python logreg.py                # logreg.py's own, faster training (after the assignment's code)
    python logreg.py --reference    # the assignment's procedure: mlr, with BATCH_SIZE, LR and EPOCHS below
    python logreg.py --plot-only    # the figures again, from OUT/logreg.npz

Reads OUT/mnist_{train,test}.mat; writes OUT/logreg_metrics.json, OUT/logreg.npz and three figures.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import lab.cli

if __name__ == "__main__":   # before numpy loads: the BLAS thread count is read then
    lab.cli.one_blas_thread_unless_set()

import numpy as np  # noqa: E402

from lab.cli import (ArgumentParser, UserError, add_common_args, positive_float,  # noqa: E402
                     positive_int, run_main)
from lab.files import (atomic_path, check_can_create, ensure_writable_dir, plan_outputs, reading,  # noqa: E402
                       write_json)
from lab.machine import versions  # noqa: E402
from lab.plots import pyplot, save_figure  # noqa: E402
from lab.roc import multiclass_roc  # noqa: E402

# The assignment's settings: what `logreg.py --reference` trains with.
BATCH_SIZE = 64
LR = 0.001
EPOCHS = 1000     # at most; mlr stops sooner when an epoch moves theta by less than TOL
TOL = 1e-10
NUM_CLASSES = 10


# --------------------------------------------------------------------- the assignment's functions

def get_one_hot(labels):
    """m labels (e.g. the 1 x m row that loadmat returns) -> m x 10 one-hot."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    onehot = np.zeros((labels.size, NUM_CLASSES))
    onehot[np.arange(labels.size), labels] = 1.0
    return onehot


def logits(X, theta):
    """Class scores. theta is (d + 1) x 10: unlike the assignment's, its last row is a bias."""
    return X @ theta[:-1] + theta[-1]


def log_softmax(z):
    """Row-wise log-softmax; subtracting the row maximum keeps exp() from overflowing."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def loss_and_gradient(X, L, theta, l2=0.0):
    """Mean softmax cross-entropy of the batch (+ l2/2 |W|^2, the bias excluded) and its gradient."""
    log_p = log_softmax(logits(X, theta))
    loss = -np.sum(L * log_p) / len(X)
    delta = (np.exp(log_p) - L) / len(X)
    grad = np.empty_like(theta)
    grad[:-1] = X.T @ delta
    grad[-1] = delta.sum(axis=0)
    if l2:
        loss += 0.5 * l2 * np.sum(theta[:-1] ** 2)
        grad[:-1] += l2 * theta[:-1]
    return loss, grad


def apply_gradients(X, L, theta, lr, l2=0.0, momentum=0.0, velocity=None):
    """One gradient-descent step on the batch (X, L): the new theta. The default training adds an L2
    penalty and Nesterov momentum: the gradient is taken at the look-ahead point theta + momentum *
    velocity, and ``velocity`` (the previous step) is updated in place."""
    ahead = theta if velocity is None else theta + momentum * velocity
    step = -lr * loss_and_gradient(X, L, ahead, l2)[1]
    if velocity is not None:
        step += momentum * velocity
        velocity[...] = step
    return theta + step


def mlr(trfeature, tr_onehot, tefeature, te_onehot, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, seed=0, log=None):
    """The assignment's training loop; returns theta. ``log(epoch, theta, test_acc)`` records each
    epoch (default: a History of the training rows). The assignment's batches, X[i:i + BATCH_SIZE - 1],
    dropped a row each; here every row counts."""
    log = log or History(trfeature, tr_onehot)
    te_labels = np.argmax(te_onehot, axis=1)
    theta = 0.001 * np.random.default_rng(seed).standard_normal((trfeature.shape[1] + 1, NUM_CLASSES))
    for epoch in range(1, epochs + 1):
        theta_old = theta
        for i in range(0, trfeature.shape[0], batch_size):
            theta = apply_gradients(trfeature[i:i + batch_size], tr_onehot[i:i + batch_size], theta, lr)
        log(epoch, theta, accuracy(tefeature, te_labels, theta))
        moved = np.linalg.norm(theta - theta_old)
        if moved == 0:
            raise UserError(f"theta did not change in epoch {epoch}: nothing trains")
        if moved < TOL:
            break
    return theta


def accuracy(X, y, theta):
    return float(np.mean(np.argmax(logits(X, theta), axis=1) == y))


# --------------------------------------------------------------------- what each epoch reports

# An epoch's mean loss (nats) beyond which a run has diverged. Training starts near ln(10); a loss L
# needs logit gaps of about L, and past 2**24 the float32 rounding of the features alone moves a logit
# by more than a nat: the probabilities are round-off, not a model.
DIVERGED_LOSS = 2.0 ** 24


class Diverged(UserError):
    """The training diverged; ``history`` holds the epochs before that one."""

    def __init__(self, epoch, history, loss):
        what = f"reached {loss:.3g}, beyond {DIVERGED_LOSS:.3g}" if math.isfinite(loss) else "is no longer finite"
        super().__init__(f"the training diverged at epoch {epoch}: its mean loss {what}; lower --lr")
        self.epoch, self.history = epoch, history


class History(dict):
    """Each epoch's numbers, from the theta it ended with: the training loss, validation and test
    accuracy, and the seconds since training began. A diverging loss raises Diverged."""

    def __init__(self, X, L, rows=None, val=(None, ()), l2=0.0, bar=None, on_epoch=None):
        super().__init__(train_loss=[], val_acc=[], test_acc=[], seconds=[])
        self.X, self.L, self.val, self.l2, self.bar, self.on_epoch = X, L, val, l2, bar, on_epoch
        self.rows = np.ones(len(X), bool) if rows is None else np.isin(np.arange(len(X)), rows)
        self.start = time.perf_counter()

    def __call__(self, epoch, theta, test_acc):
        loss = 0.0   # the training rows' mean loss, 4096 rows at a time
        for s in range(0, len(self.X), 4096):
            row_loss = -np.sum(self.L[s:s + 4096] * log_softmax(logits(self.X[s:s + 4096], theta)), axis=1)
            loss += row_loss[self.rows[s:s + 4096]].sum(dtype=np.float64)
        loss = float(loss / self.rows.sum() + 0.5 * self.l2 * np.sum(theta[:-1] ** 2, dtype=np.float64))
        if not loss < DIVERGED_LOSS:   # NaN compares False
            raise Diverged(epoch, self, loss)
        self["train_loss"].append(loss)
        self["val_acc"].append(accuracy(*self.val, theta) if len(self.val[1]) else math.nan)
        self["test_acc"].append(test_acc)
        self["seconds"].append(time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.4f}", test=f"{test_acc:.4f}")
        if self.on_epoch:
            self.on_epoch(epoch)


# --------------------------------------------------------------------- logreg.py's own training

@dataclass(frozen=True)
class TrainConfig:
    """One training run, as the flags set it and logreg.npz records it. Its defaults are the
    default training's, the one place they are set; for_mode("reference") gives the assignment's."""
    mode: str = "default"
    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.05             # the peak of a cosine schedule down to 0
    l2: float = 1e-3             # on the weights, not the bias
    val_fraction: float = 0.1    # training rows held out: early stopping (reference: only reported)
    momentum: float = 0.9        # Nesterov
    patience: int = 6            # epochs without validation gain before stopping
    seed: int = 0

    @classmethod
    def for_mode(cls, mode="default", **values):
        """The mode's defaults, replaced by the ``values`` that are not None."""
        base = {} if mode == "default" else dict(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, l2=0.0,
                                                  val_fraction=0.0, momentum=None, patience=None)
        return cls(mode=mode, **{**base, **{k: v for k, v in values.items() if v is not None}})

    @property
    def reference(self):
        return self.mode == "reference"


def split_validation(n, val_fraction, rng):
    """(training rows, validation rows), each in file order: a seeded random share held out."""
    order = rng.permutation(n)
    n_val = int(round(val_fraction * n))
    if n_val >= n:
        raise UserError(f"--val-fraction {val_fraction} leaves no training rows: it holds out "
                        f"{n_val} of the {n} training samples; lower it")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def standardize(X, mean, scale, out=None, chunk=4096):
    """X / scale - mean / scale in float32, a chunk of rows at a time (no overflow for any float32 X);
    ``out=X`` overwrites a float32 X."""
    out = np.empty(X.shape, np.float32) if out is None else out
    for s in range(0, len(X), chunk):
        np.multiply(X[s:s + chunk], (1 / scale).astype(np.float32), out=out[s:s + chunk])
        out[s:s + chunk] -= (mean / scale).astype(np.float32)
    return out


def fit_standardize(X, copy=True, chunk=4096):
    """Standardize with X's own statistics, taken in float64: (X as float32, mean, scale). A column whose
    spread is zero or lost in round-off (random-init features have such) keeps scale 1."""
    mean = X.mean(axis=0, dtype=np.float64)
    squares = sum(np.einsum("ij,ij->j", d, d) for d in (X[s:s + chunk] - mean for s in range(0, len(X), chunk)))
    std = np.sqrt(squares / len(X))
    scale = np.where(std <= 1e-6 * np.maximum(np.abs(mean), np.finfo(np.float32).tiny), 1.0, std)
    in_place = not copy and X.dtype == np.float32 and X.flags.c_contiguous
    return standardize(X, mean, scale, out=X if in_place else None), mean, scale


def train(X, L, X_te, L_te, config, progress=False, copy=True, on_epoch=None):
    """Train as ``config`` says: the reference mode calls mlr, the default mode train_default. Returns a
    dict: theta, mean/scale (None in reference mode), history, epochs_run, best_epoch, config, test_probs.
    copy=False lets the default training standardize a float32 X in place."""
    from tqdm import tqdm

    rng = np.random.default_rng(config.seed)
    rows, val = split_validation(len(X), config.val_fraction, rng)
    y, y_te = np.argmax(L, axis=1), np.argmax(L_te, axis=1)
    X_te, mean, scale = X_te.astype(np.float64), None, None   # float64 test probabilities: the ROC needs them
    bar = tqdm(total=config.epochs, desc=f"logreg ({config.mode})", unit="epoch", disable=not progress)
    with bar, np.errstate(over="ignore", invalid="ignore"):   # a diverging run raises Diverged
        if config.reference:   # float64, as the assignment's float32 features times its float64 theta
            X_tr, X_val = X[rows].astype(np.float64), X[val].astype(np.float64)
            hist = History(X_tr, L[rows], val=(X_val, y[val]), bar=bar, on_epoch=on_epoch)
            theta = mlr(X_tr, L[rows], X_te, L_te, config.epochs, config.batch_size, config.lr, config.seed, hist)
            best_epoch = len(hist["test_acc"])
        else:
            X, mean, scale = fit_standardize(X, copy=copy)
            X_te = (X_te - mean) / scale
            L = L.astype(np.float32)
            hist = History(X, L, rows, (X[val], y[val]), config.l2, bar, on_epoch)
            theta, best_epoch = train_default(X, L, rows, X_te.astype(np.float32), y_te, config, rng, hist)
    return {"theta": theta, "mean": mean, "scale": scale, "history": hist, "epochs_run": len(hist["test_acc"]),
            "best_epoch": best_epoch, "config": config, "test_probs": np.exp(log_softmax(logits(X_te, theta)))}


def train_default(X, L, rows, X_te, y_te, config, rng, log):
    """Nesterov-momentum mini-batch SGD on standardized features, its lr decayed to 0 along a cosine,
    early stopping on the validation rows: (the best validation epoch's theta, that epoch)."""
    theta = np.zeros((X.shape[1] + 1, NUM_CLASSES), dtype=X.dtype)   # convex: zeros is as good as any
    velocity = np.zeros_like(theta)
    total_steps, step = config.epochs * -(-len(rows) // config.batch_size), 0
    best_acc, best_epoch, best_theta = -1.0, 0, theta
    for epoch in range(1, config.epochs + 1):
        perm = rows[rng.permutation(len(rows))]
        for i in range(0, len(rows), config.batch_size):
            rate = 0.5 * config.lr * (1.0 + math.cos(math.pi * step / total_steps))   # a Python float keeps float32
            idx = perm[i:i + config.batch_size]
            theta = apply_gradients(X[idx], L[idx], theta, rate, config.l2, config.momentum, velocity)
            step += 1
        log(epoch, theta, accuracy(X_te, y_te, theta))
        if math.isnan(log["val_acc"][-1]) or log["val_acc"][-1] > best_acc:   # no validation rows: the last
            best_acc, best_epoch, best_theta = log["val_acc"][-1], epoch, theta
        elif epoch - best_epoch >= config.patience:
            break
    return best_theta.astype(np.float64), best_epoch


# --------------------------------------------------------------------- inputs and outputs

# The metadata that defines the features: train and test must agree on each.
PROVENANCE_KEYS = ("weights", "weights_kind", "network", "preprocessing", "image_size", "dtype", "seed")
METADATA_KEYS = PROVENANCE_KEYS + ("pretrained", "feature_dim", "torch_version", "torchvision_version",
                                   "elapsed_seconds")


def load_features(path):
    """Features (float32, m x d, rows contiguous), labels (m) and metadata of one .mat."""
    import scipy.io as sio

    with reading(path, "features"):
        mat = sio.loadmat(path)
        features, labels = mat["features"], mat["labels"].reshape(-1)
        meta = {k: np.squeeze(mat[k]).tolist() for k in METADATA_KEYS if k in mat}
    if (features.ndim != 2 or not len(features) or features.dtype.kind not in "fiu" or labels.size != len(features)
            or not np.isin(labels, np.arange(NUM_CLASSES)).all()):
        raise UserError(f"{path!r}: features must be real numbers, m x d with m >= 1, and labels 0-{NUM_CLASSES - 1}, "
                        f"one per row; it holds {features.dtype} features {features.shape} and {labels.size} labels")
    with np.errstate(over="ignore", invalid="ignore"):   # beyond float32's range becomes infinite here
        features = np.ascontiguousarray(features, dtype=np.float32)
        if not np.isfinite(features.sum(axis=0, dtype=np.float64)).all():   # one pass, no m x d mask
            raise UserError(f"{path!r}: features contain NaN or infinite values, or values beyond "
                            f"float32's range ({np.finfo(np.float32).max:.3g})")
    return features, labels.astype(np.int64), {"weights": "unknown", **meta, "feature_dim": features.shape[1]}


def load_pair(train_path, test_path):
    """Train and test features, which must come from the same extraction settings."""
    X_tr, y_tr, meta_tr = load_features(train_path)
    X_te, y_te, meta_te = load_features(test_path)
    for key in ("feature_dim",) + PROVENANCE_KEYS:
        if meta_tr.get(key) != meta_te.get(key):
            raise UserError(f"train and test features differ in {key}: {meta_tr.get(key)!r} in {train_path!r}, "
                            f"{meta_te.get(key)!r} in {test_path!r}; extract both with the same settings, "
                            f"e.g. rm -f {train_path!r} {test_path!r} && make features")
    return X_tr, y_tr, X_te, y_te, {"train": meta_tr, "test": meta_te}


def is_random_init(meta):
    """Features from random-init weights (a .pth file, weights_kind "file", is not, nor known pretrained)."""
    if "weights_kind" in meta:
        return meta["weights_kind"] == "random-init"
    return str(meta.get("weights", "")).lower().startswith(("random", "none"))


def describe(meta):
    """The features as titles and log lines name them: their network and weights, RANDOM-INIT said loudly."""
    network = meta.get("network", "ResNet-50")
    if is_random_init(meta):
        return f"features from RANDOM-INIT {network} weights (not pretrained)"
    return f"{network} weights: {meta['weights']}"


def save_npz(path, result, y_te, provenance):
    hist, d = result["history"], result["theta"].shape[0] - 1
    arrays = {"theta": result["theta"], "test_probs": result["test_probs"], "test_labels": y_te,
              "mean": np.zeros(d) if result["mean"] is None else result["mean"],
              "scale": np.ones(d) if result["scale"] is None else result["scale"],
              "epoch_seconds": hist["seconds"], "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
              **{key: hist[key] for key in ("train_loss", "val_acc", "test_acc")},
              # JSON strings, so that np.load never needs allow_pickle
              "config_json": json.dumps(asdict(result["config"])), "provenance_json": json.dumps(provenance)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a file object: savez adds no ".npz"
        np.savez(f, **arrays)


def finite_or_none(value):
    """A number for JSON, which has no NaN: None (null) instead."""
    return float(value) if math.isfinite(value) else None


def metrics(result, y_te, roc, provenance, seconds):
    n_defined = NUM_CLASSES - len(roc["undefined"])
    undefined = {str(k): f"{why}: a one-vs-rest ROC needs both classes, so its AUC is undefined (null) and the "
                         f"macro average is over the other {n_defined} classes" for k, why in roc["undefined"].items()}
    return {"test_accuracy": float(np.mean(np.argmax(result["test_probs"], axis=1) == y_te)),
            "auc": {"per_class": {str(k): finite_or_none(v) for k, v in enumerate(roc["per_class_auc"])},
                    "macro": finite_or_none(roc["macro_auc"]), "micro": finite_or_none(roc["micro_auc"]),
                    "undefined": undefined},
            "epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"], "seconds": seconds,
            "weights": provenance["train"]["weights"], "random_init_weights": is_random_init(provenance["train"]),
            "config": asdict(result["config"]), "provenance": provenance, "versions": versions()}


# --------------------------------------------------------------------- figures

FIGURES = ("logreg_test_accuracy.png", "roc.png", "confusion_matrix.png")


def draw(npz_path, figures_dir):
    """The figures, from what logreg.npz holds (no training): what --plot-only redraws. All three are
    drawn before any is written."""
    plt = pyplot()
    with reading(npz_path, "logreg"):
        with np.load(npz_path, allow_pickle=False) as z:
            data = {key: z[key] for key in z.files}
        reference = TrainConfig(**json.loads(str(data["config_json"]))).reference
        suffix = "\n" + describe(json.loads(str(data["provenance_json"]))["train"])
        labels = data["test_labels"]
        probs = data["test_probs"].reshape(len(labels), NUM_CLASSES)
        # Fixed margins instead of tight_layout, which costs a third of the drawing time here.
        fig, ax = plt.subplots(figsize=(6.4, 4.4), gridspec_kw=dict(left=0.11, right=0.97, bottom=0.11, top=0.86))
        epochs = np.arange(1, len(data["test_acc"]) + 1)
        ax.plot(epochs, data["test_acc"], marker=".", label="test accuracy")
        if np.any(np.isfinite(data["val_acc"])):
            ax.plot(epochs, data["val_acc"], marker=".", linestyle="--", label="validation accuracy")
        if data["best_epoch"] != len(epochs):   # early stopping kept an earlier epoch's weights
            ax.axvline(data["best_epoch"], color="gray", linestyle=":", label=f"kept: epoch {data['best_epoch']}")
        ax.set(xlabel="epoch", ylabel="accuracy",
               title=f"Logistic regression ({'reference procedure' if reference else 'default training'}){suffix}")
        ax.grid(alpha=0.3)
        ax.legend()
        figures = [fig, plot_roc(plt, labels, probs, suffix)]
        predicted = np.argmax(probs, axis=1)
        cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        np.add.at(cm, (labels, predicted), 1)
        fig, ax = plt.subplots(figsize=(6.4, 5.8), gridspec_kw=dict(left=0.1, right=0.9, bottom=0.09, top=0.89))
        fig.colorbar(ax.imshow(cm, cmap="Blues"), ax=ax, fraction=0.046)
        for (i, j), count in np.ndenumerate(cm):
            color = "white" if count > cm.max() / 2 else "black"
            ax.text(j, i, count, ha="center", va="center", fontsize=7, color=color)
        ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted", ylabel="true",
               title=f"Confusion matrix, accuracy {np.mean(predicted == labels):.4f}{suffix}")
    ensure_writable_dir(figures_dir)
    for name, fig in zip(FIGURES, figures + [fig]):
        print(f"wrote {save_figure(fig, os.path.join(figures_dir, name), tight=False)}")


def plot_roc(plt, labels, probs, suffix):
    """The ROC curves on linear axes, and with the false-positive rate on a log scale, where curves
    that all hug the corner come apart."""
    roc = multiclass_roc(labels, probs)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 6.0),
                             gridspec_kw=dict(left=0.055, right=0.985, bottom=0.09, top=0.89, wspace=0.16))
    low = 1.0 / max(len(labels) - np.bincount(labels, minlength=NUM_CLASSES).max(), 1)   # the least FPR above 0
    macro = "macro avg" + (f" of {NUM_CLASSES - len(roc['undefined'])} classes" if roc["undefined"] else "")
    names = [f"class {k}: AUC undefined ({roc['undefined'][k]})" if k in roc["undefined"]
             else f"class {k} (AUC {roc['per_class_auc'][k]:.4f})" for k in range(NUM_CLASSES)]
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


# --------------------------------------------------------------------- command line

def add_io_args(parser, writes):
    """The input and output flags, shared with sweep_logreg.py; ``writes`` names what OUT gets."""
    parser.add_argument("--train-mat", default="artifacts/mnist_train.mat", help="training features (.mat)")
    parser.add_argument("--test-mat", default="artifacts/mnist_test.mat", help="test features (.mat)")
    parser.add_argument("--out-dir", default="artifacts", help=f"where {writes} go (OUT)")
    parser.add_argument("--figures-dir", default="figures", help="where the PNG figures go (FIGURES)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def settings(config):
    return ", ".join(f"{k} {v}" for k, v in asdict(config).items() if v is not None and k not in ("mode", "seed"))


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=f"A flag left out takes the mode's default: "
                       f"{settings(TrainConfig())}; with --reference: {settings(TrainConfig.for_mode('reference'))}. "
                       "Other settings: TrainConfig in logreg.py.")
    add_io_args(p, "logreg.npz and logreg_metrics.json")
    p.add_argument("--epochs", type=positive_int, help="maximum epochs")
    p.add_argument("--batch-size", type=positive_int, help="mini-batch size")
    p.add_argument("--lr", type=positive_float, help="learning rate (the default training's peak)")
    p.add_argument("--val-fraction", type=float, help="share of the training set held out for validation: "
                   "early stopping in the default training, only reported with --reference")
    add_common_args(p, "seed", seed={"help": "seed of the split, shuffling and initialization"})
    p.add_argument("--reference", action="store_true", help="the assignment's procedure: mlr on the raw "
                   "features, stopping when an epoch moves theta by less than TOL")
    p.add_argument("--plot-only", action="store_true", help="only redraw the figures from OUT/logreg.npz")
    args = p.parse_args(argv)
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    return args


def main(argv=None):
    args = parse_args(argv)
    npz_path, metrics_path = (os.path.join(args.out_dir, name) for name in ("logreg.npz", "logreg_metrics.json"))
    figure_paths = [os.path.join(args.figures_dir, name) for name in FIGURES]
    if args.plot_only:
        plan_outputs(figure_paths)
        return draw(npz_path, args.figures_dir)
    t0 = time.perf_counter()
    config = TrainConfig.for_mode("reference" if args.reference else "default", epochs=args.epochs, seed=args.seed,
                                  batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction)
    X_tr, y_tr, X_te, y_te, provenance = load_pair(args.train_mat, args.test_mat)
    for path in (args.out_dir, args.figures_dir):   # fail before training, create nothing yet
        check_can_create(path)
    # The metrics first, then the npz (Make's target, so it must come last of the two), then figures.
    plan_outputs([metrics_path, npz_path, *figure_paths])
    meta, random_init = provenance["train"], is_random_init(provenance["train"])
    if random_init:
        print(f"WARNING: {describe(meta)}; accuracy and AUC say little about transfer learning")
    print(f"train {X_tr.shape}, test {X_te.shape}, {meta.get('network', 'ResNet-50')} features, "
          f"weights {meta['weights']}, {'reference procedure' if config.reference else 'default training'}")
    t1 = time.perf_counter()
    result = train(X_tr, get_one_hot(y_tr), X_te, get_one_hot(y_te), config, not args.no_progress, copy=False)
    t_train = time.perf_counter() - t1
    roc = multiclass_roc(y_te, result["test_probs"])
    m = metrics(result, y_te, roc, provenance, {"train": t_train, "total": time.perf_counter() - t0})
    write_json(metrics_path, m)
    save_npz(npz_path, result, y_te, provenance)
    draw(npz_path, args.figures_dir)
    print(f"wrote {metrics_path} and {npz_path}")
    macro = "undefined" if m["auc"]["macro"] is None else f"{m['auc']['macro']:.5f}"
    if roc["undefined"]:
        macro += f" (over {NUM_CLASSES - len(roc['undefined'])} classes: {'; '.join(roc['undefined'].values())})"
    print(f"test accuracy {m['test_accuracy']:.4f} (epoch {result['best_epoch']} of {result['epochs_run']} run), "
          f"macro AUC {macro}, micro AUC {roc['micro_auc']:.5f}, trained in {t_train:.1f} s, weights "
          f"{meta['weights']}" + ("  [RANDOM-INIT features]" if random_init else ""))


if __name__ == "__main__":
    run_main(main)
