"""AIS and BDMC against exact answers: the exact posterior as initial distribution, a
linear-Gaussian model in closed form, a 1-D nonlinear model on a grid, a Gamma-Poisson model (a
constrained latent), and the HMC kernel on a tempered Gaussian."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from common import DTYPES, BernoulliTanh, LinearGaussian, tolerance
from pyro import poutine

from pyro_vae import VAE
from pyro_vae.ais import (
    SCHEDULES,
    _Chains,
    _start,
    annealed_importance_sampling,
    bidirectional_monte_carlo,
    estimate_log_likelihood_ais,
    linear_schedule,
    sigmoid_schedule,
    simulate_data,
)
from pyro_vae.estimators import estimate_log_likelihood, plan_passes
from pyro_vae.guides import GUIDES
from pyro_vae.priors import PRIORS

#: HMC settings of the convergence tests: a short trajectory, a step size near the adapted one.
KERNEL = {"num_leapfrog_steps": 5, "step_size": 0.1}


def errors(result, exact):
    return result.log_likelihood - exact


# ---------------------------------------------------------------------------------------------
# Exact answers whatever the kernel does.


@pytest.mark.parametrize("dtype", DTYPES)
def test_ais_exact_posterior_initial_is_exact(dtype):
    """With q(z|x) = p(z|x), l(z) = log p(x) at every z: every weight of every chain is exact,
    forward and reverse."""
    lg = LinearGaussian(dtype=dtype)
    x = lg.sample(20)
    exact = lg.log_likelihood(x)
    result = annealed_importance_sampling(lg.model, lg.exact_guide, x, 5, 4, step_size=0.3)
    assert result.log_likelihood.dtype == dtype and result.log_weights.shape == (4, 20)
    torch.testing.assert_close(result.log_likelihood, exact, **tolerance(dtype))
    torch.testing.assert_close(result.log_weights, exact.double().expand(4, -1), **tolerance(dtype))
    assert (result.stderr < 1e-3).all()
    assert 0 < result.acceptance_rate.min() < 1  # the chains moved, and not always
    _, latents = simulate_data(lg.model, x)
    bdmc = bidirectional_monte_carlo(lg.model, lg.exact_guide, x, latents, 5, 4)
    torch.testing.assert_close(bdmc.upper.log_likelihood, exact, **tolerance(dtype))
    torch.testing.assert_close(bdmc.gap, torch.zeros_like(exact), **tolerance(dtype))


def test_one_step_from_the_guide_is_importance_sampling():
    """T = 1 from the guide makes no move: it is the IWAE estimate with K = C, on the same
    draws."""
    lg = LinearGaussian()
    x = lg.sample(30)
    pyro.set_rng_seed(3)
    ais, ais_stderr = estimate_log_likelihood_ais(
        lg.model, lg.poor_guide, x, num_steps=1, num_chains=100, return_stderr=True
    )
    pyro.set_rng_seed(3)
    iwae, iwae_stderr = estimate_log_likelihood(
        lg.model, lg.poor_guide, x, 100, return_stderr=True, chunk_size=100
    )
    torch.testing.assert_close(ais, iwae)
    torch.testing.assert_close(ais_stderr, iwae_stderr)


def test_schedules_rise_from_zero_to_one():
    for name, schedule in SCHEDULES.items():
        for num_steps in (1, 2, 7, 100):
            betas = schedule(num_steps)
            assert betas.shape == (num_steps + 1,) and betas.dtype == torch.float64, name
            assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all(), name
    torch.testing.assert_close(linear_schedule(4), torch.tensor([0, 0.25, 0.5, 0.75, 1.0]).double())
    # The sigmoid schedule is symmetric and denser near both ends than in the middle.
    betas = sigmoid_schedule(10)
    torch.testing.assert_close(betas + betas.flip(0), torch.ones(11).double())
    assert betas.diff()[0] < betas.diff()[5] > betas.diff()[-1]


# ---------------------------------------------------------------------------------------------
# Convergence to exact log p(x) as T grows.


@pytest.mark.parametrize("initial, steps", [("prior", (3, 60)), ("guide", (3, 20))])
def test_ais_converges_to_the_linear_gaussian_log_likelihood(initial, steps):
    lg = LinearGaussian()
    x = lg.sample(40)
    exact = lg.log_likelihood(x)
    guide = lg.poor_guide if initial == "guide" else None
    few, many = (
        annealed_importance_sampling(lg.model, guide, x, t, 16, initial=initial, **KERNEL)
        for t in steps
    )
    check_convergence(errors(few, exact), errors(many, exact), many.stderr, initial)


def check_convergence(few, many, stderr, initial, mean_tolerance=0.08):
    """The error at many steps is within its standard errors (plus a margin for the bias,
    which they do not measure) and small on average, and a few steps err more; from the prior
    they err downward (a stochastic lower bound)."""
    assert (many.abs() <= 5 * stderr + 0.1).all(), many / stderr
    assert many.mean().abs() < mean_tolerance, many.mean()
    assert few.abs().mean() > 1.5 * many.abs().mean(), (few.abs().mean(), many.abs().mean())
    assert initial == "guide" or few.mean() < 0


@pytest.mark.parametrize(
    "initial, mixture_prior", [("prior", False), ("guide", False), ("prior", True)]
)
def test_ais_matches_the_grid_integral_of_a_nonlinear_model(initial, mixture_prior):
    bt = BernoulliTanh(mixture_prior=mixture_prior)
    x = bt.sample(30)
    exact = bt.log_likelihood(x)
    bt.fit_guide(x)
    guide = bt.guide if initial == "guide" else None
    few, many = (
        annealed_importance_sampling(bt.model, guide, x, t, 16, initial=initial, **KERNEL)
        for t in (2, 50)
    )
    check_convergence(errors(few, exact), errors(many, exact), many.stderr, initial, 0.12)


class GammaPoisson:
    """z ~ Gamma(a, b), x_d | z ~ Poisson(z) for 5 counts per datapoint: log p(x) in closed
    form, and a latent on (0, inf) that AIS moves as log z."""

    a, b, num_counts = 3.0, 0.5, 5

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(x.new_tensor(self.a), self.b))
            counts = z.unsqueeze(-1).expand(*z.shape, self.num_counts)
            pyro.sample("x", dist.Poisson(counts).to_event(1), obs=x)

    def sample(self, num_data):
        z = dist.Gamma(torch.tensor(self.a).double(), self.b).sample((num_data, 1))
        return dist.Poisson(z.expand(-1, self.num_counts)).sample()

    def log_likelihood(self, x):
        a, b, total = self.a, self.b, x.sum(-1)
        return (
            a * math.log(b)
            - math.lgamma(a)
            + torch.lgamma(a + total)
            - (a + total) * math.log(b + self.num_counts)
            - torch.lgamma(x + 1).sum(-1)
        )


def test_ais_moves_a_constrained_latent_through_its_bijection():
    gp = GammaPoisson()
    x = gp.sample(30)
    exact = gp.log_likelihood(x)
    few, many = (
        annealed_importance_sampling(gp.model, None, x, t, 16, initial="prior", **KERNEL)
        for t in (2, 50)
    )
    check_convergence(errors(few, exact), errors(many, exact), many.stderr, "prior")


# ---------------------------------------------------------------------------------------------
# BDMC.


@pytest.mark.slow
@pytest.mark.parametrize("initial", ["prior", "guide"])
def test_bdmc_sandwiches_the_exact_log_likelihood_and_narrows_with_steps(initial):
    lg = LinearGaussian()
    x, latents = simulate_data(lg.model, torch.zeros(50, lg.data_dim, dtype=torch.float64))
    assert set(latents) == {"z"} and latents["z"].shape == (50, lg.latent_dim)
    exact = lg.log_likelihood(x).mean()
    guide = lg.poor_guide if initial == "guide" else None
    gaps = []
    for num_steps in (3, 100):
        bdmc = bidirectional_monte_carlo(
            lg.model, guide, x, latents, num_steps, 16, initial=initial, **KERNEL
        )
        lower, upper = bdmc.lower.log_likelihood.mean(), bdmc.upper.log_likelihood.mean()
        assert bdmc.upper.reverse and not bdmc.lower.reverse
        assert lower <= exact + 0.03 and upper >= exact - 0.03, (lower - exact, upper - exact)
        gaps.append(bdmc.gap.mean())
    assert gaps[0] > 2 * gaps[1] and gaps[1] < {"prior": 0.4, "guide": 0.1}[initial], gaps


def test_simulate_data_draws_the_latents_then_the_data():
    """The simulated data are p(x|z) draws at the returned latents: for the linear-Gaussian
    model, residuals x - (W z + b) of variance sigma^2, and latents of the prior's moments."""
    lg = LinearGaussian()
    x, latents = simulate_data(lg.model, torch.zeros(4000, lg.data_dim, dtype=torch.float64))
    z = latents["z"]
    residual = x - z @ lg.W.T - lg.b
    assert residual.var().item() == pytest.approx(lg.sigma**2, rel=0.05)
    assert z.mean(0).abs().max() < 0.1 and (z.var(0) - 1).abs().max() < 0.1


