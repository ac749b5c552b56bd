"""The lab's test suite: `python test_all.py` (or `pytest test_all.py`).

Runs offline and without ../shared: tiny MNIST-format IDX files are built in a
temp dir. Tests that need the real MNIST read $MNIST_ROOT and skip without it.
"""
import copy
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import scipy.io as sio
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import extract_features as ef  # noqa: E402
import logreg  # noqa: E402
import roc  # noqa: E402
import sweep_logreg  # noqa: E402
import vae  # noqa: E402

# A proxy on a closed local port makes every download fail at once, whether or
# not the machine running the tests has internet.
OFFLINE_ENV = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "no_proxy": "", "NO_PROXY": ""}


# ------------------------------------------------------------------ helpers

def write_idx(path, array):
    """Write a uint8 array as an MNIST IDX file (magic 0x0803 images, 0x0801 labels)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def make_mnist(root, n_train, n_test, seed=0):
    """Tiny MNIST in torchvision's layout: digit-like blobs whose position depends on the label."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, label in enumerate(labels):
            r, c = 4 + 2 * (label // 4) * 3, 4 + (label % 4) * 5
            images[i, r:r + 8, c:c + 6] = rng.integers(180, 256, size=(8, 6))
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    return root


def run_cli(script, *args, env=None, timeout=300):
    """Run one of the lab's scripts as a user would; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout, cwd=HERE)


def assert_user_error(proc, *fragments):
    """A user mistake: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    # tqdm's progress bars share stderr (each ends in "<rate>/s]"); the message is the rest.
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.rstrip().endswith("/s]")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
    return lines[0]


def leftovers(directory):
    return sorted(f for f in os.listdir(directory)) if os.path.isdir(directory) else []


def snapshot(*directories):
    """{path: (size, mtime_ns, bytes)} of every file (and directory) under ``directories``."""
    state = {}
    for top in map(str, directories):
        for folder, dirs, files in os.walk(top):
            state[folder] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    state[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns, f.read())
    return state


def assert_rejected(proc, before, directories, *fragments):
    """A bad input: one line on stderr, non-zero exit, no traceback, and no new or
    changed file under ``directories`` (``before`` is their snapshot())."""
    line = assert_user_error(proc, *fragments)
    assert snapshot(*directories) == before, f"files changed after: {line}"
    return line


def sigint_as_in_a_terminal():
    """For a child process: Ctrl-C's default action, whoever started the tests. A shell
    without job control (a CI script's `cmd &`, nohup) starts its background jobs with
    SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_at(marker, code, args, sig=signal.SIGTERM, timeout=120):
    """Run ``code`` (python -c, argv = args) until it prints ``marker`` on stdout,
    then send ``sig``. Asserts that the marker was reached; returns (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_in_a_terminal)
    reached, deadline = False, time.time() + timeout
    try:
        for line in proc.stdout:
            if marker in line:
                reached = True
                break
            if time.time() > deadline:
                break
        assert reached, f"the run never printed {marker!r}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


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
    proc = run_cli("report.py", "--out-dir", tmp_path / "out", "--report", f"{tmp_path}/{report}")
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
        import labio
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))
        def main():
            labio.plan_outputs([sys.argv[1]])
            with labio.atomic_path(sys.argv[1]) as tmp:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        labio.run_main(main)"""
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
        labio.plan_outputs([path])
        with pytest.raises(KeyboardInterrupt):
            labio.write_json(path, {"done": True})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert json.loads(open(path).read()) == {"done": True}
    assert labio.interrupt_message().startswith(f"interrupted; completed: {os.path.relpath(path)};")

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


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    return make_mnist(str(tmp_path_factory.mktemp("mnist")), n_train=48, n_test=32)


@pytest.fixture(scope="session")
def resnet_pth(tmp_path_factory):
    """A seeded random-init ResNet-50 state_dict with non-trivial batch-norm
    statistics, so that BN folding is really exercised."""
    from torchvision.models import resnet50

    torch.manual_seed(1234)
    model = resnet50(weights=None)
    gen = torch.Generator().manual_seed(99)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
    path = tmp_path_factory.mktemp("weights") / "resnet50_random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def features_run(mnist_root, resnet_pth, tmp_path_factory):
    """One extraction of both tiny splits through the CLI with the .pth weights."""
    out = str(tmp_path_factory.mktemp("features"))
    proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", out,
                   "--weights", resnet_pth, "--batch-size", "20", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def reference_model(pth):
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.load_state_dict(torch.load(pth, weights_only=True))
    return model.eval()


def assert_close_to(features, reference):
    scale = np.abs(reference).max()
    assert np.abs(features - reference).max() <= 1e-5 * scale


# ------------------------------------------------------- features: oracles

import labio  # noqa: E402


def test_features_match_assignment_per_image_loop(features_run, mnist_root, resnet_pth):
    """The assignment's loop: PIL image -> Grayscale(3) -> ToTensor -> Normalize -> net minus fc."""
    from torchvision import datasets, transforms

    out, _ = features_run
    transform = transforms.Compose([transforms.Grayscale(num_output_channels=3), transforms.ToTensor(),
                                    transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    dataset = datasets.MNIST(mnist_root, train=False, transform=transform)
    extractor = torch.nn.Sequential(*list(reference_model(resnet_pth).children())[:-1])
    with torch.inference_mode():
        reference = np.stack([extractor(img.unsqueeze(0)).flatten().numpy() for img, _ in dataset])
    mat = sio.loadmat(os.path.join(out, "mnist_test.mat"))
    assert_close_to(mat["features"], reference)
    assert np.array_equal(mat["labels"].ravel(), dataset.targets.numpy())


def test_features_match_torchvision_feature_extractor(features_run, mnist_root, resnet_pth):
    from torchvision import datasets
    from torchvision.models.feature_extraction import create_feature_extractor

    out, _ = features_run
    images = datasets.MNIST(mnist_root, train=True).data
    x = (images.float() / 255 - 0.5) / 0.5
    x = x.unsqueeze(1).repeat(1, 3, 1, 1)
    tv = create_feature_extractor(reference_model(resnet_pth), {"avgpool": "feat"})
    with torch.inference_mode():
        reference = tv(x)["feat"].flatten(1).numpy()
    mat = sio.loadmat(os.path.join(out, "mnist_train.mat"))
    assert_close_to(mat["features"], reference)


def test_batched_preprocessing_is_bit_equal_to_transforms(mnist_root):
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Grayscale(3), transforms.ToTensor(),
                                    transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    ds = datasets.MNIST(mnist_root, train=True)
    batch = ef.preprocess(ds.data[:8], 28)
    for i in range(8):
        assert torch.equal(batch[i], transform(ds[i][0]))


def test_flop_count_matches_known_resnet50_cost():
    from torchvision.models import resnet50

    model = resnet50(weights=None).eval()
    # torchvision documents 4.09 GFLOPS (multiply-adds) at 224x224.
    assert abs(ef.count_flops(model, 224) / 2 / 1e9 - 4.09) < 0.02
    model.fc = torch.nn.Identity()              # the extractor: 0.158 GFLOP at 28x28 (issue #2)
    assert abs(ef.count_flops(model, 28) / 1e9 - 0.158) < 0.001
    assert ef.count_flops(ef.build_extractor(model, torch.device("cpu")), 28) == ef.count_flops(model, 28)


# ------------------------------------------------------ features: contract

def assignment_get_one_hot(labels):
    """The assignment's own one-hot of a 1 x m label row from loadmat."""
    one_hot = np.zeros((labels.shape[1], 10))
    one_hot[np.arange(labels.shape[1]), labels[0]] = 1
    return one_hot


def mat_text(mat, key):
    return str(np.squeeze(mat[key]))


def test_mat_contract(features_run, mnist_root, resnet_pth):
    from torchvision import datasets

    out, proc = features_run
    for split, n in (("train", 48), ("test", 32)):
        trmat = sio.loadmat(os.path.join(out, f"mnist_{split}.mat"))
        features, labels = trmat["features"], trmat["labels"]
        assert features.shape == (n, 2048) and features.dtype == np.float32
        assert labels.shape == (1, n) and np.issubdtype(labels.dtype, np.integer)
        assert labels.min() >= 0 and labels.max() <= 9
        expected = datasets.MNIST(mnist_root, train=split == "train").targets.numpy()
        assert np.array_equal(labels[0], expected)
        onehot = assignment_get_one_hot(labels)
        assert onehot.shape == (n, 10) and np.array_equal(onehot.argmax(1), expected)
        assert np.isfinite(features).all() and (features >= 0).all()   # post-ReLU avgpool
        assert int(np.squeeze(trmat["image_size"])) == 28
        assert mat_text(trmat, "dtype") == "float32"
        assert mat_text(trmat, "torch_version") == torch.__version__
        assert float(np.squeeze(trmat["elapsed_seconds"])) > 0
        assert int(np.squeeze(trmat["threads"])) == 1          # --threads 1
        assert int(np.squeeze(trmat["batch_size"])) == 20
    assert "img/s" in proc.stdout and "GFLOP/s" in proc.stdout
    assert not [f for f in leftovers(out) if f.endswith(".tmp")]


def test_weights_file_is_recorded_by_hash_and_not_as_pretrained(features_run, resnet_pth):
    """A .pth is not known to hold ImageNet weights: pretrained=0, kind "file", its sha256."""
    import hashlib

    out, _ = features_run
    mat = sio.loadmat(os.path.join(out, "mnist_train.mat"))
    with open(resnet_pth, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert mat_text(mat, "weights") == f"file:{os.path.abspath(resnet_pth)} sha256:{digest}"
    assert mat_text(mat, "weights_kind") == "file"
    assert int(np.squeeze(mat["pretrained"])) == 0


def test_limit_and_split(mnist_root, resnet_pth, tmp_path):
    proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", tmp_path,
                   "--weights", resnet_pth, "--split", "test", "--limit", "7")
    assert proc.returncode == 0, proc.stderr
    assert leftovers(tmp_path) == ["mnist_test.mat"]
    mat = sio.loadmat(tmp_path / "mnist_test.mat")
    assert mat["features"].shape == (7, 2048) and mat["labels"].shape == (1, 7)


def test_random_init_is_said_loudly(mnist_root, tmp_path):
    proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", tmp_path,
                   "--weights", "none", "--split", "test", "--limit", "4")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM-INIT" in proc.stdout
    mat = sio.loadmat(tmp_path / "mnist_test.mat")
    assert mat_text(mat, "weights").startswith("random-init")
    assert mat_text(mat, "weights_kind") == "random-init"
    assert int(np.squeeze(mat["pretrained"])) == 0


def test_a_second_run_gives_bit_equal_features(mnist_root, tmp_path):
    """Nothing in the extraction is chosen by timing: two runs, the same features, bit for bit."""
    arrays = []
    for run in ("a", "b"):
        proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", tmp_path / run,
                       "--weights", "none", "--seed", "3", "--split", "test", "--limit", "12", "--batch-size", "5")
        assert proc.returncode == 0, proc.stderr
        arrays.append(torch.from_numpy(sio.loadmat(tmp_path / run / "mnist_test.mat")["features"]))
    assert torch.equal(arrays[0], arrays[1])


