"""`make sweep-vae`: one VAE per latent size, to see what z_dim does to the loss,
its reconstruction and KL terms, the reconstructions and the latent space.

Each z_dim (2, 5, 10, 20, 50 by default) trains as `make vae` does: the same
data, seed, batches, Adam and epochs. All of them train at once, in one process:
vae_stack packs the models into one buffer, runs fc1 and fc4 of all of them as
batched matrix products and updates them with one fused Adam. Each model draws
the batches and eps it would draw alone, so the z_dim-20 run of a sweep equals a
lone `vae.py` run with the same settings (the tests check it, exactly).

    python sweep_vae.py --data-root data --out-dir artifacts --figures-dir figures
    python sweep_vae.py --z-dims 2 20 --epochs 2 --limit 2000      # a quick look
    python sweep_vae.py --plot-only                                 # figures from OUT/sweep_vae/
"""
import dataclasses
import json
import os
import time

import torch

import vae
import vae_figures as vf
from labio import (ArgumentParser, UserError, add_common_args, check_can_create, load_mnist, plan_outputs,
                   positive_float, positive_int, resolve_device, run_main, versions, write_json)

SUMMARY_NAME = "sweep_vae.json"
CHECKPOINT_DIR = "sweep_vae"      # under OUT: one vae.py checkpoint per z_dim
FIGURE_NAMES = ("sweep_vae_loss.png", "sweep_vae_reconstructions.png", "vae_manifold_2d.png",
                "vae_latent_2d.png")
DEFAULT_Z_DIMS = (2, 5, 10, 20, 50)
MANIFOLD_SIDE = 20
RUN_KEYS = ("z_dim", "seconds", *vae.HISTORY_KEYS)
STRATEGY = ("one process, all z_dims trained together (vae_stack): fc1 and fc4 of every model as "
            "batched matmuls, one fused Adam over one buffer, the same batches and per-model eps "
            "streams as lone vae.py runs; runs[].seconds is the shared pass's wall time")


def checkpoint_path(out_dir, z_dim):
    return os.path.join(out_dir, CHECKPOINT_DIR, f"vae_z{z_dim}.pt")


def figure_paths(figures_dir):
    return [os.path.join(figures_dir, name) for name in FIGURE_NAMES]


# ----------------------------------------------------------------- training

def train_sweep(config, z_dims, train_x, test_x, device):
    """Models (one per z_dim, each initialised as vae.py would with this seed) and their histories."""
    models = []
    for z_dim in z_dims:
        torch.manual_seed(config.seed)      # the init a lone `vae.py --z-dim z_dim` run gets
        models.append(vae.VAE(z_dim).to(device))
    try:
        histories = vae.train_stack(models, train_x, test_x.to(device), epochs=config.epochs,
                                    batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                                    likelihood=config.likelihood, labels=[f"z={z}" for z in z_dims],
                                    threads=config.threads)
    except FloatingPointError as exc:
        raise UserError(f"{exc}; lower --lr") from None
    return models, histories


def sweep(args):
    config = vae.VAEConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           data_root=args.data_root, limit=args.limit, device=args.device,
                           threads=args.threads)
    device = resolve_device(config.device)
    check_can_create(os.path.join(args.out_dir, CHECKPOINT_DIR))
    check_can_create(args.figures_dir)
    train_x, test_x, test_y = vae.load_splits(config.data_root, config.limit)
    summary_path = os.path.join(args.out_dir, SUMMARY_NAME)
    checkpoints = [checkpoint_path(args.out_dir, z) for z in args.z_dims]
    # The checkpoints, then the summary (the Make target), then the figures (their own rule).
    plan_outputs([*checkpoints, summary_path, *figure_paths(args.figures_dir)])
    threads = config.threads or torch.get_num_threads()
    print(f"VAE sweep, z_dims {' '.join(map(str, args.z_dims))}: {len(train_x)} train / {len(test_x)} test "
          f"images, {config.epochs} epochs, batch {config.batch_size}, lr {config.lr}, {device}, "
          f"{config.threads or f'1 or {threads}'} threads")
    start = time.perf_counter()
    models, histories = train_sweep(config, args.z_dims, train_x, test_x, device)
    seconds = time.perf_counter() - start
    run_info = {"n_train": len(train_x), "n_test": len(test_x), "device": str(device), "threads": threads,
                "epoch_threads": histories[0]["threads"], "seconds": seconds}
    for z_dim, model, history, path in zip(args.z_dims, models, histories, checkpoints):
        vae.save_checkpoint(path, model, config=dataclasses.replace(config, z_dim=z_dim), history=history,
                            run=run_info)
        print(f"wrote {path}")
    runs = [{"z_dim": z, "seconds": round(seconds, 3), "checkpoint": os.path.relpath(path, args.out_dir),
             **{key: history[key] for key in vae.HISTORY_KEYS}}
            for z, history, path in zip(args.z_dims, histories, checkpoints)]
    summary = {"kind": "sweep_vae", "z_dims": list(args.z_dims), "epochs": config.epochs, "seed": config.seed,
               "batch_size": config.batch_size, "lr": config.lr, "likelihood": config.likelihood,
               "limit": config.limit, "n_train": len(train_x), "n_test": len(test_x),
               "seconds": round(seconds, 3), "threads": threads, "epoch_threads": histories[0]["threads"],
               "device": str(device),
               "strategy": STRATEGY, "runs": runs, "versions": versions()}
    write_json(summary_path, summary)
    print(f"wrote {summary_path}")
    render_and_report(dict(zip(args.z_dims, models)), summary, test_x.cpu(), test_y, args.figures_dir)


# ------------------------------------------------------------------ reading

def read_summary(path):
    """sweep_vae.json, checked: a UserError names what does not fit."""
    if not os.path.isfile(path):
        raise UserError(f"no sweep results at {path}; run `make sweep-vae` first")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: not JSON, or damaged ({type(exc).__name__}); "
                        "rerun `make sweep-vae`") from None
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
        model, ckpt = vae.load_checkpoint(path, z_dim=run["z_dim"])
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
    defaults = vae.VAEConfig()
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
                    seed=dict(help="seeds every model's init, the shuffles and eps, as vae.py does"),
                    limit=dict(help="use only the first N images of each split (default: all; with "
                                    "--plot-only the sweep's)"))
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: each epoch, the faster of 1 and all cores; the numbers "
                        "do not depend on it)")
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
