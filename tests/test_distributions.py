"""The distributions, flow step and KL rule of :mod:`pyro_vae.distributions`, on their own."""

import math

import pyro.distributions as dist
import pytest
import torch
from pyro.nn import ConditionalAutoRegressiveNN
from torch.distributions import kl_divergence

from pyro_vae.distributions import (
    MIN_SCALE,
    DiagonalNormalMixture,
    DiscretizedLogisticDistribution,
    GatedAffineAutoregressive,
    IndependentBernoulli,
    QuantizedUnitInterval,
    conditioned_made,
    inverse_positive_scale,
    mixture,
    positive_scale,
)
from pyro_vae.guides import GUIDES

LATENT_DIM = 3

# ---------------------------------------------------------------------------------------------
# positive_scale


def test_positive_scale_round_trip():
    for scale in [1e-3, 0.5, 1.0, 20.0]:
        raw = torch.tensor(inverse_positive_scale(scale))
        assert positive_scale(raw).item() == pytest.approx(scale, rel=1e-5)


def test_positive_scale_floor_and_custom_floor():
    raw = torch.tensor([-1e4, 0.0, 30.0])
    assert (positive_scale(raw) >= MIN_SCALE).all()
    assert positive_scale(raw)[0].item() == pytest.approx(MIN_SCALE)
    torch.testing.assert_close(positive_scale(raw, 0.5), torch.nn.functional.softplus(raw) + 0.5)
    assert inverse_positive_scale(0.7, min_scale=0.5) == pytest.approx(math.log(math.expm1(0.2)))


@pytest.mark.parametrize("scale", [MIN_SCALE, 0.0, -1.0])
def test_inverse_positive_scale_at_or_below_the_floor_error(scale):
    with pytest.raises(ValueError, match=r"scale must be greater than min_scale=0.0001, got"):
        inverse_positive_scale(scale)


# ---------------------------------------------------------------------------------------------
# DiagonalNormalMixture and mixture()


def random_mixture_params(num_components=6, dim=4, dtype=torch.float64):
    logits = torch.randn(num_components, dtype=dtype)
    loc = 3 * torch.randn(num_components, dim, dtype=dtype)
    scale = torch.empty(num_components, dim, dtype=dtype).uniform_(0.01, 2.0)
    return logits, loc, scale


@pytest.mark.parametrize(
    "value_shape, batch_shape",
    [((4,), ()), ((7, 4), ()), ((3, 5, 4), (5,)), ((5, 4), (2, 5)), ((4,), (3,))],
)
def test_diagonal_normal_mixture_matches_mixture_same_family(value_shape, batch_shape):
    params = [p.requires_grad_() for p in random_mixture_params()]
    value = (3 * torch.randn(value_shape, dtype=torch.float64)).requires_grad_()
    logits, loc, scale = params
    slow = dist.MixtureSameFamily(
        dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)
    )
    fast = DiagonalNormalMixture(*params)
    if batch_shape:
        slow, fast = slow.expand(batch_shape), fast.expand(batch_shape)
    assert fast.batch_shape == slow.batch_shape and fast.event_shape == slow.event_shape
    expected, actual = slow.log_prob(value), fast.log_prob(value)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected)
    for g_fast, g_slow in zip(
        torch.autograd.grad(actual.sum(), params + [value]),
        torch.autograd.grad(expected.sum(), params + [value]),
    ):
        torch.testing.assert_close(g_fast, g_slow)


def test_diagonal_normal_mixture_float32_is_as_accurate_as_the_generic_mixture():
    # Small scales far from the origin are where expanding the square cancels the most digits.
    logits, loc, scale = random_mixture_params(num_components=50, dim=20)
    scale = scale.clamp(max=0.05)
    value = loc[torch.randint(50, (2000,))] + scale.max() * torch.randn(
        2000, 20, dtype=torch.float64
    )
    exact = DiagonalNormalMixture(logits, loc, scale).log_prob(value)
    params32 = [p.float() for p in (logits, loc, scale)]
    generic = dist.MixtureSameFamily(
        dist.Categorical(logits=params32[0]), dist.Normal(*params32[1:]).to_event(1)
    ).log_prob(value.float())
    fast = DiagonalNormalMixture(*params32).log_prob(value.float())
    assert fast.dtype == torch.float32
    fast_error = (fast.double() - exact).abs().max()
    generic_error = (generic.double() - exact).abs().max()
    assert fast_error <= max(2 * generic_error, 1e-4), (fast_error, generic_error)


