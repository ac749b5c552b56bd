"""Reading the features .mat files that extract_features.py writes, as logreg.py and its sweep do:
checked once, at the edge, and train and test only together when the same settings made them."""
import numpy as np

from lab.cli import UserError
from lab.files import reading

# The metadata that defines the features: train and test must agree on each.
PROVENANCE_KEYS = ("feature_dim", "weights", "weights_kind", "network", "preprocessing", "image_size", "dtype", "seed")


def load_features(path):
    """Features (float32, m x d, rows contiguous), labels (m) and metadata of one .mat."""
    import scipy.io as sio

    with reading(path, "features"):
        mat = sio.loadmat(path)
        X, y = mat["features"], mat["labels"].reshape(-1)
    if X.ndim != 2 or not len(X) or X.dtype.kind not in "fiu" or y.size != len(X) or not np.isin(y, range(10)).all():
        raise UserError(f"{path!r}: features must be real numbers, m x d with m >= 1, and labels 0-9, one per row; "
                        f"it holds {X.dtype} features {X.shape} and {y.size} labels")
    with np.errstate(over="ignore", invalid="ignore"):   # beyond float32's range becomes infinite here
        X = np.ascontiguousarray(X, dtype=np.float32)
        if not np.isfinite(X.sum(axis=0, dtype=np.float64)).all():   # one pass, no m x d mask
            raise UserError(f"{path!r}: features contain NaN or infinite values, or values beyond "
                            f"float32's range ({np.finfo(np.float32).max:.3g})")
    meta = {k: np.squeeze(v).tolist() for k, v in mat.items() if k not in ("features", "labels") and k[0] != "_"}
    return X, y.astype(np.int64), {"weights": "unknown", **meta, "feature_dim": X.shape[1]}


def load_pair(train_path, test_path):
    """Train and test features, which must come from the same extraction settings."""
    (X_tr, y_tr, meta_tr), (X_te, y_te, meta_te) = load_features(train_path), load_features(test_path)
    for key in PROVENANCE_KEYS:
        if meta_tr.get(key) != meta_te.get(key):
            raise UserError(f"train and test features differ in {key}: {meta_tr.get(key)!r} in {train_path!r}, "
                            f"{meta_te.get(key)!r} in {test_path!r}; extract both with the same settings, "
                            f"e.g. rm -f {train_path!r} {test_path!r} && make features")
    return X_tr, y_tr, X_te, y_te, {"train": meta_tr, "test": meta_te}


def is_random_init(meta):
    """Features from random-init weights (a .pth file, weights_kind "file", is not, nor known pretrained)."""
    if "weights_kind" in meta:
        return meta["weights_kind"] == "random-init"
    return str(meta.get("weights", "")).lower().startswith(("random", "none"))


def describe(meta):
    """The features as titles and log lines name them: their network and weights, RANDOM-INIT said loudly."""
    network = meta.get("network", "ResNet-50")
    if is_random_init(meta):
        return f"features from RANDOM-INIT {network} weights (not pretrained)"
    return f"{network} weights: {meta['weights']}"
