"""logreg.py: the classifier and its gradient (finite differences), the assignment's own loop, ROC and AUC
against sklearn, the command line, its failures and divergence."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import scipy.io as sio

import logreg
from lab import logreg_figures, roc
from lab.features import load_features
from lab import cli as lab_cli
from helpers import (HERE, LOGREG_RANDOM_INIT, assert_rejected, assert_user_error, assignment_get_one_hot, fault_mats,
                     interrupt_at, leftovers, logreg_blobs, logreg_run, logreg_write_mat, run_cli, snapshot,
                     sweep_run)


# =========================================================================
# logreg.py: multinomial logistic regression and ROC, from scratch
# =========================================================================


# --------------------------------------------------------------------- helpers

@pytest.fixture
def logreg_mats(tmp_path):
    """A small train/test pair in the extractor's format, with random-init metadata of a resnet18."""
    X, y = logreg_blobs(600, 16, seed=1, spread=0.8)
    X_te, y_te = logreg_blobs(200, 16, seed=2, spread=0.8)
    meta = {**LOGREG_RANDOM_INIT, "network": "resnet18"}
    return (logreg_write_mat(tmp_path / "train.mat", X, y, **meta),
            logreg_write_mat(tmp_path / "test.mat", X_te, y_te, **meta))


def logreg_direct_loss(X, L, theta, l2=0.0):
    """The mean softmax cross-entropy written out sample by sample with math.exp: an oracle that
    shares no code with logreg.py (small scores only: no overflow guard)."""
    W, b = theta[:-1], theta[-1]
    total = 0.0
    for x, onehot in zip(X, L):
        scores = [float(np.dot(x, W[:, c]) + b[c]) for c in range(10)]
        total += math.log(sum(math.exp(s) for s in scores)) - scores[int(np.argmax(onehot))]
    return total / len(X) + 0.5 * l2 * float(np.sum(W ** 2))


def logreg_direct_step(X, L, theta, lr):
    """One gradient step written out plainly (softmax by math.exp): (new theta, batch loss)."""
    W, b = theta[:-1], theta[-1]
    grad = np.zeros_like(theta)
    for x, onehot in zip(X, L):
        scores = [float(np.dot(x, W[:, c]) + b[c]) for c in range(10)]
        norm = sum(math.exp(s) for s in scores)
        error = np.array([math.exp(s) / norm for s in scores]) - onehot
        grad[:-1] += np.outer(x, error) / len(X)
        grad[-1] += error / len(X)
    return theta - lr * grad, logreg_direct_loss(X, L, theta)


# --------------------------------------------------------------------- the classifier

