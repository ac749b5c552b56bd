"""vae.py: the model, the loss (closed-form KL against Monte Carlo), training through forward() and
loss_function, checkpoints, figures, failures."""
import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch

import vae
from helpers import (OFFLINE_ENV, VAE_N_TEST, assert_rejected, assert_user_error, interrupt_at, leftovers,
                     make_mnist, run_cli, snapshot, vae_in_process, vae_outputs)


# =========================================================================
# vae.py: the variational autoencoder
# =========================================================================


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
    assert vae.bce(torch.sigmoid(logits), x).item() == pytest.approx(bce, rel=1e-10)


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
    start = vae.evaluate(model, train_x)[0]
    history = vae.train_vae(model, train_x, train_x[:64], epochs=2, batch_size=16, log=None, progress=False)
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())
    assert vae.evaluate(model, train_x)[0] < 0.8 * start and all(map(math.isfinite, history["test_loss"]))


def test_vae_defaults_come_from_vae_config():
    """Every field of VAEConfig is a flag whose default is the field's, and the flags given replace them."""
    assert vae.config_from_args(vae.parse_args([])) == vae.VAEConfig()
    config = vae.config_from_args(vae.parse_args(["--epochs", "2", "--z-dim", "3", "--lr", "0.5"]))
    assert config == vae.VAEConfig(epochs=2, z_dim=3, lr=0.5)
    assert "1e-3" not in vae.__doc__ and "batch 64" not in vae.__doc__    # no default repeated in prose


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
    before = vae.evaluate(model, train_x)[0]
    history = vae.train_vae(model, train_x, epochs=1, batch_size=32, log=None, progress=False)
    assert history["test_loss"] == [] and len(history["train_loss"]) == 1
    assert vae.evaluate(model, train_x)[0] < 0.8 * before


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
    vae.save_checkpoint(path, trained.state_dict(), config=config, history=history, run={"n_train": len(train_x)})
    loaded, ckpt = vae.load_checkpoint(path)
    with torch.no_grad():
        for a, b in zip(trained.encoder(test_x), loaded.encoder(test_x)):
            assert torch.equal(a, b)
        z = torch.randn(16, 5)
        assert torch.equal(trained.decoder(z), loaded.decoder(z))
    assert vae.VAEConfig(**ckpt["config"]) == config
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
    loss, recon, kl = vae.evaluate(model, test_x, seed=metrics["seed"])
    assert metrics["test_recon"] == pytest.approx(recon, rel=1e-6)
    assert metrics["test_kl"] == pytest.approx(kl, rel=1e-6)
    assert metrics["test_loss"] == pytest.approx(loss, rel=1e-6) == pytest.approx(recon + kl, rel=1e-6)
    assert metrics["test_recon_per_epoch"][-1] == metrics["test_recon"] and len(metrics["test_kl_per_epoch"]) == 2
    assert metrics["threads"] == 1 and metrics["n_test"] == VAE_N_TEST and "torch" in metrics["versions"]
    for key in ("train_loss_per_epoch", "test_loss_per_epoch", "seconds", "epochs", "z_dim", "n_train",
                "seed", "device"):
        assert key in metrics, key


def test_vae_plot_only_reproduces_the_figures_pixel_for_pixel(vae_trained, vae_data_root, tmp_path):
    again = tmp_path / "again"
    vae.main(["--plot-only", "--out-dir", str(vae_trained), "--figures-dir", str(again), "--data-root", vae_data_root])
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
    with pytest.raises(vae.UserError, match="diverged at epoch 1.*lower --lr"):
        vae.train_vae(vae.VAE(4), train_x, epochs=3, lr=1e30, log=None, progress=False)


def recomputed_terms(model, test_x, seed):
    """The test BCE and KL per image of ``model``, written out here with the eps that evaluate draws."""
    torch.manual_seed(seed)
    bce = kl = 0.0
    with torch.no_grad():
        for x in test_x.split(1000):
            recon, mu, logvar = model(x)
            bce += torch.nn.functional.binary_cross_entropy(recon, x, reduction="sum").item()
            kl += (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum()).item()
    return bce / len(test_x), kl / len(test_x)


