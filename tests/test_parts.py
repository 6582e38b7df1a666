import copy
import inspect

import pytest
import torch

from pyro_vae import VAE
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


#: Each registry with the size its parts take first (latent_dim or data_dim).
REGISTRIES = {"prior": (PRIORS, 3), "likelihood": (LIKELIHOODS, 16), "guide": (GUIDES, 3)}
#: A value other than the default for every option of every registered part, so that a part
#: rebuilt from options that were lost (or never recorded) differs from the original.
NON_DEFAULT_OPTIONS = {
    "prior": {
        "mixture": {"num_components": 3},
        "student_t": {"df": 5.0},
        "vamp": {"num_components": 4, "init_range": (0.2, 0.4)},
    },
    "likelihood": {
        "discretized_logistic": {"num_levels": 17},
        "laplace": {"scale": 0.3},
        "learned_normal": {"per_pixel": False, "init_scale": 0.3, "min_scale": 0.01},
        "normal": {"scale": 0.3},
    },
    "guide": {"iaf": {"num_flows": 1, "hidden_dims": [8, 9], "context_dim": 5}},
}


def as_module(kind: str, part) -> torch.nn.Module:
    """The part itself, or for a prior a VAE around it (a VampPrior needs the VAE's encoder)."""
    return VAE(8, part.latent_dim, (4,), prior=part) if kind == "prior" else part


def output_at_fixed_inputs(kind: str, module: torch.nn.Module):
    torch.manual_seed(1)
    if kind == "prior":
        return module.prior().log_prob(torch.randn(5, module.latent_dim))
    out = torch.randn(5, module.output_dim)
    if kind == "likelihood":
        return module(out).log_prob(module(out).sample()), module.mean(out)
    return module(out).log_prob(torch.randn(5, module.latent_dim))


@pytest.mark.parametrize(
    "kind, name", [(kind, name) for kind, (reg, _) in REGISTRIES.items() for name in sorted(reg)]
)
def test_every_registered_part_is_rebuilt_from_its_init_kwargs(kind, name):
    registry, size = REGISTRIES[kind]
    cls = registry[name]
    options = NON_DEFAULT_OPTIONS[kind].get(name, {})
    assert set(options) == set(list(inspect.signature(cls).parameters)[1:]), (
        f"give every option of {kind} {name!r} a non-default value in NON_DEFAULT_OPTIONS"
    )
    part = cls(size, **options)
    assert part.init_kwargs == options
    rebuilt = cls(size, **part.init_kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in part.state_dict().items()
    }
    original, copy = as_module(kind, part), as_module(kind, rebuilt)
    copy.load_state_dict(original.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            output_at_fixed_inputs(kind, copy), output_at_fixed_inputs(kind, original)
        )


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
