"""The two-layer VAE: shapes, both wirings, and every estimator exact on a linear-Gaussian
two-layer model whose log p(x) and posteriors are closed form."""

import dataclasses

import pyro
import pytest
import torch
from common import tiny_config

from pyro_vae import estimate_elbo, estimate_elbo_terms, estimate_log_likelihood, load_run
from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.describe import build_vae, describe_model
from pyro_vae.distributions import inverse_positive_scale
from pyro_vae.hierarchical import HIERARCHIES, HierarchicalVAE

WIRINGS = sorted(HIERARCHIES)


@pytest.mark.parametrize("hierarchy", WIRINGS)
def test_both_sites_have_the_shapes_of_their_layers_also_under_a_particles_plate(hierarchy):
    vae = HierarchicalVAE(64, latent_dim=2, lower_latent_dim=3, hidden_dims=(16,),
                          inner_hidden_dims=(8,), hierarchy=hierarchy)  # fmt: skip
    x = torch.rand(5, 64).bernoulli()
    for fn in (vae.guide, vae.model):
        with pyro.plate("particles", 4, dim=-2):
            trace = pyro.poutine.trace(fn).get_trace(x)
        assert trace.nodes["z1"]["value"].shape == (4, 5, 3)
        assert trace.nodes["z2"]["value"].shape == (4, 5, 2)
    assert estimate_log_likelihood(vae.model, vae.guide, x, num_samples=7).shape == (5,)
    assert vae.reconstruct(x).shape == vae.sample(6)[:5].shape == (5, 64)
    assert vae.encode(x).batch_shape == (5,) and vae.encode(x).event_shape == (2,)
    assert vae.latent_code(x).shape == (5, 2)


@pytest.mark.parametrize("hierarchy", WIRINGS)
def test_the_kl_weight_scales_both_latent_sites_in_model_and_guide(hierarchy):
    vae = HierarchicalVAE(64, latent_dim=2, lower_latent_dim=3, hidden_dims=(8,),
                          hierarchy=hierarchy)  # fmt: skip
    x = torch.rand(5, 64).bernoulli()
    with vae.kl_weight(0.25):
        guide = pyro.poutine.trace(vae.guide).get_trace(x)
        model = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=guide)).get_trace(x)
    for trace in (guide, model):
        assert trace.nodes["z1"]["scale"] == trace.nodes["z2"]["scale"] == 0.25
    assert model.nodes["x"]["scale"] == 1.0


def test_the_wirings_differ_in_what_the_decoder_and_the_guide_see():
    iwae = HierarchicalVAE(64, latent_dim=2, lower_latent_dim=3, hidden_dims=(), hierarchy="iwae")
    vamp = HierarchicalVAE(64, latent_dim=2, lower_latent_dim=3, hidden_dims=(),
                           hierarchy="vampprior")  # fmt: skip
    assert iwae.decoder[0].in_features == 3 and vamp.decoder[0].in_features == 5  # z1 | z1, z2
    assert iwae.encoder[0].in_features == 3 and vamp.encoder[0].in_features == 64  # from z1 | x
    assert iwae.lower_encoder[0].in_features == 64 and vamp.lower_encoder[0].in_features == 66


def test_a_vamp_prior_on_the_top_code_mixes_the_guide_at_the_pseudo_inputs():
    vae = HierarchicalVAE(64, latent_dim=2, lower_latent_dim=3, hidden_dims=(8,), prior="vamp",
                          prior_kwargs={"num_components": 6}, hierarchy="vampprior")  # fmt: skip
    prior = vae.prior()
    assert prior.event_shape == (2,)
    components = vae.encode(vae.prior.pseudo_inputs)
    assert torch.allclose(prior.component_distribution.mean, components.mean)


def test_bad_settings_are_refused_naming_the_value():
    with pytest.raises(
        ValueError, match=r"unknown hierarchy 'ladder'; choose one of \['iwae', 'vampprior'\]"
    ):
        HierarchicalVAE(64, latent_dim=2, lower_latent_dim=3, hierarchy="ladder")
    with pytest.raises(ValueError, match="lower_latent_dim must be a positive integer, got 0"):
        HierarchicalVAE(64, latent_dim=2, lower_latent_dim=0)
    with pytest.raises(ValueError, match=r"inner_hidden_dims must be positive integers, got \[0\]"):
        Config(lower_latent_dim=3, inner_hidden_dims=[0])


# A linear-Gaussian two-layer model: z2 ~ N(0, 1), z1 | z2 ~ N(a z2 + b, s1^2),
# x | z1, z2 ~ N(c z1 + e z2 + d, s^2 I) (e = 0 in the iwae wiring, whose decoder sees z1 only).
A, B, S1, S = 1.5, -0.5, 0.7, 0.6
C, E, D = (
    torch.tensor([1.0, -2.0, 0.5]),
    torch.tensor([0.8, 0.0, -1.0]),
    torch.tensor([0.3, 0.1, -0.2]),
)


