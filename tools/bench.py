"""`make bench`: every speed trick the lab keeps, against its plain path, as a ratio timed in this one run
(batching and channels-last in the extraction, logreg.py's own training, the VAE's preloaded tensors); each
must earn 1.15x. Pairs are timed in turn and keep their best time: on a shared VM
another tenant can slow any stretch of seconds. The tests never assert a time.

    python -m tools.bench --data-root ../shared/data --out-dir artifacts [--only vae]   # after make features
"""
import os
import subprocess
import sys
import tempfile
import time

import lab.cli  # noqa: F401  first: a Ctrl-C while torch loads waits for run_main
import numpy as np
import torch

import extract_features as ef
import vae
from lab.cli import ArgumentParser, UserError, run_main
from lab.machine import ISA_FLAGS, cpu_model_and_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout
TRICK = 1.15    # what a speed trick must gain over the plain path to stay
ROWS = []


def row(benchmark, ours, reference, ratio, target, note=""):   # target: the least ratio that passes; None: info
    ROWS.append((benchmark, ours, reference, f"{ratio:.3g}", f">= {target}x" if target else "(info)",
                 "" if target is None else "yes" if ratio >= target else "NO", note))


def best_in_turn(repeats, **timed):
    """{name: best seconds} of the callables in ``timed``, called in turn ``repeats`` times."""
    best = dict.fromkeys(timed, float("inf"))
    for _ in range(repeats):
        for name, run in timed.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def matmul_gflops(dtype=torch.float32, n=2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / best_in_turn(5, mm=lambda: torch.mm(a, b))["mm"] / 1e9


def machine():
    cpu, flags = cpu_model_and_flags()
    threads = torch.get_num_threads()
    fp32, bf16 = matmul_gflops(), matmul_gflops(torch.bfloat16)
    torch.set_num_threads(1)
    one = matmul_gflops()
    torch.set_num_threads(threads)
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, ISA {', '.join(f for f in ISA_FLAGS if f in flags) or 'baseline'}; "
          f"torch {torch.__version__}, {threads} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"matmul peak now (2048^2): fp32 {fp32:.0f} GFLOP/s ({fp32 / one:.2f}x one thread), bf16 {bf16:.0f} GFLOP/s")
    return fp32


# ----------------------------------------------------------------- features

def assignment_loop(model, images):
    """The assignment's extraction: one PIL image at a time through the transforms."""
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([transforms.Grayscale(3), transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    with torch.no_grad():
        for image in images:
            model(transform(Image.fromarray(image.numpy(), mode="L")).unsqueeze(0))


def bench_features(args, peak):
    images = vae.load_mnist(args.data_root, train=False).data[:2048]
    cpu = torch.device("cpu")
    model = ef.feature_network()   # speed does not depend on the weights' values
    flops = ef.count_flops(model)
    contiguous = model.eval()
    last = ef.build_extractor(ef.feature_network(), cpu)

    def batched(m, layout):
        with torch.inference_mode():
            for start in range(0, len(images), 256):
                m(ef.preprocess(images[start:start + 256]).contiguous(memory_format=layout))
    t = best_in_turn(2, loop=lambda: assignment_loop(contiguous, images[:256]),
                     ours=lambda: batched(last, torch.channels_last),
                     plain=lambda: batched(contiguous, torch.contiguous_format))
    rate, loop, plain = len(images) / t["ours"], 256 / t["loop"], len(images) / t["plain"]
    row("features: batched extraction vs the assignment's per-image loop", f"{rate:.0f} img/s", f"{loop:.0f} img/s",
        rate / loop, TRICK, f"{ef.feature_network().name}, 28x28, batch 256, {torch.get_num_threads()} threads")
    row("features: channels-last vs the default layout", f"{rate:.0f} img/s", f"{plain:.0f} img/s", rate / plain,
        TRICK, "the same batches and network")
    row("features: GFLOP/s vs the fp32 matmul peak", f"{rate * flops / 1e9:.0f} GFLOP/s", f"{peak:.0f} GFLOP/s",
        rate * flops / 1e9 / peak, None, f"{flops / 1e9:.3f} GFLOP/image (FlopCounterMode)")


# ------------------------------------------------------------------- logreg

def logreg_run(args, out, *flags):
    """(wall seconds, test accuracy per epoch, training seconds at each epoch's end) of one
    `logreg.py` process, as a user runs it."""
    command = [sys.executable, os.path.join(ROOT, "logreg.py"), "--no-progress", "--out-dir", out, "--figures-dir",
               out, "--train-mat", os.path.join(args.out_dir, "mnist_train.mat"), "--test-mat",
               os.path.join(args.out_dir, "mnist_test.mat"), *map(str, flags)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"logreg.py failed in the bench: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    seconds = time.perf_counter() - start
    with np.load(os.path.join(out, "logreg.npz")) as z:
        return seconds, z["test_acc"], z["epoch_seconds"]


def bench_logreg(args, peak, reference_epochs=100):
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, ours_acc, ours_t = logreg_run(args, tmp + "/ours")
        ref_s, ref_acc, ref_t = logreg_run(args, tmp + "/ref", "--reference", "--epochs", reference_epochs)
    reached = [t for acc, t in zip(ours_acc, ours_t) if acc >= ref_acc[-1]]
    row(f"logreg: time to mlr's {reference_epochs}-epoch test accuracy ({ref_acc[-1]:.4f})",
        f"{reached[0]:.2f} s" if reached else "never", f"{ref_t[-1]:.1f} s",
        ref_t[-1] / reached[0] if reached else 0.0, TRICK,
        f"training clocks; logreg.py's default training vs --reference; whole processes {ours_s:.1f} s and "
        f"{ref_s:.1f} s; ours ends at {ours_acc.max():.4f}")


# ---------------------------------------------------------------------- vae

def bench_vae(args, peak, epochs=2):
    """vae.py's epoch (preloaded tensors sliced per step) against the assignment's DataLoader loop: the same
    model, loss_function, step and Adam in both."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    train = datasets.MNIST(args.data_root, train=True, transform=transforms.ToTensor())
    train_x = vae.preload(train)[0]
    losses = {}

    def assignment():
        model = vae.VAE(20)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        total = 0.0
        for x, _ in DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            recon, mu, logvar = model(x)
            loss = vae.loss_function(recon, x, mu, logvar)
            loss.backward()
            total += loss.item()
            optimizer.step()
        losses["assignment"] = total / len(train)

    def ours():
        losses["ours"] = vae.train_vae(vae.VAE(20), train_x, epochs=1, progress=False, log=None)["train_loss"][-1]
    t = best_in_turn(epochs, ours=ours, assignment=assignment)
    row("VAE: vae.py's epoch vs the assignment's DataLoader loop", f"{t['ours']:.2f} s", f"{t['assignment']:.2f} s",
        t["assignment"] / t["ours"], TRICK, f"first-epoch loss {losses['ours']:.2f} vs {losses['assignment']:.2f}")


SECTIONS = {"features": bench_features, "logreg": bench_logreg, "vae": bench_vae}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="data", help="torchvision MNIST root (DATA)")
    p.add_argument("--out-dir", default="artifacts", help="where mnist_{train,test}.mat are (OUT; make features)")
    p.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only this section (repeatable)")
    args = p.parse_args(argv)
    peak = machine()
    for name in args.only or SECTIONS:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        SECTIONS[name](args, peak)
    header = ("benchmark", "ours", "reference", "ratio", "target", "ok")
    widths = [max(len(str(r[i])) for r in [header, *ROWS]) for i in range(6)]
    for r in [header, *ROWS]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    for r in ROWS:
        if r[6]:
            print(f"  {r[0]}: {r[6]}")


if __name__ == "__main__":
    run_main(main)
