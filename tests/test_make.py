"""Make on a tiny pipeline: the report equals the saved results, settings records, a clean
that removes only what the pipeline wrote, and interrupts at each stage that keep what was completed."""
import json
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

from helpers import (HERE, OFFLINE_ENV, checkout_copy, leftovers, make_in, run_make,
                     sigint_as_in_a_terminal, snapshot, tiny_pipeline_args)


# ------------------------------------------------------ Make and the report


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


def test_make_all_twice_does_no_work(tiny_pipeline):
    top, data = tiny_pipeline
    proc = run_make("all", *tiny_pipeline_args(data, top))
    assert proc.returncode == 0 and sys.executable not in proc.stdout, proc.stdout


def test_make_j4_all_draws_each_figure_once(tiny_pipeline):
    """With -j, make must look at the figures only after the runs that draw them: not redraw them."""
    top, _ = tiny_pipeline
    log = (top / "make_all.log").read_text()
    drawn = [ln.split()[1] for ln in log.splitlines() if ln.startswith("wrote ") and ln.endswith(".png")]
    assert "--plot-only" not in log and len(drawn) == len(set(drawn)) == 8, log


# ------------------------------------------------------------------ Make: safety


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


@pytest.mark.parametrize("stage, sig", [("logreg's figures", signal.SIGTERM), ("vae's figures", signal.SIGINT),
                                        ("make figures", signal.SIGINT), ("vae's figures", signal.SIGHUP)])
def test_make_interrupted_at_each_stage_keeps_what_the_scripts_completed(stage, sig, tiny_pipeline, tmp_path):
    """Ctrl-C while logreg.py drew roc.png once made make delete the logreg.npz it had just
    called completed; during `make figures`, every vae_*.png, drawn or not."""
    goal, stale, moment, kept, training = STAGES[stage]
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    if stale.startswith("touch "):
        os.utime(tmp_path / stale.split()[1])
    else:   # a fresh run: its settings record too, which must be written once the output is complete
        os.remove(tmp_path / stale)
        (tmp_path / stale).with_name(f".{os.path.basename(stale)}.args").unlink(missing_ok=True)
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


