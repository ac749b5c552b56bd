"""`make sweep-logreg`: the assignment's "modify BATCH_SIZE / LR to see change in performance"
as one grid of logreg.py trainings, recorded epoch by epoch and drawn on one figure.

    python -m experiments.sweep_logreg                                # the grid of GRID_DEFAULTS
    python -m experiments.sweep_logreg --batch-sizes 64 256 --lrs 1e-3 1e-2 --epochs 5
    python -m experiments.sweep_logreg --mode default                # logreg.py's default training instead
    python -m experiments.sweep_logreg --plot-only                   # re-render the figure from the JSON

Each configuration trains on the training rows left after a validation split carved from the
training set (--val-fraction, the same rows for all), and records per epoch its training loss,
validation accuracy and test accuracy. The best configuration (and epoch) is chosen on
validation accuracy, never on test accuracy. A diverging loss (logreg.diverged: no longer finite,
or beyond logreg.DIVERGED_LOSS) is a result: that configuration is marked diverged at that epoch,
and the others go on.

Each configuration is one call of logreg.train, the very training a lone logreg.py run makes
(in the reference mode, the default, one call of the assignment's mlr), in parallel processes
(--jobs). So a configuration's history equals a lone `logreg.py --reference --batch-size B --lr LR
--epochs E --val-fraction F` run of it.

Outputs: OUT/sweep_logreg.json, then FIGURES/sweep_logreg.png.
"""
import json
import math
import multiprocessing
import os
import queue
import signal
import time

import lab.cli

if __name__ == "__main__":   # before numpy loads: the BLAS thread count is read then
    lab.cli.one_blas_thread_unless_set()

import logreg  # noqa: E402

import numpy as np  # noqa: E402

from lab.cli import ArgumentParser, UserError, add_common_args, positive_float, positive_int, run_main  # noqa: E402
from lab.files import check_can_create, ensure_writable_dir, plan_outputs, reading, write_json  # noqa: E402
from lab.machine import versions  # noqa: E402
from lab.plots import pyplot, save_figure  # noqa: E402

GRID_DEFAULTS = {"batch_size": [16, 64, 256, 1024], "lr": [1e-4, 1e-3, 1e-2, 1e-1]}
EPOCHS, VAL_FRACTION = 20, 0.1
JSON_NAME, FIGURE_NAME = "sweep_logreg.json", "sweep_logreg.png"
SECONDS_NOTE = "wall seconds of the training call that produced the run"
HISTORY_KEYS = ("train_loss", "val_acc", "test_acc")
NO_BEST = "no configuration converged: every one diverged, so none is best"


# --------------------------------------------------------------------- training

def configs(mode, batch_sizes, lrs, epochs, seed, val_fraction):
    """The TrainConfig of every grid cell, batch size major."""
    return [logreg.TrainConfig.for_mode(mode, epochs=epochs, batch_size=b, lr=lr, seed=seed,
                                        val_fraction=val_fraction)
            for b in batch_sizes for lr in lrs]


_SHARED = {}   # set before the workers fork: they inherit the data instead of reloading 0.5 GB


def run_task(config):
    """Train one configuration as logreg.py would; returns its run record. A diverging run is a
    result: its history up to the epoch whose loss diverged."""
    X, L, X_te, L_te = _SHARED["data"]
    start = time.perf_counter()
    try:
        result = logreg.train(X, L, X_te, L_te, config, on_epoch=_SHARED["report"])
    except logreg.Diverged as exc:
        result = {"history": exc.history, "diverged_epoch": exc.epoch}
    return run_record(config, result, time.perf_counter() - start)


def run_record(config, result, seconds):
    hist = result["history"]
    diverged = result.get("diverged_epoch")
    if diverged and len(hist["train_loss"]) < diverged:   # training raises before recording that epoch
        for key in HISTORY_KEYS:
            hist[key].append(math.nan)
    record = {"batch_size": config.batch_size, "lr": config.lr, "diverged": bool(diverged),
              "diverged_epoch": diverged, "seconds": seconds}
    record.update({key: [logreg.finite_or_none(v) for v in hist[key]] for key in HISTORY_KEYS})
    record["final_val_acc"] = None if diverged else record["val_acc"][-1]
    record["final_test_acc"] = None if diverged else record["test_acc"][-1]
    return record


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def _init_worker(progress_queue):
    # The parent handles Ctrl-C and SIGTERM and ends the workers; they must neither print a
    # traceback nor turn the parent's SIGTERM into an exception of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)   # blocked by the parent while it forked
    _SHARED["report"] = lambda epoch: progress_queue.put(1)


def run_all(data, cells, jobs, progress):
    """Every grid cell's run record, in grid order; they train in ``jobs`` forked processes."""
    from tqdm import tqdm

    _SHARED["data"] = data
    with tqdm(total=len(cells) * cells[0].epochs, desc="sweep", unit="epoch", disable=not progress) as bar:
        try:
            if jobs == 1 or len(cells) == 1 or "fork" not in multiprocessing.get_all_start_methods():
                _SHARED["report"] = lambda epoch: bar.update(1)
                return [run_task(config) for config in cells]
            return _run_parallel(cells, min(jobs, len(cells)), bar)
        finally:
            _SHARED.clear()


