"""Write REPORT.md: one page with every result and figure that the pipeline saved, read from the saved
outputs only (it never trains); a stage that has not run is listed with the command that runs it.

    python -m experiments.report --out-dir artifacts --figures-dir figures --report REPORT.md
"""
import datetime
import os

from lab.cli import ArgumentParser, UserError, run_main
from lab.files import check_can_write_file, read_json, reading, write_text
from lab.machine import ISA_FLAGS, cpu_model_and_flags

# The assignment's published numbers, shown beside ours.
ASSIGNMENT_ACCURACY = 0.9705          # logistic regression on pretrained ResNet-50 features
ASSIGNMENT_VAE_LOSS = {1: 146.35, 15: 104.39}   # VAE training loss per image, epochs 1 and 15
FIGURES = {
    "logreg": ("logreg_test_accuracy.png", "roc.png", "confusion_matrix.png"),
    "vae": ("vae_loss.png", "vae_reconstructions.png", "vae_samples.png", "vae_latent.png", "vae_interpolation.png"),
    "sweep_logreg": ("sweep_logreg.png",),
    "sweep_vae": ("sweep_vae_loss.png", "sweep_vae_reconstructions.png", "vae_manifold_2d.png", "vae_latent_2d.png"),
}


def read_mat_metadata(path):
    """The metadata and sample count of a features .mat, without loading its features."""
    import numpy as np
    import scipy.io as sio

    if os.path.exists(path):
        with reading(path, "features"):
            shapes = {name: shape for name, shape, _ in sio.whosmat(path)}
            mat = sio.loadmat(path, variable_names=sorted(set(shapes) - {"features", "labels"}))
            meta = {key: np.squeeze(value) for key, value in mat.items() if not key.startswith("__")}
            meta = {key: str(v) if v.dtype.kind in "US" else v.item() for key, v in meta.items() if v.size == 1}
            return {**meta, "n": int(shapes["features"][0])}


def read_logreg_history(path):
    import numpy as np

    if os.path.exists(path):
        with reading(path, "logreg"), np.load(path, allow_pickle=False) as z:
            return z["test_acc"].tolist()


def collect(out_dir):
    """Every saved result the report shows; None for a stage that has not run."""
    def result(name, target):
        path = os.path.join(out_dir, name)
        return read_json(path, target) if os.path.exists(path) else None
    return {
        "train_mat": read_mat_metadata(os.path.join(out_dir, "mnist_train.mat")),
        "test_mat": read_mat_metadata(os.path.join(out_dir, "mnist_test.mat")),
        "logreg": result("logreg_metrics.json", "logreg"),
        "logreg_history": read_logreg_history(os.path.join(out_dir, "logreg.npz")),
        "vae": result("vae_metrics.json", "vae"),
        "sweep_logreg": result("sweep_logreg.json", "sweep-logreg"),
        "sweep_vae": result("sweep_vae.json", "sweep-vae"),
    }


