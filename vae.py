"""Train the assignment's variational autoencoder on MNIST and render its figures.

The model, loss and defaults are the assignment's (784-400-z encoder, z-400-784
decoder, summed BCE + closed-form KL, Adam 1e-3, batch 64, 15 epochs), and so is
each training step: model(x), loss_function, backward(), Adam. What is faster is
around the step: each split is preloaded once as one float tensor, and batches
are slices of a per-epoch shuffled copy. The defaults live in VAEConfig.

    python vae.py --data-root data --out-dir artifacts --figures-dir figures
    python vae.py --plot-only --out-dir artifacts --figures-dir figures
    python vae.py --plot-only --checkpoint model.pt     # a bare state_dict from the notebook
    python vae.py --limit 2000 --epochs 2            # a quick smoke run
    python vae.py --threads 1                        # torch's CPU threads (default: torch's count)
"""
import contextlib
import dataclasses
import math
import os
import time
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from lab import vae_figures as vf
from lab.cli import ArgumentParser, UserError, add_common_args, positive_float, positive_int, run_main
from lab.files import atomic_path, check_can_create, first_non_finite, plan_outputs, write_json
from lab.machine import resolve_device, versions
from lab.mnist import load_mnist

IMAGE_PIXELS = 28 * 28
HIDDEN = 400
CHECKPOINT_NAME = "vae.pt"
METRICS_NAME = "vae_metrics.json"
CHECKPOINT_FORMAT = "vae.py checkpoint v2"    # v2: the test loss's recon/KL terms, run info
HISTORY_KEYS = ("train_loss", "test_loss", "test_recon", "test_kl")
REQUIRED_KEYS = ("format", "model", "config", *HISTORY_KEYS, "seed")
LIKELIHOODS = ("bernoulli", "continuous-bernoulli")
DEVICES = ("auto", "cpu", "cuda", "mps")
FIGURE_NAMES = ("vae_loss.png", "vae_reconstructions.png", "vae_samples.png",
                "vae_latent.png", "vae_interpolation.png")
# Below this |logit| the continuous-Bernoulli normalizer uses its Taylor series
# (the closed form is 0/0 at logit 0, i.e. lambda = 0.5).
CB_TAYLOR_WINDOW = 1e-2
# The continuous Bernoulli's probabilities are clamped this far inside (0, 1) before
# their logit is taken.
CB_PROB_EPS = 1e-6


# ------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """One training run, and the one place its defaults live: what the CLI builds (its
    flags default to these fields), what train_vae and sweep_vae.py read, and what
    vae.pt stores. ``threads`` None: torch's own count."""
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

    @classmethod
    def from_dict(cls, fields):
        """The config stored in vae.pt; ValueError names the first field that does not fit."""
        if not isinstance(fields, dict):
            raise ValueError(f"'config' is a {type(fields).__name__}, not a dict")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in fields]
        unknown = [str(n) for n in fields if n not in names]
        if missing or unknown:
            raise ValueError("config " + "; ".join(
                ([f"lacks {', '.join(missing)}"] if missing else []) +
                ([f"has unknown {', '.join(unknown)}"] if unknown else [])))
        for name, ok in _CONFIG_CHECKS.items():
            if not ok(fields[name]):
                raise ValueError(f"config {name}={fields[name]!r} is not valid")
        return cls(**fields)