def test_extraction_features_do_not_depend_on_the_thread_count(resnet_pth, mnist_root):
    from torchvision import datasets

    images = datasets.MNIST(mnist_root, train=False).data[:12]
    cpu = torch.device("cpu")
    model = ef.build_extractor(reference_model(resnet_pth), cpu)
    initial = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[threads] = ef.compute_features(model, images, cpu, batch_size=4)
    finally:
        torch.set_num_threads(initial)
    torch.testing.assert_close(runs[2], runs[1], rtol=0, atol=1e-5 * runs[1].abs().max().item())


def test_bfloat16_within_two_percent_of_float32(resnet_pth, mnist_root):
    from torchvision import datasets

    images = datasets.MNIST(mnist_root, train=False).data[:16]
    cpu = torch.device("cpu")
    f32 = ef.compute_features(ef.build_extractor(reference_model(resnet_pth), cpu), images, cpu)
    model = ef.build_extractor(reference_model(resnet_pth), cpu, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    bf16 = ef.compute_features(model, images, cpu)
    assert bf16.dtype == torch.float32
    assert not torch.equal(f32, bf16)           # bf16 really ran
    assert (bf16 - f32).norm() / f32.norm() < 0.02


def test_bfloat16_without_bf16_units_warns_in_one_line(mnist_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ef, "has_bf16_units", lambda device: False)
    proc = run_extract_in_process(monkeypatch, capsys, "--data-root", mnist_root, "--out-dir", tmp_path,
                                  "--weights", "none", "--split", "test", "--limit", "2",
                                  "--dtype", "bfloat16")
    assert proc.returncode == 0
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "no bf16 units" in warnings[0] and "slower" in warnings[0]


def test_image_size_resizes_on_the_fly(mnist_root):
    from torchvision import datasets

    images = datasets.MNIST(mnist_root, train=False).data[:2]
    assert ef.preprocess(images, 56).shape == (2, 3, 56, 56)
    torch.manual_seed(0)
    from torchvision.models import resnet50

    model = ef.build_extractor(resnet50(weights=None), torch.device("cpu"))
    assert ef.compute_features(model, images, torch.device("cpu"), image_size=56).shape == (2, 2048)


# ------------------------------------------------------ features: failures

def run_extract_in_process(monkeypatch, capsys, *args, env=None):
    """extract_features.py's command line run through labio.run_main in this process
    (as the script runs it, minus the ~2 s torch import per case)."""
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["extract_features.py", *map(str, args)])
    sigterm = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    code = 0
    try:
        labio.run_main(ef.main)
    except SystemExit as exc:
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture
def older_outputs(tmp_path):
    """An output dir that already holds the .mat files of an earlier run."""
    out = tmp_path / "out"
    out.mkdir()
    for split in ("train", "test"):
        sio.savemat(out / f"mnist_{split}.mat", {"features": np.ones((2, 2048), np.float32),
                                                 "labels": np.zeros((1, 2), np.int64)})
    return out


