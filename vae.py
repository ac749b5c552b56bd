"""Train the assignment's variational autoencoder on MNIST and render its figures.

The model, loss and defaults are the assignment's (784-400-z encoder, z-400-784
decoder, summed BCE + closed-form KL, Adam 1e-3, batch 64, 15 epochs); the
training loop is faster: each split is preloaded once as one float tensor,
batches are slices of a per-epoch shuffled copy, the BCE is computed from the
decoder's logits and the loss is read back once per epoch, not once per step.

    python vae.py --data-root data --out-dir artifacts --figures-dir figures
    python vae.py --plot-only --out-dir artifacts --figures-dir figures
    python vae.py --limit 2000 --epochs 2            # a quick smoke run
"""
import dataclasses
import math
import os
import time
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from labio import (ArgumentParser, UserError, add_common_args, atomic_path, ensure_writable_dir,
                   load_mnist, positive_float, positive_int, pyplot, resolve_device, run_main,
                   save_figure, versions, write_json)
from vae_stack import cb_log_normalizer, evaluate, kl_divergence, reconstruction_nll, train_stack  # noqa: F401

IMAGE_PIXELS = 28 * 28
HIDDEN = 400
CHECKPOINT_NAME = "vae.pt"
METRICS_NAME = "vae_metrics.json"
CHECKPOINT_FORMAT = "vae.py checkpoint v1"
HISTORY_KEYS = ("train_loss", "test_loss", "test_recon", "test_kl")
FIGURE_NAMES = ("vae_loss.png", "vae_reconstructions.png", "vae_samples.png",
                "vae_latent.png", "vae_interpolation.png")


# ------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """One training run: what the CLI builds, what train() takes and what vae.pt stores."""
    z_dim: int = 20
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    likelihood: str = "bernoulli"
    data_root: str = "data"
    limit: Optional[int] = None
    device: str = "auto"
    threads: Optional[int] = None


# -------------------------------------------------------------------- model
# Class, attribute and layer names are the assignment's, so that its
# state_dicts load here and ours load there.

class Encoder(nn.Module):
    def __init__(self, z_dim):
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_PIXELS, HIDDEN)
        self.fc2_mu = nn.Linear(HIDDEN, z_dim)
        self.fc2_logvar = nn.Linear(HIDDEN, z_dim)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2_mu(h), self.fc2_logvar(h)


class Decoder(nn.Module):
    def __init__(self, z_dim):
        super().__init__()
        self.fc3 = nn.Linear(z_dim, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, IMAGE_PIXELS)

    def logits(self, z):
        """Pre-sigmoid outputs: the loss is computed from these, for speed and stability."""
        return self.fc4(F.relu(self.fc3(z)))

    def forward(self, z):
        return torch.sigmoid(self.logits(z))


class VAE(nn.Module):
    def __init__(self, z_dim=20):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(z_dim)
        self.decoder = Decoder(z_dim)

    @staticmethod
    def reparameterize(mu, logvar, generator=None):
        """z = mu + std * eps with std = exp(0.5 logvar), eps ~ N(0, I)."""
        std = torch.exp(0.5 * logvar)
        if generator is None:
            eps = torch.randn_like(std)
        else:
            eps = torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
        return mu + eps * std

    def forward_logits(self, x, generator=None):
        mu, logvar = self.encoder(x.view(-1, IMAGE_PIXELS))
        z = self.reparameterize(mu, logvar, generator)
        return self.decoder.logits(z), mu, logvar

    def forward(self, x):
        logits, mu, logvar = self.forward_logits(x)
        return torch.sigmoid(logits), mu, logvar


# --------------------------------------------------------------------- loss
# kl_divergence, cb_log_normalizer, reconstruction_nll and evaluate live in
# vae_stack, beside the hand-written gradients that must agree with them.

