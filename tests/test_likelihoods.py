import math
import re

import pyro.distributions as dist
import pytest
import torch
from common import check_parameters_learn
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from torch.distributions import Independent, constraints

from pyro_vae import VAE, estimate_log_likelihood
from pyro_vae.distributions import QuantizedUnitInterval
from pyro_vae.likelihoods import LIKELIHOODS, get_likelihood

DATA_DIM = 64
#: Candidate data outside every bounded support: below 0, between two 8-bit levels, above 1.
OFF_SUPPORT_VALUES = (-0.5, 0.5 + 0.5 / 255, 1.5)


def support_bounds(support: constraints.Constraint) -> tuple[float, float]:
    """The interval holding ``support``, for checking means."""
    if isinstance(support, (type(constraints.boolean), QuantizedUnitInterval)):
        return 0.0, 1.0
    if isinstance(support, constraints.interval):
        return float(support.lower_bound), float(support.upper_bound)
    return -math.inf, math.inf


def decoder_output(likelihood, n: int = 5, *batch) -> torch.Tensor:
    return torch.randn(*batch, n, likelihood.output_dim)


def valid_data(likelihood, n: int = 5) -> torch.Tensor:
    """Data in the likelihood's support, drawn from the likelihood itself."""
    with torch.no_grad():
        return likelihood(decoder_output(likelihood, n)).sample()


def edge_data(likelihood) -> list[torch.Tensor]:
    """All-zero and all-one images, where the support holds them."""
    images = [torch.zeros(5, DATA_DIM), torch.ones(5, DATA_DIM)]
    return [x for x in images if likelihood.support.check(x).all()]


#: How many numbers each likelihood needs per pixel, counted from its definition (not read from
#: ``output_dim``): a location and a log-scale for the discretized logistic, one otherwise.
DECODER_OUTPUTS_PER_PIXEL = {
    "bernoulli": 1,
    "continuous_bernoulli": 1,
    "discretized_logistic": 2,
    "laplace": 1,
    "learned_normal": 1,
    "normal": 1,
}


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_decoder_produces_the_number_of_outputs_the_likelihood_needs(name):
    assert name in DECODER_OUTPUTS_PER_PIXEL, f"add likelihood {name!r} to the tests' table"
    vae = VAE(DATA_DIM, 2, (16,), likelihood=name)
    out = vae.decoder(torch.randn(3, 2))
    assert out.shape == (3, DECODER_OUTPUTS_PER_PIXEL[name] * DATA_DIM)
    assert vae.likelihood(out).event_shape == (DATA_DIM,)
    assert vae.decode(torch.randn(3, 2)).event_shape == (DATA_DIM,)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_shapes_and_finite_log_prob_on_valid_data(name):
    likelihood = get_likelihood(name, DATA_DIM)
    p = likelihood(decoder_output(likelihood, 5, 2))
    assert p.event_shape == (DATA_DIM,) and p.batch_shape == (2, 5)
    for x in [valid_data(likelihood), *edge_data(likelihood)]:
        log_p = p.log_prob(x)
        assert log_p.shape == (2, 5)
        assert torch.isfinite(log_p).all()


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_log_prob_gradients_are_finite(name):
    likelihood = get_likelihood(name, DATA_DIM)
    out = (decoder_output(likelihood) * 5).requires_grad_()
    likelihood(out).log_prob(valid_data(likelihood)).sum().backward()
    assert torch.isfinite(out.grad).all()
    for param in likelihood.parameters():
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_mean_lies_in_data_range(name):
    likelihood = get_likelihood(name, DATA_DIM)
    low, high = support_bounds(likelihood.support)
    mean = likelihood.mean(decoder_output(likelihood) * 5)
    assert mean.shape == (5, DATA_DIM)
    assert torch.isfinite(mean).all()
    assert (mean >= low).all() and (mean <= high).all()


#: Points of the grid on which a continuous likelihood is integrated, per pixel.
GRID_POINTS = 8001


def support_points(support: constraints.Constraint) -> torch.Tensor | None:
    """Every value of a discrete support, in float64; ``None`` for a continuous one."""
    if support is constraints.boolean:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    if isinstance(support, QuantizedUnitInterval):
        return torch.arange(support.num_levels, dtype=torch.float64) / (support.num_levels - 1)
    assert not support.is_discrete, f"enumerate the support {support!r} in the tests"
    return None


def support_width(support: constraints.Constraint) -> float:
    """The width of a bounded support, 0 for the real line (see the mean test)."""
    points = support_points(support)
    if points is not None:
        return (points.max() - points.min()).item()
    if isinstance(support, constraints.interval):
        return float(support.upper_bound) - float(support.lower_bound)
    return 0.0