def _count(value, lowest=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


_CONFIG_CHECKS = {
    "z_dim": _count, "epochs": _count, "batch_size": _count,
    "lr": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
    "seed": lambda v: _count(v, 0), "likelihood": lambda v: v in LIKELIHOODS,
    "data_root": lambda v: isinstance(v, str), "limit": lambda v: v is None or _count(v),
    "device": lambda v: v in DEVICES, "threads": lambda v: v is None or _count(v),
}


# -------------------------------------------------------------------- model
# Class, attribute and layer names are the assignment's, so that its
# state_dicts load here and ours load there. Training runs through forward()
# and loss_function below: edit them and that is what trains.

class Encoder(nn.Module):
    def __init__(self, z_dim):
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_PIXELS, HIDDEN)
        self.fc2_mu = nn.Linear(HIDDEN, z_dim)
        self.fc2_logvar = nn.Linear(HIDDEN, z_dim)

    def forward(self, x):
        """(mu, logvar) of images of any shape with 784 pixels each (N x 1 x 28 x 28,
        N x 28 x 28, N x 784), flattened as the assignment's x.view(-1, 784) does."""
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
        """z = mu + std * eps with std = exp(0.5 logvar), eps ~ N(0, I)."""
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def forward(self, x):
        mu, logvar = self.encoder(x)
        z = self.reparameterize(mu, logvar)
        return self.decoder(z), mu, logvar


# --------------------------------------------------------------------- loss

def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, summed over the batch."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def loss_function(recon_x, x, mu, logvar):
    """The assignment's loss: summed binary cross-entropy + KL divergence."""
    bce = F.binary_cross_entropy(recon_x.reshape(-1, IMAGE_PIXELS), x.reshape(-1, IMAGE_PIXELS),
                                 reduction="sum")
    return bce + kl_divergence(mu, logvar)


def cb_log_normalizer(logits):
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019), lambda = sigmoid(logits).

    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), and with lambda = sigmoid(l),
    1 - 2 lambda = -tanh(l / 2) and artanh(1 - 2 lambda) = -l / 2, so C = l / tanh(l / 2):
    no log of a difference of probabilities, finite for any logit. At l = 0 (lambda = 0.5)
    that is 0/0 with limit 2, so a small window uses the series
    u / tanh(u) = 1 + u^2/3 - u^4/45 (u = l/2). The unused branch gets a harmless input
    so that no NaN leaks into the gradient through torch.where.
    """
    small = logits.abs() < CB_TAYLOR_WINDOW
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe / torch.tanh(0.5 * safe))
    u2 = (0.5 * logits).pow(2)
    series = math.log(2.0) + torch.log1p(u2 / 3 - u2.pow(2) / 45)
    return torch.where(small, series, exact)


def vae_loss(recon_x, x, mu, logvar, likelihood="bernoulli"):
    """The loss that trains and tests: loss_function, and for the continuous Bernoulli
    minus the summed log-normalizer of the decoder's outputs, which makes the
    reconstruction term a proper log-density of pixels in [0, 1]."""
    loss = loss_function(recon_x, x, mu, logvar)
    if likelihood == "continuous-bernoulli":
        # Clamped so that a saturated sigmoid (exactly 0 or 1 in float32) keeps a finite logit.
        loss = loss - cb_log_normalizer(torch.logit(recon_x, eps=CB_PROB_EPS)).sum()
    return loss


@torch.no_grad()
def evaluate(model, images, *, batch_size=1000, likelihood="bernoulli", seed=0):
    """(reconstruction term, KL term) per image of ``model`` on ``images``: the loss of
    model(x) as vae_loss computes it, minus its KL term.

    The eps come from torch's generator seeded with ``seed`` inside fork_rng, so the
    same model and seed give the same numbers, and evaluating never shifts a
    training run's draws.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    kl = torch.zeros((), dtype=torch.float64, device=device)
    with torch.random.fork_rng(devices=[] if device.type != "cuda" else None):
        torch.manual_seed(seed)
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            recon_x, mu, logvar = model(x)
            total += vae_loss(recon_x, x, mu, logvar, likelihood)
            kl += kl_divergence(mu, logvar)
    model.train(was_training)
    return (total - kl).item() / len(images), kl.item() / len(images)


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

def parameter_count(z_dim):
    """The VAE(z_dim)'s number of weights, without building it: fc1 and fc4, then what grows with z."""
    return 2 * IMAGE_PIXELS * HIDDEN + 2 * HIDDEN + IMAGE_PIXELS + z_dim * (3 * HIDDEN + 2)