def bad_input(case, tmp, mnist_root):
    """(args, env, fragments of the one-line error) for one bad input to extract_features.py."""
    from torchvision.models import resnet18

    data = ["--data-root", mnist_root]
    if case == "unknown weights name":
        return [*data, "--weights", "IMAGENET1K_V3"], {}, ["unknown weights name", "IMAGENET1K_V1"]
    if case == "missing weights file":
        return [*data, "--weights", tmp / "nope.pth"], {}, ["no such file"]
    if case == "corrupt weights file":
        (tmp / "w.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
        return [*data, "--weights", tmp / "w.pth"], {}, ["cannot read weights file"]
    if case == "weights of another model":
        torch.save(resnet18(weights=None).state_dict(), tmp / "w.pth")
        return [*data, "--weights", tmp / "w.pth"], {}, ["does not fit ResNet-50"]
    if case in ("weights with a NaN", "weights that overflow"):
        from torchvision.models import resnet50
        state = resnet50(weights=None).state_dict()
        if case == "weights with a NaN":
            state["conv1.weight"][0, 0, 0, 0] = float("nan")
            fragments = ["'conv1.weight'", "NaN", "damaged"]
        else:
            for name in ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight"):
                state[name] *= 1e30            # finite weights, but the activations overflow float32
            fragments = ["feature rows are NaN or infinite", "was not written"]
        torch.save(state, tmp / "w.pth")
        return [*data, "--weights", tmp / "w.pth", "--limit", "2"], {}, fragments
    if case == "weights path is a directory":
        (tmp / "w.pth").mkdir()
        return [*data, "--weights", tmp / "w.pth"], {}, ["is a directory"]
    if case == "weights not a dict":
        torch.save(torch.zeros(3), tmp / "w.pth")
        return [*data, "--weights", tmp / "w.pth"], {}, ["not a state_dict"]
    if case == "corrupt hub cache file":
        hub = tmp / "torch" / "hub" / "checkpoints"
        hub.mkdir(parents=True)
        (hub / "resnet50-0676ba61.pth").write_bytes(b"garbage, not a checkpoint" * 100)
        return [*data, "--weights", "IMAGENET1K_V1"], {"TORCH_HOME": str(tmp / "torch")}, \
            ["damaged", str(hub / "resnet50-0676ba61.pth"), "delete it"]
    if case == "no network for the weights":
        return [*data, "--weights", "IMAGENET1K_V1"], {**OFFLINE_ENV, "TORCH_HOME": str(tmp / "torch")}, \
            ["could not download", "no network?", "resnet50-0676ba61.pth", "WEIGHTS=none"]
    if case == "hub cache dir under a file":  # neither network nor a damaged file: named as it is
        (tmp / "blocker").write_text("x")
        return [*data, "--weights", "IMAGENET1K_V1"], {"TORCH_HOME": str(tmp / "blocker" / "torch")}, \
            ["could not get the IMAGENET1K_V1", "NotADirectoryError"]
    if case == "MNIST missing, no network":
        return ["--data-root", tmp / "empty", "--weights", "none"], OFFLINE_ENV, \
            ["MNIST/raw", "could not be downloaded", "no network?"]
    if case in ("MNIST damaged file", "MNIST wrong layout"):
        root = make_mnist(str(tmp / "mnist"), 4, 4)
        raw = os.path.join(root, "MNIST", "raw")
        if case == "MNIST damaged file":
            with open(os.path.join(raw, "t10k-images-idx3-ubyte"), "r+b") as f:
                f.truncate(500)
            return ["--data-root", root, "--weights", "none"], {}, \
                ["t10k-images-idx3-ubyte", "damaged", "truncated", "delete it"]
        for name in os.listdir(raw):
            os.replace(os.path.join(raw, name), os.path.join(root, name))
        return ["--data-root", root, "--weights", "none"], {}, ["torchvision reads them from", "MNIST/raw"]
    if case == "out dir is a file":
        return [*data, "--weights", "none", "--out-dir", tmp / "out" / "mnist_train.mat"], {}, \
            ["output directory", "not a directory"]
    if case == "out dir under a file":
        return [*data, "--weights", "none", "--out-dir", tmp / "out" / "mnist_test.mat" / "sub"], {}, \
            ["output directory", "not a directory"]
    if case == "cuda without a GPU":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        return [*data, "--weights", "none", "--device", "cuda"], {}, ["--device cuda", "no CUDA GPU"]
    flag, value = case.split(" ", 1)        # "--flag value"
    return [*data, "--weights", "none", flag, value], {}, [flag]


BAD_INPUTS = ["unknown weights name", "missing weights file", "corrupt weights file", "weights of another model",
              "weights with a NaN", "weights that overflow", "weights path is a directory",
              "weights not a dict", "corrupt hub cache file", "no network for the weights", "hub cache dir under a file",
              "MNIST missing, no network", "MNIST damaged file", "MNIST wrong layout", "out dir is a file",
              "out dir under a file", "cuda without a GPU",
              "--limit 0", "--batch-size -3", "--threads 0", "--image-size abc", "--dtype float16", "--seed -1",
              "--device tpu", "--split val"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_changes_no_file(case, mnist_root, older_outputs, monkeypatch, capsys):
    tmp = older_outputs.parent
    args, env, fragments = bad_input(case, tmp, mnist_root)
    if "--out-dir" not in map(str, args):
        args = [*args, "--out-dir", older_outputs]
    before = snapshot(older_outputs)
    proc = run_extract_in_process(monkeypatch, capsys, *args, env=env)
    assert_rejected(proc, before, [older_outputs], *fragments)


@pytest.mark.parametrize("case", ["corrupt hub cache file", "MNIST damaged file", "--limit 0"])
def test_bad_input_through_the_real_command(case, mnist_root, older_outputs):
    """The same cases as a user runs them: a separate process, its own exit code and stderr."""
    tmp = older_outputs.parent
    args, env, fragments = bad_input(case, tmp, mnist_root)
    before = snapshot(older_outputs)
    proc = run_cli("extract_features.py", *args, "--out-dir", older_outputs, env=env)
    assert proc.returncode == 2
    assert_rejected(proc, before, [older_outputs], *fragments)


def test_no_partial_file_when_save_fails(mnist_root, resnet_pth, tmp_path, monkeypatch):
    """An exception in the middle of writing leaves the old file (or nothing) in place."""
    target = tmp_path / "mnist_test.mat"
    target.write_bytes(b"old")

    def failing_savemat(f, record, **kwargs):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(sio, "savemat", failing_savemat)
    with pytest.raises(KeyboardInterrupt):
        ef.main(["--data-root", mnist_root, "--out-dir", str(tmp_path), "--weights", resnet_pth,
                 "--split", "test", "--limit", "3"])
    assert leftovers(tmp_path) == ["mnist_test.mat"] and target.read_bytes() == b"old"


# The test split's write hangs, so that a signal lands after mnist_train.mat was
# completed and while mnist_test.mat is being written (its temp file exists).
HANG_ON_SECOND_WRITE = """
import sys, time, scipy.io
real_savemat, calls = scipy.io.savemat, []
def savemat(f, record, **kw):
    calls.append(f)
    if len(calls) == 2:
        f.write(b'x' * 1000); f.flush(); print('WRITING SECOND', flush=True); time.sleep(60)
    return real_savemat(f, record, **kw)
scipy.io.savemat = savemat
import extract_features, labio
sys.argv = ['extract_features.py'] + sys.argv[1:]
labio.run_main(extract_features.main)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_between_splits_names_what_was_completed(sig, mnist_root, tmp_path):
    code, err = interrupt_at("WRITING SECOND", HANG_ON_SECOND_WRITE,
                             ["--data-root", mnist_root, "--out-dir", tmp_path, "--weights", "none",
                              "--limit", "5"], sig=sig)
    assert code == 130 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(line) == 1, err
    train, test = (os.path.relpath(tmp_path / f"mnist_{s}.mat", HERE) for s in ("train", "test"))
    assert f"completed: {train}; not written: {test}" in line[0], line[0]
    assert leftovers(tmp_path) == ["mnist_train.mat"]         # no temp file, no test .mat
    mat = sio.loadmat(tmp_path / "mnist_train.mat")
    assert mat["features"].shape == (5, 2048) and mat["labels"].shape == (1, 5)


def test_no_partial_file_when_killed(mnist_root, tmp_path):
    """SIGTERM while the .mat is being written: exit 130, the message, no file, no temp file."""
    code = ("import sys, time, scipy.io\n"
            "def slow(f, record, **kw):\n"
            "    f.write(b'x' * 1000); f.flush(); print('WRITING', flush=True); time.sleep(60)\n"
            "scipy.io.savemat = slow\n"
            "import extract_features, labio\n"
            "sys.argv = ['extract_features.py'] + sys.argv[1:]\n"
            "labio.run_main(extract_features.main)\n")
    code_, err = interrupt_at("WRITING", code, ["--data-root", mnist_root, "--out-dir", tmp_path,
                                                "--weights", "none", "--split", "test", "--limit", "2"])
    assert code_ == 130 and "Traceback" not in err, err
    assert "interrupted" in err and "nothing was completed" in err and "mnist_test.mat" in err, err
    assert leftovers(tmp_path) == []


def make_commands(*args):
    """Run make with PYTHON=echo: the extraction commands it would run are printed, not run."""
    proc = subprocess.run(["make", "-s", "-C", HERE, "PYTHON=echo", *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_features_resumes_after_an_interrupted_split(tmp_path):
    """After an interrupt that completed one split, `make features` extracts only the
    other one, whichever it is (neither needs the other); a new DTYPE redoes both."""
    out = tmp_path / "out"
    common = ["features", f"OUT={out}", "WEIGHTS=none", "DATA=data"]
    commands = make_commands(*common)           # "runs" both splits, and records their settings
    assert "--split train" in commands and "--split test" in commands and "--dtype float32" in commands
    for done, todo in (("train", "test"), ("test", "train")):
        (out / f"mnist_{done}.mat").write_bytes(b"complete")
        (out / f"mnist_{todo}.mat").unlink(missing_ok=True)
        commands = make_commands(*common)
        assert f"--split {done}" not in commands and f"--split {todo}" in commands, commands
    commands = make_commands(*common, "DTYPE=bfloat16")
    assert "--split train" in commands and "--dtype bfloat16" in commands


def test_make_threads_reaches_every_training_script(tmp_path):
    """THREADS=N becomes --threads N for the extraction and both VAE scripts; empty, no flag."""
    common = [f"OUT={tmp_path}/out", "WEIGHTS=none", "DATA=data", "features", "vae", "sweep-vae"]
    commands = make_commands(*common, "THREADS=1").splitlines()
    for script in ("extract_features.py --", "vae.py --", "sweep_vae.py --z-dims"):
        ran = [c for c in commands if c.startswith(script)]
        assert ran and all(c.endswith(" --threads 1") or " --threads 1 " in c for c in ran), (script, commands)
    assert "--threads" not in make_commands(*common)


@pytest.mark.skipif(not os.environ.get("MNIST_ROOT"), reason="set MNIST_ROOT to the real MNIST root")
def test_real_mnist_features_random_init(tmp_path):
    root = os.environ["MNIST_ROOT"]
    proc = run_cli("extract_features.py", "--data-root", root, "--out-dir", tmp_path, "--weights", "none",
                   "--limit", "256")
    assert proc.returncode == 0, proc.stderr
    mat = sio.loadmat(tmp_path / "mnist_train.mat")
    from torchvision import datasets

    assert mat["features"].shape == (256, 2048)
    assert np.array_equal(mat["labels"][0], datasets.MNIST(root, train=True).targets[:256].numpy())


@pytest.mark.parametrize("script", ["extract_features.py", "logreg.py", "vae.py", "bench.py", "report.py"])
def test_every_script_has_help(script):
    proc = run_cli(script, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and proc.stderr == ""


# =========================================================================
# logreg.py: multinomial logistic regression and ROC, from scratch
# =========================================================================


# --------------------------------------------------------------------- helpers

def logreg_blobs(n, d, seed, spread=1.0, centers_seed=99):
    """n samples of 10 Gaussian classes in d dimensions; spread scales the class centers."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(centers_seed).standard_normal((10, d)) * spread
    y = rng.integers(0, 10, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def logreg_write_mat(path, features, labels, **meta):
    sio.savemat(path, {"features": features, "labels": np.asarray(labels).reshape(1, -1), **meta})
    return path


def logreg_run(*args):
    return run_cli("logreg.py", "--no-progress", *args, timeout=120)


LOGREG_RANDOM_INIT = {"weights": "random-init (WEIGHTS=none)", "pretrained": 0}


@pytest.fixture
def logreg_mats(tmp_path):
    """A small train/test pair in the extractor's format, with random-init metadata."""
    X, y = logreg_blobs(600, 16, seed=1, spread=0.8)
    X_te, y_te = logreg_blobs(200, 16, seed=2, spread=0.8)
    return (logreg_write_mat(tmp_path / "train.mat", X, y, **LOGREG_RANDOM_INIT),
            logreg_write_mat(tmp_path / "test.mat", X_te, y_te, **LOGREG_RANDOM_INIT))


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
    if l2 == 0:   # apply_gradients: one descent step along that gradient, and the loss before it
        new, step_loss = logreg.apply_gradients(X, L, theta, 0.5)
        np.testing.assert_allclose(new, theta - 0.5 * numeric, rtol=0, atol=1e-8)
        assert step_loss == pytest.approx(logreg_direct_loss(X, L, theta), rel=1e-12)


def test_logreg_softmax_is_stable_for_huge_scores():
    p = logreg.softmax(np.array([[1e4, 0.0, -1e4], [800.0, 800.0, 0.0]]))
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
    probs = logreg.mlr(X, logreg.get_one_hot(y), X_te, logreg.get_one_hot(y_te),
                       logreg.TrainConfig.for_mode("default", epochs=10))
    assert np.mean(probs.argmax(axis=1) == y_te) == 1.0


def test_logreg_accuracy_close_to_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = logreg_blobs(3000, 30, seed=5, spread=0.35)
    X_te, y_te = logreg_blobs(2000, 30, seed=6, spread=0.35)
    probs = logreg.mlr(X, logreg.get_one_hot(y), X_te, logreg.get_one_hot(y_te))
    ours = np.mean(probs.argmax(axis=1) == y_te)
    scaler = StandardScaler().fit(X)
    ref = LogisticRegression(max_iter=1000).fit(scaler.transform(X), y).score(scaler.transform(X_te), y_te)
    assert 0.5 < ref < 0.99   # a problem where the two can differ
    assert abs(ours - ref) <= 0.01


def test_logreg_reference_last_short_batch_counts_in_loss_and_gradient():
    """n = 7 with batches of 3: batches 0-2, 3-5 and the short one, sample 6. The assignment's
    X[i:i+BATCH_SIZE-1] would never train on some samples; here every one counts, in the step and
    in the epoch's loss (each batch's mean weighted by its size)."""
    X, y = logreg_blobs(7, 4, seed=7)
    L = logreg.get_one_hot(y)
    config = logreg.TrainConfig.for_mode("reference", epochs=1, batch_size=3, lr=0.05, seed=3)
    out = logreg.train(X, L, X, L, config)
    theta = 0.001 * np.random.default_rng(3).standard_normal((5, 10))   # the assignment's init
    losses = []
    for rows in (slice(0, 3), slice(3, 6), slice(6, 7)):
        theta, loss = logreg_direct_step(X[rows].astype(np.float64), L[rows], theta, 0.05)
        losses.append(loss)
    np.testing.assert_allclose(out["theta"], theta, rtol=1e-10, atol=1e-14)
    assert out["history"]["train_loss"] == [pytest.approx((3 * losses[0] + 3 * losses[1] + losses[2]) / 7, rel=1e-12)]
    without_last, _ = logreg_direct_step(X[6:7].astype(np.float64), L[6:7], theta, -0.05)   # undo step 3
    assert np.abs(out["theta"] - without_last).max() > 1e-6   # the short batch did move theta


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_logreg_both_trainings_step_through_apply_gradients(mode, monkeypatch):
    """23 training rows in batches of 5: 5 calls of apply_gradients per epoch, one per batch in
    file order for the reference loop; and a step that does nothing leaves theta where it began."""
    X, y = logreg_blobs(23, 4, seed=7)
    L = logreg.get_one_hot(y)
    config = logreg.TrainConfig.for_mode(mode, epochs=2, batch_size=5, lr=0.05, val_fraction=0.0)
    calls = []
    original = logreg.apply_gradients

    def counted(X_b, L_b, theta, lr, *rest):
        calls.append(len(X_b))
        return original(X_b, L_b, theta, lr, *rest)

    monkeypatch.setattr(logreg, "apply_gradients", counted)
    out = logreg.train(X, L, X, L, config)
    assert calls == [5, 5, 5, 5, 3] * 2 and out["epochs_run"] == 2
    def frozen_step(X_b, L_b, theta, *rest):
        return theta, original(X_b, L_b, theta, *rest)[1]

    monkeypatch.setattr(logreg, "apply_gradients", frozen_step)
    frozen = logreg.train(X, L, X, L, config)["theta"]
    initial = (0.001 * np.random.default_rng(0).standard_normal((5, 10)) if mode == "reference" else np.zeros((5, 10)))
    np.testing.assert_array_equal(frozen, initial)


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
    Xs, mean, scale = logreg.fit_standardize(X)
    np.testing.assert_allclose(mean[2:], X[:, 2:].astype(np.float64).mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(scale[2:], X[:, 2:].astype(np.float64).std(axis=0), rtol=1e-5)
    assert scale[0] == 1.0 and scale[1] == 1.0
    assert np.all(np.isfinite(Xs)) and Xs.dtype == np.float32
    np.testing.assert_allclose(Xs[:, 2:].std(axis=0), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(logreg.standardize(X, mean, scale), Xs)


def test_logreg_train_config_checks_what_it_is_given():
    config = logreg.TrainConfig.for_mode("reference", lr=0.01)
    assert (config.lr, config.batch_size, config.val_fraction, config.patience) == (0.01, 64, 0.0, None)
    from dataclasses import asdict

    assert logreg.TrainConfig(**asdict(config)) == config   # what logreg.npz stores
    for bad in (dict(epochs=0), dict(lr=-1.0), dict(val_fraction=1.0), dict(patience=3), dict(mode="fast")):
        with pytest.raises(ValueError):
            logreg.TrainConfig(**{**asdict(config), **bad})


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
    new, _ = logreg.apply_gradients(X, L, with_bias, lr)
    return new[:-1]


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
    assert "file:/x/r50.pth" in logreg.title_suffix({"train": file_meta})
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
    fig = logreg.plot_roc(logreg.pyplot(), y[keep], probs[keep], "")
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
    assert "RANDOM-INIT" in r.stdout
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
            "import logreg, labio\n"
            "sys.argv = ['logreg.py'] + sys.argv[1:]\n"
            "labio.run_main(logreg.main)\n")
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
    assert prov["train"] == {"weights": "unknown"}
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
    "patience_with_reference": (["--reference", "--patience", "3"], "--patience applies to the default"),
    "no_training_rows": (["--val-fraction", "0.995"], "leaves no training rows"),
    "reference_no_training_rows": (["--reference", "--val-fraction", "0.995"], "leaves no training rows"),
    "loss_blows_up": (["--lr", "1e300", "--epochs", "3", "--train-mat", "{big}", "--test-mat", "{big}"],
                      "lower --lr"),
    "loss_blows_up_reference": (["--reference", "--lr", "1e300", "--epochs", "3", "--train-mat", "{big}",
                                 "--test-mat", "{big}"], "lower --lr"),
}
LOGREG_BAD_MATS = {   # name: (train .mat record or path marker, fragment)
    "missing": ("missing", "not found"),
    "not_a_mat": ("garbage", "cannot read"),
    "no_labels": ({"features": "X"}, "lacks the key(s) labels"),
    "not_2d": ({"features": "X3", "labels": "y"}, "2-D"),
    "label_count": ({"features": "X", "labels": "y99"}, "labels for"),
    "label_range": ({"features": "X", "labels": "y10"}, "0-9"),
    "non_finite": ({"features": "Xnan", "labels": "y"}, "NaN"),
    "no_samples": ({"features": "X0", "labels": "y0"}, "no samples"),
    "dims_differ": ({"features": "X5", "labels": "y"}, "dimensions"),
    "weights_differ": ({"features": "X", "labels": "y", "weights": "file:/other.pth"}, "weights"),
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
        args = ["--train-mat", good if name == "dims_differ" or name == "weights_differ" else bad,
                "--test-mat", bad if name in ("dims_differ", "weights_differ") else good]
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
    expected = {"truncated": "damaged or not logreg's", "not_an_npz": "not an .npz archive",
                "foreign": "lacks", "corrupt_config": "config_json is corrupt",
                "wrong_shape": "test_probs has shape", "absent": "run `make logreg` first"}[damage]
    before = snapshot(out, figs)
    proc = logreg_run("--plot-only", "--out-dir", out, "--figures-dir", figs)
    assert_rejected(proc, before, [out, figs], expected, "make logreg")


def test_logreg_out_dir_that_is_a_file_is_rejected(logreg_older_outputs, tmp_path):
    root, _, _ = logreg_older_outputs
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    proc = logreg_run("--train-mat", root / "good.mat", "--test-mat", root / "good.mat",
                      "--out-dir", tmp_path / "afile" / "out", "--figures-dir", tmp_path / "figs")
    assert_rejected(proc, before, [tmp_path], "not a directory")


# --------------------------------------------------------------------- sweep_logreg.py

SWEEP_GRID = ["--batch-sizes", "7", "32", "--lrs", "0.001", "0.05", "1e306", "--epochs", "6", "--val-fraction", "0.2"]


def sweep_run(*args):
    return run_cli("sweep_logreg.py", "--no-progress", *args, timeout=180)


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
    assert (sweep["kind"], sweep["mode"], sweep["epochs"], sweep["val_fraction"]) == ("sweep_logreg", "reference", 6, 0.2)
    assert sweep["grid"] == {"batch_size": [7, 32], "lr": [0.001, 0.05, 1e306]}
    assert sweep["random_init_weights"] is True and sweep["provenance"]["test"]["weights"].startswith("random-init")
    assert "torch" not in sweep["versions"]
    assert [(r["batch_size"], r["lr"]) for r in sweep["runs"]] == [(b, lr) for b in (7, 32) for lr in (0.001, 0.05, 1e306)]
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


@pytest.mark.parametrize("content, fragment", [(None, "make sweep-logreg` first"), ("{not json", "as JSON"),
                                               ('{"kind": "sweep_logreg"}', "lacks"),
                                               ('{"kind": "something else"}', "not a sweep_logreg")])
def test_sweep_logreg_plot_only_rejects_a_bad_json(content, fragment, sweep_result, tmp_path):
    if content is not None:
        (tmp_path / "sweep_logreg.json").write_text(content)
    figs = sweep_result["figs"]
    before = snapshot(tmp_path, figs)
    proc = sweep_run("--plot-only", "--out-dir", tmp_path, "--figures-dir", figs)
    assert_rejected(proc, before, [tmp_path, figs], fragment)


def test_sweep_logreg_help_names_the_grid_flags():
    proc = sweep_run("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert all(flag in proc.stdout for flag in ("--batch-sizes", "--lrs", "--epochs", "--mode", "--plot-only"))


SWEEP_SLOW_FIGURE = ("import sys, time\n"
                     "import sweep_logreg, labio\n"
                     "def slow(fig, path, **kw):\n"
                     "    print('WRITING', flush=True); time.sleep(60)\n"
                     "sweep_logreg.save_figure = slow\n"
                     "sys.argv = ['sweep_logreg.py'] + sys.argv[1:]\n"
                     "labio.run_main(sweep_logreg.main)\n")


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
            f"DATA={os.path.realpath(HERE)}/data WEIGHTS=IMAGENET1K_V1 LIMIT= DEVICE=auto DTYPE=float32\n")
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


# =========================================================================
# vae.py: the variational autoencoder
# =========================================================================
VAE_N_TRAIN, VAE_N_TEST = 256, 64


@pytest.fixture(scope="module")
def vae_data_root(tmp_path_factory):
    return make_mnist(str(tmp_path_factory.mktemp("vae_mnist")), VAE_N_TRAIN, VAE_N_TEST, seed=1)


@pytest.fixture(scope="module")
def vae_trained(vae_data_root, tmp_path_factory):
    """One CLI run (2 epochs) whose checkpoint the error tests reuse."""
    out = tmp_path_factory.mktemp("vae_out")
    threads = torch.get_num_threads()  # main() may set --threads; restore it
    try:
        vae.main(["--data-root", vae_data_root, "--out-dir", str(out), "--figures-dir", str(out / "figs"),
                  "--epochs", "2", "--z-dim", "4", "--device", "cpu", "--seed", "3", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def vae_one_thread():
    """Train as the CLI does on a CPU: one thread (tiny matmuls, and a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_vae_generate_samples_decodes_standard_normal_z():
    torch.manual_seed(0)
    model = vae.VAE(5)
    samples = vae.generate_samples(model, 16, seed=7)
    assert samples.shape == (16, 784) and samples.min() >= 0 and samples.max() <= 1
    z = torch.randn(16, 5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(samples, model.decoder(z))
    assert not torch.equal(samples, vae.generate_samples(model, 16, seed=8))


# ------------------------------------------------------------------ model

def test_vae_shapes():
    model = vae.VAE(7)
    recon, mu, logvar = model(torch.rand(5, 1, 28, 28))
    assert recon.shape == (5, 784) and mu.shape == (5, 7) and logvar.shape == (5, 7)
    assert recon.min() >= 0 and recon.max() <= 1
    assert model.decoder(torch.zeros(3, 7)).shape == (3, 784)


def test_vae_accepts_the_assignments_input_shapes():
    """The assignment flattens with x.view(-1, 784): N x 1 x 28 x 28, N x 28 x 28 and N x 784 give the same."""
    torch.manual_seed(0)
    model = vae.VAE(6)
    flat = torch.rand(5, 784)
    shapes = [flat.view(5, 1, 28, 28), flat.view(5, 28, 28), flat]
    with torch.no_grad():
        encoded = [model.encoder(x) for x in shapes]
        outputs = []
        for x in shapes:
            torch.manual_seed(1)
            outputs.append(model(x))
    for (mu, logvar), (recon, mu2, logvar2) in zip(encoded, outputs):
        assert torch.equal(mu, encoded[2][0]) and torch.equal(logvar, encoded[2][1])
        assert torch.equal(mu2, mu) and torch.equal(recon, outputs[2][0]) and recon.shape == (5, 784)
    recon = outputs[2][0]
    losses = [vae.loss_function(r, x, mu, logvar) for r in (recon, recon.view(5, 1, 28, 28))
              for x in shapes]
    assert all(torch.equal(loss, losses[0]) for loss in losses)


def test_vae_layer_names_match_the_assignment():
    shapes = {k: tuple(v.shape) for k, v in vae.VAE(20).state_dict().items()}
    assert shapes == {
        "encoder.fc1.weight": (400, 784), "encoder.fc1.bias": (400,),
        "encoder.fc2_mu.weight": (20, 400), "encoder.fc2_mu.bias": (20,),
        "encoder.fc2_logvar.weight": (20, 400), "encoder.fc2_logvar.bias": (20,),
        "decoder.fc3.weight": (400, 20), "decoder.fc3.bias": (400,),
        "decoder.fc4.weight": (784, 400), "decoder.fc4.bias": (784,),
    }


# ------------------------------------------------------------------- loss

def test_vae_kl_closed_form_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    logvar = torch.randn(2, 3, generator=gen, dtype=torch.float64) * 0.5
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(400_000, 2, 3, generator=gen, dtype=torch.float64)
    log_q = torch.distributions.Normal(mu, std).log_prob(z)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z)
    mc = (log_q - log_p).sum((1, 2)).mean().item()
    assert vae.kl_divergence(mu, logvar).item() == pytest.approx(mc, abs=0.02)


def test_vae_loss_function_matches_hand_computation():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 784, generator=gen, dtype=torch.float64)
    logits = torch.randn(4, 784, generator=gen, dtype=torch.float64)
    mu = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    logvar = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    p = 1 / (1 + np.exp(-logits.numpy()))
    xn, mun, lvn = x.numpy(), mu.numpy(), logvar.numpy()
    bce = -np.sum(xn * np.log(p) + (1 - xn) * np.log(1 - p))
    kld = -0.5 * np.sum(1 + lvn - mun ** 2 - np.exp(lvn))
    assert vae.loss_function(torch.sigmoid(logits), x, mu, logvar).item() == pytest.approx(bce + kld, rel=1e-10)
    assert vae.vae_loss(torch.sigmoid(logits), x, mu, logvar).item() == pytest.approx(bce + kld, rel=1e-10)
    # The continuous Bernoulli subtracts its log-normalizer, written out: log(2 artanh(1 - 2p) / (1 - 2p)).
    log_c = np.sum(np.log(2 * np.arctanh(1 - 2 * p) / (1 - 2 * p)))
    cb = vae.vae_loss(torch.sigmoid(logits), x, mu, logvar, "continuous-bernoulli").item()
    assert cb == pytest.approx(bce + kld - log_c, rel=1e-9)


@pytest.mark.parametrize("lam", [0.003, 0.2, 0.4999, 0.5, 0.5002, 0.7, 0.995])
def test_vae_continuous_bernoulli_density_integrates_to_one(lam):
    from scipy.integrate import quad

    logit = torch.tensor(math.log(lam / (1 - lam)), dtype=torch.float64)
    log_c = vae.cb_log_normalizer(logit).item()
    total, _ = quad(lambda x: math.exp(log_c + x * math.log(lam) + (1 - x) * math.log(1 - lam)), 0, 1)
    assert total == pytest.approx(1.0, abs=1e-7)


def test_vae_continuous_bernoulli_is_smooth_at_one_half():
    logits = torch.tensor([-0.011, -0.0099, -1e-6, 0.0, 1e-6, 0.0099, 0.011], requires_grad=True)
    values = vae.cb_log_normalizer(logits)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(logits.grad).all()
    assert values[3].item() == pytest.approx(math.log(2), abs=1e-7)
    # Both sides of the Taylor window agree: log C is continuous there.
    assert values[1].item() == pytest.approx(values[0].item(), abs=2e-5)
    assert values[5].item() == pytest.approx(values[6].item(), abs=2e-5)


def test_vae_reparameterize_statistics_and_gradients():
    torch.manual_seed(0)
    mu = torch.full((200_000, 2), 1.5, requires_grad=True)
    logvar = torch.full((200_000, 2), math.log(0.25), requires_grad=True)
    z = vae.VAE.reparameterize(mu, logvar)
    assert z.mean().item() == pytest.approx(1.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.ones_like(mu))
    assert logvar.grad.abs().sum() > 0 and torch.isfinite(logvar.grad).all()


# ------------------------------------------- training runs through the model

def vae_tiny_train_x(vae_data_root, limit=120):
    return vae.preload(vae.load_mnist(vae_data_root, train=True), limit=limit)[0]


def test_vae_training_loss_is_what_forward_outputs(vae_data_root, vae_one_thread, monkeypatch):
    """A forward() that outputs 0.5 for every pixel (and mu = logvar = 0, so no KL): the
    training loss must be the BCE of a coin flip, 784 ln 2 per image, whatever the images."""
    def coin(self, x):
        mu, logvar = self.encoder(x)
        return torch.full((len(mu), 784), 0.5) + 0 * mu.sum(), 0 * mu, 0 * logvar

    monkeypatch.setattr(vae.VAE, "forward", coin)
    torch.manual_seed(0)
    history = vae.train_vae(vae.VAE(4), vae_tiny_train_x(vae_data_root), epochs=1, batch_size=16, log=None,
                            progress=False)
    assert history["train_loss"][0] == pytest.approx(784 * math.log(2), rel=1e-5)


def test_vae_each_training_step_calls_loss_function_once(vae_data_root, vae_one_thread, monkeypatch):
    """120 images in batches of 16: 8 steps, 8 calls of loss_function, each on model(x)'s outputs;
    and a weight on its KL term (an edit a student may make) changes what trains."""
    calls = []
    original = vae.loss_function

    def counted(recon_x, x, mu, logvar):
        calls.append((recon_x.requires_grad, len(x)))
        return original(recon_x, x, mu, logvar)

    train_x = vae_tiny_train_x(vae_data_root)
    monkeypatch.setattr(vae, "loss_function", counted)
    torch.manual_seed(0)
    plain = vae.VAE(4)
    vae.train_vae(plain, train_x, epochs=1, batch_size=16, log=None, progress=False)
    assert calls == [(True, 16)] * 7 + [(True, 8)]
    def beta_4(recon_x, x, mu, logvar):
        return original(recon_x, x, mu, logvar) + 3 * vae.kl_divergence(mu, logvar)

    monkeypatch.setattr(vae, "loss_function", beta_4)
    torch.manual_seed(0)
    beta = vae.VAE(4)
    vae.train_vae(beta, train_x, epochs=1, batch_size=16, log=None, progress=False)
    assert not torch.equal(plain.encoder.fc2_logvar.weight, beta.encoder.fc2_logvar.weight)


class DeeperEncoder(vae.Encoder):
    """The assignment's encoder with one more hidden layer."""

    def __init__(self, z_dim):
        super().__init__(z_dim)
        self.extra = torch.nn.Linear(vae.HIDDEN, vae.HIDDEN)

    def forward(self, x):
        h = torch.relu(self.extra(torch.relu(self.fc1(x.reshape(-1, 784)))))
        return self.fc2_mu(h), self.fc2_logvar(h)


class DeeperVAE(vae.VAE):
    def __init__(self, z_dim):
        super().__init__(z_dim)
        self.encoder = DeeperEncoder(z_dim)


class WideEncoderVAE(vae.VAE):
    """Only the encoder's hidden layer widened to 512."""

    def __init__(self, z_dim):
        super().__init__(z_dim)
        self.encoder.fc1 = torch.nn.Linear(784, 512)
        self.encoder.fc2_mu, self.encoder.fc2_logvar = torch.nn.Linear(512, z_dim), torch.nn.Linear(512, z_dim)


@pytest.mark.parametrize("variant", ["hidden_512", "encoder_512", "extra_layer"])
def test_vae_an_edited_model_trains_through_train_vae(variant, vae_data_root, vae_one_thread, monkeypatch):
    """Another hidden size (HIDDEN, or the encoder's only), or a subclass with an extra layer:
    train_vae trains every parameter."""
    if variant == "hidden_512":
        monkeypatch.setattr(vae, "HIDDEN", 512)
    torch.manual_seed(0)
    model = {"hidden_512": vae.VAE, "encoder_512": WideEncoderVAE, "extra_layer": DeeperVAE}[variant](6)
    assert model.encoder.fc1.out_features == (400 if variant == "extra_layer" else 512)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_x = vae_tiny_train_x(vae_data_root, limit=None)
    start = sum(vae.evaluate(model, train_x))
    history = vae.train_vae(model, train_x, train_x[:64], epochs=2, batch_size=16, log=None, progress=False)
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())
    assert sum(vae.evaluate(model, train_x)) < 0.8 * start and all(map(math.isfinite, history["test_loss"]))


def test_vae_defaults_come_from_vae_config(monkeypatch):
    """The command line's defaults are VAEConfig's: a changed field changes the run the CLI builds."""
    assert vae.config_from_args(vae.parse_args([])) == vae.VAEConfig()
    monkeypatch.setattr(vae, "DEFAULTS", vae.VAEConfig(batch_size=32, epochs=3))
    config = vae.config_from_args(vae.parse_args(["--epochs", "2"]))
    assert (config.batch_size, config.epochs) == (32, 2)


def assert_same_run(weights, other_weights, history, other_history, keys):
    """Two trainings that are the same run: bit-equal weights and histories."""
    for name in weights:
        assert torch.equal(weights[name], other_weights[name]), name
    for key in keys:
        assert history[key] == other_history[key], key


# ------------------------------------------------------------------- data

def test_vae_preloaded_pixels_equal_totensor(vae_data_root):
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(vae_data_root, train=True, download=False)
    images, labels = vae.preload(dataset, limit=10)
    assert images.shape == (10, 784) and images.dtype == torch.float32
    to_tensor = transforms.ToTensor()
    for i in range(10):
        pil, label = dataset[i]
        assert torch.equal(images[i], to_tensor(pil).view(784))
        assert labels[i].item() == label


def test_vae_download_failure_is_a_user_error(monkeypatch, tmp_path):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(datasets, "MNIST", offline)
    with pytest.raises(vae.UserError, match="MNIST/raw"):
        vae.load_mnist(str(tmp_path), train=True)


# --------------------------------------------------------------- training

def test_vae_one_short_epoch_lowers_the_loss(vae_data_root, vae_one_thread):
    train_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=True))
    torch.manual_seed(0)
    model = vae.VAE(8)
    before = sum(vae.evaluate(model, train_x))
    history = vae.train_vae(model, train_x, epochs=1, batch_size=32, log=None, progress=False)
    assert history["test_loss"] == [] and len(history["train_loss"]) == 1
    assert sum(vae.evaluate(model, train_x)) < 0.8 * before


def test_vae_same_seed_same_losses_and_seed_matters(vae_data_root, vae_one_thread):
    train_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=True))
    test_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=False))

    def run(seed):
        torch.manual_seed(seed)
        history = vae.train_vae(vae.VAE(4), train_x, test_x, epochs=2, seed=seed, log=None, progress=False)
        return {k: history[k] for k in vae.HISTORY_KEYS}

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_vae_cli_same_seed_same_losses_with_limit(vae_data_root, tmp_path, vae_one_thread):
    def run(name):
        out = tmp_path / name
        vae.main(["--data-root", vae_data_root, "--out-dir", str(out), "--figures-dir", str(out / "figs"),
                  "--epochs", "2", "--limit", "128", "--device", "cpu", "--seed", "7"])
        return torch.load(out / "vae.pt", weights_only=True)

    first, second = run("a"), run("b")
    assert first["n_train"] == 128 and first["n_test"] == 64
    assert first["train_loss"] == second["train_loss"] and first["test_loss"] == second["test_loss"]
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])


