"""Multinomial logistic regression and ROC curves on ResNet-50 features, from scratch in numpy.

Reads the .mat files written by extract_features.py (``features`` m x 2048,
``labels`` 1 x m), trains a softmax classifier, and writes
``OUT/logreg.npz`` (everything the figures need), ``OUT/logreg_metrics.json``
and three figures. Only numpy does the math; no library classifier and no
library ROC (the curves come from roc.py).

    python logreg.py                                  # artifacts/ -> artifacts/, figures/
    python logreg.py --reference                      # the assignment's own procedure
    python logreg.py --plot-only                      # re-render figures from logreg.npz

The default training is the fast route to the best test accuracy:
standardized features, shuffled mini-batches, Nesterov momentum, a cosine
learning-rate schedule, L2, and early stopping on a validation split carved
from the training set (the test set only ever gets reported, never used to choose).
"""
import json
import math
import os
import time
import zipfile
from dataclasses import asdict, dataclass
from typing import Optional

import lab.cli

if __name__ == "__main__":   # before numpy loads: the BLAS thread count is read then
    lab.cli.one_blas_thread_unless_set()

import numpy as np  # noqa: E402

from lab.cli import (ArgumentParser, UserError, add_common_args, nonnegative_float, positive_float,  # noqa: E402
                     positive_int, run_main)
from lab.files import atomic_path, check_can_create, ensure_writable_dir, plan_outputs, write_json  # noqa: E402
from lab.machine import versions  # noqa: E402
from lab.plots import pyplot, save_figure  # noqa: E402
from lab.roc import auc, multiclass_roc, roc_curve  # noqa: E402,F401  (logreg.roc_curve etc. stay importable)

NUM_CLASSES = 10
METADATA_KEYS = ("weights", "weights_kind", "pretrained", "preprocessing", "image_size", "dtype",
                 "torch_version", "torchvision_version", "elapsed_seconds")
# Defaults of the two training procedures; None on the command line means "the mode's default".
# An option that a mode does not use is None (the reference procedure has no momentum, no early
# stopping and no validation split).
MODE_DEFAULTS = {
    "default": {"epochs": 15, "batch_size": 256, "lr": 0.05, "l2": 1e-3, "val_fraction": 0.1,
                "momentum": 0.9, "patience": 6},
    "reference": {"epochs": 1000, "batch_size": 64, "lr": 0.001, "l2": 0.0, "val_fraction": 0.0,
                  "momentum": None, "patience": None},
}
REFERENCE_TOL = 1e-10   # the assignment stops when the parameter change falls below this


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run: what the command line builds, what ``train``
    takes, and what logreg.npz and logreg_metrics.json record. Build it with ``for_mode``."""
    mode: str                       # "default" (fast route) or "reference" (the assignment's loop)
    epochs: int
    batch_size: int
    lr: float
    l2: float
    val_fraction: Optional[float]   # share of the training set held out for validation
    momentum: Optional[float]       # Nesterov momentum (default mode only)
    patience: Optional[int]         # early-stopping patience in epochs (default mode only)
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODE_DEFAULTS:
            raise ValueError(f"mode must be one of {', '.join(MODE_DEFAULTS)}, got {self.mode!r}")
        for name in ("epochs", "batch_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (name != "seed"):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} "
                                 f"integer, got {value!r}")
        if not _is_number(self.lr) or not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _is_number(self.l2) or not 0 <= self.l2 < math.inf:
            raise ValueError(f"l2 must be a non-negative number, got {self.l2!r}")
        if not _is_number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.reference and (self.momentum, self.patience) != (None, None):
            raise ValueError("momentum and patience belong to the default training; "
                             "the reference procedure has neither")
        if not self.reference and not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not self.reference and not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"patience must be a positive integer, got {self.patience!r}")

    @classmethod
    def for_mode(cls, mode="default", **values):
        """The mode's defaults, replaced by those ``values`` that are not None."""
        if mode not in MODE_DEFAULTS:
            raise ValueError(f"mode must be one of {', '.join(MODE_DEFAULTS)}, got {mode!r}")
        chosen = {k: v for k, v in values.items() if v is not None}
        return cls(mode=mode, **{**MODE_DEFAULTS[mode], **chosen})

    @property
    def reference(self):
        return self.mode == "reference"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------- the assignment's functions

def get_one_hot(labels):
    """m labels (any shape, e.g. the 1 x m row vector loadmat returns) -> m x 10 one-hot float64."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}")
    onehot = np.zeros((labels.size, NUM_CLASSES))
    onehot[np.arange(labels.size), labels.astype(np.int64)] = 1.0
    return onehot


def logits(X, theta):
    """Class scores. theta is (d + 1) x 10: the last row is the bias, so X needs no ones column."""
    return X @ theta[:-1] + theta[-1]


def softmax(z):
    """Row-wise softmax; subtracting the row maximum keeps exp() from overflowing."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(z, L):
    """Mean softmax cross-entropy of scores z (n x 10, or k x n x 10 for k models) against the
    one-hot L (n x 10), and its gradient with respect to z. The loss is one number per model."""
    n = z.shape[-2]
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))   # log-softmax, stable
    loss = -np.sum(L * log_p, axis=(-2, -1)) / n
    return loss, (np.exp(log_p) - L) / n