def free_memory(device):
    """Bytes free for tensors on ``device``: a GPU's free memory, or the system's available memory
    (Linux's MemAvailable, which counts reclaimable caches, else free pages); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(z_dims, batch_size, limit, device, flag="--z-dim"):
    """Fail before any work when VAEs of ``z_dims``, trained at once, would not fit in the memory
    free on ``device``: float32 weights, their gradients and Adam's two moments (4 x the weights'
    bytes), and a batch's activations with their gradients. Linux overcommits memory: a run too
    large could start anyway, and the OOM killer end it later without a word."""
    available = free_memory(device)
    if available is None:
        return
    batch = min(batch_size, limit or 60000)     # a batch holds at most the MNIST training set
    weights = sum(4 * 4 * parameter_count(z) for z in z_dims)
    activations = sum(2 * 4 * batch * (3 * IMAGE_PIXELS + 2 * HIDDEN + 5 * z) for z in z_dims)
    if weights + activations > available:
        gb = lambda size: f"{size / 1e9:.1f} GB"  # noqa: E731
        raise UserError(f"{flag} {' '.join(map(str, z_dims))} with --batch-size {batch_size} needs about "
                        f"{gb(weights + activations)} of memory ({gb(weights)} for the weights, their gradients "
                        f"and Adam's two moments, {gb(activations)} for a batch), but {gb(available)} is free "
                        f"on {device.type}; lower {flag if weights >= activations else '--batch-size'}")


def adam(parameters, lr):
    """torch.optim.Adam, with its fused kernel where this build has one for the
    parameters' device (Adam refuses fused=True otherwise, and the plain one runs)."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(parameters, lr=lr)


def train_vae(model, train_x, test_x=None, config=None, *, progress=True, log=print, **overrides):
    """Train ``model`` in place as ``config`` says (a VAEConfig, by default VAEConfig();
    keyword ``overrides`` such as epochs=2 replace its fields) and return its history:
    lists with one entry per epoch of ``train_loss``, with ``test_x`` ``test_loss`` =
    ``test_recon`` + ``test_kl`` (see evaluate, seeded with the config's seed), and
    ``seconds`` and ``threads`` (torch's thread count).

    Each step is the assignment's: recon_x, mu, logvar = model(x), then
    loss_function (through vae_loss), backward() and an Adam step. The batches are
    slices of a per-epoch shuffled copy of ``train_x`` (a generator seeded with
    ``seed``); the eps come from torch's generator, seeded here with ``seed + 1``.
    Each train loss is the epoch's summed loss divided by the number of training
    images (the assignment divided by len(loader) * batch_size = 60032 instead).
    A non-finite epoch loss stops training with a UserError.
    """
    from tqdm import tqdm

    config = dataclasses.replace(config or VAEConfig(), **overrides)
    device = next(model.parameters()).device
    optimizer = adam(model.parameters(), config.lr)
    shuffler = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed + 1)
    train_x = train_x.to(device)
    n, batch_size = len(train_x), config.batch_size
    steps = math.ceil(n / batch_size)
    history = {key: [] for key in (*HISTORY_KEYS, "seconds", "threads")}
    model.train()
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        shuffled = train_x[torch.randperm(n, generator=shuffler).to(device)]
        # Summed on the device and read once per epoch: a per-step .item() would
        # force a synchronization on a GPU.
        total = torch.zeros((), dtype=torch.float64, device=device)
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                   disable=None if progress else True)
        for step in range(steps):
            x = shuffled[step * batch_size:(step + 1) * batch_size]
            recon_x, mu, logvar = model(x)
            try:
                loss = vae_loss(recon_x, x, mu, logvar, config.likelihood)
            except RuntimeError:   # binary_cross_entropy refuses NaN probabilities
                if torch.isfinite(recon_x).all():
                    raise
                raise UserError(f"loss became non-finite at epoch {epoch}; lower --lr") from None
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach()
            if not bar.disable and (step + 1) % 50 == 0:
                bar.update(50)
        bar.close()
        history["seconds"].append(time.perf_counter() - start)
        history["threads"].append(torch.get_num_threads())
        history["train_loss"].append(total.item() / n)
        if test_x is not None:
            recon, kl = evaluate(model, test_x, likelihood=config.likelihood, seed=config.seed)
            history["test_recon"].append(recon)
            history["test_kl"].append(kl)
            history["test_loss"].append(recon + kl)
        last = [history[key][-1] for key in ("train_loss", "test_loss") if history[key]]
        if not all(map(math.isfinite, last)):
            raise UserError(f"loss became non-finite at epoch {epoch}; lower --lr")
        if log is not None:
            log(epoch_line(epoch, config.epochs, history))
    return history


