"""The assignment's stage 1: MNIST through torchvision's ResNet-50 without its last (fc) layer,
saved as ``mnist_train.mat`` / ``mnist_test.mat``: ``features`` (m x 2048 float32) and ``labels``
(1 x m, 0-9), as ``scipy.io.loadmat`` reads them, with the settings that made them.

    python extract_features.py --data-root data --out-dir artifacts [--weights none --limit 1000]
"""
import hashlib
import os
import sys
import time

import lab.cli  # noqa: F401  first: a Ctrl-C while torch loads waits for run_main
import numpy as np
import scipy.io as sio
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models
from tqdm import tqdm

from lab.cli import ArgumentParser, UserError, add_common_args, one_line, positive_int, run_main
from lab.files import atomic_path, check_can_create, first_non_finite, plan_outputs
from lab.machine import cpu_model_and_flags, resolve_device, versions
from lab.mnist import load_mnist


def extract(dataset, filename, model, device, *, batch_size=256, image_size=28, limit=None, metadata=()):
    """The assignment's ``extract(dataset, filename)``: the features of an MNIST split, saved
    to ``filename`` (.mat, written atomically) with ``metadata``; returns what was saved."""
    images, labels = dataset.data[:limit], dataset.targets[:limit]
    start = time.perf_counter()
    features = compute_features(model, images, device, batch_size, image_size, desc=os.path.basename(filename))
    bad_rows = (~torch.isfinite(features).all(dim=1)).sum().item()
    if bad_rows:
        raise UserError(f"{bad_rows} of {len(features)} feature rows are NaN or infinite; {filename!r} was not written")
    record = {"features": features.numpy(), "labels": labels.numpy().astype(np.int64).reshape(1, -1),  # 1 x m
              "feature_dim": features.shape[1], **dict(metadata), "elapsed_seconds": time.perf_counter() - start}
    with atomic_path(filename) as tmp, open(tmp, "wb") as f:
        sio.savemat(f, record, do_compression=False)
    return record


def compute_features(model, images, device, batch_size=256, image_size=28, desc=None):
    """Features (float32 N x D) of uint8 images N x 28 x 28, in batches; a progress bar ``desc`` if given."""
    dtype = next(model.parameters()).dtype
    batches = []
    with torch.inference_mode(), tqdm(total=len(images), unit="img", desc=desc, disable=desc is None) as bar:
        for start in range(0, len(images), batch_size):
            x = preprocess(images[start:start + batch_size].to(device), image_size)
            batches.append(model(x.to(dtype, memory_format=torch.channels_last)).float().cpu())
            bar.update(len(batches[-1]))
    return torch.cat(batches)


def preprocess(images, image_size=28):
    """uint8 N x 28 x 28 -> float N x 3 x S x S, bit-equal to the assignment's per-image
    Grayscale(3) -> ToTensor -> Normalize(0.5, 0.5) chain (same ops, same order)."""
    x = images.unsqueeze(1).float().div_(255)   # ToTensor: uint8 -> [0, 1]
    x = x.sub_(0.5).div_(0.5)                   # Normalize(0.5, 0.5)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x.expand(-1, 3, -1, -1)              # Grayscale(3) copies the channel


def feature_network():
    """The assignment's network, randomly initialized: torchvision's ResNet-50 without its last
    (fc) layer, so that it outputs the flattened avgpool. Swap the network here: the rest reads
    its name, weights names, output width and FLOPs from the model."""
    build = models.resnet50
    model = build()
    model.fc = nn.Identity()
    model.name, model.weights_enum = build.__name__, models.get_model_weights(build)
    return model.eval()


def build_extractor(model, device, dtype=torch.float32):
    """``model`` on ``device`` in ``dtype``, with channels-last activations, which suit
    the CPU's oneDNN convolutions and GPUs' tensor cores (converted in place)."""
    return model.eval().to(device, dtype, memory_format=torch.channels_last)


def count_flops(model, image_size=28):
    """FLOPs of one image through ``model``, as FlopCounterMode counts them (multiply and add apart)."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


def load_backbone(model, state):
    """Load a state_dict strictly, without the fc layer that feature_network dropped; refuse NaN weights."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model.load_state_dict(state)
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"{bad!r} holds NaN or infinite values")


