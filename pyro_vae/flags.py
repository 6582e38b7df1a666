"""The argparse types of the command line: each accepts what a :mod:`pyro_vae.checks` function
accepts, and says in one line what it expected otherwise."""

import argparse
import json

from pyro_vae.checks import check_int, check_non_negative, check_positive
from pyro_vae.devices import check_device_name


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