def pixel_grid(pixel, support) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``(G, *pixel.batch_shape)`` at which to evaluate one pixel's law, with their
    weights: the whole discrete support with weight 1, else a trapezoid grid over the support's
    interval or, on the real line, over the range of 2,000 draws widened by that range on each
    side (at least +-9 sd of a Normal, +-15 scales of a Laplace: the mass outside is below
    1e-6, typically 1e-9)."""
    points = support_points(support)
    shape = pixel.batch_shape
    if points is not None:
        x = points.view(-1, *[1] * len(shape)).expand(-1, *shape)
        return x, torch.ones_like(x)
    if isinstance(support, constraints.interval):
        low = torch.full(shape, float(support.lower_bound), dtype=torch.float64)
        high = torch.full(shape, float(support.upper_bound), dtype=torch.float64)
    else:
        draws = pixel.sample((2000,))
        low, high = draws.amin(0), draws.amax(0)
        low, high = low - (high - low), high + (high - low)
    t = torch.linspace(0, 1, GRID_POINTS, dtype=torch.float64).view(-1, *[1] * len(shape))
    weights = torch.full_like(t, 1 / (GRID_POINTS - 1))
    weights[[0, -1]] /= 2
    return low + (high - low) * t, weights * (high - low)


def pixel_moments(likelihood, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The total mass, mean and variance of each pixel of p(x|z), from ``log_prob`` alone."""
    p = likelihood(out)
    assert isinstance(p, Independent) and p.reinterpreted_batch_ndims == 1
    x, weights = pixel_grid(p.base_dist, likelihood.support)
    mass_at = weights * p.base_dist.log_prob(x).exp()
    mass = mass_at.sum(0)
    mean = (mass_at * x).sum(0) / mass
    return mass, mean, (mass_at * (x - mean) ** 2).sum(0) / mass


