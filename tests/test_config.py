"""``Config`` checks every field's type and range (README, Guarantees).

Each field of :class:`~pyro_vae.config.Config` gets at least one value of the wrong type and,
where its values have a range, at least one out of range. The tables are checked against
``dataclasses.fields(Config)``, so a new field without bad-value cases fails the suite.
"""

import dataclasses
import json
import math

import pytest

from pyro_vae import Config
from pyro_vae.config import CHOICES, FORMAT_VERSION, model_summary

#: Every bad value is set on top of this valid config (data_dim is needed by image_shape).
BASE = {"data_dim": 64}

#: Fields whose values are free-form strings (a path, an import path): no range to leave.
FREE_STRINGS = {"data_dir", "vae_class", "backend"}

#: One value of the wrong type per field, and a piece of what the error says is allowed.
WRONG_TYPE = {
    "dataset": (3, "choose one of ['digits'"),
    "data_dir": (["/"], "must be a path string or None"),
    "binarize": (1, "choose one of ['dynamic', 'none', 'static'] or None"),
    "latent_dim": ("2", "must be a positive integer"),
    "hidden_dims": (400, "must be positive integers"),
    "activation": (1, "choose one of ['elu', 'gated', 'gelu', 'relu', 'softplus', 'tanh']"),
    "lower_latent_dim": ("100", "must be a positive integer"),
    "inner_hidden_dims": (100, "must be positive integers"),
    "hierarchy": (2, "choose one of ['iwae', 'vampprior']"),
    "prior": (3, "choose one of ['learned_normal'"),
    "likelihood": (None, "choose one of ['bernoulli'"),
    "guide": (3, "choose one of ['diagonal'"),
    "prior_kwargs": (["num_components"], "must be a dict of options by name"),
    "likelihood_kwargs": ("scale=0.2", "must be a dict of options by name"),
    "guide_kwargs": (None, "must be a dict of options by name"),
    "elbo": (0, "choose one of ['dreg', 'iwae', 'meanfield', 'stl', 'trace']"),
    "num_particles": (1.0, "must be a positive integer"),
    "lr": ("0.1", "must be a positive finite number"),
    "adam_betas": (0.9, "must be two numbers in [0, 1)"),
    "adam_eps": ("1e-8", "must be a positive finite number"),
    "lr_schedule": (1, "choose one of ['constant', 'exponential', 'iwae', 'plateau']"),
    "lr_decay": ("0.9", "must be a positive finite number"),
    "plateau_factor": ("0.5", "must be in (0, 1)"),
    "plateau_patience": (2.0, "must be a non-negative integer"),
    "clip_norm": ("1", "must be a positive finite number"),
    "epochs": (1.5, "must be a positive integer"),
    "batch_size": (True, "must be a positive integer"),
    "beta": ("1", "must be a positive finite number"),
    "warmup_epochs": (1.5, "must be a non-negative integer"),
    "seed": ("0", "must be an integer in [0, 4294967295]"),
    "validation_size": ("100", "must be a non-negative integer"),
    "validation_seed": (1.0, "must be an integer in [0, 4294967295]"),
    "patience": ("5", "must be a positive integer"),
    "device": (0, "cpu"),
    "validation": (None, "choose one of ['every_step', 'first_step']"),
    "data_dim": ("64", "must be a positive integer or None"),
    "image_shape": ("8x8", "must be [height, width]"),
    "vae_class": (3, "must be an import path or None"),
    "recipe": (3, "choose one of ['iwae-paper'"),
    "recipe_overrides": ("epochs", "must name config fields given over the recipe"),
    "world_size": (2.0, "must be a positive integer"),
    "backend": (1, "must be a process-group backend or None"),
    "format_version": ("1", f"reads format_version {FORMAT_VERSION}"),
}