@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_logreg_loss_and_gradient_match_a_direct_formula_and_finite_differences(l2):
    """loss_and_gradient against an independent oracle: the loss written out sample by sample,
    and the gradient as central differences of that oracle (not of the code under test)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 5))
    L = logreg.get_one_hot(rng.integers(0, 10, 12))
    theta = rng.standard_normal((6, 10))
    loss, grad = logreg.loss_and_gradient(X, L, theta, l2)
    assert loss == pytest.approx(logreg_direct_loss(X, L, theta, l2), rel=1e-12)
    h, numeric = 1e-6, np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        step = np.zeros_like(theta)
        step[idx] = h
        numeric[idx] = (logreg_direct_loss(X, L, theta + step, l2)
                        - logreg_direct_loss(X, L, theta - step, l2)) / (2 * h)
    assert np.linalg.norm(grad - numeric) / np.linalg.norm(numeric) < 1e-7
    if l2 == 0:   # apply_gradients: one descent step along that gradient
        new = logreg.apply_gradients(X, L, theta, 0.5)
        np.testing.assert_allclose(new, theta - 0.5 * numeric, rtol=0, atol=1e-8)


def test_logreg_softmax_is_stable_for_huge_scores():
    p = np.exp(logreg.log_softmax(np.array([[1e4, 0.0, -1e4], [800.0, 800.0, 0.0]])))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [[1, 0, 0], [0.5, 0.5, 0]], atol=1e-12)


def test_logreg_one_hot_of_loadmat_row_vector(tmp_path):
    labels = np.array([3, 0, 9, 3, 1], dtype=np.int64)
    logreg_write_mat(tmp_path / "x.mat", np.zeros((5, 2), np.float32), labels)
    loaded = sio.loadmat(tmp_path / "x.mat")["labels"]
    assert loaded.shape == (1, 5)   # what the assignment's code sees
    onehot = logreg.get_one_hot(loaded)
    assert onehot.shape == (5, 10)
    assert np.array_equal(onehot.argmax(axis=1), labels)
    assert np.array_equal(onehot.sum(axis=1), np.ones(5))


def test_logreg_separable_problem_is_learned_perfectly():
    X, y = logreg_blobs(1000, 20, seed=3, spread=10.0)
    X_te, y_te = logreg_blobs(300, 20, seed=4, spread=10.0)
    probs = logreg.train(X, logreg.get_one_hot(y), X_te, logreg.get_one_hot(y_te),
                         logreg.TrainConfig.for_mode("default", epochs=10))["test_probs"]
    assert np.mean(probs.argmax(axis=1) == y_te) == 1.0


def test_logreg_accuracy_close_to_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = logreg_blobs(3000, 30, seed=5, spread=0.35)
    X_te, y_te = logreg_blobs(2000, 30, seed=6, spread=0.35)
    probs = logreg.train(X, logreg.get_one_hot(y), X_te, logreg.get_one_hot(y_te), logreg.TrainConfig())["test_probs"]
    ours = np.mean(probs.argmax(axis=1) == y_te)
    scaler = StandardScaler().fit(X)
    ref = LogisticRegression(max_iter=1000).fit(scaler.transform(X), y).score(scaler.transform(X_te), y_te)
    assert 0.5 < ref < 0.99   # a problem where the two can differ
    assert abs(ours - ref) <= 0.01


def test_logreg_reference_last_short_batch_counts_in_loss_and_gradient():
    """n = 7 with batches of 3: batches 0-2, 3-5 and the short one, sample 6. The assignment's
    X[i:i+BATCH_SIZE-1] would never train on some samples; here every one counts. The epoch's loss
    is the one of the theta it ended with, over every training row."""
    X, y = logreg_blobs(7, 4, seed=7)
    L = logreg.get_one_hot(y)
    config = logreg.TrainConfig.for_mode("reference", epochs=1, batch_size=3, lr=0.05, seed=3)
    out = logreg.train(X, L, X, L, config)
    theta = 0.001 * np.random.default_rng(3).standard_normal((5, 10))   # the assignment's init
    for rows in (slice(0, 3), slice(3, 6), slice(6, 7)):
        theta, _ = logreg_direct_step(X[rows].astype(np.float64), L[rows], theta, 0.05)
    np.testing.assert_allclose(out["theta"], theta, rtol=1e-10, atol=1e-14)
    assert out["history"]["train_loss"] == [pytest.approx(logreg_direct_loss(X.astype(np.float64), L, theta), rel=1e-9)]
    without_last, _ = logreg_direct_step(X[6:7].astype(np.float64), L[6:7], theta, -0.05)   # undo step 3
    assert np.abs(out["theta"] - without_last).max() > 1e-6   # the short batch did move theta


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_logreg_both_trainings_step_through_apply_gradients_and_log_what_ran(mode, monkeypatch, logreg_mats, tmp_path):
    """A logreg.py run on 600 rows in batches of 64, 3 epochs: the reference calls mlr once, and
    apply_gradients once per batch (10 a epoch); the default training steps through it too. Each
    epoch's loss is the loss of the theta it ended with. Then a step that does nothing: the reference
    says so in one line, and the default training shows no falling loss."""
    calls = {"mlr": 0, "apply_gradients": []}
    mlr, step = logreg.mlr, logreg.apply_gradients

    def counted_mlr(*args, **kwargs):
        calls["mlr"] += 1
        return mlr(*args, **kwargs)

    def counted_step(X_b, *rest):
        calls["apply_gradients"].append(len(X_b))
        return step(X_b, *rest)

    monkeypatch.setattr(logreg, "mlr", counted_mlr)
    monkeypatch.setattr(logreg, "apply_gradients", counted_step)
    train, test = logreg_mats
    flags = ["--reference"] if mode == "reference" else ["--val-fraction", "0"]
    args = ["--train-mat", str(train), "--test-mat", str(test), "--figures-dir", str(tmp_path / "f"), "--no-progress",
            "--epochs", "3", "--batch-size", "64", *flags]
    logreg.main([*args, "--out-dir", str(tmp_path / "o")])
    sizes = calls["apply_gradients"]   # the default training visits its batches in a new order each epoch
    assert calls["mlr"] == (mode == "reference") and sorted(sizes) == sorted(([64] * 9 + [24]) * 3)
    assert mode == "default" or sizes == ([64] * 9 + [24]) * 3
    with np.load(tmp_path / "o" / "logreg.npz") as z:
        theta, mean, scale, train_loss = z["theta"], z["mean"], z["scale"], z["train_loss"]
    X, y, _ = load_features(str(train))
    Xs = X.astype(np.float64) if mode == "reference" else logreg.standardize(X, mean, scale)
    l2 = 0.0 if mode == "reference" else logreg.TrainConfig().l2
    assert train_loss[-1] == pytest.approx(logreg_direct_loss(Xs, logreg.get_one_hot(y), theta, l2), rel=1e-5)
    monkeypatch.setattr(logreg, "apply_gradients", lambda X_b, L_b, theta, *rest: theta)
    if mode == "reference":
        with pytest.raises(lab_cli.UserError, match="^theta did not change in epoch 1: nothing trains"):
            logreg.main([*args, "--out-dir", str(tmp_path / "frozen")])
        return
    logreg.main([*args, "--out-dir", str(tmp_path / "frozen")])
    with np.load(tmp_path / "frozen" / "logreg.npz") as z:
        assert len(set(z["train_loss"])) == 1 and not z["theta"].any()


LOGREG_EDITS = {   # name: (text of logreg.py, its replacement)
    "mlr_one_epoch": ("for epoch in range(1, epochs + 1):\n        theta_old = theta",
                      "for epoch in range(1, 2):\n        theta_old = theta"),
    "constants": ("BATCH_SIZE = 64\nLR = 0.001\n", "BATCH_SIZE = 50\nLR = 0.003\n"),
    "frozen_step": ("    return theta + step\n", "    return theta\n"),
}


@pytest.fixture(scope="module")
def logreg_edited_runs(tmp_path_factory):
    """`logreg.py --reference` as it is and after each edit of LOGREG_EDITS, run from a copy of the
    checkout: {name: (process, logreg.npz arrays or None)}."""
    root = tmp_path_factory.mktemp("edits")
    X, y = logreg_blobs(300, 8, seed=14, spread=0.8)
    mat = logreg_write_mat(root / "train.mat", X, y, **LOGREG_RANDOM_INIT)
    runs = {}
    for name, (old, new) in {"as_is": ("", ""), **LOGREG_EDITS}.items():
        copy = root / name
        shutil.copytree(os.path.join(HERE, "lab"), copy / "lab")
        source = open(os.path.join(HERE, "logreg.py")).read()
        assert source.count(old) == 1 or name == "as_is"
        (copy / "logreg.py").write_text(source.replace(old, new))
        proc = subprocess.run([sys.executable, str(copy / "logreg.py"), "--reference", "--epochs", "4", "--no-progress",
                               "--train-mat", str(mat), "--test-mat", str(mat), "--out-dir", str(copy / "out"),
                               "--figures-dir", str(copy / "figs")], capture_output=True, text=True, cwd=copy,
                              timeout=120)
        npz = copy / "out" / "logreg.npz"
        runs[name] = (proc, dict(np.load(npz)) if npz.exists() else None)
    return runs


def test_logreg_an_edit_of_mlr_or_of_the_constants_is_what_reference_runs(logreg_edited_runs):
    runs = (logreg_edited_runs[k] for k in ("as_is", "mlr_one_epoch", "constants"))
    (as_is, base), (_, one_epoch), (_, constants) = runs
    assert as_is.returncode == 0, as_is.stderr
    assert len(base["test_acc"]) == 4 and len(one_epoch["test_acc"]) == 1
    np.testing.assert_array_equal(one_epoch["theta"].shape, base["theta"].shape)
    recorded = [json.loads(str(z["config_json"])) for z in (base, constants)]
    assert [(c["batch_size"], c["lr"]) for c in recorded] == [(64, 0.001), (50, 0.003)]
    assert not np.array_equal(base["theta"], constants["theta"])


def test_logreg_a_step_that_changes_nothing_is_said_in_one_line(logreg_edited_runs):
    proc, npz = logreg_edited_runs["frozen_step"]
    assert npz is None
    assert_user_error(proc, "theta did not change in epoch 1: nothing trains")


def test_logreg_reference_stops_when_theta_moves_less_than_1e_10():
    """With all-zero features only the bias learns, so the oracle is a plain iteration of the
    bias: b <- b - lr * (softmax(b) - mean label). The run must stop at the first epoch that moves
    theta by less than 1e-10, well before its epoch limit."""
    n, lr = 20, 5.0
    L = logreg.get_one_hot(np.arange(n) % 10)
    X = np.zeros((n, 3), dtype=np.float32)
    config = logreg.TrainConfig.for_mode("reference", epochs=500, batch_size=n, lr=lr, seed=4)
    out = logreg.train(X, L, X, L, config)
    theta0 = 0.001 * np.random.default_rng(4).standard_normal((4, 10))
    bias, expected = theta0[-1].copy(), None
    for epoch in range(1, 501):
        p = np.exp(bias - bias.max())
        new = bias - lr * (p / p.sum() - L.mean(axis=0))
        moved, bias = np.linalg.norm(new - bias), new
        if moved < 1e-10:
            expected = epoch
            break
    assert expected is not None and 10 < expected < 500
    assert out["epochs_run"] == expected == len(out["history"]["train_loss"])
    np.testing.assert_array_equal(out["theta"][:-1], theta0[:-1])   # no feature, no weight change
    np.testing.assert_allclose(out["theta"][-1], bias, rtol=0, atol=1e-9)


def test_logreg_same_seed_same_result():
    X, y = logreg_blobs(500, 12, seed=8, spread=0.5)
    L = logreg.get_one_hot(y)
    a = logreg.train(X, L, X, L, logreg.TrainConfig.for_mode(epochs=3, seed=1))
    b = logreg.train(X, L, X, L, logreg.TrainConfig.for_mode(epochs=3, seed=1))
    c = logreg.train(X, L, X, L, logreg.TrainConfig.for_mode(epochs=3, seed=2))
    assert np.array_equal(a["theta"], b["theta"])
    assert a["history"]["test_acc"] == b["history"]["test_acc"]
    assert not np.array_equal(a["theta"], c["theta"])   # the seed does matter


def test_logreg_standardization_guards_constant_columns():
    X, _ = logreg_blobs(200, 5, seed=9)
    X[:, 0] = 7.25                       # exactly constant
    X[:, 1] = np.float32(1e4) + np.float32(1e-3) * (np.arange(200) % 2)   # round-off scale only
    mean, scale = logreg.statistics(X)
    Xs = logreg.standardize(X, mean, scale)
    np.testing.assert_allclose(mean[2:], X[:, 2:].astype(np.float64).mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(scale[2:], X[:, 2:].astype(np.float64).std(axis=0), rtol=1e-5)
    assert scale[0] == 1.0 and scale[1] == 1.0
    assert np.all(np.isfinite(Xs)) and Xs.dtype == np.float32
    np.testing.assert_allclose(Xs[:, 2:].std(axis=0), 1.0, rtol=1e-4)
    in_place = X.copy()
    logreg.standardize(in_place, mean, scale, out=in_place)
    np.testing.assert_array_equal(in_place, Xs)


def test_logreg_reference_config_reads_the_assignment_constants(monkeypatch):
    monkeypatch.setattr(logreg, "BATCH_SIZE", 32)
    config = logreg.TrainConfig.for_mode("reference", lr=0.01)
    assert (config.lr, config.batch_size, config.epochs, config.val_fraction) == (0.01, 32, logreg.EPOCHS, 0.0)
    from dataclasses import asdict

    assert logreg.TrainConfig(**asdict(config)) == config   # what logreg.npz stores


# --------------------------------------------------------------------- the assignment's own code

def assignment_mlr(trfeature, tr_onehot, tefeature, te_onehot, apply_gradients, epochs, seed=0):
    """The assignment's Q2 loop as it wrote it: theta d x 10 without a bias, 0.001 randn, batches
    of 64 sliced X[i:endpos] with endpos = i + BATCH_SIZE - 1, stop when theta moves < 1e-10."""
    BATCH_SIZE = 64
    LR = 0.001
    np.random.seed(seed)
    theta = 0.001 * np.random.randn(trfeature.shape[1], 10)
    for epoch in range(epochs):
        theta_old = theta.copy()
        for i in range(0, trfeature.shape[0], BATCH_SIZE):
            endpos = i + BATCH_SIZE - 1
            theta = apply_gradients(trfeature[i:endpos], tr_onehot[i:endpos], theta, LR)
        if np.linalg.norm(theta - theta_old) < 1e-10:
            break
    pred = tefeature @ theta
    predonehot = np.zeros_like(pred)
    predonehot[np.arange(pred.shape[0]), np.argmax(pred, axis=1)] = 1
    return predonehot


def assignment_apply_gradients(X, L, theta, lr):
    """The assignment's signature (theta without a bias row, returns the new theta) served by
    logreg.apply_gradients: a zero bias row, dropped again, is exactly a model without bias."""
    with_bias = np.vstack([theta, np.zeros((1, theta.shape[1]))])
    return logreg.apply_gradients(X, L, with_bias, lr)[:-1]


@pytest.mark.skipif(not os.environ.get("MNIST_ROOT"), reason="set MNIST_ROOT to the real MNIST root")
def test_logreg_assignment_q2_loop_runs_on_extracted_features(tmp_path):
    """Real MNIST through extract_features.py (random-init weights, first 1000 images of each
    split), then the assignment's own loading, get_one_hot and mlr loop: clearly above chance."""
    proc = run_cli("extract_features.py", "--data-root", os.environ["MNIST_ROOT"], "--out-dir", tmp_path,
                   "--weights", "none", "--limit", "1000")
    assert proc.returncode == 0, proc.stderr
    trmat = sio.loadmat(str(tmp_path / "mnist_train.mat"))
    temat = sio.loadmat(str(tmp_path / "mnist_test.mat"))
    trfeature, trlabel = trmat["features"], trmat["labels"]
    tefeature, telabel = temat["features"], temat["labels"]
    tr_onehot, te_onehot = assignment_get_one_hot(trlabel), assignment_get_one_hot(telabel)
    np.testing.assert_array_equal(logreg.get_one_hot(trlabel), tr_onehot)   # ours reads the same row
    predonehot = assignment_mlr(trfeature, tr_onehot, tefeature, te_onehot, assignment_apply_gradients, epochs=100)
    accuracy = np.mean(np.argmax(predonehot, axis=1) == np.argmax(te_onehot, axis=1))
    assert accuracy > 0.4, accuracy   # chance is 0.1; 0.54 when this test was written


