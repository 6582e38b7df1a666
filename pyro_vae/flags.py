"""The flags of the command line: argparse types (each accepts what a :mod:`pyro_vae.checks`
function accepts, and says in one line what it expected otherwise), the names that tie the
fields of a :class:`~pyro_vae.config.Config` to their flags, and the AIS flags of
``pyro-vae evaluate``."""

import argparse
import dataclasses
import json
import re

from pyro_vae.ais import INITIALS
from pyro_vae.checks import check_int, check_non_negative, check_positive
from pyro_vae.config import Config
from pyro_vae.devices import check_device_name
from pyro_vae.evaluate import AIS_CHAINS, AIS_LEAPFROG_STEPS, AIS_STEPS, BDMC_POINTS
from pyro_vae.recipes import RECIPES, recipe_settings
from pyro_vae.runs import CHECKPOINTS


def number(convert, what: str, check, **bounds):
    """An argparse type: a number that a :mod:`pyro_vae.checks` function accepts, or ``what``."""

    def parse(text: str):
        try:
            return check("value", convert(text), **bounds)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


positive_int = number(int, "a positive integer", check_int)
non_negative_int = number(int, "a non-negative integer", check_int, minimum=0)
seed_value = number(int, "an integer in [0, 2**32 - 1]", check_int, minimum=0, maximum=2**32 - 1)
positive_float = number(float, "a positive finite number", check_positive)
non_negative_float = number(float, "0 or a positive finite number", check_non_negative)


def device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def key_value(text: str) -> tuple[str, object]:
    """Parse ``NAME=VALUE``; VALUE is read as JSON when it can be (numbers, lists, true)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


#: The part options of a config, and the repeatable flags that set them.
OPTION_FLAGS = {f"{kind}_kwargs": f"{kind}-option" for kind in ("prior", "likelihood", "guide")}
#: The argparse type of each flag made from a Config field (the choices come from CHOICES).
FLAG_TYPES = {"seed": seed_value, "validation_seed": seed_value, "device": device_name}
FLAG_TYPES |= {"adam_betas": non_negative_float}  # in [0, 1), as Config checks
FLAG_NAMES = {
    non_negative_int: "warmup_epochs validation_size plateau_patience",
    positive_float: "lr clip_norm beta adam_eps lr_decay plateau_factor",
    positive_int: "latent_dim hidden_dims num_particles patience epochs batch_size "
    "lower_latent_dim inner_hidden_dims",
}
FLAG_TYPES |= {name: kind for kind, names in FLAG_NAMES.items() for name in names.split()}


def as_typed(value: object) -> str:
    """``value`` as it is typed after its flag: a list as its items (``400 400``), options as
    ``NAME=VALUE`` pairs."""
    if isinstance(value, dict):
        return " ".join(f"{name}={json.dumps(v)}" for name, v in value.items())
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def as_flag(name: str) -> str:
    """The flag that sets the Config field ``name``."""
    return "--" + OPTION_FLAGS.get(name, name).replace("_", "-")


def name_flags(message: str) -> str:
    """``config.<field>`` in a library message as its flag (``--<kind>-option NAME=VALUE``)."""

    def options(m: re.Match) -> str:
        pairs = re.findall(r"'(\w+)': ([^,}]+)", m[2])
        return " ".join(f"{as_flag(m[1])} {name}={value}" for name, value in pairs)

    message = re.sub(rf"\bconfig\.({'|'.join(OPTION_FLAGS)})=(\{{[^{{}}]*\}})", options, message)
    fields = {f.name for f in dataclasses.fields(Config)}
    return re.sub(r"\bconfig\.(\w+)", lambda m: as_flag(m[1]) if m[1] in fields else m[0], message)


def recipes_epilog() -> str:
    """The end of ``pyro-vae train --help``: every recipe with its one line."""
    lines = [f"  {name:28} {line}\n" for name, (line, _) in RECIPES.items()]
    return (
        "recipes (--recipe NAME; a flag given beside it overrides the recipe's setting):\n"
        + "".join(lines)
    )


def override_lines(config: Config, given: dict) -> list[str]:
    """One line per field given over ``config.recipe``: the flag, its value and the recipe's."""
    recipe = recipe_settings(config.recipe) if config.recipe else {}
    return [
        f"recipe {config.recipe}: {as_flag(name)} {as_typed(given[name])} overrides its "
        f"{as_typed(recipe[name])}"
        for name in config.recipe_overrides
    ]


def add_ais_flags(arg) -> None:
    """Add the AIS flags of ``pyro-vae evaluate`` with ``arg``, a parser's ``add_argument``."""
    arg("--ais", action="store_true", help="also log p(x) by AIS with HMC, and the BDMC gap")
    help = "AIS transitions T (intermediate distributions), one row each (with --ais)"
    arg("--ais-steps", nargs="+", type=positive_int, default=list(AIS_STEPS), help=help)
    arg("--ais-chains", type=positive_int, default=AIS_CHAINS, help="AIS chains per datapoint")
    help = "HMC leapfrog steps per AIS transition"
    arg("--ais-leapfrog-steps", type=positive_int, default=AIS_LEAPFROG_STEPS, help=help)
    arg("--ais-initial", choices=INITIALS, default="guide", help="where the AIS chains start")
    help = "data points simulated from the model for the BDMC gap (0: none)"
    arg("--bdmc-points", type=non_negative_int, default=BDMC_POINTS, help=help)


def ais_options(args) -> dict | None:
    """The AIS options of :func:`~pyro_vae.evaluate.evaluate_run` from the parsed flags."""
    if not args.ais:
        return None
    names = ("num_steps", "num_chains", "num_leapfrog_steps", "initial")
    flags = ("ais_steps", "ais_chains", "ais_leapfrog_steps", "ais_initial")
    return {name: getattr(args, flag) for name, flag in zip(names, flags, strict=True)} | {
        "bdmc_points": args.bdmc_points
    }


#: The --debug flag, also after a command; SUPPRESS keeps one given before it.
DEBUG = {"action": "store_true", "default": argparse.SUPPRESS, "help": "show tracebacks on errors"}


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def run_folder_flags(data: bool = True) -> ArgumentParser:
    """The parent parser of the commands that read a run folder (``--data-dir``: and its data)."""
    p = ArgumentParser(add_help=False)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'pyro-vae train'")
    p.add_argument("--device", default="cpu", type=device_name, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed")
    if data:
        p.add_argument("--data-dir", default=None, help="overrides the data folder of the run")
    help = "best.pt (highest valid_elbo) or checkpoint.pt (last epoch) (default: best if any)"
    p.add_argument(
        "--checkpoint", choices=sorted(CHECKPOINTS), default=argparse.SUPPRESS, help=help
    )
    p.add_argument("--debug", **DEBUG)
    return p
