"""Where the lab runs and with what: the torch device, the CPU's model, ISA flags and cores, the library
versions recorded in every output, and workers that end with their parent."""
import contextlib
import ctypes
import os
import platform
import signal
import sys

from lab.cli import STOPS, UserError


def resolve_device(name):
    """Map --device {auto,cpu,cuda,mps} to a torch.device (auto: cuda, then mps, then cpu), or fail clearly."""
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(device for device in ("cuda", "mps", "cpu") if available[device]))
    if not available[name]:
        what = "CUDA GPU" if name == "cuda" else "MPS"
        raise UserError(f"--device {name} was asked for but this machine has no {what} (use --device cpu or auto)")
    return torch.device(name)


# The ISA flags that decide this lab's speed on a CPU (AVX-512 and bf16 units, AMX).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model_and_flags():
    """(CPU model name, set of ISA flags) from /proc/cpuinfo; (platform's name, empty set) elsewhere."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):           # x86, arm64
                    flags = set(value.split())
                if flags and key == "":                      # end of the first processor
                    break
    except OSError:
        pass
    return model, flags


def versions():
    """Versions of the libraries this process has loaded, recorded in every output (importing torch
    only to read its version would cost the numpy-only classifier seconds)."""
    import numpy

    out = {"python": platform.python_version(), "numpy": numpy.__version__}
    for mod in ("scipy", "torch", "torchvision"):
        if mod in sys.modules:
            out[mod] = str(getattr(sys.modules[mod], "__version__", "unknown"))   # TorchVersion is not plain str
    return out


def cores():
    """The CPU cores this process may run on: more workers than that only wait on each other."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def as_worker():
    """A sweep's pool initializer. Ctrl-C is the parent's to handle, which ends its workers with SIGTERM:
    they die quietly (the default action, not a forked copy of the parent's handler), and with their parent,
    even when that is killed with SIGKILL (Linux's prctl). The interrupts that lab.cli holds while a command
    starts (a spawned worker imports the command again) are let through last, when they find these handlers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG (linux/prctl.h)
