"""lab/: faults at the edges (MNIST files, writes to a full disk or a directory, a closed pipe, no memory,
a bad matplotlib backend)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import lab.cli
import lab.files
import lab.mnist
from helpers import HERE, OFFLINE_ENV, assert_user_error, leftovers, make_mnist, write_idx


# =========================================================================
# lab/: faults at the edges (data files, writes, pipes, memory, backends)
# =========================================================================


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
        with pytest.raises(lab.cli.UserError) as err:
            lab.mnist.load_mnist(root, train=True)     # the *train* split: its files are intact
    assert "t10k-images-idx3-ubyte" in str(err.value) and "delete" not in str(err.value)
    assert raw_files(root) == before


def test_io_a_directory_where_a_file_should_be_is_named_as_such(tmp_path, monkeypatch):
    """Issue 22: not "could not be downloaded ... no network?", which was false."""
    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    root = make_mnist(str(tmp_path / "d"), 30, 20)
    path = os.path.join(root, "MNIST", "raw", "t10k-images-idx3-ubyte")
    os.remove(path)
    os.mkdir(path)
    with pytest.raises(lab.cli.UserError) as err:
        lab.mnist.load_mnist(root, train=False)
    message = str(err.value)
    assert f"{path!r} is a directory" in message and "download" not in message and "\n" not in message
    assert os.listdir(path) == []


def test_io_gz_only_file_is_decompressed_and_read(tmp_path):
    import gzip
    root = make_mnist(str(tmp_path / "d"), 30, 20)
    path = os.path.join(root, "MNIST", "raw", "t10k-images-idx3-ubyte")
    expected = open(path, "rb").read()
    with gzip.open(path + ".gz", "wb") as f:
        f.write(expected)
    os.remove(path)
    assert len(lab.mnist.load_mnist(root, train=False)) == 20
    assert open(path, "rb").read() == expected


def test_io_failed_download_creates_no_folder(tmp_path, monkeypatch):
    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "nonexistent" / "deeper"
    with pytest.raises(lab.cli.UserError, match="could not be downloaded"):
        lab.mnist.load_mnist(str(root), train=True)
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
    with pytest.raises(lab.cli.UserError, match=fragment) as err:
        lab.mnist.load_mnist(root, train=True)
    assert "train-" in str(err.value)


def test_io_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    """The temp file is a link to /dev/full, so every write fails with ENOSPC as on a full disk."""
    target = tmp_path / "out.json"
    target.write_text("old")
    real_mkstemp = lab.files.tempfile.mkstemp

    def full_disk_mkstemp(**kwargs):
        fd, tmp = real_mkstemp(**kwargs)
        os.close(fd)
        os.remove(tmp)
        os.symlink("/dev/full", tmp)
        return os.open(tmp, os.O_WRONLY), tmp

    monkeypatch.setattr(lab.files.tempfile, "mkstemp", full_disk_mkstemp)
    monkeypatch.setattr(lab.files.os, "chmod", lambda *a: None)     # don't chmod /dev/full
    with pytest.raises(lab.cli.UserError, match="no space left on the device"):
        lab.files.write_json(str(target), {"x": list(range(100000))})
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_io_output_that_is_a_directory_or_dangling_link_fails_before_work(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(lab.cli.UserError, match="names a directory"):
        lab.files.write_json(str(tmp_path / "d"), {})
    os.symlink(tmp_path / "missing", tmp_path / "link")
    with pytest.raises(lab.cli.UserError, match="does not exist"):
        lab.files.check_can_create(str(tmp_path / "link"))
    assert sorted(os.listdir(tmp_path)) == ["d", "link"]


RUN_MAIN = """
import sys, lab.cli
def main():
    if sys.argv[1] == "pipe":
        for i in range(10 ** 6):
            print("line", i)
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
lab.cli.run_main(main)
"""


def test_io_closed_pipe_is_one_line_without_traceback():
    import shlex
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(RUN_MAIN)} pipe | head -1"
    proc = subprocess.run(command, shell=True, cwd=HERE, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "line 0\n"
    assert_user_error(subprocess.CompletedProcess([], 1, "", proc.stderr), "closed the pipe")


def test_io_out_of_memory_is_one_line():
    proc = subprocess.run([sys.executable, "-c", RUN_MAIN, "oom"], cwd=HERE, capture_output=True, text=True)
    assert proc.returncode == 2
    assert_user_error(proc, "not enough memory")


def test_io_a_bad_mplbackend_does_not_stop_a_figure(tmp_path):
    code = ("import lab.plots; plt = lab.plots.pyplot(); fig = plt.figure(); "
            f"lab.plots.save_figure(fig, {str(tmp_path / 'f.png')!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "nonsense"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "f.png").stat().st_size > 0


# ------------------------------------------------------------------ signals during the cleanup

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


def test_an_interrupt_just_after_a_rename_still_counts_the_file_as_completed(tmp_path, monkeypatch):
    """Ctrl-C landing between the rename of a finished file and its record once made the
    script say 'not written' of a file it had just completed, or left it without its settings
    record (and a .args.tmp file): the next make retrained."""
    real_replace, path = os.replace, str(tmp_path / "a.json")
    monkeypatch.setenv("LAB_RECORD", path)
    monkeypatch.setenv("LAB_SETTINGS", "LIMIT=40")

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
    assert leftovers(tmp_path) == [".a.json.args", "a.json"]
    assert (tmp_path / ".a.json.args").read_text() == "LIMIT=40\n"


# ------------------------------------------------------------------ records, damaged outputs, startup

def test_the_settings_record_is_written_as_soon_as_its_output_is_complete(tmp_path, monkeypatch):
    """make names the output to record (LAB_RECORD); an interrupt after it, while the figures are
    drawn, once left the output without a record, and the next make retrained."""
    monkeypatch.setenv("LAB_RECORD", str(tmp_path / "vae.pt"))
    monkeypatch.setenv("LAB_SETTINGS", "LIMIT=40 ZDIM=")
    lab.files.plan_outputs([tmp_path / "metrics.json", tmp_path / "vae.pt"])
    lab.files.write_json(str(tmp_path / "metrics.json"), {})
    assert leftovers(tmp_path) == ["metrics.json"]
    lab.files.write_json(str(tmp_path / "vae.pt"), {})
    assert (tmp_path / ".vae.pt.args").read_text() == "LIMIT=40 ZDIM=\n"
    assert leftovers(tmp_path) == [".vae.pt.args", "metrics.json", "vae.pt"]
    assert ".args" not in lab.files.outputs_message()


@pytest.mark.parametrize("damage", ["truncated", "missing key", "directory", "absent"])
def test_reading_a_damaged_output_is_one_line_whose_advice_repairs_it(damage, tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1}' if damage == "missing key" else '{"a": ' if damage == "truncated" else "")
    if damage in ("directory", "absent"):
        path.unlink()
        if damage == "directory":
            path.mkdir()
    with pytest.raises(lab.cli.UserError) as err:
        with lab.files.reading(str(path), "vae"):
            json.load(open(path))["b"]
    message = str(err.value)
    assert "\n" not in message and "make vae" in message
    expected = {"truncated": f"rm -f '{path}' && make vae", "missing key": "KeyError: 'b'",
                "directory": "move it away", "absent": "not found"}
    assert expected[damage] in message


def test_a_full_disk_during_torch_save_is_one_line(tmp_path, monkeypatch):
    import torch

    def failing_save(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/0")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(lab.cli.UserError, match="no space left on the device"):
        with lab.files.atomic_path(str(tmp_path / "vae.pt")) as tmp:
            torch.save({}, tmp)
    assert leftovers(tmp_path) == []


def test_ctrl_c_while_a_script_imports_torch_is_one_line():
    """Once, a traceback from inside torch's import, or its C++ start-up aborting the process."""
    code = ("import sys; sys.argv[0] = 'vae.py'; import lab.cli, os, signal; "
            "os.kill(os.getpid(), signal.SIGINT); import torch; lab.cli.run_main(lambda: print('ran'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    assert proc.returncode == 130 and proc.stdout == ""
    assert_user_error(proc, "vae.py: interrupted; nothing was completed")
