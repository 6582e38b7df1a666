import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import constraints

from pyro_vae import VAE
from pyro_vae.distributions import QuantizedUnitInterval
from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.objectives import ELBOS, get_elbo
from pyro_vae.priors import PRIORS


@pytest.mark.parametrize("name", sorted(ELBOS))
def test_get_elbo_builds_the_registered_class_with_one_plate(name):
    elbo = get_elbo(name)
    assert type(elbo) is ELBOS[name]
    assert elbo.num_particles == 1 and not elbo.vectorize_particles
    assert elbo.max_plate_nesting == 1


@pytest.mark.parametrize("num_particles", [2, 5, np.int64(3)])
@pytest.mark.parametrize("name", sorted(ELBOS))
def test_num_particles_reaches_the_elbo_vectorized(name, num_particles):
    elbo = get_elbo(name, num_particles)
    assert elbo.num_particles == num_particles and type(elbo.num_particles) is int
    assert elbo.vectorize_particles


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("name", sorted(ELBOS))
def test_every_elbo_gives_a_finite_loss_for_the_vae(name, num_particles):
    vae = VAE(data_dim=16, latent_dim=2, hidden_dims=(8,))
    x = torch.bernoulli(torch.full((4, 16), 0.3))
    loss = get_elbo(name, num_particles).differentiable_loss(vae.model, vae.guide, x)
    assert loss.shape == () and math.isfinite(loss.item())
    loss.backward()
    assert vae.encoder[0].weight.grad is not None


def test_get_elbo_unknown_name_error():
    with pytest.raises(
        ValueError, match=r"unknown ELBO 'renyi'; choose one of \['meanfield', 'trace'\]"
    ):
        get_elbo("renyi")


@pytest.mark.parametrize("num_particles", [0, -1, 2.5, True, "2", None])
def test_get_elbo_bad_num_particles_error(num_particles):
    message = rf"num_particles must be a positive integer, got {num_particles!r}"
    with pytest.raises(ValueError, match=message):
        get_elbo("trace", num_particles)


# --- FastTrace_ELBO: Pyro's Trace_ELBO, term for term, on the same draws --------------------

#: Every registered part once, the others at their defaults.
PART_CASES = (
    [{"prior": name} for name in sorted(PRIORS)]
    + [{"guide": name} for name in sorted(GUIDES) if name != "diagonal"]
    + [{"likelihood": name} for name in sorted(LIKELIHOODS) if name != "bernoulli"]
)


def data_in_support(likelihood, shape) -> torch.Tensor:
    """float64 data the likelihood accepts."""
    support = likelihood.support
    if support is constraints.boolean:
        return torch.bernoulli(torch.full(shape, 0.3, dtype=torch.float64))
    if support is constraints.unit_interval:
        return torch.rand(shape, dtype=torch.float64)
    if isinstance(support, QuantizedUnitInterval):
        levels = support.num_levels - 1
        return torch.randint(0, levels + 1, shape).double() / levels
    return torch.randn(shape, dtype=torch.float64)


def loss_and_grads(elbo, model, guide, params, x, seed=1):
    """The loss and the gradients of ``params`` of one ``differentiable_loss`` call, with
    Pyro's validation off (the fast path's condition) and the RNG at ``seed``."""
    pyro.set_rng_seed(seed)
    for p in params:
        p.grad = None
    with pyro.validation_enabled(False):
        loss = elbo.differentiable_loss(model, guide, x)
    loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def assert_same_loss_and_grads(actual, expected):
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12)
    assert [g is None for g in actual[1]] == [g is None for g in expected[1]]
    for a, e in zip(actual[1], expected[1], strict=True):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def forbid_pyro_machinery(monkeypatch):
    """Make Pyro's general trace machinery raise, to prove that the fast path is taken."""

    def fail(*args, **kwargs):
        raise AssertionError("FastTrace_ELBO took Trace_ELBO's general path")

    monkeypatch.setattr(pyro.infer.trace_elbo, "get_importance_trace", fail)


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("parts", PART_CASES, ids=lambda parts: "-".join(parts.values()))
def test_fast_trace_elbo_equals_pyro_trace_elbo_on_the_same_draws(
    parts, num_particles, monkeypatch
):
    """The training ELBO of every registered part: the fast path's loss and gradients are
    Trace_ELBO's on the same draws (float64, so only summation order can differ), with a
    KL weight below 1 so that site scales matter."""
    torch.manual_seed(0)
    vae = VAE(data_dim=12, latent_dim=2, hidden_dims=(8,), **parts).double()
    vae.kl_scale = 0.5
    x = data_in_support(vae.likelihood, (5, 12))
    params = list(vae.parameters())
    pyro_elbo = Trace_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )
    expected = loss_and_grads(pyro_elbo, vae.model, vae.guide, params, x)
    forbid_pyro_machinery(monkeypatch)
    actual = loss_and_grads(get_elbo("trace", num_particles), vae.model, vae.guide, params, x)
    assert_same_loss_and_grads(actual, expected)
    assert sum(g is not None for g in actual[1]) == len(params)


