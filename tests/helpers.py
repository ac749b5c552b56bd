"""What the tests share that is not a fixture: tiny MNIST files, running the lab's
commands as a user would, and the checks that a failure is one line and changed no file."""
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.io as sio
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout
sys.path.insert(0, HERE)

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
    """Run one of the lab's commands as a user would, from the checkout: a script by its
    path (``logreg.py``), an experiment or tool as a module (``experiments.report``)."""
    full_env = {**os.environ, **(env or {})}
    command = [sys.executable, os.path.join(HERE, script)] if script.endswith(".py") else [sys.executable, "-m", script]
    return subprocess.run([*command, *map(str, args)],
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


VAE_N_TRAIN, VAE_N_TEST = 256, 64


def assert_same_run(weights, other_weights, history, other_history, keys):
    """Two trainings that are the same run: bit-equal weights and histories."""
    for name in weights:
        assert torch.equal(weights[name], other_weights[name]), name
    for key in keys:
        assert history[key] == other_history[key], key


def vae_outputs(directory):
    """{name: PNG pixels (numpy)} of the figures in ``directory``."""
    from matplotlib.image import imread

    return {name: imread(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
            if name.endswith(".png")}


def vae_in_process(*args, script=vae):
    """``script``'s command line (vae.py by default) run in this process through
    lab.cli.run_main, as a CompletedProcess-like result (returncode, stdout, stderr); offline."""
    import contextlib
    import io
    import types

    import lab.cli

    saved_argv, saved_env = sys.argv, dict(os.environ)
    saved_term, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [f"{script.__name__.rsplit('.', 1)[-1]}.py", *map(str, args)]
    os.environ.update(OFFLINE_ENV)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            lab.cli.run_main(script.main)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        signal.signal(signal.SIGTERM, saved_term)
        torch.set_num_threads(threads)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assignment_get_one_hot(labels):
    """The assignment's own one-hot of a 1 x m label row from loadmat."""
    one_hot = np.zeros((labels.shape[1], 10))
    one_hot[np.arange(labels.shape[1]), labels[0]] = 1
    return one_hot


def fault_mats(tmp_path, X, y, X_te=None, y_te=None):
    """A train/test .mat pair in the extractor's format (the test set defaults to the train set)."""
    train = logreg_write_mat(tmp_path / "train.mat", X, y, **LOGREG_RANDOM_INIT)
    if X_te is None:
        return train, train
    return train, logreg_write_mat(tmp_path / "test.mat", X_te, y_te, **LOGREG_RANDOM_INIT)


def sweep_run(*args):
    return run_cli("experiments.sweep_logreg", "--no-progress", *args, timeout=180)


def run_make(*args, timeout=600):
    """`make ARGS` in the project with this interpreter (no .venv is built)."""
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, timeout=timeout)


def tiny_pipeline_args(data, top):
    return [f"DATA={data}", "WEIGHTS=none", "LIMIT=40", "DEVICE=cpu", f"OUT={top}/out",
            f"FIGURES={top}/figures", f"REPORT={top}/doc/REPORT.md"]


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
