import gc
import weakref

import pyro
import pyro.distributions as dist
import pytest
import torch
from common import check_parameters_learn
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import constraints

from pyro_vae import VAE
from pyro_vae.distributions import MIN_SCALE, inverse_positive_scale
from pyro_vae.estimators import sampled_kl_sites
from pyro_vae.guides import GUIDES, get_guide
from pyro_vae.priors import PRIORS
from pyro_vae.vae import point_estimate

LATENT_DIM = 3


def scale_parts(q: dist.Distribution) -> list[torch.Tensor]:
    """The scales or Cholesky factors that define the spread of ``q``."""
    if isinstance(q, dist.TransformedDistribution):
        return scale_parts(q.base_dist)
    if isinstance(q, dist.Independent):
        return scale_parts(q.base_dist)
    if isinstance(q, dist.MultivariateNormal):
        return [q.scale_tril]
    return [q.scale]


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guide_shapes_and_finite_log_prob(name):
    family = GUIDES[name](LATENT_DIM)
    q = family(torch.randn(5, family.output_dim))
    assert q.batch_shape == (5,) and q.event_shape == (LATENT_DIM,)
    z = q.rsample((2,))
    assert z.shape == (2, 5, LATENT_DIM)
    log_q = q.log_prob(z)
    assert log_q.shape == (2, 5) and torch.isfinite(log_q).all()
    # A plate expands q over particles, as Trace_ELBO(vectorize_particles=True) does.
    assert q.expand((2, 5)).rsample().shape == (2, 5, LATENT_DIM)


#: How many numbers each family needs per datapoint, counted from its definition (not read from
#: ``output_dim``): a loc and a raw scale per latent; a loc per latent and the d(d+1)/2 entries of
#: a Cholesky factor; the IAF's loc and raw scale plus its context vector.
ENCODER_WIDTHS = {
    "diagonal": lambda d, options: 2 * d,
    "full_covariance": lambda d, options: d + d * (d + 1) // 2,
    "iaf": lambda d, options: 2 * d + options.get("context_dim", d),
}
#: Non-default options where a family has some, so that they too reach the encoder's width.
WIDTH_OPTIONS = {"iaf": {"context_dim": 5}}


@pytest.mark.parametrize(
    "name, options",
    [(name, {}) for name in sorted(GUIDES)] + sorted(WIDTH_OPTIONS.items()),
    ids=str,
)
def test_encoder_produces_the_number_of_outputs_the_guide_family_needs(name, options):
    assert name in ENCODER_WIDTHS, f"add the encoder width of guide {name!r} to ENCODER_WIDTHS"
    vae = VAE(16, LATENT_DIM, (8,), guide=name, guide_kwargs=options)
    out = vae.encoder(torch.rand(4, 16))
    assert out.shape == (4, ENCODER_WIDTHS[name](LATENT_DIM, options))
    q = vae.guide_family(out)
    assert q.batch_shape == (4,) and q.event_shape == (LATENT_DIM,)


@pytest.mark.parametrize("magnitude", [1.0, 50.0])
@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guide_scales_are_positive_and_scale_tril_valid(name, magnitude):
    family = GUIDES[name](LATENT_DIM)
    out = torch.randn(5, family.output_dim) * magnitude
    out[0] = -magnitude  # the most negative raw scales the encoder can give
    q = family(out)
    for part in scale_parts(q):
        if part.dim() >= 2 and part.shape[-2:] == (LATENT_DIM, LATENT_DIM):
            assert constraints.lower_cholesky.check(part).all()
            assert (part.diagonal(dim1=-2, dim2=-1) >= MIN_SCALE).all()
        else:
            assert (part >= MIN_SCALE).all()
    assert torch.isfinite(q.log_prob(q.sample())).all()


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guide_rsample_is_differentiable(name):
    family = GUIDES[name](LATENT_DIM)
    out = torch.randn(4, family.output_dim, requires_grad=True)
    q = family(out)
    assert q.has_rsample
    z = q.rsample()
    (z.pow(2).sum() - q.log_prob(z).sum()).backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()
    assert out.grad.abs().sum() > 0
    for param_name, param in family.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guide_point_estimate_works(name):
    vae = VAE(16, LATENT_DIM, (8,), guide=name)
    code = vae.latent_code(torch.rand(4, 16))
    assert code.shape == (4, LATENT_DIM) and torch.isfinite(code).all()


#: Grid and sample sizes of the 2-D density checks (a 201 x 201 grid, 20,000 draws).
GRID_POINTS, NUM_DRAWS = 201, 20_000


