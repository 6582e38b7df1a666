import copy
import inspect

import pytest
import torch

from pyro_vae.guides import GUIDES, InverseAutoregressiveFlow
from pyro_vae.likelihoods import LIKELIHOODS, Bernoulli, Normal
from pyro_vae.parts import check_options
from pyro_vae.priors import PRIORS, MixtureOfGaussians, Prior, StandardNormal, VampPrior


def test_init_kwargs_are_the_arguments_after_the_size_as_given():
    assert MixtureOfGaussians(3, num_components=4).init_kwargs == {"num_components": 4}
    assert MixtureOfGaussians(3, 4).init_kwargs == {"num_components": 4}
    assert MixtureOfGaussians(latent_dim=3).init_kwargs == {}
    assert Normal(64, scale=0.3).init_kwargs == {"scale": 0.3}
    assert Bernoulli(64).init_kwargs == {}
    flow = InverseAutoregressiveFlow(3, num_flows=1, hidden_dims=[8])
    assert flow.init_kwargs == {"num_flows": 1, "hidden_dims": [8]}


@pytest.mark.parametrize(
    "registry, size", [(PRIORS, 3), (LIKELIHOODS, 64), (GUIDES, 3)], ids=["prior", "lik", "guide"]
)
def test_every_registered_part_is_rebuilt_from_its_init_kwargs(registry, size):
    for cls in registry.values():
        part = cls(size)
        rebuilt = cls(size, **part.init_kwargs)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in part.state_dict().items()
        }


def test_the_outermost_constructor_records_not_the_base_class_call():
    class FixedMixture(MixtureOfGaussians):
        def __init__(self, latent_dim: int, spread: float = 2.0):
            super().__init__(latent_dim, num_components=7)
            with torch.no_grad():
                self.locs.mul_(spread)

    assert FixedMixture(2, spread=3.0).init_kwargs == {"spread": 3.0}
    assert FixedMixture(2).init_kwargs == {}


def test_user_parts_with_star_args_or_kwargs():
    class Flexible(Prior):
        def __init__(self, latent_dim, *args, scale=1.0, **kwargs):
            super().__init__(latent_dim)

    assert Flexible(2, scale=2.0, extra=1).init_kwargs == {"scale": 2.0, "extra": 1}
    assert Flexible(2, 5).init_kwargs is None  # an unnamed argument cannot be recorded


def test_signatures_and_copies_are_unchanged_by_the_recording():
    # check_options reads the constructor's signature.
    assert list(inspect.signature(Bernoulli).parameters) == ["data_dim"]
    assert list(inspect.signature(VampPrior).parameters) == [
        "latent_dim",
        "num_components",
        "init_range",
    ]
    prior = MixtureOfGaussians(2, num_components=3)
    assert copy.deepcopy(prior).init_kwargs == {"num_components": 3}
    assert StandardNormal(2).to(torch.float64).init_kwargs == {}


def test_a_bad_argument_still_raises_the_constructors_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        MixtureOfGaussians(2, colour="red")


def test_check_options_accepts_the_constructor_arguments_after_the_size():
    check_options("prior", VampPrior, {"num_components": 3, "init_range": (0.0, 1.0)})
    check_options("prior", StandardNormal, {})
    check_options("guide", InverseAutoregressiveFlow, {"num_flows": 1, "context_dim": 2})


@pytest.mark.parametrize(
    "kind, cls, options, message",
    [
        (
            "prior",
            VampPrior,
            {"colour": 1},
            r"prior VampPrior takes no option 'colour'; it "
            r"takes \['init_range', 'num_components'\]",
        ),
        (
            "likelihood",
            Bernoulli,
            {"scale": 0.1},
            "likelihood Bernoulli takes no option 'scale'; it takes none",
        ),
        # The size is the first argument, not an option.
        ("prior", MixtureOfGaussians, {"latent_dim": 3}, "takes no option 'latent_dim'"),
        ("prior", MixtureOfGaussians, {"b": 1, "a": 2}, "takes no option 'a'"),
    ],
)
def test_check_options_refuses_unknown_names_listing_the_accepted_ones(kind, cls, options, message):
    with pytest.raises(ValueError, match=message):
        check_options(kind, cls, options)


def test_check_options_with_star_args_and_kwargs():
    class Flexible(Prior):
        def __init__(self, latent_dim, *args, scale=1.0, **kwargs):
            super().__init__(latent_dim)

    class Strict(Prior):
        def __init__(self, latent_dim, *args, scale=1.0):
            super().__init__(latent_dim)

    check_options("prior", Flexible, {"anything": 1, "scale": 2.0})
    check_options("prior", Strict, {"scale": 2.0})
    with pytest.raises(
        ValueError, match=r"prior Strict takes no option 'args'; it takes \['scale'\]"
    ):
        check_options("prior", Strict, {"args": (1,)})
