"""What every script of the lab needs at its edges: one-line user errors and
argument types, atomic output files, the MNIST download, device choice and provenance.

Kept free of heavy imports (torch is imported lazily) so that the numpy-only
classifier starts fast.
"""
import argparse
import contextlib
import errno
import json
import math
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


def outputs_message():
    """Which planned outputs this run completed and which it did not write."""
    done = list(_WRITTEN)
    missing = [p for p in _PLANNED if p not in _WRITTEN]
    rel = lambda paths: ", ".join(os.path.relpath(p) for p in paths)  # noqa: E731
    parts = [f"completed: {rel(done)}" if done else "nothing was completed"]
    if missing:
        parts.append(f"not written: {rel(missing)}")
    return "; ".join(parts) + "; no partial file was left behind"


def interrupt_message():
    """'interrupted; ...' saying which outputs were completed and which were not written."""
    return "interrupted; " + outputs_message()


def _is_out_of_memory(exc):
    # torch reports a failed CPU allocation as a RuntimeError, a CUDA one as its OutOfMemoryError.
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def run_main(main):
    """Run ``main()`` as a command: a user error, a closed output pipe or a lack of
    memory becomes one line on stderr, never a traceback.

    Once some outputs exist, the line also says which were completed, so that it
    matches what is left on disk. SIGTERM and SIGHUP are turned into an exception
    so that ``atomic_path`` can clean up its temporary file on ``kill`` or a closed
    terminal just as it does on Ctrl-C. Only the first signal counts: make
    forwards its SIGTERM to the script, and that second one must not break the cleanup.
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
    outputs = lambda: f" ({outputs_message()})" if _WRITTEN else ""  # noqa: E731
    try:
        main()
    except UserError as exc:
        print(f"{prog}: error: {exc}{outputs()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupt_message()}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader of stdout went away (`make all | head`). Point stdout at
        # /dev/null so that Python's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{prog}: stopped: the program reading its output closed the pipe; "
              f"{outputs_message()}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        print(f"{prog}: error: not enough memory for the requested sizes (batch, --z-dim, --limit); "
              f"ask for smaller ones{outputs()}", file=sys.stderr)
        sys.exit(2)


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
    check_can_create(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {path!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"output directory {path!r} is not writable")


def check_can_create(path):
    """Fail early if directory ``path`` could not be created or written, without creating it.

    Symlinks are followed as the later writes will follow them, so a link to a
    missing folder anywhere on the path (os.makedirs cannot create through one),
    or a path that runs through a file, fails here, before any work.
    """
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        if os.path.islink(probe):
            where = "" if probe == os.path.abspath(path) else f": {probe!r}"
            raise UserError(f"output directory {path!r}{where} is a symlink to {os.readlink(probe)!r}, "
                            "which does not exist; create it or give another directory")
        probe = os.path.dirname(probe)
    probe = os.path.realpath(probe)
    if not os.path.isdir(probe):
        raise UserError(f"cannot create output directory {path!r}: {probe!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output directory {path!r} is not writable")


def check_can_write_file(path):
    """Fail early if file ``path`` could not be written (a directory, or no writable folder)."""
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UserError(f"cannot write {path!r}: it names a directory; give a file path")
    check_can_create(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any exception (Ctrl-C and SIGTERM included) the temporary file is
    removed, so ``path`` is either the old file or the complete new one. A
    write that the system refuses (a full disk, a read-only folder) becomes a
    UserError naming the file.
    """
    check_can_write_file(path)
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
    except BaseException as exc:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        elif done not in _WRITTEN:   # interrupted just after the rename: the file is complete
            _WRITTEN.append(done)
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise UserError(write_failure(path, exc)) from None
        raise


def write_failure(path, exc):
    """One line for an OSError raised while writing ``path``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {path!r}: no space left on the device; free some space and run again"
    return f"cannot write {path!r}: {exc.strerror or exc}"


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path, make_target):
    """A results JSON file; a missing or unreadable one is a UserError naming the Make target
    that writes it."""
    if os.path.isdir(path):
        raise UserError(f"{path!r} is a directory, not a results file; move it away and run `make {make_target}`")
    if not os.path.isfile(path):
        raise UserError(f"{path!r} not found; run `make {make_target}` first")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"cannot read {path!r} as JSON ({exc}); run `make {make_target}` again") from None


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use.

    Every figure goes to a file, so no window backend is needed: MPLBACKEND is
    ignored here, and a value that matplotlib would reject cannot stop a run.
    """
    os.environ.pop("MPLBACKEND", None)
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