def loss_and_gradient(X, L, theta, l2=0.0):
    """Mean softmax cross-entropy of the batch (+ l2/2 |W|^2, bias excluded) and its gradient."""
    loss, delta = cross_entropy(logits(X, theta), L)
    grad = np.empty_like(theta)
    grad[:-1] = X.T @ delta
    grad[-1] = delta.sum(axis=0)
    if l2:
        loss += 0.5 * l2 * np.sum(theta[:-1] ** 2)
        grad[:-1] += l2 * theta[:-1]
    return loss, grad


def apply_gradients(X, L, theta, lr, l2=0.0, momentum=0.0, velocity=None):
    """One step of gradient descent on the mean softmax cross-entropy. Returns (new theta, loss).

    Unlike the assignment's version, which takes a d x 10 theta and returns the new theta only,
    theta here has a bias row (the last, (d + 1) x 10), and the batch's loss comes back too, so
    that training can report it without a second forward pass. Both trainings step through here:
    the reference loop with the assignment's four arguments; the default training adds an L2
    penalty and Nesterov momentum, whose ``velocity`` (the previous step, updated in place) puts
    the gradient at the look-ahead point theta + momentum * velocity (the loss is taken there too).
    """
    ahead = theta if velocity is None else theta + momentum * velocity
    loss, grad = loss_and_gradient(X, L, ahead, l2)
    step = -lr * grad
    if velocity is not None:
        step += momentum * velocity
        velocity[...] = step
    return theta + step, loss


def predict_proba(X, theta, mean=None, scale=None, chunk=2048):
    """Test probabilities in float64 (the ROC needs them precise), standardizing if asked.
    Row chunks keep the float64 temporaries small."""
    theta = theta.astype(np.float64)
    out = np.empty((X.shape[0], theta.shape[1]))
    for start in range(0, X.shape[0], chunk):
        block = np.asarray(X[start:start + chunk], dtype=np.float64)
        if mean is not None:
            block = (block - mean) / scale
        out[start:start + chunk] = softmax(logits(block, theta))
    return out


def mlr(trfeature, tr_onehot, tefeature, te_onehot, config=None):
    """The assignment's ``mlr``: train, return the predicted test probabilities (m_test x 10).

    ``config`` is a TrainConfig (default: the default training). With a reference config it is
    the assignment's loop: apply_gradients(X, L, theta, lr) once per batch (see train).
    """
    config = config or TrainConfig.for_mode("default")
    return train(trfeature, tr_onehot, tefeature, te_onehot, config)["test_probs"]


# --------------------------------------------------------------------- training

def fit_standardize(X, chunk=4096, copy=True):
    """Standardize with the train statistics: returns (X standardized as float32, mean, scale).

    With copy=False a float32 X is standardized in place: the full training set
    is 0.5 GB, and a second copy of it is memory and time for nothing.

    The mean is accumulated in float64; the variance is taken of the centered
    copy chunk by chunk (float32 within a chunk, float64 across), which avoids
    float64 copies of the whole matrix. Random-init features have
    (near-)constant columns: a column whose spread is zero, or lost in the
    float32 round-off of its mean, keeps scale 1 so that dividing does not blow
    round-off noise up to unit variance.
    """
    n, d = X.shape
    mean, peak = np.zeros(d), np.zeros(d)
    for start in range(0, n, chunk):
        block = X[start:start + chunk]
        mean += block.sum(axis=0, dtype=np.float64)
        peak = np.maximum(peak, np.maximum(block.max(axis=0), -block.min(axis=0)))
    mean /= n
    shift = _unit_shift(peak)
    far = np.flatnonzero(shift != 1)
    if far.size:
        X = X.astype(np.float32, copy=copy)
        X[:, far] /= shift[far].astype(np.float32)
        copy = False
    center = mean / shift
    if copy or X.dtype != np.float32:
        Xs = np.subtract(X, center.astype(np.float32), dtype=np.float32)
    else:
        Xs = X
        Xs -= center.astype(np.float32)
    squares = np.zeros(d)
    for start in range(0, n, chunk):
        block = Xs[start:start + chunk]
        squares += np.einsum("ij,ij->j", block, block)
    std = np.sqrt(squares / n)
    flat = std <= 1e-6 * np.maximum(np.abs(center), np.finfo(np.float32).tiny)
    scale = np.where(flat, 1.0, std)
    Xs /= scale.astype(np.float32)
    return Xs, mean, scale * shift


def _unit_shift(size):
    """Per column, 1, or for a column whose size is far from 1 the power of two nearest it.

    Dividing by a power of two is exact in binary floating point, so standardizing the divided
    columns gives the same numbers, while the float32 centering and squares stay clear of
    overflow (1e30 squared is no float32) and underflow for any finite float32 input.
    """
    exponent = np.frexp(size)[1]
    return np.ldexp(1.0, np.where(np.abs(exponent) > 32, np.clip(exponent, -126, 127), 0))


