"""The estimator study: gradient estimators of the ELBO and of the IWAE bound on a trained run.

The Monte Carlo estimator (:class:`~pyro.infer.Trace_ELBO`) uses log p(x, z) - log q(z|x) at
z ~ q(z|x); the analytic-KL estimator (:class:`~pyro.infer.TraceMeanField_ELBO`) uses
log p(x|z) - KL(q(z|x) || p(z)) with the KL in closed form. Both are unbiased for the same ELBO.
Beside them stand the objectives of :mod:`pyro_vae.objectives`: ``stl`` (the ELBO with the
path-derivative gradient), ``iwae`` (the importance-weighted bound) and ``dreg`` (the same
bound with doubly reparameterized guide gradients). Four measurements, each of which can be run
on its own:

- :func:`compare_elbo_variance`: with the trained parameters fixed, R single-draw estimates of
  the ELBO by the two estimators per datapoint: their means (which must agree) and standard
  deviations.
- :func:`compare_gradient_variance`: R single-draw gradients of the two ELBO estimators on one
  fixed minibatch, their variance summed over the encoder's and the decoder's parameters and
  their signal-to-noise ratio. Both estimators start from the same seed and draw the same z,
  so where a group's gradient does not involve the KL term (the decoder, when the prior has no
  parameters) the two gradients are identical draw by draw and the variance ratio is exactly 1:
  the analytic KL only removes noise from the gradients that flow through the KL.
- :func:`compare_objective_gradients`: the same statistics, and the median over parameters of
  each parameter's own SNR, for every objective at several numbers of particles K (the grid of
  Rainforth et al. and Tucker et al.). ``trace``, ``meanfield`` and ``stl`` estimate the
  gradient of the ELBO with K averaged draws, ``iwae`` and ``dreg`` that of the IWAE-K bound.
- :func:`compare_training`: the run's architecture trained from one initialisation and seed
  with each objective for the same wall-clock budget, every model scored along the way with
  the *same* yardsticks (the test ELBO and a test IWAE bound), and finally by its test
  log p(x) (the IWAE estimate with many samples).

:func:`compare_run` runs them all on a run folder and returns a :class:`Comparison`;
:func:`~pyro_vae.report.format_comparison_markdown` makes the README tables of it and
:func:`~pyro_vae.report.write_comparison` writes ``comparison.json``, ``comparison.md`` and the
figures. When the (prior, guide) pair has no closed-form KL, the "analytic" estimator samples
the KL like the Monte Carlo one; the result's ``note`` says so.

References:

[1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (ICLR 2014), section 2.3
    (the two estimators).
[2] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth et al. (ICML 2018)
    (gradient signal-to-noise ratio).
[3] `Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
    Inference`, Geoffrey Roeder, Yuhuai Wu, David Duvenaud (NeurIPS 2017) (why the Monte Carlo
    KL can have the lower variance near the exact posterior).
[4] `Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives`, George Tucker,
    Dieterich Lawson, Shixiang Gu, Chris J. Maddison (ICLR 2019).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from pyro_vae.checks import check_choice, check_int, check_non_negative, check_positive
from pyro_vae.config import Config, model_summary
from pyro_vae.data import Dataset, select_split
from pyro_vae.describe import build_vae, is_buildable
from pyro_vae.devices import fork_rng
from pyro_vae.estimators import (
    AnalyticKLWarning,
    RunningMoments,
    estimate_elbo,
    estimate_elbo_terms,
    estimate_log_likelihood,
    sampled_kl_sites,
)
from pyro_vae.evaluate import as_run, finite_or_none, no_analytic_kl_note, stderr_of_mean
from pyro_vae.objectives import ELBOS, get_elbo
from pyro_vae.runs import Run, load_run_dataset
from pyro_vae.train import default_optimizer, prepare_fit, train_epoch
from pyro_vae.vae import VAE

logger = logging.getLogger(__name__)

#: The two estimators compared: label -> key of :data:`~pyro_vae.objectives.ELBOS`.
ESTIMATORS = {"monte_carlo": "trace", "analytic_kl": "meanfield"}

#: The objectives of the gradient grid and of the training study (keys of
#: :data:`~pyro_vae.objectives.ELBOS`).
OBJECTIVES = ("trace", "meanfield", "stl", "iwae", "dreg")

#: The numbers of particles K of the gradient grid.
PARTICLES = (1, 5, 50)

#: Parameter groups of the gradient study: first component of the parameter name -> group.
PARAMETER_GROUPS = {
    "encoder": "encoder",
    "guide_family": "encoder",
    "decoder": "decoder",
    "prior": "decoder",
    "likelihood": "decoder",
}


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_run`; :meth:`as_dict` is ``comparison.json``.

    :ivar run_dir: the run folder.
    :ivar model: :func:`~pyro_vae.config.model_summary` of its config.
    :ivar analytic_kl_available: whether every KL term has a closed form.
    :ivar note: says so when not, else ``None``.
    :ivar settings: the arguments of :func:`compare_run` that shape the numbers.
    :ivar elbo_variance: from :func:`compare_elbo_variance`.
    :ivar gradient_variance: from :func:`compare_gradient_variance`.
    :ivar objective_gradients: from :func:`compare_objective_gradients`.
    :ivar training: from :func:`compare_training`, ``None`` when skipped.
    """

    run_dir: str
    model: dict
    analytic_kl_available: bool
    note: str | None
    settings: dict
    elbo_variance: dict
    gradient_variance: dict
    objective_gradients: dict
    training: dict | None

    def as_dict(self) -> dict:
        """The result as plain JSON values."""
        return dataclasses.asdict(self)


