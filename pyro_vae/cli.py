"""The ``pyro-vae`` command line: the only module that prints or configures logging. Bad input is
one line, ``pyro-vae: error: ...`` (exit 2 for usage errors; ``--debug`` shows the traceback)."""

import argparse
import dataclasses
import logging
import shlex
import sys
import warnings
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae import distributed, report
from pyro_vae.compare import OBJECTIVES, PARTICLES, compare_run
from pyro_vae.config import CHOICES, Config
from pyro_vae.devices import resolve_device
from pyro_vae.distributed import WorldSizeError
from pyro_vae.evaluate import evaluate_run, fix_malloc_threshold
from pyro_vae.flags import (
    DEBUG,
    FLAG_TYPES,
    OPTION_FLAGS,
    ArgumentParser,
    add_ais_flags,
    ais_options,
    as_flag,
    as_typed,
    key_value,
    name_flags,
    non_negative_float,
    override_lines,
    positive_int,
    recipes_epilog,
    run_folder_flags,
)
from pyro_vae.plots import plot_images
from pyro_vae.recipes import RECIPES
from pyro_vae.runs import (
    RunFolderError,
    RunInterrupted,
    holds_run,
    load_run,
    restarted_run,
    resume_run,
    train_run,
)
from pyro_vae.tensorboard import TensorBoardLogger

#: The arguments ``train --resume`` may be given: the run keeps its other settings.
RESUME_ARGS = set("resume epochs device data_dir tensorboard debug verbose command func".split())
RESUME_ARGS.add("command_line")
SHOW_DEFAULTS = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
#: The errors shown as one line (a RuntimeError only when it is torch running out of memory).
ONE_LINE_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError, MemoryError)
ONE_LINE_ERRORS += (RuntimeError,)
SMALLER = "use smaller sizes (--batch-size, --latent-dim, --hidden-dims, --prior-components)"


class UsageError(ValueError):
    """Flags that do not go together; reported like an argparse error, with exit code 2."""


def add_train_parser(commands) -> None:
    help = "train a VAE by SVI and write a run folder (config, metrics, checkpoint, figures)"
    raw = {"formatter_class": argparse.RawDescriptionHelpFormatter, "epilog": recipes_epilog()}
    p = commands.add_parser("train", help=help, description=help, **raw)
    help = "set every field of a published protocol (listed below; recorded in config.json)"
    p.add_argument("--recipe", choices=sorted(RECIPES), metavar="NAME", help=help)
    for field in (f for f in dataclasses.fields(Config) if "help" in f.metadata):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        shown = as_typed(default)
        p.add_argument(
            as_flag(field.name),
            default=None,  # filled in from Config later, so that --resume can tell what was given
            help=field.metadata["help"] + ("" if default is None else f" (default: {shown})"),
            type=FLAG_TYPES.get(field.name),
            choices=sorted(CHOICES[field.name]) if field.name in CHOICES else None,
            nargs="+" if isinstance(default, list) else None,
        )
    for kind, example in (("prior", ""), ("likelihood", " (e.g. scale=0.2)"), ("guide", "")):
        help = f"an option of the {kind}'s constructor, repeatable{example}"
        option = {"action": "append", "type": key_value, "default": [], "metavar": "NAME=VALUE"}
        p.add_argument(f"--{kind}-option", help=help, **option)
    help = "shorthand for --prior-option num_components=N (mixture and vamp priors)"
    p.add_argument("--prior-components", type=positive_int, help=help)
    p.add_argument("--out", help="run folder (default: a new folder under runs/)")
    help = "continue the run in RUN_DIR from its last checkpoint (only --epochs, --device, "
    help += "--data-dir and --tensorboard may be given with it)"
    p.add_argument("--resume", metavar="RUN_DIR", help=help)
    help = "also log every metrics column per epoch and the figures to TensorBoard in DIR"
    p.add_argument("--tensorboard", metavar="DIR", help=help + " (needs pyro-vae[tensorboard])")
    p.add_argument("--debug", **DEBUG)  # after the command too; SUPPRESS keeps one given before
    p.set_defaults(func=cmd_train)


def config_from_args(args) -> Config:
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}
    values = {name: value for name, value in given.items() if value is not None}
    for name, flag in OPTION_FLAGS.items():
        values[name] = dict(getattr(args, flag.replace("-", "_")))
    if args.prior_components is not None:
        values["prior_kwargs"]["num_components"] = args.prior_components
    if args.recipe is None:
        return Config(**values)
    given = {name: value for name, value in values.items() if value != {}}  # options not given
    config = Config.from_recipe(args.recipe, **given)
    print(*override_lines(config, given), sep="\n", end="\n" if config.recipe_overrides else "")
    return config