def test_mixture_uses_the_fast_path_only_for_diagonal_normal_components():
    logits, loc, scale = random_mixture_params()
    assert type(mixture(logits, dist.Normal(loc, scale).to_event(1))) is DiagonalNormalMixture
    full = dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
    assert type(mixture(logits, full)) is dist.MixtureSameFamily
    # The priors' half of this check: test_priors.py, fast mixture for diagonal components.


def test_diagonal_normal_mixture_shape_error():
    logits, loc, scale = random_mixture_params()
    with pytest.raises(
        ValueError, match=r"loc and scale of shape \(K, D\), got \(6,\), \(6, 4\) and \(6,\)"
    ):
        DiagonalNormalMixture(logits, loc, scale[:, 0])


# ---------------------------------------------------------------------------------------------
# KL(MultivariateNormal || diagonal Normal)


def test_full_covariance_kl_to_diagonal_normal_is_closed_form():
    q = GUIDES["full_covariance"](LATENT_DIM)(torch.randn(4, 3 + 6))
    loc, scale = torch.randn(LATENT_DIM), torch.rand(LATENT_DIM) + 0.5
    p = dist.Normal(loc, scale).to_event(1)
    same_p = dist.MultivariateNormal(loc, scale_tril=torch.diag(scale))
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(q, same_p))