#: Values of the right type but out of range, per field (FREE_STRINGS have none).
OUT_OF_RANGE = {
    "dataset": [("cifar", "choose one of ['digits'")],
    "binarize": [("yes", "choose one of ['dynamic', 'none', 'static'] or None")],
    "latent_dim": [(0, "must be a positive integer"), (-1, "must be a positive integer")],
    "hidden_dims": [([10, 0], "must be positive integers"), ([16, 2.5], "positive integers")],
    "activation": [("swish", "choose one of ['elu', 'gated', 'gelu', 'relu', 'softplus', 'tanh']")],
    "lower_latent_dim": [(0, "must be a positive integer")],
    "inner_hidden_dims": [([100, -1], "must be positive integers")],
    "hierarchy": [("ladder", "choose one of ['iwae', 'vampprior']")],
    "prior": [("nope", "choose one of ['learned_normal'")],
    "likelihood": [("gauss", "choose one of ['bernoulli'")],
    "guide": [("nope", "choose one of ['diagonal'")],
    "prior_kwargs": [({1: 2}, "must be a dict of options by name")],
    "likelihood_kwargs": [({0.2: "scale"}, "must be a dict of options by name")],
    "guide_kwargs": [({None: 1}, "must be a dict of options by name")],
    "elbo": [("renyi", "choose one of ['dreg', 'iwae', 'meanfield', 'stl', 'trace']")],
    "num_particles": [(0, "must be a positive integer")],
    "lr": [(0.0, "positive finite"), (-0.1, "positive finite"), (math.inf, "positive finite")],
    "adam_betas": [([0.9], "two numbers in [0, 1)"), ([0.9, 1.0], "[0, 1)"), ([-0.1, 0.9], "[0")],
    "adam_eps": [(0.0, "positive finite"), (-1e-8, "positive finite")],
    "lr_schedule": [("cosine", "choose one of ['constant', 'exponential', 'iwae', 'plateau']")],
    "lr_decay": [(0.0, "positive finite"), (1.5, "must be in (0, 1]")],
    "plateau_factor": [(0.0, "must be in (0, 1)"), (1.0, "(0, 1)"), (math.nan, "(0, 1)")],
    "plateau_patience": [(-1, "must be a non-negative integer")],
    "clip_norm": [(0.0, "positive finite"), (-1.0, "positive finite"), (math.nan, "finite")],
    "epochs": [(0, "must be a positive integer")],
    "batch_size": [(0, "must be a positive integer")],
    "beta": [(0.0, "positive finite"), (-0.5, "positive finite"), (math.nan, "finite")],
    "warmup_epochs": [(-1, "must be a non-negative integer")],
    "seed": [(-1, "in [0, 4294967295]"), (2**32, "in [0, 4294967295]")],
    "validation_size": [(-1, "must be a non-negative integer")],
    "validation_seed": [(-1, "in [0, 4294967295]"), (2**32, "in [0, 4294967295]")],
    "patience": [(0, "must be a positive integer"), (-3, "must be a positive integer")],
    "device": [("gpu", "choose auto, cpu, cuda or cuda:N"), ("mps", "cuda:N")],
    "validation": [("never", "choose one of ['every_step', 'first_step']")],
    "data_dim": [(0, "must be a positive integer or None")],
    "world_size": [(0, "must be a positive integer")],
    "image_shape": [([8], "[height, width]"), ([0, 8], "[height, width]"), ([8, 9], "pixels")],
    "format_version": [(FORMAT_VERSION + 1, f"reads format_version {FORMAT_VERSION}")],
    "recipe": [("burda", "choose one of ['iwae-paper'")],
    "recipe_overrides": [(["epochs", "nope"], "must name config fields given over the recipe")],
}

#: A valid value other than the default, per field: what the bad values are measured against.
GOOD_VALUES = {
    "dataset": "mnist",
    "data_dir": "~/data",
    "binarize": "static",
    "latent_dim": 3,
    "hidden_dims": [7, 5],
    "activation": "tanh",
    "lower_latent_dim": 4,
    "inner_hidden_dims": [6],
    "hierarchy": "vampprior",
    "prior": "mixture",
    "likelihood": "normal",
    "guide": "iaf",
    "prior_kwargs": {"num_components": 3},
    "likelihood_kwargs": {"scale": 0.2},
    "guide_kwargs": {"num_flows": 1},
    "elbo": "meanfield",
    "num_particles": 2,
    "lr": 0.5,
    "adam_betas": [0.5, 0.9],
    "adam_eps": 1e-6,
    "lr_schedule": "plateau",
    "lr_decay": 0.5,
    "plateau_factor": 0.5,
    "plateau_patience": 3,
    "clip_norm": 10.0,
    "epochs": 7,
    "batch_size": 3,
    "beta": 0.25,
    "warmup_epochs": 2,
    "seed": 2**32 - 1,
    "validation_size": 100,
    "validation_seed": 7,
    "patience": 5,
    "device": "cuda:1",
    "validation": "every_step",
    "data_dim": 64,
    "image_shape": [4, 16],
    "vae_class": "mypackage.MyVAE",
    "recipe": "iwae-paper",
    "recipe_overrides": ["epochs", "dataset"],
    "world_size": 2,
    "backend": "gloo",
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


def replace_a_field(values: dict) -> Config:
    """A frozen config is changed by ``dataclasses.replace``, which checks the copy again."""
    return dataclasses.replace(Config(**BASE), **values)


BUILDERS = [build_in_python, build_from_dict, replace_a_field]


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


def test_config_is_frozen_and_replace_makes_a_checked_copy():
    config = Config(epochs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 4
    longer = dataclasses.replace(config, epochs=4)
    assert (config.epochs, longer.epochs) == (3, 4)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        dataclasses.replace(config, epochs=0)


def test_sequences_are_stored_as_lists_as_config_json_reads_them():
    config = Config(hidden_dims=(32, 16), image_shape=(8, 8), data_dim=64)
    assert config.hidden_dims == [32, 16] and config.image_shape == [8, 8]
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert Config(hidden_dims=range(1, 3)).hidden_dims == [1, 2]


def test_defaults_do_not_share_mutable_fields():
    first, second = Config(), Config()
    assert first.hidden_dims == [400, 400] and first.hidden_dims is not second.hidden_dims
    assert first.prior_kwargs is not second.prior_kwargs


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown config keys \['colour'\]"):
        Config.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="format version 2"):
        Config.from_dict({"format_version": 2})
    for key, value, match in [
        ("latent_dim", 0, "latent_dim must be a positive integer, got 0"),
        ("epochs", 1.5, "epochs must be a positive integer, got 1.5"),
        ("hidden_dims", [10, 0], r"hidden_dims must be positive integers, got \[10, 0\]"),
        ("lr", float("nan"), "lr must be a positive finite number, got nan"),
        ("beta", -1.0, "beta must be a positive finite number"),
        ("warmup_epochs", -1, "warmup_epochs must be a non-negative integer, got -1"),
    ]:
        with pytest.raises(ValueError, match=match):
            Config(**{key: value})


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("prior", "nope", r"unknown prior 'nope'; choose one of \['learned_normal'"),
        ("likelihood", "gauss", r"unknown likelihood 'gauss'; choose one of \["),
        ("guide", 3, r"unknown guide 3; choose one of \["),
        ("elbo", "renyi", r"unknown elbo 'renyi'; choose one of \['dreg', 'iwae', 'meanfield'"),
        ("dataset", "cifar", r"unknown dataset 'cifar'; choose one of \["),
        ("binarize", "yes", r"unknown binarize 'yes'; choose one of \['dynamic'"),
        ("hidden_dims", 400, "hidden_dims must be positive integers, got 400"),
        ("num_particles", 0, "num_particles must be a positive integer, got 0"),
        ("batch_size", True, "batch_size must be a positive integer, got True"),
        ("lr", float("inf"), "lr must be a positive finite number, got inf"),
        ("seed", 2**32, r"seed must be an integer in \[0, 4294967295\]"),
        ("image_shape", [8, 9], r"image_shape \[8, 9\] does not hold data_dim=64 pixels"),
        ("prior_kwargs", ["num_components"], "prior_kwargs must be a dict of options"),
        ("device", "gpu", "unknown device 'gpu'; choose auto, cpu, cuda or cuda:N"),
        ("device", 0, "device must be a string such as 'cpu', got 0"),
        ("data_dir", ["/"], "data_dir must be a path string or None"),
        ("vae_class", 3, "vae_class must be an import path or None"),
        ("clip_norm", 0.0, "clip_norm must be a positive finite number, got 0.0"),
        ("data_dim", -64, "data_dim must be a positive integer"),
    ],
)
def test_config_names_the_bad_value_and_what_is_allowed(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{"data_dim": 64, field: value})