def perturb_parameters(module: torch.nn.Module, shift: float) -> None:
    """Move every parameter of ``module`` far from its initial value: weight matrices are
    redrawn as N(0, 1 / fan_in), every other parameter is shifted by N(0, shift^2)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
            else:
                param.add_(shift * torch.randn_like(param))


def grid_2d(draws: torch.Tensor, num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The points ``(num_points**2, 2)`` of a float64 grid over the range of ``draws`` widened
    by half that range on each side, and their trapezoid weights. For 20,000 draws of a
    Gaussian-tailed density the range is about +-4 sd, so the grid spans +-8 sd and the mass
    outside it is below 1e-14."""
    low, high = draws.double().amin(0), draws.double().amax(0)
    low, high = low - (high - low) / 2, high + (high - low) / 2
    axes, weights = [], []
    for i in range(2):
        axis = torch.linspace(low[i].item(), high[i].item(), num_points, dtype=torch.float64)
        weight = torch.full_like(axis, (axis[1] - axis[0]).item())
        weight[[0, -1]] /= 2
        axes.append(axis)
        weights.append(weight)
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    return points, torch.outer(*weights).reshape(-1)


def check_density_on_a_grid(log_density, draws: torch.Tensor) -> None:
    """Assert that ``exp(log_density)`` integrates to 1 on a grid around ``draws`` (S, 2), and
    that the mean and covariance of the draws are the density's, within 5 standard errors.

    The grid is refined (up to 4 times as many points per axis) until no cell holds more than
    0.5% of the mass; the trapezoid rule is then exact to far below the tolerance of 1e-3 for
    smooth densities, and to 1e-6 (at worst 1e-4, over 90 random flows) for the piecewise smooth
    ones of ReLU flows. The
    standard errors come from the grid's own moments: Var(mean_i) = C_ii / S and
    Var(cov_ij) = (E[d_i^2 d_j^2] - C_ij^2) / S, with d = z - E[z] and C the covariance.
    """
    for num_points in (GRID_POINTS, 2 * GRID_POINTS - 1, 4 * GRID_POINTS - 3):
        points, weights = grid_2d(draws, num_points)
        mass_at = weights * log_density(points.to(draws.dtype)).double().exp()
        if mass_at.max() < 5e-3 * mass_at.sum():
            break
    mass = mass_at.sum()
    assert abs(mass.item() - 1) < 1e-3, f"density integrates to {mass.item():.5f}"
    mean = mass_at @ points
    d = points - mean
    cov = (d.T * mass_at) @ d
    fourth = (d.T.square() * mass_at) @ d.square()  # E[d_i^2 d_j^2]
    x = draws.double()
    num_draws = x.shape[0]
    mean_error = (x.mean(0) - mean).abs()
    assert (mean_error < 5 * (cov.diagonal() / num_draws).sqrt()).all(), (x.mean(0), mean)
    cov_error = (torch.cov(x.T) - cov).abs()
    assert (cov_error < 5 * ((fourth - cov**2) / num_draws).sqrt()).all(), (torch.cov(x.T), cov)


#: Seed of the random parameters of the density tests: the parts checked are fixed (the far
#: from identity test pins the IAF's), only the draws follow the test's seed.
PARAMETER_SEED = 0