def compare_run(
    run: Run | str | Path,
    *,
    num_draws: int = 100,
    num_points: int = 1000,
    batch_size: int = 128,
    objectives: Sequence[str] | None = None,
    particles: Sequence[int] = PARTICLES,
    train_seconds: float = 30.0,
    train_particles: int = 5,
    num_samples: int = 5000,
    seed: int = 0,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    make_vae: Callable[[], VAE] | None = None,
) -> Comparison:
    """Run the four measurements of this module on a trained run.

    The ELBO study and the scores of the training study use the first ``num_points`` test
    points, the gradient studies the first ``batch_size`` training points (binarized with a
    fixed seed, see :func:`~pyro_vae.data.select_split`), the training study the run's data
    set and architecture. Pyro's validation is off throughout, for speed. The global torch RNG
    is restored afterwards, but the training study reseeds Python's and NumPy's (through
    :func:`pyro.set_rng_seed`).

    :param run: a :class:`~pyro_vae.runs.Run` or the path of a run folder.
    :param int num_draws: draws R per datapoint (ELBO) and per estimator (gradients).
    :param int num_points: test points M of the ELBO study and of the training scores.
    :param int batch_size: size of the fixed minibatch of the gradient studies.
    :param objectives: the objectives of the gradient grid and of the training study; an
        objective the model cannot run is an error. Default: those of :data:`OBJECTIVES` the
        model can run (``stl`` and ``dreg`` need a single latent site), the others named in
        :attr:`Comparison.note`.
    :param particles: the numbers of particles K of the gradient grid.
    :param float train_seconds: wall-clock training budget of each objective in the training
        study; 0 skips it.
    :param int train_particles: K of every objective in the training study.
    :param int num_samples: importance samples of the final test log p(x) of each trained model.
    :param int seed: seed of every random draw and of the training runs.
    :param data_dir: overrides the run's ``data_dir``.
    :param device: where to compute; default the run's device (``"cpu"`` for a path).
    :param make_vae: builds a fresh untrained model for the training study; needed only for a
        model that ``config.json`` cannot rebuild (a custom model class or unregistered parts,
        loaded with ``load_run(run_dir, vae=...)``). Default:
        :func:`~pyro_vae.describe.build_vae`.
    :returns: the :class:`Comparison`.
    """
    settings = _settings(
        num_draws=num_draws,
        num_points=num_points,
        batch_size=batch_size,
        objectives=objectives,
        particles=particles,
        train_seconds=train_seconds,
        train_particles=train_particles,
        num_samples=num_samples,
        seed=seed,
    )
    run = as_run(run, device)
    if settings["train_seconds"]:
        _check_trainable(run, make_vae)
    vae, config = run.vae, run.config
    dataset = load_run_dataset(
        config, data_dir, device=next(vae.parameters()).device, likelihood=vae.likelihood
    )
    x_test = select_split(dataset, "test")[:num_points]
    x_batch = select_split(dataset, "train")[:batch_size]
    settings.update(num_points=x_test.shape[0], batch_size=x_batch.shape[0])
    sampled = sampled_kl_sites(vae.model, vae.guide, x_test)
    notes = [no_analytic_kl_note(vae, sampled)] if sampled else []
    with fork_rng(x_test.device), pyro.validation_enabled(False):
        notes += _choose_objectives(vae, x_batch, settings)
        objectives, particles = settings["objectives"], settings["particles"]
        elbo_variance = compare_elbo_variance(vae, x_test, num_draws, seed)
        gradient_variance = compare_gradient_variance(vae, x_batch, num_draws, seed)
        grid = compare_objective_gradients(vae, x_batch, num_draws, seed, objectives, particles)
        training = _training_study(config, dataset, x_test, make_vae, settings)
    return Comparison(
        run_dir=str(run.path),
        model=model_summary(config),
        analytic_kl_available=not sampled,
        note=" ".join(notes) or None,
        settings=settings,
        elbo_variance=elbo_variance,
        gradient_variance=gradient_variance,
        objective_gradients=grid,
        training=training,
    )


