"""Extract 2048-d ResNet-50 avgpool features of MNIST into .mat files.

The assignment's stage 1: every MNIST image goes through torchvision's
ResNet-50 without its last (fc) layer, and the features are saved as
``mnist_train.mat`` / ``mnist_test.mat`` with keys ``features`` (m x 2048,
float32) and ``labels`` (1 x m, values 0-9), loadable unchanged by
``scipy.io.loadmat``.

Preprocessing is the assignment's, Grayscale(3) -> ToTensor -> Normalize(0.5, 0.5)
at 28x28, but applied to whole batches of tensors instead of one PIL image at a
time, with batch-norm folded into the convolutions and channels-last memory.

    python extract_features.py --data-root data --out-dir artifacts
    python extract_features.py --weights none --limit 1000     # random init, no download
"""
import os
import time

import numpy as np
import scipy.io as sio
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import ResNet50_Weights, resnet50
from tqdm import tqdm

from labio import (ArgumentParser, UserError, add_common_args, atomic_path, check_can_create, load_mnist,
                   plan_outputs, positive_int, resolve_device, run_main, versions)

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

def weights_file_name(name):
    """File name torch.hub caches the named ImageNet weights under."""
    return os.path.basename(ResNet50_Weights[name].url)


def load_resnet50(spec, seed):
    """ResNet-50 with the requested weights; returns (model, provenance string).

    ``spec``: IMAGENET1K_V1 / IMAGENET1K_V2 (torchvision weights API, downloaded
    into the torch hub cache), ``none`` (seeded random init) or a .pth state_dict.
    """
    if spec in NAMED_WEIGHTS:
        try:
            return resnet50(weights=ResNet50_Weights[spec]), spec
        except Exception as exc:
            hub = os.path.join(torch.hub.get_dir(), "checkpoints", weights_file_name(spec))
            raise UserError(
                f"could not get the {spec} ResNet-50 weights ({type(exc).__name__}: no network?). "
                f"Offline: put the file at {hub}, or pass a state_dict with WEIGHTS=/path/to/resnet50.pth "
                f"(--weights), or use WEIGHTS=none for random init") from None
    torch.manual_seed(seed)
    model = resnet50(weights=None)
    if spec.lower() == "none":
        return model, "random-init (WEIGHTS=none)"
    if not os.path.isfile(spec):
        raise UserError(f"--weights {spec!r}: no such file (expected {', '.join(NAMED_WEIGHTS)}, "
                        f"none, or the path of a ResNet-50 state_dict .pth)")
    try:
        state = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read weights file {spec!r}: not a PyTorch state_dict or corrupt "
                        f"({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"weights file {spec!r} holds a {type(state).__name__}, not a state_dict")
    # The fc layer is dropped anyway, so a backbone-only state_dict is accepted.
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise UserError(f"weights file {spec!r} does not fit ResNet-50: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped keys (first: {first!r})")
    model.load_state_dict(state, strict=False)
    return model, f"file:{os.path.abspath(spec)}"


def fold_batchnorms(module):
    """Fold every eval-mode BatchNorm into the conv before it (exact up to rounding).

    In torchvision's ResNet each BatchNorm directly follows a conv in
    registration order (conv1/bn1, convK/bnK, downsample[0]/[1]).
    """
    previous_name, previous = None, None
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d):
            setattr(module, previous_name, fuse_conv_bn_eval(previous, child))
            setattr(module, name, nn.Identity())
        elif len(list(child.children())):
            fold_batchnorms(child)
        previous_name, previous = name, child
    return module


def probe(model, image_size, forward_hooks):
    """One zero image through ``model`` with {module: forward hook} attached."""
    handles = [m.register_forward_hook(h) for m, h in forward_hooks.items()]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()


def conv_map_sizes(model, image_size):
    """{name: ((h, w) in, (ho, wo) out)} of each Conv2d for one image_size^2 input."""
    sizes = {}

    def record(name):
        def hook(mod, inp, out):
            sizes[name] = (tuple(inp[0].shape[2:]), tuple(out.shape[2:]))   # returns None: output kept
        return hook

    probe(model, image_size, {m: record(name) for name, m in model.named_modules()
                              if isinstance(m, nn.Conv2d)})
    return sizes


class SmallMapConv(nn.Module):
    """An eval-mode conv that only ever sees h x w maps, as one GEMM over the
    taps that touch real pixels (exact up to rounding).

    At 28x28 input, layer3 and layer4 work on 2x2 and 1x1 maps where most taps
    of a padded 3x3 conv read zeros: the dense matrix of the linear map
    (h*w*Cin -> ho*wo*Cout, channels-last order) has 4/9 or 1/9 of the conv's
    nominal multiply-adds.
    """

    def __init__(self, conv, h, w):
        super().__init__()
        cin, weight = conv.in_channels, conv.weight.detach()
        # Row k of the matrix is the conv's response to the k-th unit input.
        basis = torch.eye(cin * h * w, dtype=weight.dtype, device=weight.device)
        basis = basis.reshape(-1, h, w, cin).permute(0, 3, 1, 2)
        response = F.conv2d(basis, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        self.in_hw, self.out_chw = (h, w), tuple(response.shape[1:])
        self.register_buffer("matrix", response.permute(0, 2, 3, 1).reshape(cin * h * w, -1).contiguous())
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(conv.out_channels)
        self.register_buffer("bias", bias.repeat(response.shape[2] * response.shape[3]))
        self.nominal_flops = 2 * weight[0].numel() * response[0].numel()

    def forward(self, x):
        if tuple(x.shape[2:]) != self.in_hw:
            raise ValueError(f"SmallMapConv built for {self.in_hw} maps got {tuple(x.shape[2:])}")
        n, (cout, ho, wo) = x.shape[0], self.out_chw
        y = torch.addmm(self.bias, x.permute(0, 2, 3, 1).reshape(n, -1), self.matrix)
        return y.view(n, ho, wo, cout).permute(0, 3, 1, 2)


def convs_on_small_maps_as_gemms(model, image_size):
    """Replace each conv whose dense map matrix is cheaper than the conv itself."""
    for name, ((h, w), (ho, wo)) in conv_map_sizes(model, image_size).items():
        conv = model.get_submodule(name)
        dense = conv.in_channels * h * w * conv.out_channels * ho * wo
        nominal = conv.weight[0].numel() * conv.out_channels * ho * wo
        if dense < nominal:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, SmallMapConv(conv, h, w))
    return model


