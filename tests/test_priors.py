import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from test_guides import NUM_DRAWS, PARAMETER_SEED, check_density_on_a_grid, perturb_parameters

from pyro_vae import VAE
from pyro_vae.distributions import DiagonalNormalMixture
from pyro_vae.guides import GUIDES
from pyro_vae.priors import PRIORS, VampPrior, get_prior

#: Small options so that the registry-wide tests stay fast; other priors use their defaults.
SMALL_OPTIONS = {"mixture": {"num_components": 3}, "vamp": {"num_components": 4}}
DATA_DIM, LATENT_DIM = 64, 3

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def small_vae(prior: str, guide: str = "diagonal", **kwargs) -> VAE:
    return VAE(
        DATA_DIM,
        LATENT_DIM,
        hidden_dims=(16,),
        prior=prior,
        guide=guide,
        prior_kwargs=SMALL_OPTIONS.get(prior),
        **kwargs,
    )


def binary_data(n: int = 6, **kwargs) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, DATA_DIM), 0.3, **kwargs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_event_shape_and_finite_log_prob(name, dtype, device):
    vae = small_vae(name).to(device=device, dtype=dtype)
    p = vae.prior()
    assert p.event_shape == (LATENT_DIM,)
    assert p.batch_shape == ()
    z = p.sample((5,))
    assert z.shape == (5, LATENT_DIM)
    assert z.dtype == dtype and z.device.type == device
    log_p = p.log_prob(z)
    assert log_p.shape == (5,) and log_p.dtype == dtype
    assert torch.isfinite(log_p).all()


#: The learnable parameters of every registered prior, written out from their definitions: a
#: prior whose parameters went missing (became buffers, say) must fail, not pass as fixed.
EXPECTED_PARAMETERS = {
    "learned_normal": {"loc", "raw_scale"},
    "mixture": {"locs", "raw_scales", "logits"},
    "normal": set(),
    "student_t": set(),
    "vamp": {"pseudo_inputs"},
}


def expected_parameters(name: str) -> set[str]:
    assert name in EXPECTED_PARAMETERS, f"list the parameters of prior {name!r} in the tests"
    return EXPECTED_PARAMETERS[name]


def assert_nonzero_gradients(params: dict[str, torch.Tensor]) -> None:
    for param_name, param in params.items():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_gradients_reach_its_parameters(name):
    vae = small_vae(name)
    params = dict(vae.prior.named_parameters())
    assert set(params) == expected_parameters(name)
    p = vae.prior()
    log_p = p.log_prob(p.sample((8,)).detach()).sum()
    assert log_p.requires_grad == bool(params)  # a fixed prior's density depends on nothing
    if params:
        log_p.backward()
        assert_nonzero_gradients(params)
        vae.zero_grad()
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    elbo.differentiable_loss(vae.model, vae.guide, binary_data(6)).backward()
    assert_nonzero_gradients(params)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_training_moves_every_prior_parameter(name):
    vae = small_vae(name)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), elbo)
    x = binary_data(6)
    z = torch.randn(5, LATENT_DIM)
    with torch.no_grad():
        log_p_before = vae.prior().log_prob(z)
    changed = changed_parameters(vae, lambda: [svi.step(x) for _ in range(3)])
    assert {n.removeprefix("prior.") for n in changed if n.startswith("prior.")} == (
        expected_parameters(name)
    )
    with torch.no_grad():
        moved = not torch.equal(vae.prior().log_prob(z), log_p_before)
    # A prior is learned exactly when it has parameters (the VampPrior also through its encoder).
    assert moved == bool(expected_parameters(name))


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_in_model_under_data_plate_and_vectorized_particles(name):
    vae = small_vae(name)
    x = binary_data(5)

    def particles(fn):
        def wrapped(x):
            with pyro.plate("particles", 2, dim=-2):
                return fn(x)

        return wrapped

    guide_trace = poutine.trace(particles(vae.guide)).get_trace(x)
    model = poutine.replay(particles(vae.model), trace=guide_trace)
    model_trace = poutine.trace(model).get_trace(x)
    model_trace.compute_log_prob()
    z_site = model_trace.nodes["z"]
    assert z_site["value"].shape == (2, 5, LATENT_DIM)
    assert z_site["log_prob"].shape == (2, 5)
    assert torch.isfinite(z_site["log_prob"]).all()
    assert model_trace.nodes["x"]["log_prob"].shape == (2, 5)