def _training_study(
    config: Config,
    dataset: Dataset,
    x: torch.Tensor,
    make_vae: Callable[[], VAE] | None,
    settings: dict,
) -> dict | None:
    """:func:`compare_training` as :func:`compare_run` asks for it, or ``None`` at 0 seconds."""
    if not settings["train_seconds"]:
        return None
    return compare_training(
        config,
        dataset,
        seconds=settings["train_seconds"],
        seed=settings["seed"],
        eval_x=x,
        make_vae=make_vae,
        objectives=settings["objectives"],
        num_particles=settings["train_particles"],
        num_samples=settings["num_samples"],
    )


def _settings(**settings) -> dict:
    """The arguments of :func:`compare_run` that shape the numbers, checked."""
    check_int("num_draws", settings["num_draws"], minimum=2)
    check_int("num_points", settings["num_points"])
    check_int("batch_size", settings["batch_size"])
    chosen = settings["objectives"]
    objectives, particles = _check_grid(
        OBJECTIVES if chosen is None else chosen, settings["particles"]
    )
    seconds = check_non_negative("train_seconds", settings["train_seconds"])
    check_int("train_particles", settings["train_particles"])
    check_int("num_samples", settings["num_samples"])
    chosen = None if chosen is None else list(objectives)
    return (
        settings | {"objectives": chosen, "particles": list(particles)} | {"train_seconds": seconds}
    )


def _check_grid(objectives: Sequence[str], particles: Sequence[int]) -> tuple[tuple, tuple]:
    for name, values in (("objectives", objectives), ("particles", particles)):
        if isinstance(values, str | bytes) or len(set(values)) != len(values) or not values:
            raise ValueError(f"{name} must be a non-empty sequence without repeats, got {values!r}")
    objectives = tuple(check_choice("objective", name, ELBOS) for name in objectives)
    return objectives, tuple(check_int("particles", k) for k in particles)


