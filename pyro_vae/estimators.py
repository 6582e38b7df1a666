"""Per-datapoint ELBO and importance-weighted log p(x) for any Pyro model/guide pair.

Pyro's ELBOs return one number for a whole batch. To evaluate a trained model we need one number
per datapoint, and a tighter bound on log p(x) than the ELBO. The estimators here are written the
Pyro way: run the guide under :func:`~pyro.poutine.trace`, replay the model against it and read
each site's log-density, all inside an outer ``pyro.plate("particles", K)`` so that the K draws
per datapoint are vectorized, exactly as ``Trace_ELBO(vectorize_particles=True)`` does.

**The model/guide contract.** The estimators work for any pair of Pyro functions ``model(x)`` and
``guide(x)`` such that

- ``x`` is a tensor of shape ``(N, ...)`` with one datapoint per row, and both functions accept
  any contiguous slice ``x[i:j]`` of it (the estimators split large inputs into batches);
- every sample site sits inside one vectorized ``pyro.plate(plate_name, N)`` over the rows of
  ``x`` (default name ``"data"``), so its per-datapoint log-density has batch shape ``(N,)``;
  feature dimensions are declared with ``.to_event()``, or with further plates nested inside the
  data plate, in which case pass ``max_plate_nesting`` (the number of plates, data plate
  included, 1 by default) and the estimators sum those plates out;
- the model's observed sites (``obs=...``) are the data, every other model sample site is a
  latent that the guide samples under the same name, and the guide has no other sample sites;
- the functions broadcast over one extra batch dimension on the left of all their plates: the
  estimators put ``pyro.plate("particles", K, dim=-(max_plate_nesting + 1))`` around both, so a
  latent has batch shape ``(K, N)`` and networks must accept inputs with leading dims
  ``(K, N)`` (``nn.Linear`` does).

The built-in :class:`~pyro_vae.vae.VAE` honours it with sites ``"z"`` and ``"x"``. When the model
or the guide fails inside a pass with a shape error of torch or Pyro, the estimators raise a
:class:`ValueError` that names this contract and the fix, with the original error as its cause.

**Options.** Every estimator takes the same keyword-only options, which :func:`estimate_elbo`,
:func:`estimate_log_likelihood` and :func:`sampled_kl_sites` pass on unchanged:

- ``plate_name`` (``"data"``): the name of the plate over datapoints;
- ``max_plate_nesting`` (1): the number of plates in the model and guide, data plate included;
- ``chunk_size`` and ``batch_size``: draws and datapoints per vectorized pass (see **Memory**);
- ``max_elements`` (by default :func:`default_max_elements` of ``x``'s device): the bound on
  ``chunk_size * batch_size * x[0].numel()``;
- ``differentiable`` (ELBO only, ``False``): keep the autograd graph instead of running under
  :func:`torch.no_grad`.

**Analytic KL.** With ``analytic_kl=True`` a latent site whose KL(q || p) has no closed form
registered with :func:`torch.distributions.kl_divergence` (a mixture prior, a flow guide) is
estimated by sampling, with an :class:`AnalyticKLWarning` that names it; filter it by that
category. :func:`sampled_kl_sites` answers the question beforehand: which sites are sampled.

**Scale is ignored, masks are honoured.** Pyro multiplies a site's log-density by
``site["scale"]``, which is how the VAE applies its KL weight (beta times the warm-up factor,
through :func:`~pyro.poutine.scale` on ``"z"``) and how a subsampled plate rescales a minibatch.
Neither belongs in an *estimate of the ELBO or of log p(x)*: a beta-weighted ELBO is not a bound
on log p(x), and these are per-datapoint numbers. The estimators therefore read each site's
unscaled log-density and always report the beta = 1 ELBO, whatever ``kl_scale`` the model was
trained with. Masks (``poutine.mask`` or ``Distribution.mask``) are applied: a masked-out term
contributes zero, as in Pyro's ELBOs.

**No side effects.** The estimators run under :func:`torch.no_grad` (the ELBO can opt out with
``differentiable=True``), never step an optimizer and never write to the param store
themselves: the model and guide register their parameters as usual, which leaves existing values
untouched (a ``pyro.param`` name not yet in the store is created, as a first SVI step would
create it). Put networks with dropout or batch norm in ``eval()`` mode first. Randomness
comes from the global torch RNG, so ``torch.manual_seed``/``pyro.set_rng_seed`` make results
reproducible. All tensors follow the device and dtype of ``x`` and of the model's parameters.

**Memory.** One vectorized pass evaluates ``chunk_size`` draws for ``batch_size`` datapoints.
Unless given, both are chosen so that ``chunk_size * batch_size * x[0].numel()`` stays below
``max_elements``, preferring many draws per pass, so that the guide (the encoder) runs once per
datapoint when possible. The peak memory of a pass is a model-dependent multiple of
``max_elements`` (``docs/estimators.md`` gives it for the MNIST VAE). The CPU default keeps a
pass's largest tensors within the caches: larger passes are slower there, not faster. Results
over chunks are combined with a running logsumexp (log p(x)) or running moments (ELBO), so
chunking changes only which random numbers are drawn, not what is estimated.

References:

[1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (ICLR 2014).

[2] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
    (ICLR 2016).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_site_shape
from torch.distributions import kl_divergence

from pyro_vae.checks import check_int
from pyro_vae.devices import fork_rng

#: Name of the plate that vectorizes draws; it must differ from the data plate's name.
PARTICLES_PLATE = "particles"

#: Default bound on ``chunk_size * batch_size * x[0].numel()`` for one vectorized pass on a
#: CPU: a float32 tensor of this many elements (8 MB) stays within a server CPU's caches.
DEFAULT_MAX_ELEMENTS = 2**21
#: The same on CUDA, where larger passes keep the GPU busy.
CUDA_MAX_ELEMENTS = 2**24


def default_max_elements(device: torch.device) -> int:
    """The default ``max_elements`` of the estimators for data on ``device``."""
    return CUDA_MAX_ELEMENTS if device.type == "cuda" else DEFAULT_MAX_ELEMENTS


PyroFunction = Callable[[torch.Tensor], object]


class AnalyticKLWarning(UserWarning):
    """An estimator was asked for the closed-form KL of a latent site that has none, and
    samples that site's KL instead (see :func:`sampled_kl_sites`)."""