def vae_outputs(directory):
    """{name: PNG pixels (numpy)} of the figures in ``directory``."""
    from matplotlib.image import imread

    return {name: imread(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
            if name.endswith(".png")}


def vae_train_tiny(data_root, z_dim, seed):
    """(model, history, train_x, test_x): 2 epochs on the tiny MNIST, as vae.py trains."""
    train_x, _ = vae.preload(vae.load_mnist(data_root, train=True))
    test_x, _ = vae.preload(vae.load_mnist(data_root, train=False))
    torch.manual_seed(seed)
    model = vae.VAE(z_dim)
    history = vae.train_vae(model, train_x, test_x, epochs=2, seed=seed, log=None, progress=False)
    return model, history, train_x, test_x


def test_vae_checkpoint_round_trip_equals_the_trained_model(vae_data_root, tmp_path, vae_one_thread):
    """Train in this process, save, load: the loaded model computes what the model in memory does."""
    trained, history, train_x, test_x = vae_train_tiny(vae_data_root, 5, seed=2)
    path = str(tmp_path / "vae.pt")
    config = vae.VAEConfig(z_dim=5, epochs=2, seed=2)
    vae.save_checkpoint(path, trained, config=config, history=history, run={"n_train": len(train_x)})
    loaded, ckpt = vae.load_checkpoint(path)
    with torch.no_grad():
        for a, b in zip(trained.encoder(test_x), loaded.encoder(test_x)):
            assert torch.equal(a, b)
        z = torch.randn(16, 5)
        assert torch.equal(trained.decoder(z), loaded.decoder(z))
    assert vae.VAEConfig.from_dict(ckpt["config"]) == config
    assert all(ckpt[key] == history[key] for key in vae.HISTORY_KEYS) and ckpt["n_train"] == len(train_x)


def test_vae_cli_checkpoint_holds_the_model_an_in_process_run_trains(vae_trained, vae_data_root, vae_one_thread):
    """The CLI's vae.pt has the weights that train_vae gives with the same settings, recomputed here."""
    model, history, _, _ = vae_train_tiny(vae_data_root, 4, seed=3)
    ckpt = torch.load(vae_trained / "vae.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt["model"][name], tensor), name
    assert ckpt["train_loss"] == history["train_loss"] and ckpt["test_kl"] == history["test_kl"]


def test_vae_metrics_agree_with_an_independent_evaluation(vae_trained, vae_data_root):
    """The final test loss and its terms, recomputed from the saved model with the recorded seed."""
    metrics = json.loads((vae_trained / "vae_metrics.json").read_text())
    model, ckpt = vae.load_checkpoint(str(vae_trained / "vae.pt"))
    test_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=False))
    recon, kl = vae.evaluate(model, test_x, seed=metrics["seed"])
    assert metrics["test_recon"] == pytest.approx(recon, rel=1e-6)
    assert metrics["test_kl"] == pytest.approx(kl, rel=1e-6)
    assert metrics["test_loss"] == pytest.approx(recon + kl, rel=1e-6)
    assert metrics["test_recon_per_epoch"][-1] == metrics["test_recon"] and len(metrics["test_kl_per_epoch"]) == 2
    assert metrics["threads"] == 1 and metrics["n_test"] == VAE_N_TEST and "torch" in metrics["versions"]
    for key in ("train_loss_per_epoch", "test_loss_per_epoch", "seconds", "epochs", "z_dim", "n_train",
                "seed", "device"):
        assert key in metrics, key


