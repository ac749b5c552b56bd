"""The lab's test suite: `python test_all.py` (or `pytest test_all.py`).

Runs offline and without ../shared: tiny MNIST-format IDX files are built in a
temp dir. Tests that need the real MNIST read $MNIST_ROOT and skip without it.
"""
import copy
import json
import math
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import extract_features as ef  # noqa: E402
import logreg  # noqa: E402
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
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
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


def interrupt_at(marker, code, args, sig=signal.SIGTERM, timeout=120):
    """Run ``code`` (python -c, argv = args) until it prints ``marker`` on stdout,
    then send ``sig``. Asserts that the marker was reached; returns (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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

import fast_resnet as fr  # noqa: E402
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


def forced_plan(choices, kind):
    """Every conv as ``kind`` where that formulation applies, else as its first option."""
    return {name: kind if kind in kinds else kinds[0] for name, kinds in choices.items()}


@pytest.mark.parametrize("kind", fr.KINDS)
def test_every_formulation_keeps_outputs(kind, resnet_pth, monkeypatch):
    """Each way a conv can run (whatever the timing picks on this machine) matches
    the unmodified network, post-ops (ReLU, residual add) included."""
    if kind == "aten":          # what runs where oneDNN does not (GPUs, builds without it)
        monkeypatch.setattr(fr, "onednn_available", lambda device: False)
    model = reference_model(resnet_pth)
    auto = fr.build_extractor(copy.deepcopy(model), torch.device("cpu"), batch_size=4)
    plan = forced_plan(auto.choices, kind)
    if kind not in plan.values():
        pytest.skip(f"{kind} does not run on this machine's CPU")
    ours = fr.build_extractor(copy.deepcopy(model), torch.device("cpu"), batch_size=4, plan=plan)
    assert ours.plan == plan
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
    x = torch.randn(4, 3, 28, 28)
    with torch.inference_mode():
        model.fc = torch.nn.Identity()
        assert_close_to(ours(x.contiguous(memory_format=torch.channels_last)).numpy(), model(x).numpy())


def test_choice_options_follow_the_map_sizes():
    """gemm only for 1x1 convs; smallmap only where the padded 3x3 kernel mostly reads zeros."""
    from torchvision.models import resnet50

    ex = fr.build_extractor(resnet50(weights=None), torch.device("cpu"), batch_size=2)
    assert set(ex.choices) == set(ex.plan) and len(ex.plan) == 53
    assert "gemm" in ex.choices["layer4.2.conv1"] and "gemm" not in ex.choices["layer1.0.conv2"]
    assert "smallmap" in ex.choices["layer4.2.conv2"] and "smallmap" not in ex.choices["layer2.1.conv2"]
    assert all(ex.plan[name] in kinds for name, kinds in ex.choices.items())
    assert fr.parse_plan(fr.format_plan(ex.plan)) == ex.plan
    assert sum(int(part.split()[1]) for part in fr.plan_summary(ex.plan).split(", ")) == 53


def test_flop_count_matches_known_resnet50_cost():
    from torchvision.models import resnet50

    model = resnet50(weights=None).eval()
    # torchvision documents 4.09 GFLOPS (multiply-adds) at 224x224.
    assert abs(fr.count_flops(model, 224) / 2 / 1e9 - 4.09) < 0.02
    model.fc = torch.nn.Identity()              # the extractor: 0.158 GFLOP at 28x28 (issue #2)
    assert abs(fr.count_flops(model, 28) / 1e9 - 0.158) < 0.001
    choices = fr.build_extractor(copy.deepcopy(model), torch.device("cpu"), batch_size=2).choices
    ours = fr.build_extractor(copy.deepcopy(model), torch.device("cpu"), batch_size=2,
                              plan=forced_plan(choices, "smallmap"))
    assert fr.count_flops(ours, 28) == fr.count_flops(model, 28)      # nominal count unchanged
    assert fr.count_flops(ours, 28, nominal=False) < 0.9 * fr.count_flops(ours, 28)


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
        plan = fr.parse_plan(mat_text(trmat, "conv_plan"))
        assert len(plan) == 53 and fr.plan_summary(plan) == mat_text(trmat, "conv_plan_summary")
    assert "img/s" in proc.stdout and "GFLOP/s" in proc.stdout and "convs as: " in proc.stdout
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
                   "--weights", "none", "--split", "test", "--limit", "4", "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM-INIT" in proc.stdout
    mat = sio.loadmat(tmp_path / "mnist_test.mat")
    assert mat_text(mat, "weights").startswith("random-init")
    assert mat_text(mat, "weights_kind") == "random-init"
    assert int(np.squeeze(mat["pretrained"])) == 0
    # --explain: one line per conv, naming the formulation the plan recorded
    plan = fr.parse_plan(mat_text(mat, "conv_plan"))
    for name, kind in plan.items():
        assert any(line.startswith(name + " ") and f"-> {kind}" in line for line in proc.stdout.splitlines())


def test_determinism_same_plan_same_features(mnist_root, tmp_path):
    """Same seed and the same per-conv plan (here the first run's, via --plan-from):
    the same features, bit for bit."""
    arrays = []
    for run in ("a", "b"):
        out = tmp_path / run
        plan = ["--plan-from", tmp_path / "a" / "mnist_test.mat"] if run == "b" else []
        proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", out,
                       "--weights", "none", "--seed", "3", "--split", "test", "--limit", "12", *plan)
        assert proc.returncode == 0, proc.stderr
        arrays.append(sio.loadmat(out / "mnist_test.mat")["features"])
    assert "as in " in proc.stdout
    assert np.array_equal(arrays[0], arrays[1])


def test_bfloat16_within_two_percent_of_float32(resnet_pth, mnist_root):
    from torchvision import datasets

    images = datasets.MNIST(mnist_root, train=False).data[:16]
    cpu = torch.device("cpu")
    f32 = ef.compute_features(fr.build_extractor(reference_model(resnet_pth), cpu, batch_size=16), images, cpu)
    model = fr.build_extractor(reference_model(resnet_pth), cpu, batch_size=16, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
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

    model = fr.build_extractor(resnet50(weights=None), torch.device("cpu"), image_size=56, batch_size=2)
    assert ef.compute_features(model, images, torch.device("cpu"), image_size=56).shape == (2, 2048)
    with pytest.raises(ValueError, match="built for"):     # a 56-pixel extractor refuses 28 pixels
        ef.compute_features(model, images, torch.device("cpu"), image_size=28)


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
    if case == "plan file missing":
        return [*data, "--weights", "none", "--plan-from", tmp / "nope.mat"], {}, ["--plan-from", "no such file"]
    if case == "plan file not a .mat":
        (tmp / "plan.mat").write_text("not a mat file")
        return [*data, "--weights", "none", "--plan-from", tmp / "plan.mat"], {}, ["not a readable .mat"]
    if case == "plan file without a plan":
        return [*data, "--weights", "none", "--plan-from", tmp / "out" / "mnist_train.mat"], {}, \
            ["records no conv_plan"]
    if case == "plan with an unknown kind":
        sio.savemat(tmp / "plan.mat", {"conv_plan": "conv1=turbo"})
        return [*data, "--weights", "none", "--plan-from", tmp / "plan.mat"], {}, ["'conv1=turbo'", "KIND"]
    if case == "plan naming other convs":
        sio.savemat(tmp / "plan.mat", {"conv_plan": "conv1=onednn fc=gemm"})
        return [*data, "--weights", "none", "--plan-from", tmp / "plan.mat"], {}, ["does not name", "53 convs"]
    if case == "plan that does not fit":    # a 1x1-conv GEMM for the 7x7 stem conv
        from torchvision.models import resnet50

        plan = {name: "aten" for name in fr.conv_roles(resnet50())}
        sio.savemat(tmp / "plan.mat", {"conv_plan": fr.format_plan({**plan, "conv1": "gemm"})})
        return [*data, "--weights", "none", "--plan-from", tmp / "plan.mat"], {}, \
            ["conv1=gemm is not possible here"]
    flag, value = case.split(" ", 1)        # "--flag value"
    return [*data, "--weights", "none", flag, value], {}, [flag]


BAD_INPUTS = ["unknown weights name", "missing weights file", "corrupt weights file", "weights of another model",
              "weights not a dict", "corrupt hub cache file", "no network for the weights", "hub cache dir under a file",
              "MNIST missing, no network", "MNIST damaged file", "MNIST wrong layout", "out dir is a file",
              "out dir under a file", "cuda without a GPU", "plan file missing", "plan file not a .mat",
              "plan file without a plan", "plan with an unknown kind", "plan naming other convs",
              "plan that does not fit",
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
import signal, sys, time, scipy.io
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, whoever started the tests
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
    """After an interrupt that completed the train split, `make features` extracts
    only the test split (with the train run's per-conv plan); a new DTYPE redoes both."""
    out = tmp_path / "out"
    common = ["features", f"OUT={out}", "WEIGHTS=none", "DATA=data"]
    commands = make_commands(*common)           # writes the stamp, "runs" both splits
    assert "--split train" in commands and "--split test" in commands and "--dtype float32" in commands
    os.utime(out / ".features.args", (1, 1))     # as if written long before the train split
    (out / "mnist_train.mat").write_bytes(b"complete")
    commands = make_commands(*common)
    assert "--split train" not in commands and "--split test" in commands, commands
    assert f"--plan-from {out}/mnist_train.mat" in commands
    commands = make_commands(*common, "DTYPE=bfloat16")
    assert "--split train" in commands and "--dtype bfloat16" in commands


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


@pytest.mark.parametrize("script", ["extract_features.py", "logreg.py", "vae.py", "bench.py"])
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


def logreg_run(*args):
    return run_cli("logreg.py", "--no-progress", *args, timeout=120)


@pytest.fixture
def logreg_mats(tmp_path):
    """A small train/test pair in the extractor's format, with random-init metadata."""
    X, y = logreg_blobs(600, 16, seed=1, spread=0.8)
    X_te, y_te = logreg_blobs(200, 16, seed=2, spread=0.8)
    meta = {"weights": "random-init (WEIGHTS=none)", "pretrained": 0}
    train, test = tmp_path / "train.mat", tmp_path / "test.mat"
    logreg_write_mat(train, X, y, **meta)
    logreg_write_mat(test, X_te, y_te, **meta)
    return train, test


# --------------------------------------------------------------------- the classifier

@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_logreg_gradient_matches_central_differences(l2):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 6))
    L = logreg.get_one_hot(rng.integers(0, 10, 30))
    theta = rng.standard_normal((7, 10))
    _, grad = logreg.loss_and_gradient(X, L, theta, l2)
    h, numeric = 1e-6, np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        step = np.zeros_like(theta)
        step[idx] = h
        numeric[idx] = (logreg.loss_and_gradient(X, L, theta + step, l2)[0]
                        - logreg.loss_and_gradient(X, L, theta - step, l2)[0]) / (2 * h)
    rel = np.linalg.norm(grad - numeric) / np.linalg.norm(grad + numeric)
    assert rel < 1e-6
    # apply_gradients is exactly one descent step along that gradient
    new, loss = logreg.apply_gradients(X, L, theta, 0.5)
    if l2 == 0:
        np.testing.assert_allclose(new, theta - 0.5 * grad, rtol=0, atol=1e-15)
        assert loss == pytest.approx(logreg.loss_and_gradient(X, L, theta)[0])


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
    probs = logreg.mlr(X, logreg.get_one_hot(y), X_te, logreg.get_one_hot(y_te), epochs=10)
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