def changed_parameters(vae: VAE, step) -> set[str]:
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    step()
    return {n for n, p in vae.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("guide", sorted(GUIDES))
@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_svi_step_every_prior_with_every_guide(prior, guide, elbo):
    vae = small_vae(prior, guide)
    loss_fn = elbo(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), loss_fn)
    x = binary_data(6)
    losses = []
    changed = changed_parameters(vae, lambda: losses.append(svi.step(x)))
    assert torch.isfinite(torch.tensor(losses[0]))
    assert changed == {n for n, _ in vae.named_parameters()}


#: Options of the 2-D grid tests: the Student-t needs df > 4 for the covariance of its draws to
#: have a finite standard error (a finite fourth moment).
GRID_OPTIONS = {**SMALL_OPTIONS, "student_t": {"df": 6.0}}


@pytest.mark.parametrize(
    "prior, guide, dtype",
    [(prior, "diagonal", dtype) for prior in sorted(PRIORS) for dtype in ("float64", "float32")]
    # The VampPrior with each guide family as its components (float64 only: a flow's density at
    # 40,000 grid points costs a MADE pass per latent dimension and component).
    + [("vamp", guide, "float64") for guide in sorted(GUIDES) if guide != "diagonal"],
)
def test_prior_density_integrates_to_one_on_a_grid_and_has_the_moments_of_its_samples(
    prior, guide, dtype
):
    with torch.random.fork_rng():  # fixed parameters; only the draws follow the test's seed
        torch.manual_seed(PARAMETER_SEED)
        options = GRID_OPTIONS.get(prior)
        vae = VAE(DATA_DIM, 2, (16,), prior=prior, guide=guide, prior_kwargs=options)
        vae.to(getattr(torch, dtype))
        # Learned priors away from their initial values; for the VampPrior its encoder and flows.
        perturb_parameters(vae, shift=1.0)
    with torch.no_grad():
        p = vae.prior()
        check_density_on_a_grid(p.log_prob, p.sample((NUM_DRAWS,)))


def test_mixture_log_prob_is_logsumexp_of_components():
    prior = get_prior("mixture", 2, num_components=4)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(4))
    z = torch.randn(7, 2) * 2
    log_w = prior.logits.log_softmax(-1)
    scales = prior().component_distribution.base_dist.scale
    components = torch.stack(
        [dist.Normal(prior.locs[k], scales[k]).log_prob(z).sum(-1) for k in range(4)], dim=-1
    )
    expected = (log_w + components).logsumexp(-1)
    torch.testing.assert_close(prior().log_prob(z), expected)


def test_mixture_and_vamp_priors_use_the_fast_mixture_for_diagonal_components():
    assert type(small_vae("mixture").prior()) is DiagonalNormalMixture
    assert type(small_vae("vamp").prior()) is DiagonalNormalMixture
    assert type(small_vae("vamp", guide="full_covariance").prior()) is dist.MixtureSameFamily


def test_mixture_components_start_apart():
    prior = get_prior("mixture", 2, num_components=10)
    distances = torch.cdist(prior.locs, prior.locs) + torch.eye(10) * 1e9
    assert distances.min() > 0.01
    torch.testing.assert_close(prior().mixture_distribution.probs, torch.full((10,), 0.1))


def test_learned_normal_prior_starts_at_standard_normal():
    z = torch.randn(5, 3)
    expected = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(get_prior("learned_normal", 3)().log_prob(z), expected)


@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_vamp_prior_with_one_component_is_the_posterior_at_the_pseudo_input(guide):
    vae = VAE(
        DATA_DIM, LATENT_DIM, (16,), prior="vamp", guide=guide, prior_kwargs={"num_components": 1}
    )
    z = torch.randn(4, LATENT_DIM)
    q = vae.encode(vae.prior.pseudo_inputs)
    torch.testing.assert_close(vae.prior().log_prob(z), q.log_prob(z.unsqueeze(1)).squeeze(1))


def test_vamp_prior_is_a_uniform_mixture_of_posteriors():
    vae = small_vae("vamp")
    z = torch.randn(5, LATENT_DIM)
    q = vae.encode(vae.prior.pseudo_inputs)
    expected = q.log_prob(z.unsqueeze(1)).logsumexp(-1) - torch.log(torch.tensor(4.0))
    torch.testing.assert_close(vae.prior().log_prob(z), expected)


