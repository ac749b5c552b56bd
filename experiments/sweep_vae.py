"""`make sweep-vae`: one VAE per latent size, to see what z_dim does to the loss, its terms, the
reconstructions and the latent space. Each z_dim is the lone `vae.py` run (vae.train_model) in a spawned
process, several at once; one whose checkpoint reads and was trained as asked is loaded, not trained again.

    python -m experiments.sweep_vae --z-dims 2 20 --epochs 2 --limit 2000 [--plot-only]
"""
import dataclasses
import io
import multiprocessing
import os
import time

import lab.cli  # noqa: F401  first: a Ctrl-C while torch loads waits for run_main
import torch

import vae
from lab import vae_figures as vf
from lab.cli import ArgumentParser, positive_int, run_main
from lab.files import check_can_create, plan_outputs, read_json, reading, write_json
from lab.machine import as_worker, cores, resolve_device, versions
from lab.mnist import load_mnist

SUMMARY_NAME = "sweep_vae.json"
FIGURE_NAMES = ("sweep_vae_loss.png", "sweep_vae_reconstructions.png", "vae_manifold_2d.png", "vae_latent_2d.png")
DEFAULT_Z_DIMS = (2, 5, 10, 20, 50)
MANIFOLD_SIDE = 20


def checkpoint_path(out_dir, z_dim):
    return os.path.join(out_dir, "sweep_vae", f"vae_z{z_dim}.pt")


def train_one(config):
    """A spawned process: vae.py's training of one config; (config, bytes of state_dict, history, run)
    (torch would pass tensors through shared memory, gone once the process exits)."""
    model, history, run, _ = vae.train_model(config, progress=False,
                                             log=lambda line: print(f"z={config.z_dim}: {line}", flush=True))
    buffer = io.BytesIO()
    torch.save((model.state_dict(), history, run), buffer)
    return config, buffer.getvalue()


def train_all(configs, out_dir, processes):
    """Train ``configs`` in ``processes`` spawned processes, writing each checkpoint as its run comes back."""
    pool = multiprocessing.get_context("spawn").Pool(processes, initializer=as_worker)
    try:
        for config, payload in pool.imap_unordered(train_one, configs):
            state, history, run = torch.load(io.BytesIO(payload), weights_only=True)
            vae.save_checkpoint(checkpoint_path(out_dir, config.z_dim), state, config=config, history=history, run=run)
    finally:
        pool.terminate()    # also on Ctrl-C or an error: no worker outlives the sweep
        pool.join()


def trained_as(config, out_dir):
    """Whether the checkpoint of config.z_dim reads and was trained with ``config``."""
    try:
        _, ckpt = vae.load_checkpoint(checkpoint_path(out_dir, config.z_dim))
    except Exception:
        return False
    return ckpt is not None and ckpt["config"] == dataclasses.asdict(config)


def sweep(args):
    device = resolve_device(args.device)
    config = vae.config_from_args(args)
    check_can_create(os.path.dirname(checkpoint_path(args.out_dir, 0)))
    check_can_create(args.figures_dir)
    load_mnist(config.data_root, train=True)    # a missing or damaged split fails here, before any process starts
    test_x, test_y = vae.preload(load_mnist(config.data_root, train=False), config.limit)
    todo = [c for c in (dataclasses.replace(config, z_dim=z) for z in args.z_dims) if not trained_as(c, args.out_dir)]
    processes = max(1, min(args.processes or len(todo), len(todo), cores() if device.type == "cpu" else 1))
    summary_path = os.path.join(args.out_dir, SUMMARY_NAME)
    plan_outputs([*(checkpoint_path(args.out_dir, c.z_dim) for c in todo), summary_path,
                  *figure_paths(args.figures_dir)])
    print(f"VAE sweep, {config}: z_dims {' '.join(map(str, args.z_dims))}, training "
          f"{' '.join(str(c.z_dim) for c in todo) or 'none'} in {processes} process(es)")
    start = time.perf_counter()
    if todo:
        train_all(todo, args.out_dir, processes)
    models, runs = {}, []
    for z_dim in args.z_dims:
        path = checkpoint_path(args.out_dir, z_dim)
        models[z_dim], ckpt = vae.load_checkpoint(path)
        runs.append({"z_dim": z_dim, "seconds": round(ckpt["seconds"], 3), **{k: ckpt[k] for k in vae.HISTORY_KEYS},
                     "checkpoint": os.path.relpath(path, args.out_dir)})
    summary = {"kind": "sweep_vae", **dataclasses.asdict(config), "z_dims": list(args.z_dims), "n_test": len(test_x),
               "n_train": ckpt["n_train"], "trained": [c.z_dim for c in todo], "runs": runs, "processes": processes,
               "seconds": round(time.perf_counter() - start, 3), "device": str(device), "versions": versions(),
               "strategy": f"vae.train_model per z_dim in 'trained', {processes} at once; the others read"}
    del summary["z_dim"]
    write_json(summary_path, summary)
    print(f"wrote {summary_path}")
    render(models, summary, test_x, test_y, args.figures_dir)