def test_simulate_data_needs_one_observed_site_of_the_data_shape():
    def two_observed(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
            pyro.sample("y", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"one observed site .* shapes \{'x': \(3,\), 'y'"):
        simulate_data(two_observed, torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# The HMC kernel.


def test_hmc_leaves_a_tempered_gaussian_target_invariant():
    """From exact draws of f_beta = p(z) p(x|z)^beta (Gaussian: precision I + beta W'W / s^2),
    20 transitions at beta = 0.3 with a fixed, large step size keep its mean and covariance."""
    lg, beta, num_chains = LinearGaussian(), 0.3, 4000
    x = lg.sample(1)
    precision = torch.eye(2).double() + beta * lg.W.T @ lg.W / lg.sigma**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (beta * lg.W.T @ (x[0] - lg.b) / lg.sigma**2)
    tempered = dist.MultivariateNormal(mean, cov)
    draws = tempered.sample((num_chains, 1))
    plan = plan_passes(x, num_chains, "data", 1, num_chains, None, None)
    target, point = _start(lg.model, None, x, plan, "prior", {"z": draws})
    chains = _Chains(target, num_leapfrog_steps=3, adapt=False, accept_prob=0.65)
    accepted = []
    for _ in range(20):
        point, accept = chains.transition(point, beta, torch.tensor([0.6]).double())
        accepted.append(accept.double().mean())
    z = point.u["z"][:, 0]
    assert 0.3 < torch.stack(accepted).mean() < 0.95  # the Metropolis test is at work
    stderr = (cov.diagonal() / num_chains).sqrt()
    assert ((z.mean(0) - mean).abs() < 4.5 * stderr).all(), (z.mean(0) - mean) / stderr
    torch.testing.assert_close(z.T.cov(), cov, rtol=0.1, atol=0.1 * cov.diagonal().min())


def test_step_sizes_adapt_per_datapoint_toward_the_target_acceptance():
    """Datapoints whose posteriors differ in width end with different step sizes, each with an
    acceptance rate near the target."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape), 1.0))
            pyro.sample("x", dist.Normal(z, x), obs=x)  # x_n is also the noise scale

    x = torch.tensor([0.02, 0.2]).double()
    options = {"initial": "prior", "num_leapfrog_steps": 1, "target_accept_prob": 0.65}
    result = annealed_importance_sampling(model, None, x, 200, 32, step_size=0.1, **options)
    assert result.step_size[0] < result.step_size[1] / 5, result.step_size
    assert (result.acceptance_rate - 0.65).abs().max() < 0.15, result.acceptance_rate
    fixed = annealed_importance_sampling(
        model, None, x, 10, 4, initial="prior", step_size=0.01, adapt_step_size=False
    )
    assert (fixed.step_size == 0.01).all()


# ---------------------------------------------------------------------------------------------
# The estimator contract.


def test_every_batching_gives_the_numbers_of_one_pass_with_the_exact_posterior():
    lg = LinearGaussian()
    x = lg.sample(23)
    calls = []
    whole = annealed_importance_sampling(lg.model, lg.exact_guide, x, 4, 3)
    batched = annealed_importance_sampling(
        lg.model, lg.exact_guide, x, 4, 3, batch_size=5, on_step=lambda *c: calls.append(c)
    )
    torch.testing.assert_close(batched.log_likelihood, whole.log_likelihood)
    # 5 batches of 4 transitions, counted across batches.
    assert calls == [(i, 20) for i in range(1, 21)]
    # max_elements bounds chains * rows * x[0].numel() per pass: 3 * 2 * 5 <= 30.
    calls.clear()
    annealed_importance_sampling(
        lg.model, lg.exact_guide, x, 1, 3, max_elements=30, on_step=lambda *c: calls.append(c)
    )
    assert calls[-1] == (12, 12)


def test_scale_is_ignored_and_masks_are_honoured():
    lg = LinearGaussian()
    x = lg.sample(10)

    def scaled(x):
        with poutine.scale(scale=0.3):
            lg.model(x)

    def masked(x):
        with poutine.mask(mask=torch.arange(x.shape[0]) < 4):
            lg.model(x)

    def run(model, **kwargs):
        pyro.set_rng_seed(1)
        return annealed_importance_sampling(model, None, x, 10, 4, initial="prior", **kwargs)

    reference = run(lg.model).log_weights
    torch.testing.assert_close(run(scaled).log_weights, reference)
    # A masked-out datapoint contributes nothing: p(x) = 1 whatever z.
    weights = run(masked).log_weights
    assert (weights[:, 4:] == 0).all() and (weights[:, :4] != 0).all()


def test_ais_ignores_the_kl_weight_and_leaves_the_parameters_alone():
    vae = VAE(data_dim=16, latent_dim=2, hidden_dims=(8,)).eval()
    x = torch.bernoulli(torch.full((6, 16), 0.3))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    pyro.set_rng_seed(2)
    one = estimate_log_likelihood_ais(vae.model, vae.guide, x, 5, 3)
    with vae.kl_weight(0.25):
        pyro.set_rng_seed(2)
        quarter = estimate_log_likelihood_ais(vae.model, vae.guide, x, 5, 3)
    torch.testing.assert_close(one, quarter)
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    assert all(p.grad is None for p in vae.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
def test_ais_follows_the_dtype_of_x(dtype):
    vae = VAE(data_dim=16, latent_dim=2, hidden_dims=(8,)).to(dtype).eval()
    x = torch.bernoulli(torch.full((4, 16), 0.3, dtype=dtype))
    result = annealed_importance_sampling(vae.model, vae.guide, x, 3, 2)
    assert result.log_likelihood.dtype == result.stderr.dtype == dtype
    assert result.log_weights.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ais_runs_on_the_device_of_x():
    vae = VAE(data_dim=16, latent_dim=2, hidden_dims=(8,)).cuda().eval()
    x = torch.bernoulli(torch.full((4, 16), 0.3, device="cuda"))
    assert estimate_log_likelihood_ais(vae.model, vae.guide, x, 3, 2).device == x.device


@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_ais_runs_with_every_prior_and_guide(prior, guide):
    vae = VAE(data_dim=16, latent_dim=2, hidden_dims=(8,), prior=prior, guide=guide).eval()
    x = torch.bernoulli(torch.full((5, 16), 0.3))
    for initial in ("guide", "prior"):
        estimate = estimate_log_likelihood_ais(vae.model, vae.guide, x, 3, 2, initial=initial)
        assert estimate.shape == (5,) and torch.isfinite(estimate).all()


def discrete_latent_model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_steps": 0}, "num_steps must be a positive integer, got 0"),
        ({"num_chains": 0}, "num_chains must be a positive integer, got 0"),
        ({"num_leapfrog_steps": 0}, "num_leapfrog_steps must be a positive integer, got 0"),
        ({"initial": "posterior"}, r"unknown initial 'posterior'; choose one of \['guide'"),
        ({"guide": None}, "initial='guide' needs a guide"),
        ({"schedule": "cosine"}, r"unknown schedule 'cosine'; choose one of \['linear'"),
        ({"schedule": [0.0, 1.0]}, r"schedule must hold num_steps \+ 1 = 4 .* shape \(2,\)"),
        ({"schedule": [0, 0.6, 0.4, 1]}, "rise from 0 to 1 without decreasing.* -0.2"),
        ({"schedule": [0, 0.3, 0.6, 0.9]}, "rise from 0 to 1 without decreasing.* to 0.9"),
        ({"step_size": 0.0}, "step_size must be a positive finite number, got 0.0"),
        ({"step_size": torch.ones(3)}, r"one per datapoint\), got a tensor of shape \(3,\)"),
        ({"target_accept_prob": 1.0}, r"target_accept_prob must be in \(0, 1\), got 1.0"),
        ({"plate_name": "particles"}, "plate_name 'particles' is reserved"),
        ({"posterior_latents": {"w": torch.zeros(4)}}, r"latent sites \['z'\], got \['w'\]"),
        ({"model": discrete_latent_model}, "latent site 'c' is discrete .*Bernoulli"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_value(kwargs, message):
    lg = LinearGaussian()
    arguments = {"model": lg.model, "guide": lg.poor_guide, "x": lg.sample(4), "num_steps": 3}
    arguments |= {"num_chains": 2, "initial": "prior" if "model" in kwargs else "guide"}
    with pytest.raises(ValueError, match=message) as error:
        annealed_importance_sampling(**(arguments | kwargs))
    assert "\n" not in str(error.value)


def test_a_model_without_latents_is_refused():
    def no_latents(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="no latent sample sites"):
        annealed_importance_sampling(no_latents, None, torch.zeros(3), 2, 2, initial="prior")