def _choose_objectives(vae: VAE, x: torch.Tensor, settings: dict) -> list[str]:
    """Set ``settings["objectives"]`` when it is ``None``: the :data:`OBJECTIVES` the model can
    run, with a note naming the others. Given objectives are checked: fail now, naming the
    objective, if one cannot run on this model (a guide site without ``rsample``, several
    latent sites under ``stl`` or ``dreg``), not after hours of study."""
    names = settings["objectives"]
    errors = {name: _objective_error(vae, x, name) for name in names or OBJECTIVES}
    refused = {name: error for name, error in errors.items() if error is not None}
    if names is not None and refused:
        name, error = next(iter(refused.items()))
        raise ValueError(
            f"objective {name!r} cannot run on this model: {error}; leave it out of objectives"
        )
    settings["objectives"] = [name for name in errors if name not in refused]
    if not settings["objectives"]:
        raise ValueError(f"no objective can run on this model: {refused}")
    if not refused:
        return []
    return [f"left out objectives {sorted(refused)}: {next(iter(refused.values()))}."]


def _objective_error(vae: VAE, x: torch.Tensor, name: str) -> str | None:
    """Why objective ``name`` cannot run on this model, or ``None`` if it can."""
    try:
        get_elbo(name).differentiable_loss(vae.model, vae.guide, x[:2])
    except (ValueError, NotImplementedError) as error:
        return str(error)
    return None


def _check_trainable(run: Run, make_vae: Callable[[], VAE] | None) -> None:
    """Fail now, not after the other studies, if the training study cannot build models."""
    if make_vae is None:
        if not is_buildable(run.config):
            raise ValueError(
                "compare's training study trains fresh models, and config.json cannot "
                "rebuild this run's model (a custom model class or an unregistered part); pass "
                "make_vae=<a function returning a new untrained model>, or train_seconds=0 to "
                "skip it"
            )
        return
    try:
        make_vae().load_state_dict(run.vae.state_dict())
    except (RuntimeError, KeyError) as error:
        raise ValueError(
            f"make_vae() builds a model whose parameters do not match the run's: {error}"
        ) from None


def compare_elbo_variance(vae: VAE, x: torch.Tensor, num_draws: int = 100, seed: int = 0) -> dict:
    """R single-draw estimates of the ELBO of each datapoint with each estimator.

    The draws are vectorized (``num_particles=R`` in
    :func:`~pyro_vae.estimators.estimate_elbo_terms`, whose per-datapoint standard error times
    sqrt(R) is the standard deviation of one draw). The two estimators use independent draws,
    so the difference of their means over the M datapoints has standard error
    ``sqrt(sum_i (s_mc,i^2 + s_an,i^2) / R) / M``; the data's own spread cancels because the
    datapoints are the same.

    :param VAE vae: the trained model; parameters are not changed.
    :param torch.Tensor x: the M datapoints, ``(M, data_dim)``.
    :param int num_draws: draws R per datapoint (at least 2).
    :param int seed: seed of the draws.
    :returns: per estimator the ``mean`` ELBO over datapoints and the ``mean_std`` and
        ``median_std`` over datapoints of the per-draw standard deviation; the ``difference``
        of the means (Monte Carlo - analytic), its ``difference_stderr`` and
        ``difference_in_stderrs``; ``std_ratio`` (mean std MC / mean std analytic),
        ``variance_ratio``, quantiles of the per-datapoint ratio and the ratios themselves
        (``std_ratios``).
    """
    check_int("num_draws", num_draws, minimum=2)
    torch.manual_seed(seed)
    terms = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalyticKLWarning)
        for label in ESTIMATORS:
            analytic_kl = label == "analytic_kl"
            terms[label] = estimate_elbo_terms(
                vae.model, vae.guide, x, analytic_kl, num_particles=num_draws
            )
    result = {"num_points": x.shape[0], "num_draws": num_draws}
    stds = {}
    for label, t in terms.items():
        stds[label] = t.stderr * math.sqrt(num_draws)
        result[label] = {
            "mean": t.elbo.mean().item(),
            "mean_std": stds[label].mean().item(),
            "median_std": stds[label].median().item(),
            "analytic_sites": list(t.analytic_sites),
            "sampled_sites": list(t.sampled_sites),
        }
    mc, an = terms["monte_carlo"], terms["analytic_kl"]
    difference = (mc.elbo - an.elbo).mean().item()
    stderr = (mc.stderr.pow(2) + an.stderr.pow(2)).sum().sqrt().item() / x.shape[0]
    ratios = stds["monte_carlo"] / stds["analytic_kl"]
    quantiles = torch.tensor(
        [0.05, 0.25, 0.5, 0.75, 0.95], dtype=ratios.dtype, device=ratios.device
    )
    finite = ratios[torch.isfinite(ratios)]
    result.update(
        difference=difference,
        difference_stderr=stderr,
        difference_in_stderrs=difference / stderr if stderr > 0 else None,
        std_ratio=_ratio(result["monte_carlo"]["mean_std"], result["analytic_kl"]["mean_std"]),
        variance_ratio=_ratio(
            stds["monte_carlo"].pow(2).mean().item(), stds["analytic_kl"].pow(2).mean().item()
        ),
        std_ratio_quantiles=(
            dict(zip(["5%", "25%", "50%", "75%", "95%"], finite.quantile(quantiles).tolist()))
            if finite.numel()
            else None
        ),
        std_ratios=[finite_or_none(r) for r in ratios.tolist()],
    )
    return result


