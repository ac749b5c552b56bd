"""`make sweep-vae`: one VAE per latent size, to see what z_dim does to the loss,
its reconstruction and KL terms, the reconstructions and the latent space.

Each z_dim (2, 5, 10, 20, 50 by default) is trained by vae.py's own training
(vae.train_model), in a spawned process of its own, several at once (by default
all of them, each on an equal share of torch's threads). So the z_dim-20 run of a
sweep is a lone `vae.py` run with the same settings and thread count (the tests
check it, exactly).

    python -m experiments.sweep_vae --data-root data --out-dir artifacts --figures-dir figures
    python -m experiments.sweep_vae --z-dims 2 20 --epochs 2 --limit 2000      # a quick look
    python -m experiments.sweep_vae --plot-only                                 # figures from OUT/sweep_vae/
"""
import dataclasses
import io
import multiprocessing
import os
import signal
import time

import torch

import vae
from lab import vae_figures as vf
from lab.cli import ArgumentParser, UserError, add_common_args, positive_float, positive_int, run_main
from lab.files import check_can_create, plan_outputs, read_json, write_json
from lab.machine import resolve_device, versions
from lab.mnist import load_mnist

SUMMARY_NAME = "sweep_vae.json"
CHECKPOINT_DIR = "sweep_vae"      # under OUT: one vae.py checkpoint per z_dim
FIGURE_NAMES = ("sweep_vae_loss.png", "sweep_vae_reconstructions.png", "vae_manifold_2d.png",
                "vae_latent_2d.png")
DEFAULT_Z_DIMS = (2, 5, 10, 20, 50)
MANIFOLD_SIDE = 20
RUN_KEYS = ("z_dim", "seconds", *vae.HISTORY_KEYS)


def checkpoint_path(out_dir, z_dim):
    return os.path.join(out_dir, CHECKPOINT_DIR, f"vae_z{z_dim}.pt")


def figure_paths(figures_dir):
    return [os.path.join(figures_dir, name) for name in FIGURE_NAMES]


# ----------------------------------------------------------------- training

def train_one(config):
    """A spawned process: vae.py's training of one config; (state_dict, history, run) as bytes
    (torch would pass tensors through shared memory, gone once the process exits)."""
    train_x, test_x, _ = vae.load_splits(config.data_root, config.limit)
    model, history, run = vae.train_model(config, train_x, test_x, log=None, progress=False)
    buffer = io.BytesIO()
    torch.save((model.state_dict(), history, run), buffer)
    return buffer.getvalue()


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the parent, which stops us


def train_all(config, z_dims, processes, device):
    """{z_dim: (model, history, run)}, each z_dim trained by train_one in ``processes`` spawned
    processes; each run's epoch lines are printed as it comes back."""
    context = multiprocessing.get_context("spawn")    # a fork of a process running OpenMP can hang
    pool = context.Pool(processes, initializer=_ignore_sigint)
    results = {}
    try:
        configs = [dataclasses.replace(config, z_dim=z_dim) for z_dim in z_dims]
        for z_dim, payload in zip(z_dims, pool.imap(train_one, configs)):
            state, history, run = torch.load(io.BytesIO(payload), weights_only=True)
            for epoch in range(1, len(history["train_loss"]) + 1):
                print(vae.epoch_line(epoch, config.epochs, history, label=f"z={z_dim}"))
            model = vae.VAE(z_dim)
            model.load_state_dict(state)
            results[z_dim] = (model.to(device), history, run)
    finally:
        pool.terminate()    # also on Ctrl-C or an error: no worker outlives the sweep
        pool.join()
    return results


