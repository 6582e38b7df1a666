import argparse

import pytest

from pyro_vae.flags import (
    device_name,
    key_value,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_value,
)


@pytest.mark.parametrize(
    "parse, text, value",
    [
        (positive_int, "3", 3),
        (non_negative_int, "0", 0),
        (seed_value, "4294967295", 2**32 - 1),
        (positive_float, "1e-3", 1e-3),
        (non_negative_float, "0", 0.0),
        (non_negative_float, "2.5", 2.5),
        (device_name, "cuda:1", "cuda:1"),
    ],
)
def test_flag_types_accept_what_the_checks_accept(parse, text, value):
    result = parse(text)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    "parse, text, expected",
    [
        (positive_int, "0", "expected a positive integer, got '0'"),
        (positive_int, "1.5", "expected a positive integer, got '1.5'"),
        (non_negative_int, "-1", "expected a non-negative integer, got '-1'"),
        (seed_value, "4294967296", "expected an integer in [0, 2**32 - 1], got '4294967296'"),
        (positive_float, "nan", "expected a positive finite number, got 'nan'"),
        (non_negative_float, "-0.5", "expected 0 or a positive finite number, got '-0.5'"),
        (non_negative_float, "inf", "expected 0 or a positive finite number, got 'inf'"),
        (device_name, "gpu", "gpu"),
        (key_value, "=3", "expected NAME=VALUE, got '=3'"),
    ],
)
def test_flag_types_reject_in_one_line_naming_the_value(parse, text, expected):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_key_value_reads_json_values_and_keeps_other_text():
    assert key_value("scale=0.2") == ("scale", 0.2)
    assert key_value("dims=[1, 2]") == ("dims", [1, 2])
    assert key_value("name=flow") == ("name", "flow")