def test_vamp_prior_does_not_register_the_vae_as_a_submodule():
    vae = small_vae("vamp")
    assert dict(vae.prior.named_modules()) == {"": vae.prior}
    assert [n for n, _ in vae.prior.named_parameters()] == ["pseudo_inputs"]
    assert vae.prior.pseudo_inputs.shape == (4, DATA_DIM)
    names = [n for n, _ in vae.named_parameters()]
    assert len(names) == len(set(names)) and "prior.pseudo_inputs" in names
    clone = copy.deepcopy(vae)
    assert clone.prior._vae is clone


def test_vamp_pseudo_inputs_start_in_init_range():
    vae = VAE(DATA_DIM, 2, (16,), prior=VampPrior(2, num_components=50, init_range=(0.2, 0.4)))
    u = vae.prior.pseudo_inputs
    assert u.min() >= 0.2 and u.max() <= 0.4


def test_vamp_prior_unbound_error():
    with pytest.raises(RuntimeError, match="vamp prior is not bound to a VAE"):
        VampPrior(2)()


def test_vamp_prior_rebound_to_other_data_dim_error():
    prior = small_vae("vamp").prior
    with pytest.raises(ValueError, match="pseudo-inputs of size 64 but the VAE has data_dim=10"):
        VAE(10, LATENT_DIM, (16,), prior=prior)


def test_get_prior_unknown_name_error():
    with pytest.raises(ValueError, match=r"unknown prior 'nope'; choose one of \[.*'normal'"):
        get_prior("nope", 2)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        (
            "mixture",
            {"num_components": 0},
            "mixture prior num_components must be a positive integer, got 0",
        ),
        (
            "mixture",
            {"num_components": 2.5},
            "mixture prior num_components must be a positive integer, got 2.5",
        ),
        (
            "vamp",
            {"num_components": -1},
            "vamp prior num_components must be a positive integer, got -1",
        ),
        ("vamp", {"init_range": (1.0, 0.0)}, r"vamp prior init_range must have low < high"),
        ("student_t", {"df": 0}, "student_t prior df must be a positive finite number, got 0"),
        (
            "student_t",
            {"df": True},
            "student_t prior df must be a positive finite number, got True",
        ),
    ],
)
def test_prior_bad_option_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_prior(name, 2, **kwargs)


@pytest.mark.parametrize(
    "name, accepted",
    [("normal", "none"), ("mixture", r"\['num_components'\]"), ("student_t", r"\['df'\]")],
)
def test_get_prior_unknown_option_names_the_accepted_ones(name, accepted):
    cls = PRIORS[name].__name__
    with pytest.raises(
        ValueError, match=rf"prior {cls} takes no option 'colour'; it takes {accepted}"
    ):
        get_prior(name, 2, colour="red")
    with pytest.raises(ValueError, match=rf"prior {cls} takes no option 'colour'"):
        VAE(DATA_DIM, 2, (16,), prior=name, prior_kwargs={"colour": "red"})


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_survives_a_state_dict_round_trip(name):
    saved = small_vae(name)
    # Move the saved prior's whole state, parameters and buffers, away from what a fresh build
    # holds (positive entries stay positive), so that a state not saved or not loaded shows.
    with torch.no_grad():
        for value in saved.prior.state_dict().values():
            value.mul_(1 + torch.rand_like(value)).add_(torch.rand_like(value))
    pyro.set_rng_seed(1)
    loaded = small_vae(name)
    z = torch.randn(4, LATENT_DIM)
    with torch.no_grad():
        assert not torch.allclose(loaded.prior().log_prob(z), saved.prior().log_prob(z))
    loaded.load_state_dict(saved.state_dict())
    torch.testing.assert_close(loaded.prior().log_prob(z), saved.prior().log_prob(z))


@pytest.mark.parametrize(
    "name, options, reference",
    [
        ("normal", {}, lambda d: torch.distributions.Normal(torch.zeros(d), 1.0)),
        ("student_t", {}, lambda d: torch.distributions.StudentT(3.0, torch.zeros(d), 1.0)),
        ("student_t", {"df": 0.5}, lambda d: torch.distributions.StudentT(0.5, torch.zeros(d))),
        ("learned_normal", {}, lambda d: torch.distributions.Normal(torch.zeros(d), 1.0)),
    ],
)
def test_fixed_and_initial_priors_are_their_documented_distributions(name, options, reference):
    # N(0, I); independent standard Student-t latents (location 0, scale 1, df 3 by default);
    # a learned Normal starts at N(0, I). The grid test checks normalisation, this the place.
    prior = get_prior(name, 3, **options)
    z = 4 * torch.randn(50, 3)
    expected = reference(3).log_prob(z).sum(-1)
    torch.testing.assert_close(prior().log_prob(z), expected, rtol=1e-5, atol=1e-5)