def test_logreg_reference_mode_uses_every_sample():
    """The assignment's slice i:i+BATCH_SIZE-1 dropped one sample per batch; ours must not:
    with one batch holding the whole set, one epoch is one full-batch gradient step."""
    X, y = logreg_blobs(50, 4, seed=7)
    L = logreg.get_one_hot(y)
    out = logreg.train(X, L, X, L, reference=True, epochs=1, batch_size=50, lr=0.01, seed=3)
    theta0 = 0.001 * np.random.default_rng(3).standard_normal((5, 10))
    expected, _ = logreg.apply_gradients(X, L, theta0, 0.01)
    np.testing.assert_allclose(out["theta"], expected, rtol=1e-12, atol=1e-15)


def test_logreg_same_seed_same_result():
    X, y = logreg_blobs(500, 12, seed=8, spread=0.5)
    L = logreg.get_one_hot(y)
    a = logreg.train(X, L, X, L, epochs=3, seed=1)
    b = logreg.train(X, L, X, L, epochs=3, seed=1)
    c = logreg.train(X, L, X, L, epochs=3, seed=2)
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
    fpr, tpr, thr = logreg.roc_curve(y, score)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thr, sk_thr)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert logreg.auc(fpr, tpr) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_logreg_auc_is_the_trapezoid_rule():
    assert logreg.auc([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75, abs=1e-15)
    assert logreg.auc([1, 0.5, 0], [1, 1, 0]) == pytest.approx(0.75, abs=1e-15)
    with pytest.raises(ValueError):
        logreg.auc([0, 1, 0.5], [0, 1, 1])


@pytest.mark.parametrize("seed", range(3))
def test_logreg_multiclass_auc_matches_sklearn_ovr(seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, 500)
    counts = rng.multinomial(16, np.full(10, 0.1), size=500)
    counts[np.arange(500), y] += rng.integers(0, 4, 500)   # some signal
    probs = counts / counts.sum(axis=1, keepdims=True)     # rows sum to 1, heavy ties
    roc = logreg.multiclass_roc(y, probs)
    assert roc["macro_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert roc["micro_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="micro"), abs=1e-12)
    per_class = roc_auc_score(logreg.get_one_hot(y), probs, average=None)
    np.testing.assert_allclose(roc["per_class_auc"], per_class, rtol=0, atol=1e-12)
    grid, macro_tpr = roc["macro"]
    assert grid[0] == 0 and grid[-1] == 1 and np.all(np.diff(macro_tpr) >= 0)


