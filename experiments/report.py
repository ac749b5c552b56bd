"""Write REPORT.md: one page with every result of this checkout's artifacts.

Reads only what the other scripts saved (the .mat metadata, logreg_metrics.json,
logreg.npz, vae_metrics.json, vae.pt, sweep_logreg.json, sweep_vae.json) and the
figures beside them; it never trains. A stage that has not run yet is listed
with the command that runs it.

    python -m experiments.report                                   # artifacts/ + figures/ -> REPORT.md
    python -m experiments.report --out-dir /tmp/a --figures-dir /tmp/f --report /tmp/REPORT.md
"""
import datetime
import os

from lab.cli import ArgumentParser, UserError, run_main
from lab.files import atomic_path, check_can_write_file, read_json
from lab.machine import ISA_FLAGS, cpu_model_and_flags

# The assignment's published numbers, shown beside ours for comparison.
ASSIGNMENT_ACCURACY = 0.9705          # logistic regression on pretrained ResNet-50 features
ASSIGNMENT_VAE_LOSS = {1: 146.35, 15: 104.39}   # VAE training loss per sample, epochs 1 and 15

LOGREG_FIGURES = ("logreg_test_accuracy.png", "roc.png", "confusion_matrix.png")
VAE_FIGURES = ("vae_loss.png", "vae_reconstructions.png", "vae_samples.png", "vae_latent.png",
               "vae_interpolation.png")
SWEEP_LOGREG_FIGURES = ("sweep_logreg.png",)
SWEEP_VAE_FIGURES = ("sweep_vae_loss.png", "sweep_vae_reconstructions.png", "vae_manifold_2d.png",
                     "vae_latent_2d.png")


# ----------------------------------------------------------------- reading

def read_result(path, make_target):
    """A results JSON file, or None when its stage has not run yet."""
    return read_json(path, make_target) if os.path.exists(path) else None   # a directory there is an error


def read_mat_metadata(path):
    """The metadata and the sample count of a features .mat, without loading its features."""
    import numpy as np
    import scipy.io as sio

    if not os.path.isfile(path):
        return None
    try:
        shapes = {name: shape for name, shape, _ in sio.whosmat(path)}
        mat = sio.loadmat(path, variable_names=sorted(set(shapes) - {"features", "labels"}))
    except Exception as exc:   # scipy raises several types for a damaged or foreign file
        raise UserError(f"cannot read {path!r} as a features .mat ({type(exc).__name__}); "
                        "run `make features` again") from None
    meta = {}
    for key, value in mat.items():
        if key.startswith("__"):
            continue
        value = np.squeeze(value)
        meta[key] = str(value) if value.dtype.kind in "US" else (value.item() if value.size == 1 else value.tolist())
    meta["n"] = int(shapes["features"][0])
    return meta


def read_logreg_history(path):
    """Per-epoch test accuracy from logreg.npz, or None."""
    import numpy as np

    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"test_acc": z["test_acc"].tolist(), "val_acc": z["val_acc"].tolist(),
                    "train_loss": z["train_loss"].tolist()}
    except Exception as exc:
        raise UserError(f"cannot read {path!r} ({type(exc).__name__}); run `make logreg` again") from None


# --------------------------------------------------------------- formatting

def num(value, fmt):
    """A number as the report prints it; None (a non-finite result saved as null) as 'n/a'."""
    return "n/a" if value is None else format(value, fmt)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def figures(names, figures_dir, report_dir):
    """Markdown image links, relative to the report's folder, for the figures that exist."""
    out = []
    for name in names:
        path = os.path.join(figures_dir, name)
        if os.path.isfile(path):
            out.append(f"![{name}]({os.path.relpath(path, report_dir)})")
    return out


def is_random(meta):
    weights = str(meta.get("weights", "")).lower()
    return weights.startswith("random") or weights == "none"


# ------------------------------------------------------------------ sections

