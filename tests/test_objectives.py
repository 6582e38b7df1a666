import math

import numpy as np
import pytest
import torch

from pyro_vae import VAE
from pyro_vae.objectives import ELBOS, get_elbo


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
