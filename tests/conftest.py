"""Fixtures shared by the test files: tiny MNIST, a seeded ResNet-50 state_dict,
one tiny extraction, one tiny pipeline, and the VAE's data (helpers.py holds the plain functions)."""
import fcntl
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout

# The tests run make as a user does, from a shell: under `make test` they would otherwise
# inherit its MAKELEVEL and flags, and their make would speak as a sub-make ("make[1]: ...").
for name in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES"):
    os.environ.pop(name, None)

from helpers import VAE_N_TEST, VAE_N_TRAIN, make_mnist, run_cli, run_make, tiny_pipeline_args  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """`make -j4 all` on tiny MNIST (random-init weights): every artifact and the report, made once for
    the whole run: the first test process to need it makes it, the others wait for it (a file lock)."""
    base = tmp_path_factory.getbasetemp()
    top = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_pipeline"   # one per run
    data = str(top / "data")
    with open(f"{top}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (top / "done").exists():
            make_mnist(data, n_train=60, n_test=40, seed=5)
            proc = run_make("-j4", "all", *tiny_pipeline_args(data, top))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            (top / "make_all.log").write_text(proc.stdout)
            (top / "done").touch()
    return top, data


@pytest.fixture(scope="session")
def vae_data_root(tmp_path_factory):
    return make_mnist(str(tmp_path_factory.mktemp("vae_mnist")), VAE_N_TRAIN, VAE_N_TEST, seed=1)


@pytest.fixture
def vae_one_thread():
    """Train as the CLI does on a CPU: one thread (tiny matmuls, and a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
