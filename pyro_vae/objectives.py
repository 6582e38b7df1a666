"""The ELBO registry: which Pyro objective trains the model, and how its gradient is estimated.

``trace`` is :class:`FastTrace_ELBO`, Pyro's :class:`~pyro.infer.Trace_ELBO` with a shorter
path for the common case (every guide site reparameterized, validation off): the same loss and
the same gradients on the same draws, with less bookkeeping per step. ``meanfield`` is Pyro's
:class:`~pyro.infer.TraceMeanField_ELBO`.

``stl``, ``iwae`` and ``dreg`` (:class:`STL_ELBO`, :class:`IWAE_ELBO`, :class:`DReG_ELBO`) are
written here, on :class:`PerDatapointELBO`, for models whose latents are all local: every sample
site sits in one vectorized data plate (the contract of :mod:`pyro_vae.estimators`), so that
each draw and datapoint has its own importance weight. Pyro's
:class:`~pyro.infer.RenyiELBO` has no ``differentiable_loss``, puts a subsampling scale and a KL
weight inside its weights, and makes one weight of the whole batch as soon as a site leaves the
data plate; these classes do none of that. ``docs/objectives.md`` says what each computes and
how to choose.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from pyro_vae.checks import check_choice, check_int
from pyro_vae.estimators import check_sites, per_datapoint_reducer

#: Name of the plate over the K draws per datapoint, left of all the model's plates (Pyro's
#: own name for it).
PARTICLES_PLATE = "num_particles_vectorized"


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


def stop_score_log_prob(fn: pyro.distributions.Distribution, value: torch.Tensor) -> torch.Tensor:
    """log q(value) whose gradient is the path derivative only: the score term is removed.

    The value is ``fn.log_prob(value)``. The gradient flows through ``value`` (to whatever
    ``value`` was computed from) but not through the parameters of ``fn`` directly: it is
    ``live - fixed + sg(fixed)`` with ``live`` the density at ``value`` and ``fixed`` the
    density at ``sg(value)``, where sg stops the gradient. This needs no detached copy of the
    distribution, so it works when the parameters live in closures or modules (a flow's
    transforms), where :func:`pyro.distributions.util.detach` leaves them attached. ``live``
    is evaluated at a new tensor object, so that a transformed distribution inverts its
    transforms instead of reading its cache, and the gradient reaches ``value`` itself.

    :param fn: the distribution q.
    :param torch.Tensor value: a reparameterized sample of q (or any differentiable point).
    :returns: the log-density, of ``fn``'s batch shape.

    References:

    [1] `Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        Inference`, Geoffrey Roeder, Yuhuai Wu, David Duvenaud (NeurIPS 2017).
    """
    live = fn.log_prob(value.view_as(value))
    fixed = fn.log_prob(value.detach())
    return live - fixed + fixed.detach()


class PerDatapointELBO(ELBO):
    """Base of the objectives built from one log-weight per draw and datapoint.

    One vectorized pass draws K = ``num_particles`` values of every latent site per datapoint
    from the guide, inside ``pyro.plate(PARTICLES_PLATE, K)`` left of all the model's plates
    (also for K = 1), replays the model on them, and reduces every site's log-density to a
    ``(K, N)`` tensor: ``log w[k, n] = log p(x_n, z_kn) - log q(z_kn | x_n)``, summed over the
    sites, with every plate other than the data plate summed out. A subclass turns the K
    log-weights of each datapoint into its bound; the loss is minus the sum of the bounds over
    the data plate.

    **The contract** is that of :mod:`pyro_vae.estimators`: every sample site of model and
    guide inside one vectorized ``pyro.plate(plate_name, N)``, every model latent sampled by
    the guide under its name and nothing else, functions that broadcast over the particles
    dimension. Each guide site needs ``rsample``. A site outside the data plate, a guide site
    without ``rsample`` or a subsampled plate other than the data plate is refused with a
    :class:`ValueError` naming the site, never handled by a weaker fallback.

    **Scales.** A subsampled data plate (``pyro.plate("data", N, subsample_size=B)``) scales
    the bound by N / B after the log-mean-exp; it never enters the weights. Any other scale of
    a site (the VAE's KL weight beta, set with :func:`~pyro.poutine.scale` on ``"z"`` in model
    and guide) stays in the log-weights, as in the ELBO that the training loop warms up:
    ``log w = log p(x|z) + beta (log p(z) - log q(z|x))``. Masks are applied: a masked term
    contributes zero.

    :param int num_particles: draws K per datapoint, made in one vectorized pass.
    :param int max_plate_nesting: plates of the model and guide, data plate included.
    :param bool vectorize_particles: must be ``True`` when ``num_particles > 1`` (the weights
        of a datapoint need all its draws at once); at K = 1 either value is the same.
    :param str plate_name: the name of the plate over datapoints.
    """

    #: How errors name the objective: its key in :data:`ELBOS`.
    name = "per-datapoint"
    #: Whether the guide's log-density enters as :func:`stop_score_log_prob`.
    stop_score = False
    #: The most latent sites the gradient estimator is exact for, or ``None`` for no limit.
    max_latent_sites: int | None = None

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: int = 1,
        vectorize_particles: bool = True,
        plate_name: str = "data",
    ):
        num_particles = check_int("num_particles", num_particles)
        max_plate_nesting = check_int("max_plate_nesting", max_plate_nesting)
        if num_particles > 1 and not vectorize_particles:
            raise ValueError(
                f"the {self.name} objective draws its {num_particles} particles in one "
                "vectorized pass; pass vectorize_particles=True"
            )
        if plate_name == PARTICLES_PLATE:
            raise ValueError(f"plate_name {PARTICLES_PLATE!r} is reserved for the draws")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        self.plate_name = plate_name
        #: The model's own plates; Pyro adds the particles plate to ``max_plate_nesting``.
        self.model_plate_nesting = max_plate_nesting

    def _get_trace(self, model, guide, args, kwargs) -> tuple[poutine.Trace, poutine.Trace]:
        """The guide's trace inside the particles plate and the model's, replayed on it, with
        subsample sites pruned, log-densities computed and the sites checked."""
        dim = -(self.model_plate_nesting + 1)

        def particles(fn):
            return pyro.plate(PARTICLES_PLATE, self.num_particles, dim=dim)(fn)

        guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
        replayed = poutine.replay(particles(model), trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
        model_trace = prune_subsample_sites(model_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        check_sites(model_trace, guide_trace, self.model_plate_nesting)
        return model_trace, guide_trace

    def log_weights(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The log-weights of one pass, shape ``(K, N)``: log p(x_n, z_kn) - log q(z_kn|x_n)
        with each site's KL weight and mask applied and the subsampling scale left out."""
        return self._log_weights(model, guide, args, kwargs)[0]

    def _log_weights(self, model, guide, args, kwargs) -> tuple[torch.Tensor, float, list]:
        """The ``(K, N)`` log-weights, the data plate's subsampling scale N / B and the guide's
        latent sites."""
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_w, subsample_scale, latents = 0.0, 1.0, []
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            # Every site is in the data plate (or _per_datapoint raises): one scale for all.
            subsample_scale = _subsample_scale(site, self.plate_name)
            log_w = log_w + self._per_datapoint(site, site["unscaled_log_prob"])
            if site["is_observed"]:
                continue
            guide_site = guide_trace.nodes[name]
            if not guide_site["fn"].has_rsample:
                raise ValueError(
                    f"guide site {name!r} ({type(guide_site['fn']).__name__}) has no rsample; "
                    f"the {self.name} objective needs reparameterized guide sites (the trace "
                    "ELBO takes score-function gradients)"
                )
            log_q = guide_site["unscaled_log_prob"]
            if self.stop_score:
                log_q = stop_score_log_prob(guide_site["fn"], guide_site["value"])
            log_w = log_w - self._per_datapoint(guide_site, log_q)
            latents.append(guide_site)
        if self.max_latent_sites is not None and len(latents) > self.max_latent_sites:
            raise ValueError(
                f"the {self.name} objective supports {self.max_latent_sites} latent site, got "
                f"{[site['name'] for site in latents]}; its path-derivative gradient assumes "
                "that no guide site depends on another (use iwae)"
            )
        return log_w, subsample_scale, latents

    def _per_datapoint(self, site: dict, log_prob: torch.Tensor) -> torch.Tensor:
        """A log-density of the site's batch shape as ``(K, N)``: its scale other than the
        subsampling one and its mask applied, the plates other than the data plate summed."""
        weight = site["scale"] / _subsample_scale(site, self.plate_name)
        size = next(
            (
                f.size
                for f in site["cond_indep_stack"]
                if f.name == self.plate_name and f.vectorized
            ),
            1,
        )
        num_dims = self.model_plate_nesting + 1
        reduce = per_datapoint_reducer(site, self.plate_name, num_dims, (self.num_particles, size))
        return reduce(scale_and_mask(log_prob, weight, site["mask"]))

    def _bound(self, log_w: torch.Tensor, latents: list) -> torch.Tensor:
        """The bound of each datapoint, shape ``(N,)``, from its K log-weights."""
        raise NotImplementedError

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Minus the bound summed over the data plate (times N / B for a subsampled plate).

        :returns: a scalar whose gradient is this objective's gradient estimate.
        """
        log_w, subsample_scale, latents = self._log_weights(model, guide, args, kwargs)
        return -subsample_scale * self._bound(log_w, latents).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The value of :meth:`differentiable_loss`, computed without a graph."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """:meth:`loss`, with the gradients of :meth:`differentiable_loss` accumulated."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


