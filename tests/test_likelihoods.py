import math
import re

import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from torch.distributions import constraints

from pyro_vae import VAE
from pyro_vae.likelihoods import (
    LIKELIHOODS,
    DiscretizedLogisticDistribution,
    QuantizedUnitInterval,
    get_likelihood,
)

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


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_output_dim_matches_decoder(name):
    vae = VAE(DATA_DIM, 2, (16,), likelihood=name)
    assert vae.decoder.output_dim == vae.likelihood.output_dim
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


ALL_LEVELS = torch.arange(256, dtype=torch.float64) / 255


@pytest.mark.parametrize("scale", [1e-4, 1e-3, 0.01, 0.3, 10.0, 1e4])
@pytest.mark.parametrize("loc", [-2.0, 0.0, 0.3, 0.5 + 0.5 / 255, 1.0, 3.0])
def test_discretized_logistic_masses_sum_to_one(loc, scale):
    p = DiscretizedLogisticDistribution(torch.tensor(loc), torch.tensor(scale))
    log_p = p.log_prob(ALL_LEVELS.float())
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.logsumexp(0), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.mean, (ALL_LEVELS.float() * log_p.exp()).sum(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.3, 2.0])
@pytest.mark.parametrize("loc", [0.0, 0.3, 0.9])
def test_discretized_logistic_matches_float64_cdf_differences(loc, scale):
    half = 0.5 / 255
    upper = torch.where(ALL_LEVELS < 1, (ALL_LEVELS + half - loc) / scale, math.inf)
    lower = torch.where(ALL_LEVELS > 0, (ALL_LEVELS - half - loc) / scale, -math.inf)
    # Plain differences of float64 sigmoids, taken in the tail where they do not cancel.
    right = ALL_LEVELS > loc
    mass = torch.where(
        right,
        torch.sigmoid(-lower) - torch.sigmoid(-upper),
        torch.sigmoid(upper) - torch.sigmoid(lower),
    )
    p = DiscretizedLogisticDistribution(torch.tensor(loc), torch.tensor(scale))
    log_p = p.log_prob(ALL_LEVELS.float()).double()
    kept = mass > 1e-250  # where float64 itself still resolves the mass
    assert kept.sum() > 1
    torch.testing.assert_close(log_p[kept], mass[kept].log(), atol=1e-4, rtol=1e-5)


def test_discretized_logistic_tiny_masses_have_accurate_logs_and_gradients():
    # Bin 0.5 under a logistic at 0 with scale 1e-3: mass about exp(-498), far below float32.
    loc = torch.tensor(0.0, requires_grad=True)
    scale = torch.tensor(1e-3, requires_grad=True)
    value = torch.tensor(127.0 / 255)
    log_p = DiscretizedLogisticDistribution(loc, scale).log_prob(value)
    upper, lower = (127.5 / 255) / 1e-3, (126.5 / 255) / 1e-3
    expected = -lower + math.log1p(-math.exp(lower - upper))
    assert log_p.item() == pytest.approx(expected, rel=1e-5)
    log_p.backward()
    assert torch.isfinite(loc.grad) and torch.isfinite(scale.grad)
    assert loc.grad > 0  # moving the logistic towards the bin raises its mass


def test_discretized_logistic_samples_lie_on_the_levels_with_the_right_mean():
    p = DiscretizedLogisticDistribution(torch.tensor([0.2, 0.97]), torch.tensor([0.05, 0.1]))
    x = p.sample((20000,))
    assert QuantizedUnitInterval(256).check(x).all()
    torch.testing.assert_close(x.mean(0), p.mean, atol=5e-3, rtol=0)


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
        ("normal", {"scale": 0}, "normal likelihood scale must be a positive number"),
        ("laplace", {"scale": -1.0}, "laplace likelihood scale must be a positive number"),
        ("learned_normal", {"min_scale": 0}, "learned_normal likelihood min_scale must be"),
        ("learned_normal", {"init_scale": 1e-4}, "init_scale must exceed min_scale"),
        ("discretized_logistic", {"num_levels": 1}, "num_levels must be an int >= 2, got 1"),
    ],
)
def test_likelihood_bad_option_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_likelihood(name, 4, **kwargs)
