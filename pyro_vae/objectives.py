"""The ELBO registry: which Pyro estimator of the evidence lower bound trains the model."""

from __future__ import annotations

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.checks import check_choice, check_int

#: ``trace``: the Monte Carlo ELBO, log p(x, z) - log q(z|x) at z ~ q(z|x).
#: ``meanfield``: E_q log p(x|z) - KL(q || p), with the KL in closed form where Pyro has one.
ELBOS: dict[str, type[ELBO]] = {
    "meanfield": TraceMeanField_ELBO,
    "trace": Trace_ELBO,
}


def get_elbo(name: str, num_particles: int = 1) -> ELBO:
    """Build a registered ELBO by name, vectorized over particles.

    :param str name: a key of :data:`ELBOS`.
    :param int num_particles: samples of z per datapoint, drawn in one vectorized pass.
    :returns: the Pyro ELBO object; its ``differentiable_loss(model, guide, x)`` is minus the
        ELBO summed over the batch.
    :raises ValueError: for an unknown name or a ``num_particles`` that is not a positive integer.
    """
    cls = ELBOS[check_choice("ELBO", name, ELBOS)]
    num_particles = check_int("num_particles", num_particles)
    return cls(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=1,
    )
