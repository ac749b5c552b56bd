"""matplotlib for files only: the Agg backend, and figures saved atomically."""
import os

from lab.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use: every figure goes to a file, so
    MPLBACKEND is ignored, and a value that matplotlib would reject cannot stop a run."""
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
