"""The ``pyro-vae`` command line: ``train``, ``sample``, ``evaluate`` and ``compare``.

This is the only module that prints or configures logging. Bad input ends in a one-line
``pyro-vae: error: ...`` and a non-zero exit (2 for usage errors); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import sys
from pathlib import Path

import pyro

from pyro_vae.config import Config
from pyro_vae.data import BINARIZATIONS, DATASETS, load_dataset
from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.networks import ACTIVATIONS
from pyro_vae.objectives import ELBOS
from pyro_vae.plots import plot_images, save_figures
from pyro_vae.priors import PRIORS
from pyro_vae.runs import (
    CHECKPOINT_FILE,
    build_vae,
    load_checkpoint,
    load_config,
    load_run,
    new_run_dir,
    read_metrics,
)
from pyro_vae.train import fit, resolve_binarize, resolve_device

DEFAULTS = Config()


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def key_value(text: str) -> tuple[str, object]:
    """Parse ``NAME=VALUE``; VALUE is read as JSON when it can be (numbers, lists, true)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def check_options(kind: str, cls: type, options: dict) -> None:
    """Refuse options the chosen part's constructor does not take, naming those it does."""
    params = inspect.signature(cls).parameters
    accepted = sorted(n for n in params if n not in ("data_dim", "latent_dim", "self"))
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"{kind} {cls.__name__} takes no option {unknown[0]!r}; it takes {accepted or 'none'}"
        )


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a VAE by SVI and write a run folder",
        description="Train a VAE by stochastic variational inference; writes config.json, "
        "metrics.csv, checkpoint.pt and figures into the run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def flag(name: str, help: str, **kwargs) -> None:
        field = name.lstrip("-").replace("-", "_")
        default = getattr(DEFAULTS, field, None)
        # Defaults are applied later from Config, so that --resume can tell what was given.
        p.add_argument(name, default=None, help=f"{help} (default: {default})", **kwargs)

    data = p.add_argument_group("data")
    flag("--dataset", "data set", choices=sorted(DATASETS))
    data.add_argument(
        "--data-dir",
        default=None,
        help="folder holding torchvision data sets (default: $PYRO_VAE_DATA or the user cache)",
    )
    data.add_argument(
        "--binarize",
        default=None,
        choices=list(BINARIZATIONS),
        help="binarization of grey levels (default: dynamic for Bernoulli likelihoods, else none)",
    )
    flag("--latent-dim", "size of the latent code z", type=positive_int)
    flag("--hidden-dims", "hidden layer sizes of encoder and decoder", type=positive_int, nargs="+")
    flag("--activation", "activation of the hidden layers", choices=sorted(ACTIVATIONS))
    flag("--prior", "prior p(z)", choices=sorted(PRIORS))
    p.add_argument(
        "--prior-option",
        action="append",
        type=key_value,
        default=[],
        metavar="NAME=VALUE",
        help="an option of the prior's constructor, repeatable",
    )
    p.add_argument(
        "--prior-components",
        type=positive_int,
        default=None,
        help="shorthand for --prior-option num_components=N (mixture and vamp priors)",
    )
    flag("--likelihood", "likelihood p(x|z)", choices=sorted(LIKELIHOODS))
    p.add_argument(
        "--likelihood-option",
        action="append",
        type=key_value,
        default=[],
        metavar="NAME=VALUE",
        help="an option of the likelihood's constructor, repeatable (e.g. scale=0.2)",
    )
    flag("--guide", "variational family q(z|x)", choices=sorted(GUIDES))
    p.add_argument(
        "--guide-option",
        action="append",
        type=key_value,
        default=[],
        metavar="NAME=VALUE",
        help="an option of the guide family's constructor, repeatable",
    )
    flag(
        "--elbo",
        "ELBO estimator: trace = Monte Carlo, meanfield = analytic KL",
        choices=sorted(ELBOS),
    )
    flag("--num-particles", "samples of z per datapoint and step (vectorized)", type=positive_int)
    flag("--lr", "Adam learning rate", type=positive_float)
    flag("--clip-norm", "clip the gradient norm to this value", type=positive_float)
    flag("--epochs", "passes over the training set", type=positive_int)
    flag("--batch-size", "datapoints per step", type=positive_int)
    flag("--beta", "weight of the KL term", type=positive_float)
    flag("--warmup-epochs", "epochs of linear KL warm-up from 0 to beta", type=non_negative_int)
    flag("--seed", "random seed (same seed on CPU, same numbers)", type=int)
    flag("--device", "auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="run folder (default: a new folder under runs/)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (only --epochs and --device "
        "may be given with it)",
    )
    p.set_defaults(func=cmd_train)


def config_from_args(args) -> Config:
    values = {}
    for field in dataclasses.fields(Config):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    prior_options = dict(args.prior_option)
    if args.prior_components is not None:
        prior_options["num_components"] = args.prior_components
    values["prior_kwargs"] = prior_options
    values["likelihood_kwargs"] = dict(args.likelihood_option)
    values["guide_kwargs"] = dict(args.guide_option)
    config = Config(**values)
    check_options("prior", PRIORS[config.prior], config.prior_kwargs)
    check_options("likelihood", LIKELIHOODS[config.likelihood], config.likelihood_kwargs)
    check_options("guide", GUIDES[config.guide], config.guide_kwargs)
    return config


def resume_settings(args) -> tuple[Config, dict, list[dict]]:
    run_dir = Path(args.resume)
    allowed = {"epochs", "device"}
    given = [
        f.name
        for f in dataclasses.fields(Config)
        if getattr(args, f.name, None) not in (None, []) and f.name not in allowed
    ]
    if given or args.out or args.prior_option or args.likelihood_option or args.guide_option:
        raise ValueError(
            "--resume continues a run with its own settings; only --epochs and --device may be "
            f"given with it (got --{(given or ['out'])[0].replace('_', '-')})"
        )
    config = load_config(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.device is not None:
        config.device = args.device
    return config, checkpoint, read_metrics(run_dir)


def cmd_train(args) -> int:
    checkpoint, metrics = None, []
    if args.resume:
        config, checkpoint, metrics = resume_settings(args)
        run_dir = Path(args.resume)
    else:
        config = config_from_args(args)
    device = resolve_device(config.device)
    config.binarize = resolve_binarize(config.binarize, LIKELIHOODS[config.likelihood])
    dataset = load_dataset(config.dataset, config.data_dir, binarize=config.binarize, device=device)
    config.data_dim = dataset.data_dim
    config.image_shape = list(dataset.image_shape)
    pyro.set_rng_seed(config.seed)
    vae = build_vae(config).to(device)
    if checkpoint is not None:
        vae.load_state_dict(checkpoint["model"])
    else:
        run_dir = Path(args.out) if args.out else new_run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
    progress = make_progress(config, start=checkpoint["epoch"] if checkpoint else 0)
    try:
        metrics = fit(vae, dataset, config, run_dir, checkpoint, metrics, progress.update_row)
    except KeyboardInterrupt:
        progress.close()
        print(
            f"interrupted; the last completed epoch is saved in {run_dir}/{CHECKPOINT_FILE}. "
            f"Resume with: pyro-vae train --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    progress.close()
    save_figures(run_dir, vae, dataset, metrics)
    last = metrics[-1] if metrics else {}
    print(
        f"test ELBO {last.get('test_elbo', float('nan')):.2f} nats after epoch "
        f"{last.get('epoch', 0)}; run saved to {run_dir}"
    )
    return 0


class Progress:
    """A tqdm bar over epochs showing the latest ELBOs (hidden when stderr is not a terminal)."""

    def __init__(self, total: int, start: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, unit="epoch", disable=None, leave=False)

    def update_row(self, row: dict) -> None:
        self.bar.set_postfix(train=f"{row['train_elbo']:.2f}", test=f"{row['test_elbo']:.2f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def make_progress(config: Config, start: int) -> Progress:
    return Progress(config.epochs, start)


def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="draw images from the prior of a trained run",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'pyro-vae train'")
    p.add_argument("--num", type=positive_int, default=64, help="number of samples")
    p.add_argument("--cols", type=positive_int, default=8, help="images per row of the grid")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/sample_grid.png)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    run = load_run(args.run_dir, device=resolve_device(args.device))
    pyro.set_rng_seed(args.seed)
    images = run.vae.sample(args.num)
    out = Path(args.out) if args.out else run.path / "sample_grid.png"
    fig = plot_images(images, run.config.image_shape, args.cols, f"{args.num} prior samples")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="pyro-vae",
        description="Variational autoencoders in Pyro: train, sample, evaluate, compare.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(subparsers)
    add_sample_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"pyro-vae: error: {message}", file=sys.stderr)
        return 1