def assert_make_failed_in_one_line(proc):
    """The script's one line, then make's own '*** ... Error' line; no traceback."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("make: ***")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("bad", ["WEIGHTS=/nonexistent.pth", "DATA={tmp}/nodata"])
def test_a_failed_run_changes_no_settings_record_and_creates_nothing(bad, tiny_pipeline, tmp_path):
    """`make all WEIGHTS=/nonexistent.pth` once rewrote the settings stamp, so the next good
    `make all` redid everything; DATA=/nonexistent created /nonexistent/MNIST/raw."""
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    before = snapshot(tmp_path)
    proc = make_in(HERE, "all", *settings, *bad.format(tmp=tmp_path).split(), env=OFFLINE_ENV)
    assert_make_failed_in_one_line(proc)
    assert snapshot(tmp_path) == before
    again = run_make("all", *settings)
    assert again.returncode == 0 and sys.executable not in again.stdout, again.stdout


def test_a_failed_sweep_keeps_the_record_of_the_last_good_one(tiny_pipeline, tmp_path):
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    grid = ["SWEEP_BATCH=16", "SWEEP_LR=1e-2", "SWEEP_EPOCHS=1"]
    first = run_make("-j4", "sweep-logreg", *settings, *grid)
    assert first.returncode == 0 and "--plot-only" not in first.stdout, first.stdout   # its figure, drawn once
    before = snapshot(tmp_path)
    proc = run_make("sweep-logreg", *settings, "SWEEP_BATCH=16", "SWEEP_LR=abc", "SWEEP_EPOCHS=1")
    assert "abc" in assert_make_failed_in_one_line(proc)
    assert snapshot(tmp_path) == before
    again = run_make("sweep-logreg", *settings, *grid)
    assert again.returncode == 0 and sys.executable not in again.stdout, again.stdout


def test_the_same_settings_written_differently_rebuild_nothing(tiny_pipeline, tmp_path):
    """DATA=../shared/data/, with a trailing slash, once rebuilt everything; so did DATA through a
    symlink, DEVICE=auto after DEVICE=cpu (the same device here), and another thread count."""
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    data = next(a for a in settings if a.startswith("DATA=")).partition("=")[2]
    os.symlink(data, tmp_path / "link")
    for same in (data + "/", os.path.relpath(data, HERE), "./" + os.path.relpath(data, HERE) + "/", tmp_path / "link"):
        proc = run_make("all", *settings, f"DATA={same}", "DEVICE=auto", "THREADS=1")
        assert proc.returncode == 0 and sys.executable not in proc.stdout, proc.stdout


def test_render_goals_never_train_and_a_changed_setting_retrains_only_its_stage(tiny_pipeline, tmp_path):
    """`make figures` without the LIMIT/WEIGHTS of the run, or after lab/plots.py changed, once
    re-extracted and retrained; `make report` once retrained a missing stage."""
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    bare = [a for a in settings if not a.startswith(("LIMIT=", "WEIGHTS="))]
    os.utime(tmp_path / "out" / "logreg.npz")
    (tmp_path / "out" / "vae_metrics.json").unlink()
    for goal in ("figures", "report"):
        proc = run_make(goal, *bare)
        assert proc.returncode == 0, proc.stderr
        assert "--plot-only" in proc.stdout or goal == "report", proc.stdout
        assert not [s for s in ("extract_features.py", "--train-mat", "vae.py --data-root") if s in proc.stdout]
    assert "VAE" in (tmp_path / "doc" / "REPORT.md").read_text()
    proc = run_make("all", *settings, "EPOCHS=2")   # logreg and the VAE read EPOCHS, the features do not
    assert proc.returncode == 0, proc.stderr
    assert "extract_features.py" not in proc.stdout and "--epochs 2" in proc.stdout, proc.stdout
    assert len(json.load(open(tmp_path / "out" / "vae_metrics.json"))["train_loss_per_epoch"]) == 2
    assert sys.executable not in run_make("all", *settings, "EPOCHS=2").stdout


def test_make_figures_on_empty_out_is_one_line(tmp_path):
    proc = run_make("figures", f"OUT={tmp_path}/out", f"FIGURES={tmp_path}/figures")
    assert_make_failed_in_one_line(proc)
    assert "make all" in proc.stderr and not (tmp_path / "figures").exists()


def test_damaged_output_advice_repairs_it(tiny_pipeline, tmp_path):
    """`truncate -s 100000 vae.pt; make figures` said "rerun `make vae`", and `make vae` then did nothing."""
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    for name, goal in (("vae.pt", "figures"), ("logreg.npz", "figures")):
        path = tmp_path / "out" / name
        path.write_bytes(path.read_bytes()[:100])
        line = assert_make_failed_in_one_line(run_make(goal, *settings))
        advice = line.partition("remove it and rebuild it: ")[2]
        assert advice.startswith("rm -f ") and " && make " in advice, line
        target = advice.rpartition("make ")[2]
        os.remove(path)
        assert run_make(target, *settings).returncode == 0
        assert run_make(goal, *settings).returncode == 0


# ------------------------------------------------------------------ faults (wrong numbers, true advice)

def test_faults_make_rebuilds_a_missing_metrics_file_that_the_report_reads(tiny_pipeline, tmp_path):
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    for target, metrics, script in (("vae", "vae_metrics.json", "vae.py"),
                                    ("logreg", "logreg_metrics.json", "logreg.py")):
        dry = run_make("-n", target, *settings)
        assert dry.returncode == 0 and script not in dry.stdout, dry.stdout
        os.remove(tmp_path / "out" / metrics)
        dry = run_make("-n", target, *settings)
        assert dry.returncode == 0 and f"{script} " in dry.stdout, dry.stdout + dry.stderr
    proc = run_make("all", *settings)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "doc" / "REPORT.md").read_text()
    assert "## Variational autoencoder" in report and "## Logistic regression" in report
    records = sorted(p.name for p in (tmp_path / "out").glob(".*.args"))
    assert ".vae.pt.args" in records and ".vae_metrics.json.args" not in records
    assert sys.executable not in run_make("all", *settings).stdout     # and nothing is left to do
