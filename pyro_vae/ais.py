"""Annealed importance sampling (AIS) with HMC, and bidirectional Monte Carlo (BDMC), for any
Pyro model/guide pair with continuous latents.

AIS estimates log p(x) by moving C chains per datapoint through a sequence of distributions
from an initial density pi_0 (the guide q(z|x), or the prior p(z)) to the posterior, along the
geometric path ``log f_b(z) = log pi_0(z) + b * l(z)`` with ``l(z) = log p(x, z) - log pi_0(z)``
and 0 = b_0 <= b_1 <= ... <= b_T = 1 (the schedule). Each chain accumulates
``log w = sum_t (b_t - b_{t-1}) l(z_{t-1})`` and then moves by an HMC transition that leaves
f_{b_t} invariant. E[w] = p(x), so ``log mean_c w_c`` is a stochastic lower bound on log p(x)
(Jensen's inequality; by Markov's, it exceeds log p(x) by more than b nats with probability at
most e^-b) whose gap closes as T grows. With one step (T = 1) and the guide it is importance
sampling with K = C (the IWAE estimate); with the exact posterior as pi_0, l is the constant
log p(x) and every weight is exact.

BDMC (:func:`bidirectional_monte_carlo`) runs the same chain in reverse on data simulated from
the model (:func:`simulate_data`), starting from the latent that generated each datapoint, an
exact posterior sample: there ``-log mean_c w_rev`` is a stochastic *upper* bound. The gap
between the two bounds bounds the error of AIS with the same settings on data like it.

**Contract.** The model and guide follow the contract of :mod:`pyro_vae.estimators` (one data
plate, the chains as ``pyro.plate("particles", C)`` left of it, scale ignored, masks honoured,
no side effects besides drawing from the global torch RNG, the dtype and device of ``x``, and
memory bounded by splitting the datapoints into batches of ``max_elements / (C * x[0].numel())``
rows), with two additions: every latent site must be continuous (a discrete one is refused
naming it), and the model must be differentiable in its latents. A latent with a constrained
support (a Gamma, a Dirichlet) moves in unconstrained space through
:func:`~torch.distributions.biject_to` of its support, with the log-determinant of that map in
the density. The guide is needed only with ``initial="guide"``; with a guide of one sample site
its distribution is computed once per batch (it cannot depend on other latents), otherwise the
guide runs at every gradient evaluation. Put networks in ``eval()`` mode first: batch norm in
training mode would couple the chains.

**HMC.** Each transition draws a momentum v ~ N(0, I) per coordinate, makes
``num_leapfrog_steps`` leapfrog steps of size eps and accepts or rejects the end point per
(chain, datapoint) with the Metropolis-Hastings test on ``H = -log f_b(z) + |v|^2 / 2`` (a NaN
is a rejection; leapfrog runs with Pyro's validation off, as Pyro's own HMC does, since a
diverging trajectory may step outside the parameters' supports). eps is one number per
datapoint, shared by its chains: after each transition it is multiplied by
:data:`STEP_SIZE_FACTOR` when an exponential moving average of the datapoint's acceptance rate
(weight :data:`ACCEPTANCE_SMOOTHING` on the past) exceeds ``target_accept_prob``, and divided by
it otherwise, within :data:`STEP_SIZE_RANGE`. Adapting from the chains' own history makes the
kernels depend slightly on the past, which AIS's unbiasedness argument does not cover; the
effect shrinks with the number of chains (``adapt_step_size=False`` with a fixed ``step_size``
avoids it). Each leapfrog step costs one evaluation of the model (and of the guide, unless it
is cached) and its gradient with respect to the latents; a transition caches the densities and
gradients at its end, so T transitions cost ``(T - 1) * num_leapfrog_steps + 1`` evaluations for
C chains of each datapoint. The log-weights are accumulated in float64.

References:

[1] `Annealed importance sampling`, Radford M. Neal (Statistics and Computing, 2001).

[2] `Sandwiching the marginal likelihood using bidirectional Monte Carlo`, Roger B. Grosse,
    Zoubin Ghahramani, Ryan P. Adams (arXiv:1511.02543, 2015): the sigmoid schedule and BDMC.

[3] `On the Quantitative Analysis of Decoder-Based Generative Models`, Yuhuai Wu, Yuri Burda,
    Ruslan Salakhutdinov, Roger Grosse (ICLR 2017): AIS with HMC for decoders, from the prior
    or from the encoder, and the step-size rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to, constraints

from pyro_vae.checks import check_choice, check_int, check_positive
from pyro_vae.estimators import (
    PARTICLES_PLATE,
    PassPlan,
    PyroFunction,
    RunningLogMeanExp,
    check_sites,
    contract_errors,
    data_plate_dim,
    per_datapoint_reducer,
    plan_passes,
    unscaled_log_prob,
)

#: Where the chains start: the guide q(z|x) or the prior p(z).
INITIALS = ("guide", "prior")

#: The step size is multiplied or divided by this after each transition.
STEP_SIZE_FACTOR = 1.02
#: The smallest and largest step sizes the adaptation reaches.
STEP_SIZE_RANGE = (1e-4, 0.5)
#: Weight of the past in the moving average of the acceptance rate.
ACCEPTANCE_SMOOTHING = 0.9

ProgressHook = Callable[[int, int], None]

# torch >= 2.6 wraps a MixtureSameFamily's support in this (which biject_to does not know).
_MIXTURE_CONSTRAINT = getattr(constraints, "MixtureSameFamilyConstraint", ())


def sigmoid_schedule(num_steps: int, rad: float = 4.0) -> torch.Tensor:
    """The sigmoid schedule of Grosse et al. (2015): ``num_steps + 1`` inverse temperatures from
    0 to 1, dense near both ends, ``b_t = (s(r (2t/T - 1)) - s(-r)) / (s(r) - s(-r))`` with s the
    logistic function and r = ``rad``.

    >>> sigmoid_schedule(4)
    tensor([0.0000, 0.1050, 0.5000, 0.8950, 1.0000], dtype=torch.float64)
    """
    check_int("num_steps", num_steps)
    s = torch.linspace(-rad, rad, num_steps + 1, dtype=torch.float64).sigmoid()
    return (s - s[0]) / (s[-1] - s[0])


def linear_schedule(num_steps: int) -> torch.Tensor:
    """``num_steps + 1`` evenly spaced inverse temperatures from 0 to 1."""
    check_int("num_steps", num_steps)
    return torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)


#: Schedules by name: functions of the number of transitions T returning T + 1 values.
SCHEDULES = {"linear": linear_schedule, "sigmoid": sigmoid_schedule}


@dataclass(frozen=True)
class AISResult:
    """The per-datapoint result of :func:`annealed_importance_sampling`.

    :ivar log_likelihood: the estimate of log p(x), shape ``(N,)``, in the dtype of ``x``: a
        stochastic lower bound, or for a reverse run a stochastic upper bound.
    :ivar stderr: its delta-method Monte Carlo standard error over the chains (as for
        :func:`~pyro_vae.estimators.estimate_log_likelihood`); NaN for one chain.
    :ivar log_weights: the log-weight of every chain, shape ``(C, N)``, float64 (for a reverse
        run, the log of the reverse weights w_rev, whose mean estimates 1 / p(x)).
    :ivar acceptance_rate: the fraction of HMC proposals accepted, per datapoint (NaN for
        T = 1, which makes no transition).
    :ivar step_size: the final leapfrog step size of each datapoint.
    :ivar num_steps: transitions T.
    :ivar num_chains: chains C per datapoint.
    :ivar initial: ``"guide"`` or ``"prior"``.
    :ivar reverse: whether the chains ran from the posterior back to the initial distribution.
    """

    log_likelihood: torch.Tensor
    stderr: torch.Tensor
    log_weights: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    num_steps: int
    num_chains: int
    initial: str
    reverse: bool = False


@dataclass(frozen=True)
class BDMCResult:
    """Forward and reverse AIS on the same (simulated) data, from
    :func:`bidirectional_monte_carlo`.

    :ivar lower: forward AIS: its ``log_likelihood`` is a stochastic lower bound.
    :ivar upper: reverse AIS from the exact posterior samples: a stochastic upper bound.
    """

    lower: AISResult
    upper: AISResult

    @property
    def gap(self) -> torch.Tensor:
        """``upper - lower`` per datapoint: on average, a bound on the error of either."""
        return self.upper.log_likelihood - self.lower.log_likelihood


def estimate_log_likelihood_ais(
    model: PyroFunction,
    guide: PyroFunction | None,
    x: torch.Tensor,
    num_steps: int = 1000,
    num_chains: int = 16,
    *,
    initial: str = "guide",
    return_stderr: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Estimate log p(x) of every datapoint by annealed importance sampling with HMC.

    This is the ``log_likelihood`` (and ``stderr``) of :func:`annealed_importance_sampling`,
    on the contract of the other estimators (see the module notes). The estimate is a
    stochastic lower bound on log p(x) that tightens as ``num_steps`` grows; the standard
    error measures its spread over the chains, not its bias.

    :param callable model: Pyro model ``model(x)``.
    :param callable guide: Pyro guide ``guide(x)``; may be ``None`` with ``initial="prior"``.
    :param torch.Tensor x: data, shape ``(N, ...)``.
    :param int num_steps: transitions T (intermediate distributions).
    :param int num_chains: chains C per datapoint.
    :param str initial: ``"guide"`` to start from q(z|x), ``"prior"`` from p(z).
    :param bool return_stderr: also return the standard errors.
    :param options: the keyword-only options of :func:`annealed_importance_sampling`.
    :returns: estimates of shape ``(N,)``, or ``(estimate, stderr)`` if ``return_stderr``.

    References:

    [1] `On the Quantitative Analysis of Decoder-Based Generative Models`, Yuhuai Wu, Yuri
        Burda, Ruslan Salakhutdinov, Roger Grosse (ICLR 2017).

    >>> from pyro_vae import VAE
    >>> vae = VAE(data_dim=64, latent_dim=2, hidden_dims=(32,)).eval()
    >>> x = torch.bernoulli(torch.full((5, 64), 0.3))
    >>> estimate_log_likelihood_ais(vae.model, vae.guide, x, num_steps=10, num_chains=4).shape
    torch.Size([5])
    """
    result = annealed_importance_sampling(
        model, guide, x, num_steps, num_chains, initial=initial, **options
    )
    if return_stderr:
        return result.log_likelihood, result.stderr
    return result.log_likelihood


