"""Q2: multinomial logistic regression on the extracted features, and its ROC curves, from scratch in numpy;
reads OUT/mnist_{train,test}.mat, writes OUT/logreg_metrics.json, OUT/logreg.npz and three figures.

    python logreg.py                # logreg.py's own, faster training (after the assignment's code)
    python logreg.py --reference    # the assignment's procedure: mlr, with BATCH_SIZE, LR and EPOCHS below
    python logreg.py --plot-only    # the figures again, from OUT/logreg.npz
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

from lab.cli import ArgumentParser, UserError, add_common_args, fraction, positive_float, positive_int, run_main  # noqa
from lab.features import describe, is_random_init, load_pair  # noqa: E402
from lab.files import atomic_path, check_can_create, ensure_writable_dir, plan_outputs, reading, write_json  # noqa: E402
from lab.machine import versions  # noqa: E402
from lab.plots import pyplot, save_figure  # noqa: E402
from lab.logreg_figures import plot_confusion, plot_history, plot_roc  # noqa: E402
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
        log(epoch, theta, accuracy(logits(tefeature, theta), te_labels))
        moved = np.linalg.norm(theta - theta_old)
        if moved == 0:
            raise UserError(f"theta did not change in epoch {epoch}: nothing trains")
        if moved < TOL:
            break
    return theta


def accuracy(scores, y):
    return float(np.mean(np.argmax(scores, axis=1) == y))


# --------------------------------------------------------------------- what each epoch reports

# An epoch's mean loss (nats) beyond which a run has diverged. Training starts near ln(10); a loss L
# needs logit gaps of about L, and past 2**24 the float32 rounding of the features alone moves a logit
# by more than a nat: the probabilities are round-off, not a model.
DIVERGED_LOSS = 2.0 ** 24


class Diverged(UserError):
    """The training diverged; ``history`` holds the epochs before that one."""

    def __init__(self, epoch, history, loss):
        super().__init__(f"the training diverged at epoch {epoch}: its mean loss is {loss:.3g}; lower --lr")
        self.epoch, self.history = epoch, history


class History(dict):
    """Each epoch's numbers, from the theta it ended with (not Nesterov's look-ahead point): the mean loss
    of X's first n rows (the training rows), the accuracy of the others (validation) and of the test set,
    and the seconds since training began. A diverging loss raises Diverged."""

    def __init__(self, X, L, n=None, l2=0.0, bar=None, on_epoch=None):
        super().__init__(train_loss=[], val_acc=[], test_acc=[], seconds=[])
        self.X, self.L, self.n, self.l2, self.bar, self.on_epoch = X, L, len(X) if n is None else n, l2, bar, on_epoch
        self.start = time.perf_counter()

    def __call__(self, epoch, theta, test_acc):
        z = logits(self.X, theta)   # one product for both the loss and the validation accuracy
        loss = -np.sum(self.L[:self.n] * log_softmax(z[:self.n]), dtype=np.float64) / self.n
        loss = float(loss + 0.5 * self.l2 * np.sum(theta[:-1] ** 2, dtype=np.float64))
        if not loss < DIVERGED_LOSS:   # NaN compares False
            raise Diverged(epoch, self, loss)
        self["train_loss"].append(loss)
        self["val_acc"].append(accuracy(z[self.n:], self.L[self.n:].argmax(axis=1)) if self.n < len(z) else math.nan)
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
    """One training run, as the flags set it and logreg.npz records it: the default training's defaults,
    the one place they are set; for_mode("reference") gives the assignment's."""
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
        base = {} if mode == "default" else dict(epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, l2=0.0,
                                                  val_fraction=0.0, momentum=None, patience=None)
        return cls(mode=mode, **{**base, **{k: v for k, v in values.items() if v is not None}})


def split_validation(n, val_fraction, rng):
    """(training rows, validation rows), each in file order: a seeded random share held out."""
    order = rng.permutation(n)
    n_val = int(round(val_fraction * n))
    if n_val >= n:
        raise UserError(f"--val-fraction {val_fraction} leaves no training rows: it holds out "
                        f"{n_val} of the {n} training samples; lower it")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def standardize(X, mean, scale, out=None):
    """(X - mean) / scale in float32, as X / scale - mean / scale: no overflow for any float32 X.
    ``out=X`` overwrites a float32 X."""
    out = np.multiply(X, (1 / scale).astype(np.float32), out=out, dtype=np.float32)
    out -= (mean / scale).astype(np.float32)
    return out


