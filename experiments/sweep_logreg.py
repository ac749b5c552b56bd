"""`make sweep-logreg`: the assignment's "modify BATCH_SIZE / LR to see change in performance" as one
grid of logreg.py trainings, in parallel processes, written to OUT/sweep_logreg.json and drawn.

    python -m experiments.sweep_logreg --batch-sizes 64 256 --lrs 1e-3 1e-2 --epochs 5 [--mode default]

Each configuration is one logreg.train (in reference mode, the assignment's mlr): its history equals a
lone `logreg.py --reference` run's. The best is chosen on validation accuracy, never on test accuracy;
a diverging run is a result, marked so at its epoch.
"""
import json
import math
import multiprocessing
import os
import signal
import time

import lab.cli

if __name__ == "__main__":   # before numpy loads: the BLAS thread count is read then
    lab.cli.one_blas_thread_unless_set()

import logreg  # noqa: E402

import numpy as np  # noqa: E402

from lab.cli import ArgumentParser, UserError, add_common_args, positive_float, positive_int, run_main  # noqa: E402
from lab.files import check_can_create, ensure_writable_dir, plan_outputs, reading, write_json  # noqa: E402
from lab.machine import as_worker, cores, versions  # noqa: E402
from lab.plots import pyplot, save_figure  # noqa: E402

GRID_DEFAULTS = {"batch_size": [16, 64, 256, 1024], "lr": [1e-4, 1e-3, 1e-2, 1e-1]}
EPOCHS, VAL_FRACTION = 20, 0.1
JSON_NAME, FIGURE_NAME = "sweep_logreg.json", "sweep_logreg.png"
HISTORY_KEYS = ("train_loss", "val_acc", "test_acc")
NO_BEST = "no configuration converged: every one diverged, so none is best"


# --------------------------------------------------------------------- training

_SHARED = {}   # set before the workers fork: they inherit the data instead of reloading 0.5 GB


def run_task(config):
    """Train one configuration as logreg.py would; returns its run record. A diverging run is a
    result: its history up to the epoch whose loss diverged."""
    start, diverged = time.perf_counter(), None
    try:
        hist = logreg.train(*_SHARED["data"], config, on_epoch=_SHARED["report"])["history"]
    except logreg.Diverged as exc:   # raised before that epoch is recorded
        hist, diverged = exc.history, exc.epoch
        for key in HISTORY_KEYS:
            hist[key].append(math.nan)
    record = {"batch_size": config.batch_size, "lr": config.lr, "diverged": bool(diverged),
              "diverged_epoch": diverged, "seconds": time.perf_counter() - start}
    record.update({key: [logreg.finite_or_none(v) for v in hist[key]] for key in HISTORY_KEYS})
    record["final_val_acc"] = None if diverged else record["val_acc"][-1]
    record["final_test_acc"] = None if diverged else record["test_acc"][-1]
    return record


def run_all(data, cells, jobs, progress):
    """Every grid cell's run record, in grid order; they train in ``jobs`` forked processes."""
    from tqdm import tqdm

    _SHARED["data"] = data
    with tqdm(total=len(cells) * cells[0].epochs, desc="sweep", unit="epoch", disable=not progress) as bar:
        _SHARED["report"] = lambda epoch: bar.update(1)
        if jobs == 1 or len(cells) == 1:
            return [run_task(config) for config in cells]
        _SHARED["report"] = None   # a worker's epochs are not the parent's bar: it moves a run at a time
        # Interrupts wait while the workers fork, so that the pool stands and its cleanup is sure to run.
        unmasked = signal.pthread_sigmask(signal.SIG_BLOCK, lab.cli.STOPS)
        with multiprocessing.get_context("fork").Pool(min(jobs, len(cells), cores()), initializer=as_worker) as pool:
            signal.pthread_sigmask(signal.SIG_SETMASK, unmasked)
            runs = []
            for run in pool.imap(run_task, cells):   # leaving the block terminates the workers
                runs.append(run)
                bar.update(len(run["test_acc"]))
            return runs


def best_run(runs):
    """(run, epoch) with the highest validation accuracy over every epoch of every run that did not
    diverge; ties go to the earlier configuration in the grid, then the earlier epoch."""
    best = None
    for run in runs:
        if run["diverged"]:
            continue
        for epoch, val in enumerate(run["val_acc"], start=1):
            if val is not None and (best is None or val > best[0]):
                best = (val, run, epoch)
    if best is None:
        return None
    val, run, epoch = best
    return {"batch_size": run["batch_size"], "lr": run["lr"], "val_acc": val,
            "test_acc": run["test_acc"][epoch - 1], "epoch": epoch}


# --------------------------------------------------------------------- the figure

def draw(json_path, figures_dir):
    """The figure, from what sweep_logreg.json holds; a damaged file is named, with its repair."""
    with reading(json_path, "sweep-logreg"):
        with open(json_path) as f:
            sweep = json.load(f)
        if sweep["kind"] != "sweep_logreg":
            raise ValueError(f"a {sweep['kind']} result, not a sweep_logreg one")
        return plot_sweep(sweep, figures_dir)


