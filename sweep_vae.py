"""`make sweep-vae`: one VAE per latent size, to see what z_dim does to the loss,
its reconstruction and KL terms, the reconstructions and the latent space.

Each z_dim (2, 5, 10, 20, 50 by default) trains as `make vae` does: the same
data, seed, batches, Adam and epochs. They train at once: the z_dims are dealt
between one process per CPU core (on 2 cores: 50 10 2 here, 20 5 in a spawned
process), and each process trains its group together in one stack (vae_stack:
one buffer, fc1 and fc4 of all its models as batched matrix products, one fused
Adam). Each model draws the batches and eps it would draw alone, with the same
float rounding, so the z_dim-20 run of a sweep equals a lone `vae.py` run with
the same settings (the tests check it, exactly).

    python sweep_vae.py --data-root data --out-dir artifacts --figures-dir figures
    python sweep_vae.py --z-dims 2 20 --epochs 2 --limit 2000      # a quick look
    python sweep_vae.py --plot-only                                 # figures from OUT/sweep_vae/
"""
import dataclasses
import io
import multiprocessing
import os
import signal
import time
import traceback

import torch

import vae
import vae_figures as vf
import vae_stack
from labio import (ArgumentParser, UserError, add_common_args, check_can_create, load_mnist, plan_outputs,
                   positive_float, positive_int, read_json, resolve_device, run_main, versions, write_json)

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

def train_group(config, z_dims, train_x, test_x, device, log=print):
    """Models (one per z_dim, each initialised as vae.py would with this seed), trained
    together in one stack, with their histories and the wall time."""
    models = []
    for z_dim in z_dims:
        torch.manual_seed(config.seed)      # the init a lone `vae.py --z-dim z_dim` run gets
        models.append(vae.VAE(z_dim).to(device))
    start = time.perf_counter()
    try:
        histories = vae.train_stack(models, train_x, test_x.to(device), epochs=config.epochs,
                                    batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                                    likelihood=config.likelihood, labels=[f"z={z}" for z in z_dims],
                                    threads=config.threads, log=log, progress=log is not None)
    except FloatingPointError as exc:
        raise UserError(f"{exc}; lower --lr") from None
    return models, histories, time.perf_counter() - start