def epoch_line(epoch, epochs, history, label=None):
    """One log line per epoch: the train (and test) loss, then the epoch's time and threads."""
    line = f"epoch {epoch:2d}/{epochs}  " + (f"{label}: " if label else "")
    line += f"train loss {history['train_loss'][epoch - 1]:8.3f}"
    if history["test_loss"]:
        line += f"  test loss {history['test_loss'][epoch - 1]:8.3f}"
    threads = history["threads"][epoch - 1]
    return line + f"  {history['seconds'][epoch - 1]:5.2f} s, {threads} thread{'s' if threads > 1 else ''}"


def train_model(config, train_x, test_x, *, log=print, progress=True):
    """(model, history, run): a VAE(config.z_dim) initialised with torch seeded by the
    config's seed and trained by train_vae on torch's threads (``config.threads`` sets
    them); ``run`` says what the run was (n_train, n_test, device, threads, epoch
    threads, seconds). What `vae.py` trains, and `sweep_vae.py` once per z_dim."""
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # the init
    model = VAE(config.z_dim).to(device)
    start = time.perf_counter()
    history = train_vae(model, train_x, test_x.to(device), config, log=log, progress=progress)
    seconds = time.perf_counter() - start
    run = {"n_train": len(train_x), "n_test": len(test_x), "device": str(device),
           "threads": torch.get_num_threads(), "epoch_threads": history["threads"], "seconds": seconds}
    return model, history, run


# --------------------------------------------------------------- checkpoint

def save_checkpoint(path, model, *, config, history, run):
    """vae.pt: the state_dict, the VAEConfig (as a dict), the per-epoch history and
    ``run`` (what the run was: n_train, n_test, device, threads allowed, threads per
    epoch, seconds)."""
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


