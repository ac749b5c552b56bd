"""Drawing the VAE figures of vae.py and sweep_vae.py: tensors in, PNG files out (atomically), a line each."""
import torch
from torchvision.utils import make_grid, save_image

from lab.files import atomic_path
from lab.plots import pyplot, save_figure


def save(fig, path, note=""):
    """Save a figure and say so: 'wrote PATH', with why it is a placeholder if it is."""
    save_figure(fig, path)
    print(f"wrote {path}{note}")


def save_grid(images, path, nrow):
    """Write images (N x 784 in [0, 1]) as one torchvision grid."""
    with atomic_path(path) as tmp:
        save_image(images.view(-1, 1, 28, 28), tmp, nrow=nrow, padding=2, pad_value=1.0, format="png")
    print(f"wrote {path}")


def placeholder(path, title, reason):
    """A figure that says why there is nothing to show: the file (a Make target) exists, no older one stays."""
    fig, ax = pyplot().subplots(figsize=(6, 2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, transform=ax.transAxes)
    save(fig, path, f" (placeholder: {reason})")


def plot_loss(history, title, path):
    """Train and test loss per epoch; beside them the test BCE and KL, each on its own (loss_function weighs them)."""
    fig, (ax, terms) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    epochs = range(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], "o-", label="train")
    ax.plot(epochs, history["test_loss"], "s-", label="test")
    terms.plot(epochs, history["test_recon"], "s-", color="C2", label="reconstruction (BCE)")
    kl_axis = terms.twinx()   # the KL term is ~25 nats beside ~80: its own scale
    kl_axis.plot(epochs, history["test_kl"], "^-", color="C3", label="KL")
    kl_axis.set_ylabel("KL term (nats)", color="C3")
    terms.legend(handles=terms.lines + kl_axis.lines, loc="center right")
    terms.set_ylabel("BCE term (nats)", color="C2")
    terms.set_title("the test loss's two terms")
    for axes in (ax, terms):
        axes.locator_params(axis="x", integer=True)
        axes.set_xlabel("epoch")
    ax.set(ylabel="loss_function per image (nats)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def scatter_digits(xy, labels, path, *, xlabel, ylabel, title):
    """Points coloured by digit, with a colour bar."""
    fig, ax = pyplot().subplots(figsize=(6, 5))
    xy, labels = torch.as_tensor(xy).numpy(), torch.as_tensor(labels).numpy()   # matplotlib wants numpy
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, s=2, alpha=0.6, cmap="tab10", vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    save(fig, path)


def plot_latent(mu, labels, path):
    """Test-set posterior means projected on their first two principal components."""
    centered = mu - mu.mean(0)
    if mu.shape[1] >= 2:
        _, _, v = torch.linalg.svd(centered, full_matrices=False)
        # A component's sign is arbitrary (LAPACK's path): its largest loading positive draws the same picture.
        v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
        xy = torch.nn.functional.pad(centered @ v[:2].T, (0, max(0, 2 - len(v))))   # one image: one component
        axes = dict(xlabel="PC 1", ylabel="PC 2")
    else:  # one latent dimension: plot it against the digit
        xy = torch.stack([centered[:, 0], labels.float()], 1)
        axes = dict(xlabel="mu", ylabel="digit")
    scatter_digits(xy, labels, path, title=f"test-set mu, PCA of {mu.shape[1]}-D latent", **axes)


def show_grid(images, nrow, padding, size):
    """A figure showing images (N x 784) as one grid of ``nrow`` columns, and its axes."""
    fig, ax = pyplot().subplots(figsize=size)
    ax.imshow(make_grid(images.view(-1, 1, 28, 28), nrow=nrow, padding=padding, pad_value=1.0)[0].numpy(),
              cmap="gray", vmin=0, vmax=1)
    return fig, ax


def plot_image_rows(rows, labels, path, title):
    """Rows of 28x28 images (each row N x 784), one label per row on the left."""
    fig, ax = show_grid(torch.cat(rows), len(rows[0]), 2, (1 + 0.55 * len(rows[0]), 0.6 + 0.55 * len(rows)))
    ax.set_yticks([2 + 30 * i + 14 for i in range(len(rows))], labels)
    ax.set_xticks([])
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    ax.set_title(title)
    save(fig, path)


def plot_manifold(images, quantiles, path):
    """A lattice of decoded images, column j z1 = q[j], row i z2 = q[-1 - i], as Kingma & Welling (2014), fig. 4."""
    n = len(quantiles)
    fig, ax = show_grid(images, n, 0, (7.5, 7.5))
    ticks = list(range(0, n, max(1, n // 5))) + [n - 1]
    ax.set_xticks([28 * j + 14 for j in ticks], [f"{quantiles[j]:.2f}" for j in ticks])
    ax.set_yticks([28 * i + 14 for i in ticks], [f"{quantiles[n - 1 - i]:.2f}" for i in ticks])
    ax.set(xlabel="z1 (standard-normal quantiles)", ylabel="z2",
           title=f"decoder of the z_dim-2 VAE on a {n}x{n} lattice of N(0, 1) quantiles")
    save(fig, path)


def plot_sweep_losses(runs, path, *, subtitle):
    """Final test loss and its two terms against z_dim; beside it, test loss per epoch."""
    fig, (ax, curves) = pyplot().subplots(1, 2, figsize=(10, 4))
    z_dims = [run["z_dim"] for run in runs]
    for key, style, label in (("test_loss", "o-", "test loss"), ("test_recon", "s-", "reconstruction term (BCE)"),
                              ("test_kl", "^-", "KL term")):
        ax.plot(z_dims, [run[key][-1] for run in runs], style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(z_dims, [str(z) for z in z_dims])
    ax.minorticks_off()
    ax.set(xlabel="z_dim", ylabel="nats per test image (final epoch)", title="test loss and its two terms")
    for run in runs:
        curves.plot(range(1, len(run["test_loss"]) + 1), run["test_loss"], label=f"z_dim {run['z_dim']}")
    curves.set(xlabel="epoch", ylabel="test loss per image (nats)", title=subtitle)
    for axes in (ax, curves):
        axes.grid(alpha=0.3)
        axes.legend()
    save(fig, path)
