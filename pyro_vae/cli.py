"""The ``pyro-vae`` command line: ``train``, ``sample``, ``evaluate`` and ``compare``.

This is the only module that prints or configures logging. Bad input ends in a one-line
``pyro-vae: error: ...`` and a non-zero exit (2 for usage errors); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import inspect
import json
import logging
import math
import shlex
import sys
import warnings
from pathlib import Path

import pyro
import torch

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
    CONFIG_FILE,
    build_vae,
    load_checkpoint,
    load_config,
    load_run,
    new_run_dir,
    read_metrics,
)
from pyro_vae.train import fit, prepare_fit, resolve_binarize, resolve_device

DEFAULTS = Config()


#: mallopt's parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: ...)`` to a flag's help, unless the help already says its default."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class UsageError(ValueError):
    """Flags that do not go together; reported like an argparse error, with exit code 2."""


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


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1], got {text!r}")
    return value


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the subcommand too; SUPPRESS keeps one given before it."""
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether CUDA is present is checked later."""
    try:
        known = text == "auto" or torch.device(text).type in ("cpu", "cuda")
    except (RuntimeError, TypeError):
        known = False
    if not known:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; choose auto, cpu, cuda or cuda:N"
        )
    return text


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
        formatter_class=HelpFormatter,
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
    flag("--seed", "random seed (same seed on CPU, same numbers)", type=seed_value)
    flag("--device", "auto (CUDA when available), cpu, cuda or cuda:N", type=device_name)
    p.add_argument("--out", default=None, help="run folder (default: a new folder under runs/)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (only --epochs, --device and "
        "--data-dir may be given with it)",
    )
    add_debug_flag(p)
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


def check_resume_flags(args) -> None:
    """Refuse settings given with ``--resume``: the run keeps its own, or it would not repeat."""
    allowed = {"epochs", "device", "data_dir"}
    given = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(Config)
        if getattr(args, f.name, None) not in (None, []) and f.name not in allowed
    ]
    others = {
        "--out": args.out,
        "--prior-option": args.prior_option,
        "--prior-components": args.prior_components,
        "--likelihood-option": args.likelihood_option,
        "--guide-option": args.guide_option,
    }
    given += [name for name, value in others.items() if value not in (None, [])]
    if given:
        raise UsageError(
            "--resume continues a run with its own settings; only --epochs, --device and "
            f"--data-dir may be given with it (got {given[0]})"
        )


def resume_settings(args) -> tuple[Config, dict, list[dict]]:
    check_resume_flags(args)
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run folder {run_dir} does not exist; pass a folder written by 'pyro-vae train'"
        )
    config = load_config(run_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {CHECKPOINT_FILE}: the run stopped before its first checkpoint; "
            "start it again without --resume"
        )
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    if args.epochs is not None:
        if args.epochs < checkpoint["epoch"]:
            raise UsageError(
                f"--epochs {args.epochs} is fewer than the {checkpoint['epoch']} epochs already "
                f"trained in {run_dir}; pass --epochs {checkpoint['epoch']} or more"
            )
        config.epochs = args.epochs
    if args.device is not None:
        config.device = args.device
    config.data_dir = resumed_data_dir(args, config, run_dir)
    return config, checkpoint, read_metrics(run_dir)


def resumed_data_dir(args, config: Config, run_dir: Path) -> str | None:
    """``--data-dir`` if given, else the run's own, which must exist: a path read from a
    ``config.json`` is only ever read from, never created."""
    if args.data_dir is not None:
        return args.data_dir
    if config.data_dir is not None and not Path(config.data_dir).expanduser().is_dir():
        raise FileNotFoundError(
            f"the data folder {config.data_dir!r} named in {run_dir / CONFIG_FILE} does not "
            "exist here; pass --data-dir DIR with --resume to say where the data set is"
        )
    return config.data_dir


def check_new_run_dir(out: str) -> Path:
    """``--out`` must not hold a run already: training would overwrite it."""
    run_dir = Path(out)
    # A folder with a config.json but no checkpoint was stopped before training began: reuse it.
    if (run_dir / CHECKPOINT_FILE).exists():
        raise UsageError(
            f"{run_dir} already holds a run; continue it with --resume {shlex.quote(out)} "
            "or choose another --out"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
    return run_dir


def cmd_train(args) -> int:
    checkpoint, metrics = None, []
    if args.resume:
        config, checkpoint, metrics = resume_settings(args)
        run_dir = Path(args.resume)
    else:
        config = config_from_args(args)
        run_dir = check_new_run_dir(args.out) if args.out else None
    device = resolve_device(config.device)
    if config.binarize is None:  # a resumed run has it; its likelihood may be unregistered
        config.binarize = resolve_binarize(None, LIKELIHOODS[config.likelihood])
    # A data folder read from a resumed run's config.json is only read, never downloaded into.
    download = not args.resume or args.data_dir is not None or config.data_dir is None
    dataset = load_dataset(
        config.dataset, config.data_dir, config.binarize, device=device, download=download
    )
    config.data_dim = dataset.data_dim
    config.image_shape = list(dataset.image_shape)
    pyro.set_rng_seed(config.seed)
    vae = build_vae(config).to(device)
    prepare_fit(vae, dataset, config)  # bad input stops here, before a run folder is made
    run_dir = new_run_dir() if run_dir is None else run_dir
    progress = make_progress(config, start=checkpoint["epoch"] if checkpoint else 0)
    try:
        # fit restores weights, optimizer and RNG from the checkpoint just before training.
        metrics = fit(vae, dataset, config, run_dir, checkpoint, metrics, progress.update_row)
    except KeyboardInterrupt:
        progress.close()
        print(interrupted_message(run_dir), file=sys.stderr)
        return 130
    finally:
        progress.close()
    save_figures(run_dir, vae, dataset, metrics)
    last = metrics[-1] if metrics else {}
    print(
        f"test ELBO {last.get('test_elbo', float('nan')):.2f} nats after epoch "
        f"{last.get('epoch', 0)}; run saved to {run_dir}"
    )
    return 0


def interrupted_message(run_dir: Path) -> str:
    """What Ctrl-C leaves: the checkpoint of the last finished epoch, and how to go on.

    Checkpoints are written at epoch 0 and at every epoch end; the part of an epoch under way
    is dropped, because only an epoch boundary can be resumed to the same numbers.
    """
    try:
        epoch = load_checkpoint(run_dir / CHECKPOINT_FILE)["epoch"]
    except (OSError, ValueError):
        return f"pyro-vae: interrupted before the first checkpoint; start {run_dir} again"
    return (
        f"pyro-vae: interrupted; {run_dir / CHECKPOINT_FILE} holds epoch {epoch}. "
        f"Resume with: pyro-vae train --resume {shlex.quote(str(run_dir))}"
    )


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
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'pyro-vae train'")
    p.add_argument("--num", type=positive_int, default=64, help="number of samples")
    p.add_argument("--cols", type=positive_int, default=8, help="images per row of the grid")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed")
    p.add_argument("--device", default="cpu", type=device_name, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/sample_grid.png)")
    add_debug_flag(p)
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
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(subparsers)
    add_sample_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_compare_parser(subparsers)
    return parser


def format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line, like errors: ``pyro-vae: warning: ...``."""
    return f"pyro-vae: warning: {message}\n"