def test_optional_fields_accept_none_and_unregistered_part_class_paths():
    config = Config(binarize=None, clip_norm=None, data_dir=None, data_dim=None)
    assert config.binarize is None and config.clip_norm is None
    assert Config(prior="my_module.MyPrior").prior == "my_module.MyPrior"
    assert Config(seed=2**32 - 1, warmup_epochs=0).seed == 2**32 - 1


def test_an_old_config_json_without_the_filled_in_fields_loads():
    data = {"dataset": "digits", "latent_dim": 2, "epochs": 3, "format_version": FORMAT_VERSION}
    config = Config.from_dict(data)
    assert (config.latent_dim, config.data_dim, config.vae_class) == (2, None, None)
    assert config.to_dict()["format_version"] == 1


def test_user_settings_carry_the_help_of_their_flag():
    with_help = {f.name for f in dataclasses.fields(Config) if "help" in f.metadata}
    filled_in = {"data_dim", "image_shape", "vae_class", "world_size", "backend", "format_version"}
    filled_in |= {"recipe", "recipe_overrides"}  # by Config.from_recipe (--recipe)
    options = {"prior_kwargs", "likelihood_kwargs", "guide_kwargs"}
    assert with_help == {f.name for f in dataclasses.fields(Config)} - filled_in - options
    assert set(CHOICES) - {"recipe"} <= with_help


def test_model_summary_names_the_model_of_a_run():
    config = Config(prior="mixture", latent_dim=4, hidden_dims=(8,), elbo="meanfield")
    assert model_summary(config) == {
        "dataset": "digits",
        "prior": "mixture",
        "likelihood": "bernoulli",
        "guide": "diagonal",
        "latent_dim": 4,
        "hidden_dims": [8],
        "trained_with_elbo": "meanfield",
    }


@pytest.mark.parametrize(
    "values, match",
    [
        ({"patience": 5}, "patience 5 stops on valid_elbo, which needs a validation split"),
        ({"lr_schedule": "plateau"}, "lr_schedule 'plateau' steps on valid_elbo, which needs a"),
    ],
)
def test_settings_that_read_valid_elbo_need_a_validation_split(values, match):
    with pytest.raises(ValueError, match=match) as info:
        Config(**values)
    assert "set config.validation_size to a positive number" in str(info.value)
    assert "\n" not in str(info.value)
    assert Config(**values, validation_size=1).validation_size == 1


def test_adam_betas_are_stored_as_a_list():
    assert Config(adam_betas=(0.5, 0.75)).adam_betas == [0.5, 0.75]
