"""extract_features.py: features against the assignment's per-image loop and torchvision's extractor,
the .mat contract, another network, determinism, bad inputs and interrupts."""
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import scipy.io as sio
import torch

import extract_features as ef
import lab.cli
from helpers import (HERE, OFFLINE_ENV, assert_rejected, assignment_get_one_hot, interrupt_at, leftovers,
                     make_mnist, run_cli, snapshot)


# ------------------------------------------------------- features: oracles


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
    from torchvision.models import ResNet50_Weights, resnet50

    # torchvision documents the multiply-adds of the whole network at 224x224 (4.09 G).
    assert abs(ef.count_flops(resnet50().eval(), 224) / 2 / 1e9 - ResNet50_Weights.IMAGENET1K_V1.meta["_ops"]) < 0.02
    network = ef.feature_network()              # without fc: 0.158 GFLOP at 28x28 (issue #2)
    assert abs(ef.count_flops(network, 28) / 1e9 - 0.158) < 0.001
    assert ef.count_flops(ef.build_extractor(network, torch.device("cpu")), 28) == ef.count_flops(network, 28)


# ------------------------------------------------------ features: contract


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
        assert mat_text(trmat, "network") == "resnet50" and int(np.squeeze(trmat["feature_dim"])) == 2048
        gflops = float(np.squeeze(trmat["gflops_per_image"]))
        assert gflops == ef.count_flops(ef.feature_network(), 28) / 1e9
    assert "img/s" in proc.stdout and "GFLOP/s" in proc.stdout and "resnet50" in proc.stdout
    assert not [f for f in leftovers(out) if f.endswith(".tmp")]


def test_another_network_is_one_edit_of_feature_network(mnist_root, tmp_path, monkeypatch, capsys):
    """Issue 21: resnet18 in feature_network, and nothing else, runs end to end: the network's name,
    output width, FLOPs and weights names are read from the model it returns."""
    import inspect

    from torchvision import datasets
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor
    from torch.utils.flop_counter import FlopCounterMode

    source = inspect.getsource(ef.feature_network)
    assert source.count("resnet50") == 1
    namespace = dict(vars(ef))
    exec(source.replace("resnet50", "resnet18"), namespace)
    monkeypatch.setattr(ef, "feature_network", namespace["feature_network"])
    torch.manual_seed(5)
    reference = resnet18().eval()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    wrong = run_extract_in_process(monkeypatch, capsys, "--data-root", mnist_root, "--out-dir", tmp_path,
                                   "--weights", "IMAGENET1K_V2")      # resnet50 has it, resnet18 has not
    assert wrong.returncode == 2 and "expected IMAGENET1K_V1, DEFAULT, none" in wrong.stderr, wrong.stderr
    proc = run_extract_in_process(monkeypatch, capsys, "--data-root", mnist_root, "--out-dir", tmp_path,
                                  "--weights", tmp_path / "r18.pth", "--split", "test")
    assert proc.returncode == 0, proc.stderr
    assert "resnet18" in proc.stdout and "resnet50" not in proc.stdout + proc.stderr
    mat = sio.loadmat(tmp_path / "mnist_test.mat")
    assert mat["features"].shape == (32, 512) and int(np.squeeze(mat["feature_dim"])) == 512
    assert mat_text(mat, "network") == "resnet18"
    images = datasets.MNIST(mnist_root, train=False).data
    torchvision_extractor = create_feature_extractor(reference, {"avgpool": "feat"})
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            torchvision_extractor(ef.preprocess(images[:1]))
        expected = torchvision_extractor(ef.preprocess(images))["feat"].flatten(1).numpy()
    assert_close_to(mat["features"], expected)
    assert float(np.squeeze(mat["gflops_per_image"])) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-12)


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


def test_a_second_run_gives_bit_equal_features(features_run, mnist_root, resnet_pth, tmp_path):
    """Nothing in the extraction is chosen by timing: a second run gives the same features, bit for bit."""
    proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", tmp_path, "--split", "test",
                   "--weights", resnet_pth, "--batch-size", "20", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    first, second = (sio.loadmat(os.path.join(d, "mnist_test.mat"))["features"] for d in (features_run[0], tmp_path))
    assert torch.equal(torch.from_numpy(first), torch.from_numpy(second))


def test_extraction_features_do_not_depend_on_the_thread_count(resnet_pth, mnist_root):
    from torchvision import datasets

    images = datasets.MNIST(mnist_root, train=False).data[:12]
    cpu = torch.device("cpu")
    model = feature_extractor(resnet_pth)
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
    f32 = ef.compute_features(feature_extractor(resnet_pth), images, cpu)
    model = feature_extractor(resnet_pth, torch.bfloat16)
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
    model = ef.build_extractor(ef.feature_network(), torch.device("cpu"))
    assert ef.compute_features(model, images, torch.device("cpu"), image_size=56).shape == (2, 2048)


# ------------------------------------------------------ features: failures