class STL_ELBO(PerDatapointELBO):
    """The ELBO with the "sticking the landing" gradient: the score term of log q removed.

    The bound of a datapoint is the K-draw ELBO ``mean_k log w_k``, with the value of
    :class:`~pyro.infer.Trace_ELBO`'s on the same draws. Its guide gradient keeps only the path
    derivative ``mean_k d log w_k / dz_k * dz_k / dphi``: the score ``E_q[grad log q] = 0`` is
    dropped, so the estimate stays unbiased and its variance vanishes when q is the exact
    posterior (then log w is constant in z). The model gradient is the ELBO's. With a KL
    weight beta the bound is the beta-weighted ELBO and the dropped score term is beta times
    a zero-mean term, so the gradient is unbiased for every beta.

    One latent site at most: for a guide whose sites depend on one another, the stop-score
    log-density of a later site would also cut the path through the earlier ones.

    References:

    [1] `Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        Inference`, Geoffrey Roeder, Yuhuai Wu, David Duvenaud (NeurIPS 2017).
    """

    name = "stl"
    stop_score = True
    max_latent_sites = 1

    def _bound(self, log_w: torch.Tensor, latents: list) -> torch.Tensor:
        return log_w.mean(0)


class IWAE_ELBO(PerDatapointELBO):
    """The importance-weighted bound of each datapoint, ``log (1/K) sum_k w_k``, summed.

    Every datapoint has its own K weights w_k = p(x, z_k) / q(z_k|x) (a ``(K, N)`` tensor), so
    the bound is the sum of per-datapoint IWAE bounds, as
    :func:`~pyro_vae.estimators.estimate_log_likelihood` computes them, never the joint bound
    of a batch. It increases with K, equals the ELBO at K = 1 (this class then gives
    :class:`~pyro.infer.Trace_ELBO`'s loss and gradients on the same draws) and log p(x) when
    q is the exact posterior. The gradient is the reparameterized one, ``sum_k w~_k grad log
    w_k`` with normalized weights w~.

    With a KL weight beta != 1 the weights are tempered, ``log w = log p(x|z) + beta (log p(z)
    - log q(z|x))``, the convention of Pyro's RenyiELBO and of the usual IWAE code; the bound
    is then no bound on log p(x), and K = 1 is the beta-weighted ELBO that warm-up trains.

    References:

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016).
    """

    name = "iwae"

    def _bound(self, log_w: torch.Tensor, latents: list) -> torch.Tensor:
        return log_w.logsumexp(0) - math.log(self.num_particles)