def sweep(args):
    device = resolve_device(args.device)
    processes = args.processes or (len(args.z_dims) if device.type == "cpu" else 1)
    threads = args.threads or max(1, torch.get_num_threads() // processes)
    config = dataclasses.replace(vae.DEFAULTS, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, data_root=args.data_root, limit=args.limit, device=args.device,
                                 threads=threads)
    check_can_create(os.path.join(args.out_dir, CHECKPOINT_DIR))
    check_can_create(args.figures_dir)
    # the largest z_dims may train at the same time
    vae.check_memory(sorted(args.z_dims, reverse=True)[:processes], config.batch_size, config.limit, device,
                     flag="--z-dims")
    load_mnist(config.data_root, train=True)    # a missing or damaged split fails here, before any process starts
    test_x, test_y = vae.preload(load_mnist(config.data_root, train=False), config.limit)
    summary_path = os.path.join(args.out_dir, SUMMARY_NAME)
    checkpoints = [checkpoint_path(args.out_dir, z) for z in args.z_dims]
    # The checkpoints, then the summary (the Make target), then the figures (their own rule).
    plan_outputs([*checkpoints, summary_path, *figure_paths(args.figures_dir)])
    print(f"VAE sweep, z_dims {' '.join(map(str, args.z_dims))}: {config.epochs} epochs, batch {config.batch_size}, "
          f"lr {config.lr}, {device}, {processes} process(es) of {threads} thread(s)")
    start = time.perf_counter()
    results = train_all(config, args.z_dims, processes, device)
    seconds = time.perf_counter() - start
    n_train = results[args.z_dims[0]][2]["n_train"]
    runs = []
    for z_dim, path in zip(args.z_dims, checkpoints):
        model, history, run_info = results[z_dim]
        vae.save_checkpoint(path, model, config=dataclasses.replace(config, z_dim=z_dim), history=history,
                            run=run_info)
        print(f"wrote {path}")
        runs.append({"z_dim": z_dim, "seconds": round(run_info["seconds"], 3),
                     "checkpoint": os.path.relpath(path, args.out_dir), "epoch_threads": history["threads"],
                     **{key: history[key] for key in vae.HISTORY_KEYS}})
    strategy = (f"each z_dim trained by vae.py's own training (vae.train_model) in a spawned process, "
                f"{processes} at once, {threads} thread(s) each; runs[].seconds is its training time")
    summary = {"kind": "sweep_vae", "z_dims": list(args.z_dims), "epochs": config.epochs, "seed": config.seed,
               "batch_size": config.batch_size, "lr": config.lr, "likelihood": config.likelihood,
               "limit": config.limit, "n_train": n_train, "n_test": len(test_x),
               "seconds": round(seconds, 3), "threads": threads, "processes": processes,
               "device": str(device), "strategy": strategy, "runs": runs, "versions": versions()}
    write_json(summary_path, summary)
    print(f"wrote {summary_path}")
    models = {z: results[z][0] for z in args.z_dims}
    render_and_report(models, summary, test_x, test_y, args.figures_dir)


# ------------------------------------------------------------------ reading

def read_summary(path):
    """sweep_vae.json, checked: a UserError names what does not fit."""
    summary = read_json(path, "sweep-vae")
    if not isinstance(summary, dict) or summary.get("kind") != "sweep_vae":
        kind = summary.get("kind") if isinstance(summary, dict) else type(summary).__name__
        raise UserError(f"{path} is not a sweep_vae.py summary (kind {kind!r}); rerun `make sweep-vae`")
    runs = summary.get("runs")
    if not (isinstance(runs, list) and runs and all(isinstance(r, dict) and all(k in r for k in RUN_KEYS)
                                                    for r in runs)):
        raise UserError(f"{path}: 'runs' is not a list of runs with {', '.join(RUN_KEYS)}; "
                        "rerun `make sweep-vae`")
    return summary


def load_models(summary, out_dir, summary_path):
    """{z_dim: model} from the checkpoints, each checked against the summary's history."""
    models = {}
    for run in summary["runs"]:
        path = checkpoint_path(out_dir, run["z_dim"])
        if not os.path.exists(path):
            raise UserError(f"no checkpoint at {path}, which {summary_path} lists; rerun `make sweep-vae`")
        model, ckpt = vae.load_checkpoint(path, target="sweep-vae")
        if model.z_dim != run["z_dim"]:
            raise UserError(f"{path} holds a z_dim-{model.z_dim} model, but {summary_path} lists it for "
                            f"z_dim {run['z_dim']}; rerun `make sweep-vae`")
        if ckpt is None or ckpt["test_loss"] != run["test_loss"]:
            raise UserError(f"{path} and {summary_path} come from different runs; rerun `make sweep-vae`")
        models[run["z_dim"]] = model
    return models


def plot_only(args):
    summary_path = os.path.join(args.out_dir, SUMMARY_NAME)
    check_can_create(args.figures_dir)
    summary = read_summary(summary_path)
    models = load_models(summary, args.out_dir, summary_path)
    limit = args.limit if args.limit is not None else summary.get("limit")
    test_x, test_y = vae.preload(load_mnist(args.data_root, train=False), limit)
    plan_outputs(figure_paths(args.figures_dir))
    render_and_report(models, summary, test_x, test_y, args.figures_dir)


# ------------------------------------------------------------------ figures

def manifold_codes(side):
    """(side^2 x 2 codes, the side quantiles): standard-normal quantiles of
    linspace(0.05, 0.95), row-major with z1 = q[j] along a row and z2 = q[-1 - i]
    down the rows (Kingma & Welling, 2014: the decoder over the prior's quantiles)."""
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, side))
    z1 = quantiles.repeat(side)
    z2 = quantiles.flip(0).repeat_interleave(side)
    return torch.stack([z1, z2], 1), quantiles