def perturbed_family(name: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    """A 2-D guide family with every parameter moved away from its initial value (a flow far
    from the identity, see the next test) and 3 random encoder outputs (3 contexts)."""
    with torch.random.fork_rng():
        torch.manual_seed(PARAMETER_SEED)
        family = GUIDES[name](2).to(dtype)
        perturb_parameters(family, shift=2.0)
        return family, torch.randn(3, family.output_dim, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guide_density_integrates_to_one_on_a_grid_and_has_the_moments_of_its_samples(name, dtype):
    family, out = perturbed_family(name, dtype)
    tolerance = {"atol": 1e-3, "rtol": 0} if dtype == torch.float32 else {}
    with torch.no_grad():
        for k in range(out.shape[0]):
            q = family(out[k])
            z = q.sample((NUM_DRAWS,))
            # The ELBO's log q of the guide's own draws (a flow reads it from its transforms'
            # cache, so first) is the density the grid checks (a copy goes through the inverse,
            # which in float32 amplifies rounding: differences up to 2e-4 nats seen).
            torch.testing.assert_close(q.log_prob(z), q.log_prob(z.clone()), **tolerance)
            check_density_on_a_grid(q.log_prob, z)


def test_iaf_flows_of_the_grid_test_are_far_from_the_identity():
    # The grid test sees the log-determinant only where it is far from 0. Each gated step
    # contracts (sigma < 1, log|det| < 0), so a flipped sign multiplies q by exp(2 log|det|) < 1
    # everywhere: the mass becomes E_q[exp(2 log|det|)], exp(-1) were log|det| a constant -0.5,
    # against the grid's tolerance of 1e-3 (its error is about 1e-6 for these flows).
    family, out = perturbed_family("iaf", torch.float64)
    with torch.no_grad():
        q = family(out)
        z = q.sample((1000,))
        x = z
        for transform in reversed(q.transforms):
            x = transform.inv(x)
        log_det = q.base_dist.log_prob(x) - q.log_prob(z)  # sum of the flows' log|det J|
    assert (log_det.mean(0) < -0.5).all(), log_det.mean(0)


def test_full_covariance_guide_builds_the_cholesky_factor_row_by_row():
    family = GUIDES["full_covariance"](2)
    assert family.output_dim == 2 + 3
    raw_diag = inverse_positive_scale(0.5)
    raw_second = inverse_positive_scale(2.0)
    q = family(torch.tensor([[1.0, 2.0, raw_diag, -0.7, raw_second]]))
    # L = U diag(s): the lower entry -0.7 of U is scaled by s of its column, 0.5.
    expected = torch.tensor([[0.5, 0.0], [-0.35, 2.0]])
    torch.testing.assert_close(q.scale_tril[0], expected)
    torch.testing.assert_close(q.covariance_matrix[0], expected @ expected.T)
    torch.testing.assert_close(q.loc[0], torch.tensor([1.0, 2.0]))


def test_iaf_guide_density_away_from_its_samples_inverts_the_flow():
    family = GUIDES["iaf"](LATENT_DIM, num_flows=3)
    q = family(torch.randn(4, family.output_dim))
    z = q.sample()
    # A copy is not in the transforms' cache, so its density goes through the inverse. The
    # sample's own density comes first: evaluating the copy would replace the cached sample.
    log_q = q.log_prob(z)
    torch.testing.assert_close(q.log_prob(z.clone()), log_q)
    with pytest.raises(NotImplementedError):
        _ = q.mean
    assert point_estimate(q).shape == (4, LATENT_DIM)


def test_iaf_flows_are_amortized_by_the_encoder_context():
    family = GUIDES["iaf"](LATENT_DIM, context_dim=4)
    assert family.output_dim == 2 * LATENT_DIM + 4
    out = torch.randn(2, family.output_dim).requires_grad_()
    with torch.no_grad():
        out[1, : 2 * LATENT_DIM] = out[0, : 2 * LATENT_DIM]  # same base Gaussian, other context
    q = family(out)
    z = torch.randn(LATENT_DIM)
    log_q = q.log_prob(z.expand(2, LATENT_DIM))
    assert (log_q[0] - log_q[1]).abs() > 1e-4
    (grad,) = torch.autograd.grad(q.rsample().sum(), out)
    assert grad[:, 2 * LATENT_DIM :].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iaf_density_broadcasts_points_against_a_batch_of_contexts(dtype):
    # The VampPrior evaluates its components (a batch of K guides) at z of shape (..., 1, D).
    family = GUIDES["iaf"](LATENT_DIM, num_flows=2).to(dtype)
    out = torch.randn(5, family.output_dim, dtype=dtype)
    z = torch.randn(2, 4, 1, LATENT_DIM, dtype=dtype)
    log_q = family(out).log_prob(z)
    assert log_q.shape == (2, 4, 5) and log_q.dtype == dtype
    for k in range(5):
        torch.testing.assert_close(log_q[..., k], family(out[k]).log_prob(z.squeeze(-2)))


def test_iaf_transforms_are_freed_without_the_garbage_collector():
    # A reference cycle would keep every guide call's flows and cached tensors alive until a
    # collection: 9 GB over a K=5000 evaluation of the MNIST test set.
    family = GUIDES["iaf"](LATENT_DIM)
    q = family(torch.randn(4, family.output_dim))
    q.log_prob(q.sample())
    refs = [weakref.ref(t) for t in q.transforms]
    gc.disable()
    try:
        del q
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()


def analytic_kl_table() -> dict[tuple[str, str], bool]:
    table = {}
    for prior in sorted(PRIORS):
        for guide in sorted(GUIDES):
            vae = VAE(16, LATENT_DIM, (8,), prior=prior, guide=guide)
            x = torch.bernoulli(torch.full((2, 16), 0.5))
            sampled = sampled_kl_sites(vae.model, vae.guide, x)
            assert sampled in ((), ("z",)), (prior, guide)
            table[prior, guide] = sampled == ()
    return table


def test_sampled_kl_sites_for_registered_pairs():
    table = analytic_kl_table()
    gaussian_priors = {"normal", "learned_normal"}
    gaussian_guides = {"diagonal", "full_covariance"}
    for (prior, guide), analytic in table.items():
        if prior in gaussian_priors and guide in gaussian_guides:
            assert analytic, (prior, guide)
        if prior in {"mixture", "vamp", "student_t"} or guide == "iaf":
            assert not analytic, (prior, guide)


def test_get_guide_unknown_option_names_the_accepted_ones():
    message = r"guide InverseAutoregressiveFlow takes no option 'flows'; it takes \['context_dim', "
    with pytest.raises(ValueError, match=message):
        get_guide("iaf", 3, flows=2)
    with pytest.raises(ValueError, match=r"guide DiagonalNormal takes no option 'num_flows'"):
        VAE(16, LATENT_DIM, (8,), guide="diagonal", guide_kwargs={"num_flows": 2})


def test_get_guide_unknown_name_error():
    with pytest.raises(ValueError, match=r"unknown guide 'nope'; choose one of \[.*'diagonal'"):
        get_guide("nope", 2)


@pytest.mark.parametrize(
    "latent_dim, kwargs, message",
    [
        (1, {}, "iaf guide needs latent_dim >= 2, got 1; use the diagonal guide"),
        (3, {"num_flows": 0}, "iaf guide num_flows must be a positive integer, got 0"),
        (3, {"num_flows": None}, "iaf guide num_flows must be a positive integer, got None"),
        (3, {"context_dim": 0}, "iaf guide context_dim must be a positive integer, got 0"),
        (3, {"hidden_dims": [2]}, r"each >= latent_dim=3, got \[2\]"),
    ],
)
def test_iaf_bad_option_errors(latent_dim, kwargs, message):
    with pytest.raises(ValueError, match=message):
        GUIDES["iaf"](latent_dim, **kwargs)


@pytest.mark.parametrize("guide", sorted(GUIDES))
@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_meanfield_elbo_uses_the_closed_form_kl_exactly_when_reported(prior, guide):
    prior_kwargs = {"num_components": 3} if prior in ("mixture", "vamp") else None
    vae = VAE(16, LATENT_DIM, (8,), prior=prior, guide=guide, prior_kwargs=prior_kwargs)
    with torch.no_grad():
        vae.decoder[-1].weight.zero_()  # p(x|z) no longer depends on z: only the KL is random
    x = torch.bernoulli(torch.full((4, 16), 0.5))
    elbo = TraceMeanField_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    losses = {elbo.loss(vae.model, vae.guide, x) for _ in range(3)}
    analytic = sampled_kl_sites(vae.model, vae.guide, x) == ()
    assert (len(losses) == 1) == analytic


#: The learnable parameters of every registered family at its default options, written out
#: from its definition: the IAF's 2 flows, each a MADE with one hidden layer.
EXPECTED_PARAMETERS = {
    "diagonal": set(),
    "full_covariance": set(),
    "iaf": {
        f"flows.{flow}.layers.{layer}.{kind}"
        for flow in range(2)
        for layer in range(2)
        for kind in ("weight", "bias")
    },
}


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guide_family_parameters_get_elbo_gradients_and_change_in_training(name):
    assert name in EXPECTED_PARAMETERS, f"list the parameters of guide {name!r} in the tests"
    vae = VAE(16, LATENT_DIM, (8,), guide=name)
    params = dict(vae.guide_family.named_parameters())
    assert set(params) == EXPECTED_PARAMETERS[name]
    x = torch.bernoulli(torch.full((6, 16), 0.3))
    check_parameters_learn(vae, params, x)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_guide_survives_a_state_dict_round_trip(name):
    saved = VAE(16, LATENT_DIM, (8,), guide=name)
    perturb_parameters(saved, shift=1.0)  # nothing of the saved model is left as initialized
    pyro.set_rng_seed(1)
    loaded = VAE(16, LATENT_DIM, (8,), guide=name)
    loaded.load_state_dict(saved.state_dict())
    x, z = torch.rand(4, 16), torch.randn(4, LATENT_DIM)
    torch.testing.assert_close(loaded.encode(x).log_prob(z), saved.encode(x).log_prob(z))