def test_vae_plot_only_reproduces_the_figures_pixel_for_pixel(vae_trained, tmp_path):
    again = tmp_path / "again"
    vae.main(["--plot-only", "--out-dir", str(vae_trained), "--figures-dir", str(again)])
    first, second = vae_outputs(vae_trained / "figs"), vae_outputs(again)
    assert sorted(first) == sorted(second) == sorted(vae.FIGURE_NAMES)
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_vae_plot_only_renders_a_bare_state_dict(vae_data_root, tmp_path, capsys):
    """The assignment's notebook saves model.state_dict(): every figure is drawn from it, the loss
    plot as a labelled placeholder; the samples grid is the one generate_samples gives."""
    torch.manual_seed(0)
    model = vae.VAE(7)
    torch.save(model.state_dict(), tmp_path / "notebook.pt")
    vae.main(["--plot-only", "--checkpoint", str(tmp_path / "notebook.pt"), "--figures-dir",
              str(tmp_path / "figs"), "--data-root", vae_data_root, "--seed", "4"])
    out = capsys.readouterr().out
    assert "vae_loss.png (placeholder: no training history" in out and out.count("placeholder") == 1
    vae_figures_grid = tmp_path / "expected.png"
    vae.vf.save_grid(vae.generate_samples(model, 64, seed=4), str(vae_figures_grid), nrow=8)
    figures = vae_outputs(tmp_path / "figs")
    assert sorted(figures) == sorted(vae.FIGURE_NAMES)
    from matplotlib.image import imread

    assert np.array_equal(figures["vae_samples.png"], imread(vae_figures_grid))