def compare_gradient_variance(
    vae: VAE, x: torch.Tensor, num_draws: int = 100, seed: int = 0
) -> dict:
    """R single-draw gradients of each estimator's loss on one fixed minibatch.

    The loss is each Pyro ELBO's ``differentiable_loss`` divided by the batch size (the
    gradient of the mean negative ELBO per datapoint), at KL weight 1, one draw of z per
    datapoint. Per parameter group (``encoder``: encoder and guide family; ``decoder``:
    decoder, prior and likelihood; see :data:`PARAMETER_GROUPS`) it reports the norm of the
    mean gradient, the total variance (the per-parameter variance over draws, summed), the
    signal-to-noise ratio ``||mean|| / sqrt(total variance)``, the median over the group's
    parameters of their own SNR ``|mean| / std`` and, between estimators, the variance ratio
    Monte Carlo / analytic. Both estimators start from the same seed, so they see the same z
    in draw r. ``||mean||`` of R draws is biased upward by about ``sqrt(total variance / R)``,
    which bounds the smallest SNR that can be resolved.

    :param VAE vae: the trained model; parameters are not changed.
    :param torch.Tensor x: the minibatch, ``(B, data_dim)``.
    :param int num_draws: draws R per estimator (at least 2).
    :param int seed: seed of the draws.
    :returns: ``groups`` (the number of parameters per group), per estimator label a dict of
        group -> ``mean_norm``, ``total_variance``, ``snr``, ``median_snr``, and
        ``variance_ratio`` and ``snr_ratio`` per group.
    """
    check_int("num_draws", num_draws, minimum=2)
    result = _gradient_header(vae, x, num_draws)
    for label, elbo_name in ESTIMATORS.items():
        result[label] = gradient_statistics(vae, x, elbo_name, 1, num_draws, seed)
    mc, an = result["monte_carlo"], result["analytic_kl"]
    result["variance_ratio"] = {
        g: _ratio(mc[g]["total_variance"], an[g]["total_variance"]) for g in result["groups"]
    }
    result["snr_ratio"] = {g: _ratio(mc[g]["snr"], an[g]["snr"]) for g in result["groups"]}
    return result