def fix_malloc_threshold() -> bool:
    """Stop glibc's heap from fragmenting under the estimators' allocation pattern.

    glibc raises its mmap threshold each time a large block is freed, after which the
    estimators' tensors of a few MB come from a heap that fragments: ``evaluate`` over the
    10,000 MNIST test images grew to 11 GB. A fixed threshold (setting it turns the dynamic
    adjustment off) keeps memory flat at about 1 GB. Returns whether it was applied (glibc
    only); library users can set ``MALLOC_MMAP_THRESHOLD_=67108864`` in the environment.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, 64 * 2**20) == 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    fix_malloc_threshold()
    warnings.formatwarning = format_warning
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except UsageError as e:
        if args.debug:
            raise
        command = f"pyro-vae {args.command}"
        print(f"{command}: error: {e} (see '{command} --help')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError, MemoryError, RuntimeError) as e:
        # A RuntimeError is a bug unless it is torch running out of memory: keep its traceback.
        if args.debug or (isinstance(e, RuntimeError) and not is_out_of_memory(e)):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, MemoryError | RuntimeError):
            message = (
                f"out of memory ({message[:200]}); use smaller sizes (--batch-size, "
                "--latent-dim, --hidden-dims, --prior-components) or a machine with more memory"
            )
        print(f"pyro-vae: error: {message}", file=sys.stderr)
        return 1


def is_out_of_memory(error: RuntimeError) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="ELBO, importance-weighted log p(x), bits/dim and active units of a trained run",
        description="Evaluate a trained run on its data set (taken from the run's config): "
        "Monte Carlo and analytic-KL ELBO, log p(x) for K = 1, 10, 100, 1000 and --num-samples "
        "importance samples, bits per dimension and active units. Writes RUN_DIR/evaluation.json "
        "and prints a table. K=5000 on the 10,000 MNIST test images (default 400-400 model) "
        "took 15 minutes on 2 CPU cores.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'pyro-vae train'")
    p.add_argument(
        "--num-samples", type=positive_int, default=5000, help="importance samples K for log p(x)"
    )
    p.add_argument("--split", choices=["test", "train"], default="test", help="data split")
    p.add_argument("--data-dir", default=None, help="overrides the data folder of the run")
    p.add_argument("--device", default="cpu", type=device_name, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="evaluate only the first N datapoints"
    )
    add_debug_flag(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    # Imported here so that 'train' and 'sample' do not pay for them.
    from pyro_vae.evaluate import (
        evaluate_run,
        evaluation_file,
        format_evaluation,
        write_evaluation,
    )

    result = evaluate_run(
        args.run_dir,
        num_samples=args.num_samples,
        split=args.split,
        data_dir=args.data_dir,
        device=args.device,
        seed=args.seed,
        limit=args.limit,
    )
    path = write_evaluation(args.run_dir, result, evaluation_file(args.split, args.limit))
    print(format_evaluation(result))
    print(f"wrote {path}")
    return 0


def add_compare_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="Monte Carlo vs analytic-KL ELBO: estimator and gradient variance, training curves",
        description="Compare the Monte Carlo ELBO (trace) with the analytic-KL ELBO (meanfield) "
        "on a trained run: spread of the per-datapoint estimates, gradient variance on a fixed "
        "minibatch, and test ELBO curves of the run's architecture trained from one "
        "initialisation with each. Writes comparison.json, comparison.md and PNGs into RUN_DIR. "
        "The training runs dominate the cost (2 x --train-epochs epochs).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'pyro-vae train'")
    p.add_argument("--draws", type=positive_int, default=100, help="draws R per estimate")
    p.add_argument(
        "--num-points", type=positive_int, default=1000, help="test points M of the ELBO study"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=128, help="minibatch of the gradient study"
    )
    p.add_argument(
        "--train-epochs",
        type=non_negative_int,
        default=10,
        help="epochs of each training run (0 skips the training curves)",
    )
    p.add_argument("--data-dir", default=None, help="overrides the data folder of the run")
    p.add_argument("--device", default="cpu", type=device_name, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed")
    add_debug_flag(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    # Imported here so that 'train' and 'sample' do not pay for them.
    from pyro_vae.compare import compare_run, write_comparison

    if args.draws < 2:
        raise UsageError(f"--draws must be at least 2 to measure a spread, got {args.draws}")
    result = compare_run(
        args.run_dir,
        num_draws=args.draws,
        num_points=args.num_points,
        batch_size=args.batch_size,
        train_epochs=args.train_epochs,
        seed=args.seed,
        data_dir=args.data_dir,
        device=args.device,
    )
    command = shlex.join(
        ["pyro-vae", "compare", str(args.run_dir), "--draws", str(args.draws)]
        + ["--num-points", str(args.num_points), "--batch-size", str(args.batch_size)]
        + ["--train-epochs", str(args.train_epochs), "--seed", str(args.seed)]
        + (["--data-dir", str(args.data_dir)] if args.data_dir else [])
        + (["--device", args.device] if args.device != "cpu" else [])
    )
    paths = write_comparison(args.run_dir, result, command)
    if result["note"]:
        print(f"note: {result['note']}")
    print(Path(paths[1]).read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