# --------------------------------------------------------------------- ROC against sklearn

def logreg_tied_scores(rng, n):
    return rng.integers(0, 8, n) / 8.0   # only 8 distinct values: many ties


@pytest.mark.parametrize("seed", range(5))
def test_logreg_roc_curve_matches_sklearn(seed):
    """sklearn with drop_intermediate=False keeps one point per distinct score, as ours
    does, so the point sets can be compared exactly, ties included."""
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    score = logreg_tied_scores(rng, 300) + 0.3 * y * rng.integers(0, 2, 300)
    fpr, tpr, thr = roc.roc_curve(y, score)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thr, sk_thr)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert roc.auc(fpr, tpr) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_logreg_auc_is_the_trapezoid_rule():
    assert roc.auc([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75, abs=1e-15)
    assert roc.auc([1, 0.5, 0], [1, 1, 0]) == pytest.approx(0.75, abs=1e-15)
    with pytest.raises(ValueError):
        roc.auc([0, 1, 0.5], [0, 1, 1])


def logreg_ovr_problem(seed, n=500):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    counts = rng.multinomial(16, np.full(10, 0.1), size=n)
    counts[np.arange(n), y] += rng.integers(0, 4, n)   # some signal
    return y, counts / counts.sum(axis=1, keepdims=True)     # rows sum to 1, heavy ties


@pytest.mark.parametrize("seed", range(3))
def test_logreg_multiclass_auc_matches_sklearn_ovr(seed):
    from sklearn.metrics import roc_auc_score

    y, probs = logreg_ovr_problem(seed)
    result = roc.multiclass_roc(y, probs)
    assert result["macro_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert result["micro_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="micro"), abs=1e-12)
    per_class = roc_auc_score(logreg.get_one_hot(y), probs, average=None)
    np.testing.assert_allclose(result["per_class_auc"], per_class, rtol=0, atol=1e-12)
    grid, macro_tpr = result["macro"]
    assert grid[0] == 0 and grid[-1] == 1 and np.all(np.diff(macro_tpr) >= 0)
    assert result["undefined"] == {}