def loss_function(recon_x, x, mu, logvar):
    """The assignment's loss: summed binary cross-entropy + KL divergence."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, IMAGE_PIXELS), reduction="sum")
    return bce + kl_divergence(mu, logvar)


def loss_from_logits(logits, x, mu, logvar, likelihood="bernoulli"):
    """Same value as ``loss_function(sigmoid(logits), x, mu, logvar)``, computed stably.

    ``continuous-bernoulli`` subtracts the summed log-normalizer, making the
    reconstruction term a proper log-density of pixels in [0, 1].
    """
    return reconstruction_nll(logits, x.reshape(logits.shape), likelihood) + kl_divergence(mu, logvar)


# --------------------------------------------------------------------- data

def preload(dataset, limit=None):
    """(N x 784 float pixels in [0, 1], N labels), bit-equal to ToTensor() per image.

    ToTensor divides the uint8 image by 255 in float32; doing that once for the
    whole split replaces 60000 PIL round trips per epoch.
    """
    images, labels = dataset.data, dataset.targets
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.reshape(len(images), IMAGE_PIXELS).float().div_(255), labels.clone()


# ----------------------------------------------------------------- training

def train_vae(model, train_x, test_x=None, *, epochs=15, batch_size=64, lr=1e-3, seed=0,
              likelihood="bernoulli", progress=True, log=print):
    """Train ``model`` in place; return its history (lists, one entry per epoch):
    ``train_loss``, and with ``test_x`` ``test_loss`` = ``test_recon`` + ``test_kl``;
    ``seconds`` per epoch. See vae_stack.train_stack, which does the work.

    Each train loss is the epoch's summed loss divided by the number of training
    images (the assignment divided by len(loader) * batch_size = 60032 instead).
    A non-finite epoch loss stops training with a UserError.
    """
    try:
        return train_stack([model], train_x, test_x, epochs=epochs, batch_size=batch_size, lr=lr,
                           seed=seed, likelihood=likelihood, progress=progress, log=log)[0]
    except FloatingPointError as exc:
        raise UserError(f"{exc}; lower --lr") from None


# --------------------------------------------------------------- checkpoint

def save_checkpoint(path, model, *, config, history, run):
    """vae.pt: the state_dict, the VAEConfig (as a dict), the per-epoch history and
    ``run`` (what the run was: n_train, n_test, device, threads, seconds)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": dataclasses.asdict(config),
        **{key: list(history[key]) for key in HISTORY_KEYS},
        **run,
        "seed": config.seed,
        "versions": versions(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, z_dim=None):
    """(VAE on the CPU, checkpoint dict); one-line UserError for anything unusable."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; run `make vae` first")
    try:
        with warnings.catch_warnings():  # a damaged file can make torch warn before it fails
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt_z = int(ckpt["config"]["z_dim"])
        state = ckpt["model"]
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: corrupt or not written by vae.py "
                        f"({type(exc).__name__}); rerun `make vae`") from None
    if z_dim is not None and z_dim != ckpt_z:
        raise UserError(f"checkpoint {path} has z_dim {ckpt_z}, but --z-dim {z_dim} was asked for "
                        f"(drop --z-dim or retrain with `make vae`)")
    model = VAE(ckpt_z)
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise UserError(f"checkpoint {path} does not fit a VAE with z_dim {ckpt_z} "
                        f"({type(exc).__name__}); rerun `make vae`") from None
    model.eval()
    return model, ckpt


# ------------------------------------------------------------------ figures

def save_grid(images, path, nrow):
    """Write images (N x 784 in [0, 1]) as one torchvision grid, atomically."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(images.view(-1, 1, 28, 28), tmp, nrow=nrow, padding=2, pad_value=1.0, format="png")