class DReG_ELBO(IWAE_ELBO):
    """The IWAE bound with doubly reparameterized gradients for the guide (DReG).

    The loss value is :class:`IWAE_ELBO`'s on the same draws, and so is the model gradient,
    ``sum_k w~_k grad_theta log p(x, z_k)``. The guide gradient applies the reparameterization
    trick to the score term of the IWAE gradient a second time, which gives the unbiased
    ``sum_k w~_k^2 d log w_k / dz_k * dz_k / dphi``: no score term, and zero variance when q is
    the exact posterior. It is computed with the stop-score log q of :func:`stop_score_log_prob`
    and a hook on the latent sample that multiplies the gradient reaching it by ``w~_k``.

    **KL weight.** With beta != 1 the weights are tempered as in :class:`IWAE_ELBO`, and the
    score term of the tempered bound is beta times that of log q, so the same derivation
    gives the per-draw weight ``(1 - beta) w~_k + beta w~_k^2``: the hook multiplies by
    ``1 - beta + beta w~_k``. Plain ``w~_k^2`` would be biased for every beta != 1; with this
    factor the guide gradient is unbiased for the gradient of :class:`IWAE_ELBO` at the same
    beta (``tests/test_objectives.py`` checks both). At K = 1 the factor is 1 and this is
    :class:`STL_ELBO`. Beta is the guide site's scale other than subsampling, per element
    (a masked element has no score term and factor 1).

    One latent site at most, as for :class:`STL_ELBO` (the hierarchical case needs further
    terms, Bauer and Mnih 2021).

    References:

    [1] `Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives`, George Tucker,
        Dieterich Lawson, Shixiang Gu, Chris J. Maddison (ICLR 2019).
    """

    name = "dreg"
    stop_score = True
    max_latent_sites = 1

    def _bound(self, log_w: torch.Tensor, latents: list) -> torch.Tensor:
        """The IWAE bound, after hooking :meth:`_path_factor` onto each latent sample."""
        normalized = torch.softmax(log_w.detach(), dim=0)
        for site in latents:
            if site["value"].requires_grad:
                factor = self._path_factor(normalized, site)
                site["value"].register_hook(lambda grad, factor=factor: grad * factor)
        return super()._bound(log_w, latents)

    def _path_factor(self, normalized: torch.Tensor, site: dict) -> torch.Tensor:
        """``1 - beta + beta w~`` in the layout of the site's value (batch dims, then event
        dims of size 1), from the ``(K, N)`` normalized weights."""
        num_dims = self.model_plate_nesting + 1
        layout = [1] * num_dims
        layout[0] = normalized.shape[0]
        for frame in site["cond_indep_stack"]:
            if frame.name == self.plate_name and frame.vectorized:
                layout[num_dims + frame.dim] = normalized.shape[1]
        weights = normalized.reshape(layout)
        beta = site["scale"] / _subsample_scale(site, self.plate_name)
        factor = 1 + scale_and_mask(weights - 1, beta, site["mask"])
        return factor.reshape(factor.shape + (1,) * site["fn"].event_dim)


