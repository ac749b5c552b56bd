"""The experiments: sweep_logreg (batch size x learning rate) and sweep_vae (z_dim), each run equal to
a lone run, their figures and failures."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import vae
from experiments import sweep_logreg, sweep_vae
from helpers import (HERE, LOGREG_RANDOM_INIT, VAE_N_TEST, VAE_N_TRAIN, assert_rejected, assert_same_run,
                     fault_mats, interrupt_at, leftovers, logreg_blobs, logreg_run, logreg_write_mat,
                     run_cli, snapshot, sweep_run, vae_in_process, vae_outputs)


# --------------------------------------------------------------------- sweep_logreg.py

SWEEP_GRID = ["--batch-sizes", "7", "32", "--lrs", "0.001", "0.05", "1e306", "--epochs", "6", "--val-fraction", "0.2"]


@pytest.fixture(scope="module")
def sweep_result(tmp_path_factory):
    """One sweep on tiny data (230 rows: no batch size divides it) where lr 1e306 diverges."""
    root = tmp_path_factory.mktemp("sweep")
    X, y = logreg_blobs(230, 12, seed=21, spread=0.6)
    X_te, y_te = logreg_blobs(90, 12, seed=22, spread=0.6)
    train = logreg_write_mat(root / "train.mat", 3 * X, y, **LOGREG_RANDOM_INIT)
    test = logreg_write_mat(root / "test.mat", 3 * X_te, y_te, **LOGREG_RANDOM_INIT)
    out, figs = root / "out", root / "figs"
    proc = sweep_run("--train-mat", train, "--test-mat", test, "--out-dir", out, "--figures-dir", figs,
                     "--jobs", "2", *SWEEP_GRID)
    assert proc.returncode == 0, proc.stderr
    text = (out / "sweep_logreg.json").read_text()
    sweep = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    return {"root": root, "train": train, "test": test, "out": out, "figs": figs, "sweep": sweep, "proc": proc}


def sweep_cell(sweep, batch_size, lr):
    return next(r for r in sweep["runs"] if (r["batch_size"], r["lr"]) == (batch_size, lr))


def test_sweep_logreg_json_describes_the_grid_and_records_divergence(sweep_result):
    sweep = sweep_result["sweep"]
    assert set(sweep) >= {"kind", "mode", "epochs", "seed", "val_fraction", "grid", "weights",
                          "random_init_weights", "provenance", "seconds", "best", "runs", "versions"}
    settings = (sweep["kind"], sweep["mode"], sweep["epochs"], sweep["val_fraction"])
    assert settings == ("sweep_logreg", "reference", 6, 0.2)
    assert sweep["grid"] == {"batch_size": [7, 32], "lr": [0.001, 0.05, 1e306]}
    assert sweep["random_init_weights"] is True and sweep["provenance"]["test"]["weights"].startswith("random-init")
    assert "torch" not in sweep["versions"]
    grid = [(b, lr) for b in (7, 32) for lr in (0.001, 0.05, 1e306)]
    assert [(r["batch_size"], r["lr"]) for r in sweep["runs"]] == grid
    for run in sweep["runs"]:
        if run["lr"] == 1e306:   # a result, not a crash
            assert run["diverged"] and run["diverged_epoch"] == len(run["train_loss"]) <= 2
            assert run["train_loss"][-1] is None and run["final_test_acc"] is None and run["final_val_acc"] is None
        else:
            assert not run["diverged"] and run["diverged_epoch"] is None
            assert len(run["train_loss"]) == len(run["val_acc"]) == len(run["test_acc"]) == 6
            assert run["final_test_acc"] == run["test_acc"][-1] and run["seconds"] > 0
    assert "diverged at epoch" in sweep_result["proc"].stdout


def test_sweep_logreg_best_is_chosen_on_validation_never_on_test(sweep_result):
    sweep = sweep_result["sweep"]
    finished = [r for r in sweep["runs"] if not r["diverged"]]
    best_val = max(v for r in finished for v in r["val_acc"])
    best = sweep["best"]
    run = sweep_cell(sweep, best["batch_size"], best["lr"])
    assert best["val_acc"] == best_val == run["val_acc"][best["epoch"] - 1]
    assert best["test_acc"] == run["test_acc"][best["epoch"] - 1]
    # the rule itself, where validation and test disagree and the best test run diverged later
    runs = [{"batch_size": 1, "lr": 1.0, "diverged": False, "val_acc": [0.5, 0.7], "test_acc": [0.9, 0.6]},
            {"batch_size": 1, "lr": 2.0, "diverged": False, "val_acc": [0.6, 0.65], "test_acc": [0.95, 0.99]},
            {"batch_size": 2, "lr": 1.0, "diverged": True, "val_acc": [0.9, None], "test_acc": [0.99, None]}]
    assert sweep_logreg.best_run(runs) == {"batch_size": 1, "lr": 1.0, "val_acc": 0.7, "test_acc": 0.6, "epoch": 2}


@pytest.mark.parametrize("batch_size, lr", [(7, 0.05), (32, 0.001)])
def test_sweep_logreg_run_equals_a_lone_reference_run(sweep_result, tmp_path, batch_size, lr):
    """Trained together with the other rates of its batch size (and beside a diverging one), a
    configuration's history is the one a lone `logreg.py --reference` run computes."""
    proc = logreg_run("--reference", "--batch-size", batch_size, "--lr", lr, "--epochs", "6", "--val-fraction", "0.2",
                      "--train-mat", sweep_result["train"], "--test-mat", sweep_result["test"],
                      "--out-dir", tmp_path, "--figures-dir", tmp_path / "f")
    assert proc.returncode == 0, proc.stderr
    run = sweep_cell(sweep_result["sweep"], batch_size, lr)
    with np.load(tmp_path / "logreg.npz") as lone:
        for key in ("train_loss", "val_acc", "test_acc"):
            np.testing.assert_allclose(run[key], lone[key], rtol=1e-9, atol=0, err_msg=key)