def _run_parallel(work, jobs, bar):
    context = multiprocessing.get_context("fork")
    progress_queue = context.Queue()
    # An interrupt in the middle of forking would land in fork's own handlers (and be lost), so
    # interrupts wait until the pool stands and the cleanup below is sure to run.
    unmasked = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    pool = None
    try:
        pool = context.Pool(jobs, initializer=_init_worker, initargs=(progress_queue,))
        signal.pthread_sigmask(signal.SIG_SETMASK, unmasked)
        pending = pool.map_async(run_task, work, chunksize=1)
        while not pending.ready():
            try:
                bar.update(progress_queue.get(timeout=0.2))
            except queue.Empty:
                pass
        return pending.get()
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)   # a second Ctrl-C must not cut the cleanup short
        if pool is not None:
            pool.terminate()   # also on Ctrl-C: no worker outlives the sweep
            pool.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, unmasked)


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


# --------------------------------------------------------------------- the JSON

def sweep_json(args, runs, provenance, seconds):
    meta = provenance["train"]
    return {
        "kind": "sweep_logreg", "mode": args.mode, "epochs": args.epochs, "seed": args.seed,
        "val_fraction": args.val_fraction, "grid": {"batch_size": args.batch_sizes, "lr": args.lrs},
        "weights": meta["weights"], "random_init_weights": logreg.is_random_init(meta),
        "provenance": provenance, "seconds": seconds, "jobs": args.jobs, "seconds_note": SECONDS_NOTE,
        "best": best_run(runs), "runs": runs, "versions": versions(),
    }


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
    """Heatmap of final test accuracy over the grid, beside small multiples of validation and test
    accuracy per epoch for each configuration; the best one (on validation) is outlined."""
    plt = pyplot()
    batch_sizes, lrs = sweep["grid"]["batch_size"], sweep["grid"]["lr"]
    runs = {(r["batch_size"], r["lr"]): r for r in sweep["runs"]}
    best = sweep["best"]
    fig = plt.figure(figsize=(6.0 + 2.4 * len(lrs), max(6.0, 1.9 * len(batch_sizes) + 1.8)))
    outer = fig.add_gridspec(1, 2, width_ratios=[1.0, 0.5 * len(lrs) + 0.4], wspace=0.25)
    _heatmap(fig.add_subplot(outer[0]), batch_sizes, lrs, runs, best)
    small = outer[1].subgridspec(len(batch_sizes), len(lrs), hspace=0.55, wspace=0.15)
    first = None
    for i, b in enumerate(batch_sizes):
        for j, lr in enumerate(lrs):
            ax = fig.add_subplot(small[i, j], sharex=first, sharey=first)
            first = first or ax
            _small_multiple(ax, runs[(b, lr)], best, bottom=i == len(batch_sizes) - 1, left=j == 0)
    legend = {}   # one entry per label, whichever small multiple drew it
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower right", bbox_to_anchor=(0.98, 0.825), fontsize=8, ncol=3)
    mode = "the assignment's procedure (--reference)" if sweep["mode"] == "reference" else "default training"
    weights = logreg.describe(sweep["provenance"]["train"])
    if best:
        chosen = (f"best on validation: batch {best['batch_size']}, lr {best['lr']:g}, epoch {best['epoch']} "
                  f"(validation {best['val_acc']:.4f}, test {best['test_acc']:.4f})")
    else:
        chosen = NO_BEST
    fig.suptitle(f"Logistic regression, batch size x learning rate, {sweep['epochs']} epochs, {mode}\n"
                 f"{weights}\n{chosen}", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.79)
    ensure_writable_dir(figures_dir)
    return save_figure(fig, os.path.join(figures_dir, FIGURE_NAME), tight=False)


def _heatmap(ax, batch_sizes, lrs, runs, best):
    final = np.array([[_number(runs[(b, lr)]["final_test_acc"]) for lr in lrs] for b in batch_sizes])
    image = ax.imshow(np.ma.masked_invalid(final), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    image.cmap.set_bad("lightgray")
    for i, b in enumerate(batch_sizes):
        for j, lr in enumerate(lrs):
            run = runs[(b, lr)]
            if run["diverged"]:
                text, color = f"diverged\n(epoch {run['diverged_epoch']})", "black"
                ax.add_patch(_cell(ax, j, i, hatch="xx", edgecolor="dimgray", lw=0))
            else:
                text, color = f"{final[i, j]:.4f}", "white" if final[i, j] < 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
            if best and (b, lr) == (best["batch_size"], best["lr"]):
                ax.add_patch(_cell(ax, j, i, edgecolor="red", lw=3))
    ax.set(xticks=range(len(lrs)), xticklabels=[f"{lr:g}" for lr in lrs], yticks=range(len(batch_sizes)),
           yticklabels=[str(b) for b in batch_sizes], xlabel="learning rate", ylabel="batch size",
           title="final test accuracy (red: best on validation)")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03)


