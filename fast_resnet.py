"""ResNet-50 minus its fc layer, rebuilt for fast exact inference on this machine.

Batch-norm is folded into the convolutions, activations stay channels-last, and
each convolution runs as whichever exact formulation is fastest *here*: when
the extractor is built, every formulation that applies to a convolution is
timed on a probe batch of the run's own size, and the fastest is kept (nothing
is cached, so another machine makes its own choice):

- ``onednn``: oneDNN with its weights packed once, ReLU and the residual add
  fused into the convolution (CPU builds with oneDNN only);
- ``aten``: torch's own ``conv2d`` (cuDNN, ...), then ReLU and the residual
  add as separate passes; only where ``onednn`` is not available, since on the
  CPU it runs the same oneDNN kernels, repacking the weights on every call;
- ``gemm``: a 1x1 convolution as one matrix product over channels-last rows
  (stride 2 as slicing): in that layout it is exactly a GEMM;
- ``smallmap``: a convolution on a map so small (2x2, 1x1 at 28x28 input) that
  most taps of its padded kernel read zeros, as one matrix product over the
  taps that touch real pixels.

All four compute the same function and differ only in rounding; the tests hold
every one of them to the reference features.
"""
import itertools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from labio import cpu_model_and_flags  # noqa: F401  (fast_resnet.cpu_model_and_flags stays importable)

KINDS = ("onednn", "aten", "gemm", "smallmap")     # also the order of preference on a tie
POSTS = ("none", "relu", "add-relu")               # what follows a conv in ResNet-50


# ------------------------------------------------------------- the machine

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


def onednn_available(device):
    return device.type == "cpu" and torch.backends.mkldnn.is_available() \
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


# ------------------------------------------------------------ formulations

class FoldedConv(nn.Module):
    """A batch-norm-folded convolution and what follows it in ResNet-50: nothing,
    a ReLU, or the residual add then a ReLU (``post``). Subclasses say how the
    convolution itself is computed."""

    kind = None

    def __init__(self, conv, post, in_hw, out_hw):
        super().__init__()
        assert post in POSTS
        self.post, self.in_hw, self.out_hw = post, tuple(in_hw), tuple(out_hw)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.dilation, self.groups = tuple(conv.dilation), conv.groups
        self.nominal_flops = 2 * conv.weight[0].numel() * conv.out_channels * out_hw[0] * out_hw[1]
        self.executed_flops = self.nominal_flops

    def finish(self, y, residual):
        if residual is not None:
            y = y.add_(residual)
        return y if self.post == "none" else y.relu_()

    def extra_repr(self):
        return f"{self.kind}, {self.in_hw} -> {self.out_hw}, then {self.post}"


class AtenConv(FoldedConv):
    kind = "aten"

    def __init__(self, conv, post, in_hw, out_hw, batch):
        super().__init__(conv, post, in_hw, out_hw)
        self.register_buffer("weight", conv.weight.detach().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", conv.bias.detach())

    def forward(self, x, residual=None):
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.finish(y, residual)


class OneDnnConv(FoldedConv):
    """oneDNN with pre-packed weights; ReLU and residual add run as fused post-ops.
    The residual tensor receives the output (it is not needed afterwards)."""

    kind = "onednn"

    def __init__(self, conv, post, in_hw, out_hw, batch):
        super().__init__(conv, post, in_hw, out_hw)
        weight = conv.weight.detach()
        # Packed for this input shape: oneDNN picks the weight layout its kernel wants.
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            [batch, weight.shape[1] * self.groups, *self.in_hw])
        self.register_buffer("bias", conv.bias.detach())
        self.geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)

    def forward(self, x, residual=None):
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.packed, self.bias, *self.geometry, "relu" if self.post == "relu" else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, self.packed, self.bias, *self.geometry, "add", None, "relu", [], "")