def plot_sweep(sweep, figures_dir):
    """Final test accuracy over the grid: the best configuration (on validation) outlined in red, a
    diverged one grey, hatched and labelled with its epoch."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    batch_sizes, lrs, best = sweep["grid"]["batch_size"], sweep["grid"]["lr"], sweep["best"]
    runs = {(r["batch_size"], r["lr"]): r for r in sweep["runs"]}
    final = np.array([[math.nan if runs[(b, lr)]["diverged"] else runs[(b, lr)]["final_test_acc"] for lr in lrs]
                      for b in batch_sizes], dtype=float)
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(lrs), 2.4 + 0.8 * len(batch_sizes)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")
    image = ax.imshow(np.ma.masked_invalid(final), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), acc in np.ndenumerate(final):
        run = runs[(batch_sizes[i], lrs[j])]
        if run["diverged"]:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx", edgecolor="dimgray", lw=0))
        text = f"diverged\n(epoch {run['diverged_epoch']})" if run["diverged"] else f"{acc:.4f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if acc < 0.6 else "black")
        if best and (run["batch_size"], run["lr"]) == (best["batch_size"], best["lr"]):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=3))
    ax.set(xticks=range(len(lrs)), xticklabels=[f"{lr:g}" for lr in lrs], yticks=range(len(batch_sizes)),
           yticklabels=[str(b) for b in batch_sizes], xlabel="learning rate", ylabel="batch size")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="final test accuracy")
    mode = "the assignment's procedure" if sweep["mode"] == "reference" else "default training"
    chosen = NO_BEST if not best else (f"best on validation (red): batch {best['batch_size']}, lr {best['lr']:g}, "
                                       f"epoch {best['epoch']}, test {best['test_acc']:.4f}")
    fig.suptitle(f"Logistic regression, {sweep['epochs']} epochs, {mode}\n"
                 f"{logreg.describe(sweep['provenance']['train'])}\n{chosen}", fontsize=9)
    fig.tight_layout()
    ensure_writable_dir(figures_dir)
    return save_figure(fig, os.path.join(figures_dir, FIGURE_NAME), tight=False)


# --------------------------------------------------------------------- main

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    logreg.add_io_args(p, JSON_NAME)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=GRID_DEFAULTS["batch_size"],
                   metavar="B", help="batch sizes of the grid (SWEEP_BATCH)")
    p.add_argument("--lrs", type=positive_float, nargs="+", default=GRID_DEFAULTS["lr"], metavar="LR",
                   help="learning rates of the grid (SWEEP_LR)")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS, help="epochs per configuration (SWEEP_EPOCHS)")
    p.add_argument("--mode", choices=("reference", "default"), default="reference",
                   help="the assignment's procedure, or logreg.py's default training (SWEEP_MODE)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help="share of the training set held out to choose the best configuration")
    add_common_args(p, "seed", seed={"help": "seed of the validation split, initialization and shuffling"})
    p.add_argument("--jobs", type=positive_int, default=cores(),
                   help="processes that train configurations in parallel (at most the cores)")
    p.add_argument("--plot-only", action="store_true", help=f"only re-render the figure from OUT/{JSON_NAME}")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1): the best configuration is chosen on validation "
                f"accuracy; got {args.val_fraction}")
    for flag, values in (("--batch-sizes", args.batch_sizes), ("--lrs", args.lrs)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"{flag} lists {', '.join(f'{v:g}' for v in repeated)} more than once")
    return args


def main(argv=None):
    args = parse_args(argv)
    json_path, figure_path = os.path.join(args.out_dir, JSON_NAME), os.path.join(args.figures_dir, FIGURE_NAME)
    if args.plot_only:
        plan_outputs([figure_path])
        return print(f"wrote {draw(json_path, args.figures_dir)}")
    start = time.perf_counter()
    X, y, X_te, y_te, provenance = logreg.load_pair(args.train_mat, args.test_mat)
    logreg.split_validation(len(y), args.val_fraction, np.random.default_rng(0))   # fails early if it must
    for path in (args.out_dir, args.figures_dir):   # fail before training, create nothing yet
        check_can_create(path)
    plan_outputs([json_path, figure_path])
    if logreg.is_random_init(provenance["train"]):
        print(f"WARNING: {logreg.describe(provenance['train'])}")
    print(f"sweep: {len(args.batch_sizes)} batch sizes x {len(args.lrs)} learning rates, {args.epochs} epochs, "
          f"{args.mode} mode, train {X.shape}, test {X_te.shape}, {args.jobs} job(s)")
    cells = [logreg.TrainConfig.for_mode(args.mode, epochs=args.epochs, batch_size=b, lr=lr, seed=args.seed,
                                         val_fraction=args.val_fraction) for b in args.batch_sizes for lr in args.lrs]
    runs = run_all((X, logreg.get_one_hot(y), X_te, logreg.get_one_hot(y_te)), cells, args.jobs, not args.no_progress)
    sweep = {"kind": "sweep_logreg", "mode": args.mode, "epochs": args.epochs, "seed": args.seed,
             "val_fraction": args.val_fraction, "grid": {"batch_size": args.batch_sizes, "lr": args.lrs},
             "weights": provenance["train"]["weights"],
             "random_init_weights": logreg.is_random_init(provenance["train"]),
             "provenance": provenance, "seconds": time.perf_counter() - start, "jobs": args.jobs,
             "best": best_run(runs), "runs": runs, "versions": versions()}
    write_json(json_path, sweep)
    print(f"wrote {json_path}")
    print(f"wrote {draw(json_path, args.figures_dir)}")
    for run in runs:
        if run["diverged"]:
            print(f"  batch {run['batch_size']}, lr {run['lr']:g}: diverged at epoch {run['diverged_epoch']}")
    best = sweep["best"]
    print(f"best on validation: batch {best['batch_size']}, lr {best['lr']:g}, epoch {best['epoch']}: validation "
          f"{best['val_acc']:.4f}, test {best['test_acc']:.4f}; {sweep['seconds']:.1f} s" if best else NO_BEST)


if __name__ == "__main__":
    run_main(main)