def test_vae_one_class_test_set_gets_a_placeholder_interpolation(vae_data_root, tmp_path):
    """--limit 1 leaves no pair of digits to interpolate: the figure says so and replaces an older one."""
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "vae_interpolation.png").write_bytes(b"an older figure")
    proc = vae_in_process("--data-root", vae_data_root, "--out-dir", tmp_path / "out", "--figures-dir", figs,
                          "--limit", "1", "--epochs", "1", "--device", "cpu", "--threads", "1")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "vae_interpolation.png (placeholder: no interpolation: the 1 test image(s)" in proc.stdout
    assert (figs / "vae_interpolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(leftovers(figs)) == sorted(vae.FIGURE_NAMES)
    assert sorted(leftovers(tmp_path / "out")) == ["vae.pt", "vae_metrics.json"]


def test_vae_non_finite_loss_stops_in_process(vae_data_root, vae_one_thread):
    train_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=True))
    torch.manual_seed(0)
    with pytest.raises(vae.UserError, match="non-finite at epoch 1"):
        vae.train_vae(vae.VAE(4), train_x, epochs=3, lr=1e30, log=None, progress=False)


# ------------------------------------------------------------- CLI errors

def vae_in_process(*args, script=vae):
    """``script``'s command line (vae.py by default) run in this process through
    labio.run_main, as a CompletedProcess-like result (returncode, stdout, stderr); offline."""
    import contextlib
    import io
    import types

    import labio

    saved_argv, saved_env = sys.argv, dict(os.environ)
    saved_term, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [f"{script.__name__}.py", *map(str, args)]
    os.environ.update(OFFLINE_ENV)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            labio.run_main(script.main)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        signal.signal(signal.SIGTERM, saved_term)
        torch.set_num_threads(threads)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def vae_bad_files(vae_trained, tmp_path_factory):
    """Files that a user may hand to vae.py by mistake."""
    root = tmp_path_factory.mktemp("vae_bad")
    good = torch.load(vae_trained / "vae.pt", weights_only=True)
    torch.manual_seed(0)

    def save(name, obj):
        torch.save(obj, root / name)
        return root / name

    state = vae.VAE(4).state_dict()
    files = {
        "garbage": root / "garbage.pt", "truncated": root / "truncated.pt",
        "list": save("list.pt", [1, 2, 3]),
        "whole_module": save("whole_module.pt", vae.VAE(4)),
        "other_model": save("other_model.pt", torch.nn.Linear(784, 10).state_dict()),
        "wrong_shapes": save("wrong_shapes.pt", {**state, "encoder.fc1.weight": torch.zeros(300, 784)}),
        "missing_key": save("missing_key.pt", {k: v for k, v in state.items() if k != "decoder.fc4.bias"}),
        "wrong_format": save("wrong_format.pt", {**good, "format": "someone else's checkpoint"}),
        "lacks_key": save("lacks_key.pt", {k: v for k, v in good.items() if k != "test_kl"}),
        "bad_config": save("bad_config.pt", {**good, "config": {**good["config"], "z_dim": "four"}}),
        "config_vs_weights": save("config_vs_weights.pt", {**good, "config": {**good["config"], "z_dim": 9}}),
        "directory": root / "a_directory",
        "absent": root / "absent.pt",
    }
    files["garbage"].write_bytes(b"\x80\x04 this is not a checkpoint")
    files["truncated"].write_bytes((vae_trained / "vae.pt").read_bytes()[:3000])
    files["directory"].mkdir()
    empty_mnist = root / "no_mnist"
    empty_mnist.mkdir()
    damaged = make_mnist(str(root / "damaged_mnist"), 10, 10)
    with open(os.path.join(damaged, "MNIST", "raw", "train-images-idx3-ubyte"), "r+b") as f:
        f.truncate(100)
    (root / "holder").mkdir()
    a_file = root / "holder" / "a_file"     # its folder is checked too: nothing may appear there
    a_file.write_text("not a directory")
    return dict(files, no_mnist=empty_mnist, damaged_mnist=damaged, a_file=a_file)


# (id, arguments, fragments of the one-line message); OUT, FIGS, DATA, CKPT and the
# names of vae_bad_files are replaced by paths.
VAE_BAD_INPUTS = [
    ("epochs_zero", ["--epochs", "0"], ["--epochs", "positive integer"]),
    ("lr_negative", ["--lr", "-1"], ["--lr", "positive number"]),
    ("lr_diverges", ["--lr", "1e30", "--epochs", "2"], ["non-finite at epoch 1", "lower --lr"]),
    ("batch_size_zero", ["--batch-size", "0"], ["--batch-size"]),
    ("z_dim_text", ["--z-dim", "four"], ["--z-dim"]),
    ("threads_zero", ["--threads", "0"], ["--threads"]),
    ("limit_zero", ["--limit", "0"], ["--limit"]),
    ("seed_too_large", ["--seed", str(2 ** 70)], ["--seed"]),
    ("likelihood_unknown", ["--likelihood", "gaussian"], ["--likelihood", "invalid choice"]),
    ("flag_unknown", ["--frobnicate"], ["unrecognized arguments"]),
    ("checkpoint_without_plot_only", ["--checkpoint", "CKPT"], ["--checkpoint", "--plot-only"]),
    ("no_mnist_offline", ["--data-root", "no_mnist"], ["MNIST/raw", "could not be downloaded"]),
    ("damaged_mnist", ["--data-root", "damaged_mnist"], ["damaged", "train-images-idx3-ubyte"]),
    ("out_dir_under_a_file", ["--out-dir", "a_file/out"], ["cannot create output directory", "not a directory"]),
    ("figures_dir_under_a_file", ["--figures-dir", "a_file/figs"], ["cannot create output directory"]),
    ("plot_only_absent", ["--plot-only", "--checkpoint", "absent"], ["no checkpoint at", "make vae"]),
    ("plot_only_garbage", ["--plot-only", "--checkpoint", "garbage"], ["not a torch file, or damaged"]),
    ("plot_only_truncated", ["--plot-only", "--checkpoint", "truncated"], ["not a torch file, or damaged"]),
    ("plot_only_directory", ["--plot-only", "--checkpoint", "directory"], ["is a directory"]),
    ("plot_only_list", ["--plot-only", "--checkpoint", "list"], ["holds a list"]),
    ("plot_only_whole_module", ["--plot-only", "--checkpoint", "whole_module"], ["pickled", "state_dict()"]),
    ("plot_only_other_model", ["--plot-only", "--checkpoint", "other_model"],
     ["not a state_dict of the assignment's VAE", "weight, bias"]),
    ("plot_only_wrong_shapes", ["--plot-only", "--checkpoint", "wrong_shapes"],
     ["encoder.fc1.weight (300, 784), expected (400, 784)"]),
    ("plot_only_missing_key", ["--plot-only", "--checkpoint", "missing_key"], ["missing decoder.fc4.bias"]),
    ("plot_only_wrong_format", ["--plot-only", "--checkpoint", "wrong_format"],
     ["format \"someone else's checkpoint\"", "vae.py checkpoint v2"]),
    ("plot_only_lacks_key", ["--plot-only", "--checkpoint", "lacks_key"], ["lacks test_kl"]),
    ("plot_only_bad_config", ["--plot-only", "--checkpoint", "bad_config"], ["config z_dim='four'"]),
    ("plot_only_config_vs_weights", ["--plot-only", "--checkpoint", "config_vs_weights"],
     ["says z_dim 9", "weights have z_dim 4"]),
    ("plot_only_other_z_dim", ["--plot-only", "--checkpoint", "CKPT", "--z-dim", "20"],
     ["has z_dim 4", "--z-dim 20"]),
    ("plot_only_no_mnist", ["--plot-only", "--checkpoint", "CKPT", "--data-root", "no_mnist"], ["MNIST/raw"]),
]