@dataclass(frozen=True)
class ELBOTerms:
    """Per-datapoint ELBO and its two parts, from :func:`estimate_elbo_terms`.

    ``elbo == reconstruction - kl``, each of shape ``(N,)``.

    :ivar elbo: the ELBO estimate, averaged over particles.
    :ivar reconstruction: E_q log p(x|z), summed over the observed sites.
    :ivar kl: KL(q(z|x) || p(z)) summed over the latent sites: analytic where registered and
        requested, else the Monte Carlo average of log q(z|x) - log p(z).
    :ivar stderr: Monte Carlo standard error of ``elbo`` (the standard deviation of the
        per-particle ELBOs over ``sqrt(num_particles)``); NaN when ``num_particles == 1``.
    :ivar num_particles: draws per datapoint.
    :ivar analytic_sites: latent sites whose KL was computed in closed form.
    :ivar sampled_sites: latent sites whose KL was estimated by sampling.
    :ivar observed_sites: observed sites summed into ``reconstruction``.
    """

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    stderr: torch.Tensor
    num_particles: int
    analytic_sites: tuple[str, ...]
    sampled_sites: tuple[str, ...]
    observed_sites: tuple[str, ...]


def estimate_elbo(
    model: PyroFunction,
    guide: PyroFunction,
    x: torch.Tensor,
    analytic_kl: bool = False,
    num_particles: int = 1,
    **options: Any,
) -> torch.Tensor:
    """Estimate the ELBO of every datapoint: the ``elbo`` field of :func:`estimate_elbo_terms`.

    With ``analytic_kl=False`` this is the estimator of :class:`~pyro.infer.Trace_ELBO`, the
    average over ``num_particles`` draws z ~ q(z|x) of log p(x, z) - log q(z|x); with
    ``analytic_kl=True`` that of :class:`~pyro.infer.TraceMeanField_ELBO`, the average of
    log p(x|z) minus the closed-form KL(q(z|x) || p(z)). Both are unbiased for the same ELBO
    (with beta = 1, see the module notes on scale); the second usually has lower variance.

    :param options: the keyword-only options of :func:`estimate_elbo_terms` (module notes).
    :returns: the ELBO of each datapoint, shape ``(N,)``.

    References:

    [1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (ICLR 2014).

    >>> from pyro_vae import VAE
    >>> vae = VAE(data_dim=64, latent_dim=2, hidden_dims=(32,)).eval()
    >>> x = torch.bernoulli(torch.full((5, 64), 0.3))
    >>> estimate_elbo(vae.model, vae.guide, x, analytic_kl=True).shape
    torch.Size([5])
    """
    return estimate_elbo_terms(model, guide, x, analytic_kl, num_particles, **options).elbo


