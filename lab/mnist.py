"""MNIST as torchvision reads it (ROOT/MNIST/raw), checked file by file so that
each way it can fail is named in one line, with advice that is true."""
import contextlib
import math
import os

from lab.cli import UserError


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