def spread_likelihood(name: str) -> tuple:
    """A float64 likelihood of 16 pixels with its parameters moved from their initial values,
    and 5 decoder outputs of several units (saturated pixels; for the discretized logistic,
    locations inside and outside [0, 1] and scales from a quarter of a bin, the floor, to
    several times [0, 1])."""
    likelihood = get_likelihood(name, 16).double()
    with torch.no_grad():
        for param in likelihood.parameters():
            param.add_(0.5 * torch.randn_like(param))
    return likelihood, 3 * torch.randn(5, likelihood.output_dim, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_log_prob_sums_to_one_over_the_support_of_each_pixel(name):
    likelihood, out = spread_likelihood(name)
    mass, _, _ = pixel_moments(likelihood, out)
    # Sums over a discrete support are exact to rounding. On a grid of step h the trapezoid rule
    # errs by O(h^2 / scale^2) at a Laplace's kink, the worst case: 6e-5 at h = 0.02 scales,
    # and here h is about 0.005 scales (4e-6).
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_mean_is_the_mean_of_its_distribution_and_of_its_samples(name):
    likelihood, out = spread_likelihood(name)
    _, mean, variance = pixel_moments(likelihood, out)
    with torch.no_grad():
        reported = likelihood.mean(out)
        torch.testing.assert_close(reported, mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(reported, likelihood(out).mean, atol=1e-6, rtol=1e-6)
        draws = likelihood(out).sample((4000,))
    # Bernstein's inequality: for draws in an interval of width B, a mean of n draws misses by
    # more than sqrt(2 var t / n) + 2 B t / (3 n) with probability below 2 exp(-t). The B term
    # covers the skewed means of nearly saturated pixels (a few ones among 4000 Bernoulli
    # draws); real-line likelihoods here are symmetric, where the normal approximation holds:
    # B = 0. t = 16 (5.7 standard errors): some of the 80 pixels fail less than once in 50,000
    # seeds. 1e-9 is float rounding, for pixels whose variance is 0 to double precision.
    n, t = draws.shape[0], 16.0
    width = support_width(likelihood.support)
    tolerance = (2 * variance * t / n).sqrt() + 2 * width * t / (3 * n) + 1e-9
    assert ((draws.mean(0) - reported).abs() <= tolerance).all()


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_check_data_accepts_valid_data(name):
    likelihood = get_likelihood(name, DATA_DIM)
    for x in [valid_data(likelihood), *edge_data(likelihood)]:
        likelihood.check_data(x)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_check_data_rejects_invalid_data_naming_likelihood_and_range(name):
    likelihood = get_likelihood(name, DATA_DIM)
    x = valid_data(likelihood)
    for value in OFF_SUPPORT_VALUES:
        if not likelihood.support.check(torch.tensor(value)):
            x[0, 0] = value
            low, high = x.min().item(), x.max().item()
            found = re.escape(f"data lie in [{low:.4g}, {high:.4g}]")
            with pytest.raises(ValueError, match=rf"likelihood '{name}' needs data in .*{found}"):
                likelihood.check_data(x)
    x[1, 1] = math.nan
    with pytest.raises(ValueError, match=rf"likelihood '{name}' got data with 1 NaN"):
        likelihood.check_data(x)


@pytest.mark.parametrize(
    "name, x, message",
    [
        ("bernoulli", [0.0, 0.5], r"needs data in \{0, 1\}.*\(e\.g\. 0\.5\); binarize"),
        ("continuous_bernoulli", [-0.1, 1.0], r"needs data in \[0, 1\].*rescale the data"),
        ("discretized_logistic", [0.0, 0.3], r"multiples of 1/255 in \[0, 1\].*e\.g\. 0\.3\)"),
    ],
)
def test_check_data_message_names_offending_value_and_hint(name, x, message):
    likelihood = get_likelihood(name, 2)
    with pytest.raises(ValueError, match=message):
        likelihood.check_data(torch.tensor([x]))


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_svi_step_every_likelihood(name, elbo):
    vae = VAE(DATA_DIM, 2, (16,), likelihood=name)
    x = valid_data(vae.likelihood, 6)
    vae.likelihood.check_data(x)
    loss_fn = elbo(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), loss_fn)
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    loss = svi.step(x)
    assert math.isfinite(loss)
    for n, p in vae.named_parameters():
        assert not torch.equal(p.detach(), before[n]), n


#: The learnable parameters of every registered likelihood, written out from its definition.
EXPECTED_PARAMETERS = {
    "bernoulli": set(),
    "continuous_bernoulli": set(),
    "discretized_logistic": set(),
    "laplace": set(),
    "learned_normal": {"raw_scale"},
    "normal": set(),
}


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_parameters_get_elbo_gradients_and_change_in_training(name):
    assert name in EXPECTED_PARAMETERS, f"list the parameters of likelihood {name!r} in the tests"
    vae = VAE(DATA_DIM, 2, (16,), likelihood=name)
    params = dict(vae.likelihood.named_parameters())
    assert set(params) == EXPECTED_PARAMETERS[name]
    x = valid_data(vae.likelihood, 6)
    check_parameters_learn(vae, params, x)


def test_discretized_logistic_likelihood_splits_loc_and_log_scale():
    likelihood = get_likelihood("discretized_logistic", 3)
    assert likelihood.output_dim == 6
    out = torch.tensor([[0.1, 0.2, 0.3, 0.0, -2.0, -50.0]])
    base = likelihood(out).base_dist
    torch.testing.assert_close(base.loc, out[:, :3])
    # log-scale = -7 + softplus(raw + 7): the raw value well above -7, a floor of -7 below.
    assert base.scale[0, 0].item() == pytest.approx(1.0, rel=1e-3)
    assert base.scale[0, 1].item() == pytest.approx(math.exp(-2.0), rel=1e-2)
    assert base.scale[0, 2].item() == pytest.approx(math.exp(-7.0), rel=1e-3)


@pytest.mark.parametrize("logit", [-8.0, -1.0, -0.003, 0.0, 0.002, 1.0, 8.0])
def test_continuous_bernoulli_density_integrates_to_one(logit):
    p = get_likelihood("continuous_bernoulli", 1)(torch.tensor([[logit]]))
    grid = torch.linspace(0, 1, 20001).unsqueeze(-1)
    density = p.log_prob(grid).exp()
    torch.testing.assert_close(
        torch.trapezoid(density, grid[:, 0]), torch.tensor(1.0), atol=1e-4, rtol=0
    )
    mean = torch.trapezoid(grid[:, 0] * density, grid[:, 0])
    torch.testing.assert_close(p.mean[0, 0], mean, atol=1e-4, rtol=0)


@pytest.mark.parametrize("logit", [-8.0, -1.0, 0.5, 2.0, 5.0])
def test_continuous_bernoulli_mean_has_its_closed_form(logit):
    # E[x] = lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2 lambda)), lambda = sigmoid(logit)
    # (Loaiza-Ganem and Cunningham 2019); 0.6565 at logit 2, where lambda = 0.8808.
    lam = 1 / (1 + math.exp(-logit))
    expected = lam / (2 * lam - 1) + 1 / (2 * math.atanh(1 - 2 * lam))
    likelihood = get_likelihood("continuous_bernoulli", 1)
    mean = likelihood.mean(torch.tensor([[logit]], dtype=torch.float64))
    assert mean.item() == pytest.approx(expected, rel=1e-9)


def test_continuous_bernoulli_mean_is_not_sigmoid_of_logits():
    likelihood = get_likelihood("continuous_bernoulli", 1)
    mean = likelihood.mean(torch.tensor([[2.0]]))
    assert 0.5 < mean.item() < torch.sigmoid(torch.tensor(2.0)).item() - 0.05


@pytest.mark.parametrize("per_pixel, shape", [(True, (DATA_DIM,)), (False, (1,))])
def test_learned_normal_scale_shape_and_init(per_pixel, shape):
    likelihood = get_likelihood("learned_normal", DATA_DIM, per_pixel=per_pixel, init_scale=0.2)
    assert likelihood.raw_scale.shape == shape
    torch.testing.assert_close(likelihood.scale, torch.full(shape, 0.2))
    base = likelihood(torch.zeros(4, DATA_DIM)).base_dist
    assert base.scale.shape == (4, DATA_DIM)


def test_get_likelihood_unknown_name_error():
    with pytest.raises(
        ValueError, match=r"unknown likelihood 'nope'; choose one of \[.*'bernoulli'"
    ):
        get_likelihood("nope", 4)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("normal", {"scale": 0}, "normal likelihood scale must be a positive finite number"),
        ("laplace", {"scale": -1.0}, "laplace likelihood scale must be a positive finite number"),
        ("normal", {"scale": math.inf}, "normal likelihood scale must be a positive finite number"),
        ("learned_normal", {"min_scale": 0}, "learned_normal likelihood min_scale must be"),
        ("learned_normal", {"init_scale": 1e-4}, "init_scale must exceed min_scale"),
        ("discretized_logistic", {"num_levels": 1}, "num_levels must be an integer >= 2, got 1"),
        ("discretized_logistic", {"num_levels": 2.0}, "num_levels must be an integer >= 2"),
    ],
)
def test_likelihood_bad_option_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_likelihood(name, 4, **kwargs)