def compare_objective_gradients(
    vae: VAE,
    x: torch.Tensor,
    num_draws: int = 100,
    seed: int = 0,
    objectives: Sequence[str] = OBJECTIVES,
    particles: Sequence[int] = PARTICLES,
) -> dict:
    """The gradient statistics of :func:`compare_gradient_variance` for every objective at
    every number of particles K.

    Each row is R gradients of ``get_elbo(objective, K).differentiable_loss`` divided by the
    batch size, at KL weight 1, every (objective, K) starting from the same seed. At K = 1
    ``iwae`` draws and computes what ``trace`` does, and ``dreg`` what ``stl`` does, so their
    rows agree to rounding. The signal differs between families: ``trace``, ``meanfield`` and
    ``stl`` estimate the gradient of the ELBO (their mean gradients agree), ``iwae`` and
    ``dreg`` that of the IWAE-K bound (theirs agree with each other).

    :param VAE vae: the trained model; parameters are not changed.
    :param torch.Tensor x: the minibatch, ``(B, data_dim)``.
    :param int num_draws: draws R per row (at least 2).
    :param int seed: seed of the draws of every row.
    :param objectives: keys of :data:`~pyro_vae.objectives.ELBOS`.
    :param particles: the numbers of particles K.
    :returns: ``batch_size``, ``num_draws``, ``groups`` (parameters per group) and ``rows``:
        one dict per (objective, K), with ``objective``, ``num_particles`` and per group the
        statistics of :func:`gradient_statistics`.
    """
    check_int("num_draws", num_draws, minimum=2)
    objectives, particles = _check_grid(objectives, particles)
    result = _gradient_header(vae, x, num_draws)
    result["rows"] = [
        {
            "objective": name,
            "num_particles": k,
            **gradient_statistics(vae, x, name, k, num_draws, seed),
        }
        for name in objectives
        for k in particles
    ]
    return result


def _gradient_header(vae: VAE, x: torch.Tensor, num_draws: int) -> dict:
    names = [name for name, p in vae.named_parameters() if p.requires_grad]
    groups = [_group(name) for name in names]
    sizes = {g: 0 for g in sorted(set(groups))}
    for p, g in zip((p for p in vae.parameters() if p.requires_grad), groups):
        sizes[g] += p.numel()
    return {"batch_size": x.shape[0], "num_draws": num_draws, "groups": sizes}


def _group(name: str) -> str:
    return PARAMETER_GROUPS.get(name.split(".")[0], "other")