def standardize(X, mean, scale, dtype=np.float32):
    """Apply train statistics to other data (validation, test): fit_standardize's arithmetic,
    so the same rows give the same numbers."""
    shift = _unit_shift(scale)
    far = np.flatnonzero(shift != 1)
    if far.size:
        X = X.astype(dtype)
        X[:, far] /= shift[far].astype(dtype)
    Xs = np.subtract(X, (mean / shift).astype(dtype), dtype=dtype)
    Xs /= (scale / shift).astype(dtype)
    return Xs


def accuracy(X, y, theta):
    return float(np.mean(np.argmax(logits(X, theta), axis=1) == y))


# An epoch's mean loss (nats) beyond which a run has diverged. Training starts near ln(10), the
# loss of a uniform guess; a loss L needs logit gaps of about L, and once they pass 2**24 the
# float32 rounding of the features alone moves a logit by more than a nat: the probabilities are
# round-off, not a model (lr 1e9 gives 1e13; an overshooting but finite lr of 10 gives about 1e5).
DIVERGED_LOSS = 2.0 ** 24


def diverged(loss):
    """True when an epoch's mean loss is no longer finite or beyond DIVERGED_LOSS."""
    return not loss < DIVERGED_LOSS   # NaN compares False


class Diverged(UserError):
    """The training diverged (see ``diverged``); ``history`` holds the epochs before that one."""

    def __init__(self, epoch, history, loss=math.nan, advice="lower --lr"):
        what = f"reached {loss:.3g}, beyond {DIVERGED_LOSS:.3g}" if math.isfinite(loss) else "is no longer finite"
        super().__init__(f"the training diverged at epoch {epoch}: its mean loss {what}; {advice}")
        self.epoch, self.history, self.loss = epoch, history, loss


def split_validation(n, val_fraction, rng):
    """(training rows, validation rows), each in file order; the validation rows are a seeded
    random share ``val_fraction`` of the n rows."""
    order = rng.permutation(n)
    n_val = int(round(val_fraction * n)) if val_fraction else 0
    if n_val >= n:
        raise UserError(f"--val-fraction {val_fraction} leaves no training rows: it holds out "
                        f"{n_val} of the {n} training samples; lower it")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train(trfeature, tr_onehot, tefeature, te_onehot, config, progress=False, copy=True, on_epoch=None):
    """Train as ``config`` (a TrainConfig) says and return a dict: theta, mean/scale (None in
    reference mode), per-epoch histories (train_loss, val_acc, test_acc, seconds), test_probs,
    epochs_run, best_epoch and the config. A diverging loss (see ``diverged``) raises Diverged.

    copy=False lets the default training standardize a float32 ``trfeature`` in place;
    ``on_epoch(epoch)``, if given, is called after each epoch.
    """
    start = time.perf_counter()   # per-epoch times count from here, standardization included
    y_te = np.argmax(te_onehot, axis=1)
    if config.reference:
        result = _train_reference(trfeature, tr_onehot, tefeature, y_te, config, progress, start, on_epoch)
        mean = scale = None
    else:
        X_std, mean, scale = fit_standardize(trfeature, copy=copy)
        with np.errstate(over="ignore", invalid="ignore"):   # a diverging run raises Diverged
            result = _train_fast(X_std, tr_onehot, standardize(tefeature, mean, scale), y_te, config,
                                 progress, start, on_epoch)
    result.update(mean=mean, scale=scale, config=config,
                  test_probs=predict_proba(tefeature, result["theta"], mean, scale))
    return result


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, unit="epoch", dynamic_ncols=True)


def _history():
    return {"train_loss": [], "val_acc": [], "test_acc": [], "seconds": []}


def _record(hist, train_loss, val_acc, test_acc, seconds):
    hist["train_loss"].append(float(train_loss))
    hist["val_acc"].append(float(val_acc))
    hist["test_acc"].append(float(test_acc))
    hist["seconds"].append(seconds)


@dataclass
class BestEpoch:
    """The epoch with the best validation accuracy so far, and its weights."""
    val_acc: float = -1.0
    epoch: int = 0
    theta: Optional[np.ndarray] = None