def run_extract_in_process(monkeypatch, capsys, *args, env=None):
    """extract_features.py's command line run through lab.cli.run_main in this process
    (as the script runs it, minus the ~2 s torch import per case)."""
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["extract_features.py", *map(str, args)])
    sigterm = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    code = 0
    try:
        lab.cli.run_main(ef.main)
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
        return [*data, "--weights", tmp / "nope.pth"], {}, ["nope.pth", "No such file"]
    if case == "corrupt weights file":
        (tmp / "w.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
        return [*data, "--weights", tmp / "w.pth"], {}, ["cannot be loaded into resnet50", "PytorchStreamReader"]
    if case == "weights of another model":
        torch.save(resnet18(weights=None).state_dict(), tmp / "w.pth")
        return [*data, "--weights", tmp / "w.pth"], {}, ["cannot be loaded into resnet50", "Missing key(s)"]
    if case in ("weights with a NaN", "weights that overflow"):
        from torchvision.models import resnet50
        state = resnet50(weights=None).state_dict()
        if case == "weights with a NaN":
            state["conv1.weight"][0, 0, 0, 0] = float("nan")
            fragments = ["cannot be loaded into resnet50", "'conv1.weight'", "NaN"]
        else:
            for name in ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight"):
                state[name] *= 1e30            # finite weights, but the activations overflow float32
            fragments = ["feature rows are NaN or infinite", "was not written"]
        torch.save(state, tmp / "w.pth")
        return [*data, "--weights", tmp / "w.pth", "--limit", "2"], {}, fragments
    if case == "weights path is a directory":
        (tmp / "w.pth").mkdir()
        return [*data, "--weights", tmp / "w.pth"], {}, ["w.pth", "Is a directory"]
    if case == "weights not a dict":
        torch.save(torch.zeros(3), tmp / "w.pth")
        return [*data, "--weights", tmp / "w.pth"], {}, ["cannot be loaded into resnet50", "'Tensor'"]
    if case == "corrupt hub cache file":
        hub = tmp / "torch" / "hub" / "checkpoints"
        hub.mkdir(parents=True)
        (hub / "resnet50-0676ba61.pth").write_bytes(b"garbage, not a checkpoint" * 100)
        return [*data, "--weights", "IMAGENET1K_V1"], {"TORCH_HOME": str(tmp / "torch")}, \
            ["damaged", str(hub / "resnet50-0676ba61.pth"), "delete it"]
    if case == "no network for the weights":
        return [*data, "--weights", "IMAGENET1K_V1"], {**OFFLINE_ENV, "TORCH_HOME": str(tmp / "torch")}, \
            ["could not load the IMAGENET1K_V1 resnet50 weights", "offline", "resnet50-0676ba61.pth",
             "WEIGHTS=/path/to/resnet50.pth", "WEIGHTS=none"]
    if case == "hub cache dir under a file":  # neither network nor a damaged file: named as it is
        (tmp / "blocker").write_text("x")
        return [*data, "--weights", "IMAGENET1K_V1"], {"TORCH_HOME": str(tmp / "blocker" / "torch")}, \
            ["could not load the IMAGENET1K_V1", "NotADirectoryError"]
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
              "weights not a dict", "corrupt hub cache file", "no network for the weights",
              "hub cache dir under a file",
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
import extract_features, lab.cli
sys.argv = ['extract_features.py'] + sys.argv[1:]
lab.cli.run_main(extract_features.main)
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
            "import extract_features, lab.cli\n"
            "sys.argv = ['extract_features.py'] + sys.argv[1:]\n"
            "lab.cli.run_main(extract_features.main)\n")
    code_, err = interrupt_at("WRITING", code, ["--data-root", mnist_root, "--out-dir", tmp_path,
                                                "--weights", "none", "--split", "test", "--limit", "2"])
    assert code_ == 130 and "Traceback" not in err, err
    assert "interrupted" in err and "nothing was completed" in err and "mnist_test.mat" in err, err
    assert leftovers(tmp_path) == []


FAKE_PYTHON = """#!/bin/sh
echo "$@"
if [ -n "$LAB_RECORD" ]; then
  folder=$(dirname "$LAB_RECORD")
  mkdir -p "$folder" && printf '%s\\n' "$LAB_SETTINGS" > "$folder/.$(basename "$LAB_RECORD").args"
  touch "$LAB_RECORD"
fi
"""


def make_commands(*args):
    """Run make with a PYTHON that prints the commands it would run, "writes" the output that make
    records, and records its settings as lab.files.atomic_path does once that output is complete."""
    fake = os.path.join(tempfile.mkdtemp(), "python")
    with open(fake, "w") as f:
        f.write(FAKE_PYTHON)
    os.chmod(fake, 0o755)
    proc = subprocess.run(["make", "-s", "-C", HERE, f"PYTHON={fake}", *map(str, args)],
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
    for script in ("extract_features.py --", "vae.py --", "-m experiments.sweep_vae --z-dims"):
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


@pytest.mark.parametrize("module", ["extract_features", "logreg", "vae", "tools.bench", "experiments.report",
                                    "experiments.sweep_logreg", "experiments.sweep_vae"])
def test_every_script_has_help(module, monkeypatch, capsys):
    """In this process (a real one costs a torch import each); logreg.py's real run is below."""
    import importlib

    monkeypatch.setattr(sys, "argv", [f"{module}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and "usage:" in out and err == ""


def test_help_as_a_real_command():
    proc = run_cli("logreg.py", "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and proc.stderr == ""


def feature_extractor(pth, dtype=torch.float32):
    """The script's own path: feature_network, the .pth loaded into it, channels-last on the CPU."""
    model = ef.feature_network()
    assert ef.load_weights(model, pth)[1] == "file"
    return ef.build_extractor(model, torch.device("cpu"), dtype)


def reference_model(pth):
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.load_state_dict(torch.load(pth, weights_only=True))
    return model.eval()


def assert_close_to(features, reference):
    scale = np.abs(reference).max()
    assert np.abs(features - reference).max() <= 1e-5 * scale
