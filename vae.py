"""Train the assignment's variational autoencoder on MNIST and render its figures.

The model, the loss and each training step are the assignment's: model(x), loss_function,
backward(), Adam. Around the step, each split is preloaded once as one float tensor, and
batches are slices of a per-epoch shuffled copy. Every default lives in VAEConfig.

    python vae.py --limit 2000 --epochs 2               # a quick run
    python vae.py --plot-only --checkpoint model.pt     # the figures of the notebook's state_dict
"""
import dataclasses
import math
import os
import time
from typing import Optional

import lab.cli  # noqa: F401  first: a Ctrl-C while torch loads waits for run_main
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from lab import vae_figures as vf
from lab.cli import ArgumentParser, UserError, add_common_args, positive_int, positive_float, run_main
from lab.files import atomic_path, check_can_create, first_non_finite, plan_outputs, reading, write_json
from lab.machine import resolve_device, versions
from lab.mnist import load_mnist

IMAGE_PIXELS = 28 * 28
HIDDEN = 400


# Class, attribute and layer names are the assignment's, so that its state_dicts load here and
# ours load there. Training runs through forward() and loss_function: edit them and that is what trains.

class Encoder(nn.Module):
    def __init__(self, z_dim):
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_PIXELS, HIDDEN)
        self.fc2_mu = nn.Linear(HIDDEN, z_dim)
        self.fc2_logvar = nn.Linear(HIDDEN, z_dim)

    def forward(self, x):
        """(mu, logvar) of images of any shape with 784 pixels each, flattened as x.view(-1, 784) does."""
        h = F.relu(self.fc1(x.reshape(-1, IMAGE_PIXELS)))
        return self.fc2_mu(h), self.fc2_logvar(h)


class Decoder(nn.Module):
    def __init__(self, z_dim):
        super().__init__()
        self.fc3 = nn.Linear(z_dim, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, IMAGE_PIXELS)

    def forward(self, z):
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))