def plot_only(args):
    summary_path = os.path.join(args.out_dir, SUMMARY_NAME)
    check_can_create(args.figures_dir)
    plan_outputs(figure_paths(args.figures_dir))
    summary = read_json(summary_path, "sweep-vae")
    with reading(summary_path, "sweep-vae"):
        test_losses = {run["z_dim"]: run["test_loss"] for run in summary["runs"]}
        test_losses = {z_dim: test_losses[z_dim] for z_dim in summary["z_dims"]}
    models = {}
    for z_dim, test_loss in test_losses.items():
        path = checkpoint_path(args.out_dir, z_dim)
        # The sweep trains again what does not read; make runs it once the summary is gone.
        with reading(path, "sweep-vae", remove=summary_path):
            models[z_dim], ckpt = vae.load_checkpoint(path)
            if ckpt["test_loss"] != test_loss:
                raise ValueError(f"it holds another run than the one {SUMMARY_NAME} lists")
    test_x, test_y = vae.preload(load_mnist(args.data_root, train=False), args.limit or summary["limit"])
    render(models, summary, test_x, test_y, args.figures_dir)


def figure_paths(figures_dir):
    return [os.path.join(figures_dir, name) for name in FIGURE_NAMES]


def manifold_codes(side):
    """(side^2 x 2 codes, the quantiles q of linspace(0.05, 0.95)): z1 = q[j] along a row, z2 = q[-1 - i] down."""
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, side))
    return torch.stack([quantiles.repeat(side), quantiles.flip(0).repeat_interleave(side)], 1), quantiles


@torch.no_grad()
def render(models, summary, test_x, test_y, figures_dir):
    loss, reconstructions, manifold, latent = figure_paths(figures_dir)
    z_dims = sorted(models)
    models = {z: model.cpu().eval() for z, model in models.items()}
    torch.set_num_threads(1)    # as vae.render_figures: the same pixels, whatever --threads trained
    vf.plot_sweep_losses(sorted(summary["runs"], key=lambda run: run["z_dim"]), loss,
                         subtitle=f"{summary['n_train']} training images, seed {summary['seed']}")
    rows = [test_x[:8]] + [models[z].decoder(models[z].encoder(test_x[:8])[0]) for z in z_dims]
    vf.plot_image_rows(rows, ["test digits"] + [f"z_dim {z}" for z in z_dims], reconstructions,
                       "test digits, decoded from their mu")
    if 2 in models:
        codes, quantiles = manifold_codes(MANIFOLD_SIDE)
        vf.plot_manifold(models[2].decoder(codes), quantiles.tolist(), manifold)
        vf.scatter_digits(models[2].encoder(test_x)[0], test_y, latent, xlabel="mu_1", ylabel="mu_2",
                          title=f"test-set mu of the z_dim-2 VAE ({len(test_x)} images, no projection)")
    else:
        for path, title in ((manifold, "2-D latent manifold"), (latent, "2-D latent space")):
            vf.placeholder(path, title, f"z_dim 2 is not in this sweep ({summary['z_dims']}; add 2 to ZDIMS)")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="artifacts", help=f"where {SUMMARY_NAME} and sweep_vae/vae_z*.pt go (OUT)")
    p.add_argument("--figures-dir", default="figures", help="where the four figures go (FIGURES)")
    p.add_argument("--plot-only", action="store_true", help=f"re-render the figures from OUT/{SUMMARY_NAME}")
    p.add_argument("--z-dims", type=positive_int, nargs="+", default=list(DEFAULT_Z_DIMS),
                   help="latent sizes, one VAE each (ZDIMS)")
    p.add_argument("--processes", type=positive_int, help="training processes at once, one z_dim each (default "
                   "and most: one per z_dim to train, at most one per core; 1 on a GPU)")
    vae.add_training_args(p, vae.VAEConfig(threads=1))
    args = p.parse_args(argv)
    if len(set(args.z_dims)) != len(args.z_dims):
        p.error(f"--z-dims lists a value twice: {' '.join(map(str, args.z_dims))}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        plot_only(args)
    else:
        sweep(args)


if __name__ == "__main__":
    run_main(main)
