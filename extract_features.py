"""Extract 2048-d ResNet-50 avgpool features of MNIST into .mat files.

The assignment's stage 1: every MNIST image goes through torchvision's
ResNet-50 without its last (fc) layer, and the features are saved as
``mnist_train.mat`` / ``mnist_test.mat`` with keys ``features`` (m x 2048,
float32) and ``labels`` (1 x m, values 0-9), loadable unchanged by
``scipy.io.loadmat``.

Preprocessing is the assignment's, Grayscale(3) -> ToTensor -> Normalize(0.5, 0.5)
at 28x28, but applied to whole batches of tensors instead of one PIL image at a
time. The network is the assignment's, ``nn.Sequential(*list(model.children())[:-1])``
in eval mode, with channels-last activations; nothing in it depends on timing,
so the same input gives the same features on every run.

    python extract_features.py --data-root data --out-dir artifacts
    python extract_features.py --weights none --limit 1000     # random init, no download
"""
import hashlib
import http.client
import os
import sys
import time
import urllib.error

import numpy as np
import scipy.io as sio
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import ResNet50_Weights, resnet50
from tqdm import tqdm

from lab.cli import ArgumentParser, UserError, add_common_args, positive_int, run_main
from lab.files import atomic_path, check_can_create, first_non_finite, plan_outputs
from lab.machine import cpu_model_and_flags, resolve_device, versions
from lab.mnist import load_mnist

FEATURE_DIM = 2048
PREPROCESSING = "Grayscale(3) -> ToTensor -> Normalize(mean=0.5, std=0.5)"
NAMED_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2")


# --------------------------------------------------------------------- data

def preprocess(images, image_size):
    """uint8 N x 28 x 28 -> float N x 3 x S x S, bit-equal to the per-image
    Grayscale(3) -> ToTensor -> Normalize(0.5, 0.5) chain (same ops, same order)."""
    x = images.unsqueeze(1).float().div_(255)   # ToTensor: uint8 -> [0, 1]
    x = x.sub_(0.5).div_(0.5)                   # Normalize(0.5, 0.5)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)
    return x.expand(-1, 3, -1, -1)              # Grayscale(3) copies the channel


# -------------------------------------------------------------------- model

# What a failed download raises: DNS, refused or reset connections, timeouts, HTTP errors.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def first_line(exc):
    """``Type: first line of the message``, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def weights_file_name(name):
    """File name torch.hub caches the named ImageNet weights under."""
    return os.path.basename(ResNet50_Weights[name].url)


def load_named_weights(spec):
    """torchvision's ResNet-50 with ImageNet weights ``spec``, from the torch hub
    cache or downloaded into it; each way this fails is named."""
    hub_file = os.path.join(torch.hub.get_dir(), "checkpoints", weights_file_name(spec))
    cached = os.path.isfile(hub_file)
    offline = (f"Offline: put the file at {hub_file}, or pass a state_dict with "
               "WEIGHTS=/path/to/resnet50.pth (--weights), or use WEIGHTS=none for random init")
    try:
        return resnet50(weights=ResNet50_Weights[spec])
    except NETWORK_ERRORS as exc:
        if not cached:
            raise UserError(f"could not download the {spec} ResNet-50 weights ({first_line(exc)}; "
                            f"no network?). {offline}") from None
        failure = exc
    except Exception as exc:            # torch.load / load_state_dict on a cached file, or else
        failure = exc
    if cached:
        raise UserError(f"the cached {spec} weights file {hub_file!r} is damaged or not ResNet-50's "
                        f"({first_line(failure)}); delete it and run again (it is downloaded anew when "
                        "online), or use WEIGHTS=none") from None
    raise UserError(f"could not get the {spec} ResNet-50 weights: {first_line(failure)}") from None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights_file(model, path):
    """Load a ResNet-50 state_dict .pth into ``model``, or say what does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read weights file {path!r}: not a PyTorch state_dict or corrupt "
                        f"({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path!r} holds a {type(state).__name__}, not a state_dict")
    # The fc layer is dropped anyway, so a backbone-only state_dict is accepted.
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise UserError(f"weights file {path!r} does not fit ResNet-50: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped keys (first: {first!r})")
    model.load_state_dict(state, strict=False)