# --------------------------------------------------------------------- command line

def test_logreg_cli_writes_outputs_and_replots(logreg_mats, tmp_path):
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
    assert m["auc"]["macro"] == pytest.approx(logreg.multiclass_roc(labels, probs)["macro_auc"])
    assert m["weights"] == "random-init (WEIGHTS=none)" and m["random_init_weights"] is True
    names = {"logreg_test_accuracy.png", "roc.png", "confusion_matrix.png"}
    assert set(os.listdir(figs)) == names
    assert set(os.listdir(out)) == {"logreg.npz", "logreg_metrics.json"}   # no temp files left
    for name in names:
        os.remove(figs / name)
    r = logreg_run("--plot-only", "--out-dir", str(out), "--figures-dir", str(figs))
    assert r.returncode == 0, r.stderr
    assert set(os.listdir(figs)) == names


def test_logreg_metadata_is_optional(tmp_path):
    """The assignment's own .mat files have no metadata: provenance is then 'unknown'."""
    X, y = logreg_blobs(200, 8, seed=10)
    logreg_write_mat(tmp_path / "a.mat", X, y)
    _, _, _, _, prov = logreg.load_pair(str(tmp_path / "a.mat"), str(tmp_path / "a.mat"))
    assert prov["train"] == {"weights": "unknown"}
    assert not logreg.is_random_init(prov["train"])