def statistics(X, chunk=512):
    """The mean and scale of X's columns. The sums are float64 (squares of float32 features can overflow
    float32), in one pass: E[x^2] - mean^2 then loses less than the float32 rounding of the features did. A
    column whose spread is that small or zero (random-init features have such) keeps scale 1."""
    sums = np.zeros((2, X.shape[1]))
    for s in range(0, len(X), chunk):
        block = X[s:s + chunk].astype(np.float64)
        sums += block.sum(axis=0), np.einsum("ij,ij->j", block, block)
    mean = sums[0] / len(X)
    std = np.sqrt(np.maximum(sums[1] / len(X) - mean ** 2, 0))
    return mean, np.where(std <= 1e-6 * np.maximum(np.abs(mean), np.finfo(np.float32).tiny), 1.0, std)


def train(X, L, X_te, L_te, config, progress=False, on_epoch=None):
    """Train as ``config`` says: the reference mode calls mlr, the default mode train_default. Returns a
    dict: theta, mean/scale (0/1 in reference mode), history, epochs_run, best_epoch, config, test_probs.
    Both train on a copy of X that holds the n training rows first, then the validation rows."""
    from tqdm import tqdm

    rng = np.random.default_rng(config.seed)
    rows, val = split_validation(len(X), config.val_fraction, rng)
    y_te, n, mean, scale = np.argmax(L_te, axis=1), len(rows), np.zeros(X.shape[1]), np.ones(X.shape[1])
    bar = tqdm(total=config.epochs, desc=f"logreg ({config.mode})", unit="epoch", disable=not progress)
    with bar, np.errstate(over="ignore", invalid="ignore"):   # a diverging run raises Diverged
        if config.mode == "reference":   # float64, as the assignment's float32 features times its float64 theta
            order = np.concatenate([rows, val])
            X, L, X_te = X[order].astype(np.float64), L[order], X_te.astype(np.float64)
            hist = History(X, L, n, bar=bar, on_epoch=on_epoch)
            theta = mlr(X[:n], L[:n], X_te, L_te, config.epochs, config.batch_size, config.lr, config.seed, hist)
            best_epoch = len(hist["test_acc"])
        else:   # the training rows shuffled once: each batch is a slice, not a gather
            order = np.concatenate([rng.permutation(rows), val])
            mean, scale = statistics(X)
            X, X_te, L = X[order], standardize(X_te, mean, scale), L[order].astype(np.float32)
            standardize(X, mean, scale, out=X)
            hist = History(X, L, n, config.l2, bar, on_epoch)
            theta, best_epoch = train_default(X, L, n, X_te, y_te, config, rng, hist)
        test_probs = np.exp(log_softmax(logits(X_te.astype(np.float64), theta)))   # float64: the ROC needs them
    return {"theta": theta, "mean": mean, "scale": scale, "history": hist, "epochs_run": len(hist["test_acc"]),
            "best_epoch": best_epoch, "config": config, "test_probs": test_probs}


def train_default(X, L, n, X_te, y_te, config, rng, log):
    """Nesterov-momentum mini-batch SGD on the first n rows, each epoch its batches in a new order, its lr
    decayed to 0 along a cosine, early stopping on the validation rows: (the best epoch's theta, that epoch)."""
    theta = np.zeros((X.shape[1] + 1, NUM_CLASSES), dtype=X.dtype)   # convex: zeros is as good as any
    velocity = np.zeros_like(theta)
    starts = np.arange(0, n, config.batch_size)
    total_steps, step = config.epochs * len(starts), 0
    best_acc, best_epoch, best_theta = -1.0, 0, theta
    for epoch in range(1, config.epochs + 1):
        for i in rng.permutation(starts):
            rate = 0.5 * config.lr * (1.0 + math.cos(math.pi * step / total_steps))   # a Python float keeps float32
            batch = slice(i, min(i + config.batch_size, n))
            theta = apply_gradients(X[batch], L[batch], theta, rate, config.l2, config.momentum, velocity)
            step += 1
        log(epoch, theta, accuracy(logits(X_te, theta), y_te))
        if math.isnan(log["val_acc"][-1]) or log["val_acc"][-1] > best_acc:   # no validation rows: the last
            best_acc, best_epoch, best_theta = log["val_acc"][-1], epoch, theta
        elif epoch - best_epoch >= config.patience:
            break
    return best_theta.astype(np.float64), best_epoch


