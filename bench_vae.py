"""VAE training speed: the assignment's loop against vae.py's, side by side in one run.

Both train the same model (same seed, hence the same init) for the same number
of epochs on the real MNIST training set, on the CPU, and both report the
per-epoch loss divided by the number of training images, so that the losses
can be compared as well as the times.

    python bench_vae.py --data-root data
"""
import argparse
import time

import torch

import vae


def reference_epochs(data_root, epochs, seed):
    """The assignment's loop: DataLoader over PIL images with ToTensor, batch 64,
    2 threads, probabilities + binary_cross_entropy, a .item() every step."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.set_num_threads(2)
    dataset = datasets.MNIST(data_root, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    torch.manual_seed(seed)
    model = vae.VAE(20)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses, seconds = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        train_loss = 0.0
        for data, _ in loader:
            optimizer.zero_grad()
            recon, mu, logvar = model(data)
            loss = vae.loss_function(recon, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(train_loss / len(dataset))
    return losses, seconds


def ours_epochs(data_root, epochs, seed):
    """vae.py's loop as `python vae.py --device cpu` runs it (1 thread, preloaded tensor)."""
    torch.set_num_threads(1)
    train_x, _ = vae.preload(vae.load_mnist(data_root, train=True))
    torch.manual_seed(seed)
    model = vae.VAE(20)
    seconds = []
    start = time.perf_counter()

    def log(line):  # called once per epoch, after the epoch's loss was read back
        nonlocal start
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()

    losses, _ = vae.train_vae(model, train_x, epochs=epochs, seed=seed, progress=False, log=log)
    return losses, seconds


def bench_vae(data_root, epochs=2, seed=0):
    threads = torch.get_num_threads()
    try:
        ref_losses, ref_seconds = reference_epochs(data_root, epochs, seed)
        our_losses, our_seconds = ours_epochs(data_root, epochs, seed)
    finally:
        torch.set_num_threads(threads)
    ref_s = sum(ref_seconds) / epochs
    our_s = sum(our_seconds) / epochs
    speedup = ref_s / our_s
    worst = max(abs(o - r) / r for o, r in zip(our_losses, ref_losses))
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    return [
        {"benchmark": f"VAE training epoch, fp32 CPU, batch 64 ({epochs} epochs each)",
         "ours": f"{our_s:.2f} s/epoch", "reference": f"{ref_s:.2f} s/epoch",
         "ratio": round(speedup, 2), "target": ">= 2x", "ok": speedup >= 2.0,
         "note": "assignment loop: DataLoader+ToTensor, 2 threads, per-step .item(); ours: preloaded "
                 "tensor, 1 thread, fused Adam, BCE from logits, one .item() per epoch"},
        {"benchmark": "VAE per-epoch train loss, ours vs assignment loop (same seed and init)",
         "ours": fmt(our_losses), "reference": fmt(ref_losses),
         "ratio": round(worst, 5), "target": "<= 1% relative", "ok": worst <= 0.01,
         "note": "loss per training image; the shuffles and eps draws differ, so agreement is statistical"},
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default="data", help="torchvision MNIST root holding the real MNIST")
    p.add_argument("--epochs", type=int, default=2, help="epochs per side")
    args = p.parse_args()
    for row in bench_vae(args.data_root, epochs=args.epochs):
        print(row)


if __name__ == "__main__":
    main()
