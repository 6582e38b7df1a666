import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae import GUIDES, VAE
from pyro_vae.vae import point_estimate


def small_vae(**kwargs):
    return VAE(data_dim=64, latent_dim=3, hidden_dims=(16, 8), **kwargs)


def binary_data(n=5):
    return torch.bernoulli(torch.full((n, 64), 0.3))


def sample_sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def test_model_and_guide_sites_and_shapes():
    vae = small_vae()
    x = binary_data(5)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    assert set(model_sites) == {"z", "x"}
    assert set(guide_sites) == {"z"}
    assert model_sites["z"]["value"].shape == (5, 3)
    assert model_sites["z"]["fn"].event_shape == (3,)
    assert model_sites["x"]["fn"].event_shape == (64,)
    assert model_sites["x"]["is_observed"]
    assert [f.name for f in model_sites["x"]["cond_indep_stack"]] == ["data"]
    assert [f.name for f in guide_sites["z"]["cond_indep_stack"]] == ["data"]
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["log_prob"].shape == (5,)


def test_model_and_guide_are_consistent_under_validation():
    vae = small_vae()
    x = binary_data(7)
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        # Pyro validation (on in every test) checks supports, shapes and guide/model sites.
        assert torch.isfinite(elbo.differentiable_loss(vae.model, vae.guide, x))
    vectorized = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    assert torch.isfinite(vectorized.differentiable_loss(vae.model, vae.guide, x))


def test_loss_of_a_decoder_with_zero_weights_is_the_closed_form():
    vae = small_vae()
    x = binary_data(7)
    with torch.no_grad():
        for layer in vae.decoder:
            if isinstance(layer, nn.Linear):
                layer.weight.zero_()
        vae.decoder[-1].bias.normal_()
    # p(x|z) is then Bernoulli(sigmoid(bias)) whatever z, and q(z|x) is a diagonal Gaussian
    # against the standard normal prior.
    logits = vae.decoder[-1].bias
    log_px = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum()
    q = vae.encode(x).base_dist
    kl = 0.5 * (q.scale.pow(2) + q.loc.pow(2) - 1 - 2 * q.scale.log()).sum()
    with torch.no_grad():
        meanfield = TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x)
        assert meanfield.item() == pytest.approx((kl - log_px).item(), rel=1e-5)
        # The Monte Carlo ELBO samples the KL: log q(z|x) - log p(z), summed over the batch.
        num_particles = 4000
        z = q.sample((num_particles,))
        log_ratio = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum((1, 2))
        stderr = log_ratio.std().item() / num_particles**0.5
        trace = Trace_ELBO(num_particles, vectorize_particles=True, max_plate_nesting=1)
        value = trace.differentiable_loss(vae.model, vae.guide, x).item()
    assert value == pytest.approx((kl - log_px).item(), abs=4.5 * 2**0.5 * stderr)


def test_guide_scale_is_strictly_positive_for_extreme_encoder_outputs():
    vae = small_vae()
    with torch.no_grad():
        for p in vae.encoder.parameters():
            p.fill_(-1e4)
    q = vae.encode(torch.ones(2, 64))
    assert (q.base_dist.scale > 0).all()
    assert torch.isfinite(q.log_prob(q.rsample())).all()


def test_kl_scale_multiplies_the_kl_term_of_the_elbo():
    vae = small_vae()
    x = binary_data(4)

    def elbo_terms():
        pyro.set_rng_seed(1)
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
        log_px = model_trace.nodes["x"]["fn"].log_prob(x).sum().item()
        return torch_item(model_trace.log_prob_sum() - guide_trace.log_prob_sum()), log_px

    full, log_px = elbo_terms()
    vae.kl_scale = 0.25
    scaled, log_px_again = elbo_terms()
    assert log_px == pytest.approx(log_px_again)
    # ELBO = log p(x|z) - KL, so scaling the KL by 1/4 moves the ELBO by 3/4 of the KL term.
    kl = log_px - full
    assert scaled == pytest.approx(log_px - 0.25 * kl, rel=1e-5)