class GemmConv(FoldedConv):
    """A 1x1 convolution as rows (pixels, channels-last) x weight matrix."""

    kind = "gemm"

    def __init__(self, conv, post, in_hw, out_hw, batch):
        super().__init__(conv, post, in_hw, out_hw)
        weight = conv.weight.detach()
        self.register_buffer("matrix", weight.reshape(weight.shape[0], -1).t().contiguous())
        self.register_buffer("bias", conv.bias.detach())

    @staticmethod
    def applies(conv):
        return conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1 \
            and conv.dilation == (1, 1)

    def forward(self, x, residual=None):
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        n, c, h, w = x.shape
        y = torch.addmm(self.bias, x.permute(0, 2, 3, 1).reshape(-1, c), self.matrix)
        return self.finish(y.view(n, h, w, -1).permute(0, 3, 1, 2), residual)


class SmallMapConv(FoldedConv):
    """A convolution that only ever sees h x w maps, as one GEMM over the taps
    that touch real pixels.

    At 28x28 input, layer3 and layer4 work on 2x2 and 1x1 maps where most taps
    of a padded 3x3 conv read zeros: the dense matrix of the linear map
    (h*w*Cin -> ho*wo*Cout, channels-last order) has 4/9 or 1/9 of the conv's
    nominal multiply-adds.
    """

    kind = "smallmap"

    def __init__(self, conv, post, in_hw, out_hw, batch):
        super().__init__(conv, post, in_hw, out_hw)
        (h, w), (ho, wo) = self.in_hw, self.out_hw
        weight = conv.weight.detach()
        (sh, sw), (ph, pw), (kh, kw) = self.stride, self.padding, weight.shape[2:]
        # Block (input pixel i, output pixel o) of the matrix is the kernel tap that
        # links them (transposed to Cin x Cout), or zero where none does.
        matrix = weight.new_zeros(h, w, weight.shape[1], ho, wo, weight.shape[0])
        for i, j, oi, oj in itertools.product(range(h), range(w), range(ho), range(wo)):
            ti, tj = i + ph - oi * sh, j + pw - oj * sw
            if 0 <= ti < kh and 0 <= tj < kw:
                matrix[i, j, :, oi, oj, :] = weight[:, :, ti, tj].t()
        self.register_buffer("matrix", matrix.reshape(h * w * weight.shape[1], -1))
        self.register_buffer("bias", conv.bias.detach().repeat(ho * wo))
        self.executed_flops = 2 * self.matrix.numel()

    @staticmethod
    def applies(conv, in_hw, out_hw):
        """Only where the dense matrix costs no more than the conv's nominal taps (and
        the conv is no 1x1, which ``gemm`` covers without the zeros)."""
        dense = conv.in_channels * in_hw[0] * in_hw[1]
        nominal = conv.weight[0].numel()            # Cin x kh x kw taps per output value
        return conv.kernel_size != (1, 1) and conv.groups == 1 and conv.dilation == (1, 1) \
            and dense <= nominal

    def forward(self, x, residual=None):
        n, ho, wo = x.shape[0], *self.out_hw
        y = torch.addmm(self.bias, x.permute(0, 2, 3, 1).reshape(n, -1), self.matrix)
        return self.finish(y.view(n, ho, wo, -1).permute(0, 3, 1, 2), residual)


FORMULATIONS = {cls.kind: cls for cls in (OneDnnConv, AtenConv, GemmConv, SmallMapConv)}


def applicable_kinds(conv, in_hw, out_hw, device):
    """The formulations that can compute ``conv`` on ``device``, in order of preference.

    Where ``onednn`` runs, ``aten`` is left out: on the CPU it calls the same
    oneDNN kernels, only with the weights repacked on every call and ReLU and
    the residual add as extra passes over memory.
    """
    onednn = onednn_available(device)
    ok = {"onednn": onednn, "aten": not onednn, "gemm": GemmConv.applies(conv),
          "smallmap": SmallMapConv.applies(conv, in_hw, out_hw)}
    return [k for k in KINDS if ok[k]]


# ------------------------------------------------------------ the network