def _cell(ax, x, y, **style):
    from matplotlib.patches import Rectangle
    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, **style)


def _small_multiple(ax, run, best, bottom, left):
    epochs = np.arange(1, len(run["test_acc"]) + 1)
    ax.plot(epochs, [_number(v) for v in run["val_acc"]], lw=1.2, label="validation accuracy")
    ax.plot(epochs, [_number(v) for v in run["test_acc"]], lw=1.2, linestyle="--", label="test accuracy")
    if best and (run["batch_size"], run["lr"]) == (best["batch_size"], best["lr"]):
        ax.axvline(best["epoch"], color="red", lw=1, label="best epoch (validation)")
        for side in ax.spines.values():
            side.set(color="red", linewidth=2)
    if run["diverged"]:
        ax.text(0.5, 0.5, f"diverged at\nepoch {run['diverged_epoch']}", transform=ax.transAxes,
                ha="center", va="center", fontsize=8, color="darkred")
    ax.set_ylim(0, 1)
    ax.set_title(f"batch {run['batch_size']}, lr {run['lr']:g}", fontsize=8)
    ax.tick_params(labelsize=7, labelbottom=bottom, labelleft=left)
    ax.grid(alpha=0.3)
    if bottom:
        ax.set_xlabel("epoch", fontsize=8)


def _number(value):
    return math.nan if value is None else value


# --------------------------------------------------------------------- main

def reject_repeats(flag, values):
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"{flag} lists {', '.join(f'{v:g}' for v in repeated)} more than once")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    logreg.add_io_args(p, JSON_NAME)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=GRID_DEFAULTS["batch_size"],
                   metavar="B", help="batch sizes of the grid (SWEEP_BATCH)")
    p.add_argument("--lrs", type=positive_float, nargs="+", default=GRID_DEFAULTS["lr"], metavar="LR",
                   help="learning rates of the grid (SWEEP_LR)")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS, help="epochs per configuration (SWEEP_EPOCHS)")
    p.add_argument("--mode", choices=("reference", "default"), default="reference",
                   help="reference: the assignment's procedure (raw features, plain SGD, constant lr); "
                        "default: logreg.py's default training (SWEEP_MODE)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help="share of the training set held out to choose the best configuration")
    add_common_args(p, "seed", seed={"help": "seed of the validation split, initialization and shuffling"})
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                   help="processes that train configurations in parallel")
    p.add_argument("--plot-only", action="store_true", help=f"only re-render the figure from OUT/{JSON_NAME}")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1): the best configuration is chosen on validation "
                f"accuracy; got {args.val_fraction}")
    reject_repeats("--batch-sizes", args.batch_sizes)
    reject_repeats("--lrs", args.lrs)
    return args


def main(argv=None):
    args = parse_args(argv)
    json_path = os.path.join(args.out_dir, JSON_NAME)
    figure_path = os.path.join(args.figures_dir, FIGURE_NAME)
    if args.plot_only:
        plan_outputs([figure_path])
        print(f"wrote {draw(json_path, args.figures_dir)}")
        return

    start = time.perf_counter()
    cells = configs(args.mode, args.batch_sizes, args.lrs, args.epochs, args.seed, args.val_fraction)
    X, y, X_te, y_te, provenance = logreg.load_pair(args.train_mat, args.test_mat)
    logreg.split_validation(len(y), args.val_fraction, np.random.default_rng(0))   # fails early if it must
    for path in (args.out_dir, args.figures_dir):   # fail before training, create nothing yet
        check_can_create(path)
    plan_outputs([json_path, figure_path])
    if logreg.is_random_init(provenance["train"]):
        print(f"WARNING: {logreg.describe(provenance['train'])}")
    print(f"sweep: {len(args.batch_sizes)} batch sizes x {len(args.lrs)} learning rates, {args.epochs} epochs, "
          f"{args.mode} mode, train {X.shape}, test {X_te.shape}, {args.jobs} job(s)")
    runs = run_all((X, logreg.get_one_hot(y), X_te, logreg.get_one_hot(y_te)), cells, args.jobs,
                   not args.no_progress)
    sweep = sweep_json(args, runs, provenance, time.perf_counter() - start)
    write_json(json_path, sweep)
    print(f"wrote {json_path}")
    print(f"wrote {draw(json_path, args.figures_dir)}")
    for run in runs:
        final = "diverged at epoch %d" % run["diverged_epoch"] if run["diverged"] else (
            f"val {run['final_val_acc']:.4f}, test {run['final_test_acc']:.4f}")
        print(f"  batch {run['batch_size']:>5}, lr {run['lr']:<7g}: {final}")
    best = sweep["best"]
    if best:
        print(f"best on validation: batch {best['batch_size']}, lr {best['lr']:g}, epoch {best['epoch']}: "
              f"validation {best['val_acc']:.4f}, test {best['test_acc']:.4f}; {sweep['seconds']:.1f} s"
              + ("  [RANDOM-INIT features]" if sweep["random_init_weights"] else ""))
    else:
        print(NO_BEST)


if __name__ == "__main__":
    run_main(main)