def read_torch_file(path, target="vae"):
    """torch.load(path) of tensors and plain containers only, or a UserError saying why not."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; run `make {target}` first")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a directory, not a file")
    try:
        with warnings.catch_warnings():  # a damaged file can make torch warn before it fails
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Unsupported global" in str(exc):   # weights_only refused a pickled Python object
            raise UserError(f"checkpoint {path} holds pickled Python objects, not only tensors (a whole "
                            "model saved with torch.save(model)?); save model.state_dict() instead") from None
        raise UserError(f"cannot read checkpoint {path}: not a torch file, or damaged "
                        f"({type(exc).__name__}); rerun `make {target}`") from None


def _some(names, count=4):
    names = list(names)
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def check_state_dict(state, path):
    """The z_dim of a state_dict of this VAE, or a UserError naming what does not fit."""
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise UserError(f"{path} is neither a vae.py checkpoint (no 'format' key) nor a state_dict "
                        f"(entries that are not named tensors: {_some(bad)})")
    mu = state.get("encoder.fc2_mu.weight")
    if mu is None or mu.dim() != 2 or mu.shape[0] < 1:
        raise UserError(f"{path} is not a state_dict of the assignment's VAE: no 2-D "
                        f"'encoder.fc2_mu.weight' (it has {_some(state) or 'no keys'})")
    z_dim = mu.shape[0]
    expected = {k: tuple(v.shape) for k, v in VAE(z_dim).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {_some(missing)}"] if missing else []) + \
                ([f"unexpected {_some(unexpected)}"] if unexpected else [])
        raise UserError(f"{path} does not fit the assignment's VAE: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)}, expected {shape}" for k, shape in expected.items()
             if tuple(state[k].shape) != shape]
    if wrong:
        raise UserError(f"{path} does not fit a VAE with z_dim {z_dim} (hidden {HIDDEN}): {_some(wrong, 2)}")
    not_float = [k for k in expected if not state[k].is_floating_point()]
    if not_float:
        raise UserError(f"{path}: {_some(not_float)} do not hold floating-point weights")
    return z_dim


def check_checkpoint(ckpt, path, target="vae"):
    """The checkpoint's VAEConfig, once its format and required keys are checked."""
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r} "
                        f"(written by another version of vae.py?); rerun `make {target}`")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks {_some(missing)}; rerun `make {target}`")
    try:
        config = VAEConfig.from_dict(ckpt["config"])
    except ValueError as exc:
        raise UserError(f"checkpoint {path}: {exc}; rerun `make {target}`") from None
    for key in HISTORY_KEYS:
        values = ckpt[key]
        if not (isinstance(values, list) and all(isinstance(v, (int, float)) for v in values)):
            raise UserError(f"checkpoint {path}: {key!r} is not a list of numbers; rerun `make {target}`")
        if not all(map(math.isfinite, values)):
            raise UserError(f"checkpoint {path}: {key!r} holds NaN or infinite losses; rerun `make {target}`")
    if not isinstance(ckpt["model"], dict):
        raise UserError(f"checkpoint {path}: 'model' is not a state_dict; rerun `make {target}`")
    return config


def load_checkpoint(path, z_dim=None, target="vae"):
    """(VAE on the CPU, checkpoint dict or None for a bare state_dict).

    Reads vae.py's own checkpoints, and the bare ``model.state_dict()`` that the
    assignment's notebook saves (z_dim from the shape of encoder.fc2_mu.weight;
    no history). Anything else, NaN weights included, is a one-line UserError that names
    what is wrong and ``target``, the Make target that rebuilds the file.
    """
    obj = read_torch_file(path, target)
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a vae.py checkpoint "
                        "or a state_dict")
    ckpt = obj if "format" in obj else None
    if ckpt is not None:
        config = check_checkpoint(ckpt, path, target)
    state = ckpt["model"] if ckpt is not None else obj
    weights_z = check_state_dict(state, path)
    if ckpt is not None and config.z_dim != weights_z:
        raise UserError(f"checkpoint {path} says z_dim {config.z_dim}, but its weights have z_dim "
                        f"{weights_z}; rerun `make {target}`")
    if z_dim is not None and z_dim != weights_z:
        raise UserError(f"checkpoint {path} has z_dim {weights_z}, but --z-dim {z_dim} was asked for "
                        f"(drop --z-dim or retrain with `make {target}`)")
    bad = first_non_finite(state)
    if bad is not None:   # checked before any figure: NaN weights would draw blank or fail late
        raise UserError(f"checkpoint {path}: {bad} holds NaN or infinite weights (a diverged or damaged "
                        f"run); rerun `make {target}`")
    model = VAE(weights_z)
    model.load_state_dict(state)
    model.eval()
    return model, ckpt


# ------------------------------------------------------------------ figures

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


def figure_paths(figures_dir):
    return [os.path.join(figures_dir, name) for name in FIGURE_NAMES]