def logreg_bad_inputs(tmp_path):
    """(name, train .mat path, test .mat path, extra args, expected text in the error)."""
    X, y = logreg_blobs(100, 8, seed=11)
    good = tmp_path / "good.mat"
    logreg_write_mat(good, X, y)
    cases = {}

    def mat(name, **record):
        path = tmp_path / f"{name}.mat"
        sio.savemat(path, record)
        return path

    cases["missing"] = (tmp_path / "nope.mat", good, [], "make features")
    cases["no_labels"] = (mat("no_labels", features=X), good, [], "labels")
    cases["not_2d"] = (mat("not_2d", features=X.reshape(100, 2, 4), labels=y.reshape(1, -1)), good, [], "2-D")
    cases["dims_differ"] = (good, mat("dims", features=X[:, :5], labels=y.reshape(1, -1)), [], "dimensions")
    cases["label_count"] = (mat("count", features=X, labels=y[:99].reshape(1, -1)), good, [], "labels for")
    bad = y.copy()
    bad[3] = 10
    cases["label_range"] = (mat("range", features=X, labels=bad.reshape(1, -1)), good, [], "0-9")
    Xn = X.copy()
    Xn[5, 2] = np.nan
    cases["non_finite"] = (mat("nan", features=Xn, labels=y.reshape(1, -1)), good, [], "NaN")
    big = mat("big", features=X * 1e10, labels=y.reshape(1, -1))
    cases["loss_blows_up"] = (big, big, ["--lr", "1e300", "--epochs", "3"], "lower --lr")
    cases["loss_blows_up_reference"] = (big, big, ["--reference", "--lr", "1e300", "--epochs", "3"],
                                        "lower --lr")
    return cases


