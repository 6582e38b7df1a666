import dataclasses
import json

import pytest

from pyro_vae import Config
from pyro_vae.config import CHOICES, FORMAT_VERSION, model_summary


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
        ("elbo", "iwae", r"unknown elbo 'iwae'; choose one of \['meanfield', 'trace'\]"),
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
    filled_in = {"data_dim", "image_shape", "vae_class", "format_version"}
    options = {"prior_kwargs", "likelihood_kwargs", "guide_kwargs"}
    assert with_help == {f.name for f in dataclasses.fields(Config)} - filled_in - options
    assert set(CHOICES) <= with_help


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