def test_logreg_is_random_init_reads_the_weights_kind():
    """A .pth run (pretrained 0, not known to be ImageNet) is not called random-init, nor pretrained."""
    file_meta = {"weights": "file:/x/r50.pth sha256:ab", "weights_kind": "file", "pretrained": 0}
    assert not logreg.is_random_init(file_meta)
    assert logreg.describe(file_meta) == "ResNet-50 weights: file:/x/r50.pth sha256:ab"
    random18 = {"weights": "random-init (WEIGHTS=none)", "weights_kind": "random-init", "network": "resnet18"}
    assert logreg.describe(random18) == "features from RANDOM-INIT resnet18 weights (not pretrained)"
    assert logreg.is_random_init({"weights": "random-init (WEIGHTS=none)", "weights_kind": "random-init"})
    assert logreg.is_random_init({"weights": "random-init (WEIGHTS=none)", "pretrained": 0})
    assert not logreg.is_random_init({"weights": "IMAGENET1K_V1", "weights_kind": "imagenet", "pretrained": 1})


def test_logreg_absent_class_has_no_auc_and_the_macro_skips_it():
    from sklearn.metrics import roc_auc_score

    y, probs = logreg_ovr_problem(5)
    keep = y != 3
    result = roc.multiclass_roc(y[keep], probs[keep])
    assert math.isnan(result["per_class_auc"][3]) and list(result["undefined"]) == [3]
    others = [k for k in range(10) if k != 3]
    expected = roc_auc_score(logreg.get_one_hot(y[keep])[:, others], probs[keep][:, others], average="macro")
    assert result["macro_auc"] == pytest.approx(expected, abs=1e-12)
    assert np.all(np.isfinite(result["macro"][1]))
    fig = logreg_figures.plot_roc(logreg.pyplot(), y[keep], probs[keep], "")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "class 3: AUC undefined (no test sample is class 3)" in legend
    assert any(text.startswith("macro avg of 9 classes") for text in legend)
    logreg.pyplot().close(fig)