def estimate_elbo_terms(
    model: PyroFunction,
    guide: PyroFunction,
    x: torch.Tensor,
    analytic_kl: bool = False,
    num_particles: int = 1,
    *,
    plate_name: str = "data",
    max_plate_nesting: int = 1,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    max_elements: int | None = None,
    differentiable: bool = False,
) -> ELBOTerms:
    """Estimate the per-datapoint ELBO, split into reconstruction and KL terms.

    For each datapoint x, ``num_particles`` draws z_k ~ q(z|x) give
    ``reconstruction = mean_k log p(x|z_k)`` and, per latent site, either the closed-form
    KL(q || p) (``analytic_kl=True`` and :func:`torch.distributions.kl_divergence` knows the
    pair) or ``mean_k [log q(z_k|x) - log p(z_k)]``. A latent site with no registered KL (a
    mixture prior, a flow guide) falls back to sampling with an :class:`AnalyticKLWarning`
    naming it; :attr:`ELBOTerms.analytic_sites` and :attr:`ELBOTerms.sampled_sites` say which
    was used. As in :class:`~pyro.infer.TraceMeanField_ELBO`, the analytic KL assumes that no
    latent's prior depends on another latent drawn after it in the guide.

    The keyword-only options are described in the module notes.

    :param callable model: Pyro model ``model(x)``; see the module notes for the contract.
    :param callable guide: Pyro guide ``guide(x)``.
    :param torch.Tensor x: data, shape ``(N, ...)``.
    :param bool analytic_kl: use closed-form KL divergences where registered.
    :param int num_particles: draws z ~ q(z|x) per datapoint.
    :returns: the per-datapoint terms.
    :rtype: ELBOTerms

    References:

    [1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (ICLR 2014).
    """
    num_particles = check_int("num_particles", num_particles)
    plan = plan_passes(
        x, num_particles, plate_name, max_plate_nesting, chunk_size, batch_size, max_elements
    )
    missing_kl: dict[str, str] = {}
    reconstruction, kl, elbo, stderr = [], [], [], []
    grad_mode = contextlib.nullcontext() if differentiable else torch.no_grad()
    with grad_mode:
        for x_batch in x.split(plan.batch_size):
            moments = [RunningMoments() for _ in range(3)]
            for num in _chunks(num_particles, plan.chunk_size):
                log_lik, kl_chunk, sites = _trace_pass(
                    model, guide, x_batch, num, plan, analytic_kl
                )
                missing_kl.update(sites.missing_kl)
                for m, value in zip(moments, (log_lik, kl_chunk, log_lik - kl_chunk), strict=True):
                    m.update(value)
            reconstruction.append(moments[0].mean)
            kl.append(moments[1].mean)
            elbo.append(moments[2].mean)
            stderr.append(moments[2].stderr())
    _warn_sampled_kl(missing_kl)
    return ELBOTerms(
        elbo=torch.cat(elbo),
        reconstruction=torch.cat(reconstruction),
        kl=torch.cat(kl),
        stderr=torch.cat(stderr),
        num_particles=num_particles,
        analytic_sites=sites.analytic,
        sampled_sites=sites.sampled,
        observed_sites=sites.observed,
    )