# --------------------------------------------------------------------- outputs

def save_npz(path, result, y_te, provenance):
    hist = result["history"]
    arrays = {**{key: result[key] for key in ("theta", "test_probs", "mean", "scale", "best_epoch", "epochs_run")},
              **{key: hist[key] for key in ("train_loss", "val_acc", "test_acc")}, "epoch_seconds": hist["seconds"],
              "test_labels": y_te,
              # JSON strings, so that np.load never needs allow_pickle
              "config_json": json.dumps(asdict(result["config"])), "provenance_json": json.dumps(provenance)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a file object: savez adds no ".npz"
        np.savez(f, **arrays)


def finite_or_none(value):   # JSON has no NaN: null instead
    return float(value) if math.isfinite(value) else None


def metrics(result, y_te, roc, provenance, seconds):
    # A class absent from the test set (or the only one) has no one-vs-rest ROC: its AUC is null, and the
    # macro average is over the other classes.
    return {"test_accuracy": float(np.mean(np.argmax(result["test_probs"], axis=1) == y_te)),
            "auc": {"per_class": {str(k): finite_or_none(v) for k, v in enumerate(roc["per_class_auc"])},
                    "macro": finite_or_none(roc["macro_auc"]), "micro": finite_or_none(roc["micro_auc"]),
                    "undefined": {str(k): why for k, why in roc["undefined"].items()}},
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
        mode = TrainConfig(**json.loads(str(data["config_json"]))).mode
        suffix = "\n" + describe(json.loads(str(data["provenance_json"]))["train"])
        labels = data["test_labels"]
        probs = data["test_probs"].reshape(len(labels), NUM_CLASSES)
        title = f"Logistic regression ({mode} training){suffix}"
        figures = [plot_history(plt, data["test_acc"], data["val_acc"], data["best_epoch"], title),
                   plot_roc(plt, labels, probs, suffix), plot_confusion(plt, labels, probs, suffix)]
    ensure_writable_dir(figures_dir)
    for name, fig in zip(FIGURES, figures):
        print(f"wrote {save_figure(fig, os.path.join(figures_dir, name), tight=False)}")


# --------------------------------------------------------------------- command line

def add_io_args(parser, writes):   # shared with sweep_logreg.py
    parser.add_argument("--train-mat", default="artifacts/mnist_train.mat", help="training features (.mat)")
    parser.add_argument("--test-mat", default="artifacts/mnist_test.mat", help="test features (.mat)")
    parser.add_argument("--out-dir", default="artifacts", help=f"where {writes} go (OUT)")
    parser.add_argument("--figures-dir", default="figures", help="where the PNG figures go (FIGURES)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="A flag left out takes the mode's default "
                       "(TrainConfig in logreg.py; --reference: BATCH_SIZE, LR, EPOCHS).")
    add_io_args(p, "logreg.npz and logreg_metrics.json")
    p.add_argument("--epochs", type=positive_int, help="maximum epochs")
    p.add_argument("--batch-size", type=positive_int, help="mini-batch size")
    p.add_argument("--lr", type=positive_float, help="learning rate (the default training's peak)")
    p.add_argument("--val-fraction", type=fraction, help="share of the training set held out for validation: "
                   "early stopping in the default training, only reported with --reference")
    add_common_args(p, "seed", seed={"help": "seed of the split, shuffling and initialization"})
    p.add_argument("--reference", action="store_true", help="the assignment's procedure: mlr on the raw "
                   "features, stopping when an epoch moves theta by less than TOL")
    p.add_argument("--plot-only", action="store_true", help="only redraw the figures from OUT/logreg.npz")
    return p.parse_args(argv)


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
          f"weights {meta['weights']}, {config.mode} training")
    t1 = time.perf_counter()
    result = train(X_tr, get_one_hot(y_tr), X_te, get_one_hot(y_te), config, not args.no_progress)
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
