"""Argument checks shared by the whole package: the one place that says what a valid count,
a valid positive number and a valid choice are, and how the error reads.

Each ``check_*`` returns the value (converted to a plain Python number) or raises
:class:`ValueError` naming the argument, the value received and what is allowed. The command
line uses the same functions for its flags, so Python and CLI users get the same rules.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) in ``[minimum, maximum]``.

    :param str name: how the error calls the argument.
    :param value: the value to check.
    :param int minimum: the smallest allowed value.
    :param int maximum: the largest allowed value, or ``None`` for no bound.
    :raises ValueError: naming ``name``, the value and the allowed range.

    >>> check_int("epochs", 3)
    3
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        raise ValueError(f"{name} must be {_int_range(minimum, maximum)}, got {value!r}")
    return int(value)


def check_positive(name: str, value: object) -> float:
    """``value`` as a ``float`` if it is a finite real number greater than 0 (not a bool).

    :raises ValueError: naming ``name`` and the value.

    >>> check_positive("lr", 1e-3)
    0.001
    """
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: object) -> float:
    """``value`` as a ``float`` if it is 0 or a finite real number greater than 0 (not a bool):
    a budget that 0 switches off.

    :raises ValueError: naming ``name`` and the value.

    >>> check_non_negative("seconds", 0)
    0.0
    """
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be 0 or a positive finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (a registry dict or a sequence of names).

    :raises ValueError: ``unknown <name> <value>; choose one of [...]``.

    >>> check_choice("prior", "normal", {"normal": None, "vamp": None})
    'normal'
    """
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(choices)}")
    return value


def _int_range(minimum: int, maximum: int | None) -> str:
    if maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"