def test_logreg_input_errors_are_one_line_and_write_nothing(tmp_path):
    for name, (train, test, extra, expected) in logreg_bad_inputs(tmp_path).items():
        out, figs = tmp_path / f"out_{name}", tmp_path / f"figs_{name}"
        r = logreg_run("--train-mat", str(train), "--test-mat", str(test), "--out-dir", str(out),
                       "--figures-dir", str(figs), *extra)
        assert r.returncode != 0, name
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert expected in lines[0], (name, lines[0])
        assert not out.exists() and not figs.exists(), name


def test_logreg_plot_only_without_npz_fails_clearly(tmp_path):
    r = logreg_run("--plot-only", "--out-dir", str(tmp_path / "none"), "--figures-dir", str(tmp_path / "f"))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "make logreg" in r.stderr
    assert not (tmp_path / "f").exists()


def test_logreg_help_works():
    r = logreg_run("--help")
    assert r.returncode == 0 and "--reference" in r.stdout and "--plot-only" in r.stdout


def test_logreg_plot_only_rejects_a_foreign_npz(tmp_path):
    np.savez(tmp_path / "logreg.npz", theta=np.zeros((3, 10)))
    r = logreg_run("--plot-only", "--out-dir", str(tmp_path), "--figures-dir", str(tmp_path / "f"))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "make logreg" in r.stderr
    assert not (tmp_path / "f").exists()


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
                  "--epochs", "2", "--z-dim", "4", "--device", "cpu", "--seed", "3"])
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


def vae_cli(*args):
    return run_cli("vae.py", *args, timeout=120)


# ------------------------------------------------------------------ model

def test_vae_shapes():
    model = vae.VAE(7)
    recon, mu, logvar = model(torch.rand(5, 1, 28, 28))
    assert recon.shape == (5, 784) and mu.shape == (5, 7) and logvar.shape == (5, 7)
    assert recon.min() >= 0 and recon.max() <= 1
    assert model.decoder(torch.zeros(3, 7)).shape == (3, 784)


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
    # The logits form the training loop uses is the same loss.
    assert vae.loss_from_logits(logits, x, mu, logvar).item() == pytest.approx(bce + kld, rel=1e-10)


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
    before = vae.evaluate(model, train_x)
    losses, tests = vae.train_vae(model, train_x, epochs=1, batch_size=32, log=None, progress=False)
    assert tests == [] and len(losses) == 1
    assert vae.evaluate(model, train_x) < 0.8 * before


def test_vae_same_seed_same_losses_and_seed_matters(vae_data_root, vae_one_thread):
    train_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=True))
    test_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=False))

    def run(seed):
        torch.manual_seed(seed)
        return vae.train_vae(vae.VAE(4), train_x, test_x, epochs=2, seed=seed, log=None, progress=False)

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_vae_cli_same_seed_same_losses_with_limit(vae_data_root, tmp_path, vae_one_thread):
    def run(name):
        out = tmp_path / name
        vae.main(["--data-root", vae_data_root, "--out-dir", str(out), "--figures-dir", str(out / "figs"),
                  "--epochs", "2", "--limit", "128", "--device", "cpu", "--seed", "7"])
        return torch.load(out / "vae.pt", weights_only=True)

    first, second = run("a"), run("b")
    assert first["config"]["n_train"] == 128 and first["config"]["n_test"] == 64
    assert first["train_loss"] == second["train_loss"] and first["test_loss"] == second["test_loss"]
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])