def provenance_section(a):
    train = a["train_mat"] or {}
    versions = ((a["vae"] or {}).get("versions") or {})
    cpu, flags = cpu_model_and_flags()
    lines = ["## Provenance", ""]
    if train and is_random(train):
        lines += ["> **WARNING: the ResNet-50 features come from RANDOM-INIT weights "
                  f"(`{train['weights']}`), not ImageNet-pretrained ones. The classifier's accuracy "
                  f"and AUC below say nothing about transfer learning and are not the assignment's "
                  f"{ASSIGNMENT_ACCURACY}.**", ""]
    lines += table(("item", "value"), [
        ("report written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
        ("CPU", f"{cpu}; ISA: {', '.join(f for f in ISA_FLAGS if f in flags) or 'none of ' + '/'.join(ISA_FLAGS)}; "
                f"{os.cpu_count()} logical CPUs"),
        ("torch / torchvision", f"{train.get('torch_version') or versions.get('torch', 'n/a')} / "
                                f"{train.get('torchvision_version') or versions.get('torchvision', 'n/a')}"),
        ("ResNet-50 weights", train.get("weights", "features not extracted yet")),
    ])
    return lines + [""]


def stages_section(a):
    rows = []
    for split in ("train", "test"):
        meta = a[f"{split}_mat"]
        if meta:
            seconds = meta.get("elapsed_seconds")
            rows.append((f"features, {split}", f"{meta['n']} images, {meta.get('dtype', 'float32')}, "
                         f"{meta.get('threads', '?')} threads", num(seconds, ".1f"),
                         f"{meta['n'] / seconds:.0f} img/s" if seconds else "n/a"))
        else:
            rows.append((f"features, {split}", "not run (`make features`)", "", ""))
    lr = a["logreg"]
    if lr:
        mode = "reference procedure" if lr["config"].get("mode") == "reference" else "default training"
        rows.append(("logistic regression", f"{mode}, {lr['epochs_run']} epochs run",
                     num(lr["seconds"]["total"], ".1f"),
                     f"{lr['epochs_run'] / lr['seconds']['train']:.2f} epochs/s (training)"))
    else:
        rows.append(("logistic regression", "not run (`make logreg`)", "", ""))
    v = a["vae"]
    if v:
        rows.append(("VAE", f"z_dim {v['z_dim']}, {v['epochs']} epochs, {v['n_train']} train images, "
                     f"{v.get('threads', '?')} threads", num(v["seconds"], ".1f"),
                     f"{v['n_train'] * v['epochs'] / v['seconds']:.0f} img/s"))
    else:
        rows.append(("VAE", "not run (`make vae`)", "", ""))
    for key, name, target in (("sweep_logreg", "sweep, logistic regression", "sweep-logreg"),
                              ("sweep_vae", "sweep, VAE z_dim", "sweep-vae")):
        s = a[key]
        if s:
            count = len(s["runs"])
            rows.append((name, f"{count} configurations", num(s["seconds"], ".1f"),
                         f"{count / s['seconds'] * 60:.1f} configurations/min"))
        else:
            rows.append((name, f"not run (`make {target}`)", "", ""))
    return ["## Stages", ""] + table(("stage", "what ran", "wall time (s)", "throughput"), rows) + [""]


def logreg_section(a, figures_dir, report_dir):
    lr = a["logreg"]
    if not lr:
        return []
    auc = lr["auc"]
    lines = ["## Logistic regression and ROC", ""]
    random = lr.get("random_init_weights")
    lines += [f"Test accuracy **{num(lr['test_accuracy'], '.4f')}** (epoch {lr['best_epoch']} of "
              f"{lr['epochs_run']}), weights `{lr['weights']}`"
              + (" — RANDOM-INIT features" if random else "")
              + f"; the assignment reports {ASSIGNMENT_ACCURACY} with pretrained features.", ""]
    rows = [(f"class {k}", num(v, ".5f")) for k, v in sorted(auc["per_class"].items(), key=lambda kv: int(kv[0]))]
    rows += [("micro average", num(auc["micro"], ".5f")), ("macro average", num(auc["macro"], ".5f"))]
    lines += table(("ROC", "AUC"), rows) + [""]
    hist = a["logreg_history"]
    if hist:
        lines += table(("classifier epoch",) + tuple(str(i + 1) for i in range(len(hist["test_acc"]))),
                       [("test accuracy",) + tuple(num(x, ".4f") for x in hist["test_acc"])]) + [""]
    return lines + figures(LOGREG_FIGURES, figures_dir, report_dir) + [""]


def vae_section(a, figures_dir, report_dir):
    v = a["vae"]
    if not v:
        return []
    lines = ["## Variational autoencoder", "",
             f"z_dim {v['z_dim']}, {v['epochs']} epochs, loss per image (summed BCE + KL), "
             f"beside the assignment's published training loss.", ""]
    train, test = v["train_loss_per_epoch"], v["test_loss_per_epoch"]
    recon, kl = v.get("test_recon_per_epoch"), v.get("test_kl_per_epoch")
    rows = []
    for i in range(len(train)):
        row = [str(i + 1), num(train[i], ".2f"), num(test[i], ".2f") if i < len(test) else ""]
        if recon and kl:
            row += [num(recon[i], ".2f"), num(kl[i], ".2f")]
        row.append(num(ASSIGNMENT_VAE_LOSS.get(i + 1), ".2f") if i + 1 in ASSIGNMENT_VAE_LOSS else "")
        rows.append(row)
    header = ["epoch", "train loss", "test loss"] + (["test recon", "test KL"] if recon and kl else [])
    lines += table(header + ["assignment's train loss"], rows) + [""]
    return lines + figures(VAE_FIGURES, figures_dir, report_dir) + [""]


def sweep_logreg_section(a, figures_dir, report_dir):
    s = a["sweep_logreg"]
    if not s:
        return []
    best = s["best"]
    lines = ["## Sweep: batch size x learning rate (logistic regression)", "",
             f"Mode `{s['mode']}`, {s['epochs']} epochs, seed {s['seed']}, weights `{s['weights']}`"
             + (" (RANDOM-INIT features)" if s.get("random_init_weights") else "")
             + (f". Best on validation accuracy: batch {best['batch_size']}, lr {best['lr']:g} "
                f"(validation {num(best['val_acc'], '.4f')}, test {num(best['test_acc'], '.4f')})." if best
                else ". No configuration converged: every one diverged, so none is best."), ""]
    lrs = s["grid"]["lr"]
    cells = {(r["batch_size"], r["lr"]): r for r in s["runs"]}
    rows = []
    for b in s["grid"]["batch_size"]:
        row = [str(b)]
        for lr in lrs:
            r = cells.get((b, lr))
            row.append("—" if r is None else "diverged" if r["diverged"] else num(r["final_test_acc"], ".4f"))
        rows.append(row)
    lines += ["Final test accuracy:", ""]
    lines += table(["batch \\ lr"] + [f"{lr:g}" for lr in lrs], rows) + [""]
    return lines + figures(SWEEP_LOGREG_FIGURES, figures_dir, report_dir) + [""]


def sweep_vae_section(a, figures_dir, report_dir):
    s = a["sweep_vae"]
    if not s:
        return []
    lines = ["## Sweep: latent size (VAE)", "",
             f"{s['epochs']} epochs each, seed {s['seed']}, batch {s['batch_size']}, lr {s['lr']:g}; "
             "final test loss per image and its two terms.", ""]
    rows = [(str(r["z_dim"]), num(r["test_loss"][-1], ".2f"), num(r["test_recon"][-1], ".2f"),
             num(r["test_kl"][-1], ".2f"), num(r["train_loss"][-1], ".2f")) for r in s["runs"]]
    lines += table(("z_dim", "test loss", "test recon", "test KL", "train loss"), rows) + [""]
    return lines + figures(SWEEP_VAE_FIGURES, figures_dir, report_dir) + [""]


def collect(out_dir):
    """Every saved result this report shows (None for a stage that has not run)."""
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    return {
        "train_mat": read_mat_metadata(path("mnist_train.mat")),
        "test_mat": read_mat_metadata(path("mnist_test.mat")),
        "logreg": read_result(path("logreg_metrics.json"), "logreg"),
        "logreg_history": read_logreg_history(path("logreg.npz")),
        "vae": read_result(path("vae_metrics.json"), "vae"),
        "sweep_logreg": read_result(path("sweep_logreg.json"), "sweep-logreg"),
        "sweep_vae": read_result(path("sweep_vae.json"), "sweep-vae"),
    }


def render(artifacts, figures_dir, report_path):
    report_dir = os.path.dirname(os.path.abspath(report_path))
    lines = ["# MNIST lab: results", "",
             "Every number below is read from the saved artifacts (`make report` regenerates this page).", ""]
    lines += provenance_section(artifacts)
    lines += stages_section(artifacts)
    lines += logreg_section(artifacts, figures_dir, report_dir)
    lines += vae_section(artifacts, figures_dir, report_dir)
    lines += sweep_logreg_section(artifacts, figures_dir, report_dir)
    lines += sweep_vae_section(artifacts, figures_dir, report_dir)
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="artifacts", help="where the saved results are (OUT)")
    p.add_argument("--figures-dir", default="figures", help="where the PNG figures are (FIGURES)")
    p.add_argument("--report", default="REPORT.md", help="the Markdown file to write (REPORT)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_can_write_file(args.report)
    if not os.path.isdir(args.out_dir):
        raise UserError(f"no results folder {args.out_dir!r}; run `make all` first")
    text = render(collect(args.out_dir), args.figures_dir, args.report)
    with atomic_path(args.report) as tmp, open(tmp, "w") as f:
        f.write(text)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    run_main(main)
