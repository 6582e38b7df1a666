"""The ELBO registry: which Pyro estimator of the evidence lower bound trains the model.

``trace`` is :class:`FastTrace_ELBO`, Pyro's :class:`~pyro.infer.Trace_ELBO` with a shorter
path for the common case (every guide site reparameterized, validation off): the same loss and
the same gradients on the same draws, with less bookkeeping per step.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from pyro_vae.checks import check_choice, check_int


class FastTrace_ELBO(Trace_ELBO):
    """:class:`~pyro.infer.Trace_ELBO` that skips its general machinery when it is not needed.

    With Pyro's validation on (``pyro.enable_validation``, the default), or for a guide that is
    a :class:`~pyro.poutine.messenger.Messenger`, every call is :class:`~pyro.infer.Trace_ELBO`'s
    own, checks included. With validation off, :meth:`differentiable_loss` traces the guide and
    replays the model once (vectorized over particles as Pyro does) and, when every guide
    sample site has ``rsample``, returns minus the sum of the sites' scaled and masked
    log-densities directly: for such guides that is Pyro's surrogate loss term for term (the
    score-function parts are zero), without copying the traces, caching per-site sums or
    moving scalars to the host. Any other guide gets Pyro's Rao-Blackwellized surrogate on the
    same traces. :func:`pyro_vae.train.fit` runs the first step of each epoch with validation
    as set and the others with it off (see ``Config.validation``).
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        vectorized = self.vectorize_particles and self.max_plate_nesting != float("inf")
        if (
            is_validation_enabled()
            or not (vectorized or self.num_particles == 1)
            or isinstance(poutine.unwrap(guide), poutine.messenger.Messenger)
        ):
            return super().differentiable_loss(model, guide, *args, **kwargs)
        model, guide = self._vectorized_num_particles(model), self._vectorized_num_particles(guide)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        guide_sites = _sample_sites(guide_trace)
        if not all(site["fn"].has_rsample for site in guide_sites):
            return self._surrogate_loss(model_trace, guide_trace)
        elbo = sum(_log_prob_sum(site) for site in _sample_sites(model_trace))
        elbo = elbo - sum(_log_prob_sum(site) for site in guide_sites)
        return -elbo / self.num_particles

    def _surrogate_loss(self, model_trace, guide_trace) -> torch.Tensor:
        """Pyro's loss on the given traces, score-function terms included."""
        model_trace = prune_subsample_sites(model_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        loss, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
        return (loss + (surrogate - torch_item(surrogate))) / self.num_particles


def _sample_sites(trace: poutine.Trace) -> list[dict]:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def _log_prob_sum(site: dict) -> torch.Tensor:
    log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_prob, site["scale"], site["mask"]).sum()


#: ``trace``: the Monte Carlo ELBO, log p(x, z) - log q(z|x) at z ~ q(z|x).
#: ``meanfield``: E_q log p(x|z) - KL(q || p), with the KL in closed form where Pyro has one.
ELBOS: dict[str, type[ELBO]] = {
    "meanfield": TraceMeanField_ELBO,
    "trace": FastTrace_ELBO,
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