def test_vae_cli_outputs_and_checkpoint_round_trip(vae_trained, vae_data_root):
    ckpt_path = vae_trained / "vae.pt"
    model, ckpt = vae.load_checkpoint(str(ckpt_path), z_dim=4)
    assert ckpt["config"]["z_dim"] == 4 and ckpt["seed"] == 3 and len(ckpt["train_loss"]) == 2
    assert len(ckpt["test_loss"]) == 2 and "torch" in ckpt["versions"]
    metrics = json.loads((vae_trained / "vae_metrics.json").read_text())
    assert metrics["train_loss"] == ckpt["train_loss"][-1] and metrics["epochs"] == 2
    assert sorted(os.listdir(vae_trained / "figs")) == sorted(vae.FIGURE_NAMES)
    # The reloaded model computes exactly what the saved weights compute.
    reference = vae.VAE(4)
    reference.load_state_dict(ckpt["model"])
    x = torch.rand(16, 784)
    assert torch.equal(model.encoder(x)[0], reference.encoder(x)[0])
    assert torch.equal(model.decoder(torch.ones(3, 4)), reference.decoder(torch.ones(3, 4)))
    # Re-rendering from the checkpoint reproduces the figures byte for byte.
    figs = vae_trained / "figs_again"
    vae.main(["--plot-only", "--out-dir", str(vae_trained), "--figures-dir", str(figs)])
    for name in ("vae_samples.png", "vae_reconstructions.png", "vae_interpolation.png"):
        assert (figs / name).read_bytes() == (vae_trained / "figs" / name).read_bytes()


def test_vae_non_finite_loss_stops_in_process(vae_data_root, vae_one_thread):
    train_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=True))
    torch.manual_seed(0)
    with pytest.raises(vae.UserError, match="non-finite at epoch 1"):
        vae.train_vae(vae.VAE(4), train_x, epochs=3, lr=1e30, log=None, progress=False)


# ------------------------------------------------------------- CLI errors

def test_vae_cli_non_finite_loss_writes_nothing(vae_data_root, tmp_path):
    out, figs = tmp_path / "out", tmp_path / "figs"
    result = vae_cli("--data-root", vae_data_root, "--out-dir", str(out), "--figures-dir", str(figs),
                         "--lr", "1e30", "--epochs", "2", "--device", "cpu")
    line = assert_user_error(result)
    assert "non-finite at epoch 1" in line and "--lr" in line
    assert not any(p.is_file() for d in (out, figs) if d.exists() for p in d.iterdir())


def test_vae_cli_plot_only_without_checkpoint(tmp_path):
    result = vae_cli("--plot-only", "--out-dir", str(tmp_path), "--figures-dir", str(tmp_path / "f"))
    line = assert_user_error(result)
    assert "no checkpoint at" in line and "make vae" in line
    assert not (tmp_path / "f").exists() or not os.listdir(tmp_path / "f")


def test_vae_cli_checkpoint_with_other_z_dim(vae_trained, tmp_path):
    result = vae_cli("--plot-only", "--out-dir", str(vae_trained), "--figures-dir", str(tmp_path),
                         "--z-dim", "20")
    assert "z_dim 4" in assert_user_error(result)
    assert os.listdir(tmp_path) == []


def test_vae_cli_corrupt_checkpoint(tmp_path):
    (tmp_path / "vae.pt").write_bytes(b"\x80\x04 this is not a checkpoint")
    result = vae_cli("--plot-only", "--out-dir", str(tmp_path), "--figures-dir", str(tmp_path / "f"))
    assert "corrupt" in assert_user_error(result)
    assert not (tmp_path / "f").exists() or not os.listdir(tmp_path / "f")


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--lr", "-1"], ["--likelihood", "gaussian"],
                                   ["--seed", str(2 ** 70)]])
def test_vae_cli_nonsense_flags(flags, tmp_path):
    result = vae_cli("--out-dir", str(tmp_path / "o"), "--figures-dir", str(tmp_path / "f"), *flags)
    assert flags[0] in assert_user_error(result)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.environ.get("MNIST_ROOT"), reason="set MNIST_ROOT to the real MNIST root")
def test_vae_real_mnist_first_epoch_on_a_subset(vae_one_thread):
    """A quick look at real digits: 1 epoch on 6000 images gives a loss far below the start."""
    train_x, _ = vae.preload(vae.load_mnist(os.environ["MNIST_ROOT"], train=True), limit=6000)
    torch.manual_seed(0)
    model = vae.VAE(20)
    start = vae.evaluate(model, train_x)
    losses, _ = vae.train_vae(model, train_x, epochs=1, log=None, progress=False)
    assert start > 500 and 150 < losses[0] < 260


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