# --------------------------------------------------------------------- command line

def logreg_pixels(figs):
    import matplotlib.image

    return {name: matplotlib.image.imread(str(figs / name)) for name in logreg.FIGURES}


def test_logreg_cli_writes_outputs_and_plot_only_redraws_the_same_pixels(logreg_mats, tmp_path):
    train, test = logreg_mats
    out, figs = tmp_path / "out", tmp_path / "figs"
    r = logreg_run("--train-mat", str(train), "--test-mat", str(test), "--out-dir", str(out),
                   "--figures-dir", str(figs), "--epochs", "5")
    assert r.returncode == 0, r.stderr
    assert "WARNING: features from RANDOM-INIT resnet18 weights" in r.stdout and "resnet18 features" in r.stdout
    with np.load(out / "logreg.npz", allow_pickle=False) as z:
        probs, labels = z["test_probs"], z["test_labels"]
        assert len(z["test_acc"]) == len(z["train_loss"]) == len(z["val_acc"]) <= 5
        assert json.loads(str(z["provenance_json"]))["train"]["weights"] == "random-init (WEIGHTS=none)"
        assert json.loads(str(z["config_json"]))["epochs"] == 5
    m = json.loads((out / "logreg_metrics.json").read_text())
    assert m["test_accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == labels))
    assert m["auc"]["macro"] == pytest.approx(roc.multiclass_roc(labels, probs)["macro_auc"])
    assert m["weights"] == "random-init (WEIGHTS=none)" and m["random_init_weights"] is True
    assert m["config"]["mode"] == "default" and m["config"]["epochs"] == 5
    assert set(os.listdir(figs)) == set(logreg.FIGURES)
    assert set(os.listdir(out)) == {"logreg.npz", "logreg_metrics.json"}   # no temp files left
    first = logreg_pixels(figs)
    for name in logreg.FIGURES:
        os.remove(figs / name)
    r = logreg_run("--plot-only", "--out-dir", str(out), "--figures-dir", str(figs))
    assert r.returncode == 0, r.stderr
    again = logreg_pixels(figs)
    for name in logreg.FIGURES:
        assert first[name].shape == again[name].shape and np.array_equal(first[name], again[name]), name


def test_logreg_absent_test_class_writes_null_auc_and_says_why(tmp_path):
    X, y = logreg_blobs(300, 8, seed=12)
    X_te, y_te = logreg_blobs(200, 8, seed=13)
    keep = y_te != 3
    train = logreg_write_mat(tmp_path / "tr.mat", X, y)
    test = logreg_write_mat(tmp_path / "te.mat", X_te[keep], y_te[keep])
    r = logreg_run("--train-mat", train, "--test-mat", test, "--out-dir", tmp_path / "o",
                   "--figures-dir", tmp_path / "f", "--epochs", "3")
    assert r.returncode == 0, r.stderr
    assert "over 9 classes: no test sample is class 3" in r.stdout
    text = (tmp_path / "o" / "logreg_metrics.json").read_text()
    auc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))["auc"]
    assert auc["per_class"]["3"] is None and "no test sample is class 3" in auc["undefined"]["3"]
    assert auc["macro"] == pytest.approx(np.mean([v for k, v in auc["per_class"].items() if k != "3"]))