def subsampled_masked_pair(num_total=40, batch=6):
    """A model and guide with a subsampled data plate (scale 40 / 6), a masked observation and
    a site under a nested feature plate."""
    loc = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
    raw_scale = torch.nn.Parameter(torch.zeros(batch, 2, dtype=torch.float64))
    mask = torch.tensor([True, False, True, True, False, True])

    def model(x):
        with pyro.plate("data", num_total, subsample=torch.arange(batch)):
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            with poutine.mask(mask=mask):
                pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", num_total, subsample=torch.arange(batch)):
            pyro.sample(
                "z", dist.Normal(x.expand(x.shape[:-1] + (2,)), raw_scale.exp()).to_event(1)
            )

    return model, guide, [loc, raw_scale], torch.randn(batch, 1, dtype=torch.float64)


def test_fast_trace_elbo_applies_subsampling_scale_and_masks_as_pyro_does(monkeypatch):
    model, guide, params, x = subsampled_masked_pair()
    expected = loss_and_grads(Trace_ELBO(max_plate_nesting=1), model, guide, params, x)
    forbid_pyro_machinery(monkeypatch)
    actual = loss_and_grads(get_elbo("trace"), model, guide, params, x)
    assert_same_loss_and_grads(actual, expected)


def test_fast_trace_elbo_keeps_the_score_function_gradient_of_discrete_guide_sites():
    """A guide site without rsample: the fast path hands Pyro's surrogate the same traces,
    so the score-function gradient is Trace_ELBO's on the same draws."""
    logits = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8, dtype=torch.float64))

    def model(x):
        with pyro.plate("data", 8):
            z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.3, dtype=torch.float64)))
            pyro.sample("x", dist.Normal(2 * z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 8):
            pyro.sample("z", dist.Bernoulli(logits=logits))

    x = torch.randn(8, dtype=torch.float64)
    expected = loss_and_grads(Trace_ELBO(max_plate_nesting=1), model, guide, [logits], x)
    actual = loss_and_grads(get_elbo("trace"), model, guide, [logits], x)
    assert_same_loss_and_grads(actual, expected)
    assert actual[1][0].abs().sum() > 0


def test_fast_trace_elbo_runs_pyro_checks_when_validation_is_on(monkeypatch):
    """With validation on every call is Trace_ELBO's own, so Pyro's checks run: a guide
    sampling a site that the model lacks is refused."""
    vae = VAE(data_dim=12, latent_dim=2, hidden_dims=(8,))
    x = torch.bernoulli(torch.full((5, 12), 0.3))

    def guide_with_extra_site(x):
        vae.guide(x)
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    calls = []
    original = pyro.infer.trace_elbo.get_importance_trace

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pyro.infer.trace_elbo, "get_importance_trace", counting)
    with pyro.validation_enabled(True):
        get_elbo("trace").differentiable_loss(vae.model, vae.guide, x)
        assert calls == [1]
        with pytest.warns(UserWarning, match="extra"):
            get_elbo("trace").differentiable_loss(vae.model, guide_with_extra_site, x)
