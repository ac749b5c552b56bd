"""Make's settings and paths: a bad one is refused before anything runs, the checkout and
tracked files are never touched, an interrupted fresh run resumes, and the README's worked
example (HIDDEN 400 -> 512, then `make vae`) trains the edit."""
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from helpers import (HERE, assert_rejected, assert_user_error, checkout_copy, leftovers, make_in, make_mnist,
                     run_cli, run_make, sigint_as_in_a_terminal, snapshot, tiny_pipeline_args)


@pytest.mark.parametrize("report", ["dir", "dir/", "new/"])
def test_report_path_that_names_a_directory_is_one_line(report, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    proc = run_cli("experiments.report", "--out-dir", tmp_path / "out", "--report", f"{tmp_path}/{report}")
    assert_rejected(proc, before, [tmp_path], "names a directory")


def test_make_resumes_after_an_interrupt_without_redoing_completed_stages(tmp_path):
    """Ctrl-C (SIGINT to make's process group) while the test split is extracted, the
    train .mat complete; then make finishes the job without redoing the train split."""
    data = make_mnist(str(tmp_path / "data"), n_train=60, n_test=1000, seed=5)
    settings = [a for a in tiny_pipeline_args(data, tmp_path) if not a.startswith("LIMIT=")]
    args = ["make", "--no-print-directory", f"PYTHON={sys.executable}", "all", *settings]
    proc = subprocess.Popen(args, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    splits_started = 0
    try:
        for line in proc.stdout:
            splits_started += line.startswith("resnet50 weights:")   # printed by each split's run
            if splits_started == 2:   # the test split's model is built; 1000 images to go
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
    again = run_make("features", *settings)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "--split train" not in again.stdout and "--split test" in again.stdout
    assert os.stat(out / "mnist_train.mat").st_mtime_ns == train_mtime
    third = run_make("features", *settings)
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


def test_readme_changing_the_models_points_at_what_exists():
    """Every name the README's "Changing the models" table sends a reader to is defined in the file it names."""
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme.split("## Changing the models", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and " in `" in line]
    assert len(rows) >= 6
    for line in rows:
        where = line.split(" | ")[1]
        names, _, path = where.partition(" in `")
        source = open(os.path.join(HERE, path.partition("`")[0])).read()
        for name in names.strip().strip("`").split("`, `"):
            assert re.search(rf"^(class |def )?{name}\b", source, re.M), f"{name} is not defined in {path}"