def _subsample_scale(site: dict, plate_name: str) -> float:
    """N / B of the site's data plate; no other plate may subsample, since its scale would
    sit inside every weight."""
    scale = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size is None or frame.full_size == frame.size:
            continue
        if frame.name != plate_name:
            raise ValueError(
                f"site {site['name']!r} is in the subsampled pyro.plate({frame.name!r}); the "
                f"per-datapoint objectives subsample only the data plate {plate_name!r}"
            )
        scale = frame.full_size / frame.size
    return scale


#: ``trace``: the Monte Carlo ELBO, log p(x, z) - log q(z|x) at z ~ q(z|x).
#: ``meanfield``: E_q log p(x|z) - KL(q || p), with the KL in closed form where Pyro has one.
#: ``stl``: the ELBO with the path-derivative ("sticking the landing") guide gradient.
#: ``iwae``: the importance-weighted bound of each datapoint, summed.
#: ``dreg``: the IWAE bound with doubly reparameterized guide gradients.
ELBOS: dict[str, type[ELBO]] = {
    "dreg": DReG_ELBO,
    "iwae": IWAE_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "stl": STL_ELBO,
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


def is_importance_weighted(name: str) -> bool:
    """Whether the objective registered as ``name`` trains an importance-weighted bound (the
    IWAE bound of :class:`IWAE_ELBO`, also under :class:`DReG_ELBO`) rather than the ELBO.

    :raises ValueError: for an unknown name.

    >>> is_importance_weighted("dreg"), is_importance_weighted("stl")
    (True, False)
    """
    return issubclass(ELBOS[check_choice("ELBO", name, ELBOS)], IWAE_ELBO)