def sampled_kl_sites(
    model: PyroFunction, guide: PyroFunction, x: torch.Tensor, **options: Any
) -> tuple[str, ...]:
    """The latent sites of ``model`` and ``guide`` whose KL(q(z|x) || p(z)) has no closed form:
    those that an analytic-KL estimate (``analytic_kl=True``, or Pyro's
    :class:`~pyro.infer.TraceMeanField_ELBO`, which falls back silently) samples instead.

    This is one pass of :func:`estimate_elbo_terms` with ``analytic_kl=True`` on the first
    datapoint of ``x`` with one draw, under :func:`torch.no_grad`, that leaves the global
    random state as it was and raises no :class:`AnalyticKLWarning`. The KL is evaluated rather
    than looked up, because some registered rules (Pyro's rule for two ``Independent``
    distributions) raise :class:`NotImplementedError` only once they see the base
    distributions. As with every estimator, a ``pyro.param`` not yet in the store is created.

    :param callable model: Pyro model ``model(x)``; see the module notes for the contract.
    :param callable guide: Pyro guide ``guide(x)``.
    :param torch.Tensor x: data, shape ``(N, ...)``; only ``x[:1]`` is used.
    :param options: the keyword-only options of the module notes (``plate_name`` and
        ``max_plate_nesting`` are the ones that matter here).
    :returns: the names of those sites, in the model's order; empty when every KL is analytic.

    >>> from pyro_vae import VAE
    >>> vae = VAE(data_dim=64, latent_dim=2, hidden_dims=(32,), prior="mixture")
    >>> sampled_kl_sites(vae.model, vae.guide, torch.zeros(1, 64))
    ('z',)
    """
    _check_data(x)
    with fork_rng(x.device), warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalyticKLWarning)
        terms = estimate_elbo_terms(model, guide, x[:1], analytic_kl=True, **options)
    return terms.sampled_sites


def estimate_log_likelihood(
    model: PyroFunction,
    guide: PyroFunction,
    x: torch.Tensor,
    num_samples: int = 5000,
    *,
    return_stderr: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Estimate log p(x) of every datapoint by importance sampling with the guide (IWAE).

    With draws z_1..z_K ~ q(z|x) and weights w_k = p(x, z_k) / q(z_k|x), the estimate is
    ``log (1/K) sum_k w_k``, computed in log space. Its expectation is the IWAE bound, a lower
    bound on log p(x) that increases with K and equals log p(x) when q(z|x) is the exact
    posterior (then every weight is p(x)). K = 1 gives a one-sample ELBO.

    The standard error uses the delta method: Var[log mean w] ~ Var(w) / (K mean(w)^2), which
    in terms of the normalized weights v_k = w_k / sum_j w_j is
    ``stderr^2 = (K sum_k v_k^2 - 1) / (K - 1)`` (``1 / sum_k v_k^2`` is the effective sample
    size), computed from running logsumexps of log w and 2 log w. It measures the spread of the
    estimate, not its bias below log p(x) (about ``stderr^2 / 2``), and it is itself unreliable
    when the weights are heavy-tailed (a poor guide): then it underestimates. It is NaN for
    K = 1.

    The draws are made ``chunk_size`` at a time for ``batch_size`` datapoints at a time (see
    the module notes on memory) and combined exactly with a running logsumexp.

    :param callable model: Pyro model ``model(x)``; see the module notes for the contract.
    :param callable guide: Pyro guide ``guide(x)``, the proposal.
    :param torch.Tensor x: data, shape ``(N, ...)``.
    :param int num_samples: importance samples K per datapoint.
    :param bool return_stderr: also return the delta-method standard error.
    :param options: the keyword-only options of the module notes.
    :returns: log p(x) estimates of shape ``(N,)``, or ``(estimate, stderr)`` if
        ``return_stderr``.

    References:

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016).

    >>> from pyro_vae import VAE
    >>> vae = VAE(data_dim=64, latent_dim=2, hidden_dims=(32,)).eval()
    >>> x = torch.bernoulli(torch.full((5, 64), 0.3))
    >>> log_px, stderr = estimate_log_likelihood(vae.model, vae.guide, x, 1000, return_stderr=True)
    >>> log_px.shape, stderr.shape
    (torch.Size([5]), torch.Size([5]))
    """
    num_samples = check_int("num_samples", num_samples)
    curve = estimate_log_likelihood_curve(
        model, guide, x, ks=(num_samples,), return_stderr=return_stderr, **options
    )
    return curve[num_samples]


def estimate_log_likelihood_curve(
    model: PyroFunction,
    guide: PyroFunction,
    x: torch.Tensor,
    ks: Sequence[int] = (1, 10, 100, 1000, 5000),
    *,
    return_stderr: bool = False,
    plate_name: str = "data",
    max_plate_nesting: int = 1,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    max_elements: int | None = None,
) -> dict[int, torch.Tensor] | dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Estimate log p(x) for several numbers of importance samples from one set of draws.

    ``max(ks)`` draws are made per datapoint, once; the estimate for K uses the first K of
    them, exactly as :func:`estimate_log_likelihood` with ``num_samples=K`` would. This costs
    no more than the largest K alone, which is how a report of the IWAE bound for
    K = 1, 10, ..., 5000 stays affordable: the cost is ``max(ks)`` model and guide evaluations
    per datapoint. The estimates for different K are correlated.

    The keyword-only options other than ``return_stderr`` are described in the module notes.

    :param callable model: Pyro model ``model(x)``; see the module notes for the contract.
    :param callable guide: Pyro guide ``guide(x)``, the proposal.
    :param torch.Tensor x: data, shape ``(N, ...)``.
    :param ks: the numbers of importance samples to report, positive integers.
    :param bool return_stderr: also return delta-method standard errors (see
        :func:`estimate_log_likelihood`).
    :returns: a dict mapping each K in ``ks`` (in increasing order) to the ``(N,)`` estimates,
        or to ``(estimate, stderr)`` pairs if ``return_stderr``.

    References:

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016).

    >>> from pyro_vae import VAE
    >>> vae = VAE(data_dim=64, latent_dim=2, hidden_dims=(32,)).eval()
    >>> x = torch.bernoulli(torch.full((5, 64), 0.3))
    >>> curve = estimate_log_likelihood_curve(vae.model, vae.guide, x, ks=(1, 10, 100))
    >>> sorted(curve), curve[100].shape
    ([1, 10, 100], torch.Size([5]))
    """
    ks = _check_ks(ks)
    plan = plan_passes(
        x, ks[-1], plate_name, max_plate_nesting, chunk_size, batch_size, max_elements
    )
    results: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in ks}
    with torch.no_grad():
        for x_batch in x.split(plan.batch_size):
            for k, result in _importance_batch(model, guide, x_batch, ks, plan).items():
                results[k].append(result)
    curve = {k: tuple(torch.cat(parts) for parts in zip(*results[k], strict=True)) for k in ks}
    if return_stderr:
        return curve
    return {k: estimate for k, (estimate, _) in curve.items()}