def check_finite(model, spec):
    """``model``, once every weight of it is known to be finite."""
    bad = first_non_finite(model.state_dict())
    if bad is not None:
        raise UserError(f"weights {spec!r}: {bad!r} holds NaN or infinite values; the file is "
                        "damaged, replace it (or use WEIGHTS=none)")
    return model


def load_resnet50(spec, seed):
    """ResNet-50 with the requested weights; returns (model, provenance, kind).

    ``spec``: IMAGENET1K_V1 / IMAGENET1K_V2 (torchvision weights API, downloaded
    into the torch hub cache; kind "imagenet"), ``none`` (seeded random init;
    kind "random-init") or a .pth state_dict (kind "file", recorded with its
    sha256: nothing says it holds ImageNet weights).
    """
    if spec in NAMED_WEIGHTS:
        return check_finite(load_named_weights(spec), spec), spec, "imagenet"
    if os.path.isdir(spec):
        raise UserError(f"--weights {spec!r} is a directory, not a ResNet-50 state_dict .pth")
    if spec.lower() != "none" and not os.path.isfile(spec):
        what = "no such file" if os.sep in spec or spec.endswith(".pth") else "unknown weights name"
        raise UserError(f"--weights {spec!r}: {what} (expected {', '.join(NAMED_WEIGHTS)}, "
                        f"none, or the path of a ResNet-50 state_dict .pth)")
    torch.manual_seed(seed)
    model = resnet50(weights=None)
    if spec.lower() == "none":
        return model, "random-init (WEIGHTS=none)", "random-init"
    load_weights_file(model, spec)
    check_finite(model, spec)
    return model, f"file:{os.path.abspath(spec)} sha256:{sha256_of(spec)}", "file"


def build_extractor(model, device, dtype=torch.float32):
    """The assignment's extractor: ResNet-50 minus its fc layer, in eval mode, on
    ``device`` in ``dtype`` (``model``'s modules are converted in place).
    Channels-last suits the CPU's oneDNN convolutions and GPUs' tensor cores."""
    extractor = nn.Sequential(*list(model.children())[:-1]).eval()
    return extractor.to(device, dtype, memory_format=torch.channels_last)


