"""Evaluate a trained run: ELBO (Monte Carlo and analytic KL), log p(x), bits/dim, active units.

:func:`evaluate_vae` does the work on a data tensor; :func:`evaluate_run` reads the run folder,
loads the split its config describes and adds what was evaluated. Both return an
:class:`Evaluation`, whose :meth:`~Evaluation.as_dict` is plain JSON (``pyro-vae evaluate``
writes it to ``evaluation.json``, see :mod:`pyro_vae.report`).

**Which data.** The test split of binarized data is binarized once with a fixed seed by
:func:`~pyro_vae.data.load_dataset`. The training split of a dynamically binarized run holds grey
levels; :func:`~pyro_vae.data.select_split` binarizes it once with another fixed seed, so every
evaluation of it sees the same binary images.

**Cost.** Everything is dominated by the importance-weighted log p(x): ``num_samples`` decoder
passes per datapoint, drawn once for all the reported K (see
:func:`~pyro_vae.estimators.estimate_log_likelihood_curve`). The estimators run with Pyro's
validation off, for speed. Memory stays near the estimators' per-pass budget whatever the
number of datapoints, because they chunk draws and datapoints. With ``ais``, annealed
importance sampling (:mod:`pyro_vae.ais`) costs about ``2 * num_chains * num_steps *
num_leapfrog_steps`` decoder passes per datapoint for each reported T, and BDMC twice that per
simulated datapoint; it then dominates.

References:

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
    (ICLR 2016): the log p(x) estimator and the active-units statistic (appendix).

[2] `On the Quantitative Analysis of Decoder-Based Generative Models`, Yuhuai Wu, Yuri Burda,
    Ruslan Salakhutdinov, Roger Grosse (ICLR 2017): AIS and BDMC to evaluate a decoder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from pyro_vae.ais import (
    AISResult,
    annealed_importance_sampling,
    bidirectional_monte_carlo,
    simulate_data,
)
from pyro_vae.checks import check_choice, check_int
from pyro_vae.config import model_summary
from pyro_vae.data import SPLITS, Dataset, resolve_binarize, select_split
from pyro_vae.devices import fork_rng, resolve_device
from pyro_vae.estimators import (
    AnalyticKLWarning,
    ELBOTerms,
    estimate_elbo_terms,
    estimate_log_likelihood_curve,
)
from pyro_vae.runs import Run, load_run, load_run_dataset
from pyro_vae.vae import VAE

#: The numbers of importance samples always reported (those not above ``num_samples``).
DEFAULT_KS = (1, 10, 100, 1000)

#: The AIS settings of an evaluation: transitions T (one row each), chains C per datapoint,
#: leapfrog steps per transition and simulated datapoints of the BDMC gap.
AIS_STEPS = (100, 500)
AIS_CHAINS = 8
AIS_LEAPFROG_STEPS = 5
BDMC_POINTS = 100

#: ``on_step(phase, done, total)``: progress of a long evaluation, for a progress bar.
ProgressHook = Callable[[str, int, int], None]

#: A latent dimension is active when the variance over the data of E_q[z_d] exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01

#: mallopt's parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3

#: The fields of an :class:`Evaluation` that say what was evaluated (set by evaluate_run).
RUN_FIELDS = ("run_dir", "dataset", "split", "binarize", "model")


@dataclass(frozen=True)
class Evaluation:
    """The results of :func:`evaluate_vae` (every number per datapoint, in nats) and, from
    :func:`evaluate_run`, what was evaluated.

    The fields are described in :func:`evaluate_vae`; the nested ones are plain dicts and lists
    of JSON values. :meth:`as_dict` gives the whole result as ``evaluation.json`` holds it.

    :ivar run_dir: the run folder (``None`` from :func:`evaluate_vae`).
    :ivar dataset: its data set.
    :ivar split: ``"test"`` or ``"train"``.
    :ivar binarize: the binarization of the data.
    :ivar model: :func:`~pyro_vae.config.model_summary` of its config and ``epochs`` trained.
    """

    num_datapoints: int
    data_dim: int
    seed: int
    num_samples: int
    elbo: dict
    analytic_kl_available: bool
    reconstruction: float
    kl: float
    log_likelihood: list[dict]
    bits_per_dim: float
    bits_per_dim_k: int
    active_units: dict
    note: str | None
    seconds: dict
    peak_memory_mb: float
    ais: dict | None = None
    run_dir: str | None = None
    dataset: str | None = None
    split: str | None = None
    binarize: str | None = None
    model: dict | None = None

    def as_dict(self) -> dict:
        """The result as plain JSON values: what was evaluated first (when known), then the
        numbers."""
        values = dataclasses.asdict(self)
        run = {name: values.pop(name) for name in RUN_FIELDS}
        return values if self.run_dir is None else {**run, **values}


def evaluate_run(
    run: Run | str | Path,
    x: torch.Tensor | Dataset | None = None,
    num_samples: int = 5000,
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    limit: int | None = None,
    num_elbo_particles: int = 10,
    checkpoint: str | None = None,
    ais: dict | None = None,
    on_step: ProgressHook | None = None,
) -> Evaluation:
    """Evaluate a trained run on one split of its data set (see :func:`evaluate_vae`).

    :param run: a :class:`~pyro_vae.runs.Run` or the path of a run folder.
    :param x: the data to evaluate: a ``(N, data_dim)`` tensor (used as it is), a
        :class:`~pyro_vae.data.Dataset` (its ``split`` is taken), or ``None`` to load the run's
        data set as its config says (see :func:`~pyro_vae.runs.load_run_dataset`).
    :param int num_samples: importance samples K per datapoint for log p(x).
    :param str split: ``"test"`` or ``"train"``.
    :param data_dir: overrides the run's ``data_dir`` when loading the data.
    :param device: where to evaluate; default the run's device (``"cpu"`` for a path).
    :param int seed: seed of the random draws; the same seed gives the same numbers.
    :param int limit: evaluate only the first ``limit`` datapoints.
    :param int num_elbo_particles: draws per datapoint of each ELBO estimator.
    :param str checkpoint: for a run folder, the checkpoint to evaluate, as for
        :func:`~pyro_vae.runs.load_run`: ``"best"``, ``"last"`` or ``None``, the best when the
        run has one (``best.pt``), else the last.
    :param dict ais: also estimate log p(x) by AIS: the options of :func:`evaluate_ais` (``{}``
        for its defaults); ``None`` skips it.
    :param on_step: progress of AIS, as ``on_step(phase, done, total)``.
    :returns: the :class:`Evaluation`, with the run's path, data set, split, binarization and
        model description (with the epoch and file of the checkpoint evaluated).

    >>> result = evaluate_run("runs/mnist", num_samples=5000)  # doctest: +SKIP
    >>> print(format_evaluation(result))  # doctest: +SKIP
    """
    check_choice("split", split, SPLITS)
    if limit is not None:
        check_int("limit", limit)
    run = as_run(run, device, checkpoint)
    parameter = next(run.vae.parameters())
    if x is None:
        x = load_run_dataset(run.config, data_dir, likelihood=run.vae.likelihood)
    if isinstance(x, Dataset):
        x = select_split(x, split)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, a Dataset or None, got {type(x).__name__}")
    x = x[:limit].to(device=parameter.device, dtype=parameter.dtype)
    options = {"seed": seed, "num_elbo_particles": num_elbo_particles, "ais": ais}
    result = evaluate_vae(run.vae, x, num_samples, **options, on_step=on_step)
    return dataclasses.replace(
        result,
        run_dir=str(run.path),
        dataset=run.config.dataset,
        split=split,
        binarize=resolve_binarize(run.config.binarize, run.vae.likelihood),
        model={
            **model_summary(run.config),
            "epochs": run.checkpoint.get("epoch"),
            "checkpoint": run.checkpoint_file,
        },
    )


def as_run(
    run: Run | str | Path, device: str | torch.device | None = None, checkpoint: str | None = None
) -> Run:
    """``run`` itself (moved to ``device`` if given) or the run loaded from that folder, from
    its ``checkpoint`` (see :func:`~pyro_vae.runs.load_run`).

    Loading builds the model, whose initialisation draws from the global torch RNG; the RNG is
    restored afterwards, so evaluating never shifts the random numbers of the caller.
    """
    if isinstance(run, Run):
        if device is not None:
            run.vae.to(resolve_device(device))
        return run
    with fork_rng():
        return load_run(run, device=resolve_device(device or "cpu"), checkpoint=checkpoint)


def evaluate_vae(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int = 5000,
    *,
    seed: int = 0,
    num_elbo_particles: int = 10,
    ks: Sequence[int] = DEFAULT_KS,
    active_threshold: float = ACTIVE_UNIT_THRESHOLD,
    ais: dict | None = None,
    on_step: ProgressHook | None = None,
) -> Evaluation:
    """Evaluate a VAE on the datapoints ``x``; every number is per datapoint, in nats.

    - ``elbo``: the Monte Carlo estimator (log p(x, z) - log q(z|x)) and the analytic-KL
      estimator (log p(x|z) - KL(q || p)), each with ``num_elbo_particles`` draws per datapoint
      and at KL weight 1: ``mean``, ``stderr`` (standard deviation over datapoints over
      sqrt(N)), ``mc_stderr`` (the Monte Carlo part of that: root mean square of the
      per-datapoint Monte Carlo standard errors over sqrt(N)), ``reconstruction``, ``kl`` and
      the sites whose KL was analytic or sampled; ``difference`` is the paired mean and stderr
      of (Monte Carlo - analytic), which estimate the same number. Without a closed-form KL
      the analytic estimator samples the KL; ``analytic_kl_available`` is then false and
      ``note`` says so.
    - ``reconstruction`` and ``kl``: E_q log p(x|z) and KL(q || p) from the analytic-KL
      estimator, whose KL is exact where a closed form exists.
    - ``log_likelihood``: one row per K in ``ks`` not above ``num_samples``, and
      ``num_samples``, all from one set of ``num_samples`` importance samples: ``mean``,
      ``stderr`` (over datapoints), ``mc_stderr_mean`` (mean of the per-datapoint
      delta-method Monte Carlo standard errors) and ``mc_stderr`` (their root mean square over
      sqrt(N), the Monte Carlo standard error of ``mean``); ``None`` where undefined (K = 1).
    - ``bits_per_dim``: -log p(x) / (D ln 2) at the largest K; for a likelihood of continuous
      data log p(x) is a density and ``note`` says so.
    - ``active_units``: ``count`` of latent dimensions d with Var_x(E_q[z_d | x]) above
      ``threshold`` and the per-dimension ``variances``. For a guide without a closed-form mean
      (a flow), E_q[z_d | x] is the mean of ``num_mean_samples`` draws and the variance is
      corrected for their Monte Carlo noise (``posterior_mean`` says which).
    - ``ais`` (with ``ais``, else ``None``): log p(x) by annealed importance sampling, its
      paired difference to the IWAE estimate at ``num_samples`` and the BDMC gap on simulated
      data, as :func:`evaluate_ais` describes.
    - ``seconds`` (total and per part) and ``peak_memory_mb`` (the process's peak resident
      memory so far, from :func:`resource.getrusage`).

    :param VAE vae: the trained model; its parameters are not changed.
    :param torch.Tensor x: data of shape ``(N, data_dim)`` on the model's device.
    :param int num_samples: importance samples K per datapoint for log p(x).
    :param int seed: seed of the random draws (the global torch RNG is restored afterwards).
    :param int num_elbo_particles: draws per datapoint of each ELBO estimator.
    :param ks: further numbers of importance samples to report.
    :param float active_threshold: variance threshold of an active unit.
    :param dict ais: the options of :func:`evaluate_ais` (``{}`` for its defaults), or ``None``
        to skip AIS.
    :param on_step: progress of AIS, as ``on_step(phase, done, total)``.
    :returns: the :class:`Evaluation` (without what was evaluated: that is
        :func:`evaluate_run`'s).

    References:

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016).
    """
    check_int("num_samples", num_samples)
    check_int("num_elbo_particles", num_elbo_particles)
    vae.check_input(x)
    ks = sorted({k for k in ks if k <= num_samples} | {num_samples})
    times = [time.perf_counter()]
    # The estimators ignore the KL weight (vae.kl_scale): these are beta = 1 numbers.
    with fork_rng(x.device), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        elbos = _evaluate_elbos(vae, x, num_elbo_particles)
        times.append(time.perf_counter())
        curve = estimate_log_likelihood_curve(vae.model, vae.guide, x, ks, return_stderr=True)
        times.append(time.perf_counter())
        active = active_units(vae, x, active_threshold)
        times.append(time.perf_counter())
        if ais is not None:
            iwae = (num_samples, curve[num_samples][0])
            ais = evaluate_ais(vae, x, **ais, iwae=iwae, on_step=on_step)
            times.append(time.perf_counter())
    parts = ("elbo", "log_likelihood", "active_units", "ais")
    seconds = {part: end - begin for part, begin, end in zip(parts, times, times[1:])}
    seconds["total"] = times[-1] - times[0]
    log_likelihood = [{"k": k, **_estimate_summary(*curve[k])} for k in ks]
    best = log_likelihood[-1]
    data_dim = x[0].numel()
    notes = [elbos.pop("note")] if "note" in elbos else []
    if not vae.likelihood.support.is_discrete:
        notes.append(
            f"likelihood {vae.likelihood.name!r} is a density on continuous data, so log p(x) "
            "and bits/dim are not comparable with those of discrete (binarized) data"
        )
    return Evaluation(
        num_datapoints=x.shape[0],
        data_dim=data_dim,
        seed=seed,
        num_samples=num_samples,
        **elbos,
        log_likelihood=log_likelihood,
        bits_per_dim=-best["mean"] / (data_dim * math.log(2)),
        bits_per_dim_k=best["k"],
        active_units=active,
        note=" ".join(notes) or None,
        seconds=seconds,
        peak_memory_mb=peak_memory_mb(),
        ais=ais,
    )


def _evaluate_elbos(vae: VAE, x: torch.Tensor, num_particles: int) -> dict:
    """Both ELBO estimators and their paired difference, as :func:`evaluate_vae` reports."""
    mc = estimate_elbo_terms(vae.model, vae.guide, x, False, num_particles)
    with warnings.catch_warnings():
        # Reported in the result instead, with the analytic and sampled sites.
        warnings.simplefilter("ignore", AnalyticKLWarning)
        analytic = estimate_elbo_terms(vae.model, vae.guide, x, True, num_particles)
    result = {
        "elbo": {
            "num_particles": num_particles,
            "monte_carlo": _elbo_summary(mc),
            "analytic_kl": _elbo_summary(analytic),
            "difference": {
                "mean": (mc.elbo - analytic.elbo).mean().item(),
                "stderr": stderr_of_mean(mc.elbo - analytic.elbo),
            },
        },
        "analytic_kl_available": not analytic.sampled_sites,
        "reconstruction": analytic.reconstruction.mean().item(),
        "kl": analytic.kl.mean().item(),
    }
    if analytic.sampled_sites:
        result["note"] = no_analytic_kl_note(vae, analytic.sampled_sites)
    return result


def no_analytic_kl_note(vae: VAE, sites: Sequence[str]) -> str:
    """The plain statement that some KL terms of a VAE have no closed form, for reports.

    :param VAE vae: the model.
    :param sites: the latent sites whose KL is sampled (see
        :func:`~pyro_vae.estimators.sampled_kl_sites`).
    """
    return (
        f"no analytic KL for latent site(s) {list(sites)}: KL(q(z|x) || p(z)) has no closed "
        f"form for prior {type(vae.prior).__name__} and guide {type(vae.guide_family).__name__}, "
        "so the analytic-KL estimator (TraceMeanField_ELBO) samples it there "
        "(log q - log p at the drawn z), like the Monte Carlo estimator: any difference "
        "between the two is sampling noise."
    )


def _elbo_summary(terms: ELBOTerms) -> dict:
    return {
        "mean": terms.elbo.mean().item(),
        "stderr": stderr_of_mean(terms.elbo),
        "mc_stderr": finite_or_none(terms.stderr.pow(2).mean().sqrt() / math.sqrt(len(terms.elbo))),
        "reconstruction": terms.reconstruction.mean().item(),
        "kl": terms.kl.mean().item(),
        "analytic_sites": list(terms.analytic_sites),
        "sampled_sites": list(terms.sampled_sites),
    }


def _estimate_summary(estimate: torch.Tensor, stderr: torch.Tensor) -> dict:
    """Mean and spread over datapoints of per-datapoint log p(x) estimates and their Monte
    Carlo standard errors (see :func:`evaluate_vae`)."""
    return {
        "mean": estimate.mean().item(),
        "stderr": stderr_of_mean(estimate),
        "mc_stderr_mean": finite_or_none(stderr.mean()),
        "mc_stderr": finite_or_none(stderr.pow(2).mean().sqrt() / math.sqrt(len(stderr))),
    }


def evaluate_ais(
    vae: VAE,
    x: torch.Tensor,
    num_steps: Sequence[int] = AIS_STEPS,
    num_chains: int = AIS_CHAINS,
    *,
    initial: str = "guide",
    num_leapfrog_steps: int = AIS_LEAPFROG_STEPS,
    bdmc_points: int = BDMC_POINTS,
    iwae: tuple[int, torch.Tensor] | None = None,
    on_step: ProgressHook | None = None,
) -> dict:
    """log p(x) of a VAE by annealed importance sampling for each T in ``num_steps``, and the
    BDMC gap of the same settings on data simulated from the model.

    Each row has the ``num_steps`` T, the estimate's ``mean``, ``stderr``, ``mc_stderr_mean``
    and ``mc_stderr`` (as the IWAE rows of :func:`evaluate_vae`), the mean
    ``acceptance_rate`` and final ``step_size`` of HMC, ``seconds``, with ``iwae`` the paired
    ``minus_iwae`` difference (AIS - IWAE: positive where AIS is the tighter lower bound), and
    with ``bdmc_points`` the ``bdmc`` sandwich on that many datapoints simulated from the model
    (once, for all rows): the mean ``lower`` and ``upper`` bounds and their ``gap`` (mean and
    stderr over the simulated datapoints).

    :param VAE vae: the model.
    :param torch.Tensor x: data of shape ``(N, data_dim)``.
    :param num_steps: the numbers of AIS transitions to report.
    :param int num_chains: chains per datapoint.
    :param str initial: ``"guide"`` or ``"prior"``, where the chains start.
    :param int num_leapfrog_steps: leapfrog steps per HMC transition.
    :param int bdmc_points: simulated datapoints for BDMC (at most N); 0 skips it.
    :param iwae: ``(K, estimates)``: the IWAE estimates of ``x`` to compare with.
    :param on_step: progress, as ``on_step(phase, done, total)``.
    :returns: the settings and one row per T, as plain JSON values.
    """
    steps = sorted({check_int("every T in num_steps", t) for t in num_steps})
    bdmc_points = min(check_int("bdmc_points", bdmc_points, minimum=0), x.shape[0])
    options = {"initial": initial, "num_leapfrog_steps": num_leapfrog_steps}
    simulated = simulate_data(vae.model, x[:bdmc_points]) if bdmc_points else None
    rows = []
    for t in steps:
        hook = _phase_hook(on_step, f"AIS T={t}")
        start = time.perf_counter()
        result = annealed_importance_sampling(
            vae.model, vae.guide, x, t, num_chains, **options, on_step=hook
        )
        row = {"num_steps": t, **_ais_summary(result), "seconds": time.perf_counter() - start}
        if iwae is not None:
            difference = result.log_likelihood - iwae[1]
            row["minus_iwae"] = {"k": iwae[0], "mean": difference.mean().item()}
            row["minus_iwae"]["stderr"] = stderr_of_mean(difference)
        if simulated is not None:
            hook, start = _phase_hook(on_step, f"BDMC T={t}"), time.perf_counter()
            bdmc = bidirectional_monte_carlo(
                vae.model, vae.guide, *simulated, t, num_chains, **options, on_step=hook
            )
            row["bdmc"] = {
                "num_points": bdmc_points,
                "lower": bdmc.lower.log_likelihood.mean().item(),
                "upper": bdmc.upper.log_likelihood.mean().item(),
                "gap": bdmc.gap.mean().item(),
                "gap_stderr": stderr_of_mean(bdmc.gap),
                "seconds": time.perf_counter() - start,
            }
        rows.append(row)
    return {"num_chains": num_chains, **options, "schedule": "sigmoid", "rows": rows}


def _ais_summary(result: AISResult) -> dict:
    return {
        **_estimate_summary(result.log_likelihood, result.stderr),
        "acceptance_rate": finite_or_none(result.acceptance_rate.mean()),
        "step_size": result.step_size.mean().item(),
    }


def _phase_hook(on_step: ProgressHook | None, phase: str):
    """``on_step`` as the ``(done, total)`` hook of one phase of the evaluation."""
    if on_step is None:
        return None
    return lambda done, total: on_step(phase, done, total)


@torch.no_grad()
def active_units(
    vae: VAE,
    x: torch.Tensor,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    num_mean_samples: int = 1000,
    batch_size: int = 1000,
) -> dict:
    """Count the latent dimensions the model uses (Burda et al. 2016, appendix).

    A dimension d is active when Var_x(E_q[z_d | x]) > ``threshold``: its posterior mean moves
    with the data. Where q(z|x) has no closed-form mean (a flow), E_q[z | x] is estimated by the
    mean of ``num_mean_samples`` draws; the variance over the data of such a mean is inflated by
    E_x[Var_q(z_d | x)] / ``num_mean_samples``, which is subtracted (at 1000 draws an unused
    dimension with Var_q = 1 would otherwise show 0.001).

    :param VAE vae: the model.
    :param torch.Tensor x: data of shape ``(N, data_dim)``.
    :param float threshold: variance threshold of an active unit.
    :param int num_mean_samples: draws per datapoint when the mean is not in closed form.
    :param int batch_size: datapoints per encoder pass.
    :returns: ``count``, ``threshold``, per-dimension ``variances`` and ``posterior_mean``
        (``"closed form"`` or ``"mean of N draws"``).

    References:

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016), appendix.
    """
    means, noise = [], []
    closed_form = _has_mean(vae.encode(x[:1]))
    if not closed_form:
        # Bounds the draws per pass (num_mean_samples * batch_size) to about 2**17.
        batch_size = max(1, min(batch_size, 2**17 // num_mean_samples))
    for batch in x.split(batch_size):
        q = vae.encode(batch)
        if closed_form:
            means.append(q.mean)
        else:
            draws = q.sample((num_mean_samples,))
            means.append(draws.mean(0))
            noise.append(draws.var(0) / num_mean_samples)
    # Population variance: with N = 1 there is no spread, not an undefined one.
    variances = torch.cat(means).var(0, correction=0)
    if noise:
        variances = (variances - torch.cat(noise).mean(0)).clamp(min=0)
    variances = variances.tolist()
    return {
        "count": sum(v > threshold for v in variances),
        "threshold": threshold,
        "variances": variances,
        "posterior_mean": "closed form" if closed_form else f"mean of {num_mean_samples} draws",
    }


def _has_mean(q: torch.distributions.Distribution) -> bool:
    try:
        q.mean  # noqa: B018 (the property raises when there is no closed form)
    except NotImplementedError:
        return False
    return True


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def fix_malloc_threshold() -> bool:
    """Stop glibc's heap from fragmenting under the estimators' allocation pattern.

    glibc raises its mmap threshold each time a large block is freed, after which the
    estimators' tensors of a few MB come from a heap that fragments and keeps growing over a
    long evaluation; a fixed threshold (setting it turns the dynamic adjustment off) keeps
    memory flat. This changes the whole process, so the library never calls it: the
    ``pyro-vae`` command line does, and so can a script before a long :func:`evaluate_run`
    (or set ``MALLOC_MMAP_THRESHOLD_=67108864`` in the environment).

    :returns: whether it was applied (on glibc only).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, 64 * 2**20) == 1


def stderr_of_mean(values: torch.Tensor) -> float | None:
    """Standard deviation over datapoints over sqrt(N); ``None`` for one datapoint."""
    if len(values) < 2:
        return None
    return finite_or_none(values.std() / math.sqrt(len(values)))


def finite_or_none(value: torch.Tensor | float) -> float | None:
    """``value`` as a float for a result, or ``None`` where it is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None