def _train_fast(X, L, X_te, y_te, config, progress, start, on_epoch):
    """Nesterov-momentum mini-batch SGD, cosine-decayed lr, early stopping on a validation split."""
    rng = np.random.default_rng(config.seed)
    epochs, batch_size, lr, l2 = config.epochs, config.batch_size, config.lr, config.l2
    momentum, patience = config.momentum, config.patience
    tr_idx, val_idx = split_validation(X.shape[0], config.val_fraction, rng)
    n_val = len(val_idx)
    X_val, y_val = X[val_idx], np.argmax(L[val_idx], axis=1)
    L = L.astype(X.dtype)
    n = len(tr_idx)   # batches index X through tr_idx: no copy of the training rows
    theta = np.zeros((X.shape[1] + 1, NUM_CLASSES), dtype=X.dtype)   # convex: zeros is as good as any
    velocity = np.zeros_like(theta)
    steps_per_epoch = -(-n // batch_size)
    total_steps, step = epochs * steps_per_epoch, 0
    hist, best = _history(), BestEpoch(theta=theta.copy())
    bar = _progress(range(1, epochs + 1), progress, "logreg")
    for epoch in bar:
        perm = tr_idx[rng.permutation(n)]
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            # cosine schedule from lr to 0 over the whole run, step by step
            rate = 0.5 * lr * (1.0 + math.cos(math.pi * step / total_steps))   # a Python float keeps float32
            theta, loss = apply_gradients(X[idx], L[idx], theta, rate, l2, momentum, velocity)
            loss_sum += float(loss) * len(idx)
            step += 1
        train_loss = loss_sum / n
        if diverged(train_loss):
            raise Diverged(epoch, hist, train_loss)
        val_acc = accuracy(X_val, y_val, theta) if n_val else float("nan")
        test_acc = accuracy(X_te, y_te, theta)
        _record(hist, train_loss, val_acc, test_acc, time.perf_counter() - start)
        if progress:
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_acc:.4f}", test=f"{test_acc:.4f}")
        if on_epoch:
            on_epoch(epoch)
        if n_val and val_acc > best.val_acc:
            best = BestEpoch(val_acc, epoch, theta.copy())
        elif n_val and epoch - best.epoch >= patience:
            break   # no validation gain for `patience` epochs
    if n_val:
        theta, best_epoch = best.theta, best.epoch
    else:
        best_epoch = epoch
    return {"theta": theta.astype(np.float64), "history": hist, "epochs_run": epoch,
            "best_epoch": best_epoch}


def _rows_float64(X, rows, chunk=4096):
    """X[rows] as a C-contiguous float64 copy, converted chunk by chunk (no float32 temporary)."""
    out = np.empty((len(rows), X.shape[1]))
    for start in range(0, len(rows), chunk):
        out[start:start + chunk] = X[rows[start:start + chunk]]
    return out


def _train_reference(X, L, X_te, y_te, config, progress, start, on_epoch=None):
    """The assignment's loop: raw features, theta ~ 0.001 randn, apply_gradients once per
    mini-batch over the training rows in file order, stop when one epoch moves theta by less
    than 1e-10 (Frobenius norm). ``on_epoch(epoch)``, if given, is called after each epoch.

    The assignment sliced ``X[i:i + BATCH_SIZE - 1]``, silently dropping the last sample of every
    batch; here every batch is ``X[i:i + batch_size]``, the last one shorter when n is not a
    multiple of the batch size. The math is float64, as in the assignment (float32 features times
    a float64 theta); the rows are converted once here rather than at every product.
    """
    rng = np.random.default_rng(config.seed)
    n_all, d = X.shape
    theta = 0.001 * rng.standard_normal((d + 1, NUM_CLASSES))
    tr_idx, val_idx = split_validation(n_all, config.val_fraction, rng)
    X_val, y_val = _rows_float64(X, val_idx), np.argmax(L[val_idx], axis=1)
    X, L = _rows_float64(X, tr_idx), np.asarray(L[tr_idx], dtype=np.float64)
    X_te = _rows_float64(X_te, np.arange(X_te.shape[0]))
    n, batch_size = X.shape[0], config.batch_size
    hist = _history()
    bar = _progress(range(1, config.epochs + 1), progress, f"logreg --reference, batch {batch_size}")
    with np.errstate(over="ignore", invalid="ignore"):   # a diverging run raises Diverged below
        for epoch in bar:
            before = theta
            loss_sum = 0.0
            for i in range(0, n, batch_size):
                X_b, L_b = X[i:i + batch_size], L[i:i + batch_size]
                theta, loss = apply_gradients(X_b, L_b, theta, config.lr, config.l2)
                loss_sum += loss * X_b.shape[0]   # the last, short batch weighs what it holds
            train_loss = loss_sum / n
            if diverged(train_loss) or not np.isfinite(theta).all():
                raise Diverged(epoch, hist, train_loss if np.isfinite(theta).all() else math.nan)
            val_acc = accuracy(X_val, y_val, theta) if len(X_val) else float("nan")
            _record(hist, train_loss, val_acc, accuracy(X_te, y_te, theta), time.perf_counter() - start)
            if progress:
                bar.set_postfix(loss=f"{train_loss:.4f}", test=f"{hist['test_acc'][-1]:.4f}")
            if on_epoch:
                on_epoch(epoch)
            if np.linalg.norm(theta - before) < REFERENCE_TOL:
                break
    return {"theta": theta, "history": hist, "epochs_run": epoch, "best_epoch": epoch}


# --------------------------------------------------------------------- inputs

def _meta_value(mat, key):
    value = np.squeeze(mat[key])
    if value.dtype.kind in "US":
        return str(value)
    return value.item() if value.size == 1 else value.tolist()