# ---------------------------------------------------------------------------------------------
# QuantizedUnitInterval and DiscretizedLogisticDistribution


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


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value of ``counts`` against ``probs`` over the same cells,
    cells expecting fewer than 5 draws pooled into one."""
    expected = counts.sum() * probs
    rare = expected < 5
    observed = torch.cat([counts[~rare], counts[rare].sum().view(1)])
    expected = torch.cat([expected[~rare], expected[rare].sum().view(1)])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(observed.numel() - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()


def test_discretized_logistic_samples_follow_its_pmf():
    # Locations on, between and near the edge levels; scales from 1 bin, where the sampler's
    # rounding decides which level a draw lands on (a floor shifts every draw by half a bin:
    # noncentrality about N / (12 scale^2) in bins, over 1,000 here), to 25 bins.
    loc = torch.tensor([0.2, 0.97, 0.3, 0.5 + 0.37 / 255, 0.01], dtype=torch.float64)
    scale = torch.tensor([0.05, 0.1, 1 / 255, 2 / 255, 3 / 255], dtype=torch.float64)
    p = DiscretizedLogisticDistribution(loc, scale)
    x = p.sample((20000,))
    assert QuantizedUnitInterval(256).check(x).all()
    pmf = p.log_prob(ALL_LEVELS.unsqueeze(-1)).exp()  # (level, pixel)
    variance = (pmf * (ALL_LEVELS.unsqueeze(-1) - p.mean) ** 2).sum(0)
    # 5 standard errors of the 20,000-draw mean: 3.2e-3 for the first pixel (sd 0.09).
    assert ((x.mean(0) - p.mean).abs() < 5 * (variance / x.shape[0]).sqrt()).all()
    counts = torch.zeros_like(pmf).scatter_add_(0, (x * 255).round().long(), torch.ones_like(x))
    for pixel in range(loc.numel()):
        # 5 pixels at a threshold of 1e-6: a false alarm about once in 200,000 seeds.
        assert chi_square_p_value(counts[:, pixel], pmf[:, pixel]) > 1e-6, pixel


@pytest.mark.parametrize("num_levels", [1, 0, 2.0, True, None])
def test_quantized_unit_interval_num_levels_error(num_levels):
    with pytest.raises(ValueError, match=r"num_levels must be an integer >= 2, got "):
        QuantizedUnitInterval(num_levels)
    with pytest.raises(ValueError, match=r"num_levels must be an integer >= 2, got "):
        DiscretizedLogisticDistribution(torch.tensor(0.5), torch.tensor(0.1), num_levels)


def test_quantized_unit_interval_holds_exactly_the_levels():
    support = QuantizedUnitInterval(17)
    levels = torch.arange(17) / 16
    assert support.check(levels).all()
    assert not support.check(torch.tensor([0.5 / 16, -1 / 16, 17 / 16])).any()
    assert repr(support) == "QuantizedUnitInterval(num_levels=17)"


def test_discretized_logistic_expand_keeps_levels_and_support():
    p = DiscretizedLogisticDistribution(torch.tensor([0.2, 0.7]), torch.tensor(0.1), num_levels=5)
    wide = p.expand((3, 2))
    assert wide.batch_shape == (3, 2) and wide.num_levels == 5
    assert wide.support.num_levels == 5
    torch.testing.assert_close(
        wide.log_prob(torch.tensor(0.25)), p.log_prob(torch.tensor(0.25)).expand(3, 2)
    )


# ---------------------------------------------------------------------------------------------
# GatedAffineAutoregressive and conditioned_made


def gated_flow(dtype=torch.float32, context_dim=4, num_contexts=5):
    made = ConditionalAutoRegressiveNN(LATENT_DIM, context_dim, [3 * LATENT_DIM + 1]).to(dtype)
    context = torch.randn(num_contexts, context_dim, dtype=dtype)
    base = dist.Normal(torch.zeros(num_contexts, LATENT_DIM, dtype=dtype), 1.0).to_event(1)
    step = GatedAffineAutoregressive(conditioned_made(made, context))
    return dist.TransformedDistribution(base, [step]), made, context


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_step_inverse_keeps_the_dtype_and_inverts(dtype):
    q, _, _ = gated_flow(dtype)
    z = q.sample()
    (step,) = q.transforms
    x = step.inv(z.clone())
    assert x.dtype == dtype
    torch.testing.assert_close(step(x), z)
    torch.testing.assert_close(q.log_prob(z.clone()), q.log_prob(z))


def test_conditioned_made_broadcasts_points_against_the_contexts():
    _, made, context = gated_flow()
    z = torch.randn(2, 1, LATENT_DIM)
    mean, logit_scale = conditioned_made(made, context)(z)
    assert mean.shape == logit_scale.shape == (2, 5, LATENT_DIM)
    expected, _ = made(z.expand(2, 5, LATENT_DIM), context.expand(2, 5, 4))
    torch.testing.assert_close(mean, expected)
    assert conditioned_made(made, context).permutation is made.permutation


# ---------------------------------------------------------------------------------------------
# IndependentBernoulli


@pytest.mark.parametrize(
    "logits_shape, value_shape, grad",
    [
        ((4, 7), (4, 7), True),  # a training batch
        ((3, 4, 7), (4, 7), False),  # draws of an estimator: the matrix-vector path
        ((3, 4, 7), (4, 7), True),
        ((4, 7), (3, 4, 7), False),  # values with more dims than the logits
    ],
)
def test_independent_bernoulli_is_bernoulli_to_event(logits_shape, value_shape, grad):
    torch.manual_seed(0)
    logits = 4 * torch.randn(logits_shape, dtype=torch.float64)
    logits[..., 0], logits[..., 1] = 60.0, -60.0  # saturated pixels stay exact
    logits.requires_grad_(grad)
    value = torch.bernoulli(torch.full(value_shape, 0.4, dtype=torch.float64))
    fast, reference = IndependentBernoulli(logits), dist.Bernoulli(logits=logits).to_event(1)
    assert (fast.batch_shape, fast.event_shape) == (reference.batch_shape, reference.event_shape)
    torch.testing.assert_close(fast.log_prob(value), reference.log_prob(value), rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.mean, reference.mean)
    if grad:
        (g_fast,) = torch.autograd.grad(fast.log_prob(value).sum(), logits)
        (g_ref,) = torch.autograd.grad(reference.log_prob(value).sum(), logits)
        torch.testing.assert_close(g_fast, g_ref)
    if len(value_shape) > len(logits_shape):
        return
    expanded = fast.expand((2,) + fast.batch_shape)
    assert type(expanded) is IndependentBernoulli and expanded.batch_shape[0] == 2
    expected = reference.expand(expanded.batch_shape).log_prob(value)
    torch.testing.assert_close(expanded.log_prob(value), expected)


def test_independent_bernoulli_float32_matches_float64_to_rounding():
    """5000 draws of 784 pixels with logits up to +-30, in float32: each of the 784 terms is
    rounded to about 2e-6 relative, so the sum is within ~1e-3 nats of the float64 value, as
    Bernoulli's own float32 log_prob is."""
    torch.manual_seed(0)
    logits = 10 * torch.randn(5000, 1, 784)
    x = torch.bernoulli(torch.sigmoid(logits[0]))
    reference = dist.Bernoulli(logits=logits.double()).to_event(1).log_prob(x.double())
    fast_error = (IndependentBernoulli(logits).log_prob(x).double() - reference).abs().max()
    pyro_error = dist.Bernoulli(logits=logits).to_event(1).log_prob(x).double() - reference
    assert fast_error < max(2 * pyro_error.abs().max(), 1e-3)


def test_independent_bernoulli_validates_its_support():
    with pytest.raises(ValueError, match="support"):
        IndependentBernoulli(torch.zeros(2, 3), validate_args=True).log_prob(
            torch.full((2, 3), 0.5)
        )
