"""Make: the pipeline end to end on tiny data, the report, settings records, and safety (nothing it did not make is touched; interrupts keep completed outputs)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import scipy.io as sio
import torch

import lab.cli
import lab.files
import lab.machine
import lab.mnist
import lab.plots
from helpers import (HERE, OFFLINE_ENV, assert_rejected, assert_user_error, leftovers, make_mnist, run_cli,
                     sigint_as_in_a_terminal, snapshot)


# ------------------------------------------------------ Make and the report

def run_make(*args, timeout=600):
    """`make ARGS` in the project with this interpreter (no .venv is built)."""
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, timeout=timeout)


def tiny_pipeline_args(data, top):
    return [f"DATA={data}", "WEIGHTS=none", "LIMIT=40", "DEVICE=cpu", f"OUT={top}/out",
            f"FIGURES={top}/figures", f"REPORT={top}/doc/REPORT.md"]


def markdown_table(text, first_header):
    """{first cell: [other cells]} of the Markdown table whose header starts with first_header."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """`make all` once on tiny MNIST (random-init weights): every artifact and the report."""
    top = tmp_path_factory.mktemp("pipeline")
    data = make_mnist(str(top / "data"), n_train=60, n_test=40, seed=5)
    proc = run_make("all", *tiny_pipeline_args(data, top))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return top, data


def test_report_numbers_equal_the_saved_results(tiny_pipeline):
    top, _ = tiny_pipeline
    report = (top / "doc" / "REPORT.md").read_text()
    with open(top / "out" / "logreg_metrics.json") as f:
        lr = json.load(f)
    with open(top / "out" / "vae_metrics.json") as f:
        vm = json.load(f)
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    assert "RANDOM-INIT" in report and "WARNING" in report
    assert f"Test accuracy **{lr['test_accuracy']:.4f}**" in report
    auc = markdown_table(report, "ROC")
    for k, value in lr["auc"]["per_class"].items():
        assert auc[f"class {k}"] == [fmt(value, ".5f")]
    assert auc["micro average"] == [fmt(lr["auc"]["micro"], ".5f")]
    assert auc["macro average"] == [fmt(lr["auc"]["macro"], ".5f")]
    with np.load(top / "out" / "logreg.npz") as z:
        test_acc = z["test_acc"]
    accs = markdown_table(report, "classifier epoch")["test accuracy"]
    assert accs == [f"{a:.4f}" for a in test_acc]
    losses = markdown_table(report, "epoch")
    for i, (train, test) in enumerate(zip(vm["train_loss_per_epoch"], vm["test_loss_per_epoch"])):
        row = losses[str(i + 1)]
        assert row[:2] == [f"{train:.2f}", f"{test:.2f}"]
        if "test_recon_per_epoch" in vm:
            assert row[2:4] == [f"{vm['test_recon_per_epoch'][i]:.2f}", f"{vm['test_kl_per_epoch'][i]:.2f}"]
    stages = markdown_table(report, "stage")
    mat = sio.loadmat(top / "out" / "mnist_train.mat", variable_names=["elapsed_seconds"])
    assert stages["features, train"][1] == f"{mat['elapsed_seconds'].item():.1f}"
    assert stages["VAE"][1] == f"{vm['seconds']:.1f}"
    # every figure is embedded, and every link resolves from where the report is
    links = [ln[ln.index("](") + 2:-1] for ln in report.splitlines() if ln.startswith("![")]
    pngs = sorted(p.name for p in (top / "figures").glob("*.png"))
    assert sorted(os.path.basename(p) for p in links) == pngs and pngs
    assert all((top / "doc" / p).is_file() for p in links)


@pytest.mark.parametrize("report", ["dir", "dir/", "new/"])
def test_report_path_that_names_a_directory_is_one_line(report, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    proc = run_cli("experiments.report", "--out-dir", tmp_path / "out", "--report", f"{tmp_path}/{report}")
    assert_rejected(proc, before, [tmp_path], "names a directory")


def test_make_all_twice_does_no_work(tiny_pipeline):
    top, data = tiny_pipeline
    proc = run_make("all", *tiny_pipeline_args(data, top))
    assert proc.returncode == 0 and sys.executable not in proc.stdout, proc.stdout


def test_make_resumes_after_an_interrupt_without_redoing_completed_stages(tmp_path):
    """Ctrl-C (SIGINT to make's process group) while the test split is extracted, the
    train .mat complete; then `make all` finishes the job without redoing the train split."""
    data = make_mnist(str(tmp_path / "data"), n_train=60, n_test=3000, seed=5)
    settings = [a for a in tiny_pipeline_args(data, tmp_path) if not a.startswith("LIMIT=")]
    args = ["make", "--no-print-directory", f"PYTHON={sys.executable}", "all", *settings]
    proc = subprocess.Popen(args, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    splits_started = 0
    try:
        for line in proc.stdout:
            splits_started += line.startswith("ResNet-50 weights:")   # printed by each split's run
            if splits_started == 2:   # the test split's model is built; 3000 images to go
                break
        assert splits_started == 2, "make never reached the test split"
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    assert "completed: nothing" in rest or "nothing was completed" in rest, rest
    out = tmp_path / "out"
    train_mtime = os.stat(out / "mnist_train.mat").st_mtime_ns
    assert not (out / "mnist_test.mat").exists() and not list(out.glob(".*.tmp"))
    again = run_make("all", *settings)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "--split train" not in again.stdout and "--split test" in again.stdout
    assert os.stat(out / "mnist_train.mat").st_mtime_ns == train_mtime
    assert (out / "vae.pt").is_file() and (tmp_path / "doc" / "REPORT.md").is_file()
    third = run_make("all", *settings)
    assert third.returncode == 0 and sys.executable not in third.stdout, third.stdout


@pytest.mark.parametrize("setting", ["DEVICE=gpu", "LIMIT=abc", "LIMIT=0", "LIMIT=-5", "OUT=a b",
                                     "REPORT=", "FIGURES=x y", "DTYPE=float16", "DTYPE=",
                                     "SWEEP_MODE=fast", "SWEEP_EPOCHS=0", "SWEEP_BATCH=16 x",
                                     "ZDIMS=2 2.5", "ZDIMS=", "SWEEP_LR=", "THREADS=0", "THREADS=two"])
def test_make_rejects_bad_settings_before_running_anything(setting, tmp_path):
    name, _, value = setting.partition("=")
    before = snapshot(HERE + "/artifacts") if os.path.isdir(HERE + "/artifacts") else {}
    base = [f"OUT={tmp_path}/out", f"FIGURES={tmp_path}/fig", f"REPORT={tmp_path}/R.md"]
    proc = run_make("all", *[a for a in base if not a.startswith(name + "=")], f"{name}={value}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and name in lines[0], proc.stderr
    assert leftovers(tmp_path) == [] and proc.stdout == ""
    assert (snapshot(HERE + "/artifacts") if os.path.isdir(HERE + "/artifacts") else {}) == before


# ------------------------------------------------------------------ Make: safety

def checkout_copy(tmp_path):
    """The project's tracked files in a fresh git checkout, tmp_path/repo (skips without git)."""
    listed = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("needs git and a git checkout of the project")
    repo = tmp_path / "repo"
    for name in listed.stdout.split():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(open(os.path.join(HERE, name), "rb").read())
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    return repo


def make_in(repo, *args, env=None, timeout=600):
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", *map(str, args)],
                          capture_output=True, text=True, cwd=repo, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("goal", ["clean", "all", "report"])
@pytest.mark.parametrize("setting", ["OUT=.", "OUT=..", "OUT={repo}", "OUT={repo}/", "OUT=.ci", "FIGURES=.",
                                     "FIGURES=..", "FIGURES=.ci", "REPORT=README.md", "REPORT=.",
                                     "REPORT=figures", "REPORT=figures/.gitkeep"])
def test_make_refuses_paths_that_are_the_checkout_or_tracked(goal, setting, tmp_path):
    """`make clean OUT=$PWD` once deleted the whole checkout, .git included."""
    repo = checkout_copy(tmp_path)
    (repo / "artifacts").mkdir()
    (repo / "artifacts" / "vae.pt").write_bytes(b"a result")
    before = snapshot(tmp_path)
    proc = make_in(repo, goal, setting.format(repo=repo))
    line = assert_user_error(proc, setting.split("=")[0])
    assert "checkout" in line or "tracked by git" in line, line
    assert snapshot(tmp_path) == before and proc.stdout == ""


def test_make_clean_removes_only_what_the_pipeline_wrote(tiny_pipeline, tmp_path):
    """clean removes the outputs of `make all`, the sweeps' and a killed run's temp files,
    by name: a user's own files, and tracked ones, stay (OUT=figures once deleted .gitkeep)."""
    top, _ = tiny_pipeline
    repo = checkout_copy(tmp_path)
    shutil.copytree(top / "out", repo / "figures", dirs_exist_ok=True)   # OUT=figures
    shutil.copytree(top / "figures", repo / "figures", dirs_exist_ok=True)
    shutil.copy(top / "doc" / "REPORT.md", repo / "REPORT.md")
    (repo / "figures" / "sweep_vae").mkdir()
    pipeline = ["sweep_logreg.json", "sweep_vae.json", "sweep_vae/vae_z2.pt", ".vae.pt.k2j3.tmp",
                "sweep_vae/.vae_z5.pt.x1.tmp", ".roc.png.a9.tmp", "sweep_logreg.png", "vae_latent_2d.png"]
    for name in pipeline:
        (repo / "figures" / name).write_bytes(b"pipeline")
    (repo / ".REPORT.md.q7.tmp").write_bytes(b"pipeline")
    mine = ["figures/my_plot.png", "figures/notes.tmp", "figures/.notes.md.x.tmp", "my.mat"]
    for name in mine:
        (repo / name).write_bytes(b"mine")
    ignored = subprocess.run(["git", "check-ignore", "figures/.roc.png.a9.tmp", ".REPORT.md.q7.tmp"],
                             cwd=repo, capture_output=True, text=True).stdout.split()
    assert ignored == ["figures/.roc.png.a9.tmp", ".REPORT.md.q7.tmp"]
    tracked = {name: (repo / name).read_bytes() for name in subprocess.run(
        ["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split()}
    proc = make_in(repo, "clean", "OUT=figures")
    assert proc.returncode == 0, proc.stderr
    left = sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                  if p.is_file() and p.relative_to(repo).parts[0] != ".git")
    assert left == sorted(set(tracked) | set(mine)), left
    assert all((repo / name).read_bytes() == data for name, data in tracked.items())
    # OUT is removed once nothing is left in it, and kept if something of the user's is
    for user_file in [False, True]:
        (repo / "artifacts").mkdir()
        shutil.copy(top / "out" / "vae.pt", repo / "artifacts")
        if user_file:
            (repo / "artifacts" / "keep.txt").write_text("mine")
        assert make_in(repo, "clean").returncode == 0
        assert leftovers(repo / "artifacts") == (["keep.txt"] if user_file else [])
        assert (repo / "artifacts").exists() == user_file


def pipeline_copy(tiny_pipeline, tmp_path):
    """A copy of tiny_pipeline's outputs in tmp_path (times kept: up to date); make's settings for it."""
    top, data = tiny_pipeline
    for name in ("out", "figures", "doc"):
        shutil.copytree(top / name, tmp_path / name)
    return tiny_pipeline_args(data, tmp_path)


def interrupt_make_when(ready, *args, sig=signal.SIGINT, timeout=300):
    """`make ARGS` in a process group of its own; ``sig`` goes to the whole group, as Ctrl-C's
    does, once ready() holds. Returns (exit status, everything make and the scripts printed)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(["make", "--no-print-directory", f"PYTHON={sys.executable}", *args], cwd=HERE,
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=sigint_as_in_a_terminal, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.time() + timeout
            while proc.poll() is None and not ready() and time.time() < deadline:
                time.sleep(0.005)
            assert proc.poll() is None and ready(), "make ended (or stalled) before the moment to interrupt it"
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        return proc.returncode, log.read()


def assert_interrupt_kept_what_it_said(output, *folders):
    """One 'interrupted' line, every file it calls completed still there, nothing deleted by
    make, no traceback or ignored exception, and no temp file."""
    for bad in ("Deleting file", "Traceback", "Exception ignored"):
        assert bad not in output, output
    said = [ln for ln in output.splitlines() if ": interrupted; " in ln]
    assert len(said) == 1, output
    completed = said[0].partition("; completed: ")[2].partition(";")[0]
    for path in filter(None, completed.split(", ")):
        assert os.path.isfile(os.path.join(HERE, path)), f"{path} was called completed: {said[0]}"
    assert not [p for folder in folders for p in folder.rglob(".*.tmp")]
    return said[0]


def mtime(path):
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


# stage: (goal, what to make stale first, when to interrupt, the output that must survive,
# the training command that must not run again)
STAGES = {
    "logreg's figures": ("all", "out/logreg.npz", "out/logreg.npz", "out/logreg.npz", "logreg.py --train-mat"),
    "vae's figures": ("all", "out/vae.pt", "out/vae.pt", "out/vae.pt", "vae.py --data-root"),
    "make figures": ("figures", "touch out/vae.pt", "figures/vae_loss.png", "figures/vae_interpolation.png",
                     "vae.py --data-root"),
}


@pytest.mark.parametrize("stage, sig", [("logreg's figures", signal.SIGINT), ("vae's figures", signal.SIGINT),
                                        ("make figures", signal.SIGINT), ("vae's figures", signal.SIGTERM),
                                        ("vae's figures", signal.SIGHUP)])
def test_make_interrupted_at_each_stage_keeps_what_the_scripts_completed(stage, sig, tiny_pipeline, tmp_path):
    """Ctrl-C while logreg.py drew roc.png once made make delete the logreg.npz it had just
    called completed; during `make figures`, every vae_*.png, drawn or not."""
    goal, stale, moment, kept, training = STAGES[stage]
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    if stale.startswith("touch "):
        os.utime(tmp_path / stale.split()[1])
    else:
        os.remove(tmp_path / stale)
    before = mtime(tmp_path / moment)
    code, output = interrupt_make_when(lambda: mtime(tmp_path / moment) != before, goal, *settings, sig=sig)
    assert code != 0
    assert_interrupt_kept_what_it_said(output, tmp_path)
    assert (tmp_path / kept).is_file()
    again = run_make("all", *settings)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert training not in again.stdout and "--plot-only" in again.stdout, again.stdout
    third = run_make("all", *settings)
    assert third.returncode == 0 and sys.executable not in third.stdout, third.stdout


def test_a_failing_figure_step_keeps_the_figures_it_did_not_draw(tiny_pipeline, tmp_path):
    """A damaged checkpoint fails the figures' rule: make (.DELETE_ON_ERROR once) deletes none of them."""
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    checkpoint = tmp_path / "out" / "vae.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = snapshot(tmp_path / "figures")
    proc = run_make("figures", *settings)
    assert proc.returncode != 0 and "Deleting" not in proc.stderr, proc.stderr
    assert snapshot(tmp_path / "figures") == before


def test_a_second_sigterm_during_the_cleanup_changes_nothing(tmp_path):
    """make passes its own SIGTERM on to the running script, so a `kill` of make's process group
    sends the script two: the second, here during Python's shutdown, once printed
    'Exception ignored ... KeyboardInterrupt: signal 15'."""
    code = """if True:
        import atexit, os, signal, sys, time
        import lab.files, lab.cli
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))
        def main():
            lab.files.plan_outputs([sys.argv[1]])
            with lab.files.atomic_path(sys.argv[1]) as tmp:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        lab.cli.run_main(main)"""
    proc = subprocess.run([sys.executable, "-c", code, tmp_path / "out.txt"], cwd=HERE, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 130
    assert_user_error(proc, "interrupted; nothing was completed; not written: ")
    assert leftovers(tmp_path) == []


def test_a_killed_run_leaves_temp_files_that_clean_removes(tiny_pipeline, tmp_path):
    """SIGKILL gives a script no chance to remove its temp file: `make clean` does."""
    settings = pipeline_copy(tiny_pipeline, tmp_path / "run")
    os.utime(tmp_path / "run" / "out" / "vae.pt")
    temps = lambda: list((tmp_path / "run").rglob(".*.tmp"))  # noqa: E731
    interrupt_make_when(temps, "figures", *settings, sig=signal.SIGKILL)
    assert temps()
    repo = checkout_copy(tmp_path)
    assert make_in(repo, "clean", *settings).returncode == 0
    assert not temps() and not (tmp_path / "run" / "out").exists()

def test_an_interrupt_just_after_a_rename_still_counts_the_file_as_completed(tmp_path, monkeypatch):
    """Ctrl-C landing between the rename of a finished file and its record once made the
    script say 'not written' of a file it had just completed."""
    real_replace, path = os.replace, str(tmp_path / "a.json")

    def replace_then_ctrl_c(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
        lab.files.plan_outputs([path])
        with pytest.raises(KeyboardInterrupt):
            lab.files.write_json(path, {"done": True})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert json.loads(open(path).read()) == {"done": True}
    assert lab.files.interrupt_message().startswith(f"interrupted; completed: {os.path.relpath(path)};")

def assert_make_failed_in_one_line(proc):
    """The script's one line, then make's own '*** ... Error' line; no traceback."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("make: ***")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("bad", ["WEIGHTS=/nonexistent.pth", "DEVICE=cuda", "DATA={tmp}/nodata"])
def test_a_failed_run_changes_no_settings_record_and_creates_nothing(bad, tiny_pipeline, tmp_path):
    """`make all WEIGHTS=/nonexistent.pth` once rewrote the settings stamp, so the next good
    `make all` redid everything; DATA=/nonexistent created /nonexistent/MNIST/raw."""
    if bad == "DEVICE=cuda" and torch.cuda.is_available():
        pytest.skip("DEVICE=cuda works on this machine")
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    before = snapshot(tmp_path)
    proc = make_in(HERE, "all", *settings, bad.format(tmp=tmp_path), env=OFFLINE_ENV)
    assert_make_failed_in_one_line(proc)
    assert snapshot(tmp_path) == before
    again = run_make("all", *settings)
    assert again.returncode == 0 and sys.executable not in again.stdout, again.stdout


def test_a_failed_sweep_keeps_the_record_of_the_last_good_one(tiny_pipeline, tmp_path):
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    grid = ["SWEEP_BATCH=16", "SWEEP_LR=1e-2", "SWEEP_EPOCHS=1"]
    first = run_make("sweep-logreg", *settings, *grid)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path)
    proc = run_make("sweep-logreg", *settings, "SWEEP_BATCH=16", "SWEEP_LR=abc", "SWEEP_EPOCHS=1")
    assert "abc" in assert_make_failed_in_one_line(proc)
    assert snapshot(tmp_path) == before
    again = run_make("sweep-logreg", *settings, *grid)
    assert again.returncode == 0 and sys.executable not in again.stdout, again.stdout


def test_the_same_data_path_written_differently_is_the_same_setting(tiny_pipeline, tmp_path):
    """DATA=../shared/data/, with a trailing slash, once rebuilt everything."""
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    data = next(a for a in settings if a.startswith("DATA=")).partition("=")[2]
    for same in (data + "/", os.path.relpath(data, HERE), "./" + os.path.relpath(data, HERE) + "/"):
        proc = run_make("all", *settings, f"DATA={same}")
        assert proc.returncode == 0 and sys.executable not in proc.stdout, proc.stdout




# --------------------------------------------------------- README's worked example

def test_readme_example_hidden_512_then_make_vae_trains_the_edit(tmp_path):
    """README, "Changing the models": `HIDDEN = 400` -> `HIDDEN = 512` in vae.py, then `make vae`:
    Make retrains, and the checkpoint it leaves is the wider model, trained."""
    readme = open(os.path.join(HERE, "README.md")).read()
    assert "`HIDDEN = 400`" in readme and "`HIDDEN = 512`" in readme and "`make vae`" in readme
    repo = checkout_copy(tmp_path)
    data = make_mnist(str(tmp_path / "data"), n_train=60, n_test=40, seed=5)
    settings = [f"DATA={data}", "LIMIT=40", "DEVICE=cpu", "THREADS=1"]
    assert make_in(repo, "vae", *settings).returncode == 0
    source = (repo / "vae.py").read_text()
    assert source.count("HIDDEN = 400\n") == 1
    (repo / "vae.py").write_text(source.replace("HIDDEN = 400\n", "HIDDEN = 512\n"))
    proc = make_in(repo, "vae", *settings)
    assert proc.returncode == 0 and "vae.py --data-root" in proc.stdout, proc.stdout + proc.stderr
    ckpt = torch.load(repo / "artifacts" / "vae.pt", weights_only=True)
    assert ckpt["model"]["encoder.fc1.weight"].shape == (512, 784)
    assert ckpt["model"]["decoder.fc3.weight"].shape == (512, ckpt["config"]["z_dim"])
    losses = ckpt["train_loss"]
    assert len(losses) == 15 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