def linear_gaussian_joint(hierarchy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of (z2, z1, x) in float64, from u = M u + m + noise."""
    e = E if hierarchy == "vampprior" else torch.zeros(3)
    M = torch.zeros(5, 5, dtype=torch.float64)
    M[1, 0], M[2:, 1], M[2:, 0] = A, C, e
    m = torch.cat([torch.tensor([0.0, B]), D]).double()
    noise = torch.tensor([1.0, S1**2] + [S**2] * 3, dtype=torch.float64)
    inverse = torch.linalg.inv(torch.eye(5, dtype=torch.float64) - M)
    return inverse @ m, inverse @ torch.diag(noise) @ inverse.T


def conditional(mean, cov, target: int, given: list[int]):
    """p(u_target | u_given) = N(w . u_given + bias, var)."""
    solve = torch.linalg.solve(cov[given][:, given], cov[given, target])
    return (
        solve,
        mean[target] - solve @ mean[given],
        cov[target, target] - cov[target, given] @ solve,
    )


def set_linear(layer: torch.nn.Linear, weight, bias, sd: float) -> None:
    """A layer whose output is (loc, raw scale) of a Gaussian: loc = weight . input + bias."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0] = torch.as_tensor(weight)
        layer.bias.copy_(torch.tensor([float(bias), inverse_positive_scale(sd)]))


def linear_gaussian_vae(hierarchy: str, exact_guide: bool = True) -> HierarchicalVAE:
    vae = HierarchicalVAE(3, latent_dim=1, lower_latent_dim=1, hidden_dims=(), inner_hidden_dims=(),
                          hierarchy=hierarchy, likelihood="normal",
                          likelihood_kwargs={"scale": S}).double()  # fmt: skip
    set_linear(vae.conditional_prior[0], [A], B, S1)
    with torch.no_grad():
        vae.decoder[0].weight.copy_(torch.stack([C, E], -1)[:, : vae.decoder[0].in_features])
        vae.decoder[0].bias.copy_(D)
    mean, cov = linear_gaussian_joint(hierarchy)
    x_idx = [2, 3, 4]
    if hierarchy == "iwae":  # q(z1|x) q(z2|z1): p(z2|z1, x) = p(z2|z1) in this wiring
        layers = [(vae.lower_encoder[0], 1, x_idx), (vae.encoder[0], 0, [1])]
    else:  # q(z2|x) q(z1|x, z2), the lower encoder's input is (x, z2)
        layers = [(vae.encoder[0], 0, x_idx), (vae.lower_encoder[0], 1, x_idx + [0])]
    for layer, target, given in layers:
        weight, bias, var = conditional(mean, cov, target, given)
        set_linear(layer, weight, bias, var.sqrt().item() * (1.0 if exact_guide else 0.6))
    return vae


def exact_log_likelihood(hierarchy: str, x: torch.Tensor) -> torch.Tensor:
    mean, cov = linear_gaussian_joint(hierarchy)
    return torch.distributions.MultivariateNormal(mean[2:], cov[2:, 2:]).log_prob(x)


@pytest.mark.parametrize("hierarchy", WIRINGS)
def test_with_the_exact_posterior_as_guide_every_estimator_is_log_px_exactly(hierarchy):
    vae = linear_gaussian_vae(hierarchy)
    x = torch.randn(40, 3, dtype=torch.float64) * 2
    exact = exact_log_likelihood(hierarchy, x)
    # Every importance weight p(x, z1, z2) / q(z1, z2 | x) is p(x): no draw can move it.
    assert torch.allclose(estimate_elbo(vae.model, vae.guide, x), exact, atol=1e-8)
    assert torch.allclose(estimate_log_likelihood(vae.model, vae.guide, x, 3), exact, atol=1e-8)
    terms = estimate_elbo_terms(vae.model, vae.guide, x, num_particles=500)
    assert torch.allclose(terms.reconstruction - terms.kl, exact, atol=1e-8)


@pytest.mark.parametrize("hierarchy", WIRINGS)
def test_with_a_wider_guide_the_bound_tightens_with_k_toward_the_exact_log_px(hierarchy):
    vae = linear_gaussian_vae(hierarchy, exact_guide=False)
    x = torch.randn(40, 3, dtype=torch.float64) * 2
    exact = exact_log_likelihood(hierarchy, x)
    gaps = [(exact - estimate_elbo(vae.model, vae.guide, x, num_particles=1000)).mean().item()]
    for k in (20, 2000):
        gaps.append((exact - estimate_log_likelihood(vae.model, vae.guide, x, k)).mean().item())
    assert gaps[0] > 0.3 and gaps[0] > gaps[1] > 0.03  # lower bounds, tighter with K
    assert abs(gaps[2]) < 0.1 * gaps[0]  # and near log p(x) at K = 2000


@pytest.mark.parametrize("hierarchy", WIRINGS)
def test_a_config_rebuilds_and_describes_the_two_layer_model(hierarchy):
    config = tiny_config(lower_latent_dim=3, inner_hidden_dims=[5], hierarchy=hierarchy)
    vae = build_vae(dataclasses.replace(config, data_dim=64))
    assert isinstance(vae, HierarchicalVAE) and vae.hierarchy == hierarchy
    described = describe_model(vae)
    assert described["vae_class"] is None  # a config describes it: no custom class
    assert (described["lower_latent_dim"], described["inner_hidden_dims"]) == (3, [5])
    assert described["hierarchy"] == hierarchy


def test_a_two_layer_run_trains_reloads_resumes_and_evaluates(tmp_path, capsys):
    out = tmp_path / "hvae"
    argv = ["train", "--epochs", "2", "--latent-dim", "2", "--hidden-dims", "16",
            "--batch-size", "200", "--lower-latent-dim", "4", "--inner-hidden-dims", "8",
            "--elbo", "iwae", "--num-particles", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 0
    run = load_run(out)
    assert isinstance(run.vae, HierarchicalVAE) and len(run.metrics) == 3
    assert run.config.lower_latent_dim == 4 and run.config.hierarchy == "iwae"
    assert main(["evaluate", str(out), "--num-samples", "20", "--limit", "50"]) == 0
    assert "log p(x), K=20" in capsys.readouterr().out
