"""Benchmark of logreg.py on the full ResNet-50 features, measured side by side in one run:
our default training against sklearn LogisticRegression(lbfgs) on standardized features,
and against the assignment's own loop (logreg.py --reference).

    python bench_logreg.py --train-mat artifacts/mnist_train.mat --test-mat artifacts/mnist_test.mat
"""
import argparse
import time
import warnings

import numpy as np

import logreg
from labio import run_main

# The assignment loop is too slow to run 200 epochs in every bench (minutes): the bench times
# REFERENCE_EPOCHS of it and scales that to 200 epochs; the accuracy it reaches after 200
# epochs was measured once, for real, on random-init features (WEIGHTS=none), with
#   python logreg.py --reference --epochs 200 --out-dir /tmp/ref200 --figures-dir /tmp/ref200fig
# (test accuracy at epoch 200, read from /tmp/ref200/logreg.npz: test_acc[-1]).
REFERENCE_EPOCHS = 3
REFERENCE_200_EPOCH_ACCURACY = 0.9106   # measured 2026-11-27, random-init features; the issue also reports 0.9106
SKLEARN_MAX_ITER = 300


def _accuracy(probs, y):
    return float(np.mean(np.argmax(probs, axis=1) == y))


def _ours(X, L, X_te, L_te, y_te):
    start = time.perf_counter()
    result = logreg.train(X, L, X_te, L_te)
    seconds = time.perf_counter() - start
    return result, seconds, _accuracy(result["test_probs"], y_te)


def _sklearn(X, y, X_te, y_te):
    """sklearn's lbfgs on standardized features; the scaling counts in its time, as ours does."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    scaler = StandardScaler().fit(X)
    with warnings.catch_warnings():   # hitting max_iter is expected: 300 iterations is the reference
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(max_iter=SKLEARN_MAX_ITER).fit(scaler.transform(X), y)
    accuracy = float(model.score(scaler.transform(X_te), y_te))
    return time.perf_counter() - start, accuracy, int(np.max(model.n_iter_))


def _time_to_reach(result, target):
    """Seconds from the call of train() to the end of the first epoch with test accuracy >= target."""
    for acc, seconds in zip(result["history"]["test_acc"], result["history"]["seconds"]):
        if acc >= target:
            return seconds
    return None


def bench_logreg(train_mat, test_mat):
    X, y, X_te, y_te, provenance = logreg.load_pair(train_mat, test_mat)
    L, L_te = logreg.get_one_hot(y), logreg.get_one_hot(y_te)
    weights = provenance["train"]["weights"]
    kind = "random-init" if logreg.is_random_init(provenance["train"]) else "pretrained"
    data = f"{X.shape[0]}x{X.shape[1]} train / {X_te.shape[0]} test features, {kind} weights ({weights})"

    result, ours_s, ours_acc = _ours(X, L, X_te, L_te, y_te)
    sk_s, sk_acc, sk_iter = _sklearn(X, y, X_te, y_te)
    speedup = sk_s / ours_s
    rows = [{
        "benchmark": "logreg default training vs sklearn LogisticRegression(lbfgs), standardized",
        "ours": f"{ours_s:.1f} s, test acc {ours_acc:.4f} ({result['epochs_run']} epochs)",
        "reference": f"{sk_s:.1f} s, test acc {sk_acc:.4f} ({sk_iter} lbfgs iterations, max_iter={SKLEARN_MAX_ITER})",
        "ratio": round(speedup, 2),
        "target": ">= 10x faster and accuracy >= sklearn - 0.2 points",
        "ok": bool(speedup >= 10 and ours_acc >= sk_acc - 0.002),
        "note": f"{data}; both times include standardization, neither includes loading the .mat files",
    }]

    ref = logreg.train(X, L, X_te, L_te, reference=True, epochs=REFERENCE_EPOCHS)
    per_epoch = ref["history"]["seconds"][-1] / REFERENCE_EPOCHS
    ref_200_s = 200 * per_epoch
    target_acc = REFERENCE_200_EPOCH_ACCURACY
    reach_s = _time_to_reach(result, target_acc) if target_acc is not None else None
    ratio = ref_200_s / reach_s if reach_s else float("nan")
    trajectory = ", ".join(f"{a:.4f}" for a in ref["history"]["test_acc"])
    rows.append({
        "benchmark": "logreg default training vs the assignment loop (--reference), 200 epochs",
        "ours": (f"{reach_s:.2f} s to reach test acc {target_acc:.4f}" if reach_s else
                 f"never reached {target_acc}"),
        "reference": f"{ref_200_s:.0f} s for 200 epochs (ESTIMATED: {per_epoch:.2f} s/epoch x 200), "
                     f"test acc {target_acc} at epoch 200 (measured once)",
        "ratio": round(ratio, 1),
        "target": ">= 25x faster to the same accuracy",
        "ok": bool(reach_s is not None and ratio >= 25),
        "note": (f"{data}; the assignment loop's time is {REFERENCE_EPOCHS} epochs measured in this run "
                 f"x 200/{REFERENCE_EPOCHS} (its test acc after those epochs: {trajectory}); its "
                 "200-epoch accuracy was measured once with `python logreg.py --reference --epochs 200` "
                 "on the full random-init features (WEIGHTS=none), not in every bench; with other features "
                 "that constant does not apply"),
    })
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-mat", default="artifacts/mnist_train.mat")
    p.add_argument("--test-mat", default="artifacts/mnist_test.mat")
    args = p.parse_args()
    for row in bench_logreg(args.train_mat, args.test_mat):
        print(f"{row['benchmark']}\n  ours:      {row['ours']}\n  reference: {row['reference']}\n"
              f"  ratio {row['ratio']} (target {row['target']}): {'OK' if row['ok'] else 'MISSED'}\n"
              f"  note: {row['note']}")


if __name__ == "__main__":
    run_main(main)
