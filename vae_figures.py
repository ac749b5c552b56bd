"""Drawing the VAE figures of vae.py and sweep_vae.py: image grids, loss curves,
latent scatter plots, and a placeholder that says why a figure has no content.

Only drawing lives here (tensors in, PNG files out, written atomically); what to
draw is computed by the scripts from their trained models.
"""
import torch

from labio import atomic_path, pyplot, save_figure

DIGIT_COLOURS = dict(cmap="tab10", vmin=-0.5, vmax=9.5)


def save_grid(images, path, nrow):
    """Write images (N x 784 in [0, 1]) as one torchvision grid, atomically."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(images.view(-1, 1, 28, 28), tmp, nrow=nrow, padding=2, pad_value=1.0, format="png")


def placeholder(path, title, reason):
    """A figure that says why there is nothing to show, so that the file (a Make
    target) exists and no older picture is left in its place."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, transform=ax.transAxes)
    save_figure(fig, path, dpi=120)


def integer_epochs(*axes):
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")


def plot_loss(history, title, path):
    """Train and test loss per epoch, and beside it the test loss's two terms."""
    plt = pyplot()
    fig, (ax, terms) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = range(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], "o-", label="train")
    if history["test_loss"]:
        ax.plot(epochs, history["test_loss"], "s-", label="test")
        terms.plot(epochs, history["test_recon"], "s-", color="C2", label="reconstruction")
        kl_axis = terms.twinx()   # the KL term is ~25 nats beside ~80: its own scale
        kl_axis.plot(epochs, history["test_kl"], "^-", color="C3", label="KL")
        kl_axis.set_ylabel("KL term (nats)", color="C3")
        terms.legend(handles=terms.lines + kl_axis.lines, loc="center right")
    integer_epochs(ax, terms)
    terms.set_ylabel("reconstruction term (nats)", color="C2")
    terms.set_title("test loss = reconstruction + KL")
    ax.set_ylabel("loss per image (BCE + KL, nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=120)


def plot_latent(mu, labels, path):
    """Test-set posterior means projected on their first two principal components."""
    plt = pyplot()
    centered = mu - mu.mean(0)
    if mu.shape[1] >= 2:
        _, _, v = torch.linalg.svd(centered, full_matrices=False)
        # A component's sign is arbitrary (it may flip with the LAPACK path taken):
        # make its largest loading positive, so that re-rendering draws the same picture.
        v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
        xy = centered @ v[:2].T
        if xy.shape[1] < 2:   # a single test image has one component
            xy = torch.cat([xy, torch.zeros(len(xy), 2 - xy.shape[1])], 1)
        xlabel, ylabel = "PC 1", "PC 2"
    else:  # one latent dimension: plot it against the digit
        xy = torch.stack([centered[:, 0], labels.float()], 1)
        xlabel, ylabel = "mu", "digit"
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, s=2, alpha=0.6, **DIGIT_COLOURS)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"test-set mu, PCA of {mu.shape[1]}-D latent")
    save_figure(fig, path, dpi=120)