def gradient_statistics(
    vae: VAE, x: torch.Tensor, elbo: str, num_particles: int, num_draws: int, seed: int
) -> dict:
    """Statistics of R draws of the gradient of one objective's mean loss per datapoint.

    :param VAE vae: the model; parameters are not changed.
    :param torch.Tensor x: the minibatch, ``(B, data_dim)``.
    :param str elbo: a key of :data:`~pyro_vae.objectives.ELBOS`.
    :param int num_particles: its K.
    :param int num_draws: draws R (at least 2).
    :param int seed: seed of the draws; the global RNG is restored afterwards.
    :returns: group -> ``mean_norm`` (norm of the mean gradient), ``total_variance`` (the
        per-parameter variances summed), ``snr`` (their ratio ``mean_norm /
        sqrt(total_variance)``) and ``median_snr`` (the median over the group's parameters of
        ``|mean| / std``, over those whose gradient varies).
    """
    check_int("num_draws", num_draws, minimum=2)
    named = [(name, p) for name, p in vae.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    loss_fn = get_elbo(elbo, num_particles)
    moments = [RunningMoments() for _ in params]
    with fork_rng(x.device), vae.kl_weight(1.0):
        torch.manual_seed(seed)
        for _ in range(num_draws):
            loss = loss_fn.differentiable_loss(vae.model, vae.guide, x) / x.shape[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for m, g, p in zip(moments, grads, params):
                # One draw at a time, in float64 so the sums over draws lose nothing.
                m.update((torch.zeros_like(p) if g is None else g).detach().double()[None])
    return _group_statistics(moments, [_group(name) for name, _ in named])


def _group_statistics(moments: list[RunningMoments], groups: list[str]) -> dict:
    stats = {}
    for group in sorted(set(groups)):
        members = [m for m, g in zip(moments, groups) if g == group]
        mean = torch.cat([m.mean.flatten() for m in members])
        variance = torch.cat([m.variance().flatten() for m in members])
        varies = variance > 0
        per_parameter = mean[varies].abs() / variance[varies].sqrt()
        squared_norm = mean.pow(2).sum().item()
        total = variance.sum().item()
        stats[group] = {
            "mean_norm": math.sqrt(squared_norm),
            "total_variance": total,
            "snr": _ratio(math.sqrt(squared_norm), math.sqrt(total)),
            "median_snr": per_parameter.median().item() if per_parameter.numel() else None,
        }
    return stats


def compare_training(
    config: Config,
    dataset: Dataset,
    *,
    seconds: float,
    seed: int = 0,
    eval_x: torch.Tensor | None = None,
    make_vae: Callable[[], VAE] | None = None,
    objectives: Sequence[str] = OBJECTIVES,
    num_particles: int = 5,
    num_samples: int = 5000,
    score_samples: int = 100,
    max_steps: int | None = None,
) -> dict:
    """Train the architecture of ``config`` with each objective for the same wall-clock budget.

    Every model starts from the same ``state_dict`` (the model ``make_vae()`` builds after
    ``torch.manual_seed(seed)``; by default the one ``config`` describes) and is trained by
    :func:`~pyro_vae.train.train_epoch` with a copy of ``config`` in which only ``elbo``,
    ``num_particles`` and ``seed`` change: the same optimizer settings, KL warm-up and first
    epoch of minibatches. Each trains until its training time reaches ``seconds`` (the last
    epoch is cut at that step) or ``max_steps``. Before training, after every epoch and at the
    end each model is scored on ``eval_x`` (default: the test split) with one set of
    yardsticks, on a fixed seed and without touching the training's random stream: the ELBO
    (analytic KL where it has a closed form, one draw) and the IWAE bound with
    ``score_samples`` draws. Finally each gets its log p(x) estimate with ``num_samples``
    draws. ``seconds`` in the rows count training steps only, not scoring, and depend on the
    load of the machine.

    :param Config config: the run's configuration (``data_dim`` set).
    :param Dataset dataset: its data set.
    :param float seconds: training budget of each objective.
    :param int seed: seed of the initialisation, of training and of the scores.
    :param torch.Tensor eval_x: the data to score on.
    :param make_vae: builds a fresh untrained model; default
        :func:`~pyro_vae.describe.build_vae` of ``config``.
    :param objectives: keys of :data:`~pyro_vae.objectives.ELBOS`.
    :param int num_particles: K of every objective.
    :param int num_samples: importance samples of the final log p(x).
    :param int score_samples: importance samples of the IWAE score along the way.
    :param max_steps: an optional cap on the steps of each run (for reproducible tests).
    :returns: ``seconds``, ``num_particles``, ``score`` (the column the figure shows),
        ``score_samples``, ``num_samples``; ``curves``: objective -> rows with ``epoch``,
        ``step``, ``seconds``, ``train_objective`` (the objective's mean per datapoint over
        the epoch, ``None`` before training), ``test_elbo`` and ``test_iwae``; and
        ``log_likelihood``: objective -> ``mean`` and ``stderr`` (over the datapoints) of the
        final log p(x) estimates, and their ``difference`` from those of the first objective
        with its paired ``difference_stderr`` (the same datapoints: their spread cancels; it
        measures the test points' sampling, not the spread between training runs), or
        ``diverged``: the error, for a run whose loss stopped being finite (its curve ends at
        the last good epoch, and the others go on).
    """
    seconds = check_positive("seconds", seconds)
    objectives, _ = _check_grid(objectives, (1,))
    check_int("num_particles", num_particles)
    check_int("num_samples", num_samples)
    check_int("score_samples", score_samples)
    if max_steps is not None:
        check_int("max_steps", max_steps)
    base = dataclasses.replace(config, seed=seed, num_particles=num_particles)
    device = dataset.train_x.device
    eval_x = select_split(dataset, "test") if eval_x is None else eval_x
    make_vae = make_vae or (lambda: build_vae(base))
    torch.manual_seed(seed)
    initial = copy.deepcopy(make_vae().state_dict())
    curves, log_likelihood, reference = {}, {}, None
    score = functools.partial(_score, eval_x=eval_x, seed=seed, num_samples=score_samples)
    for name in objectives:
        vae = make_vae().to(device)
        vae.load_state_dict(initial)
        cfg = prepare_fit(vae, dataset, dataclasses.replace(base, elbo=name))
        curves[name], diverged = _train_for(vae, dataset, cfg, seconds, max_steps, score)
        logger.info("trained with %s for %.1f s", name, curves[name][-1]["seconds"])
        if diverged:
            log_likelihood[name] = {"diverged": diverged}
            continue
        log_px = _log_likelihood(vae, eval_x, num_samples, seed)
        reference = log_px if reference is None else reference
        log_likelihood[name] = {
            "mean": log_px.mean().item(),
            "stderr": stderr_of_mean(log_px),
            "difference": (log_px - reference).mean().item(),
            "difference_stderr": stderr_of_mean(log_px - reference),
        }
    return {
        "seconds": seconds,
        "num_particles": num_particles,
        "score": "test_iwae",
        "score_samples": score_samples,
        "num_samples": num_samples,
        "curves": curves,
        "log_likelihood": log_likelihood,
    }


def _train_for(
    vae: VAE,
    dataset: Dataset,
    config: Config,
    seconds: float,
    max_steps: int | None,
    score: Callable[[VAE], dict],
) -> tuple[list[dict], str | None]:
    """Train for ``seconds`` of training time (or ``max_steps``); the scored rows, and the
    error message if the loss or the parameters stopped being finite."""
    optimizer = default_optimizer(vae, config)
    pyro.set_rng_seed(config.seed)
    rows = [{"epoch": 0, "step": 0, "seconds": 0.0, "train_objective": None, **score(vae)}]
    spent, step = 0.0, 0
    with vae.kl_weight(1.0):  # the warm-up sets it per step; afterwards it is as it was
        while spent < seconds and (max_steps is None or step < max_steps):
            epoch = rows[-1]["epoch"] + 1
            start = time.perf_counter()
            deadline = start + seconds - spent

            def stop(step: int, deadline: float = deadline) -> bool:
                return time.perf_counter() >= deadline or step == max_steps

            vae.train()
            try:
                value, step = train_epoch(
                    vae, optimizer, dataset.train_x, config, epoch, step, stop
                )
            except FloatingPointError as error:
                return rows, str(error)
            spent += time.perf_counter() - start
            row = {"epoch": epoch, "step": step, "seconds": spent, "train_objective": value}
            rows.append({**row, **score(vae)})
    return rows, None


@torch.no_grad()
def _score(vae: VAE, eval_x: torch.Tensor, seed: int, num_samples: int) -> dict:
    """Mean test ELBO (analytic KL where it exists) and IWAE bound, on a fixed seed and
    without touching the training stream of random numbers."""
    vae.eval()
    # At KL weight 1 whatever the warm-up says: the estimators ignore vae.kl_scale.
    with fork_rng(eval_x.device), warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalyticKLWarning)
        torch.manual_seed(seed)
        elbo = estimate_elbo(vae.model, vae.guide, eval_x, analytic_kl=True)
    iwae = _log_likelihood(vae, eval_x, num_samples, seed)
    return {"test_elbo": elbo.mean().item(), "test_iwae": iwae.mean().item()}


@torch.no_grad()
def _log_likelihood(vae: VAE, x: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """Per-datapoint IWAE estimates of log p(x) on a fixed seed, without touching the global
    stream of random numbers."""
    vae.eval()
    with fork_rng(x.device):
        torch.manual_seed(seed)
        return estimate_log_likelihood(vae.model, vae.guide, x, num_samples)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return finite_or_none(a / b)