@contextlib.contextmanager
def one_thread():
    """Run a block on one CPU thread: the same float rounding, hence the same pixels,
    whatever --threads the training had (the figures' matmuls are small anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def render_figures(model, test_x, test_y, figures_dir, *, seed, history=None, title="VAE"):
    """Every figure of FIGURE_NAMES, in that order, from a trained model.

    Returns [(path, note)]: note says why a placeholder was drawn instead of the
    figure (no history for the loss plot, one digit class for interpolation),
    None when the figure is real. Nothing here trains or samples the data.
    """
    loss, reconstructions, samples, latent, interpolation = figure_paths(figures_dir)
    model = model.cpu().eval()
    notes = {}
    with one_thread():
        if history is None:
            notes[loss] = "no training history: the checkpoint is a bare state_dict"
            vf.placeholder(loss, title, notes[loss])
        else:
            vf.plot_loss(history, title, loss)
        mu, _ = model.encoder(test_x)
        # Reconstructions from the posterior mean, so that re-rendering gives the same picture.
        originals = test_x[:8]
        vf.save_grid(torch.cat([originals, model.decoder(mu[:8])]), reconstructions, nrow=len(originals))
        vf.save_grid(generate_samples(model, 64, seed=seed), samples, nrow=8)
        vf.plot_latent(mu, test_y, latent)
        steps = torch.linspace(0, 1, 10).unsqueeze(1)
        rows = [model.decoder(mu[a] + steps * (mu[b] - mu[a])) for a, b in interpolation_pairs(test_y)]
        if rows:
            vf.save_grid(torch.cat(rows), interpolation, nrow=10)
        else:
            notes[interpolation] = (f"no interpolation: the {len(test_y)} test image(s) hold only one "
                                    "digit class (raise --limit)")
            vf.placeholder(interpolation, "interpolation between test digits", notes[interpolation])
    return [(path, notes.get(path)) for path in figure_paths(figures_dir)]


def report_figures(written):
    for path, note in written:
        print(f"wrote {path}" + (f" (placeholder: {note})" if note else ""))


# ---------------------------------------------------------------------- CLI

DEFAULTS = VAEConfig()


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="artifacts", help="where vae.pt and vae_metrics.json go (OUT)")
    p.add_argument("--figures-dir", default="figures", help="where the five vae_*.png go (FIGURES)")
    p.add_argument("--plot-only", action="store_true",
                   help="re-render the figures from a checkpoint without training (needs the MNIST "
                        "test split)")
    p.add_argument("--checkpoint", default=None,
                   help="with --plot-only: the checkpoint to render, vae.py's or a bare state_dict "
                        "of the assignment's VAE (default: OUT/vae.pt)")
    p.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs, help="passes over the training set")
    p.add_argument("--z-dim", type=positive_int, default=None,
                   help=f"latent size (default: {DEFAULTS.z_dim} when training, the checkpoint's with --plot-only)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, help="images per Adam step")
    p.add_argument("--lr", type=positive_float, default=DEFAULTS.lr, help="Adam learning rate")
    add_common_args(
        p, "data_root", "device", "seed", "limit",
        data_root=dict(default=None, help=f"torchvision MNIST root (DATA); default: {DEFAULTS.data_root!r}, or "
                                          "with --plot-only the checkpoint's"),
        device=dict(default=DEFAULTS.device),
        seed=dict(default=DEFAULTS.seed, help="seeds the init, the shuffles, eps and the sample grid (with "
                                              "--plot-only: the sample grid of a bare state_dict)"),
        limit=dict(help="use only the first N images of each split (default: all; with --plot-only "
                        "the checkpoint's)"))
    p.add_argument("--likelihood", choices=LIKELIHOODS, default=DEFAULTS.likelihood,
                   help="bernoulli = the assignment's BCE; continuous-bernoulli adds its log-normalizer")
    p.add_argument("--threads", type=positive_int, default=DEFAULTS.threads,
                   help="CPU threads torch trains on (torch.set_num_threads; default: torch's own count)")
    args = p.parse_args(argv)
    if args.checkpoint is not None and not args.plot_only:
        p.error("--checkpoint is read only with --plot-only (training writes OUT/vae.pt)")
    return args


def load_splits(data_root, limit):
    train_x, _ = preload(load_mnist(data_root, train=True), limit)
    test_x, test_y = preload(load_mnist(data_root, train=False), limit)
    return train_x, test_x, test_y


def plot_only(args):
    path = args.checkpoint or os.path.join(args.out_dir, CHECKPOINT_NAME)
    check_can_create(args.figures_dir)
    model, ckpt = load_checkpoint(path, args.z_dim)
    if ckpt is None:     # a bare state_dict: no config, no history
        config = dataclasses.replace(DEFAULTS, z_dim=model.z_dim, seed=args.seed)
        history, title = None, f"VAE, z_dim {model.z_dim}, from a bare state_dict"
    else:
        config = VAEConfig.from_dict(ckpt["config"])
        history, title = ckpt, f"VAE, z_dim {config.z_dim}, {config.likelihood}"
    data_root = args.data_root or config.data_root
    limit = args.limit if args.limit is not None else config.limit
    test_x, test_y = preload(load_mnist(data_root, train=False), limit)
    plan_outputs(figure_paths(args.figures_dir))
    report_figures(render_figures(model, test_x, test_y, args.figures_dir, seed=config.seed,
                                  history=history, title=title))


def train(config, out_dir, figures_dir):
    """Train, then write vae_metrics.json, vae.pt (the Make target) and the figures, in
    that order: an interrupt leaves each complete or absent, and the figures' own
    Make rule re-renders whatever is missing from vae.pt."""
    device = resolve_device(config.device)
    check_can_create(out_dir)
    check_can_create(figures_dir)
    check_memory([config.z_dim], config.batch_size, config.limit, device)
    train_x, test_x, test_y = load_splits(config.data_root, config.limit)
    metrics, checkpoint = os.path.join(out_dir, METRICS_NAME), os.path.join(out_dir, CHECKPOINT_NAME)
    plan_outputs([metrics, checkpoint, *figure_paths(figures_dir)])
    print(f"VAE z_dim {config.z_dim}, {len(train_x)} train / {len(test_x)} test images, "
          f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr}, {config.likelihood}, "
          f"{device}, {config.threads or torch.get_num_threads()} threads")
    model, history, run = train_model(config, train_x, test_x)
    write_json(metrics, {**{key: history[key][-1] for key in HISTORY_KEYS},
                         **{f"{key}_per_epoch": history[key] for key in HISTORY_KEYS},
                         "epoch_seconds": [round(t, 3) for t in history["seconds"]],
                         **dict(run, seconds=round(run["seconds"], 3)), "epochs": config.epochs,
                         "z_dim": config.z_dim, "likelihood": config.likelihood,
                         "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
                         "versions": versions()})
    print(f"wrote {metrics}")
    save_checkpoint(checkpoint, model, config=config, history=history, run=run)
    print(f"wrote {checkpoint}")
    model, ckpt = load_checkpoint(checkpoint)  # render from exactly what --plot-only will see
    report_figures(render_figures(model, test_x.cpu(), test_y, figures_dir, seed=config.seed, history=ckpt,
                                  title=f"VAE, z_dim {config.z_dim}, {config.likelihood}"))


def config_from_args(args):
    """The run the command line asks for: VAEConfig's defaults, replaced by the flags given."""
    flags = dict(z_dim=args.z_dim, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                 likelihood=args.likelihood, data_root=args.data_root, limit=args.limit, device=args.device,
                 threads=args.threads)
    return dataclasses.replace(DEFAULTS, **{k: v for k, v in flags.items() if v is not None})


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        plot_only(args)
    else:
        train(config_from_args(args), args.out_dir, args.figures_dir)


if __name__ == "__main__":
    run_main(main)