def _rows_contiguous_float32(features, tile=256):
    """loadmat returns MATLAB's column-major layout; mini-batches need rows contiguous. Copying
    tile by tile keeps both sides of the transpose in cache, where one np.ascontiguousarray
    strides through memory."""
    if features.flags.c_contiguous and features.dtype == np.float32:
        return features
    out = np.empty(features.shape, dtype=np.float32)
    for i in range(0, features.shape[0], tile):
        for j in range(0, features.shape[1], tile):
            out[i:i + tile, j:j + tile] = features[i:i + tile, j:j + tile]
    return out


def load_features(path, role):
    """Features (float32, m x d), labels (int64, m) and metadata of one .mat, checked."""
    import scipy.io as sio

    if os.path.isdir(path):
        raise UserError(f"{role} features {path!r} is a directory; give the .mat file")
    if not os.path.isfile(path):
        raise UserError(f"{role} features {path!r} not found; run `make features` first")
    try:
        mat = sio.loadmat(path)
    except Exception as exc:   # scipy raises several types for a damaged or foreign file
        raise UserError(f"cannot read {path!r} as a .mat file: {exc}") from None
    missing = [k for k in ("features", "labels") if k not in mat]
    if missing:
        raise UserError(f"{path!r} lacks the key(s) {', '.join(missing)}; "
                        "re-create it with `make features`")
    features, labels = mat["features"], mat["labels"]
    if features.ndim != 2:
        raise UserError(f"{path!r}: features must be 2-D (m x d), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.number) or np.iscomplexobj(features):
        raise UserError(f"{path!r}: features must be real numbers, got {features.dtype}")
    labels = labels.reshape(-1)
    if labels.size != features.shape[0]:
        raise UserError(f"{path!r}: {labels.size} labels for {features.shape[0]} feature rows")
    if features.shape[0] == 0:
        raise UserError(f"{path!r} holds no samples")
    if (not np.issubdtype(labels.dtype, np.number) or np.iscomplexobj(labels)
            or not np.all(np.isin(labels, np.arange(NUM_CLASSES)))):
        raise UserError(f"{path!r}: labels must be integers 0-{NUM_CLASSES - 1}")
    # Column sums in float64 are finite exactly when every feature is: NaN and infinities carry
    # through a sum, and float32 values cannot add up to a float64 overflow. (One pass, no
    # m x d boolean array.) A value beyond float32's range becomes an infinity here.
    with np.errstate(over="ignore", invalid="ignore"):
        features = _rows_contiguous_float32(features)
        finite = np.all(np.isfinite(features.sum(axis=0, dtype=np.float64)))
    if not finite:
        raise UserError(f"{path!r}: features contain NaN or infinite values, or values beyond "
                        f"float32's range ({np.finfo(np.float32).max:.3g})")
    meta = {k: _meta_value(mat, k) for k in METADATA_KEYS if k in mat}
    meta.setdefault("weights", "unknown")
    return features, labels.astype(np.int64), meta


def is_random_init(meta):
    """Features from random-init weights. A .pth file (weights_kind "file") is not random-init,
    but it is not known to be ImageNet either: its "pretrained" is 0 and titles name the file."""
    weights = str(meta.get("weights", "")).lower()
    if "weights_kind" in meta:
        return meta["weights_kind"] == "random-init"
    return weights.startswith("random") or weights == "none"


def load_pair(train_path, test_path):
    X_tr, y_tr, meta_tr = load_features(train_path, "train")
    X_te, y_te, meta_te = load_features(test_path, "test")
    if X_tr.shape[1] != X_te.shape[1]:
        raise UserError(f"train features have {X_tr.shape[1]} dimensions, test features "
                        f"{X_te.shape[1]}; extract both with the same model")
    if meta_tr["weights"] != meta_te["weights"]:
        raise UserError(f"train features come from weights {meta_tr['weights']!r}, test features "
                        f"from {meta_te['weights']!r}; run `make features` again")
    return X_tr, y_tr, X_te, y_te, {"train": meta_tr, "test": meta_te}


# --------------------------------------------------------------------- outputs

def save_npz(path, result, y_te, provenance):
    hist = result["history"]
    d = result["theta"].shape[0] - 1
    arrays = {
        "theta": result["theta"],
        "mean": result["mean"] if result["mean"] is not None else np.zeros(d),
        "scale": result["scale"] if result["scale"] is not None else np.ones(d),
        "train_loss": np.asarray(hist["train_loss"]), "val_acc": np.asarray(hist["val_acc"]),
        "test_acc": np.asarray(hist["test_acc"]), "epoch_seconds": np.asarray(hist["seconds"]),
        "test_probs": result["test_probs"], "test_labels": y_te,
        "best_epoch": np.array(result["best_epoch"]), "epochs_run": np.array(result["epochs_run"]),
        # JSON strings, so that np.load never needs allow_pickle
        "config_json": np.array(json.dumps(asdict(result["config"]))),
        "provenance_json": np.array(json.dumps(provenance)),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a file object: savez adds no ".npz"
        np.savez(f, **arrays)


NPZ_KEYS = {"theta", "mean", "scale", "train_loss", "val_acc", "test_acc", "epoch_seconds", "test_probs",
            "test_labels", "best_epoch", "epochs_run", "config_json", "provenance_json"}


def load_npz(path):
    """What save_npz wrote, checked: a damaged or foreign file is a UserError naming the problem."""
    if os.path.isdir(path):
        raise UserError(f"{path!r} is a directory, not logreg's .npz; move it away and run `make logreg`")
    if not os.path.isfile(path):
        raise UserError(f"{path!r} not found; run `make logreg` first")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":   # what every zip archive, hence every .npz, starts with
            raise UserError(f"{path!r} is not an .npz archive (not logreg's output); run `make logreg` again")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path!r} is damaged or not logreg's ({type(exc).__name__}: {exc}); "
                        "run `make logreg` again") from None
    missing = sorted(NPZ_KEYS - set(data))
    if missing:
        raise UserError(f"{path!r} lacks {', '.join(missing)} (written by another version?); "
                        "run `make logreg` again")
    problem = _npz_problem(data)
    if problem:
        raise UserError(f"{path!r}: {problem}; run `make logreg` again")
    return data