def test_vae_beta_4_reports_the_bce_as_the_reconstruction_term(vae_data_root, tmp_path, monkeypatch):
    """A weight of 4 on the KL in loss_function (a student's edit): test_recon is the BCE recomputed
    from the checkpoint, test_kl the KL, and test_loss what loss_function returns, BCE + 4 KL."""
    monkeypatch.setattr(vae, "loss_function", lambda recon_x, x, mu, logvar:
                        vae.bce(recon_x, x) + 4 * vae.kl_divergence(mu, logvar))
    proc = vae_in_process("--data-root", vae_data_root, "--out-dir", tmp_path, "--figures-dir", tmp_path / "figs",
                          "--epochs", "2", "--z-dim", "3", "--device", "cpu", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "vae_metrics.json").read_text())
    model, ckpt = vae.load_checkpoint(str(tmp_path / "vae.pt"))
    test_x, _ = vae.preload(vae.load_mnist(vae_data_root, train=False))
    bce, kl = recomputed_terms(model, test_x, ckpt["config"]["seed"])
    assert metrics["test_recon"] == ckpt["test_recon"][-1] == pytest.approx(bce, rel=1e-6)
    assert metrics["test_kl"] == pytest.approx(kl, rel=1e-6) and kl > 0.01
    assert metrics["test_loss"] == pytest.approx(bce + 4 * kl, rel=1e-6)


class NarrowEncoder(vae.Encoder):
    def __init__(self, z_dim):
        super().__init__(z_dim)
        self.fc1 = torch.nn.Linear(784, 256)      # and not fc2_mu nor fc2_logvar


class NarrowDecoder(vae.Decoder):
    def __init__(self, z_dim):
        super().__init__(z_dim)
        self.fc3 = torch.nn.Linear(z_dim, 300)    # and not fc4


@pytest.mark.parametrize("name, edit, message", [
    ("Encoder", NarrowEncoder, "encoder.fc2_mu takes 400 inputs but encoder.fc1 gives 256"),
    ("Decoder", NarrowDecoder, "decoder.fc4 takes 400 inputs but decoder.fc3 gives 300"),
])
def test_vae_an_edit_that_breaks_a_shape_names_the_two_layers(name, edit, message, vae_data_root, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(vae, name, edit)
    before = snapshot(tmp_path)
    proc = vae_in_process("--data-root", vae_data_root, "--out-dir", tmp_path / "out", "--figures-dir",
                          tmp_path / "figs", "--epochs", "1", "--limit", "64", "--device", "cpu", "--threads", "1")
    assert assert_rejected(proc, before, [tmp_path], message).endswith(message)


def test_vae_a_finite_loss_above_a_coin_flip_has_diverged(vae_data_root, vae_one_thread, monkeypatch):
    """An epoch whose mean loss is above 784 ln 2 (plus the spread between batches) diverged, finite or not."""
    train_x = vae_tiny_train_x(vae_data_root)
    loss_function = vae.loss_function
    monkeypatch.setattr(vae, "loss_function", lambda *args: 3 * loss_function(*args))   # ~1650 nats: finite
    torch.manual_seed(0)
    with pytest.raises(vae.UserError, match=r"diverged at epoch 1: mean loss \d+ per image, above 598; lower --lr$"):
        vae.train_vae(vae.VAE(4), train_x, epochs=2, log=None, progress=False)


# ------------------------------------------------------------- CLI errors


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
        "old_config": save("old_config.pt", {**good, "config": {**good["config"], "likelihood": "bernoulli"}}),
        "lacks_key": save("lacks_key.pt", {k: v for k, v in good.items() if k != "test_kl"}),
        "bad_config": save("bad_config.pt", {**good, "config": {**good["config"], "z_dim": "four"}}),
        "config_vs_weights": save("config_vs_weights.pt", {**good, "config": {**good["config"], "z_dim": 9}}),
        "directory": root / "a_directory", "empty_out": root / "empty_out",
        "absent": root / "absent.pt",
    }
    files["garbage"].write_bytes(b"\x80\x04 this is not a checkpoint")
    files["truncated"].write_bytes((vae_trained / "vae.pt").read_bytes()[:3000])
    files["directory"].mkdir()
    files["empty_out"].mkdir()
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
    ("lr_diverges", ["--lr", "1e30", "--epochs", "2"], ["diverged at epoch 1", "lower --lr"]),
    ("batch_size_zero", ["--batch-size", "0"], ["--batch-size"]),
    ("z_dim_text", ["--z-dim", "four"], ["--z-dim"]),
    ("threads_zero", ["--threads", "0"], ["--threads"]),
    ("limit_zero", ["--limit", "0"], ["--limit"]),
    ("seed_too_large", ["--seed", str(2 ** 70)], ["--seed"]),
    ("likelihood_removed", ["--likelihood", "bernoulli"], ["unrecognized arguments", "--likelihood"]),
    ("flag_unknown", ["--frobnicate"], ["unrecognized arguments"]),
    ("checkpoint_without_plot_only", ["--checkpoint", "CKPT"], ["--checkpoint", "--plot-only"]),
    ("no_mnist_offline", ["--data-root", "no_mnist"], ["MNIST/raw", "could not be downloaded"]),
    ("damaged_mnist", ["--data-root", "damaged_mnist"], ["damaged", "train-images-idx3-ubyte"]),
    ("out_dir_under_a_file", ["--out-dir", "a_file/out"], ["cannot create output directory", "not a directory"]),
    ("figures_dir_under_a_file", ["--figures-dir", "a_file/figs"], ["cannot create output directory"]),
    ("plot_only_no_vae_pt", ["--plot-only", "--out-dir", "empty_out"], ["vae.pt", "not found", "make vae"]),
    ("plot_only_absent", ["--plot-only", "--checkpoint", "absent"], ["absent.pt", "not found"]),
    ("plot_only_garbage", ["--plot-only", "--checkpoint", "garbage"], ["garbage.pt", "UnpicklingError"]),
    ("plot_only_truncated", ["--plot-only", "--checkpoint", "truncated"], ["truncated.pt", "zip archive"]),
    ("plot_only_directory", ["--plot-only", "--checkpoint", "directory"], ["Is a directory"]),
    ("plot_only_list", ["--plot-only", "--checkpoint", "list"], ["list.pt", "TypeError"]),
    ("plot_only_whole_module", ["--plot-only", "--checkpoint", "whole_module"], ["Weights only load failed"]),
    ("plot_only_other_model", ["--plot-only", "--checkpoint", "other_model"], ["KeyError: 'encoder.fc2_mu.weight'"]),
    ("plot_only_wrong_shapes", ["--plot-only", "--checkpoint", "wrong_shapes"],
     ["size mismatch for encoder.fc1.weight", "[300, 784]", "[400, 784]"]),
    ("plot_only_missing_key", ["--plot-only", "--checkpoint", "missing_key"], ["Missing key(s)", "decoder.fc4.bias"]),
    ("plot_only_old_config", ["--plot-only", "--checkpoint", "old_config"], ["unexpected keyword", "likelihood"]),
    ("plot_only_lacks_key", ["--plot-only", "--checkpoint", "lacks_key"], ["KeyError: 'test_kl'"]),
    ("plot_only_bad_config", ["--plot-only", "--checkpoint", "bad_config"], ["bad_config.pt", "TypeError"]),
    ("plot_only_config_vs_weights", ["--plot-only", "--checkpoint", "config_vs_weights"],
     ["size mismatch for encoder.fc2_mu.weight", "[4, 400]", "[9, 400]"]),
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
import lab.cli, vae
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
lab.cli.run_main(vae.main)
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


