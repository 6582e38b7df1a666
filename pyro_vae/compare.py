"""Monte Carlo KL against analytic KL: a study of the two ELBO estimators on a trained run.

The Monte Carlo estimator (:class:`~pyro.infer.Trace_ELBO`) uses log p(x, z) - log q(z|x) at
z ~ q(z|x); the analytic-KL estimator (:class:`~pyro.infer.TraceMeanField_ELBO`) uses
log p(x|z) - KL(q(z|x) || p(z)) with the KL in closed form. Both are unbiased for the same ELBO.
Three measurements, each of which can be run on its own:

- :func:`compare_elbo_variance`: with the trained parameters fixed, R single-draw estimates of
  each per datapoint: their means (which must agree) and standard deviations.
- :func:`compare_gradient_variance`: R single-draw gradients of each loss on one fixed
  minibatch, their variance summed over the encoder's and the decoder's parameters and their
  signal-to-noise ratio. Both estimators draw the same z (same seed), so where a group's
  gradient does not involve the KL term (the decoder, when the prior has no parameters) the
  two gradients are identical draw by draw and the variance ratio is exactly 1: the analytic KL
  only removes noise from the gradients that flow through the KL.
- :func:`compare_training`: the run's architecture trained from one initialisation and seed
  with each estimator, every model scored on the test set with the *same* estimator (see
  there), against steps and seconds.

:func:`compare_run` runs all three on a run folder and returns a :class:`Comparison`;
:func:`~pyro_vae.report.format_comparison_markdown` makes the README table of it and
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
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from pyro_vae.checks import check_int
from pyro_vae.config import Config, model_summary
from pyro_vae.data import Dataset, select_split
from pyro_vae.describe import build_vae, is_buildable
from pyro_vae.devices import fork_rng
from pyro_vae.estimators import (
    AnalyticKLWarning,
    RunningMoments,
    estimate_elbo,
    estimate_elbo_terms,
    sampled_kl_sites,
)
from pyro_vae.evaluate import as_run, finite_or_none, no_analytic_kl_note
from pyro_vae.objectives import get_elbo
from pyro_vae.runs import Run, load_run_dataset
from pyro_vae.train import fit
from pyro_vae.vae import VAE

logger = logging.getLogger(__name__)

#: The two estimators compared: label -> key of :data:`~pyro_vae.objectives.ELBOS`.
ESTIMATORS = {"monte_carlo": "trace", "analytic_kl": "meanfield"}

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
    :ivar settings: ``num_draws``, ``num_points``, ``batch_size``, ``train_epochs``, ``seed``.
    :ivar elbo_variance: from :func:`compare_elbo_variance`.
    :ivar gradient_variance: from :func:`compare_gradient_variance`.
    :ivar training: from :func:`compare_training`, ``None`` when skipped.
    """

    run_dir: str
    model: dict
    analytic_kl_available: bool
    note: str | None
    settings: dict
    elbo_variance: dict
    gradient_variance: dict
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
    train_epochs: int = 10,
    seed: int = 0,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    make_vae: Callable[[], VAE] | None = None,
) -> Comparison:
    """Run the three measurements of this module on a trained run.

    The ELBO study uses the first ``num_points`` test points, the gradient study the first
    ``batch_size`` training points (binarized with a fixed seed, see
    :func:`~pyro_vae.data.select_split`), the training study the run's data set and
    architecture. Pyro's validation is off throughout, for speed. The global torch RNG is
    restored afterwards, but the training study reseeds Python's and NumPy's (through
    :func:`pyro.set_rng_seed` in :func:`~pyro_vae.train.fit`).

    :param run: a :class:`~pyro_vae.runs.Run` or the path of a run folder.
    :param int num_draws: draws R per datapoint (ELBO) and per estimator (gradients).
    :param int num_points: test points M of the ELBO study.
    :param int batch_size: size of the fixed minibatch of the gradient study.
    :param int train_epochs: epochs of each training run; 0 skips the training study.
    :param int seed: seed of every random draw and of the training runs.
    :param data_dir: overrides the run's ``data_dir``.
    :param device: where to compute; default the run's device (``"cpu"`` for a path).
    :param make_vae: builds a fresh untrained model for the training study; needed only for a
        model that ``config.json`` cannot rebuild (a custom model class or unregistered parts,
        loaded with ``load_run(run_dir, vae=...)``). Default:
        :func:`~pyro_vae.describe.build_vae`.
    :returns: the :class:`Comparison`.
    """
    check_int("num_draws", num_draws, minimum=2)
    check_int("num_points", num_points)
    check_int("batch_size", batch_size)
    check_int("train_epochs", train_epochs, minimum=0)
    run = as_run(run, device)
    if train_epochs:
        _check_trainable(run, make_vae)
    vae, config = run.vae, run.config
    dataset = load_run_dataset(
        config, data_dir, device=next(vae.parameters()).device, likelihood=vae.likelihood
    )
    x_test = select_split(dataset, "test")[:num_points]
    x_batch = select_split(dataset, "train")[:batch_size]
    sampled = sampled_kl_sites(vae.model, vae.guide, x_test)
    settings = {
        "num_draws": num_draws,
        "num_points": x_test.shape[0],
        "batch_size": x_batch.shape[0],
        "train_epochs": train_epochs,
        "seed": seed,
    }
    with fork_rng(x_test.device), pyro.validation_enabled(False):
        elbo_variance = compare_elbo_variance(vae, x_test, num_draws, seed)
        gradient_variance = compare_gradient_variance(vae, x_batch, num_draws, seed)
        training = (
            compare_training(config, dataset, train_epochs, seed, make_vae=make_vae)
            if train_epochs
            else None
        )
    return Comparison(
        run_dir=str(run.path),
        model=model_summary(config),
        analytic_kl_available=not sampled,
        note=no_analytic_kl_note(vae, sampled) if sampled else None,
        settings=settings,
        elbo_variance=elbo_variance,
        gradient_variance=gradient_variance,
        training=training,
    )