def _importance_batch(
    model: PyroFunction,
    guide: PyroFunction,
    x: torch.Tensor,
    ks: tuple[int, ...],
    plan: PassPlan,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The IWAE estimates and standard errors of one batch of rows for every K in ``ks``: the
    first K of ``max(ks)`` draws, made ``plan.chunk_size`` at a time."""
    accumulators = {k: RunningLogMeanExp() for k in ks}
    offset = 0
    for num in _chunks(ks[-1], plan.chunk_size):
        log_lik, kl, _ = _trace_pass(model, guide, x, num, plan, False)
        log_weights = log_lik - kl
        for k, acc in accumulators.items():
            if k > offset:
                acc.update(log_weights[: k - offset])
        offset += num
    return {k: acc.result() for k, acc in accumulators.items()}


@dataclass(frozen=True)
class PassPlan:
    """How the draws for ``x`` are split into vectorized passes, and the plates they run in
    (shared with :mod:`pyro_vae.ais`, whose draws are its chains)."""

    num_rows: int
    plate_name: str
    max_plate_nesting: int
    chunk_size: int
    batch_size: int


def plan_passes(
    x: torch.Tensor,
    num: int,
    plate_name: str,
    max_plate_nesting: int,
    chunk_size: int | None,
    batch_size: int | None,
    max_elements: int | None,
) -> PassPlan:
    """Check the options of an estimator and choose the passes for ``num`` draws per row
    (``chunk_size=num`` keeps all draws of a row in one pass)."""
    _check_data(x)
    if max_elements is None:
        max_elements = default_max_elements(x.device)
    check_int("max_elements", max_elements)
    check_int("max_plate_nesting", max_plate_nesting)
    if plate_name == PARTICLES_PLATE:
        raise ValueError(
            f"plate_name {PARTICLES_PLATE!r} is reserved for the draws; rename the data plate"
        )
    chunk_size, batch_size = _chunk_sizes(x, num, chunk_size, batch_size, max_elements)
    return PassPlan(x.shape[0], plate_name, max_plate_nesting, chunk_size, batch_size)


@dataclass
class _Sites:
    """Which sites a pass found, and which latents lacked a requested analytic KL."""

    observed: tuple[str, ...]
    analytic: tuple[str, ...]
    sampled: tuple[str, ...]
    missing_kl: dict[str, str]


def _trace_pass(
    model: PyroFunction,
    guide: PyroFunction,
    x: torch.Tensor,
    num_particles: int,
    plan: PassPlan,
    analytic_kl: bool,
) -> tuple[torch.Tensor, torch.Tensor, _Sites]:
    """One vectorized pass: trace the guide under the particles plate, replay the model.

    :returns: ``log p(x|z)`` summed over observed sites and the KL term summed over latent
        sites (analytic or log q - log p), both of shape ``(num_particles, N)``, and the sites.
    """
    model_trace, guide_trace = _traces(model, guide, x, num_particles, plan)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    check_sites(model_trace, guide_trace, plan.max_plate_nesting)

    shape = (num_particles, x.shape[0])
    log_lik = x.new_zeros(shape)
    kl = x.new_zeros(shape)
    sites = _Sites((), (), (), {})
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        to_shape = per_datapoint_reducer(site, plan.plate_name, plan.max_plate_nesting + 1, shape)
        if site["is_observed"]:
            log_lik = log_lik + to_shape(unscaled_log_prob(site))
            sites.observed += (name,)
            continue
        guide_site = guide_trace.nodes[name]
        kl_site = _analytic_kl(site, guide_site, log_lik) if analytic_kl else None
        if kl_site is not None:
            kl = kl + to_shape(kl_site)
            sites.analytic += (name,)
            continue
        if analytic_kl:
            p, q = type(site["fn"]).__name__, type(guide_site["fn"]).__name__
            sites.missing_kl[name] = f"q is {q}, p is {p}"
        kl = kl + to_shape(unscaled_log_prob(guide_site)) - to_shape(unscaled_log_prob(site))
        sites.sampled += (name,)
    return log_lik, kl, sites


def _traces(
    model: PyroFunction, guide: PyroFunction, x: torch.Tensor, num_particles: int, plan: PassPlan
) -> tuple[poutine.Trace, poutine.Trace]:
    """The model trace replayed against the guide trace, both under the particles plate."""
    dim = -(plan.max_plate_nesting + 1)
    particles = pyro.plate(PARTICLES_PLATE, num_particles, dim=dim)
    with contract_errors("guide(x)", x, num_particles, dim, plan):
        guide_trace = poutine.trace(particles(guide)).get_trace(x)
    particles = pyro.plate(PARTICLES_PLATE, num_particles, dim=dim)
    replayed = poutine.replay(particles(model), trace=guide_trace)
    with contract_errors("model(x), replayed on the guide's draws,", x, num_particles, dim, plan):
        model_trace = poutine.trace(replayed).get_trace(x)
    return model_trace, guide_trace


@contextlib.contextmanager
def contract_errors(
    role: str, x: torch.Tensor, num_particles: int, dim: int, plan: PassPlan
) -> Iterator[None]:
    """Re-raise a shape error of torch or Pyro inside the block as a :class:`ValueError` that
    names the model/guide contract; every other error passes unchanged."""
    try:
        yield
    except (RuntimeError, IndexError, ValueError) as error:
        if not _is_shape_error(error):
            raise
        first_line = next(iter(str(error).splitlines()), "")
        split = (
            f"; to keep all rows in one slice, pass batch_size={plan.num_rows}"
            if plan.batch_size < plan.num_rows
            else ""
        )
        raise ValueError(
            f"{role} failed on {x.shape[0]} rows of x inside pyro.plate({PARTICLES_PLATE!r}, "
            f"{num_particles}, dim={dim}) ({type(error).__name__}: {first_line}). The estimators "
            "need a model and guide that take any slice x[i:j] of the rows (size plates and "
            "tensors from x.shape[0]) and broadcast over the particles dimension left of all "
            "their plates (networks must take inputs with leading dims (K, N), as nn.Linear "
            "does: broadcast or expand batch dims, never view or reshape them); see the "
            f"contract in pyro_vae.estimators{split}"
        ) from error


def _is_shape_error(error: Exception) -> bool:
    """Whether an error raised inside the model or guide is a shape (or device, or dtype)
    error of torch or Pyro, which the contract explains; not one raised by this package, nor
    a user's own :class:`ValueError` (both say what is wrong already), nor running out of
    memory."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    package = module.partition(".")[0]
    if package == "pyro_vae":
        return False
    if isinstance(error, ValueError):
        return package == "pyro"
    # Exactly these classes: NotImplementedError, RecursionError and torch.OutOfMemoryError
    # derive from RuntimeError but are not shape errors.
    return type(error) in (RuntimeError, IndexError)


def _analytic_kl(site: dict, guide_site: dict, like: torch.Tensor) -> torch.Tensor | None:
    """The closed-form KL(q || p) of one latent site, masked like the guide site (its scale is
    ignored), or ``None`` when :func:`~torch.distributions.kl_divergence` has no rule."""
    try:
        kl = kl_divergence(guide_site["fn"], site["fn"])
    except NotImplementedError:
        return None
    kl = scale_and_mask(kl, 1.0, guide_site["mask"])
    return kl if torch.is_tensor(kl) else like.new_tensor(kl)


def _warn_sampled_kl(missing_kl: dict[str, str]) -> None:
    for name, reason in missing_kl.items():
        warnings.warn(
            f"no analytic KL for latent site {name!r} ({reason}); "
            "using the Monte Carlo estimate log q(z|x) - log p(z) for it",
            AnalyticKLWarning,
            stacklevel=3,
        )


def unscaled_log_prob(site: dict) -> torch.Tensor:
    """The site's log-density with its mask applied but not its scale (see the module notes)."""
    return scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])