def _npz_problem(data):
    """None if logreg.npz's arrays fit together, else what is wrong. Replaces the JSON strings
    by ``config`` (a TrainConfig) and ``provenance``."""
    try:
        data["config"] = TrainConfig(**json.loads(str(data.pop("config_json"))))
    except (ValueError, TypeError) as exc:   # JSONDecodeError is a ValueError
        return f"its config_json is corrupt ({exc})"
    try:
        data["provenance"] = json.loads(str(data.pop("provenance_json")))
        str(data["provenance"]["train"]["weights"]), str(data["provenance"]["test"]["weights"])
    except (ValueError, TypeError, KeyError) as exc:
        return f"its provenance_json is corrupt ({type(exc).__name__}: {exc})"
    for key in NPZ_KEYS - {"config_json", "provenance_json"}:
        if data[key].dtype.kind not in "fiu":
            return f"{key} holds {data[key].dtype}, not numbers"
    theta, labels, epochs = data["theta"], data["test_labels"], data["epochs_run"]
    if theta.ndim != 2 or theta.shape[0] < 2 or theta.shape[1] != NUM_CLASSES:
        return f"theta has shape {theta.shape}, expected (d + 1) x {NUM_CLASSES}"
    if epochs.shape != () or not 1 <= epochs <= data["config"].epochs:
        return f"epochs_run is {epochs}, not a count in 1..{data['config'].epochs}"
    d, m, e = theta.shape[0] - 1, labels.shape[0], int(epochs)
    shapes = {"mean": (d,), "scale": (d,), "test_probs": (m, NUM_CLASSES), "test_labels": (m,),
              "train_loss": (e,), "val_acc": (e,), "test_acc": (e,), "epoch_seconds": (e,), "best_epoch": ()}
    for key, shape in shapes.items():
        if data[key].shape != shape:
            return f"{key} has shape {data[key].shape}, expected {shape} (theta is {theta.shape}, {e} epochs)"
    if m == 0 or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        return f"test_labels must be {NUM_CLASSES} classes 0-{NUM_CLASSES - 1}"
    if not np.all(np.isfinite(data["test_probs"])):
        return "test_probs holds NaN or infinite values"
    if not 1 <= data["best_epoch"] <= e:
        return f"best_epoch is {data['best_epoch']}, not in 1..{e}"
    return None


def finite_or_none(value):
    """A number for JSON: NaN and infinities, which JSON lacks, become None (null)."""
    value = float(value)
    return value if math.isfinite(value) else None


def metrics(result, y_te, roc, provenance, seconds):
    meta = provenance["train"]
    undefined = {str(k): f"{why}: a one-vs-rest ROC needs both classes, so its AUC is undefined "
                         f"(null) and the macro average is over the other {NUM_CLASSES - len(roc['undefined'])} "
                         "classes" for k, why in roc["undefined"].items()}
    return {
        "test_accuracy": float(np.mean(np.argmax(result["test_probs"], axis=1) == y_te)),
        "auc": {"per_class": {str(k): finite_or_none(v) for k, v in enumerate(roc["per_class_auc"])},
                "macro": finite_or_none(roc["macro_auc"]), "micro": finite_or_none(roc["micro_auc"]),
                "undefined": undefined},
        "epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
        "seconds": {"train": seconds["train"], "total": seconds["total"]},
        "weights": meta["weights"], "random_init_weights": is_random_init(meta),
        "config": asdict(result["config"]), "provenance": provenance, "versions": versions(),
    }


def title_suffix(provenance):
    meta = provenance["train"]
    if is_random_init(meta):
        return "\nfeatures from RANDOM-INIT ResNet-50 weights (not pretrained)"
    return f"\nResNet-50 weights: {meta['weights']}"