def _check_trainable(run: Run, make_vae: Callable[[], VAE] | None) -> None:
    """Fail now, not after the first two studies, if the training study cannot build models."""
    if make_vae is None:
        if not is_buildable(run.config):
            raise ValueError(
                "compare's training study trains two fresh models, and config.json cannot "
                "rebuild this run's model (a custom model class or an unregistered part); pass "
                "make_vae=<a function returning a new untrained model>, or train_epochs=0 to "
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
    signal-to-noise ratio ``||mean|| / sqrt(total variance)`` and, between estimators, the
    variance ratio Monte Carlo / analytic. Both estimators start from the same seed, so they
    see the same z in draw r. ``||mean||`` of R draws is biased upward by about
    ``sqrt(total variance / R)``, which bounds the smallest SNR that can be resolved.

    :param VAE vae: the trained model; parameters are not changed.
    :param torch.Tensor x: the minibatch, ``(B, data_dim)``.
    :param int num_draws: draws R per estimator (at least 2).
    :param int seed: seed of the draws.
    :returns: ``groups`` (the number of parameters per group), per estimator label a dict of
        group -> ``mean_norm``, ``total_variance``, ``snr``, and ``variance_ratio`` and
        ``snr_ratio`` per group.
    """
    check_int("num_draws", num_draws, minimum=2)
    names = [name for name, p in vae.named_parameters() if p.requires_grad]
    params = [p for p in vae.parameters() if p.requires_grad]
    groups = [PARAMETER_GROUPS.get(name.split(".")[0], "other") for name in names]
    result: dict = {
        "batch_size": x.shape[0],
        "num_draws": num_draws,
        "groups": {
            g: sum(p.numel() for p, h in zip(params, groups) if h == g) for g in sorted(set(groups))
        },
    }
    with vae.kl_weight(1.0):
        for label, elbo_name in ESTIMATORS.items():
            loss_fn = get_elbo(elbo_name)
            moments = [RunningMoments() for _ in params]
            torch.manual_seed(seed)
            for _ in range(num_draws):
                loss = loss_fn.differentiable_loss(vae.model, vae.guide, x) / x.shape[0]
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for m, g, p in zip(moments, grads, params):
                    # One draw at a time, in float64 so the sums over draws lose nothing.
                    m.update((torch.zeros_like(p) if g is None else g).detach().double()[None])
            result[label] = _group_statistics(moments, groups)
    mc, an = result["monte_carlo"], result["analytic_kl"]
    result["variance_ratio"] = {
        g: _ratio(mc[g]["total_variance"], an[g]["total_variance"]) for g in result["groups"]
    }
    result["snr_ratio"] = {g: _ratio(mc[g]["snr"], an[g]["snr"]) for g in result["groups"]}
    return result


def _group_statistics(moments: list[RunningMoments], groups: list[str]) -> dict:
    stats = {}
    for group in sorted(set(groups)):
        members = [m for m, g in zip(moments, groups) if g == group]
        squared_norm = sum(m.mean.pow(2).sum().item() for m in members)
        variance = sum(m.variance().sum().item() for m in members)
        stats[group] = {
            "mean_norm": math.sqrt(squared_norm),
            "total_variance": variance,
            "snr": _ratio(math.sqrt(squared_norm), math.sqrt(variance)),
        }
    return stats


def compare_training(
    config: Config,
    dataset: Dataset,
    num_epochs: int,
    seed: int = 0,
    eval_x: torch.Tensor | None = None,
    make_vae: Callable[[], VAE] | None = None,
) -> dict:
    """Train the architecture of ``config`` once with each estimator, from one initialisation.

    Both models start from the same ``state_dict`` (the model ``make_vae()`` builds after
    ``torch.manual_seed(seed)``; by default the one ``config`` describes) and are trained by
    :func:`~pyro_vae.train.fit` with a copy of ``config`` in which only ``elbo``, ``epochs``
    and ``seed`` change, so both see the same minibatches and binarizations. Before training
    and after every epoch each model is scored on ``eval_x`` (default: the test split) with
    *both* estimators at one draw per datapoint and a fixed seed (common random numbers, and
    the training's own random stream is left untouched), so every curve is measured by the
    same yardstick; the figure shows the analytic-KL score, the lower-variance one of the two
    where a closed form exists. ``seconds`` are cumulative as ``fit`` reports them (training
    plus its own per-epoch test ELBO, not these scores).

    :param Config config: the run's configuration (``data_dim`` set).
    :param Dataset dataset: its data set.
    :param int num_epochs: epochs of each training run.
    :param int seed: seed of the initialisation and of training.
    :param torch.Tensor eval_x: the data to score on.
    :param make_vae: builds a fresh untrained model; default
        :func:`~pyro_vae.describe.build_vae` of ``config``.
    :returns: ``curves``: estimator label -> rows with ``epoch``, ``step``, ``seconds``,
        ``train_elbo`` (the training objective, ``None`` before training), ``test_elbo_monte_carlo``
        and ``test_elbo_analytic_kl``; and ``score`` naming the estimator used for the plot.
    """
    check_int("num_epochs", num_epochs)
    base = dataclasses.replace(config, epochs=num_epochs, seed=seed)
    device = dataset.train_x.device
    eval_x = select_split(dataset, "test") if eval_x is None else eval_x
    make_vae = make_vae or (lambda: build_vae(base))
    torch.manual_seed(seed)
    initial = copy.deepcopy(make_vae().state_dict())
    curves = {}
    for label, elbo_name in ESTIMATORS.items():
        cfg = dataclasses.replace(base, elbo=elbo_name)
        vae = make_vae().to(device)
        vae.load_state_dict(initial)
        rows = [{"epoch": 0, "step": 0, "seconds": 0.0, "train_elbo": None}]
        rows[0].update(_score(vae, eval_x, seed))

        def on_epoch_end(row: dict, rows: list = rows, vae: VAE = vae) -> None:
            seconds = rows[-1]["seconds"] + row["seconds"]
            new = {"epoch": row["epoch"], "step": row["step"], "seconds": seconds}
            new["train_elbo"] = row["train_elbo"]
            new.update(_score(vae, eval_x, seed))
            rows.append(new)

        start = time.perf_counter()
        fit(vae, dataset, cfg, on_epoch_end=on_epoch_end)
        logger.info("trained with %s in %.1f s", label, time.perf_counter() - start)
        curves[label] = rows
    return {"num_epochs": num_epochs, "score": "test_elbo_analytic_kl", "curves": curves}


@torch.no_grad()
def _score(vae: VAE, x: torch.Tensor, seed: int) -> dict:
    """Mean test ELBO by both estimators, on a fixed seed and without touching the training
    stream of random numbers."""
    vae.eval()
    scores = {}
    # At KL weight 1 whatever the warm-up says: the estimators ignore vae.kl_scale.
    with fork_rng(x.device), warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalyticKLWarning)
        for label in ESTIMATORS:
            torch.manual_seed(seed)
            elbo = estimate_elbo(vae.model, vae.guide, x, label == "analytic_kl")
            scores[f"test_elbo_{label}"] = elbo.mean().item()
    return scores


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return finite_or_none(a / b)