def plot_loss(ckpt, path):
    """Train and test loss per epoch, and beside it the test loss's two terms."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax, terms) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = range(1, len(ckpt["train_loss"]) + 1)
    ax.plot(epochs, ckpt["train_loss"], "o-", label="train")
    if ckpt["test_loss"]:
        ax.plot(epochs, ckpt["test_loss"], "s-", label="test")
        terms.plot(epochs, ckpt["test_recon"], "s-", color="C2", label="reconstruction")
        kl_axis = terms.twinx()   # the KL term is ~25 nats beside ~80: its own scale
        kl_axis.plot(epochs, ckpt["test_kl"], "^-", color="C3", label="KL")
        kl_axis.set_ylabel("KL term (nats)", color="C3")
        terms.legend(handles=terms.lines + kl_axis.lines, loc="center right")
    terms.set_xlabel("epoch")
    terms.set_ylabel("reconstruction term (nats)", color="C2")
    terms.set_title("test loss = reconstruction + KL")
    for axis in (ax, terms):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per image (BCE + KL, nats)")
    ax.set_title(f"VAE, z_dim {ckpt['config']['z_dim']}, {ckpt['config']['likelihood']}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=120)


def plot_latent(mu, labels, path):
    """Test-set posterior means projected on their first two principal components."""
    plt = pyplot()
    centered = mu - mu.mean(0)
    if mu.shape[1] >= 2:
        _, _, v = torch.linalg.svd(centered, full_matrices=False)
        xy = centered @ v[:2].T
        xlabel, ylabel = "PC 1", "PC 2"
    else:  # one latent dimension: plot it against the digit
        xy = torch.stack([centered[:, 0], labels.float()], 1)
        xlabel, ylabel = "mu", "digit"
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=2, alpha=0.6)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"test-set mu, PCA of {mu.shape[1]}-D latent")
    save_figure(fig, path, dpi=120)


def interpolation_pairs(labels, count=4):
    """Indices of ``count`` test digits and, for each, the next one of another class."""
    pairs = []
    for i in range(len(labels) - 1):
        later = (labels[i + 1:] != labels[i]).nonzero()
        if len(later):
            pairs.append((i, i + 1 + int(later[0])))
        if len(pairs) == count:
            break
    return pairs


@torch.no_grad()
def generate_samples(model, num_samples=64, seed=0):
    """The assignment's generate_samples: decode z ~ N(0, I) into num_samples images (N x 784)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_samples, model.z_dim, generator=generator)
    return model.decoder(z.to(next(model.parameters()).device))


@torch.no_grad()
def render_figures(model, ckpt, test_x, test_y, figures_dir):
    """All five figures from a trained model; nothing here trains or samples the data."""
    ensure_writable_dir(figures_dir)
    out = {name: os.path.join(figures_dir, name) for name in FIGURE_NAMES}
    model = model.cpu().eval()
    plot_loss(ckpt, out["vae_loss.png"])
    mu, _ = model.encoder(test_x)
    # Reconstructions from the posterior mean, so that re-rendering gives the same picture.
    originals = test_x[:8]
    save_grid(torch.cat([originals, model.decoder(mu[:8])]), out["vae_reconstructions.png"], nrow=8)
    save_grid(generate_samples(model, 64, seed=int(ckpt["seed"])), out["vae_samples.png"], nrow=8)
    plot_latent(mu, test_y, out["vae_latent.png"])
    steps = torch.linspace(0, 1, 10).unsqueeze(1)
    rows = [model.decoder(mu[a] + steps * (mu[b] - mu[a])) for a, b in interpolation_pairs(test_y)]
    if rows:
        save_grid(torch.cat(rows), out["vae_interpolation.png"], nrow=10)
    return list(out.values())