FIGURES = ("logreg_test_accuracy.png", "roc.png", "confusion_matrix.png")


def plot_all(data, figures_dir):
    """The three figures (FIGURES), from what logreg.npz holds (no training)."""
    plt = pyplot()
    ensure_writable_dir(figures_dir)
    suffix = title_suffix(data["provenance"])
    mode = "reference procedure" if data["config"].reference else "default training"
    path = lambda name: os.path.join(figures_dir, name)  # noqa: E731
    paths = []

    epochs = np.arange(1, len(data["test_acc"]) + 1)
    # Fixed margins instead of tight_layout, which costs a third of the drawing time here.
    fig, ax = plt.subplots(figsize=(6.4, 4.4), gridspec_kw=dict(left=0.11, right=0.97, bottom=0.11, top=0.86))
    ax.plot(epochs, data["test_acc"], marker=".", label="test accuracy")
    if np.any(np.isfinite(data["val_acc"])):
        ax.plot(epochs, data["val_acc"], marker=".", linestyle="--", label="validation accuracy")
    best = int(data["best_epoch"])
    if best != len(epochs):   # early stopping kept an earlier epoch's weights
        ax.axvline(best, color="gray", linestyle=":", label=f"kept: epoch {best} (best validation)")
    ax.set(xlabel="epoch", ylabel="accuracy", title=f"Logistic regression ({mode}){suffix}")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(save_figure(fig, path("logreg_test_accuracy.png"), tight=False))

    paths.append(save_figure(plot_roc(plt, data["test_labels"], data["test_probs"], suffix), path("roc.png"), tight=False))

    y_pred = np.argmax(data["test_probs"], axis=1)
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(cm, (data["test_labels"], y_pred), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.8), gridspec_kw=dict(left=0.1, right=0.9, bottom=0.09, top=0.89))
    im = ax.imshow(cm, cmap="Blues")
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted", ylabel="true",
           title=f"Confusion matrix, accuracy {np.mean(y_pred == data['test_labels']):.4f}{suffix}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    paths.append(save_figure(fig, path("confusion_matrix.png"), tight=False))
    return paths


def plot_roc(plt, labels, probs, suffix):
    """The ROC curves twice: on linear axes, and with the false-positive rate on a log scale,
    where curves that all hug the corner (AUC 0.997) come apart."""
    roc = multiclass_roc(labels, probs)
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12.5, 6.0),
                                   gridspec_kw=dict(left=0.055, right=0.985, bottom=0.09, top=0.89, wspace=0.16))
    n_negatives = len(labels) - np.bincount(labels, minlength=NUM_CLASSES).max()
    low = 1.0 / max(n_negatives, 1)   # the smallest non-zero FPR any class can reach
    for k, (fpr, tpr) in enumerate(roc["per_class"]):
        if k in roc["undefined"]:
            label = f"class {k}: AUC undefined ({roc['undefined'][k]})"
        else:
            label = f"class {k} (AUC {roc['per_class_auc'][k]:.4f})"
        for axis in (ax, zoom):
            axis.plot(fpr, tpr, lw=1, color=f"C{k}", label=label)
    macro_name = "macro avg" + (f" of {NUM_CLASSES - len(roc['undefined'])} classes" if roc["undefined"] else "")
    for axis in (ax, zoom):
        axis.plot(*roc["micro"], lw=2.5, color="black", linestyle=":", label=f"micro avg (AUC {roc['micro_auc']:.4f})")
        axis.plot(*roc["macro"], lw=2.5, color="navy", linestyle="--",
                  label=f"{macro_name} (AUC {roc['macro_auc']:.4f})")
        axis.plot([low, 1], [low, 1], color="lightgray", lw=1, linestyle="--", label="chance")
        axis.set(xlabel="false positive rate", ylabel="true positive rate", ylim=(0, 1.01))
        axis.grid(alpha=0.3)
    ax.set(xlim=(0, 1), title=f"One-vs-rest ROC, MNIST test set{suffix}")
    zoom.set_xscale("log")
    zoom.set(xlim=(low, 1), title="the same, false positive rate on a log scale")
    ax.legend(fontsize=8, loc="lower right")
    return fig


# --------------------------------------------------------------------- main