def test_get_likelihood_unknown_option_names_the_accepted_ones():
    with pytest.raises(
        ValueError, match=r"likelihood Normal takes no option 'colour'; it takes \['scale'\]"
    ):
        get_likelihood("normal", 4, colour=1)
    with pytest.raises(
        ValueError, match=r"likelihood Bernoulli takes no option 'scale'; it takes none"
    ):
        VAE(DATA_DIM, 2, (16,), likelihood="bernoulli", likelihood_kwargs={"scale": 0.1})


def test_support_hints_name_config_fields_not_command_line_flags():
    for name in sorted(LIKELIHOODS):
        hint = get_likelihood(name, 4).support_hint
        assert "--" not in hint, name
    assert "config.binarize" in get_likelihood("bernoulli", 4).support_hint
    hint = get_likelihood("discretized_logistic", 4).support_hint
    assert "config.likelihood_kwargs={'num_levels': 17}" in hint


def test_fixed_scale_likelihoods_differ_only_by_their_distribution():
    out = torch.randn(3, 4)
    for name, family in [
        ("normal", torch.distributions.Normal),
        ("laplace", torch.distributions.Laplace),
    ]:
        likelihood = get_likelihood(name, 4, scale=0.3)
        p = likelihood(out)
        assert isinstance(p.base_dist, family)
        torch.testing.assert_close(p.base_dist.loc, out)
        assert likelihood.scale == 0.3 and torch.equal(likelihood.mean(out), out)


@pytest.mark.parametrize("num_levels", [2, 17])
def test_discretized_logistic_likelihood_spreads_its_mass_over_its_own_levels(num_levels):
    # The likelihood passes its num_levels on to the distribution: the pmf over those levels
    # sums to 1 (with the default 256 bins it would not); 2 levels is the smallest allowed.
    likelihood = get_likelihood("discretized_logistic", 3, num_levels=num_levels).double()
    out = torch.randn(4, likelihood.output_dim, dtype=torch.float64)
    levels = torch.arange(num_levels, dtype=torch.float64) / (num_levels - 1)
    per_pixel = likelihood(out).base_dist.log_prob(levels.view(-1, 1, 1).expand(-1, 4, 3))
    torch.testing.assert_close(per_pixel.logsumexp(0), torch.zeros(4, 3, dtype=torch.float64))


def test_bernoulli_likelihood_gives_pyros_bernoulli_numbers_on_the_same_draws(monkeypatch):
    """The ``bernoulli`` likelihood's faster log-density (IndependentBernoulli) inside the
    estimators, over 300 vectorized draws, against ``Bernoulli(logits).to_event(1)``."""
    torch.manual_seed(0)
    vae = VAE(DATA_DIM, latent_dim=2, hidden_dims=(8,)).eval()
    x = torch.bernoulli(torch.full((6, DATA_DIM), 0.3))
    torch.manual_seed(1)
    fast = estimate_log_likelihood(vae.model, vae.guide, x, 300)
    monkeypatch.setattr(
        type(vae.likelihood), "forward", lambda self, out: dist.Bernoulli(logits=out).to_event(1)
    )
    torch.manual_seed(1)
    torch.testing.assert_close(fast, estimate_log_likelihood(vae.model, vae.guide, x, 300))