class Bottleneck(nn.Module):
    """torchvision's Bottleneck with its convs replaced: conv1 and conv2 end in a
    ReLU, conv3 adds the shortcut and applies the last ReLU."""

    def __init__(self, conv1, conv2, conv3, downsample=None):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.downsample = conv1, conv2, conv3, downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), shortcut)


class ResNetExtractor(nn.Module):
    """ResNet-50 minus fc for one input size: stem, 16 bottlenecks, average pool.
    ``plan`` maps each conv's torchvision name to the formulation it runs as."""

    def __init__(self, conv1, maxpool, blocks, image_size, plan):
        super().__init__()
        self.conv1, self.maxpool, self.blocks = conv1, maxpool, nn.Sequential(*blocks)
        self.image_size, self.plan = image_size, dict(plan)

    def forward(self, x):
        if tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"extractor built for {self.image_size}x{self.image_size} input "
                             f"got {tuple(x.shape[-2:])}")
        x = self.blocks(self.maxpool(self.conv1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    @property
    def dtype(self):
        return self.conv1.bias.dtype


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
    param = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers())
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
                  .contiguous(memory_format=torch.channels_last))
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


def conv_roles(model):
    """{conv name: post-op} for torchvision's ResNet-50, in forward order."""
    roles = {"conv1": "relu"}
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, lname)):
            prefix = f"{lname}.{i}."
            roles.update({prefix + "conv1": "relu", prefix + "conv2": "relu", prefix + "conv3": "add-relu"})
            if block.downsample is not None:
                roles[prefix + "downsample.0"] = "none"
    return roles