def add_io_args(parser, writes):
    """The input and output flags, shared with sweep_logreg.py; ``writes`` names what OUT gets."""
    parser.add_argument("--train-mat", default="artifacts/mnist_train.mat", help="training features (.mat)")
    parser.add_argument("--test-mat", default="artifacts/mnist_test.mat", help="test features (.mat)")
    parser.add_argument("--out-dir", default="artifacts", help=f"where {writes} go (OUT)")
    parser.add_argument("--figures-dir", default="figures", help="where the PNG figures go (FIGURES)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None):
    fast, ref = MODE_DEFAULTS["default"], MODE_DEFAULTS["reference"]
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_io_args(p, "logreg.npz and logreg_metrics.json")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"maximum epochs (default {fast['epochs']}; {ref['epochs']} with --reference)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"mini-batch size (default {fast['batch_size']}; {ref['batch_size']} with --reference)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"learning rate, the peak of the cosine schedule (default {fast['lr']}; "
                        f"constant {ref['lr']} with --reference)")
    p.add_argument("--l2", type=nonnegative_float, default=None,
                   help=f"L2 penalty on the weights, not the bias (default {fast['l2']}; {ref['l2']} with --reference)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"share of the training set held out for validation: early stopping in the default "
                        f"training (default {fast['val_fraction']}), only reported with --reference "
                        f"(default {ref['val_fraction']}: the assignment trains on every row)")
    p.add_argument("--patience", type=positive_int, default=None,
                   help=f"stop after this many epochs without validation gain (default {fast['patience']}; "
                        "not with --reference)")
    add_common_args(p, "seed", seed={"help": "seed of the split, shuffling and initialization"})
    p.add_argument("--reference", action="store_true",
                   help="the assignment's procedure: raw features, theta ~ 0.001*randn, batch 64, "
                        "lr 0.001, up to 1000 epochs, stop when theta moves < 1e-10 in an epoch")
    p.add_argument("--plot-only", action="store_true",
                   help="only re-render the figures from OUT/logreg.npz (no training)")
    args = p.parse_args(argv)
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    return args


def config_from_args(args):
    """The TrainConfig the command line asks for."""
    if args.reference and args.patience is not None:
        raise UserError("--patience applies to the default training only: --reference has no early stopping")
    return TrainConfig.for_mode("reference" if args.reference else "default", epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr, l2=args.l2, seed=args.seed,
                                val_fraction=args.val_fraction, patience=args.patience)


def divergence_advice(config, args):
    """What to lower: --l2 when the user gave it and lr x l2 >= 2, where the penalty alone makes
    each step overshoot (it multiplies the weights by 1 - lr x l2); else, or as well when given, --lr."""
    l2 = args.l2 is not None and config.lr * config.l2 >= 2
    flags = (["--lr"] if args.lr is not None or not l2 else []) + (["--l2"] if l2 else [])
    return "lower " + " or ".join(flags)


def main(argv=None):
    args = parse_args(argv)
    npz_path = os.path.join(args.out_dir, "logreg.npz")
    metrics_path = os.path.join(args.out_dir, "logreg_metrics.json")
    figure_paths = [os.path.join(args.figures_dir, name) for name in FIGURES]
    if args.plot_only:
        data = load_npz(npz_path)
        plan_outputs(figure_paths)
        for path in plot_all(data, args.figures_dir):
            print(f"wrote {path}")
        return

    t0 = time.perf_counter()
    config = config_from_args(args)
    X_tr, y_tr, X_te, y_te, provenance = load_pair(args.train_mat, args.test_mat)
    for path in (args.out_dir, args.figures_dir):   # fail before training, create nothing yet
        check_can_create(path)
    # The metrics first, then the npz (Make's target, so it must come last of the two), then figures.
    plan_outputs([metrics_path, npz_path, *figure_paths])
    weights = provenance["train"]["weights"]
    if is_random_init(provenance["train"]):
        print(f"WARNING: these features come from RANDOM-INIT ResNet-50 weights ({weights}), "
              "not pretrained ones; accuracy and AUC say little about transfer learning")
    print(f"train {X_tr.shape}, test {X_te.shape}, weights {weights}, "
          f"{'reference procedure' if config.reference else 'default training'}")
    t1 = time.perf_counter()
    try:
        result = train(X_tr, get_one_hot(y_tr), X_te, get_one_hot(y_te), config,
                       progress=not args.no_progress, copy=False)   # X_tr is not needed afterwards
    except Diverged as exc:
        raise Diverged(exc.epoch, exc.history, exc.loss, divergence_advice(config, args)) from None
    t_train = time.perf_counter() - t1
    roc = multiclass_roc(y_te, result["test_probs"])
    m = metrics(result, y_te, roc, provenance, {"train": t_train, "total": time.perf_counter() - t0})
    write_json(metrics_path, m)
    save_npz(npz_path, result, y_te, provenance)
    for path in plot_all(load_npz(npz_path), args.figures_dir):   # what --plot-only would draw
        print(f"wrote {path}")
    print(f"wrote {metrics_path} and {npz_path}")
    macro = m["auc"]["macro"]
    print(f"test accuracy {m['test_accuracy']:.4f} (epoch {result['best_epoch']} of {result['epochs_run']} run), "
          f"macro AUC {'undefined' if macro is None else f'{macro:.5f}'}"
          + (f" (over {NUM_CLASSES - len(roc['undefined'])} classes: "
             f"{'; '.join(roc['undefined'].values())})" if roc["undefined"] else "")
          + f", micro AUC {roc['micro_auc']:.5f}, trained in {t_train:.1f} s, weights {weights}"
          + ("  [RANDOM-INIT features]" if is_random_init(provenance["train"]) else ""))


if __name__ == "__main__":
    run_main(main)
