"""`make bench`: the lab's speed, as ratios against reference implementations
measured in the same run on this machine (never absolute times in tests).

    python bench.py --data-root ../shared/data            # every section
    python bench.py --only features
"""
import os
import sys
import time

from labio import ArgumentParser, run_main

HERE = os.path.dirname(os.path.abspath(__file__))


def row(benchmark, ours, reference, ratio, target, ok, note=""):
    return {"benchmark": benchmark, "ours": ours, "reference": reference, "ratio": ratio,
            "target": target, "ok": bool(ok), "note": note}


def mnist_images(data_root, n):
    """The first n real MNIST test images, or random digits-shaped noise without them
    (speed does not depend on pixel values)."""
    import torch
    from torchvision import datasets

    try:
        return datasets.MNIST(data_root, train=False, download=False).data[:n], "real MNIST"
    except RuntimeError:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen), "random pixels"


def matmul_peak_gflops(n=4096, repeats=5):
    """The machine's fp32 matmul peak right now: the best of a few large torch.mm."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def per_image_loop(model, images):
    """The assignment's extraction: one PIL image at a time through the transforms."""
    import torch
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([transforms.Grayscale(num_output_channels=3), transforms.ToTensor(),
                                    transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    extractor = torch.nn.Sequential(*list(model.children())[:-1]).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for img in images:
            extractor(transform(Image.fromarray(img.numpy(), mode="L")).unsqueeze(0)).squeeze()
    return len(images) / (time.perf_counter() - start)


def batched_rate(model, images, dtype):
    import torch

    import extract_features as ef

    device = torch.device("cpu")
    ef.compute_features(model, images[:256], device, dtype=dtype)          # warm-up
    start = time.perf_counter()
    ef.compute_features(model, images, device, dtype=dtype)
    return len(images) / (time.perf_counter() - start)


def bench_features(data_root, n_loop=300, n_batched=4096):
    import copy

    import torch
    from torchvision.models import resnet50

    import extract_features as ef

    images, source = mnist_images(data_root, max(n_loop, n_batched))
    torch.manual_seed(0)
    plain = resnet50(weights=None).eval()    # speed does not depend on the weight values
    ours = ef.build_extractor(copy.deepcopy(plain), torch.device("cpu"))
    flops = ef.count_flops(ours, 28)
    peak = matmul_peak_gflops()
    loop = per_image_loop(plain, images[:n_loop])
    fp32 = batched_rate(ours, images[:n_batched], "float32")
    bf16 = batched_rate(ours, images[:n_batched // 4], "bfloat16")
    achieved = fp32 * flops / 1e9
    note = f"ResNet-50 random init, 28x28, {source}, {torch.get_num_threads()} threads"
    return [
        row("features fp32 vs assignment per-image loop", f"{fp32:.0f} img/s", f"{loop:.0f} img/s",
            fp32 / loop, ">= 10x", fp32 / loop >= 10, f"{note}; loop over {n_loop} images"),
        row("features fp32 GFLOP/s vs fp32 matmul peak", f"{achieved:.0f} GFLOP/s",
            f"{peak:.0f} GFLOP/s (4096^2 torch.mm)", achieved / peak, ">= 0.8", achieved / peak >= 0.8,
            f"{flops / 1e9:.3f} GFLOP/image"),
        row("features bf16 vs fp32 (opt-in --dtype bfloat16)", f"{bf16:.0f} img/s", f"{fp32:.0f} img/s",
            bf16 / fp32, ">= 1.6x", bf16 / fp32 >= 1.6, "needs bf16 hardware units (AVX512-BF16/AMX, GPUs)"),
    ]


SECTIONS = {"features": bench_features}


def print_table(rows):
    header = ("benchmark", "ours", "reference", "ratio", "target", "ok")
    cells = [[r["benchmark"], r["ours"], r["reference"], f"{r['ratio']:.2f}", r["target"],
              "yes" if r["ok"] else "NO"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(fmt.format(*c))
    for r in rows:
        if r["note"]:
            print(f"  {r['benchmark']}: {r['note']}")


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="data", help="torchvision MNIST root (DATA)")
    p.add_argument("--only", choices=sorted(SECTIONS), action="append",
                   help="run only this section (repeatable); default: all")
    args = p.parse_args()
    rows = []
    for name in args.only or SECTIONS:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows += SECTIONS[name](args.data_root)
    print_table(rows)


if __name__ == "__main__":
    run_main(main)