def count_flops(extractor, image_size=28):
    """FLOPs of one image through ``extractor`` (multiply and add counted apart),
    as torch's FlopCounterMode counts them: convolutions and matmuls."""
    param = next(extractor.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        extractor(x)
    return counter.get_total_flops()


def has_bf16_units(device):
    """True/False where we can tell whether ``device`` computes bf16 natively, else None."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return None
    _, flags = cpu_model_and_flags()
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})    # "bf16": arm64's BF16 extension


# ------------------------------------------------------------------ extract

def compute_features(model, images, device, batch_size=256, image_size=28, progress=None):
    """Features (float32 N x 2048) of uint8 images N x 28 x 28, in batches, in the
    model's dtype (a bfloat16 extractor gets bfloat16 inputs)."""
    dtype = next(model.parameters()).dtype
    out = torch.empty(len(images), FEATURE_DIM, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            x = preprocess(batch.to(device), image_size).to(dtype, memory_format=torch.channels_last)
            out[start:start + len(batch)] = model(x).flatten(1).float().cpu()
            if progress is not None:
                progress.update(len(batch))
    return out


def extract(dataset, filename, model, device, *, batch_size=256, image_size=28, limit=None,
            metadata=None, desc=None):
    """The assignment's ``extract(dataset, filename)``: features of a whole MNIST
    split saved to ``filename`` (.mat, written atomically). Returns (seconds, n)."""
    images, labels = dataset.data, dataset.targets
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    start = time.perf_counter()
    with tqdm(total=len(images), unit="img", desc=desc or os.path.basename(filename),
              dynamic_ncols=True) as bar:
        features = compute_features(model, images, device, batch_size, image_size, bar)
    seconds = time.perf_counter() - start
    bad_rows = (~torch.isfinite(features).all(dim=1)).sum().item()
    if bad_rows:
        raise UserError(f"{bad_rows} of {len(features)} feature rows are NaN or infinite; "
                        f"{filename!r} was not written")
    record = {
        "features": features.numpy(),
        "labels": labels.numpy().astype(np.int64).reshape(1, -1),   # 1 x m, as the assignment reads it
        **(metadata or {}),
        "elapsed_seconds": seconds,
    }
    with atomic_path(filename) as tmp, open(tmp, "wb") as f:
        sio.savemat(f, record, do_compression=False)
    return seconds, len(images)


# --------------------------------------------------------------------- main

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "data_root")
    p.add_argument("--out-dir", default="artifacts", help="where mnist_{train,test}.mat go (OUT)")
    p.add_argument("--split", choices=("train", "test", "both"), default="both", help="which MNIST split(s)")
    p.add_argument("--weights", default="IMAGENET1K_V1",
                   help="IMAGENET1K_V1, IMAGENET1K_V2, none (random init) or a state_dict .pth")
    add_common_args(p, "limit")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (THREADS; default: torch's); 1 helps on a shared "
                        "machine whose other cores are busy, and gives the same features")
    add_common_args(p, "device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 is opt-in: faster only where the hardware has bf16 units")
    p.add_argument("--image-size", type=positive_int, default=28,
                   help="side of the network input; 28 as in the assignment, e.g. 224 resizes on the fly")
    add_common_args(p, "seed", seed={"help": "seed of the random init (--weights none)"})
    return p.parse_args(argv)


def warn(message):
    print(f"{os.path.basename(sys.argv[0])}: warning: {message}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    check_can_create(args.out_dir)              # fail before any heavy work, create nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    plan_outputs(os.path.join(args.out_dir, f"mnist_{s}.mat") for s in splits)
    datasets = {s: load_mnist(args.data_root, train=(s == "train")) for s in splits}
    model, provenance, kind = load_resnet50(args.weights, args.seed)

    dtype = getattr(torch, args.dtype)
    if dtype == torch.bfloat16 and has_bf16_units(device) is False:
        warn(f"this {device.type.upper()} has no bf16 units (avx512_bf16, amx_bf16): --dtype bfloat16 "
             "will be slower than float32 here")
    extractor = build_extractor(model, device, dtype)
    if kind == "random-init":
        print("WARNING: ResNet-50 has RANDOM-INIT weights (WEIGHTS=none): these are not "
              "ImageNet features, and nothing computed from them is the assignment's result.")
    flops = count_flops(extractor, args.image_size)
    v, threads = versions(), torch.get_num_threads()
    metadata = {"weights": provenance, "weights_kind": kind, "pretrained": int(kind == "imagenet"),
                "preprocessing": PREPROCESSING, "image_size": args.image_size, "dtype": args.dtype,
                "device": str(device), "cpu": cpu_model_and_flags()[0], "threads": threads,
                "batch_size": args.batch_size, "seed": args.seed,
                "torch_version": v["torch"], "torchvision_version": v["torchvision"]}
    print(f"ResNet-50 weights: {provenance}; device {device}, {args.dtype}, {args.image_size}x"
          f"{args.image_size}, {threads} thread{'s' if threads > 1 else ''}, batch {args.batch_size}, "
          f"{flops / 1e9:.3f} GFLOP/image")
    for split in splits:
        path = os.path.join(args.out_dir, f"mnist_{split}.mat")
        seconds, n = extract(datasets[split], path, extractor, device, batch_size=args.batch_size,
                             image_size=args.image_size, limit=args.limit, metadata=metadata, desc=split)
        print(f"{path}: {n} x {FEATURE_DIM} in {seconds:.1f} s, {n / seconds:.0f} img/s, "
              f"{flops * n / seconds / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    run_main(main)
