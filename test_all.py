"""The lab's test suite: `python test_all.py` (or `pytest test_all.py`).

Runs offline and without ../shared: tiny MNIST-format IDX files are built in a
temp dir. Tests that need the real MNIST read $MNIST_ROOT and skip without it.
"""
import copy
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


def leftovers(directory):
    return sorted(f for f in os.listdir(directory)) if os.path.isdir(directory) else []


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
                   "--weights", resnet_pth, "--batch-size", "20")
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


def test_folding_keeps_outputs(resnet_pth):
    model = reference_model(resnet_pth)
    folded = ef.build_extractor(copy.deepcopy(model), torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 28, 28)
    with torch.inference_mode():
        model.fc = torch.nn.Identity()
        assert_close_to(folded(x).numpy(), model(x).numpy())


def test_flop_count_matches_known_resnet50_cost():
    from torchvision.models import resnet50

    model = resnet50(weights=None).eval()
    # torchvision documents 4.09 GFLOPS (multiply-adds) at 224x224.
    assert abs(ef.count_flops(model, 224) / 2 / 1e9 - 4.09) < 0.02
    model.fc = torch.nn.Identity()              # the extractor: 0.158 GFLOP at 28x28 (issue #2)
    assert abs(ef.count_flops(model, 28) / 1e9 - 0.158) < 0.001


# ------------------------------------------------------ features: contract

def assignment_get_one_hot(labels):
    """The assignment's own one-hot of a 1 x m label row from loadmat."""
    one_hot = np.zeros((labels.shape[1], 10))
    one_hot[np.arange(labels.shape[1]), labels[0]] = 1
    return one_hot


def test_mat_contract(features_run, mnist_root):
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
        assert str(np.squeeze(trmat["weights"])).startswith("file:")
        assert int(np.squeeze(trmat["image_size"])) == 28
        assert str(np.squeeze(trmat["dtype"])) == "float32"
        assert str(np.squeeze(trmat["torch_version"])) == torch.__version__
        assert float(np.squeeze(trmat["elapsed_seconds"])) > 0
    assert "img/s" in proc.stdout and "GFLOP/s" in proc.stdout
    assert not [f for f in leftovers(out) if f.endswith(".tmp")]


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
    assert str(np.squeeze(mat["weights"])).startswith("random-init")
    assert int(np.squeeze(mat["pretrained"])) == 0


def test_determinism_same_seed_same_features(mnist_root, tmp_path):
    arrays = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", out,
                       "--weights", "none", "--seed", "3", "--split", "test", "--limit", "12")
        assert proc.returncode == 0, proc.stderr
        arrays.append(sio.loadmat(out / "mnist_test.mat")["features"])
    assert np.array_equal(arrays[0], arrays[1])


def test_bfloat16_within_two_percent_of_float32(resnet_pth, mnist_root):
    from torchvision import datasets

    images = datasets.MNIST(mnist_root, train=False).data[:16]
    model = ef.build_extractor(reference_model(resnet_pth), torch.device("cpu"))
    f32 = ef.compute_features(model, images, torch.device("cpu"), dtype="float32")
    bf16 = ef.compute_features(model, images, torch.device("cpu"), dtype="bfloat16")
    assert bf16.dtype == torch.float32
    assert not torch.equal(f32, bf16)           # bf16 really ran
    assert (bf16 - f32).norm() / f32.norm() < 0.02


def test_image_size_resizes_on_the_fly(mnist_root):
    from torchvision import datasets

    images = datasets.MNIST(mnist_root, train=False).data[:2]
    assert ef.preprocess(images, 56).shape == (2, 3, 56, 56)
    torch.manual_seed(0)
    from torchvision.models import resnet50

    model = ef.build_extractor(resnet50(weights=None), torch.device("cpu"))
    assert ef.compute_features(model, images, torch.device("cpu"), image_size=56).shape == (2, 2048)


# ------------------------------------------------------ features: failures

def test_error_mnist_missing_offline(tmp_path):
    proc = run_cli("extract_features.py", "--data-root", tmp_path / "empty", "--out-dir", tmp_path / "o",
                   "--weights", "none", env=OFFLINE_ENV)
    assert_user_error(proc, "MNIST/raw", "could not be downloaded")
    assert leftovers(tmp_path / "o") == []


def test_error_weights_download_offline(mnist_root, tmp_path):
    env = {**OFFLINE_ENV, "TORCH_HOME": str(tmp_path / "hub")}
    proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", tmp_path / "o",
                   "--weights", "IMAGENET1K_V1", env=env)
    assert_user_error(proc, "IMAGENET1K_V1", "resnet50-0676ba61.pth", "WEIGHTS=none")
    assert leftovers(tmp_path / "o") == []


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong-model", "not-a-dict"])
def test_error_bad_weights_file(case, mnist_root, tmp_path):
    path = tmp_path / "w.pth"
    if case == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    elif case == "wrong-model":
        from torchvision.models import resnet18

        torch.save(resnet18(weights=None).state_dict(), path)
    elif case == "not-a-dict":
        torch.save(torch.zeros(3), path)
    proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", tmp_path / "o",
                   "--weights", path)
    assert_user_error(proc, {"missing": "no such file", "corrupt": "cannot read",
                             "wrong-model": "does not fit ResNet-50", "not-a-dict": "not a state_dict"}[case])
    assert leftovers(tmp_path / "o") == []


def test_error_unwritable_output_dir(mnist_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cli("extract_features.py", "--data-root", mnist_root, "--out-dir", blocker / "sub",
                   "--weights", "none")
    assert_user_error(proc, "output directory")


@pytest.mark.parametrize("flags", [["--limit", "0"], ["--batch-size", "-3"], ["--image-size", "abc"],
                                   ["--device", "tpu"], ["--split", "val"], ["--dtype", "float16"]])
def test_error_nonsense_flags(flags, tmp_path):
    proc = run_cli("extract_features.py", "--out-dir", tmp_path / "o", *flags)
    assert_user_error(proc, flags[0])
    assert leftovers(tmp_path / "o") == []


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


def test_no_partial_file_when_killed(mnist_root, tmp_path):
    """SIGTERM while the .mat is being written: exit, no file, no temp file."""
    code = ("import sys, time, scipy.io\n"
            "def slow(f, record, **kw):\n"
            "    f.write(b'x' * 1000); f.flush(); print('WRITING', flush=True); time.sleep(60)\n"
            "scipy.io.savemat = slow\n"
            "import extract_features, labio\n"
            "sys.argv = ['extract_features.py'] + sys.argv[1:]\n"
            "labio.run_main(extract_features.main)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "--data-root", mnist_root, "--out-dir",
                             str(tmp_path), "--weights", "none", "--split", "test", "--limit", "2"],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "WRITING" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert leftovers(tmp_path) == []


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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