def count_flops(model, image_size, nominal=True):
    """Floating-point operations (2 x multiply-adds) of one image through the convs
    and linears. ``nominal`` counts every conv tap, as the usual ResNet-50 figures
    do; otherwise only the arithmetic actually executed (small-map GEMMs skip
    the taps that read zero padding)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += 2 * mod.weight[0].numel() * out.numel()
        elif isinstance(mod, nn.Linear):
            total[0] += 2 * mod.in_features * out.numel()
        else:
            total[0] += mod.nominal_flops if nominal else mod.executed_flops

    probe(model, image_size, {m: hook for m in model.modules()
                              if isinstance(m, (nn.Conv2d, nn.Linear, FoldedConv))})
    return total[0]


# ----------------------------------------------------------------- choice

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_formulations(candidates, batch, reps=3):
    """{kind: best seconds of ``reps`` calls} on a random probe batch (speed does not
    depend on the values), the kinds interleaved so that a burst of load on the
    machine hits them alike."""
    first = next(iter(candidates.values()))
    param = first.bias
    x = torch.randn(batch, first.in_channels, *first.in_hw, device=param.device, dtype=param.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    shortcut = None
    if first.post == "add-relu":
        shortcut = torch.randn(batch, first.out_channels, *first.out_hw, device=param.device, dtype=param.dtype)
        shortcut = shortcut.contiguous(memory_format=torch.channels_last)
    best = {kind: float("inf") for kind in candidates}
    with torch.inference_mode():
        for rep in range(reps + 1):                 # the first round is a warm-up (oneDNN builds kernels)
            for kind, module in candidates.items():
                residual = None if shortcut is None else shortcut.clone()
                _sync(param.device)
                start = time.perf_counter()
                module(x, residual)
                _sync(param.device)
                if rep:
                    best[kind] = min(best[kind], time.perf_counter() - start)
    return best


class PlanError(ValueError):
    """A given plan does not fit this network, input size or device."""


def format_plan(plan):
    """'conv1=onednn layer1.0.conv1=gemm ...': the per-conv choice, one line."""
    return " ".join(f"{name}={kind}" for name, kind in plan.items())


def parse_plan(text):
    plan = {}
    for item in str(text).split():
        name, sep, kind = item.partition("=")
        if not sep or kind not in KINDS:
            raise PlanError(f"{item!r} is not NAME=KIND with KIND in {', '.join(KINDS)}")
        plan[name] = kind
    return plan


def plan_summary(plan):
    """'onednn 36, gemm 9, smallmap 8': how many convs run as each formulation."""
    counts = [(kind, sum(k == kind for k in plan.values())) for kind in KINDS]
    return ", ".join(f"{kind} {n}" for kind, n in counts if n)


def choose(name, kinds, make, batch, plan, timed):
    """The formulation module for conv ``name``: the plan's, the only one, or the
    fastest here (timings shared by convs of the same signature via ``timed``)."""
    if plan is not None:
        if name not in plan:
            raise PlanError(f"the plan has no entry for {name}")
        if plan[name] not in kinds:
            raise PlanError(f"{name}={plan[name]} is not possible here (possible: {', '.join(kinds)})")
        return make(plan[name]), None
    if len(kinds) == 1:
        return make(kinds[0]), None
    candidates = {kind: make(kind) for kind in kinds}
    first = candidates[kinds[0]]
    key = (first.in_channels, first.out_channels, first.in_hw, first.out_hw, first.stride,
           first.padding, first.nominal_flops, first.post)
    if key not in timed:
        timed[key] = time_formulations(candidates, batch)
    times = timed[key]
    best = min(kinds, key=times.get)                # ties go to the earlier kind in KINDS
    return candidates[best], times


def build_extractor(model, device, image_size=28, batch_size=256, dtype=torch.float32, plan=None):
    """ResNet-50 minus fc, batch-norm folded, channels-last, each conv as the fastest
    exact formulation on this machine for ``batch_size`` images (or as ``plan``
    says: {conv name: kind}, e.g. a plan recorded by an earlier run).

    ``model`` (torchvision's resnet50) is modified in place. The result has
    ``.plan`` ({name: kind}), ``.choices`` ({name: [kinds possible here]}) and
    ``.timings`` ({name: {kind: seconds per probe batch}} of the convs that had
    a choice).
    """
    model.fc = nn.Identity()        # output = flattened 2048-d avgpool
    model.eval()
    fold_batchnorms(model)
    model.to(device=device, memory_format=torch.channels_last)
    sizes = conv_map_sizes(model, image_size)
    roles = conv_roles(model)
    if plan is not None and set(plan) != set(roles):
        extra = sorted(set(plan) - set(roles)) or sorted(set(roles) - set(plan))
        raise PlanError(f"the plan does not name ResNet-50's {len(roles)} convs (first mismatch: {extra[0]})")
    model.to(dtype=dtype)
    built, choices, timings, timed = {}, {}, {}, {}
    for name, post in roles.items():
        conv, (in_hw, out_hw) = model.get_submodule(name), sizes[name]
        kinds = choices[name] = applicable_kinds(conv, in_hw, out_hw, device)

        def make(kind, conv=conv, post=post, in_hw=in_hw, out_hw=out_hw):
            return FORMULATIONS[kind](conv, post, in_hw, out_hw, batch_size)

        built[name], times = choose(name, kinds, make, batch_size, plan, timed)
        built[name].conv_name = name
        if times:
            timings[name] = times
    blocks = []
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, lname)):
            p = f"{lname}.{i}."
            blocks.append(Bottleneck(built[p + "conv1"], built[p + "conv2"], built[p + "conv3"],
                                     built.get(p + "downsample.0")))
    extractor = ResNetExtractor(built["conv1"], model.maxpool, blocks, image_size,
                                {name: module.kind for name, module in built.items()})
    extractor.choices, extractor.timings = choices, timings
    return extractor


def explain(extractor):
    """Lines listing each conv, its map, the formulations timed (ms per probe batch) and the choice."""
    lines = []
    for module in extractor.modules():
        if not isinstance(module, FoldedConv):
            continue
        times = extractor.timings.get(module.conv_name)
        timed = ", ".join(f"{k} {t * 1e3:.2f} ms" for k, t in times.items()) if times else "the only choice"
        lines.append(f"{module.conv_name:<21} {module.in_channels:>4}->{module.out_channels:<4} "
                     f"stride {module.stride[0]} on {module.in_hw[0]}x{module.in_hw[1]}, then {module.post:<8} "
                     f"-> {module.kind:<8} ({timed})")
    return lines