def test_sweep_logreg_one_job_gives_the_same_runs_and_default_mode_matches_logreg(sweep_result, tmp_path):
    args = ["--train-mat", sweep_result["train"], "--test-mat", sweep_result["test"], "--figures-dir", tmp_path / "f"]
    proc = sweep_run(*args, "--out-dir", tmp_path / "one", "--jobs", "1", *SWEEP_GRID)
    assert proc.returncode == 0, proc.stderr
    one = json.loads((tmp_path / "one" / "sweep_logreg.json").read_text())
    strip = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]  # noqa: E731
    assert strip(one["runs"]) == strip(sweep_result["sweep"]["runs"])
    proc = sweep_run(*args, "--out-dir", tmp_path / "dflt", "--mode", "default", "--batch-sizes", "16",
                     "--lrs", "0.05", "--epochs", "4", "--val-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "dflt" / "sweep_logreg.json").read_text())["runs"][0]
    proc = logreg_run(*args, "--out-dir", tmp_path / "lone", "--batch-size", "16", "--lr", "0.05", "--epochs", "4",
                      "--val-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "lone" / "logreg.npz") as lone:
        np.testing.assert_allclose(run["test_acc"], lone["test_acc"], rtol=1e-9, atol=0)
        np.testing.assert_allclose(run["train_loss"], lone["train_loss"], rtol=1e-9, atol=0)


def test_sweep_logreg_plot_only_redraws_the_same_pixels(sweep_result, tmp_path):
    import matplotlib.image

    first = matplotlib.image.imread(str(sweep_result["figs"] / "sweep_logreg.png"))
    proc = sweep_run("--plot-only", "--out-dir", sweep_result["out"], "--figures-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(first, matplotlib.image.imread(str(tmp_path / "sweep_logreg.png")))


SWEEP_BAD_FLAGS = {
    "batch_zero": (["--batch-sizes", "0"], "--batch-sizes"),
    "negative_lr": (["--lrs", "-0.1"], "--lrs"),
    "no_lr": (["--lrs"], "--lrs"),
    "repeated_lr": (["--lrs", "0.01", "0.01"], "0.01 more than once"),
    "mode": (["--mode", "fast"], "--mode"),
    "no_validation": (["--val-fraction", "0"], "chosen on validation"),
    "epochs_zero": (["--epochs", "0"], "--epochs"),
    "jobs_zero": (["--jobs", "0"], "--jobs"),
    "no_training_rows": (["--val-fraction", "0.999"], "leaves no training rows"),
    "missing_mat": (["--train-mat", "{root}/nope.mat"], "not found"),
}


@pytest.mark.parametrize("name", sorted(SWEEP_BAD_FLAGS))
def test_sweep_logreg_bad_input_is_one_line_and_changes_no_file(name, sweep_result):
    flags, fragment = SWEEP_BAD_FLAGS[name]
    out, figs = sweep_result["out"], sweep_result["figs"]
    flags = [f.format(root=sweep_result["root"]) for f in flags]
    before = snapshot(out, figs)
    proc = sweep_run("--train-mat", sweep_result["train"], "--test-mat", sweep_result["test"], "--out-dir", out,
                     "--figures-dir", figs, "--epochs", "2", *flags)
    assert_rejected(proc, before, [out, figs], fragment)


@pytest.mark.parametrize("content, fragment", [(None, "make sweep-logreg` first"), ("{not json", "JSONDecodeError"),
                                               ('{"kind": "sweep_logreg"}', "KeyError"),
                                               ('{"kind": "something else"}', "not a sweep_logreg")])
def test_sweep_logreg_plot_only_rejects_a_bad_json(content, fragment, sweep_result, tmp_path):
    """A damaged sweep_logreg.json is named, with the advice that repairs it."""
    if content is not None:
        (tmp_path / "sweep_logreg.json").write_text(content)
    figs = sweep_result["figs"]
    before = snapshot(tmp_path, figs)
    proc = sweep_run("--plot-only", "--out-dir", tmp_path, "--figures-dir", figs)
    advice = f"rm -f '{tmp_path / 'sweep_logreg.json'}' && make sweep-logreg" if content else ""
    assert_rejected(proc, before, [tmp_path, figs], fragment, advice)


def test_sweep_logreg_help_names_the_grid_flags():
    proc = sweep_run("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert all(flag in proc.stdout for flag in ("--batch-sizes", "--lrs", "--epochs", "--mode", "--plot-only"))


SWEEP_SLOW_FIGURE = ("import sys, time\n"
                     "from experiments import sweep_logreg; import lab.cli\n"
                     "def slow(fig, path, **kw):\n"
                     "    print('WRITING', flush=True); time.sleep(60)\n"
                     "sweep_logreg.save_figure = slow\n"
                     "sys.argv = ['sweep_logreg.py'] + sys.argv[1:]\n"
                     "lab.cli.run_main(sweep_logreg.main)\n")


@pytest.mark.parametrize("when, marker", [("training", "sweep:"), ("figure", "WRITING")])
def test_sweep_logreg_interrupt_leaves_every_output_complete_or_absent(sweep_result, tmp_path, when, marker):
    out, figs = tmp_path / "out", tmp_path / "figs"
    epochs = "3000" if when == "training" else "2"   # long enough to be interrupted in training
    code_, err = interrupt_at(marker, SWEEP_SLOW_FIGURE, ["--train-mat", sweep_result["train"], "--test-mat",
                                                          sweep_result["test"], "--out-dir", out, "--figures-dir", figs,
                                                          "--no-progress", "--epochs", epochs, "--jobs", "2"])
    assert code_ == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    written, missing = err.split("not written:")
    assert "sweep_logreg.png" in missing and leftovers(figs) == []
    if when == "training":
        assert "nothing was completed" in written and "sweep_logreg.json" in missing and leftovers(out) == []
    else:
        assert "completed:" in written and "sweep_logreg.json" in written
        assert leftovers(out) == ["sweep_logreg.json"]
        json.loads((out / "sweep_logreg.json").read_text())   # complete


def test_sweep_logreg_make_target_reruns_only_when_a_variable_changes(sweep_result, tmp_path):
    """`make sweep-logreg` on up-to-date features: runs once, then does nothing, then runs again
    when SWEEP_EPOCHS changes (the sweep_logreg.json settings record)."""
    out = tmp_path / "out"
    out.mkdir()
    for split in ("train", "test"):
        (out / f"mnist_{split}.mat").write_bytes(sweep_result[split].read_bytes())
        # the settings record of features made with the defaults
        (out / f".mnist_{split}.mat.args").write_text(
            f"DATA={os.path.realpath(HERE)}/data WEIGHTS=IMAGENET1K_V1 LIMIT= DTYPE=float32\n")
    make = ["make", "-s", "sweep-logreg", f"PYTHON={sys.executable}", f"OUT={out}", f"FIGURES={tmp_path / 'figs'}",
            "SWEEP_BATCH=7 32", "SWEEP_LR=0.001 0.05"]

    def run(*extra):
        proc = subprocess.run([*make, *extra], capture_output=True, text=True, cwd=HERE, timeout=180)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "wrote" in run("SWEEP_EPOCHS=2")
    assert json.loads((out / "sweep_logreg.json").read_text())["epochs"] == 2
    assert (tmp_path / "figs" / "sweep_logreg.png").exists()
    assert run("SWEEP_EPOCHS=2") == ""
    assert "wrote" in run("SWEEP_EPOCHS=3")
    assert json.loads((out / "sweep_logreg.json").read_text())["epochs"] == 3


# ------------------------------------------------------------ sweep_vae.py


def vae_sweep_run(data_root, out, figs, *z_dims, extra=()):
    proc = vae_in_process("--z-dims", *z_dims, "--data-root", data_root, "--out-dir", out, "--figures-dir", figs,
                          "--epochs", "2", "--device", "cpu", *extra, script=sweep_vae)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc


@pytest.fixture(scope="module")
def vae_sweep(vae_data_root, tmp_path_factory):
    """A sweep of z_dims 20, 5 and 2, two processes at once."""
    out = tmp_path_factory.mktemp("vae_sweep")
    vae_sweep_run(vae_data_root, out, out / "figs", 20, 5, 2, extra=["--processes", "2", "--threads", "1"])
    return out


@pytest.mark.parametrize("z_dim", [20, 5])
def test_sweep_vae_run_equals_a_lone_vae_run(z_dim, vae_sweep, vae_data_root, tmp_path):
    """A sweep runs vae.py's own training once per z_dim: the same model, bit for bit."""
    lone = tmp_path / "lone"
    proc = vae_in_process("--z-dim", z_dim, "--data-root", vae_data_root, "--out-dir", lone, "--figures-dir",
                          lone / "figs", "--epochs", "2", "--device", "cpu", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    alone = torch.load(lone / "vae.pt", weights_only=True)
    swept = torch.load(vae_sweep / "sweep_vae" / f"vae_z{z_dim}.pt", weights_only=True)
    summary = json.loads((vae_sweep / "sweep_vae.json").read_text())
    run = next(r for r in summary["runs"] if r["z_dim"] == z_dim)
    assert_same_run(alone["model"], swept["model"], alone, swept, vae.HISTORY_KEYS)
    assert all(swept[key] == run[key] for key in vae.HISTORY_KEYS)   # the JSON holds the checkpoint's numbers
    assert alone["config"] == swept["config"]


def test_sweep_vae_summary_and_figures(vae_sweep):
    summary = json.loads((vae_sweep / "sweep_vae.json").read_text())
    for key in ("kind", "z_dims", "epochs", "seed", "batch_size", "lr", "n_train", "n_test", "seconds",
                "threads", "strategy", "runs", "versions"):
        assert key in summary, key
    assert summary["kind"] == "sweep_vae" and summary["z_dims"] == [20, 5, 2] and summary["threads"] == 1
    assert summary["processes"] == 2 and "vae.train_model" in summary["strategy"] and summary["trained"] == [20, 5, 2]
    assert (summary["epochs"], summary["batch_size"], summary["lr"], summary["seed"]) == (2, 64, 1e-3, 0)
    assert (summary["n_train"], summary["n_test"]) == (VAE_N_TRAIN, VAE_N_TEST)
    for run in summary["runs"]:
        assert sorted(run) == sorted(["z_dim", "seconds", *vae.HISTORY_KEYS, "checkpoint"])
        assert all(len(run[key]) == 2 for key in vae.HISTORY_KEYS)
        assert run["test_loss"] == pytest.approx([r + k for r, k in zip(run["test_recon"], run["test_kl"])], rel=1e-6)
        model, ckpt = vae.load_checkpoint(str(vae_sweep / run["checkpoint"]))
        assert ckpt["train_loss"] == run["train_loss"] and model.z_dim == run["z_dim"]
    assert sorted(leftovers(vae_sweep / "figs")) == sorted(sweep_vae.FIGURE_NAMES)


def test_sweep_vae_plot_only_reproduces_the_figures_pixel_for_pixel(vae_sweep, vae_data_root, tmp_path):
    proc = vae_in_process("--plot-only", "--out-dir", vae_sweep, "--figures-dir", tmp_path, "--data-root",
                          vae_data_root, script=sweep_vae)
    assert proc.returncode == 0 and "placeholder" not in proc.stdout, proc.stderr
    first, second = vae_outputs(vae_sweep / "figs"), vae_outputs(tmp_path)
    assert sorted(first) == sorted(second) == sorted(sweep_vae.FIGURE_NAMES)
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_sweep_vae_manifold_lattice_is_standard_normal_quantiles():
    from scipy.stats import norm

    codes, quantiles = sweep_vae.manifold_codes(20)
    expected = norm.ppf(np.linspace(0.05, 0.95, 20))
    assert np.allclose(quantiles.numpy(), expected, atol=1e-5)
    grid = codes.view(20, 20, 2)   # row i, column j
    assert torch.equal(grid[:, :, 0], quantiles.expand(20, 20))               # z1 along a row
    assert torch.equal(grid[:, :, 1], quantiles.flip(0)[:, None].expand(20, 20))  # z2 falls down the rows


def test_sweep_vae_without_z_dim_2_draws_placeholders(vae_data_root, tmp_path):
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "vae_manifold_2d.png").write_bytes(b"an older figure")
    proc = vae_sweep_run(vae_data_root, tmp_path / "out", figs, 3, extra=["--limit", "64", "--processes", "1"])
    assert proc.stdout.count("(placeholder: z_dim 2 is not in this sweep") == 2
    assert (figs / "vae_manifold_2d.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(leftovers(figs)) == sorted(sweep_vae.FIGURE_NAMES)


@pytest.fixture(scope="module")
def sweep_bad_files(vae_sweep, tmp_path_factory):
    """OUT folders holding a sweep_vae.json that does not fit."""
    import shutil

    root = tmp_path_factory.mktemp("sweep_bad")
    cases = {}
    for name, edit in {
        "not_json": lambda out: (out / "sweep_vae.json").write_text("{ not json"),
        "other_kind": lambda out: (out / "sweep_vae.json").write_text(json.dumps({"kind": "sweep_logreg"})),
        "no_runs": lambda out: (out / "sweep_vae.json").write_text(json.dumps({"kind": "sweep_vae", "runs": []})),
        "lost_checkpoint": lambda out: (out / "sweep_vae" / "vae_z2.pt").unlink(),
        "mixed_runs": lambda out: shutil.copy(out / "sweep_vae" / "vae_z20.pt", out / "sweep_vae" / "vae_z2.pt"),
    }.items():
        shutil.copytree(vae_sweep, root / name, ignore=shutil.ignore_patterns("figs"))
        edit(root / name)
        cases[name] = root / name
    return cases


SWEEP_BAD_INPUTS = [
    ("z_dims_twice", ["--z-dims", "2", "2"], ["--z-dims lists a value twice"]),
    ("z_dims_zero", ["--z-dims", "0", "5"], ["--z-dims", "positive integer"]),
    ("z_dims_empty", ["--z-dims"], ["--z-dims", "expected at least one argument"]),
    ("epochs_zero", ["--epochs", "0"], ["--epochs"]),
    ("processes_zero", ["--processes", "0"], ["--processes"]),
    ("lr_diverges", ["--lr", "1e30", "--epochs", "1", "--z-dims", "2", "3"], ["diverged at epoch 1", "lower --lr"]),
    ("no_mnist", ["--data-root", "NO_MNIST"], ["MNIST/raw"]),
    ("plot_only_no_summary", ["--plot-only", "--out-dir", "EMPTY"], ["not found", "make sweep-vae` first"]),
    ("plot_only_not_json", ["--plot-only", "--out-dir", "not_json"], ["JSONDecodeError", "make sweep-vae"]),
    ("plot_only_other_kind", ["--plot-only", "--out-dir", "other_kind"], ["KeyError", "make sweep-vae"]),
    ("plot_only_no_runs", ["--plot-only", "--out-dir", "no_runs"], ["KeyError: 'z_dims'", "make sweep-vae"]),
    ("plot_only_lost_checkpoint", ["--plot-only", "--out-dir", "lost_checkpoint"],
     ["vae_z2.pt", "not found", "rm -f", "sweep_vae.json' && make sweep-vae"]),
    ("plot_only_mixed_runs", ["--plot-only", "--out-dir", "mixed_runs"],
     ["vae_z2.pt", "another run", "sweep_vae.json' && make sweep-vae"]),
]


@pytest.mark.parametrize("case", SWEEP_BAD_INPUTS, ids=[c[0] for c in SWEEP_BAD_INPUTS])
def test_sweep_vae_bad_input_is_one_line_and_changes_no_file(case, sweep_bad_files, vae_data_root, tmp_path):
    _, arguments, fragments = case
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NO_MNIST").mkdir()
    names = {**{k: str(v) for k, v in sweep_bad_files.items()},
             "EMPTY": str(tmp_path / "EMPTY"), "NO_MNIST": str(tmp_path / "NO_MNIST")}
    argv = [names.get(a, a) for a in arguments]
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "out")]
    out = argv[argv.index("--out-dir") + 1]
    if "--data-root" not in argv:
        argv += ["--data-root", vae_data_root]
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "sweep_vae_loss.png").write_bytes(b"an older figure")
    before = snapshot(out, figs)
    proc = vae_in_process(*argv, "--figures-dir", figs, script=sweep_vae)
    print(f"{case[0]}: {assert_rejected(proc, before, [out, figs], *fragments)}")


@pytest.mark.skipif(not os.environ.get("MNIST_ROOT"), reason="set MNIST_ROOT to the real MNIST root")
def test_vae_real_mnist_first_epoch_on_a_subset(vae_one_thread):
    """A quick look at real digits: 1 epoch on 6000 images gives a loss far below the start."""
    train_x, _ = vae.preload(vae.load_mnist(os.environ["MNIST_ROOT"], train=True), limit=6000)
    torch.manual_seed(0)
    model = vae.VAE(20)
    start = sum(vae.evaluate(model, train_x))
    losses = vae.train_vae(model, train_x, epochs=1, log=None, progress=False)["train_loss"]
    assert start > 500 and 150 < losses[0] < 260


# ------------------------------------------------------------------ faults (wrong numbers, true advice)

def test_faults_a_sweep_whose_only_configuration_diverged_has_no_best(tmp_path, monkeypatch):
    X, y = logreg_blobs(200, 16, seed=4)
    train, test = fault_mats(tmp_path, X, y, *logreg_blobs(80, 16, seed=5))
    out, figs = tmp_path / "out", tmp_path / "figs"
    proc = sweep_run("--train-mat", train, "--test-mat", test, "--out-dir", out, "--figures-dir", figs,
                     "--batch-sizes", "32", "--lrs", "1e9", "--epochs", "3", "--jobs", "1")
    assert proc.returncode == 0, proc.stderr
    sweep = json.loads((out / "sweep_logreg.json").read_text())
    (run,) = sweep["runs"]
    assert run["diverged"] and run["diverged_epoch"] == 1 and sweep["best"] is None
    assert sweep_logreg.NO_BEST in proc.stdout
    titles = []
    monkeypatch.setattr(sweep_logreg, "save_figure", lambda fig, path, **kw: titles.append(fig._suptitle.get_text()))
    sweep_logreg.plot_sweep(sweep, str(tmp_path / "figs2"))
    assert sweep_logreg.NO_BEST in titles[0]
    report = tmp_path / "REPORT.md"
    proc = run_cli("experiments.report", "--out-dir", out, "--figures-dir", figs, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "No configuration converged: every one diverged" in report.read_text()


@pytest.mark.parametrize("damage", ["truncated", "nan", "directory"])
def test_faults_a_bad_sweep_checkpoint_names_it_and_a_repair(damage, vae_sweep, vae_data_root, tmp_path):
    """The advice repairs: without the summary, make reruns the sweep, which trains again only the z_dim
    whose checkpoint does not read, and loads the others."""
    out = tmp_path / "out"
    shutil.copytree(vae_sweep, out, ignore=shutil.ignore_patterns("figs"))
    path = out / "sweep_vae" / "vae_z5.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "nan":
        ckpt = torch.load(path, weights_only=True)
        ckpt["model"]["encoder.fc1.bias"][3] = math.inf
        torch.save(ckpt, path)
    else:
        path.unlink()
        path.mkdir()
    figs = tmp_path / "figs"
    figs.mkdir()
    before = snapshot(tmp_path)
    proc = vae_in_process("--plot-only", "--out-dir", out, "--figures-dir", figs, "--data-root", vae_data_root,
                          script=sweep_vae)
    fragment = {"truncated": "zip archive", "nan": "encoder.fc1.bias holds NaN or infinite",
                "directory": "Is a directory"}[damage]
    line = assert_rejected(proc, before, [tmp_path], str(path), fragment)
    assert line.endswith(f"rm -f '{out / 'sweep_vae.json'}' && make sweep-vae"), line
    if damage == "directory":
        return     # a folder of the user's where a checkpoint goes: the sweep does not remove it
    (out / "sweep_vae.json").unlink()                                          # the advice; make then runs:
    proc = vae_sweep_run(vae_data_root, out, figs, 20, 5, 2, extra=["--processes", "2", "--threads", "1"])
    assert proc.stdout.count("wrote ") == 2 + len(sweep_vae.FIGURE_NAMES) and f"wrote {path}" in proc.stdout
    repaired = json.loads((out / "sweep_vae.json").read_text())
    original = json.loads((vae_sweep / "sweep_vae.json").read_text())["runs"]
    assert repaired["trained"] == [5] and len(repaired["runs"]) == len(original) == 3
    for again, first in zip(repaired["runs"], original):      # the same numbers: the same runs
        assert all(again[key] == first[key] for key in ("z_dim", *vae.HISTORY_KEYS))


def test_sweep_vae_trains_only_the_z_dims_it_lacks(vae_data_root, tmp_path):
    """An interrupted sweep keeps its finished z_dims; a z_dim added trains alone; a checkpoint trained
    with other settings trains again; the summary lists exactly the z_dims asked."""
    out, figs = tmp_path / "out", tmp_path / "figs"
    extra = ["--limit", "64", "--processes", "1", "--threads", "1"]

    def sweep(*z_dims, epochs="2"):
        proc = vae_in_process("--z-dims", *z_dims, "--data-root", vae_data_root, "--out-dir", out, "--figures-dir",
                              figs, "--epochs", epochs, "--device", "cpu", *extra, script=sweep_vae)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((out / "sweep_vae.json").read_text())
        assert summary["z_dims"] == [run["z_dim"] for run in summary["runs"]] == list(z_dims)
        return summary["trained"], {run["z_dim"]: run["test_loss"] for run in summary["runs"]}

    first = sweep(3, 4)
    assert first[0] == [3, 4]
    (out / "sweep_vae" / "vae_z4.pt").unlink()                 # as if interrupted while z_dim 4 trained
    stamp = os.stat(out / "sweep_vae" / "vae_z3.pt").st_mtime_ns
    assert sweep(3, 4) == ([4], first[1])                     # the same numbers: one run, however it was split
    assert os.stat(out / "sweep_vae" / "vae_z3.pt").st_mtime_ns == stamp
    assert sweep(3, 4, 2)[0] == [2] and sweep(4) == ([], {4: first[1][4]})
    assert sweep(3, epochs="1")[0] == [3]                     # other settings: trained again


def test_sweep_vae_caps_processes_at_the_cores(vae_data_root, tmp_path):
    cores = len(os.sched_getaffinity(0))
    proc = vae_sweep_run(vae_data_root, tmp_path, tmp_path / "figs", *range(3, 4 + cores),
                         extra=["--epochs", "1", "--limit", "32", "--processes", "1000", "--threads", "1"])
    assert f"in {cores} process(es)" in proc.stdout
    assert json.loads((tmp_path / "sweep_vae.json").read_text())["processes"] == cores


WORKER_OUTLIVES_CODE = """
import multiprocessing, os, sys, time
from lab.machine import as_worker
pool = multiprocessing.get_context("spawn").Pool(1, initializer=as_worker)
print(pool.apply(os.getpid), flush=True)
pool.apply_async(time.sleep, (120,))
time.sleep(120)
"""


def test_sweep_vae_workers_die_with_their_parent(tmp_path):
    """kill -9 of a sweep leaves no worker training on: each asks Linux to kill it when its parent dies."""
    parent = subprocess.Popen([sys.executable, "-c", WORKER_OUTLIVES_CODE], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    for _ in range(200):
        try:
            with open(f"/proc/{worker}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":   # dead, not yet reaped
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(worker, 9)
        pytest.fail("the worker outlived its killed parent")