class VAE(nn.Module):
    def __init__(self, z_dim=20):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(z_dim)
        self.decoder = Decoder(z_dim)

    @staticmethod
    def reparameterize(mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def forward(self, x):
        mu, logvar = self.encoder(x)
        z = self.reparameterize(mu, logvar)
        return self.decoder(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    """The assignment's loss, summed over the batch: reconstruction BCE + KL divergence."""
    return bce(recon_x, x) + kl_divergence(mu, logvar)


def train_vae(model, train_x, test_x=None, config=None, *, progress=True, log=print, **overrides):
    """Train ``model`` in place as ``config`` (VAEConfig() by default) and ``overrides`` say; return its
    history per epoch. An epoch whose mean loss is not finite or above DIVERGED has diverged."""
    config = dataclasses.replace(config or VAEConfig(), **overrides)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    shuffler = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed + 1)   # the eps
    train_x = train_x.to(device)
    history = {key: [] for key in (*HISTORY_KEYS, "seconds")}
    model.train()
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        shuffled = train_x[torch.randperm(len(train_x), generator=shuffler).to(device)]
        total = torch.zeros((), dtype=torch.float64, device=device)   # read once per epoch: no GPU sync per step
        batches = tqdm(shuffled.split(config.batch_size), f"epoch {epoch}/{config.epochs}", unit="batch",
                       leave=False, disable=None if progress else True)
        try:
            for x in batches:
                recon_x, mu, logvar = model(x)
                loss = loss_function(recon_x, x, mu, logvar)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.detach()
        except RuntimeError:   # NaN outputs, which binary_cross_entropy refuses, or an edit that broke a shape
            explain_failure(model, x, epoch)
            raise
        history["train_loss"].append(total.item() / len(train_x))
        history["seconds"].append(time.perf_counter() - start)
        if test_x is not None:
            for key, value in zip(HISTORY_KEYS[1:], evaluate(model, test_x, seed=config.seed)):
                history[key].append(value)
        last = {key: history[key][-1] for key in HISTORY_KEYS if history[key]}
        if not all(map(math.isfinite, last.values())) or last["train_loss"] > DIVERGED:
            raise UserError(f"training diverged at epoch {epoch}: mean loss {last['train_loss']:.4g} per image, "
                            f"above {DIVERGED:.0f}; lower --lr")
        if log is not None:
            log(f"epoch {epoch:2d}/{config.epochs}  " + "  ".join(f"{key} {value:.3f}" for key, value in last.items())
                + f"  {history['seconds'][-1]:.2f} s, {torch.get_num_threads()} threads")
    return history


@torch.no_grad()
def generate_samples(model, num_samples=64, seed=0):
    """The assignment's generate_samples: decode z ~ N(0, I) into num_samples images (N x 784)."""
    z = torch.randn(num_samples, model.z_dim, generator=torch.Generator().manual_seed(seed))
    return model.decoder(z.to(next(model.parameters()).device))


# ----------------------------------------------------------------- the rest

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """One run, and where its defaults live: the CLI's flags, train_vae, sweep_vae.py and vae.pt use it."""
    z_dim: int = 20
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    data_root: str = "data"
    limit: Optional[int] = None
    device: str = "auto"
    threads: Optional[int] = None


HISTORY_KEYS = ("train_loss", "test_loss", "test_recon", "test_kl")
DIVERGED = 1.1 * IMAGE_PIXELS * math.log(2)  # 784 ln 2: 0.5 for each pixel, where training starts; 10%: batch spread
FIGURE_NAMES = ("vae_loss.png", "vae_reconstructions.png", "vae_samples.png", "vae_latent.png", "vae_interpolation.png")


def bce(recon_x, x):
    return F.binary_cross_entropy(recon_x.reshape(-1, IMAGE_PIXELS), x.reshape(-1, IMAGE_PIXELS), reduction="sum")


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the batch."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def explain_failure(model, x, epoch):
    """After a failed step, ``x`` through ``model`` again: a Linear layer fed another width than it takes
    (fc1 edited, not the layer after it) is a UserError naming both, NaN outputs one saying it diverged."""
    names = {layer: name for name, layer in model.named_modules() if isinstance(layer, nn.Linear)}
    ran = []     # the layers that ran, in that order

    def check(layer, inputs):
        got = inputs[0].shape[-1]
        if got != layer.in_features:
            source = next((names[other] for other in reversed(ran) if other.out_features == got), "the input")
            raise UserError(f"{names[layer]} takes {layer.in_features} inputs but {source} gives {got}")
        ran.append(layer)

    hooks = [layer.register_forward_pre_hook(check) for layer in names]
    try:
        with torch.no_grad():
            recon_x, _, _ = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    if not torch.isfinite(recon_x).all():
        raise UserError(f"training diverged at epoch {epoch}: the model's outputs became NaN; lower --lr")


@torch.no_grad()
def evaluate(model, images, *, batch_size=1000, seed=0):
    """(loss_function, its BCE, its KL) per image: a weight on the KL changes the first only. The eps
    come from ``seed`` in a forked generator: no training draw shifts."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    model.eval()
    with torch.random.fork_rng(devices=[] if device.type != "cuda" else None):
        torch.manual_seed(seed)
        for x in images.split(batch_size):
            x = x.to(device, non_blocking=True)
            recon_x, mu, logvar = model(x)
            sums += torch.stack([loss_function(recon_x, x, mu, logvar), bce(recon_x, x), kl_divergence(mu, logvar)])
    model.train()
    return tuple((sums / len(images)).tolist())


def preload(dataset, limit=None):
    """(N x 784 float pixels in [0, 1], N labels): ToTensor()'s division by 255, once for the whole split."""
    images, labels = dataset.data[:limit], dataset.targets[:limit]
    return images.reshape(len(images), IMAGE_PIXELS).float().div_(255), labels.clone()


def train_model(config, *, log=print, progress=True):
    """(model, history, run, test split): VAE(config.z_dim) trained by train_vae as ``config`` says; sweep_vae too."""
    device = resolve_device(config.device)
    train_x, _ = preload(load_mnist(config.data_root, train=True), config.limit)
    test_x, test_y = preload(load_mnist(config.data_root, train=False), config.limit)
    log(f"{config} on {device}: {len(train_x)} train / {len(test_x)} test images")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # the init
    model = VAE(config.z_dim).to(device)
    start = time.perf_counter()
    history = train_vae(model, train_x, test_x.to(device), config, log=log, progress=progress)
    run = {"n_train": len(train_x), "n_test": len(test_x), "device": str(device), "threads": torch.get_num_threads(),
           "seconds": time.perf_counter() - start}
    return model, history, run, (test_x, test_y)


def save_checkpoint(path, state, *, config, history, run):
    """vae.pt: the state_dict, the VAEConfig, the per-epoch history and what the run was."""
    checkpoint = {"model": {k: v.detach().cpu().clone() for k, v in state.items()}, **run, "versions": versions(),
                  "config": dataclasses.asdict(config), **{key: list(history[key]) for key in HISTORY_KEYS}}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    print(f"wrote {path}")


def load_checkpoint(path):
    """(VAE, the checkpoint, or None for the notebook's bare state_dict); read it inside lab.files.reading."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    bare = "config" not in ckpt
    state = ckpt if bare else ckpt["model"]
    model = VAE(state["encoder.fc2_mu.weight"].shape[0] if bare else VAEConfig(**ckpt["config"]).z_dim)
    model.load_state_dict(state, strict=True)    # it names the missing, unexpected and mis-shaped keys
    history = {} if bare else {key: torch.tensor(ckpt[key], dtype=torch.float64) for key in HISTORY_KEYS}
    bad = first_non_finite({**state, **history})
    if bad is not None:   # checked before any figure: NaN weights would draw blank or fail late
        raise ValueError(f"{bad} holds NaN or infinite values (a diverged or damaged run)")
    return model.eval(), None if bare else ckpt


@torch.no_grad()
def render_figures(model, test_x, test_y, figures_dir, *, seed, history=None):
    """Every figure of FIGURE_NAMES, in that order (placeholders where there is nothing to show)."""
    title = f"VAE, z_dim {model.z_dim}" + ("" if history else ", from a bare state_dict")
    loss, reconstructions, samples, latent, interpolation = [os.path.join(figures_dir, n) for n in FIGURE_NAMES]
    model = model.cpu().eval()
    torch.set_num_threads(1)    # the same rounding, hence the same pixels, whatever --threads trained
    if history is None:
        vf.placeholder(loss, title, "no training history: the checkpoint is a bare state_dict")
    else:
        vf.plot_loss(history, title, loss)
    mu, _ = model.encoder(test_x)    # decoded from the posterior mean: the same picture each time
    vf.save_grid(torch.cat([test_x[:8], model.decoder(mu[:8])]), reconstructions, nrow=len(test_x[:8]))
    vf.save_grid(generate_samples(model, 64, seed=seed), samples, nrow=8)
    vf.plot_latent(mu, test_y, latent)
    ends = (test_y[1:] != test_y[:-1]).nonzero().flatten() + 1     # where a run of one class ends
    pairs = [(a, int(ends[ends > a][0])) for a in range(4) if (ends > a).any()]   # to the next other digit
    steps = torch.linspace(0, 1, 10).unsqueeze(1)
    rows = [model.decoder(mu[a] + steps * (mu[b] - mu[a])) for a, b in pairs]
    if rows:
        vf.save_grid(torch.cat(rows), interpolation, nrow=10)
    else:
        vf.placeholder(interpolation, "interpolation between test digits", f"no interpolation: the "
                       f"{len(test_y)} test image(s) hold only one digit class (raise --limit)")


def add_training_args(p, defaults=VAEConfig()):
    """The flags of VAEConfig's fields but z_dim, which vae.py and sweep_vae.py share, defaults from ``defaults``."""
    p.add_argument("--epochs", type=positive_int, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, help="images per Adam step")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate")
    p.add_argument("--threads", type=positive_int, help="CPU threads torch trains on")
    add_common_args(p, "data_root", "device", "seed", "limit", limit=dict(
        help="use only the first N images of each split (default: all; with --plot-only: the trained one's)"))
    p.set_defaults(**dataclasses.asdict(defaults))


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="artifacts", help="where vae.pt and vae_metrics.json go (OUT)")
    p.add_argument("--figures-dir", default="figures", help="where the five vae_*.png go (FIGURES)")
    p.add_argument("--plot-only", action="store_true", help="re-render the figures from a checkpoint, without training")
    p.add_argument("--checkpoint", help="with --plot-only: vae.pt or the notebook's state_dict (default: OUT/vae.pt)")
    p.add_argument("--z-dim", type=positive_int, help="latent size")
    add_training_args(p)
    args = p.parse_args(argv)
    if args.checkpoint is not None and not args.plot_only:
        p.error("--checkpoint is read only with --plot-only (training writes OUT/vae.pt)")
    return args


