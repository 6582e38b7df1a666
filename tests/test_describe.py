import json

import pytest
import torch

from pyro_vae import PRIORS, VAE, Config
from pyro_vae.describe import (
    build_vae,
    check_buildable,
    class_path,
    describe_model,
    describe_part,
    is_buildable,
    record_model,
)
from pyro_vae.likelihoods import Normal
from pyro_vae.priors import MixtureOfGaussians, VampPrior


class ScaledVAE(VAE):
    """A VAE subclass: config.json records it by class path."""


def test_options_that_are_not_json_are_recorded_by_class_path():
    prior = VampPrior(2, num_components=3, init_range=torch.tensor([0.0, 2.0]))
    name, kwargs = describe_part(prior, PRIORS)
    assert name == "pyro_vae.priors.VampPrior"
    assert kwargs["num_components"] == 3 and "tensor" in kwargs["init_range"]
    assert describe_part(VampPrior(2, num_components=3), PRIORS) == ("vamp", {"num_components": 3})


def test_describe_model_and_build_vae_are_inverse():
    vae = VAE(64, 3, (16, 8), "tanh", prior=MixtureOfGaussians(3, 4), likelihood=Normal(64, 0.2))
    fields = describe_model(vae)
    assert fields == {
        "data_dim": 64,
        "latent_dim": 3,
        "hidden_dims": [16, 8],
        "activation": "tanh",
        "vae_class": None,
        "prior": "mixture",
        "prior_kwargs": {"num_components": 4},
        "likelihood": "normal",
        "likelihood_kwargs": {"scale": 0.2},
        "guide": "diagonal",
        "guide_kwargs": {},
    }
    json.dumps(fields)
    rebuilt = build_vae(Config(**fields))
    assert describe_model(rebuilt) == fields
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in vae.state_dict().items()
    }


def test_record_model_returns_a_new_config_describing_the_model():
    config = Config(epochs=3)
    recorded = record_model(config, VAE(64, latent_dim=2, hidden_dims=(8,)))
    assert (recorded.latent_dim, recorded.hidden_dims, recorded.data_dim) == (2, [8], 64)
    assert recorded.epochs == 3 and config == Config(epochs=3)


def test_a_custom_model_class_is_recorded_but_not_buildable():
    fields = describe_model(ScaledVAE(64, latent_dim=2, hidden_dims=(8,)))
    assert fields["vae_class"] == class_path(ScaledVAE) == f"{__name__}.ScaledVAE"
    config = Config(**fields)
    assert not is_buildable(config) and is_buildable(Config(data_dim=64))
    with pytest.raises(ValueError, match=r"custom model class .*ScaledVAE.*load_run\(run_dir, vae"):
        build_vae(config)


def test_check_buildable_says_how_to_load_a_run_it_cannot_rebuild():
    with pytest.raises(ValueError, match=r"prior 'laplace' is not in pyro_vae.priors.PRIORS"):
        check_buildable({"prior": "laplace"})
    with pytest.raises(ValueError, match=r"guide was a my.Guide object.*load_run\(run_dir, vae"):
        check_buildable({"guide": "my.Guide"})
    check_buildable({})  # the defaults are registered
    with pytest.raises(ValueError, match="config.data_dim is not set"):
        build_vae(Config())