def annealed_importance_sampling(
    model: PyroFunction,
    guide: PyroFunction | None,
    x: torch.Tensor,
    num_steps: int = 1000,
    num_chains: int = 16,
    *,
    initial: str = "guide",
    schedule: str | Sequence[float] | torch.Tensor = "sigmoid",
    num_leapfrog_steps: int = 5,
    step_size: float | torch.Tensor = 0.05,
    adapt_step_size: bool = True,
    target_accept_prob: float = 0.65,
    posterior_latents: dict[str, torch.Tensor] | None = None,
    plate_name: str = "data",
    max_plate_nesting: int = 1,
    batch_size: int | None = None,
    max_elements: int | None = None,
    on_step: ProgressHook | None = None,
) -> AISResult:
    """Run AIS with HMC transitions for every datapoint (see the module notes).

    :param callable model: Pyro model ``model(x)``.
    :param callable guide: Pyro guide ``guide(x)``; may be ``None`` with ``initial="prior"``.
    :param torch.Tensor x: data, shape ``(N, ...)``.
    :param int num_steps: transitions T; the schedule has T + 1 inverse temperatures.
    :param int num_chains: chains C per datapoint.
    :param str initial: ``"guide"`` (pi_0 = q(z|x)) or ``"prior"`` (pi_0 = p(z)).
    :param schedule: a key of :data:`SCHEDULES`, or the T + 1 inverse temperatures themselves
        (non-decreasing from 0 to 1).
    :param int num_leapfrog_steps: leapfrog steps L per HMC transition.
    :param step_size: the initial leapfrog step size: a number, or one per datapoint (shape
        ``(N,)``).
    :param bool adapt_step_size: adapt each datapoint's step size toward
        ``target_accept_prob``; with ``False`` it stays ``step_size``.
    :param float target_accept_prob: the acceptance rate the adaptation aims at, in (0, 1).
    :param dict posterior_latents: run in *reverse* from these exact posterior samples (one per
        datapoint, by latent site name, shaped as the model samples them without the chains
        plate, e.g. from :func:`simulate_data`), annealing from p(x, z) back to pi_0; the
        result's ``log_likelihood`` is then the stochastic upper bound ``-log mean_c w_rev``.
    :param str plate_name: the name of the data plate.
    :param int max_plate_nesting: plates in the model and guide, data plate included.
    :param int batch_size: datapoints per pass (default: as many as ``max_elements`` allows).
    :param int max_elements: bound on ``num_chains * batch_size * x[0].numel()``.
    :param on_step: called as ``on_step(done, total)`` after each transition of each batch.
    :returns: the estimates and diagnostics.
    :rtype: AISResult
    """
    num_chains = check_int("num_chains", num_chains)
    plan = plan_passes(
        x, num_chains, plate_name, max_plate_nesting, num_chains, batch_size, max_elements
    )
    initial = check_choice("initial", initial, INITIALS)
    if guide is None and initial == "guide":
        raise ValueError("initial='guide' needs a guide; pass one or use initial='prior'")
    betas = _schedule(schedule, check_int("num_steps", num_steps), x)
    if posterior_latents is not None:
        betas = betas.flip(0)
    check_int("num_leapfrog_steps", num_leapfrog_steps)
    if not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob!r}")
    step_sizes = _step_sizes(step_size, x)
    parts = []
    with torch.no_grad():
        for x_batch, rows, hook in _batches(x, plan, len(betas) - 1, on_step):
            latents = None
            if posterior_latents is not None:
                latents = {k: v[rows] for k, v in posterior_latents.items()}
            target, point = _start(model, guide, x_batch, plan, initial, latents)
            chains = _Chains(target, num_leapfrog_steps, adapt_step_size, target_accept_prob)
            parts.append(chains.anneal(point, betas, step_sizes[rows], hook))
    log_weights, acceptance, final_steps = (torch.cat(p, -1) for p in zip(*parts, strict=True))
    estimate, stderr = _log_mean_exp(log_weights)
    reverse = posterior_latents is not None
    return AISResult(
        log_likelihood=(-estimate if reverse else estimate).to(x.dtype),
        stderr=stderr.to(x.dtype),
        log_weights=log_weights,
        acceptance_rate=acceptance,
        step_size=final_steps,
        num_steps=num_steps,
        num_chains=plan.chunk_size,
        initial=initial,
        reverse=reverse,
    )