def per_datapoint_reducer(
    site: dict, plate_name: str, num_dims: int, shape: tuple[int, int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function taking a tensor of the site's batch shape to ``(num_particles, N)``.

    The particles plate is the leftmost of ``num_dims`` batch dims; every other plate except
    the data plate is summed out. Shared with :mod:`pyro_vae.objectives`.

    :param dict site: a sample site of a trace.
    :param str plate_name: the name of the data plate.
    :param int num_dims: the batch dims of the site's values, particles plate included.
    :param tuple shape: ``(num_particles, N)``.
    :raises ValueError: naming the site when it is outside the data plate or has more batch
        dims than its plates.
    """
    data_dim = data_plate_dim(site, plate_name)

    def reduce(value: torch.Tensor) -> torch.Tensor:
        if value.dim() > num_dims:
            raise ValueError(
                f"site {site['name']!r} has batch shape {tuple(value.shape)}, more dims than "
                f"its plates; declare feature dims with .to_event() or raise max_plate_nesting"
            )
        value = value.reshape((1,) * (num_dims - value.dim()) + value.shape)
        others = [d for d in range(-num_dims + 1, 0) if d != data_dim]
        if others:
            value = value.sum(others, keepdim=True)
        return value.reshape(value.shape[0], value.shape[data_dim]).expand(shape)

    return reduce


def data_plate_dim(site: dict, plate_name: str) -> int:
    """The dim (negative, counted from the right of the batch shape) of the site's data plate.

    :raises ValueError: naming the site when it is outside a vectorized plate of that name.
    """
    for frame in site["cond_indep_stack"]:
        if frame.name == plate_name and frame.vectorized:
            return frame.dim
    raise ValueError(
        f"sample site {site['name']!r} is not inside a vectorized pyro.plate({plate_name!r}); "
        "put every sample site under one plate over datapoints, or pass its name as plate_name"
    )


def check_sites(
    model_trace: poutine.Trace, guide_trace: poutine.Trace, max_plate_nesting: int
) -> None:
    """Every model latent is sampled by the guide, and the guide samples nothing else.

    :raises ValueError: naming the sites that break it.
    """
    model_latents = {
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    guide_latents = {name for name, site in guide_trace.nodes.items() if site["type"] == "sample"}
    unguided = sorted(model_latents - guide_latents)
    if unguided:
        raise ValueError(
            f"model latent site {unguided[0]!r} is not sampled by the guide; sample it in the "
            "guide or observe it in the model"
        )
    auxiliary = sorted(guide_latents - model_latents)
    if auxiliary:
        raise ValueError(
            f"guide site {auxiliary[0]!r} has no latent site of that name in the model; the "
            "estimators do not support auxiliary guide variables"
        )
    if is_validation_enabled():
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, max_plate_nesting + 1)


def _check_data(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, ...), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one number of samples, got an empty sequence")
    return tuple(sorted({check_int("every K in ks", k) for k in ks}))


def _chunk_sizes(
    x: torch.Tensor,
    num: int,
    chunk_size: int | None,
    batch_size: int | None,
    max_elements: int,
) -> tuple[int, int]:
    """Draws and datapoints per pass: ``chunk * batch * x[0].numel() <= max_elements``, with as
    many draws per pass as fit, so the guide runs as rarely as possible (at least one of each).
    """
    per_draw = x[0].numel() if x.dim() > 1 else 1
    if chunk_size is None:
        chunk_size = max(1, min(num, max_elements // (per_draw * (batch_size or 1))))
    chunk_size = check_int("chunk_size", chunk_size)
    if batch_size is None:
        batch_size = max(1, min(x.shape[0], max_elements // (per_draw * min(chunk_size, num))))
    batch_size = check_int("batch_size", batch_size)
    return min(chunk_size, num), batch_size


def _chunks(total: int, size: int) -> Iterator[int]:
    for start in range(0, total, size):
        yield min(size, total - start)


class RunningMoments:
    """Mean and variance over dim 0 of the chunks it is fed (Chan et al.'s pairwise update).

    >>> moments = RunningMoments()
    >>> for chunk in torch.arange(6.0).split(4):
    ...     moments.update(chunk)
    >>> moments.count, moments.mean.item(), moments.variance().item()
    (6, 2.5, 3.5)
    """

    def __init__(self):
        self.count = 0
        self.mean: torch.Tensor | float = 0.0
        self.m2: torch.Tensor | float = 0.0

    def update(self, values: torch.Tensor) -> None:
        """Add the rows of ``values`` (shape ``(n, ...)``, n >= 1) to the statistics."""
        n = values.shape[0]
        mean = values.mean(0)
        m2 = ((values - mean) ** 2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        """The unbiased sample variance; NaN from a single value."""
        if self.count < 2:
            return torch.full_like(self.mean, math.nan)
        return self.m2 / (self.count - 1)

    def stderr(self) -> torch.Tensor:
        """Standard error of the mean; NaN from a single value."""
        return (self.variance() / self.count).sqrt()


class RunningLogMeanExp:
    """``log mean exp`` over dim 0 of the chunks it is fed, and its delta-method stderr (see
    :func:`estimate_log_likelihood`)."""

    def __init__(self):
        self.count = 0
        self.log_sum: torch.Tensor | float = -math.inf
        self.log_sum_sq: torch.Tensor | float = -math.inf

    def update(self, log_weights: torch.Tensor) -> None:
        self.count += log_weights.shape[0]
        self.log_sum = torch.logaddexp(
            torch.as_tensor(self.log_sum, dtype=log_weights.dtype, device=log_weights.device),
            log_weights.logsumexp(0),
        )
        self.log_sum_sq = torch.logaddexp(
            torch.as_tensor(self.log_sum_sq, dtype=log_weights.dtype, device=log_weights.device),
            (2 * log_weights).logsumexp(0),
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.count
        estimate = self.log_sum - math.log(k)
        if k < 2:
            return estimate, torch.full_like(estimate, math.nan)
        # K * sum(v^2) with normalized weights v; it lies in [1, K] up to rounding.
        k_sum_sq = k * torch.exp(self.log_sum_sq - 2 * self.log_sum)
        variance = ((k_sum_sq - 1) / (k - 1)).clamp(min=0)
        return estimate, variance.sqrt()
