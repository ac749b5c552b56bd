"""Output files: atomic writes (temp file + rename), early checks that an output
can be created, the record of what this run completed (for the interrupt
message), JSON results, and the check that loaded weights are finite.
"""
import contextlib
import errno
import json
import os
import tempfile
import warnings

from lab.cli import UserError, first_line


# What this run means to write (plan_outputs) and what atomic_path finished, in
# order, so that an interrupt can say exactly which outputs are complete.
_PLANNED = []
_WRITTEN = []


def plan_outputs(paths):
    """Declare the files this run will write; an interrupt then names the missing ones."""
    _PLANNED[:] = [os.path.abspath(p) for p in paths]
    _WRITTEN.clear()


def completed():
    """The outputs this run has completed so far, in order."""
    return list(_WRITTEN)


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
    """A results JSON file, read through ``reading``."""
    with reading(path, make_target):
        with open(path) as f:
            return json.load(f)


@contextlib.contextmanager
def reading(path, make_target):
    """Read and check an output of the pipeline inside this block: the one mechanism for damaged
    files. A missing file, a directory, or any error that the loader or a check raises (np.load,
    loadmat, torch.load(weights_only=True), load_state_dict(strict=True), a dataclass's
    constructor, a KeyError...) becomes one UserError whose advice repairs it: removing the damaged
    file is what makes `make TARGET` rebuild it, since make judges by dates, not content."""
    if not os.path.lexists(path):
        raise UserError(f"{path!r} not found; run `make {make_target}` first")
    if os.path.isdir(path):
        raise UserError(f"{path!r} is a directory, not a results file; move it away and run `make {make_target}`")
    try:
        with warnings.catch_warnings():   # a damaged file can make a loader warn before it fails
            warnings.simplefilter("ignore")
            yield
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path!r} is damaged or not what the pipeline wrote ({first_line(exc)}); "
                        f"remove it and rebuild it: rm -f {path!r} && make {make_target}") from None


def first_non_finite(state_dict):
    """The name of the first floating tensor of ``state_dict`` holding a NaN or an
    infinity, or None. Loaded weights are checked so that a damaged file stops the
    run instead of turning every number after it into a quiet NaN or zero."""
    import torch

    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None