def config_from_args(args):
    return VAEConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(VAEConfig)})


def plot_only(args):
    path = args.checkpoint or os.path.join(args.out_dir, "vae.pt")
    check_can_create(args.figures_dir)
    plan_outputs([os.path.join(args.figures_dir, name) for name in FIGURE_NAMES])
    with reading(path, None if args.checkpoint else "vae"):
        model, ckpt = load_checkpoint(path)
    config = ckpt["config"] if ckpt else {"seed": args.seed, "limit": None}
    test_x, test_y = preload(load_mnist(args.data_root, train=False), args.limit or config["limit"])
    render_figures(model, test_x, test_y, args.figures_dir, seed=config["seed"], history=ckpt)


def train(config, out_dir, figures_dir):
    """Train, then write vae_metrics.json, vae.pt (the Make target, hence last but the figures)."""
    check_can_create(out_dir)
    check_can_create(figures_dir)
    metrics, checkpoint = os.path.join(out_dir, "vae_metrics.json"), os.path.join(out_dir, "vae.pt")
    plan_outputs([metrics, checkpoint, *(os.path.join(figures_dir, name) for name in FIGURE_NAMES)])
    model, history, run, (test_x, test_y) = train_model(config)
    write_json(metrics, {**{key: history[key][-1] for key in HISTORY_KEYS},
                         **{f"{key}_per_epoch": history[key] for key in HISTORY_KEYS},
                         "epoch_seconds": [round(t, 3) for t in history["seconds"]], **dataclasses.asdict(config),
                         **dict(run, seconds=round(run["seconds"], 3)), "versions": versions()})
    print(f"wrote {metrics}")
    save_checkpoint(checkpoint, model.state_dict(), config=config, history=history, run=run)
    render_figures(model, test_x, test_y, figures_dir, seed=config.seed, history=history)


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        plot_only(args)
    else:
        train(config_from_args(args), args.out_dir, args.figures_dir)


if __name__ == "__main__":
    run_main(main)