# ---------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="artifacts", help="where vae.pt and vae_metrics.json go (OUT)")
    p.add_argument("--figures-dir", default="figures", help="where the five vae_*.png go (FIGURES)")
    p.add_argument("--plot-only", action="store_true",
                   help="re-render the figures from OUT/vae.pt without training")
    p.add_argument("--epochs", type=positive_int, default=15, help="passes over the training set")
    p.add_argument("--z-dim", type=positive_int, default=None,
                   help="latent size; None = 20 when training, the checkpoint's with --plot-only")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per Adam step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    add_common_args(
        p, "data_root", "device", "seed", "limit",
        data_root=dict(default=None, help="torchvision MNIST root (DATA); default: 'data', or with "
                                          "--plot-only the checkpoint's"),
        seed=dict(help="seeds the init, the shuffles, eps and the sample grid"),
        limit=dict(help="use only the first N images of each split (default: all; with --plot-only "
                        "the checkpoint's)"))
    p.add_argument("--likelihood", choices=("bernoulli", "continuous-bernoulli"), default="bernoulli",
                   help="bernoulli = the assignment's BCE; continuous-bernoulli adds its log-normalizer")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads; None = torch's default (all cores: on a quiet 2-core machine "
                        "2 threads beat 1 by about 15%%, on a loaded one 1 thread is safer)")
    return p.parse_args(argv)


def load_splits(data_root, limit):
    train_x, _ = preload(load_mnist(data_root, train=True), limit)
    test_x, test_y = preload(load_mnist(data_root, train=False), limit)
    return train_x, test_x, test_y


def plot_only(args):
    model, ckpt = load_checkpoint(os.path.join(args.out_dir, CHECKPOINT_NAME), args.z_dim)
    data_root = args.data_root or ckpt["config"].get("data_root") or "data"
    limit = args.limit if args.limit is not None else ckpt["config"].get("limit")
    test_x, test_y = preload(load_mnist(data_root, train=False), limit)
    for path in render_figures(model, ckpt, test_x, test_y, args.figures_dir):
        print(f"wrote {path}")


def config_from_args(args):
    """The run the command line asks for (None flags take their training defaults)."""
    return VAEConfig(z_dim=args.z_dim or 20, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, likelihood=args.likelihood, data_root=args.data_root or "data",
                     limit=args.limit, device=args.device, threads=args.threads)


def train(config, out_dir, figures_dir):
    device = resolve_device(config.device)
    if device.type == "cpu":
        if config.threads:
            torch.set_num_threads(config.threads)
    ensure_writable_dir(out_dir)
    ensure_writable_dir(figures_dir)
    train_x, test_x, test_y = load_splits(config.data_root, config.limit)
    print(f"VAE z_dim {config.z_dim}, {len(train_x)} train / {len(test_x)} test images, "
          f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr}, {config.likelihood}, "
          f"{device}")
    torch.manual_seed(config.seed)  # the init, then eps, as in the assignment
    model = VAE(config.z_dim).to(device)
    start = time.perf_counter()
    history = train_vae(model, train_x, test_x.to(device), epochs=config.epochs,
                        batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                        likelihood=config.likelihood)
    seconds = time.perf_counter() - start
    threads = torch.get_num_threads()
    run = {"n_train": len(train_x), "n_test": len(test_x), "device": str(device), "threads": threads,
           "seconds": seconds}
    checkpoint = os.path.join(out_dir, CHECKPOINT_NAME)
    save_checkpoint(checkpoint, model, config=config, history=history, run=run)
    print(f"wrote {checkpoint}")
    metrics = os.path.join(out_dir, METRICS_NAME)
    write_json(metrics, {**{key: history[key][-1] for key in HISTORY_KEYS},
                         **{f"{key}_per_epoch": history[key] for key in HISTORY_KEYS},
                         "epoch_seconds": [round(t, 3) for t in history["seconds"]],
                         "seconds": round(seconds, 3), "epochs": config.epochs, "z_dim": config.z_dim,
                         "likelihood": config.likelihood, "batch_size": config.batch_size, "lr": config.lr,
                         "n_train": len(train_x), "n_test": len(test_x), "seed": config.seed,
                         "device": str(device), "threads": threads, "versions": versions()})
    print(f"wrote {metrics}")
    _, ckpt = load_checkpoint(checkpoint)  # render from exactly what --plot-only will see
    for path in render_figures(model, ckpt, test_x.cpu(), test_y, figures_dir):
        print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        plot_only(args)
    else:
        train(config_from_args(args), args.out_dir, args.figures_dir)


if __name__ == "__main__":
    run_main(main)