def check_resume_flags(args) -> None:
    """Refuse settings given with ``--resume``: the run keeps its own, or it would not repeat."""
    given = [k for k, v in vars(args).items() if k not in RESUME_ARGS and v not in (None, [])]
    if given:
        raise UsageError(
            "--resume continues a run with its own settings; only --epochs, --device, --data-dir "
            f"and --tensorboard may be given with it (got {as_flag(given[0])})"
        )


def cmd_train(args) -> int:
    main_process = distributed.is_main_process()  # of the processes torchrun started, rank 0
    board = TensorBoardLogger(args.tensorboard) if args.tensorboard and main_process else None
    # Shown on a terminal only, by rank 0 only.
    with tqdm(unit="epoch", disable=None if main_process else True, leave=False) as bar:

        def start(vae, config: Config, epoch: int) -> None:
            bar.reset(total=config.epochs)
            bar.update(epoch)

        def update(row: dict) -> None:
            bar.set_postfix(train=f"{row['train_elbo']:.2f}", test=f"{row['test_elbo']:.2f}")
            bar.update(1)
            if board is not None:
                board.on_epoch_end(row)

        hooks = {"on_train_start": start, "on_epoch_end": update}
        options = {"epochs": args.epochs, "device": args.device, "data_dir": args.data_dir}
        if args.resume:
            check_resume_flags(args)
            run = resume_run(args.resume, **options, **hooks)
        elif restarted_run(args.out):  # torchrun restarted this job after a failure
            run = resume_run(args.out, **options, **hooks)
        else:
            config = config_from_args(args)
            if distributed.max_restarts() and not args.out:
                raise UsageError("torchrun --max-restarts needs --out, the run a restart resumes")
            if args.out and holds_run(args.out):
                how = f"continue it with --resume {shlex.quote(args.out)} or choose another --out"
                raise UsageError(f"{args.out} already holds a run; {how}")
            if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
                raise UsageError(f"--out {args.out} is a file, not a folder; choose another --out")
            run = train_run(config, args.out, **hooks)
    if board is not None:
        board.add_figures(run.path)
        board.close()
    last = run.metrics[-1] if run.metrics else {"test_elbo": float("nan"), "epoch": 0}
    if main_process:
        print(f"test ELBO {last['test_elbo']:.2f} nats after epoch {last['epoch']}; ", end="")
        print(f"run saved to {run.path}")
    return 0


def cmd_sample(args) -> int:
    checkpoint = vars(args).get("checkpoint")  # unset: best.pt if the run has one
    run = load_run(args.run_dir, resolve_device(args.device), checkpoint=checkpoint)
    print(f"model of {run.checkpoint_file} (epoch {run.checkpoint['epoch']})")
    pyro.set_rng_seed(args.seed)
    out = Path(args.out) if getattr(args, "out", None) else run.path / "sample_grid.png"
    title = f"{args.num} prior samples"
    fig = plot_images(run.vae.sample(args.num), run.config.image_shape, args.cols, title)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