def num(value, fmt):
    """A number as the report prints it; None (a non-finite result saved as null) as 'n/a'."""
    return "n/a" if value is None else format(value, fmt)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def provenance(a):
    train = a["train_mat"] or {}
    network = train.get("network", "ResNet-50")
    cpu, flags = cpu_model_and_flags()
    lines = ["## Provenance", ""]
    if train.get("weights_kind") == "random-init":
        lines += [f"> **WARNING: the {network} features come from RANDOM-INIT weights (`{train['weights']}`), "
                  "not ImageNet-pretrained ones. The classifier's accuracy and AUC below say nothing about transfer "
                  f"learning and are not the assignment's {ASSIGNMENT_ACCURACY}.**", ""]
    isa = ", ".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(ISA_FLAGS)
    return lines + table(("item", "value"), [
        ("report written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
        ("CPU", f"{cpu}; ISA: {isa}; {os.cpu_count()} logical CPUs"),
        ("torch / torchvision", f"{train.get('torch_version', 'n/a')} / {train.get('torchvision_version', 'n/a')}"),
        (f"{network} weights", train.get("weights", "features not extracted yet")),
    ])


def stages(a):
    def not_run(name, target):
        return (name, f"not run (`make {target}`)", "", "")
    rows = []
    for split in ("train", "test"):
        meta = a[f"{split}_mat"]
        if meta:
            seconds = meta["elapsed_seconds"]
            rows.append((f"features, {split}", f"{meta['n']} images, {meta['dtype']}", num(seconds, ".1f"),
                         f"{meta['n'] / seconds:.0f} img/s"))
        else:
            rows.append(not_run(f"features, {split}", "features"))
    lr, v = a["logreg"], a["vae"]
    if lr:
        rows.append(("logistic regression", f"{lr['config']['mode']} training, {lr['epochs_run']} epochs run",
                     num(lr["seconds"]["total"], ".1f"), f"{lr['epochs_run'] / lr['seconds']['train']:.2f} epochs/s"))
    else:
        rows.append(not_run("logistic regression", "logreg"))
    if v:
        rows.append(("VAE", f"z_dim {v['z_dim']}, {v['epochs']} epochs, {v['n_train']} train images",
                     num(v["seconds"], ".1f"), f"{v['n_train'] * v['epochs'] / v['seconds']:.0f} img/s"))
    else:
        rows.append(not_run("VAE", "vae"))
    for key, name in (("sweep_logreg", "sweep, logistic regression"), ("sweep_vae", "sweep, VAE z_dim")):
        s = a[key]
        if s:
            rows.append((name, f"{len(s['runs'])} configurations", num(s["seconds"], ".1f"), ""))
        else:
            rows.append(not_run(name, key.replace("_", "-")))
    return ["## Stages", ""] + table(("stage", "what ran", "wall time (s)", "throughput"), rows)


def logreg(a):
    lr, history = a["logreg"], a["logreg_history"]
    auc = lr["auc"]
    rows = [(f"class {k}", num(v, ".5f")) for k, v in sorted(auc["per_class"].items(), key=lambda kv: int(kv[0]))]
    rows += [("micro average", num(auc["micro"], ".5f")), ("macro average", num(auc["macro"], ".5f"))]
    random = " — RANDOM-INIT features" if lr.get("random_init_weights") else ""
    lines = ["## Logistic regression and ROC", "",
             f"Test accuracy **{num(lr['test_accuracy'], '.4f')}** (epoch {lr['best_epoch']} of {lr['epochs_run']}), "
             f"weights `{lr['weights']}`{random}; the assignment reports {ASSIGNMENT_ACCURACY} with pretrained "
             "features.", ""] + table(("ROC", "AUC"), rows)
    if history:
        lines += table(("classifier epoch", *map(str, range(1, len(history) + 1))),
                       [("test accuracy", *(num(x, ".4f") for x in history))])
    return lines


def vae(a):
    v = a["vae"]
    rows = [(i, num(train, ".2f"), num(test, ".2f"), num(recon, ".2f"), num(kl, ".2f"),
             num(ASSIGNMENT_VAE_LOSS.get(i), ".2f") if i in ASSIGNMENT_VAE_LOSS else "")
            for i, (train, test, recon, kl) in enumerate(zip(v["train_loss_per_epoch"], v["test_loss_per_epoch"],
                                                              v["test_recon_per_epoch"], v["test_kl_per_epoch"]), 1)]
    return ["## Variational autoencoder", "",
            f"z_dim {v['z_dim']}, {v['epochs']} epochs; the loss per image is what `loss_function` returns, the "
            "reconstruction term the summed BCE and the KL term the closed form, each computed on its own.", ""] + \
        table(("epoch", "train loss", "test loss", "test recon", "test KL", "assignment's train loss"), rows)


def sweep_logreg(a):
    s = a["sweep_logreg"]
    best, lrs = s["best"], s["grid"]["lr"]
    cells = {(r["batch_size"], r["lr"]): r for r in s["runs"]}
    rows = [[b] + ["—" if (b, lr) not in cells else "diverged" if cells[b, lr]["diverged"]
                   else num(cells[b, lr]["final_test_acc"], ".4f") for lr in lrs] for b in s["grid"]["batch_size"]]
    chosen = (f"Best on validation accuracy: batch {best['batch_size']}, lr {best['lr']:g} (validation "
              f"{num(best['val_acc'], '.4f')}, test {num(best['test_acc'], '.4f')})." if best
              else "No configuration converged: every one diverged, so none is best.")
    random = " (RANDOM-INIT features)" if s.get("random_init_weights") else ""
    return ["## Sweep: batch size x learning rate (logistic regression)", "",
            f"Mode `{s['mode']}`, {s['epochs']} epochs, seed {s['seed']}, weights `{s['weights']}`{random}. {chosen}",
            "", "Final test accuracy:", ""] + table(["batch \\ lr"] + [f"{lr:g}" for lr in lrs], rows)


def sweep_vae(a):
    s = a["sweep_vae"]
    rows = [(r["z_dim"], num(r["test_loss"][-1], ".2f"), num(r["test_recon"][-1], ".2f"), num(r["test_kl"][-1], ".2f"),
             num(r["train_loss"][-1], ".2f")) for r in s["runs"]]
    return ["## Sweep: latent size (VAE)", "", f"{s['epochs']} epochs each, seed {s['seed']}, batch {s['batch_size']}, "
            f"lr {s['lr']:g}; final losses per image.", ""] + \
        table(("z_dim", "test loss", "test recon", "test KL", "train loss"), rows)


def render(a, figures_dir, report_path):
    report_dir = os.path.dirname(os.path.abspath(report_path))
    lines = ["# MNIST lab: results", "", "Every number below is read from the saved outputs (`make report` "
             "writes this page again).", ""] + provenance(a) + stages(a)
    for key, section in (("logreg", logreg), ("vae", vae), ("sweep_logreg", sweep_logreg), ("sweep_vae", sweep_vae)):
        if a[key]:
            paths = [os.path.join(figures_dir, name) for name in FIGURES[key]]
            lines += section(a) + [f"![{os.path.basename(p)}]({os.path.relpath(p, report_dir)})" for p in paths
                                   if os.path.isfile(p)] + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="artifacts", help="where the saved results are (OUT)")
    p.add_argument("--figures-dir", default="figures", help="where the PNG figures are (FIGURES)")
    p.add_argument("--report", default="REPORT.md", help="the Markdown file to write (REPORT)")
    args = p.parse_args(argv)
    check_can_write_file(args.report)
    if not os.path.isdir(args.out_dir):
        raise UserError(f"no results folder {args.out_dir!r}; run `make all` first")
    write_text(args.report, render(collect(args.out_dir), args.figures_dir, args.report))
    print(f"wrote {args.report}")


if __name__ == "__main__":
    run_main(main)
