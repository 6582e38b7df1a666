"""``Config`` checks every field's type and range (README, Guarantees).

Each field of :class:`~pyro_vae.config.Config` gets at least one value of the wrong type and,
where its values have a range, at least one out of range. The tables are checked against
``dataclasses.fields(Config)``, so a new field without bad-value cases fails the suite.
"""

import dataclasses
import json
import math

import pytest

from pyro_vae.config import FORMAT_VERSION, Config

#: Every bad value is set on top of this valid config (data_dim is needed by image_shape).
BASE = {"data_dim": 64}

#: Fields whose values are free-form strings (a path, an import path): no range to leave.
FREE_STRINGS = {"data_dir", "vae_class"}

#: One value of the wrong type per field, and a piece of what the error says is allowed.
WRONG_TYPE = {
    "dataset": (3, "choose one of ['digits'"),
    "data_dir": (["/"], "must be a path string or None"),
    "binarize": (1, "choose one of ['dynamic', 'static', 'none'] or None"),
    "latent_dim": ("2", "must be a positive integer"),
    "hidden_dims": (400, "must be positive integers"),
    "activation": (1, "choose one of ['elu', 'gelu', 'relu', 'softplus', 'tanh']"),
    "prior": (3, "choose one of ['learned_normal'"),
    "likelihood": (None, "choose one of ['bernoulli'"),
    "guide": (3, "choose one of ['diagonal'"),
    "prior_kwargs": (["num_components"], "must be a dict of options by name"),
    "likelihood_kwargs": ("scale=0.2", "must be a dict of options by name"),
    "guide_kwargs": (None, "must be a dict of options by name"),
    "elbo": (0, "choose one of ['meanfield', 'trace']"),
    "num_particles": (1.0, "must be a positive integer"),
    "lr": ("0.1", "must be a positive finite number"),
    "clip_norm": ("1", "must be a positive finite number"),
    "epochs": (1.5, "must be a positive integer"),
    "batch_size": (True, "must be a positive integer"),
    "beta": ("1", "must be a positive finite number"),
    "warmup_epochs": (1.5, "must be an integer"),
    "seed": ("0", r"must be an integer in [0, 2**32 - 1]"),
    "device": (0, "cpu"),
    "data_dim": ("64", "must be a positive integer or None"),
    "image_shape": ("8x8", "must be [height, width]"),
    "vae_class": (3, "must be an import path or None"),
    "format_version": ("1", f"reads format_version {FORMAT_VERSION}"),
}

#: Values of the right type but out of range, per field (FREE_STRINGS have none).
OUT_OF_RANGE = {
    "dataset": [("cifar", "choose one of ['digits'")],
    "binarize": [("yes", "choose one of ['dynamic', 'static', 'none'] or None")],
    "latent_dim": [(0, "must be a positive integer"), (-1, "must be a positive integer")],
    "hidden_dims": [([10, 0], "must be positive integers"), ([16, 2.5], "positive integers")],
    "activation": [("swish", "choose one of ['elu', 'gelu', 'relu', 'softplus', 'tanh']")],
    "prior": [("nope", "choose one of ['learned_normal'")],
    "likelihood": [("gauss", "choose one of ['bernoulli'")],
    "guide": [("nope", "choose one of ['diagonal'")],
    "prior_kwargs": [({1: 2}, "must be a dict of options by name")],
    "likelihood_kwargs": [({0.2: "scale"}, "must be a dict of options by name")],
    "guide_kwargs": [({None: 1}, "must be a dict of options by name")],
    "elbo": [("iwae", "choose one of ['meanfield', 'trace']")],
    "num_particles": [(0, "must be a positive integer")],
    "lr": [(0.0, "positive finite"), (-0.1, "positive finite"), (math.inf, "positive finite")],
    "clip_norm": [(0.0, "positive finite"), (-1.0, "positive finite"), (math.nan, "finite")],
    "epochs": [(0, "must be a positive integer")],
    "batch_size": [(0, "must be a positive integer")],
    "beta": [(0.0, "positive finite"), (-0.5, "positive finite"), (math.nan, "finite")],
    "warmup_epochs": [(-1, "must be >= 0")],
    "seed": [(-1, "in [0, 2**32 - 1]"), (2**32, "in [0, 2**32 - 1]")],
    "device": [("gpu", "choose auto, cpu, cuda or cuda:N"), ("mps", "cuda:N")],
    "data_dim": [(0, "must be a positive integer or None")],
    "image_shape": [([8], "[height, width]"), ([0, 8], "[height, width]"), ([8, 9], "pixels")],
    "format_version": [(FORMAT_VERSION + 1, f"reads format_version {FORMAT_VERSION}")],
}

#: A valid value other than the default, per field: what the bad values are measured against.
GOOD_VALUES = {
    "dataset": "mnist",
    "data_dir": "~/data",
    "binarize": "static",
    "latent_dim": 3,
    "hidden_dims": [7, 5],
    "activation": "tanh",
    "prior": "mixture",
    "likelihood": "normal",
    "guide": "iaf",
    "prior_kwargs": {"num_components": 3},
    "likelihood_kwargs": {"scale": 0.2},
    "guide_kwargs": {"num_flows": 1},
    "elbo": "meanfield",
    "num_particles": 2,
    "lr": 0.5,
    "clip_norm": 10.0,
    "epochs": 7,
    "batch_size": 3,
    "beta": 0.25,
    "warmup_epochs": 2,
    "seed": 2**32 - 1,
    "device": "cuda:1",
    "data_dim": 64,
    "image_shape": [4, 16],
    "vae_class": "mypackage.MyVAE",
    "format_version": FORMAT_VERSION,
}

FIELD_NAMES = {f.name for f in dataclasses.fields(Config)}
BAD_CASES = [(name, value, allowed) for name, (value, allowed) in WRONG_TYPE.items()] + [
    (name, value, allowed) for name, cases in OUT_OF_RANGE.items() for value, allowed in cases
]


def build_in_python(values: dict) -> Config:
    return Config(**values)


def build_from_dict(values: dict) -> Config:
    return Config.from_dict(values)


def set_then_validate(values: dict) -> Config:
    """What ``fit`` does: a config changed after it was built is checked again."""
    config = Config(**BASE)
    for name, value in values.items():
        setattr(config, name, value)
    config.validate()
    return config


BUILDERS = [build_in_python, build_from_dict, set_then_validate]


def test_every_config_field_has_bad_values_and_a_good_one():
    assert set(WRONG_TYPE) == FIELD_NAMES
    assert set(OUT_OF_RANGE) == FIELD_NAMES - FREE_STRINGS
    assert set(GOOD_VALUES) == FIELD_NAMES
    defaults = Config().to_dict()
    # format_version has a single valid value; every other good value differs from the default.
    assert all(GOOD_VALUES[name] != defaults[name] for name in FIELD_NAMES - {"format_version"})


@pytest.mark.parametrize("build", BUILDERS)
def test_config_accepts_a_good_value_of_every_field(build):
    config = build(dict(GOOD_VALUES))
    assert config.to_dict() == GOOD_VALUES
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("name, value, allowed", BAD_CASES, ids=lambda v: repr(v)[:20])
def test_config_refuses_a_bad_value_of_every_field_naming_it(build, name, value, allowed):
    with pytest.raises(ValueError) as excinfo:
        build({**BASE, name: value})
    message = str(excinfo.value)
    assert name in message, message
    assert repr(value) in message, message
    assert allowed in message, message