def cmd_evaluate(args) -> int:
    names = ("split", "limit", "data_dir", "device", "checkpoint")
    options = {name: getattr(args, name, None) for name in names} | {"ais": ais_options(args)}
    shown = [None]  # the phase on the bar
    with tqdm(disable=None, leave=False, unit="step") as bar:  # shown on a terminal only

        def on_step(phase: str, done: int, total: int) -> None:
            if shown[0] != phase or done < bar.n:  # a new phase, or the reverse pass of BDMC
                shown[0] = phase
                bar.reset(total)
                bar.set_description_str(phase)
            bar.update(done - bar.n)

        options |= {"num_samples": args.num_samples, "seed": args.seed, "on_step": on_step}
        result = evaluate_run(args.run_dir, **options)
    print(f"model of {result.model['checkpoint']} (epoch {result.model['epochs']})")
    name = report.evaluation_file(args.split, args.limit)
    path = report.write_evaluation(args.run_dir, result, name)
    print(report.format_evaluation(result))
    print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    if args.draws < 2:
        raise UsageError(f"--draws must be at least 2 to measure a spread, got {args.draws}")
    names = "num_points batch_size objectives particles train_seconds train_particles"
    names = (*names.split(), "num_samples", "seed", "data_dir", "device")
    options = {name: getattr(args, name, None) for name in names}
    result = compare_run(args.run_dir, num_draws=args.draws, **options)
    paths = report.write_comparison(args.run_dir, result, args.command_line)
    if result.note:
        print(f"note: {result.note}")
    print(report.format_comparison_markdown(result, args.command_line), end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def add_run_command(commands, func, help: str, parent: ArgumentParser):
    name = func.__name__.removeprefix("cmd_")
    p = commands.add_parser(name, help=help, description=help, parents=[parent], **SHOW_DEFAULTS)
    p.set_defaults(func=func)
    return p.add_argument


def build_parser() -> ArgumentParser:
    help = "Variational autoencoders in Pyro: train, sample, evaluate, compare."
    parser = ArgumentParser(prog="pyro-vae", description=help, **SHOW_DEFAULTS)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(commands)
    help, run_flags = "draw images from the prior of a trained run", run_folder_flags()
    arg = add_run_command(commands, cmd_sample, help, run_folder_flags(data=False))
    arg("--num", type=positive_int, default=64, help="number of samples")
    arg("--cols", type=positive_int, default=8, help="images per row of the grid")
    # SUPPRESS: no "(default: None)" after the default the help gives; args.out is then unset.
    arg("--out", default=argparse.SUPPRESS, help="PNG path (default: RUN_DIR/sample_grid.png)")
    help = "ELBO, importance-weighted log p(x) (and AIS), bits/dim, active units of a trained run"
    arg = add_run_command(commands, cmd_evaluate, help, run_flags)
    arg("--num-samples", type=positive_int, default=5000, help="importance samples K for log p(x)")
    arg("--split", choices=["test", "train"], default="test", help="data split")
    arg("--limit", type=positive_int, default=None, help="evaluate only the first N datapoints")
    add_ais_flags(arg)
    help = "the estimator study: ELBO and gradient variance, gradient SNR by objective and K, "
    arg = add_run_command(commands, cmd_compare, help + "training curves, log p(x)", run_flags)
    arg("--draws", type=positive_int, default=100, help="draws R per estimate")
    arg("--num-points", type=positive_int, default=1000, help="test points M (ELBO study, scores)")
    arg("--batch-size", type=positive_int, default=128, help="minibatch of the gradient study")
    choices, help = sorted(CHOICES["elbo"]), "objectives of the gradient grid and of the training"
    help += f" (default: those of {' '.join(OBJECTIVES)} the model can run)"
    arg("--objectives", nargs="+", choices=choices, default=argparse.SUPPRESS, help=help)
    help = "numbers of particles K of the gradient grid"
    arg("--particles", nargs="+", type=positive_int, default=list(PARTICLES), help=help)
    help = "training seconds of each objective (0 skips the training study)"
    arg("--train-seconds", type=non_negative_float, default=30.0, help=help)
    arg("--train-particles", type=positive_int, default=5, help="K of each objective in training")
    help = "importance samples K of the final log p(x) of each trained model"
    arg("--num-samples", default=5000, type=positive_int, help=help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["pyro-vae", *argv])
    fix_malloc_threshold()
    warnings.formatwarning = lambda message, *_: f"pyro-vae: warning: {name_flags(str(message))}\n"
    quiet = not distributed.is_main_process()  # torchrun's other processes show errors only
    if quiet:
        warnings.simplefilter("ignore")
    level = logging.INFO if args.verbose and not quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, RunFolderError, WorldSizeError) as e:
        if args.debug:
            raise
        command = f"pyro-vae {args.command}"
        print(f"{command}: error: {name_flags(str(e))} (see '{command} --help')", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        how = ""
        if isinstance(e, RunInterrupted) and e.epoch is not None:
            how = f" Resume with: pyro-vae train --resume {shlex.quote(str(e.run_dir))}"
        print(f"pyro-vae: {str(e) or 'interrupted'}{how}", file=sys.stderr)
        return 130
    except ONE_LINE_ERRORS as e:
        # A RuntimeError is a bug unless it is torch running out of memory: keep its traceback.
        out_of_memory = isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
        if args.debug or (isinstance(e, RuntimeError) and not out_of_memory):
            raise
        message = name_flags(" ".join(str(e).split()) or type(e).__name__)
        if isinstance(e, MemoryError | RuntimeError):
            message = f"out of memory ({message[:200]}); {SMALLER} or more memory"
        print(f"pyro-vae: error: {message}", file=sys.stderr)
        return 1