# ------------------------------------------------------------------ faults (wrong numbers, true advice)

@pytest.mark.parametrize("kind", ["checkpoint", "bare_state_dict", "history"])
def test_faults_a_vae_checkpoint_with_nan_stops_before_any_figure(kind, vae_trained, vae_data_root, tmp_path):
    """In OUT/vae.pt, the advice removes it for make to rebuild; a file the user names is never to be removed."""
    ckpt = torch.load(vae_trained / "vae.pt", weights_only=True)
    if kind == "history":
        ckpt["test_loss"][-1] = math.nan
    else:
        ckpt["model"]["decoder.fc3.weight"][0, 0] = math.nan
    path = tmp_path / ("notebook.pt" if kind == "bare_state_dict" else "vae.pt")
    torch.save(ckpt if kind != "bare_state_dict" else ckpt["model"], path)
    figs = tmp_path / "figs"
    shutil.copytree(vae_trained / "figs", figs)
    before = snapshot(tmp_path)
    where = ["--checkpoint", path] if kind == "bare_state_dict" else ["--out-dir", tmp_path]
    proc = vae_in_process("--plot-only", *where, "--figures-dir", figs, "--data-root", vae_data_root)
    fragment = "test_loss holds NaN" if kind == "history" else "decoder.fc3.weight holds NaN"
    line = assert_rejected(proc, before, [tmp_path], str(path), fragment)
    assert ("rm -f" in line and "make vae" in line) == (kind != "bare_state_dict"), line


@pytest.mark.parametrize("script, flag", [("vae.py", "--figures-dir"), ("experiments.sweep_vae", "--out-dir")])
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