@torch.no_grad()
def render(models, summary, test_x, test_y, figures_dir):
    """The four figures, in FIGURE_NAMES order; [(path, note)] as vae.render_figures."""
    loss, reconstructions, manifold, latent = figure_paths(figures_dir)
    models = {z: model.cpu().eval() for z, model in models.items()}
    runs = sorted(summary["runs"], key=lambda run: run["z_dim"])
    notes = {}
    with vae.one_thread():
        vf.plot_sweep_losses(runs, loss, subtitle=f"{summary['n_train']} training images, "
                                                  f"seed {summary['seed']}")
        originals = test_x[:8]
        rows = [originals] + [models[run["z_dim"]].decoder(models[run["z_dim"]].encoder(originals)[0])
                              for run in runs]
        vf.plot_image_rows(rows, ["test digits"] + [f"z_dim {run['z_dim']}" for run in runs], reconstructions,
                           "test digits, decoded from their mu")
        if 2 in models:
            codes, quantiles = manifold_codes(MANIFOLD_SIDE)
            vf.plot_manifold(models[2].decoder(codes), quantiles.tolist(), manifold)
            mu, _ = models[2].encoder(test_x)
            vf.scatter_digits(mu, test_y, latent, xlabel="mu_1", ylabel="mu_2",
                              title=f"test-set mu of the z_dim-2 VAE ({len(test_x)} images, no projection)")
        else:
            for path, title in ((manifold, "2-D latent manifold"), (latent, "2-D latent space")):
                notes[path] = f"z_dim 2 is not in this sweep (z_dims {summary['z_dims']}; add 2 to ZDIMS)"
                vf.placeholder(path, title, notes[path])
    return [(path, notes.get(path)) for path in figure_paths(figures_dir)]


def render_and_report(models, summary, test_x, test_y, figures_dir):
    vae.report_figures(render(models, summary, test_x, test_y, figures_dir))


# ---------------------------------------------------------------------- CLI

def z_dim_list(values):
    if len(set(values)) != len(values):
        raise UserError(f"--z-dims lists a value twice: {' '.join(map(str, values))}")
    return values


def parse_args(argv=None):
    defaults = vae.DEFAULTS
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="artifacts",
                   help=f"where {SUMMARY_NAME} and {CHECKPOINT_DIR}/vae_z*.pt go (OUT)")
    p.add_argument("--figures-dir", default="figures", help="where the four figures go (FIGURES)")
    p.add_argument("--plot-only", action="store_true",
                   help=f"re-render the figures from OUT/{SUMMARY_NAME} and its checkpoints (needs the "
                        "MNIST test split)")
    p.add_argument("--z-dims", type=positive_int, nargs="+", default=list(DEFAULT_Z_DIMS),
                   help="latent sizes, one VAE each (ZDIMS)")
    p.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="images per Adam step")
    p.add_argument("--lr", type=positive_float, default=defaults.lr, help="Adam learning rate")
    add_common_args(p, "data_root", "device", "seed", "limit",
                    data_root=dict(default=defaults.data_root), device=dict(default=defaults.device),
                    seed=dict(default=defaults.seed,
                              help="seeds every model's init, the shuffles and eps, as vae.py does"),
                    limit=dict(help="use only the first N images of each split (default: all; with "
                                    "--plot-only the sweep's)"))
    p.add_argument("--processes", type=positive_int, default=None,
                   help="training processes at once, one z_dim each (default: every z_dim at once; 1 on a GPU)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads of each process (default: torch's count shared between the processes, "
                        "at least 1)")
    args = p.parse_args(argv)
    args.z_dims = z_dim_list(args.z_dims)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        plot_only(args)
    else:
        sweep(args)


if __name__ == "__main__":
    run_main(main)
