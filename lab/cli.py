"""The scripts' command lines: one-line user errors, argument types and flags
shared by every script, and ``run_main``, which turns a user error, an interrupt,
a closed pipe or a lack of memory into one line on stderr.

Free of heavy imports, so that the numpy-only classifier starts fast.
"""
import argparse
import contextlib
import os
import signal
import sys


def one_blas_thread_unless_set():
    """One BLAS thread for numpy, unless the user set a count; a script's entry point calls this before
    numpy loads. The classifier's products are small (256 x 2048 x 10): a second thread gains little,
    and a sweep matches its lone runs bit for bit only with the same thread count."""
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


class UserError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""


STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
COMMANDS = {"extract_features.py", "logreg.py", "vae.py", "sweep_logreg.py", "sweep_vae.py", "report.py", "bench.py"}
if os.path.basename(sys.argv[0]) in COMMANDS:
    # A command holds its interrupts until run_main handles them: one inside torch's C++ start-up would
    # abort the process (every script imports lab.cli before torch).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)


@contextlib.contextmanager
def holding_interrupts():
    """Hold Ctrl-C, SIGTERM and SIGHUP over steps that must complete together; one that came meanwhile
    interrupts right after them. (Python handles a signal in its main thread whichever thread received
    it, and torch's threads do not block any, so only the handlers can hold one.)"""
    came = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: came.append(signum)) for sig in STOPS}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if came:
            os.kill(os.getpid(), came[0])


def one_line(exc, width=300):
    """``Type: message`` on one line (load_state_dict's lists its keys over several), cut at ``width``."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split()).removesuffix(":")
    return text if len(text) <= width else text[:width] + "..."


def _is_out_of_memory(exc):
    # torch reports a failed CPU allocation as a RuntimeError, a CUDA one as its OutOfMemoryError.
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def run_main(main):
    """Run ``main()`` as a command: a user error, an interrupt, a closed output pipe or a lack of memory
    is one line on stderr that names the outputs completed, never a traceback. SIGTERM and SIGHUP
    interrupt as Ctrl-C does, so that atomic_path cleans up; only the first counts (make forwards its
    own SIGTERM, and that second one must not break the cleanup)."""
    stops = [sig for sig in STOPS if sig != signal.SIGINT or signal.getsignal(sig) is signal.default_int_handler]

    def _terminate(signum, frame):
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in stops:
        signal.signal(sig, _terminate)
    from lab import files       # here, not at the top: lab.files imports UserError from this module

    prog = os.path.basename(sys.argv[0])
    outputs = lambda: f" ({files.outputs_message()})" if files.completed() else ""  # noqa: E731
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)   # one held while starting is handled here
        main()
    except UserError as exc:
        print(f"{prog}: error: {exc}{outputs()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: {files.interrupt_message()}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader of stdout went away (`make all | head`). Point stdout at
        # /dev/null so that Python's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{prog}: stopped: the program reading its output closed the pipe; "
              f"{files.outputs_message()}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        print(f"{prog}: error: not enough memory for the requested sizes (batch, --z-dim, --limit); "
              f"ask for smaller ones{outputs()}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (the help says what it means) and off switches: each default
    is written once, where it lives, and --help reads it from there."""

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


def add_common_args(parser, *names, **overrides):
    """The flags every script shares, defined once: data_root, device, seed, limit; ``overrides`` maps a
    name to argparse keywords (e.g. another help)."""
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


def _argument(convert, ok, what):
    """An argparse type: ``convert`` the text, then accept it if ``ok``; otherwise say what was expected."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = _argument(int, lambda v: v >= 1, "a positive integer")
positive_float = _argument(float, lambda v: 0 < v < float("inf"), "a positive number")
fraction = _argument(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
seed_value = _argument(int, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)")   # what torch.manual_seed takes