def test_logreg_import_and_run_never_load_torch(logreg_mats, tmp_path):
    train, test = logreg_mats
    code = ("import sys, json, logreg\n"
            "logreg.main(sys.argv[1:])\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, "--train-mat", str(train), "--test-mat", str(test),
                           "--out-dir", str(tmp_path / "o"), "--figures-dir", str(tmp_path / "f"),
                           "--epochs", "2", "--no-progress"], capture_output=True, text=True, cwd=HERE,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH False" in proc.stdout
    recorded = json.loads((tmp_path / "o" / "logreg_metrics.json").read_text())["versions"]
    assert "numpy" in recorded and "torch" not in recorded


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_logreg_interrupt_after_the_metrics_leaves_every_output_complete_or_absent(logreg_mats, tmp_path, sig):
    """Interrupted while logreg.npz is being written, i.e. after logreg_metrics.json: exit 130,
    the message names what was completed and what was not, and nothing is half-written."""
    train, test = logreg_mats
    out, figs = tmp_path / "out", tmp_path / "figs"
    code = ("import sys, time, numpy as np\n"
            "def slow(f, **arrays):\n"
            "    f.write(b'x' * 1000); f.flush(); print('WRITING', flush=True); time.sleep(60)\n"
            "np.savez = slow\n"
            "import logreg, lab.cli\n"
            "sys.argv = ['logreg.py'] + sys.argv[1:]\n"
            "lab.cli.run_main(logreg.main)\n")
    code_, err = interrupt_at("WRITING", code, ["--train-mat", train, "--test-mat", test, "--out-dir", out,
                                                "--figures-dir", figs, "--epochs", "2", "--no-progress"], sig=sig)
    assert code_ == 130 and "Traceback" not in err, err
    line = err.strip()
    assert "interrupted" in line and "completed:" in line and "logreg_metrics.json" in line.split("not written")[0]
    assert "not written:" in line and "logreg.npz" in line.split("not written")[1], line
    assert all(name in line.split("not written")[1] for name in logreg.FIGURES), line
    assert leftovers(out) == ["logreg_metrics.json"] and leftovers(figs) == []
    json.loads((out / "logreg_metrics.json").read_text())   # complete


def test_logreg_metadata_is_optional(tmp_path):
    """The assignment's own .mat files have no metadata: provenance is then 'unknown'."""
    X, y = logreg_blobs(200, 8, seed=10)
    logreg_write_mat(tmp_path / "a.mat", X, y)
    _, _, _, _, prov = logreg.load_pair(str(tmp_path / "a.mat"), str(tmp_path / "a.mat"))
    assert prov["train"] == {"weights": "unknown", "feature_dim": 8}
    assert not logreg.is_random_init(prov["train"])


def test_logreg_help_works():
    r = logreg_run("--help")
    assert r.returncode == 0 and "--reference" in r.stdout and "--plot-only" in r.stdout