def build_extractor(model, device, image_size=28):
    """ResNet-50 minus fc, BN folded, small-map convs as GEMMs, channels-last, for inference."""
    model.fc = nn.Identity()        # output = flattened 2048-d avgpool
    model.eval()
    fold_batchnorms(model)
    model.to(device=device, memory_format=torch.channels_last)
    return convs_on_small_maps_as_gemms(model, image_size)


def count_flops(model, image_size, nominal=True):
    """Floating-point operations (2 x multiply-adds) of one image through the convs,
    linears and small-map GEMMs. ``nominal`` counts every conv tap, as the usual
    ResNet-50 figures do; otherwise only the arithmetic actually executed."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += 2 * mod.weight[0].numel() * out.numel()
        elif isinstance(mod, nn.Linear):
            total[0] += 2 * mod.in_features * out.numel()
        else:
            total[0] += mod.nominal_flops if nominal else 2 * mod.matrix.numel()

    probe(model, image_size, {m: hook for m in model.modules()
                              if isinstance(m, (nn.Conv2d, nn.Linear)) or hasattr(m, "nominal_flops")})
    return total[0]


# ------------------------------------------------------------------ extract

def compute_features(model, images, device, batch_size=256, dtype="float32", image_size=28,
                     progress=None):
    """Features (float32 N x 2048) of uint8 images N x 28 x 28, in batches."""
    out = torch.empty(len(images), FEATURE_DIM, dtype=torch.float32)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=dtype == "bfloat16")
    with torch.inference_mode(), autocast:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            x = preprocess(batch.to(device), image_size).contiguous(memory_format=torch.channels_last)
            out[start:start + len(batch)] = model(x).float().cpu()
            if progress is not None:
                progress.update(len(batch))
    return out


def extract(dataset, filename, model, device, *, batch_size=256, dtype="float32",
            image_size=28, limit=None, metadata=None, desc=None):
    """The assignment's ``extract(dataset, filename)``: features of a whole MNIST
    split saved to ``filename`` (.mat, written atomically). Returns (seconds, n)."""
    images, labels = dataset.data, dataset.targets
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    start = time.perf_counter()
    with tqdm(total=len(images), unit="img", desc=desc or os.path.basename(filename),
              dynamic_ncols=True) as bar:
        features = compute_features(model, images, device, batch_size, dtype, image_size, bar)
    seconds = time.perf_counter() - start
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
    add_common_args(p, "device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 autocast is opt-in: faster where the hardware has bf16 units")
    p.add_argument("--image-size", type=positive_int, default=28,
                   help="side of the network input; 28 as in the assignment, e.g. 224 resizes on the fly")
    add_common_args(p, "seed", seed={"help": "seed of the random init (--weights none)"})
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_can_create(args.out_dir)              # fail before any heavy work, create nothing
    device = resolve_device(args.device)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    plan_outputs(os.path.join(args.out_dir, f"mnist_{s}.mat") for s in splits)
    datasets = {s: load_mnist(args.data_root, train=(s == "train")) for s in splits}

    model, provenance = load_resnet50(args.weights, args.seed)
    extractor = build_extractor(model, device, args.image_size)
    if provenance.startswith("random-init"):
        print("WARNING: ResNet-50 has RANDOM-INIT weights (WEIGHTS=none): these are not "
              "ImageNet features, and nothing computed from them is the assignment's result.")
    flops = count_flops(extractor, args.image_size)
    v = versions()
    metadata = {"weights": provenance, "pretrained": int(args.weights in NAMED_WEIGHTS
                                                         or provenance.startswith("file:")),
                "preprocessing": PREPROCESSING, "image_size": args.image_size, "dtype": args.dtype,
                "device": str(device), "seed": args.seed,
                "torch_version": v["torch"], "torchvision_version": v["torchvision"]}
    print(f"ResNet-50 weights: {provenance}; device {device}, {args.dtype}, {args.image_size}x"
          f"{args.image_size}, {torch.get_num_threads()} threads, {flops / 1e9:.3f} GFLOP/image nominal "
          f"({count_flops(extractor, args.image_size, nominal=False) / 1e9:.3f} executed)")
    for split in splits:
        path = os.path.join(args.out_dir, f"mnist_{split}.mat")
        seconds, n = extract(datasets[split], path, extractor, device, batch_size=args.batch_size,
                             dtype=args.dtype, image_size=args.image_size, limit=args.limit,
                             metadata=metadata, desc=split)
        print(f"{path}: {n} x {FEATURE_DIM} in {seconds:.1f} s, {n / seconds:.0f} img/s, "
              f"{flops * n / seconds / 1e9:.1f} GFLOP/s achieved (nominal FLOPs)")


if __name__ == "__main__":
    run_main(main)