def group_worker(config, z_dims, connection):
    """A spawned process: load the data, train one group, send back (state_dicts,
    histories, seconds), or the one-line error, or a traceback for a bug."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the parent, which stops us
    try:
        train_x, test_x, _ = vae.load_splits(config.data_root, config.limit)
        models, histories, seconds = train_group(config, z_dims, train_x, test_x,
                                                 resolve_device(config.device), log=None)
        # As bytes: torch would pass tensors through shared memory, gone once we exit.
        buffer = io.BytesIO()
        torch.save(([model.state_dict() for model in models], histories, seconds), buffer)
        connection.send(("ok", buffer.getvalue()))
    except UserError as exc:
        connection.send(("error", str(exc)))
    except Exception:
        connection.send(("bug", traceback.format_exc()))
    finally:
        connection.close()


def deal(z_dims, processes):
    """z_dims dealt into ``processes`` groups, largest first: fc1 and fc4 make every
    model cost about the same whatever its z_dim, so the groups differ by at most one."""
    ordered = sorted(z_dims, reverse=True)
    return [ordered[i::processes] for i in range(min(processes, len(ordered)))]


def train_all(config, z_dims, train_x, test_x, device, processes):
    """{z_dim: (model, history, seconds)}: the first group trains here while the others
    train in spawned processes at the same time; every model comes out as it would
    alone (same init, batches, eps and rounding)."""
    groups = deal(z_dims, processes)
    context = multiprocessing.get_context("spawn")    # a fork of a process running OpenMP can hang
    workers, results = [], {}
    try:
        for group in groups[1:]:
            receiver, sender = context.Pipe(duplex=False)
            worker = context.Process(target=group_worker, args=(config, group, sender), daemon=True)
            worker.start()
            sender.close()
            workers.append((group, worker, receiver))
        models, histories, seconds = train_group(config, groups[0], train_x, test_x, device)
        results.update({z: (m, h, seconds) for z, m, h in zip(groups[0], models, histories)})
        for group, worker, receiver in workers:
            results.update(receive_group(group, worker, receiver, device))
    finally:
        for _, worker, _ in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()
    return results, groups


def receive_group(group, worker, receiver, device):
    """A worker's models and histories, with its epoch lines printed now."""
    names = " ".join(map(str, group))
    try:
        message = receiver.recv()
    except EOFError:
        worker.join()
        raise UserError(f"the process training z_dims {names} stopped without a result "
                        f"(exit code {worker.exitcode})") from None
    if message[0] == "error":
        raise UserError(message[1])
    if message[0] == "bug":
        raise RuntimeError(f"the process training z_dims {names} failed:\n{message[1]}")
    states, histories, seconds = torch.load(io.BytesIO(message[1]), weights_only=True)
    for epoch in range(1, len(histories[0]["train_loss"]) + 1):
        so_far = [{key: values[:epoch] for key, values in history.items()} for history in histories]
        print(vae_stack.epoch_line(epoch, len(histories[0]["train_loss"]), [f"z={z}" for z in group], so_far,
                                   histories[0]["seconds"][epoch - 1]) + "  (second process)")
    results = {}
    for z_dim, state, history in zip(group, states, histories):
        model = vae.VAE(z_dim)
        model.load_state_dict(state)
        results[z_dim] = (model.to(device), history, seconds)
    return results


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
    processes = args.processes or (min(len(args.z_dims), os.cpu_count() or 1) if device.type == "cpu" else 1)
    threads = config.threads or torch.get_num_threads()
    print(f"VAE sweep, z_dims {' '.join(map(str, args.z_dims))}: {len(train_x)} train / {len(test_x)} test "
          f"images, {config.epochs} epochs, batch {config.batch_size}, lr {config.lr}, {device}, "
          f"{processes} process(es) of {config.threads or f'1 or {threads}'} threads")
    start = time.perf_counter()
    results, groups = train_all(config, args.z_dims, train_x, test_x, device, processes)
    seconds = time.perf_counter() - start
    runs = []
    for z_dim, path in zip(args.z_dims, checkpoints):
        model, history, group_seconds = results[z_dim]
        run_info = {"n_train": len(train_x), "n_test": len(test_x), "device": str(device), "threads": threads,
                    "epoch_threads": history["threads"], "seconds": group_seconds}
        vae.save_checkpoint(path, model, config=dataclasses.replace(config, z_dim=z_dim), history=history,
                            run=run_info)
        print(f"wrote {path}")
        runs.append({"z_dim": z_dim, "seconds": round(group_seconds, 3),
                     "checkpoint": os.path.relpath(path, args.out_dir), "epoch_threads": history["threads"],
                     **{key: history[key] for key in vae.HISTORY_KEYS}})
    strategy = (f"{len(groups)} process(es) at once, z_dims {' / '.join(' '.join(map(str, g)) for g in groups)}; "
                "each trains its group together (vae_stack: fc1 and fc4 as batched matmuls, one flat buffer under torch's fused Adam kernel), "
                "with the batches, eps and rounding of lone vae.py runs; each epoch on the faster of 1 and "
                f"{threads} threads; runs[].seconds is its process's training time")
    summary = {"kind": "sweep_vae", "z_dims": list(args.z_dims), "epochs": config.epochs, "seed": config.seed,
               "batch_size": config.batch_size, "lr": config.lr, "likelihood": config.likelihood,
               "limit": config.limit, "n_train": len(train_x), "n_test": len(test_x),
               "seconds": round(seconds, 3), "threads": threads, "processes": len(groups),
               "device": str(device), "strategy": strategy, "runs": runs, "versions": versions()}
    write_json(summary_path, summary)
    print(f"wrote {summary_path}")
    models = {z: results[z][0] for z in args.z_dims}
    render_and_report(models, summary, test_x.cpu(), test_y, args.figures_dir)


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
        if not os.path.isfile(path):
            raise UserError(f"no checkpoint at {path}, which {summary_path} lists; rerun `make sweep-vae`")
        model, ckpt = vae.load_checkpoint(path)
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
    p.add_argument("--processes", type=positive_int, default=None,
                   help="training processes at once, the z_dims dealt between them (default: one per "
                        "CPU core, at most one per z_dim; 1 on a GPU)")
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