def vae_bad_argv(arguments, vae_bad_files, out, figs, data_root, checkpoint):
    names = {**{k: str(v) for k, v in vae_bad_files.items()}, "CKPT": str(checkpoint)}
    argv = [names.get(a, a) for a in arguments]
    argv = [str(vae_bad_files["a_file"]) + a[len("a_file"):] if a.startswith("a_file/") else a for a in argv]
    defaults = {"--out-dir": str(out), "--figures-dir": str(figs), "--data-root": data_root}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    return argv + ["--device", "cpu", "--threads", "1"] * ("--threads" not in argv and "--device" not in argv)


@pytest.fixture
def vae_older_outputs(vae_trained, tmp_path):
    """OUT and FIGURES holding a previous run's outputs, which a failed run must leave alone."""
    import shutil

    out, figs = tmp_path / "out", tmp_path / "figs"
    out.mkdir()
    for name in ("vae.pt", "vae_metrics.json"):
        shutil.copy2(vae_trained / name, out / name)
    shutil.copytree(vae_trained / "figs", figs)
    return out, figs


@pytest.mark.parametrize("case", VAE_BAD_INPUTS, ids=[c[0] for c in VAE_BAD_INPUTS])
def test_vae_bad_input_is_one_line_and_changes_no_file(case, vae_bad_files, vae_older_outputs, vae_data_root):
    _, arguments, fragments = case
    out, figs = vae_older_outputs
    argv = vae_bad_argv(arguments, vae_bad_files, out, figs, vae_data_root, out / "vae.pt")
    before = snapshot(out, figs, vae_bad_files["a_file"].parent)
    line = assert_rejected(vae_in_process(*argv), before, [out, figs, vae_bad_files["a_file"].parent], *fragments)
    print(f"{case[0]}: {line}")   # shown with -s: the list of messages for the report


@pytest.mark.parametrize("name", ["flag_unknown", "plot_only_garbage"])
def test_vae_bad_input_as_a_real_process(name, vae_bad_files, vae_older_outputs, vae_data_root):
    """A few of the above through a real interpreter: nothing else reaches stderr."""
    _, arguments, fragments = next(c for c in VAE_BAD_INPUTS if c[0] == name)
    out, figs = vae_older_outputs
    argv = vae_bad_argv(arguments, vae_bad_files, out, figs, vae_data_root, out / "vae.pt")
    before = snapshot(out, figs)
    proc = run_cli("vae.py", *argv, env=OFFLINE_ENV, timeout=120)
    assert proc.returncode == 2
    assert_rejected(proc, before, [out, figs], *fragments)


def test_vae_bad_inputs_are_many_and_distinct():
    assert len({c[0] for c in VAE_BAD_INPUTS}) == len(VAE_BAD_INPUTS) >= 12


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_vae_device_cuda_without_a_gpu(vae_older_outputs, vae_data_root):
    out, figs = vae_older_outputs
    before = snapshot(out, figs)
    proc = vae_in_process("--device", "cuda", "--out-dir", out, "--figures-dir", figs, "--data-root", vae_data_root)
    assert_rejected(proc, before, [out, figs], "--device cuda", "no CUDA GPU")


def test_vae_failed_run_creates_no_directory(vae_bad_files, tmp_path):
    """MNIST missing: the output directories are checked first but not created."""
    proc = vae_in_process("--data-root", vae_bad_files["no_mnist"], "--out-dir", tmp_path / "a" / "out",
                          "--figures-dir", tmp_path / "b" / "figs")
    assert_user_error(proc, "MNIST/raw")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------- interrupts

VAE_INTERRUPT_CODE = """
import sys, time
import labio, vae
moment = sys.argv[1]
if moment == "training":      # stop in the first epoch's log line
    train_vae = vae.train_vae
    def slow_log(line):
        print("TRAINING", flush=True)
        time.sleep(60)
    vae.train_vae = lambda *a, **k: train_vae(*a, **dict(k, log=slow_log))
else:                         # stop while the first figure is drawn, after vae.pt
    def slow_plot(*args, **kwargs):
        print("FIGURES", flush=True)
        time.sleep(60)
    vae.vf.plot_loss = slow_plot
sys.argv = ["vae.py"] + sys.argv[2:]
labio.run_main(vae.main)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["training", "figures"])
def test_vae_interrupt_leaves_each_output_complete_or_absent(moment, sig, vae_data_root, tmp_path):
    out, figs = tmp_path / "out", tmp_path / "figs"
    code, err = interrupt_at(moment.upper(), VAE_INTERRUPT_CODE,
                             [moment, "--data-root", vae_data_root, "--out-dir", out, "--figures-dir", figs,
                              "--epochs", "2", "--limit", "64", "--device", "cpu", "--threads", "1"], sig=sig)
    assert code == 130 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], err
    everything = ["vae_metrics.json", "vae.pt", *vae.FIGURE_NAMES]
    if moment == "training":
        assert "nothing was completed" in lines[0] and all(name in lines[0] for name in everything)
        assert leftovers(out) == [] and leftovers(figs) == []
    else:
        completed, missing = lines[0].split("not written:")
        assert "vae_metrics.json" in completed and "vae.pt" in completed
        assert all(name in missing for name in vae.FIGURE_NAMES), lines[0]
        assert leftovers(out) == ["vae.pt", "vae_metrics.json"] and leftovers(figs) == []
        vae.load_checkpoint(str(out / "vae.pt"))           # complete: it loads and checks
        assert json.loads((out / "vae_metrics.json").read_text())["epochs"] == 2


# ------------------------------------------------------------ sweep_vae.py

import sweep_vae  # noqa: E402


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
    assert summary["processes"] == 2 and "vae.train_model" in summary["strategy"]
    assert (summary["epochs"], summary["batch_size"], summary["lr"], summary["seed"]) == (2, 64, 1e-3, 0)
    assert (summary["n_train"], summary["n_test"]) == (VAE_N_TRAIN, VAE_N_TEST)
    for run in summary["runs"]:
        assert sorted(run) == sorted([*sweep_vae.RUN_KEYS, "checkpoint", "epoch_threads"])
        assert all(len(run[key]) == 2 for key in vae.HISTORY_KEYS)
        assert run["test_loss"] == [r + k for r, k in zip(run["test_recon"], run["test_kl"])]
        model, ckpt = vae.load_checkpoint(str(vae_sweep / run["checkpoint"]), z_dim=run["z_dim"])
        assert ckpt["train_loss"] == run["train_loss"]
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
    ("lr_diverges", ["--lr", "1e30", "--epochs", "1", "--z-dims", "2", "3"], ["non-finite at epoch 1", "lower --lr"]),
    ("no_mnist", ["--data-root", "NO_MNIST"], ["MNIST/raw"]),
    ("plot_only_no_summary", ["--plot-only", "--out-dir", "EMPTY"], ["not found", "make sweep-vae` first"]),
    ("plot_only_not_json", ["--plot-only", "--out-dir", "not_json"], ["as JSON", "make sweep-vae` again"]),
    ("plot_only_other_kind", ["--plot-only", "--out-dir", "other_kind"], ["not a sweep_vae.py summary", "sweep_logreg"]),
    ("plot_only_no_runs", ["--plot-only", "--out-dir", "no_runs"], ["'runs' is not a list"]),
    ("plot_only_lost_checkpoint", ["--plot-only", "--out-dir", "lost_checkpoint"],
     ["no checkpoint at", "vae_z2.pt", "make sweep-vae"]),
    ("plot_only_mixed_runs", ["--plot-only", "--out-dir", "mixed_runs"],
     ["vae_z2.pt holds a z_dim-20 model", "lists it for z_dim 2"]),
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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))


# =========================================================================
# labio.py: faults at the edges (data files, writes, pipes, memory, backends)
# =========================================================================

import labio as _labio  # noqa: E402


def raw_files(root):
    raw = os.path.join(root, "MNIST", "raw")
    return {n: open(os.path.join(raw, n), "rb").read() for n in sorted(os.listdir(raw))}


def test_io_one_missing_test_file_names_it_and_never_says_delete(tmp_path):
    root = make_mnist(str(tmp_path / "d"), 30, 20)
    os.remove(os.path.join(root, "MNIST", "raw", "t10k-images-idx3-ubyte"))
    before = raw_files(root)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE_ENV.items():
            mp.setenv(k, v)
        with pytest.raises(_labio.UserError) as err:
            _labio.load_mnist(root, train=True)     # the *train* split: its files are intact
    assert "t10k-images-idx3-ubyte" in str(err.value) and "delete" not in str(err.value)
    assert raw_files(root) == before


def test_io_gz_only_file_is_decompressed_and_read(tmp_path):
    import gzip
    root = make_mnist(str(tmp_path / "d"), 30, 20)
    path = os.path.join(root, "MNIST", "raw", "t10k-images-idx3-ubyte")
    expected = open(path, "rb").read()
    with gzip.open(path + ".gz", "wb") as f:
        f.write(expected)
    os.remove(path)
    assert len(_labio.load_mnist(root, train=False)) == 20
    assert open(path, "rb").read() == expected


def test_io_failed_download_creates_no_folder(tmp_path, monkeypatch):
    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "nonexistent" / "deeper"
    with pytest.raises(_labio.UserError, match="could not be downloaded"):
        _labio.load_mnist(str(root), train=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage, fragment", [
    ("images 14x56", "expected 28x28"),
    ("fewer labels", "disagree"),
])
def test_io_idx_header_must_be_mnist(damage, fragment, tmp_path):
    root = make_mnist(str(tmp_path / "d"), 30, 20)
    raw = os.path.join(root, "MNIST", "raw")
    rng = np.random.default_rng(0)
    if damage == "images 14x56":
        write_idx(os.path.join(raw, "train-images-idx3-ubyte"), rng.integers(0, 255, (30, 14, 56)))
    else:
        write_idx(os.path.join(raw, "train-labels-idx1-ubyte"), np.arange(29) % 10)
    with pytest.raises(_labio.UserError, match=fragment) as err:
        _labio.load_mnist(root, train=True)
    assert "train-" in str(err.value)


def test_io_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    """The temp file is a link to /dev/full, so every write fails with ENOSPC as on a full disk."""
    target = tmp_path / "out.json"
    target.write_text("old")
    real_mkstemp = _labio.tempfile.mkstemp

    def full_disk_mkstemp(**kwargs):
        fd, tmp = real_mkstemp(**kwargs)
        os.close(fd)
        os.remove(tmp)
        os.symlink("/dev/full", tmp)
        return os.open(tmp, os.O_WRONLY), tmp

    monkeypatch.setattr(_labio.tempfile, "mkstemp", full_disk_mkstemp)
    monkeypatch.setattr(_labio.os, "chmod", lambda *a: None)     # don't chmod /dev/full
    with pytest.raises(_labio.UserError, match="no space left on the device"):
        _labio.write_json(str(target), {"x": list(range(100000))})
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_io_output_that_is_a_directory_or_dangling_link_fails_before_work(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(_labio.UserError, match="names a directory"):
        _labio.write_json(str(tmp_path / "d"), {})
    os.symlink(tmp_path / "missing", tmp_path / "link")
    with pytest.raises(_labio.UserError, match="does not exist"):
        _labio.check_can_create(str(tmp_path / "link"))
    assert sorted(os.listdir(tmp_path)) == ["d", "link"]


RUN_MAIN = """
import sys, labio
def main():
    if sys.argv[1] == "pipe":
        for i in range(10 ** 6):
            print("line", i)
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
labio.run_main(main)
"""


def test_io_closed_pipe_is_one_line_without_traceback():
    import shlex
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(RUN_MAIN)} pipe | head -1", shell=True, cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout == "line 0\n"
    assert_user_error(subprocess.CompletedProcess([], 1, "", proc.stderr), "closed the pipe")


def test_io_out_of_memory_is_one_line():
    proc = subprocess.run([sys.executable, "-c", RUN_MAIN, "oom"], cwd=HERE, capture_output=True, text=True)
    assert proc.returncode == 2
    assert_user_error(proc, "not enough memory")


def test_io_a_bad_mplbackend_does_not_stop_a_figure(tmp_path):
    code = ("import labio; plt = labio.pyplot(); fig = plt.figure(); "
            f"labio.save_figure(fig, {str(tmp_path / 'f.png')!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "nonsense"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "f.png").stat().st_size > 0


# =========================================================================
# Faults in the scripts (issue 15)
# =========================================================================

def fault_mats(tmp_path, X, y, X_te=None, y_te=None):
    """A train/test .mat pair in the extractor's format (the test set defaults to the train set)."""
    train = logreg_write_mat(tmp_path / "train.mat", X, y, **LOGREG_RANDOM_INIT)
    if X_te is None:
        return train, train
    return train, logreg_write_mat(tmp_path / "test.mat", X_te, y_te, **LOGREG_RANDOM_INIT)


