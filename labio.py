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


def one_blas_thread_unless_set():
    """Ask numpy's BLAS for one thread, unless the user set a count; only a script's
    entry point calls this, before numpy loads, so importing a module changes nothing.

    The classifier's mini-batch products are small (256 x 2048 x 10): a second
    thread gains little, and when the cores are shared with other work every
    product waits for it (on a 2-core VM with other jobs running, the default
    logreg run took 7-8 s with one thread and 36-54 s with two). A sweep also
    matches its lone runs bit for bit only when both use the same thread count.
    """
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


class UserError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""


# What this run means to write (plan_outputs) and what atomic_path finished, in
# order, so that an interrupt can say exactly which outputs are complete.
_PLANNED = []
_WRITTEN = []


def plan_outputs(paths):
    """Declare the files this run will write; an interrupt then names the missing ones."""
    _PLANNED[:] = [os.path.abspath(p) for p in paths]
    _WRITTEN.clear()


def interrupt_message():
    """'interrupted; ...' saying which outputs were completed and which were not written."""
    done = list(_WRITTEN)
    missing = [p for p in _PLANNED if p not in _WRITTEN]
    rel = lambda paths: ", ".join(os.path.relpath(p) for p in paths)  # noqa: E731
    parts = [f"completed: {rel(done)}" if done else "nothing was completed"]
    if missing:
        parts.append(f"not written: {rel(missing)}")
    return "interrupted; " + "; ".join(parts) + "; no partial file was left behind"


def run_main(main):
    """Run ``main()`` as a command: user errors become one line and exit 2.

    SIGTERM and SIGHUP are turned into an exception so that ``atomic_path`` can
    clean up its temporary file on ``kill`` or a closed terminal just as it does
    on Ctrl-C. Only the first signal counts: make forwards its SIGTERM to the
    script, and that second one must not break the cleanup.
    """
    stops = [signal.SIGTERM, signal.SIGHUP]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # not when started with it ignored
        stops.append(signal.SIGINT)

    def _terminate(signum, frame):
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in stops:
        signal.signal(sig, _terminate)
    prog = os.path.basename(sys.argv[0])
    try:
        main()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupt_message()}", file=sys.stderr)
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
    done = os.path.abspath(path)
    try:
        yield tmp
        os.replace(tmp, path)
        _WRITTEN.append(done)
    except BaseException:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        elif done not in _WRITTEN:   # interrupted just after the rename: the file is complete
            _WRITTEN.append(done)
        raise


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path, make_target):
    """A results JSON file; a missing or unreadable one is a UserError naming the Make target
    that writes it."""
    if not os.path.isfile(path):
        raise UserError(f"{path!r} not found; run `make {make_target}` first")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"cannot read {path!r} as JSON ({exc}); run `make {make_target}` again") from None


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120, tight=True):
    """Lay out, save atomically (format from ``path``'s extension) and close a figure."""
    plt = pyplot()
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    try:
        if tight:
            fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
    finally:
        plt.close(fig)
    return path


# file name -> IDX magic number (0x0803: uint8 images N x 28 x 28; 0x0801: uint8 labels N)
MNIST_FILES = {"train-images-idx3-ubyte": 2051, "train-labels-idx1-ubyte": 2049,
               "t10k-images-idx3-ubyte": 2051, "t10k-labels-idx1-ubyte": 2049}


def check_idx_file(path):
    """None if ``path`` is a complete MNIST IDX file, else what is wrong with it."""
    magic = MNIST_FILES[os.path.basename(path)]
    dims = 3 if magic == 2051 else 1
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(4 + 4 * dims)
    if len(header) < 4 + 4 * dims:
        return f"{size} bytes, too short for an IDX header"
    values = [int.from_bytes(header[i:i + 4], "big") for i in range(0, len(header), 4)]
    if values[0] != magic:
        return f"magic number {values[0]}, expected {magic}"
    body = 1
    for n in values[1:]:
        body *= n
    if size != len(header) + body:
        return f"{size} bytes, expected {len(header) + body} for shape {tuple(values[1:])} (truncated?)"
    return None


def load_mnist(root, train):
    """torchvision's MNIST split, read from ROOT/MNIST/raw or downloaded there.

    A failure names its cause in one line: a damaged file (which one, and to
    delete it), files in the wrong folder, or no network for the download.
    """
    from torchvision import datasets

    raw = os.path.join(root, "MNIST", "raw")
    prefix = "train" if train else "t10k"
    names = [n for n in MNIST_FILES if n.startswith(prefix)]
    present = [n for n in names if os.path.isfile(os.path.join(raw, n))]
    for name in present:
        problem = check_idx_file(os.path.join(raw, name))
        if problem:
            raise UserError(f"MNIST file {os.path.join(raw, name)!r} is damaged ({problem}); "
                            "delete it and run again (it is downloaded anew when online)")
    if len(present) < len(names):
        for other in (root, os.path.join(root, "raw"), os.path.join(root, "MNIST")):
            if any(os.path.isfile(os.path.join(other, n)) for n in names):
                raise UserError(f"MNIST files are in {other!r}, but torchvision reads them from "
                                f"{raw!r}: move them there, or point DATA / --data-root at the "
                                "folder that holds MNIST/raw")
    created = [d for d in (root, os.path.join(root, "MNIST"), raw) if not os.path.isdir(d)]
    try:
        return datasets.MNIST(root=root, train=train, download=len(present) < len(names))
    except Exception as exc:  # urllib/HTTP/OSError/RuntimeError, depending on the mirror
        for folder in reversed(created):   # a failed run leaves no empty folders behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if len(present) == len(names):
            raise UserError(f"cannot read MNIST from {raw!r} ({type(exc).__name__}: {exc}); "
                            "delete its files and run again") from None
        raise UserError(
            f"MNIST is not under {raw!r} and could not be downloaded ({type(exc).__name__}: no "
            f"network?). Offline: copy the four uncompressed files ({', '.join(MNIST_FILES)}) "
            "into DATA/MNIST/raw/ and pass DATA=... / --data-root") from None


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
    """Versions of the libraries this process has loaded, recorded in every output.

    Only modules already imported are asked: importing torch just to read its
    version would cost the numpy-only classifier about 2 s.
    """
    import numpy

    out = {"python": platform.python_version(), "numpy": numpy.__version__}
    for mod in ("scipy", "torch", "torchvision"):
        if mod in sys.modules:
            out[mod] = str(getattr(sys.modules[mod], "__version__", "unknown"))   # TorchVersion is not plain str
    return out


def add_common_args(parser, *names, **overrides):
    """The flags every script shares, defined once: data_root, device, seed, limit.

    ``overrides`` maps a name to a dict of argparse keywords (e.g. another help).
    """
    common = {
        "data_root": ("--data-root", dict(default="data", help="torchvision MNIST root (DATA)")),
        "device": ("--device", dict(choices=("auto", "cpu", "cuda", "mps"), default="auto",
                                    help="auto picks cuda, then mps, then cpu")),
        "seed": ("--seed", dict(type=seed_value, default=0, help="random seed")),
        "limit": ("--limit", dict(type=positive_int, default=None,
                                  help="use only the first N images of each split (default: all)")),
    }
    for name in names:
        flag, kwargs = common[name]
        parser.add_argument(flag, **{**kwargs, **overrides.get(name, {})})
    return parser


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