def load_weights(model, spec):
    """Fill ``model`` with the weights ``spec``; returns (provenance, kind): ``none`` (the seeded random
    init, "random-init"), a state_dict .pth ("file", with its sha256: nothing says it holds ImageNet
    weights) or a name of the network's torchvision weights ("imagenet", from the torch hub cache)."""
    names = model.weights_enum.__members__
    if spec.lower() == "none":
        return "random-init (WEIGHTS=none)", "random-init"
    if spec not in names and (os.path.exists(spec) or os.sep in spec or spec.endswith(".pth")):
        try:
            load_backbone(model, torch.load(spec, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise UserError(f"--weights {spec!r} cannot be loaded into {model.name} ({one_line(exc)}); "
                            f"pass a {model.name} state_dict .pth, or use WEIGHTS=none") from None
        with open(spec, "rb") as f:
            return f"file:{os.path.abspath(spec)} sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}", "file"
    if spec not in names:
        raise UserError(f"--weights {spec!r}: unknown weights name (expected {', '.join(names)}, none, "
                        f"or the path of a {model.name} state_dict .pth)")
    weights = names[spec]
    hub_file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        load_backbone(model, weights.get_state_dict(progress=True, check_hash=True))   # as torchvision's builder
    except Exception as exc:
        advice = ("the cached file is damaged: delete it and run again (it is downloaded anew when online)"
                  if os.path.isfile(hub_file) else f"offline, put the file there, or pass a state_dict with "
                  f"WEIGHTS=/path/to/{model.name}.pth (--weights)")
        raise UserError(f"could not load the {weights.name} {model.name} weights from {hub_file} "
                        f"({one_line(exc)}); {advice}, or use WEIGHTS=none for random init") from None
    return weights.name, "imagenet"


def has_bf16_units(device):
    """True/False where we can tell whether ``device`` computes bf16 natively, else None."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_model_and_flags()[1] if device.type == "cpu" else set()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) if flags else None   # "bf16": arm64's extension


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "data_root")
    p.add_argument("--out-dir", default="artifacts", help="where mnist_{train,test}.mat go (OUT)")
    p.add_argument("--split", choices=("train", "test", "both"), default="both", help="which MNIST split(s)")
    p.add_argument("--weights", default="IMAGENET1K_V1", help="IMAGENET1K_V1, _V2, none (random init) or a .pth")
    add_common_args(p, "limit")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (THREADS; default: torch's); 1 helps on a busy machine, same features")
    add_common_args(p, "device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: fast on bf16 units")
    p.add_argument("--image-size", type=positive_int, default=28,
                   help="side of the network input; 28 as in the assignment, e.g. 224 resizes on the fly")
    add_common_args(p, "seed", seed={"help": "seed of the random init (--weights none)"})
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_can_create(args.out_dir)              # fail before any heavy work, create nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    paths = {s: os.path.join(args.out_dir, f"mnist_{s}.mat") for s in splits}
    plan_outputs(paths.values())
    datasets = {s: load_mnist(args.data_root, train=(s == "train")) for s in splits}
    torch.manual_seed(args.seed)
    model = feature_network()
    provenance, kind = load_weights(model, args.weights)
    if args.dtype == "bfloat16" and has_bf16_units(device) is False:
        print(f"{os.path.basename(sys.argv[0])}: warning: this {device.type.upper()} has no bf16 units "
              "(avx512_bf16, amx_bf16): --dtype bfloat16 will be slower than float32 here", file=sys.stderr)
    model = build_extractor(model, device, getattr(torch, args.dtype))
    if kind == "random-init":
        print(f"WARNING: {model.name} has RANDOM-INIT weights (WEIGHTS=none): these are not "
              "ImageNet features, and nothing computed from them is the assignment's result.")
    gflops, threads = count_flops(model, args.image_size) / 1e9, torch.get_num_threads()
    metadata = {**{k: v for k, v in vars(args).items() if v is not None}, "network": model.name,
                "gflops_per_image": gflops, "weights": provenance, "weights_kind": kind,
                "pretrained": int(kind == "imagenet"), "device": str(device), "threads": threads,
                "preprocessing": "Grayscale(3) -> ToTensor -> Normalize(mean=0.5, std=0.5)",
                "cpu": cpu_model_and_flags()[0], **{f"{k}_version": v for k, v in versions().items()}}
    print(f"{model.name} weights: {provenance}; {device}, {args.dtype}, {args.image_size}x{args.image_size}, "
          f"{threads} thread(s), batch {args.batch_size}, {gflops:.3f} GFLOP/image")
    for split, path in paths.items():
        record = extract(datasets[split], path, model, device, batch_size=args.batch_size,
                         image_size=args.image_size, limit=args.limit, metadata=metadata)
        (n, dim), seconds = record["features"].shape, record["elapsed_seconds"]
        print(f"{path}: {n} x {dim} {model.name} features in {seconds:.1f} s, {n / seconds:.0f} img/s, "
              f"{gflops * n / seconds:.1f} GFLOP/s")


if __name__ == "__main__":
    run_main(main)