# --------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def logreg_older_outputs(tmp_path_factory):
    """Outputs of an earlier good run: a failing run must leave them as they are."""
    root = tmp_path_factory.mktemp("logreg_older")
    X, y = logreg_blobs(100, 8, seed=11)
    good = logreg_write_mat(root / "good.mat", X, y, **LOGREG_RANDOM_INIT)
    r = logreg_run("--train-mat", good, "--test-mat", good, "--out-dir", root / "out",
                   "--figures-dir", root / "figs", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    return root, X, y


def logreg_damaged_npz(path, source):
    """Ways to break a good logreg.npz, each written to ``path``."""
    with np.load(source, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return {
        "truncated": lambda: path.write_bytes(source.read_bytes()[:3000]),
        "not_an_npz": lambda: path.write_bytes(b"just some text, not a zip archive\n"),
        "foreign": lambda: np.savez(path, theta=np.zeros((3, 10))),
        "corrupt_config": lambda: np.savez(path, **{**arrays, "config_json": np.array('{"mode": "default", "epo')}),
        "wrong_shape": lambda: np.savez(path, **{**arrays, "test_probs": arrays["test_probs"][:, :7]}),
    }


LOGREG_BAD_CLI = {   # name: (extra args, fragment of the one-line error)
    "epochs_zero": (["--epochs", "0"], "--epochs"),
    "negative_lr": (["--lr", "-1"], "--lr"),
    "val_fraction_one": (["--val-fraction", "1"], "--val-fraction"),
    "no_training_rows": (["--val-fraction", "0.995"], "leaves no training rows"),
    "reference_no_training_rows": (["--reference", "--val-fraction", "0.995"], "leaves no training rows"),
    "loss_blows_up": (["--lr", "1e300", "--epochs", "3", "--train-mat", "{big}", "--test-mat", "{big}"],
                      "lower --lr"),
    "loss_blows_up_reference": (["--reference", "--lr", "1e300", "--epochs", "3", "--train-mat", "{big}",
                                 "--test-mat", "{big}"], "lower --lr"),
}
LOGREG_BAD_MATS = {   # name: (test .mat record or path marker, fragment); the train .mat is good
    "missing": ("missing", "not found; run `make features` first"),
    "not_a_mat": ("garbage", "make features"),
    "no_labels": ({"features": "X"}, "KeyError: 'labels'"),
    "not_2d": ({"features": "X3", "labels": "y"}, "(100, 2, 4)"),
    "label_count": ({"features": "X", "labels": "y99"}, "and 99 labels"),
    "label_range": ({"features": "X", "labels": "y10"}, "labels 0-9"),
    "non_finite": ({"features": "Xnan", "labels": "y"}, "NaN"),
    "no_samples": ({"features": "X0", "labels": "y0"}, "m >= 1"),
    "dims_differ": ({"features": "X5", "labels": "y"}, "differ in feature_dim: 8 in"),
    # features made with other settings: each key of the provenance, named with both values
    "weights_differ": ({"features": "X", "labels": "y", **LOGREG_RANDOM_INIT, "weights": "file:/o.pth"}, "weights"),
    "image_size_differs": ({"features": "X", "labels": "y", **LOGREG_RANDOM_INIT, "image_size": 224},
                           "differ in image_size: None in"),
    "seed_differs": ({"features": "X", "labels": "y", **LOGREG_RANDOM_INIT, "seed": 3}, "differ in seed"),
}


def logreg_bad_mat(root, X, y, name, record):
    path = root / f"bad_{name}.mat"
    if record == "missing":
        return root / "nope.mat"
    if record == "garbage":
        path.write_bytes(b"MATLAB? no: " + bytes(range(256)) * 8)
        return path
    values = {"X": X, "X3": X.reshape(100, 2, 4), "Xnan": np.where(np.arange(8) == 2, np.nan, X),
              "X0": X[:0], "X5": X[:, :5], "y": y.reshape(1, -1), "y99": y[:99].reshape(1, -1),
              "y10": np.where(np.arange(100) == 3, 10, y).reshape(1, -1), "y0": y[:0].reshape(1, 0)}
    sio.savemat(path, {k: values.get(v, v) for k, v in record.items()})
    return path


@pytest.mark.parametrize("name", sorted(LOGREG_BAD_CLI) + sorted(LOGREG_BAD_MATS))
def test_logreg_bad_input_is_one_line_and_changes_no_file(name, logreg_older_outputs):
    root, X, y = logreg_older_outputs
    out, figs = root / "out", root / "figs"
    good = root / "good.mat"
    if name in LOGREG_BAD_CLI:
        extra, fragment = LOGREG_BAD_CLI[name]
        big = root / "big.mat"
        if not big.exists():
            logreg_write_mat(big, X * 1e10, y, **LOGREG_RANDOM_INIT)
        extra = [str(a).format(big=big) for a in extra]
        args = ["--train-mat", good, "--test-mat", good, *extra]
    else:
        record, fragment = LOGREG_BAD_MATS[name]
        bad = logreg_bad_mat(root, X, y, name, record)
        args = ["--train-mat", good, "--test-mat", bad]
    before = snapshot(out, figs)
    proc = logreg_run(*args, "--out-dir", out, "--figures-dir", figs)
    assert_rejected(proc, before, [out, figs], fragment)


@pytest.mark.parametrize("damage", ["truncated", "not_an_npz", "foreign", "corrupt_config", "wrong_shape", "absent"])
def test_logreg_plot_only_rejects_a_bad_npz_and_changes_no_file(damage, logreg_older_outputs, tmp_path):
    root, _, _ = logreg_older_outputs
    out, figs = tmp_path / "out", root / "figs"
    out.mkdir()
    (out / "logreg_metrics.json").write_bytes((root / "out" / "logreg_metrics.json").read_bytes())
    if damage != "absent":
        logreg_damaged_npz(out / "logreg.npz", root / "out" / "logreg.npz")[damage]()
    advice = "run `make logreg` first" if damage == "absent" else f"rm -f '{out / 'logreg.npz'}' && make logreg"
    before = snapshot(out, figs)
    proc = logreg_run("--plot-only", "--out-dir", out, "--figures-dir", figs)
    assert_rejected(proc, before, [out, figs], advice)


def test_logreg_out_dir_that_is_a_file_is_rejected(logreg_older_outputs, tmp_path):
    root, _, _ = logreg_older_outputs
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    proc = logreg_run("--train-mat", root / "good.mat", "--test-mat", root / "good.mat",
                      "--out-dir", tmp_path / "afile" / "out", "--figures-dir", tmp_path / "figs")
    assert_rejected(proc, before, [tmp_path], "not a directory")


# ------------------------------------------------------------------ faults (wrong numbers, true advice)


@pytest.mark.parametrize("script", ["logreg.py", "experiments.sweep_logreg"])
@pytest.mark.parametrize("bad", ["complex", "directory", "beyond_float32"])
def test_faults_features_must_be_a_real_finite_mat(script, bad, tmp_path):
    X, y = logreg_blobs(60, 4, seed=1)
    good, _ = fault_mats(tmp_path, X, y)
    path = tmp_path / "bad.mat"
    if bad == "complex":
        logreg_write_mat(path, X + 1j * X, y, **LOGREG_RANDOM_INIT)
    elif bad == "directory":
        path.mkdir()
    else:
        logreg_write_mat(path, X.astype(np.float64) * 1e300, y, **LOGREG_RANDOM_INIT)
    out, figs = tmp_path / "out", tmp_path / "figs"
    before = snapshot(tmp_path)
    proc = run_cli(script, "--no-progress", "--train-mat", path, "--test-mat", good, "--out-dir", out,
                   "--figures-dir", figs, timeout=120)
    fragment = {"complex": "must be real numbers", "directory": "is a directory",
                "beyond_float32": "beyond float32's range"}[bad]
    assert_rejected(proc, before, [tmp_path], fragment, str(path))


def test_faults_standardization_of_float32_extremes_is_finite_and_exact():
    """Columns near float32's limits: the statistics must neither overflow nor underflow, and the
    standardized values must be what float64 arithmetic gives."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 5)).astype(np.float32)
    big = np.float32(3.4e38)
    X[:, 0] = np.where(np.arange(500) % 3 == 0, big, -big)        # centering alone overflows float32
    X[:, 1] = np.float32(1e30) * X[:, 1]                          # squares overflow float32
    X[:, 2] = np.float32(1e-30) * X[:, 2]                         # squares underflow float32
    X[:, 3] = np.float32(1e30)                                    # constant
    mean, scale = logreg.statistics(X)
    Xs = logreg.standardize(X, mean, scale)
    X64 = X.astype(np.float64)
    assert np.all(np.isfinite(Xs)) and np.all(np.isfinite(mean)) and np.all(np.isfinite(scale))
    np.testing.assert_allclose(mean, X64.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(scale[[0, 1, 2, 4]], X64.std(axis=0)[[0, 1, 2, 4]], rtol=1e-5)
    varied = X64[:, [0, 1, 2, 4]]
    expected = (varied - varied.mean(axis=0)) / varied.std(axis=0)
    np.testing.assert_allclose(Xs[:, [0, 1, 2, 4]], expected, rtol=1e-4, atol=1e-5)
    assert np.all(Xs[:, 3] == 0)
    logreg.standardize(X, mean, scale, out=X)   # in place: the same numbers
    np.testing.assert_array_equal(X, Xs)


@pytest.mark.parametrize("args, advice", [
    (["--reference", "--lr", "1e9"], "lower --lr"),
    (["--lr", "1e9"], "lower --lr"),
])
def test_faults_a_loss_beyond_the_bound_is_divergence_with_true_advice(args, advice, tmp_path):
    X, y = logreg_blobs(200, 16, seed=3)
    train, test = fault_mats(tmp_path, X, y)
    out, figs = tmp_path / "out", tmp_path / "figs"
    before = snapshot(tmp_path)
    proc = logreg_run("--train-mat", train, "--test-mat", test, "--out-dir", out, "--figures-dir", figs,
                      "--epochs", "3", *args)
    line = assert_rejected(proc, before, [tmp_path], "diverged at epoch", advice)
    assert line.rstrip().endswith(advice), line


def test_faults_a_directory_where_a_result_should_be_is_named(logreg_older_outputs, tmp_path):
    out = tmp_path / "out"
    (out / "logreg.npz").mkdir(parents=True)
    before = snapshot(tmp_path)
    proc = logreg_run("--plot-only", "--out-dir", out, "--figures-dir", tmp_path / "figs")
    assert_rejected(proc, before, [tmp_path], "logreg.npz", "is a directory")
    (out / "sweep_logreg.json").mkdir()
    proc = sweep_run("--plot-only", "--out-dir", out, "--figures-dir", tmp_path / "figs")
    assert_rejected(proc, snapshot(tmp_path), [tmp_path], "sweep_logreg.json", "is a directory")
