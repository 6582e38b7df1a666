import math

import numpy as np
import pytest

from pyro_vae.checks import check_choice, check_int, check_positive


@pytest.mark.parametrize(
    "value, kwargs, expected",
    [
        (3, {}, 3),
        (1, {}, 1),
        (0, {"minimum": 0}, 0),
        (2, {"minimum": 2}, 2),
        (5, {"maximum": 5}, 5),
        (np.int64(7), {}, 7),
        (np.int32(2), {"minimum": 2}, 2),
    ],
)
def test_check_int_accepts_integers_in_range_and_returns_a_plain_int(value, kwargs, expected):
    result = check_int("count", value, **kwargs)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        (0, {}, "count must be a positive integer, got 0"),
        (-3, {}, "count must be a positive integer, got -3"),
        (2.0, {}, "count must be a positive integer, got 2.0"),
        ("3", {}, "count must be a positive integer, got '3'"),
        (None, {}, "count must be a positive integer, got None"),
        (True, {}, "count must be a positive integer, got True"),
        (False, {"minimum": 0}, "count must be a non-negative integer, got False"),
        (-1, {"minimum": 0}, "count must be a non-negative integer, got -1"),
        (1, {"minimum": 2}, "count must be an integer >= 2, got 1"),
        (6, {"maximum": 5}, r"count must be an integer in \[1, 5\], got 6"),
        (np.float64(3.0), {}, "count must be a positive integer, got"),
    ],
)
def test_check_int_rejects_naming_the_argument_value_and_range(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_int("count", value, **kwargs)


@pytest.mark.parametrize("value", [1e-3, 3, 0.5, np.float64(2.5), np.int64(4)])
def test_check_positive_accepts_finite_positive_numbers_as_float(value):
    result = check_positive("lr", value)
    assert result == float(value) and type(result) is float


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, "1", None])
def test_check_positive_rejects_naming_the_argument_and_value(value):
    with pytest.raises(ValueError, match=rf"lr must be a positive finite number, got {value!r}"):
        check_positive("lr", value)


def test_check_choice_accepts_a_key_of_a_dict_or_an_item_of_a_sequence():
    assert check_choice("prior", "normal", {"normal": None, "vamp": None}) == "normal"
    assert check_choice("prior", "vamp", ["vamp", "normal"]) == "vamp"
    assert check_choice("prior", "vamp", (name for name in ["normal", "vamp"])) == "vamp"


@pytest.mark.parametrize("value", ["nope", "Normal", 1, None, True])
def test_check_choice_rejects_listing_the_sorted_choices(value):
    message = rf"unknown prior {value!r}; choose one of \['normal', 'vamp'\]"
    with pytest.raises(ValueError, match=message):
        check_choice("prior", value, {"vamp": None, "normal": None})