def test_reconstruct_and_sample_shapes_and_range():
    vae = small_vae()
    x = binary_data(6)
    recon = vae.reconstruct(x)
    samples = vae.sample(9)
    assert recon.shape == (6, 64) and samples.shape == (9, 64)
    for images in (recon, samples):
        assert ((images >= 0) & (images <= 1)).all()
        assert not images.requires_grad


@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_reconstruct_is_the_mean_of_p_x_given_the_code_of_x(guide):
    vae = small_vae(guide=guide)
    x = binary_data(6)
    q = vae.encode(x)
    try:
        z = q.mean  # the Gaussian guides
    except NotImplementedError:  # flows: one draw from q(z|x), the one reconstruct takes
        pyro.set_rng_seed(3)
        z = q.sample()
    expected = vae.decode(z).mean
    pyro.set_rng_seed(3)
    recon = vae.reconstruct(x)
    assert torch.allclose(recon, expected, atol=1e-6)
    # Against a reconstruction that ignores x, this untrained model's images differ by more.
    pyro.set_rng_seed(3)
    assert (recon - vae.reconstruct(torch.zeros_like(x))).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"latent_dim": 0}, "latent_dim must be a positive integer, got 0"),
        ({"hidden_dims": (16, -1)}, "every hidden size must be a positive integer, got -1"),
        ({"prior": "nope"}, "unknown prior 'nope'; choose one of"),
        ({"likelihood": "nope"}, "unknown likelihood 'nope'; choose one of"),
        ({"guide": "nope"}, "unknown guide 'nope'; choose one of"),
        ({"activation": "nope"}, "unknown activation 'nope'; choose one of"),
    ],
)
def test_vae_bad_arguments_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAE(data_dim=64, **{"hidden_dims": (8,), **kwargs})


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(3, 10), ValueError, r"x must have shape \(N, 64\), got \(3, 10\)"),
        (torch.zeros(3, 8, 8), ValueError, r"got \(3, 8, 8\); flatten images"),
        (torch.zeros(3, 64, dtype=torch.long), TypeError, "floating-point .* got torch.int64"),
        ([[0.0] * 64], TypeError, "floating-point torch.Tensor, got list"),
    ],
)
def test_model_rejects_bad_data_shapes_and_dtypes(x, error, match):
    vae = small_vae()
    with pytest.raises(error, match=match):
        vae.guide(x)
    with pytest.raises(error, match=match):
        vae.model(x)


def test_point_estimate_falls_back_to_a_sample_without_closed_form_mean():
    base = pyro.distributions.Normal(torch.zeros(3), 1.0)
    flow = pyro.distributions.TransformedDistribution(
        base, [pyro.distributions.transforms.ExpTransform().inv.inv]
    )
    assert torch.allclose(point_estimate(base), torch.zeros(3))
    assert (point_estimate(flow) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vae_works_in_float64_and_float32(dtype):
    vae = small_vae().to(dtype)
    x = binary_data(3).to(dtype)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert loss.dtype == dtype and torch.isfinite(loss)


def test_kl_weight_sets_the_kl_scale_for_a_block_and_puts_it_back():
    vae = small_vae()
    vae.kl_scale = 0.3
    with vae.kl_weight(1.0):
        assert vae.kl_scale == 1.0
        with vae.kl_weight(0.5):
            assert vae.kl_scale == 0.5
        assert vae.kl_scale == 1.0
    assert vae.kl_scale == 0.3
    with pytest.raises(RuntimeError, match="inside"):
        with vae.kl_weight(2.0):
            raise RuntimeError("inside")
    assert vae.kl_scale == 0.3


def test_vae_checks_its_sizes_with_the_shared_checks():
    with pytest.raises(ValueError, match="data_dim must be a positive integer, got True"):
        VAE(data_dim=True)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer, got 2.0"):
        VAE(data_dim=64, latent_dim=2.0)
