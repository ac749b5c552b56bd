"""What every script of the lab needs at its edges: one-line user errors and
argument types, atomic output files, the MNIST download, device choice and provenance.

Kept free of heavy imports (torch is imported lazily) so that the numpy-only
classifier starts fast.
"""
import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile


class UserError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""


def run_main(main):
    """Run ``main()`` as a command: user errors become one line and exit 2.

    SIGTERM is turned into an exception so that ``atomic_path`` can clean up
    its temporary file on ``kill`` just as it does on Ctrl-C.
    """
    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    prog = os.path.basename(sys.argv[0])
    try:
        main()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no partial output was left behind", file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (the help says what it means) and off switches."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and one-line errors (no usage dump)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def ensure_writable_dir(path):
    """Create ``path`` if needed and check that we can write into it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {path!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"output directory {path!r} is not writable")


def check_can_create(path):
    """Fail early if directory ``path`` could not be created or written, without creating it."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"cannot create output directory {path!r}: {probe!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output directory {path!r} is not writable")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any exception (Ctrl-C and SIGTERM included) the temporary file is
    removed, so ``path`` is either the old file or the complete new one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    ensure_writable_dir(directory)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)       # mkstemp makes 0600; give the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_figure(fig, path, **kwargs):
    """Save a matplotlib figure atomically (format taken from ``path``)."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_mnist(root, train):
    """torchvision's MNIST split; downloads on a connected machine, else says how to go offline."""
    from torchvision import datasets

    try:
        return datasets.MNIST(root=root, train=train, download=True)
    except Exception as exc:  # urllib/HTTP/OSError/RuntimeError, depending on the mirror
        raise UserError(
            f"MNIST is not under {os.path.join(root, 'MNIST', 'raw')!r} and could not be downloaded "
            f"({type(exc).__name__}). Offline: copy the four uncompressed files "
            f"({', '.join(MNIST_FILES)}) into DATA/MNIST/raw/ and pass DATA=... / --data-root") from None


def resolve_device(name):
    """Map --device {auto,cpu,cuda,mps} to a torch.device, or fail clearly."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available (use --device cpu or auto)")
    return torch.device(name)


def versions():
    """Library versions, recorded in every output for provenance."""
    import numpy

    out = {"python": platform.python_version(), "numpy": numpy.__version__}
    for mod in ("torch", "torchvision", "scipy"):
        if mod in sys.modules or mod != "torch":
            try:
                out[mod] = str(__import__(mod).__version__)   # TorchVersion is not plain str
            except ImportError:
                pass
    return out


def _number(text, convert, ok, what):
    try:
        value = convert(text)
    except ValueError:
        raise_arg(f"expected {what}, got {text!r}")
    if not ok(value):
        raise_arg(f"expected {what}, got {text!r}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text):
    """argparse type: a finite float > 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def nonnegative_float(text):
    """argparse type: a finite float >= 0."""
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a non-negative number")


def seed_value(text):
    """argparse type: an integer that torch.manual_seed accepts (0 <= seed < 2**63)."""
    return _number(text, int, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)")


def raise_arg(message):
    raise argparse.ArgumentTypeError(message)