def simulate_data(
    model: PyroFunction,
    x_like: torch.Tensor,
    *,
    plate_name: str = "data",
    max_plate_nesting: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw data from the model, with the latents that generated it: for BDMC.

    The model runs with its observations ignored (:func:`~pyro.poutine.uncondition`), so every
    site is sampled from its distribution: each latent from its prior, the data from p(x|z).
    Each latent is then an exact sample of the posterior p(z | x_sim) of its datapoint.

    :param callable model: Pyro model ``model(x)`` with exactly one observed site, whose value
        has the shape of ``x_like``.
    :param torch.Tensor x_like: data of the shape (and dtype) to simulate; its values are not
        used (the model runs on it only to take the number of rows and the shapes).
    :returns: ``(x_sim, latents)``: the simulated data, shaped like ``x_like``, and the latent
        values by site name.
    :raises ValueError: when the model does not have exactly one observed site of that shape.
    """
    plan = plan_passes(x_like, 1, plate_name, max_plate_nesting, 1, None, None)
    with torch.no_grad(), contract_errors("model(x)", x_like, 1, -max_plate_nesting - 1, plan):
        trace = poutine.trace(poutine.uncondition(model)).get_trace(x_like)
    trace = prune_subsample_sites(trace)
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    observed = [site for site in sites if site["infer"].get("was_observed")]
    shapes = {site["name"]: tuple(site["value"].shape) for site in observed}
    if len(observed) != 1 or shapes[observed[0]["name"]] != tuple(x_like.shape):
        raise ValueError(
            f"simulate_data needs a model with one observed site of the shape of x_like, "
            f"{tuple(x_like.shape)}; its observed sites have shapes {shapes}"
        )
    name = observed[0]["name"]
    return trace.nodes[name]["value"], {s["name"]: s["value"] for s in sites if s["name"] != name}


def bidirectional_monte_carlo(
    model: PyroFunction,
    guide: PyroFunction | None,
    x: torch.Tensor,
    latents: dict[str, torch.Tensor],
    num_steps: int = 1000,
    num_chains: int = 16,
    *,
    initial: str = "guide",
    **options: Any,
) -> BDMCResult:
    """Sandwich log p(x) between forward and reverse AIS, on data simulated from the model.

    On ``x, latents = simulate_data(model, x_like)``, forward AIS gives a stochastic lower
    bound on log p(x) and reverse AIS, started from ``latents`` (exact posterior samples), a
    stochastic upper bound; both use the same settings. Their mean gap over datapoints bounds
    the mean error of forward AIS with these settings on such data, and on real data only
    insofar as it resembles the simulated data. Single datapoints can cross (both bounds are
    stochastic): read the means over many datapoints.

    :param callable model: Pyro model ``model(x)``.
    :param callable guide: Pyro guide ``guide(x)``; may be ``None`` with ``initial="prior"``.
    :param torch.Tensor x: data simulated from the model.
    :param dict latents: the latents that generated ``x``, by site name.
    :param int num_steps: transitions T of each direction.
    :param int num_chains: chains C per datapoint in each direction.
    :param str initial: ``"guide"`` or ``"prior"``: the initial distribution pi_0.
    :param options: the other keyword-only options of :func:`annealed_importance_sampling`.
    :returns: both runs.
    :rtype: BDMCResult

    References:

    [1] `Sandwiching the marginal likelihood using bidirectional Monte Carlo`, Roger B.
        Grosse, Zoubin Ghahramani, Ryan P. Adams (arXiv:1511.02543, 2015).

    >>> from pyro_vae import VAE
    >>> vae = VAE(data_dim=64, latent_dim=2, hidden_dims=(32,)).eval()
    >>> x, latents = simulate_data(vae.model, torch.zeros(5, 64))
    >>> bdmc = bidirectional_monte_carlo(vae.model, vae.guide, x, latents, 10, 4)
    >>> bdmc.gap.shape
    torch.Size([5])
    """
    run = annealed_importance_sampling
    lower = run(model, guide, x, num_steps, num_chains, initial=initial, **options)
    upper = run(
        model,
        guide,
        x,
        num_steps,
        num_chains,
        initial=initial,
        posterior_latents=latents,
        **options,
    )
    return BDMCResult(lower, upper)


def _batches(x: torch.Tensor, plan: PassPlan, num_steps: int, on_step: ProgressHook | None):
    """``(x_batch, rows, hook)`` for each batch of rows, where ``hook(t)`` reports transition t
    of the batch to ``on_step`` as a count over all batches."""
    starts = range(0, x.shape[0], plan.batch_size)
    total = len(starts) * num_steps
    for i, start in enumerate(starts):
        rows = slice(start, start + plan.batch_size)

        def hook(t: int, done: int = i * num_steps) -> None:
            if on_step is not None:
                on_step(done + t, total)

        yield x[rows], rows, hook


def _schedule(schedule: str | Sequence[float] | torch.Tensor, num_steps: int, x: torch.Tensor):
    """The T + 1 inverse temperatures, float64 on the device of ``x``."""
    if isinstance(schedule, str):
        betas = SCHEDULES[check_choice("schedule", schedule, SCHEDULES)](num_steps)
    else:
        betas = torch.as_tensor(schedule, dtype=torch.float64).detach().cpu()
        if betas.shape != (num_steps + 1,):
            raise ValueError(
                f"schedule must hold num_steps + 1 = {num_steps + 1} inverse temperatures, got "
                f"shape {tuple(betas.shape)}"
            )
        if not (betas[0] == 0 and betas[-1] == 1 and (betas.diff() >= 0).all()):
            raise ValueError(
                "schedule must rise from 0 to 1 without decreasing, got values from "
                f"{betas[0].item():g} to {betas[-1].item():g} (smallest step "
                f"{betas.diff().min().item():g})"
            )
    return betas.to(x.device)


def _step_sizes(step_size: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One initial step size per datapoint, in the dtype and on the device of ``x``."""
    if not isinstance(step_size, torch.Tensor):
        step_size = check_positive("step_size", step_size)
        return torch.full((x.shape[0],), step_size, dtype=x.dtype, device=x.device)
    if step_size.shape != (x.shape[0],) or not (step_size.isfinite() & (step_size > 0)).all():
        raise ValueError(
            f"step_size must be a positive number or a tensor of {x.shape[0]} positive numbers "
            f"(one per datapoint), got a tensor of shape {tuple(step_size.shape)}"
        )
    return step_size.detach().to(dtype=x.dtype, device=x.device)


def _log_mean_exp(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log mean_c exp`` over the chains (dim 0) and its delta-method standard error."""
    accumulator = RunningLogMeanExp()
    accumulator.update(log_weights)
    return accumulator.result()


def _start(
    model: PyroFunction,
    guide: PyroFunction | None,
    x: torch.Tensor,
    plan: PassPlan,
    initial: str,
    latents: dict[str, torch.Tensor] | None,
) -> tuple[_Target, _Point]:
    """Trace one batch under the chains plate: check the sites, and place the chains at their
    initial values (draws of pi_0, or the given posterior latents). The guide draws first and
    the model is replayed on them, so that with T = 1 the draws are those of the IWAE
    estimator."""
    chains = _chains_plate(plan)
    role, traced, guide_trace = "model(x)", chains(model), None
    if initial == "guide":
        with contract_errors("guide(x)", x, chains.size, chains.dim, plan):
            guide_trace = prune_subsample_sites(poutine.trace(chains(guide)).get_trace(x))
        role, traced = (
            "model(x), replayed on the guide's draws,",
            poutine.replay(traced, guide_trace),
        )
    with contract_errors(role, x, chains.size, chains.dim, plan):
        model_trace = prune_subsample_sites(poutine.trace(traced).get_trace(x))
    sites = {
        name: site
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    if not sites:
        raise ValueError("the model has no latent sample sites; AIS needs at least one")
    _check_continuous(sites.values())
    guide_site = None
    if guide_trace is not None:
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        check_sites(model_trace, guide_trace, plan.max_plate_nesting)
        guide_sites = [site for site in guide_trace.nodes.values() if site["type"] == "sample"]
        # One site: its distribution depends on x alone, so it need not be recomputed.
        guide_site = guide_sites[0] if len(guide_sites) == 1 else None
    values = {name: site["value"] for name, site in sites.items()}
    if latents is not None:
        if set(latents) != set(sites):
            raise ValueError(
                f"posterior_latents must hold the model's latent sites {sorted(sites)}, got "
                f"{sorted(latents)}"
            )
        values = {name: latents[name].expand(sites[name]["fn"].shape()) for name in sites}
    target = _Target(model, guide, x, plan, sites, initial, guide_site)
    return target, target.evaluate(target.unconstrained(values))


def _check_continuous(sites) -> None:
    for site in sites:
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"latent site {site['name']!r} is discrete ({type(site['fn']).__name__}); AIS "
                "moves the latents by HMC and needs continuous ones: sum the site out of the "
                "model, or estimate log p(x) with estimate_log_likelihood"
            )


@dataclass(frozen=True)
class _Point:
    """The chains of one batch at unconstrained latents ``u``: ``a = log pi_0(z) + J`` and
    ``b = log p(x, z) + J`` of shape ``(C, n)`` (J the log-Jacobian of z(u)) and their
    gradients in ``u``, so that ``log f_beta = (1 - beta) a + beta b``."""

    u: dict[str, torch.Tensor]
    a: torch.Tensor
    b: torch.Tensor
    grad_a: dict[str, torch.Tensor]
    grad_b: dict[str, torch.Tensor]

    def log_density(self, beta: float) -> torch.Tensor:
        return (1 - beta) * self.a + beta * self.b

    def grad(self, beta: float) -> dict[str, torch.Tensor]:
        return {k: (1 - beta) * self.grad_a[k] + beta * self.grad_b[k] for k in self.u}


class _Target:
    """The densities of one batch as functions of the unconstrained latents, per (chain,
    datapoint); knows where each site's chain and data dims are."""

    def __init__(self, model, guide, x, plan, sites, initial, guide_site):
        self.model, self.guide, self.x, self.plan = model, guide, x, plan
        self.initial, self.guide_site = initial, guide_site
        self.shape = (_chains_plate(plan).size, x.shape[0])
        self.transforms = {name: _bijection(site["fn"].support) for name, site in sites.items()}
        num_dims = plan.max_plate_nesting + 1
        self.axes = {
            name: num_dims + data_plate_dim(site, plan.plate_name) for name, site in sites.items()
        }

    def unconstrained(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.inv(values[name]) for name, t in self.transforms.items()}

    def evaluate(self, u: dict[str, torch.Tensor]) -> _Point:
        """The densities at ``u`` and their gradients (one pass of the model, and of the guide
        unless its distribution is cached)."""
        with torch.enable_grad():
            u = {name: value.detach().requires_grad_() for name, value in u.items()}
            z = {name: t(u[name]) for name, t in self.transforms.items()}
            log_det = sum(
                self.per_chain(t.log_abs_det_jacobian(u[name], z[name]), name)
                for name, t in self.transforms.items()
            )
            log_prior, log_joint = self._log_model(z)
            log_initial = log_prior if self.initial == "prior" else self._log_guide(z)
            a, b = log_initial + log_det, log_joint + log_det
            inputs = list(u.values())
            grad_a = torch.autograd.grad(a.sum(), inputs, retain_graph=True, allow_unused=True)
            grad_b = torch.autograd.grad(b.sum(), inputs, allow_unused=True)
        grads = [
            {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(u.items(), gs)}
            for gs in (grad_a, grad_b)
        ]
        detached = {name: value.detach() for name, value in u.items()}
        return _Point(detached, a.detach(), b.detach(), *grads)

    def _log_model(self, z: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(z) and log p(x, z), unscaled, per (chain, datapoint)."""
        conditioned = poutine.condition(_chains_plate(self.plan)(self.model), data=z)
        trace = prune_subsample_sites(poutine.trace(conditioned).get_trace(self.x))
        trace.compute_log_prob()
        log_prior = log_joint = 0
        for name, site in trace.nodes.items():
            if site["type"] == "sample":
                value = self._reduce(site, unscaled_log_prob(site))
                log_joint = log_joint + value
                log_prior = log_prior + value if name in z else log_prior
        return log_prior, log_joint

    def _log_guide(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """log q(z|x), unscaled, per (chain, datapoint)."""
        site = self.guide_site
        if site is not None:
            log_q = scale_and_mask(site["fn"].log_prob(z[site["name"]]), 1.0, site["mask"])
            return self._reduce(site, log_q)
        conditioned = poutine.condition(_chains_plate(self.plan)(self.guide), data=z)
        trace = prune_subsample_sites(poutine.trace(conditioned).get_trace(self.x))
        trace.compute_log_prob()
        sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
        return sum(self._reduce(site, unscaled_log_prob(site)) for site in sites)

    def _reduce(self, site: dict, value: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        return per_datapoint_reducer(site, plan.plate_name, plan.max_plate_nesting + 1, self.shape)(
            value
        )

    def per_chain(self, value: torch.Tensor, name: str) -> torch.Tensor:
        """A tensor of site ``name``'s (batch or unconstrained) shape summed to ``(C, n)``."""
        return value.movedim(self.axes[name], 1).reshape(*self.shape, -1).sum(-1)

    def along(self, value: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
        """``(C, n)`` or ``(n,)`` values viewed to broadcast against ``like``, a tensor of site
        ``name``'s unconstrained shape."""
        shape = [1] * like.dim()
        shape[self.axes[name]] = self.shape[1]
        if value.dim() == 2:
            shape[0] = self.shape[0]
        return value.reshape(shape)

    def kinetic(self, v: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.per_chain(value.pow(2), name) for name, value in v.items()) / 2

    def where(self, accept: torch.Tensor, new: _Point, old: _Point) -> _Point:
        """``new`` for the (chain, datapoint) pairs where ``accept``, else ``old``."""

        def pick(news: dict, olds: dict) -> dict:
            return {k: torch.where(self.along(accept, news[k], k), news[k], olds[k]) for k in news}

        return _Point(
            pick(new.u, old.u),
            torch.where(accept, new.a, old.a),
            torch.where(accept, new.b, old.b),
            pick(new.grad_a, old.grad_a),
            pick(new.grad_b, old.grad_b),
        )


def _bijection(support: constraints.Constraint) -> torch.distributions.Transform:
    """The map from unconstrained space onto ``support``: :func:`biject_to`, looking through the
    wrapper torch puts around a mixture's component support."""
    while isinstance(support, _MIXTURE_CONSTRAINT):
        support = support.base_constraint
    return biject_to(support)


def _chains_plate(plan: PassPlan) -> pyro.plate:
    """The plate of the chains, left of all the model's plates (``plan.chunk_size`` chains)."""
    return pyro.plate(PARTICLES_PLATE, plan.chunk_size, dim=-(plan.max_plate_nesting + 1))


class _Chains:
    """HMC transitions and the annealing loop for the chains of one batch."""

    def __init__(self, target: _Target, num_leapfrog_steps: int, adapt: bool, accept_prob: float):
        self.target = target
        self.num_leapfrog_steps = num_leapfrog_steps
        self.adapt = adapt
        self.accept_prob = accept_prob

    def anneal(
        self,
        point: _Point,
        betas: torch.Tensor,
        step_size: torch.Tensor,
        on_step: Callable[[int], None],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Move the chains through ``betas`` from ``point``.

        :returns: the log-weights ``(C, n)`` (float64), the acceptance rate and the final step
            size of each datapoint.
        """
        log_weights = torch.zeros(point.a.shape, dtype=torch.float64, device=point.a.device)
        accepted = torch.zeros_like(step_size)
        average = torch.full_like(step_size, self.accept_prob)
        num_steps = len(betas) - 1
        with pyro.validation_enabled(False):
            for t in range(1, num_steps + 1):
                log_weights += (betas[t] - betas[t - 1]) * (point.b - point.a).double()
                if t < num_steps:  # the last move would never change a weight
                    point, accept = self.transition(point, betas[t].item(), step_size)
                    rate = accept.to(step_size.dtype).mean(0)
                    accepted += rate
                    average = ACCEPTANCE_SMOOTHING * average + (1 - ACCEPTANCE_SMOOTHING) * rate
                    if self.adapt:
                        factor = torch.where(
                            average > self.accept_prob, STEP_SIZE_FACTOR, 1 / STEP_SIZE_FACTOR
                        )
                        step_size = (step_size * factor).clamp(*STEP_SIZE_RANGE)
                on_step(t)
        acceptance = accepted / (num_steps - 1) if num_steps > 1 else accepted.fill_(math.nan)
        return log_weights, acceptance, step_size

    def transition(
        self, point: _Point, beta: float, step_size: torch.Tensor
    ) -> tuple[_Point, torch.Tensor]:
        """One HMC transition leaving f_beta invariant: leapfrog, then accept or reject each
        (chain, datapoint).

        :returns: the new point and the ``(C, n)`` acceptances.
        """
        target = self.target
        eps = {k: target.along(step_size, u, k) for k, u in point.u.items()}
        v = {k: torch.randn_like(u) for k, u in point.u.items()}
        energy = target.kinetic(v) - point.log_density(beta)
        new, grad = point, point.grad(beta)
        v = {k: v[k] + eps[k] / 2 * grad[k] for k in v}
        for step in range(self.num_leapfrog_steps):
            new = target.evaluate({k: new.u[k] + eps[k] * v[k] for k in v})
            grad = new.grad(beta)
            half = step == self.num_leapfrog_steps - 1
            v = {k: v[k] + (eps[k] / 2 if half else eps[k]) * grad[k] for k in v}
        new_energy = target.kinetic(v) - new.log_density(beta)
        # A NaN energy (a diverging trajectory) compares False: a rejection.
        accept = torch.rand_like(energy).log() < energy - new_energy
        return target.where(accept, new, point), accept
