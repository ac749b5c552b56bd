"""MNIST as torchvision reads it (ROOT/MNIST/raw), checked file by file: each failure is one line, its advice true."""
import contextlib
import gzip
import math
import os
import shutil

from torchvision import datasets

from lab.cli import UserError, one_line

# The four files torchvision needs, even to read one split: IDX dims (magic 2048 + dims) of uint8 data.
MNIST_FILES = {"train-images-idx3-ubyte": 3, "train-labels-idx1-ubyte": 1,
               "t10k-images-idx3-ubyte": 3, "t10k-labels-idx1-ubyte": 1}


def idx_count(path, dims):
    """The number of items in the MNIST IDX file ``path``, or a UserError saying what is wrong with it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic, *shape = (int.from_bytes(f.read(4), "big") for _ in range(1 + dims))
    if magic != 2048 + dims:
        problem = f"magic number {magic}, expected {2048 + dims}"
    elif size != (expected := 4 * (1 + dims) + math.prod(shape)):
        problem = f"{size} bytes, expected {expected} for shape {tuple(shape)} (truncated?)"
    elif dims == 3 and shape[1:] != [28, 28]:
        problem = f"images of {shape[1]}x{shape[2]} pixels, expected 28x28"
    else:
        return shape[0]
    raise UserError(f"MNIST file {path!r} is damaged ({problem}); replace it, or delete it to download it anew")


def gunzip_if_only_gz(path):
    """Decompress PATH.gz beside it when only the .gz is there, as in an offline copy of the download."""
    tmp = f"{path}.{os.getpid()}.tmp"
    if not os.path.lexists(path) and os.path.isfile(path + ".gz"):
        with contextlib.suppress(OSError, EOFError):
            with gzip.open(path + ".gz") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, path)
        with contextlib.suppress(OSError):
            os.remove(tmp)                      # what a failed decompression left


def load_mnist(root, train):
    """torchvision's MNIST split, read from ROOT/MNIST/raw or downloaded there (a failed download leaves no folder)."""
    raw = os.path.join(root, "MNIST", "raw")
    counts = {}
    for name, dims in MNIST_FILES.items():
        path = os.path.join(raw, name)
        gunzip_if_only_gz(path)
        if os.path.isdir(path):
            raise UserError(f"{path!r} is a directory where the MNIST file {name} should be; move it away")
        if os.path.isfile(path):
            counts[name] = idx_count(path, dims)
    for prefix in ("train", "t10k"):
        images, labels = (counts.get(f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
        if None not in (images, labels) and images != labels:
            raise UserError(f"MNIST files disagree in {raw!r}: {prefix}-images-idx3-ubyte holds {images} images "
                            f"but {prefix}-labels-idx1-ubyte holds {labels} labels; replace the wrong one")
    missing = [name for name in MNIST_FILES if name not in counts]
    for other in (root, os.path.join(root, "raw"), os.path.join(root, "MNIST")):
        if not counts and any(os.path.isfile(os.path.join(other, name)) for name in MNIST_FILES):
            raise UserError(f"MNIST files are in {other!r}, but torchvision reads them from {raw!r}: move them "
                            "there, or point DATA / --data-root at the folder that holds MNIST/raw")
    made, folder = [], os.path.abspath(raw)     # the folders a download creates, innermost first
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        return datasets.MNIST(root=root, train=train, download=bool(missing))
    except Exception as exc:  # urllib/HTTP/OSError/RuntimeError, depending on the mirror
        for folder in made:                     # a failed run leaves no new folder behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if not missing:
            raise UserError(f"cannot read MNIST from {raw!r} ({one_line(exc)})") from None
        raise UserError(f"MNIST file(s) {', '.join(missing)} not in {raw!r} and could not be downloaded "
                        f"({one_line(exc)}; no network?). Offline: copy the uncompressed files "
                        "(or their .gz) into DATA/MNIST/raw/ and pass DATA=... / --data-root") from None