@pytest.mark.parametrize("script", ["logreg.py", "sweep_logreg.py"])
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
    for copy in (True, False):
        Xs, mean, scale = logreg.fit_standardize(X.copy(), copy=copy)
        X64 = X.astype(np.float64)
        assert np.all(np.isfinite(Xs)) and np.all(np.isfinite(mean)) and np.all(np.isfinite(scale))
        np.testing.assert_allclose(mean, X64.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(scale[[0, 1, 2, 4]], X64.std(axis=0)[[0, 1, 2, 4]], rtol=1e-5)
        varied = X64[:, [0, 1, 2, 4]]
        expected = (varied - varied.mean(axis=0)) / varied.std(axis=0)
        np.testing.assert_allclose(Xs[:, [0, 1, 2, 4]], expected, rtol=1e-4, atol=1e-5)
        assert np.all(Xs[:, 3] == 0)
        np.testing.assert_array_equal(logreg.standardize(X, mean, scale), Xs)


@pytest.mark.parametrize("args, advice", [
    (["--reference", "--lr", "1e9"], "lower --lr"),
    (["--lr", "1e9"], "lower --lr"),
    (["--l2", "1e9"], "lower --l2"),
    (["--l2", "1e9", "--lr", "0.5"], "lower --lr or --l2"),
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
    proc = run_cli("report.py", "--out-dir", out, "--figures-dir", figs, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "No configuration converged: every one diverged" in report.read_text()


@pytest.mark.parametrize("kind", ["checkpoint", "bare_state_dict", "history"])
def test_faults_a_vae_checkpoint_with_nan_stops_before_any_figure(kind, vae_trained, vae_data_root, tmp_path):
    ckpt = torch.load(vae_trained / "vae.pt", weights_only=True)
    if kind == "history":
        ckpt["test_loss"][-1] = math.nan
    else:
        ckpt["model"]["decoder.fc3.weight"][0, 0] = math.nan
    path = tmp_path / "nan.pt"
    torch.save(ckpt if kind != "bare_state_dict" else ckpt["model"], path)
    figs = tmp_path / "figs"
    shutil.copytree(vae_trained / "figs", figs)
    before = snapshot(tmp_path)
    proc = vae_in_process("--plot-only", "--checkpoint", path, "--figures-dir", figs, "--data-root", vae_data_root)
    fragment = "'test_loss' holds NaN" if kind == "history" else "decoder.fc3.weight holds NaN"
    assert_rejected(proc, before, [tmp_path], str(path), fragment, "make vae")


@pytest.mark.parametrize("damage", ["truncated", "nan", "directory"])
def test_faults_a_bad_sweep_checkpoint_names_it_and_make_sweep_vae(damage, vae_sweep, vae_data_root, tmp_path):
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
    fragment = {"truncated": "not a torch file", "nan": "encoder.fc1.bias holds NaN or infinite",
                "directory": "is a directory"}[damage]
    line = assert_rejected(proc, before, [tmp_path], str(path), fragment)
    assert "make sweep-vae" in line or damage == "directory", line
    assert "make vae`" not in line


@pytest.mark.parametrize("script, args, flag", [
    ("vae.py", ["--z-dim", "10000000"], "lower --z-dim"),
    ("sweep_vae.py", ["--z-dims", "2", "10000000"], "lower --z-dims"),
])
def test_faults_a_model_too_large_for_memory_fails_before_any_work(script, args, flag, tmp_path):
    before = snapshot(tmp_path)
    proc = run_cli(script, *args, "--data-root", tmp_path / "no_data", "--out-dir", tmp_path / "out",
                   "--figures-dir", tmp_path / "figs", "--device", "cpu", env=OFFLINE_ENV, timeout=120)
    assert proc.returncode == 2
    assert_rejected(proc, before, [tmp_path], "GB of memory", "Adam's two moments", flag)


def test_faults_the_memory_check_blames_the_batch_when_the_batch_is_what_is_large(monkeypatch):
    monkeypatch.setattr(vae, "free_memory", lambda device: 100e6)
    vae.check_memory([20], 64, None, torch.device("cpu"))          # 12 MB: fits
    with pytest.raises(vae.UserError, match="lower --batch-size$"):
        vae.check_memory([20], 10 ** 9, None, torch.device("cpu"))   # capped at 60000 images: 1.6 GB
    assert vae.parameter_count(7) == sum(p.numel() for p in vae.VAE(7).parameters())


@pytest.mark.parametrize("script, flag", [("vae.py", "--figures-dir"), ("vae.py", "--out-dir"),
                                          ("sweep_vae.py", "--out-dir"), ("sweep_vae.py", "--figures-dir")])
def test_faults_an_output_dir_that_is_a_dangling_symlink_fails_before_training(script, flag, vae_data_root, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "link")
    dirs = {"--out-dir": work / "out", "--figures-dir": work / "figs", flag: tmp_path / "link"}
    before = snapshot(work)
    proc = run_cli(script, *[a for kv in dirs.items() for a in map(str, kv)], "--data-root", vae_data_root,
                   "--epochs", "1", "--limit", "64", "--device", "cpu", env=OFFLINE_ENV, timeout=120)
    assert_rejected(proc, before, [work], "symlink", "does not exist")
    assert proc.stdout == "" and sorted(os.listdir(tmp_path)) == ["link", "work"]    # nothing trained


def test_faults_a_directory_where_a_result_should_be_is_named(logreg_older_outputs, tmp_path):
    out = tmp_path / "out"
    (out / "logreg.npz").mkdir(parents=True)
    before = snapshot(tmp_path)
    proc = logreg_run("--plot-only", "--out-dir", out, "--figures-dir", tmp_path / "figs")
    assert_rejected(proc, before, [tmp_path], "logreg.npz", "is a directory")
    (out / "sweep_logreg.json").mkdir()
    proc = sweep_run("--plot-only", "--out-dir", out, "--figures-dir", tmp_path / "figs")
    assert_rejected(proc, snapshot(tmp_path), [tmp_path], "sweep_logreg.json", "is a directory")


def test_faults_make_rebuilds_a_missing_metrics_file_that_the_report_reads(tiny_pipeline, tmp_path):
    settings = pipeline_copy(tiny_pipeline, tmp_path)
    for target, metrics, script in (("vae", "vae_metrics.json", "vae.py"),
                                    ("logreg", "logreg_metrics.json", "logreg.py")):
        dry = run_make("-n", target, *settings)
        assert dry.returncode == 0 and script not in dry.stdout, dry.stdout
        os.remove(tmp_path / "out" / metrics)
        dry = run_make("-n", target, *settings)
        assert dry.returncode == 0 and f"{script} " in dry.stdout, dry.stdout + dry.stderr
    proc = run_make("report", *settings)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "doc" / "REPORT.md").read_text()
    assert "## Variational autoencoder" in report and "## Logistic regression" in report
    records = sorted(p.name for p in (tmp_path / "out").glob(".*.args"))
    assert ".vae.pt.args" in records and ".vae_metrics.json.args" not in records
    assert sys.executable not in run_make("all", *settings).stdout     # and nothing is left to do
