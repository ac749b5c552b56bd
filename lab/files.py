"""Output files: atomic writes, the record of what this run completed (for the interrupt message) and of
the settings an output was built with (for make), early checks, and the one way to read a file back."""
import contextlib
import errno
import json
import os
import tempfile
import warnings

from lab.cli import UserError, holding_interrupts, one_line

# What this run means to write and what atomic_path finished, in order, so that an interrupt can
# say exactly which outputs are complete.
_PLANNED = []
_WRITTEN = []


def plan_outputs(paths):
    """Declare the files this run will write; an interrupt then names the missing ones."""
    _PLANNED[:] = [os.path.abspath(p) for p in paths]
    _WRITTEN.clear()


def completed():
    return list(_WRITTEN)


def outputs_message():
    """Which planned outputs this run completed and which it did not write."""
    def names(paths):
        return ", ".join(os.path.relpath(p) for p in paths)
    missing = [p for p in _PLANNED if p not in _WRITTEN]
    parts = [f"completed: {names(_WRITTEN)}" if _WRITTEN else "nothing was completed"]
    parts += [f"not written: {names(missing)}"] if missing else []
    return "; ".join(parts + ["no partial file was left behind"])


def interrupt_message():
    return "interrupted; " + outputs_message()


def check_can_create(path):
    """Fail before any work if directory ``path`` could not be created or written, creating nothing
    (os.makedirs cannot create through a dangling symlink)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise UserError(f"output directory {path!r}: {probe!r} is a symlink to {os.readlink(probe)!r}, "
                            "which does not exist; create it or give another directory")
        probe = os.path.dirname(probe)
    if not os.path.isdir(os.path.realpath(probe)):
        raise UserError(f"cannot create output directory {path!r}: {probe!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output directory {path!r} is not writable")


def ensure_writable_dir(path):
    check_can_create(path)
    os.makedirs(path, exist_ok=True)


def check_can_write_file(path):
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UserError(f"cannot write {path!r}: it names a directory; give a file path")
    check_can_create(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success, so that ``path``
    is the old file or the complete new one, never a part. Any failure (Ctrl-C and SIGTERM
    included) removes the temporary file; a write that the system refuses becomes a one-line
    UserError. Once ``path`` is complete, the settings that make gave for it (LAB_RECORD,
    LAB_SETTINGS) are recorded beside it, as OUT/.NAME.args."""
    check_can_write_file(path)
    ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)       # mkstemp makes 0600; give the usual mode
    done = os.path.abspath(path)
    try:
        yield tmp
        with holding_interrupts():   # an output is never complete without its settings record
            os.replace(tmp, path)
            _WRITTEN.append(done)
            if os.path.abspath(os.environ.get("LAB_RECORD", "")) == done:
                record = os.path.join(os.path.dirname(done), f".{os.path.basename(done)}.args")
                with open(tmp, "w") as f:
                    f.write(os.environ.get("LAB_SETTINGS", "") + "\n")
                os.replace(tmp, record)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "failed writing" in str(exc)
        if full:   # torch.save reports a full disk as a RuntimeError
            raise UserError(f"cannot write {path!r}: no space left on the device; free some space and run again") \
                from None
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise UserError(f"cannot write {path!r}: {exc.strerror or exc}") from None
        raise


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path, make_target):
    """A results JSON file, read through ``reading``."""
    with reading(path, make_target), open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def reading(path, make_target=None, remove=None):
    """Read and check a file inside this block, the one mechanism for damaged files: any error that the
    loader or a check raises (torch.load(weights_only=True), load_state_dict(strict=True), a dataclass,
    a KeyError...) becomes one UserError. Its advice for a pipeline output repairs it: make judges by
    dates, so the file (or ``remove``, the one it is rebuilt from) goes first. A user's own file
    (``make_target`` None) is never advised away."""
    if remove:
        missing = moved = f"rebuild it: rm -f {remove!r} && make {make_target}"
    else:
        missing, moved = f"run `make {make_target}` first", f"run `make {make_target}`"
    if not os.path.lexists(path):
        raise UserError(f"{path!r} not found" + (f"; {missing}" if make_target else ""))
    if os.path.isdir(path):
        raise UserError(f"{path!r} is a directory, not a file" + (f"; move it away and {moved}" if make_target else ""))
    try:
        with warnings.catch_warnings():   # a damaged file can make a loader warn before it fails
            warnings.simplefilter("ignore")
            yield
    except UserError:
        raise
    except Exception as exc:
        if make_target is None:
            raise UserError(f"cannot use {path!r}: {one_line(exc)}") from None
        raise UserError(f"{path!r} is damaged or not what the pipeline wrote ({one_line(exc)}); "
                        f"remove it and rebuild it: rm -f {remove or path!r} && make {make_target}") from None


def first_non_finite(state_dict):
    """The name of the first floating tensor of ``state_dict`` holding a NaN or an infinity, or None:
    a damaged file must stop the run, not turn every number after it into a quiet NaN."""
    import torch

    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None
