"""What every script of the lab needs at its edges: one-line user errors,
atomic output files, device choice and provenance.

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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and one-line errors (no usage dump)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def ensure_writable_dir(path):
    """Create ``path`` if needed and check that we can write into it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {path!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
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
                out[mod] = __import__(mod).__version__
            except ImportError:
                pass
    return out


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise_arg(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise_arg(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise_arg(f"expected a positive number, got {text!r}")
    if not (value > 0 and value != float("inf")):
        raise_arg(f"expected a positive number, got {text!r}")
    return value


def nonnegative_float(text):
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise_arg(f"expected a non-negative number, got {text!r}")
    if not (0 <= value < float("inf")):
        raise_arg(f"expected a non-negative number, got {text!r}")
    return value


def raise_arg(message):
    raise argparse.ArgumentTypeError(message)