def idx_header(path):
    """(magic, shape) of an IDX file, or None if it is too short to hold its header."""
    dims = 3 if MNIST_FILES[os.path.basename(path)] == 2051 else 1
    with open(path, "rb") as f:
        header = f.read(4 + 4 * dims)
    if len(header) < 4 + 4 * dims:
        return None
    values = [int.from_bytes(header[i:i + 4], "big") for i in range(0, len(header), 4)]
    return values[0], tuple(values[1:])


def check_idx_file(path):
    """None if ``path`` is a complete MNIST IDX file (its magic, 28 x 28 images), else what is wrong with it."""
    magic = MNIST_FILES[os.path.basename(path)]
    size = os.path.getsize(path)
    header = idx_header(path)
    if header is None:
        return f"{size} bytes, too short for an IDX header"
    found, shape = header
    if found != magic:
        return f"magic number {found}, expected {magic}"
    if len(shape) == 3 and shape[1:] != (28, 28):
        return f"images of {shape[1]}x{shape[2]} pixels, expected 28x28"
    expected = 4 + 4 * len(shape) + math.prod(shape)
    if size != expected:
        return f"{size} bytes, expected {expected} for shape {shape} (truncated?)"
    return None


def _made_dirs(path):
    """The folders that os.makedirs(path) would create, outermost first."""
    made = []
    while path and not os.path.exists(path):
        made.insert(0, path)
        path = os.path.dirname(path)
    return made


def _gunzip_if_only_gz(path):
    """Decompress PATH.gz beside it when only the .gz is there (as downloaded), so
    that an offline copy of the .gz files works; a folder that can't be written is left as it is."""
    if os.path.exists(path) or not os.path.isfile(path + ".gz"):
        return
    import gzip
    import shutil
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with gzip.open(path + ".gz") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, path)
    except (OSError, EOFError):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def load_mnist(root, train):
    """torchvision's MNIST split, read from ROOT/MNIST/raw or downloaded there.

    torchvision needs all four files, even to read one split, so all four are
    checked. A failure names its cause and the file in one line: a damaged file,
    images and labels that disagree, files in the wrong folder, or no network for
    the download of the missing ones. A failed download leaves no new folder.
    """
    from torchvision import datasets

    raw = os.path.join(root, "MNIST", "raw")
    for name in MNIST_FILES:
        _gunzip_if_only_gz(os.path.join(raw, name))
    present = [n for n in MNIST_FILES if os.path.isfile(os.path.join(raw, n))]
    for name in present:
        problem = check_idx_file(os.path.join(raw, name))
        if problem:
            raise UserError(f"MNIST file {os.path.join(raw, name)!r} is damaged ({problem}); "
                            "replace it with an intact copy (or delete it to download it anew)")
    for prefix in ("train", "t10k"):
        images, labels = (os.path.join(raw, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
        if os.path.basename(images) in present and os.path.basename(labels) in present:
            n_images, n_labels = idx_header(images)[1][0], idx_header(labels)[1][0]
            if n_images != n_labels:
                raise UserError(f"MNIST files disagree: {images!r} holds {n_images} images but "
                                f"{labels!r} holds {n_labels} labels; replace the wrong one")
    missing = [n for n in MNIST_FILES if n not in present]
    if missing and not present:
        for other in (root, os.path.join(root, "raw"), os.path.join(root, "MNIST")):
            if any(os.path.isfile(os.path.join(other, n)) for n in MNIST_FILES):
                raise UserError(f"MNIST files are in {other!r}, but torchvision reads them from "
                                f"{raw!r}: move them there, or point DATA / --data-root at the "
                                "folder that holds MNIST/raw")
    made = _made_dirs(os.path.abspath(raw))
    try:
        return datasets.MNIST(root=root, train=train, download=bool(missing))
    except Exception as exc:  # urllib/HTTP/OSError/RuntimeError, depending on the mirror
        for folder in reversed(made):           # a failed run leaves no new folder behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if not missing:
            raise UserError(f"cannot read MNIST from {raw!r} ({type(exc).__name__}: {exc})") from None
        raise UserError(
            f"MNIST file(s) {', '.join(missing)} not in {raw!r} and could not be downloaded "
            f"({type(exc).__name__}: no network?). Offline: copy the uncompressed files "
            "(or their .gz) into DATA/MNIST/raw/ and pass DATA=... / --data-root") from None


def first_non_finite(state_dict):
    """The name of the first floating tensor of ``state_dict`` holding a NaN or an
    infinity, or None. Loaded weights are checked so that a damaged file stops the
    run instead of turning every number after it into a quiet NaN or zero."""
    import torch

    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


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
