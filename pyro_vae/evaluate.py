"""Evaluate a trained run: ELBO (Monte Carlo and analytic KL), log p(x), bits/dim, active units.

:func:`evaluate_vae` does the work on a data tensor; :func:`evaluate_run` reads the run folder,
loads the split its config describes and adds what was evaluated to the result, which is a plain
dict ready for ``json.dumps`` (``pyro-vae evaluate`` writes it to ``evaluation.json``).

**Which data.** The test split of binarized data is binarized once with a fixed seed by
:func:`~pyro_vae.data.load_dataset`. The training split of a dynamically binarized run holds grey
levels, so it is binarized here once with another fixed seed (:data:`TRAIN_BINARIZATION_SEED`,
a private :class:`torch.Generator`), and every evaluation of it sees the same binary images.

**Cost.** Everything is dominated by the importance-weighted log p(x): ``num_samples`` decoder
passes per datapoint, drawn once for all the reported K (see
:func:`~pyro_vae.estimators.estimate_log_likelihood_curve`). The estimators run with Pyro's
validation off, which saves about a tenth of the time. Memory stays near the estimators'
per-pass budget whatever the number of datapoints, because they chunk draws and datapoints.

References:

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
    (ICLR 2016): the log p(x) estimator and the active-units statistic (appendix).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch

from pyro_vae.config import Config
from pyro_vae.data import Dataset
from pyro_vae.estimators import ELBOTerms, estimate_elbo_terms, estimate_log_likelihood_curve
from pyro_vae.guides import has_analytic_kl
from pyro_vae.runs import Run, atomic_write_text, load_run, load_run_dataset
from pyro_vae.train import resolve_binarize, resolve_device
from pyro_vae.vae import VAE

#: Where ``pyro-vae evaluate`` writes its results, inside the run folder.
EVALUATION_FILE = "evaluation.json"

#: The numbers of importance samples always reported (those not above ``num_samples``).
DEFAULT_KS = (1, 10, 100, 1000)

#: A latent dimension is active when the variance over the data of E_q[z_d] exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01

#: Seed of the one-off binarization of a dynamically binarized training split.
TRAIN_BINARIZATION_SEED = 2

SPLITS = ("test", "train")

_NO_ANALYTIC_KL = "no analytic KL"


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
) -> dict:
    """Evaluate a trained run on one split of its data set (see :func:`evaluate_vae`).

    :param run: a :class:`~pyro_vae.runs.Run` or the path of a run folder.
    :param x: the data to evaluate: a ``(N, data_dim)`` tensor (used as it is), a
        :class:`~pyro_vae.data.Dataset` (its ``split`` is taken), or ``None`` to load the run's
        data set as its config says (data set, binarization, ``data_dir``).
    :param int num_samples: importance samples K per datapoint for log p(x).
    :param str split: ``"test"`` or ``"train"``.
    :param data_dir: overrides the run's ``data_dir`` when loading the data.
    :param device: where to evaluate; default the run's device (``"cpu"`` for a path).
    :param int seed: seed of the random draws; the same seed gives the same numbers.
    :param int limit: evaluate only the first ``limit`` datapoints.
    :param int num_elbo_particles: draws per datapoint of each ELBO estimator.
    :returns: the dict of :func:`evaluate_vae` with the run's path, data set, split,
        binarization and model description added.

    >>> result = evaluate_run("runs/mnist", num_samples=5000)  # doctest: +SKIP
    >>> print(format_evaluation(result))  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if limit is not None:
        _check_positive_int("limit", limit)
    run = as_run(run, device)
    config = run.config
    parameter = next(run.vae.parameters())
    if x is None:
        config.binarize = resolve_binarize(config.binarize, run.vae.likelihood)
        x = load_run_dataset(config, data_dir)
    if isinstance(x, Dataset):
        x = select_split(x, split)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, a Dataset or None, got {type(x).__name__}")
    if limit is not None:
        x = x[:limit]
    x = x.to(device=parameter.device, dtype=parameter.dtype)
    result = {
        "run_dir": str(run.path),
        "dataset": config.dataset,
        "split": split,
        "binarize": resolve_binarize(config.binarize, run.vae.likelihood),
        "model": {**model_summary(config), "epochs": run.checkpoint.get("epoch")},
    }
    result.update(
        evaluate_vae(run.vae, x, num_samples, seed=seed, num_elbo_particles=num_elbo_particles)
    )
    return result


def as_run(run: Run | str | Path, device: str | torch.device | None = None) -> Run:
    """``run`` itself (moved to ``device`` if given) or the run loaded from that folder.

    Loading builds the model, whose initialisation draws from the global torch RNG; the RNG is
    restored afterwards, so evaluating never shifts the random numbers of the caller.
    """
    if isinstance(run, Run):
        if device is not None:
            run.vae.to(resolve_device(str(device)))
        return run
    with torch.random.fork_rng(devices=[]):
        return load_run(run, device=resolve_device(str(device or "cpu")))


def select_split(dataset: Dataset, split: str) -> torch.Tensor:
    """The rows of one split, binarized as an evaluation needs them.

    A dynamically binarized data set keeps grey levels in ``train_x``; they are binarized here
    with a private generator seeded with :data:`TRAIN_BINARIZATION_SEED`, so the numbers repeat.

    :param Dataset dataset: from :func:`~pyro_vae.data.load_dataset`.
    :param str split: ``"test"`` or ``"train"``.
    :returns: the ``(N, data_dim)`` data, on the data set's device.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if split == "test":
        return dataset.test_x
    x = dataset.train_x
    if dataset.binarize == "dynamic":
        # On the CPU, so that the binary images do not depend on the device.
        generator = torch.Generator().manual_seed(TRAIN_BINARIZATION_SEED)
        x = torch.bernoulli(x.cpu(), generator=generator).to(x.device)
    return x


def evaluate_vae(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int = 5000,
    *,
    seed: int = 0,
    num_elbo_particles: int = 10,
    ks: Sequence[int] = DEFAULT_KS,
    active_threshold: float = ACTIVE_UNIT_THRESHOLD,
) -> dict:
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
      sqrt(N), the Monte Carlo standard error of ``mean``); ``null`` where undefined (K = 1).
    - ``bits_per_dim``: -log p(x) / (D ln 2) at the largest K; for a likelihood of continuous
      data log p(x) is a density and ``note`` says so.
    - ``active_units``: ``count`` of latent dimensions d with Var_x(E_q[z_d | x]) above
      ``threshold`` and the per-dimension ``variances``. For a guide without a closed-form mean
      (a flow), E_q[z_d | x] is the mean of ``num_mean_samples`` draws and the variance is
      corrected for their Monte Carlo noise (``posterior_mean`` says which).
    - ``seconds`` (total and per part) and ``peak_memory_mb`` (the process's peak resident
      memory so far, from :func:`resource.getrusage`).

    :param VAE vae: the trained model; its parameters are not changed.
    :param torch.Tensor x: data of shape ``(N, data_dim)`` on the model's device.
    :param int num_samples: importance samples K per datapoint for log p(x).
    :param int seed: seed of the random draws (the global torch RNG is restored afterwards).
    :param int num_elbo_particles: draws per datapoint of each ELBO estimator.
    :param ks: further numbers of importance samples to report.
    :param float active_threshold: variance threshold of an active unit.
    :returns: the results, a dict of plain numbers, strings and lists.

    References:

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016).
    """
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("num_elbo_particles", num_elbo_particles)
    vae.check_input(x)
    ks = sorted({k for k in ks if k <= num_samples} | {num_samples})
    times = [time.perf_counter()]
    devices = [x.device] if x.device.type == "cuda" else []
    # The estimators ignore the KL weight (vae.kl_scale): these are beta = 1 numbers.
    with torch.random.fork_rng(devices), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        elbos = _evaluate_elbos(vae, x, num_elbo_particles)
        times.append(time.perf_counter())
        curve = estimate_log_likelihood_curve(vae.model, vae.guide, x, ks, return_stderr=True)
        times.append(time.perf_counter())
        active = active_units(vae, x, active_threshold)
        times.append(time.perf_counter())
    parts = ("elbo", "log_likelihood", "active_units")
    seconds = {part: end - begin for part, begin, end in zip(parts, times, times[1:])}
    seconds["total"] = times[-1] - times[0]
    log_likelihood = [_log_likelihood_row(k, *curve[k]) for k in ks]
    best = log_likelihood[-1]
    data_dim = x[0].numel()
    notes = [elbos.pop("note")] if "note" in elbos else []
    if not vae.likelihood.support.is_discrete:
        notes.append(
            f"likelihood {vae.likelihood.name!r} is a density on continuous data, so log p(x) "
            "and bits/dim are not comparable with those of discrete (binarized) data"
        )
    return {
        "num_datapoints": x.shape[0],
        "data_dim": data_dim,
        "seed": seed,
        "num_samples": num_samples,
        **elbos,
        "log_likelihood": log_likelihood,
        "bits_per_dim": -best["mean"] / (data_dim * math.log(2)),
        "bits_per_dim_k": best["k"],
        "active_units": active,
        "note": " ".join(notes) or None,
        "seconds": seconds,
        "peak_memory_mb": peak_memory_mb(),
    }


def _evaluate_elbos(vae: VAE, x: torch.Tensor, num_particles: int) -> dict:
    """Both ELBO estimators and their paired difference, as :func:`evaluate_vae` reports."""
    mc = estimate_elbo_terms(vae.model, vae.guide, x, False, num_particles)
    with warnings.catch_warnings():
        # Reported in the result instead, with the analytic and sampled sites.
        warnings.filterwarnings("ignore", message=_NO_ANALYTIC_KL, category=UserWarning)
        analytic = estimate_elbo_terms(vae.model, vae.guide, x, True, num_particles)
    result = {
        "elbo": {
            "num_particles": num_particles,
            "monte_carlo": _elbo_summary(mc),
            "analytic_kl": _elbo_summary(analytic),
            "difference": {
                "mean": (mc.elbo - analytic.elbo).mean().item(),
                "stderr": _stderr(mc.elbo - analytic.elbo),
            },
        },
        "analytic_kl_available": not analytic.sampled_sites,
        "reconstruction": analytic.reconstruction.mean().item(),
        "kl": analytic.kl.mean().item(),
    }
    if analytic.sampled_sites:
        result["note"] = (
            f"{_NO_ANALYTIC_KL} for latent site(s) {list(analytic.sampled_sites)} with prior "
            f"{type(vae.prior).__name__} and guide {type(vae.guide_family).__name__}: the "
            "'analytic_kl' ELBO samples the KL there (log q - log p), like the Monte Carlo one."
        )
    return result


def _elbo_summary(terms: ELBOTerms) -> dict:
    return {
        "mean": terms.elbo.mean().item(),
        "stderr": _stderr(terms.elbo),
        "mc_stderr": _finite_or_none(
            terms.stderr.pow(2).mean().sqrt() / math.sqrt(len(terms.elbo))
        ),
        "reconstruction": terms.reconstruction.mean().item(),
        "kl": terms.kl.mean().item(),
        "analytic_sites": list(terms.analytic_sites),
        "sampled_sites": list(terms.sampled_sites),
    }


def _log_likelihood_row(k: int, estimate: torch.Tensor, stderr: torch.Tensor) -> dict:
    return {
        "k": k,
        "mean": estimate.mean().item(),
        "stderr": _stderr(estimate),
        "mc_stderr_mean": _finite_or_none(stderr.mean()),
        "mc_stderr": _finite_or_none(stderr.pow(2).mean().sqrt() / math.sqrt(len(stderr))),
    }


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


def analytic_kl_available(vae: VAE, x: torch.Tensor) -> bool:
    """Whether KL(q(z|x) || p(z)) of this VAE has a closed form (see
    :func:`~pyro_vae.guides.has_analytic_kl`).

    :param VAE vae: the model.
    :param torch.Tensor x: at least one datapoint, to build q(z|x).
    """
    with torch.no_grad():
        return has_analytic_kl(vae.encode(x[:1]), vae.prior())


def model_summary(config: Config) -> dict:
    """The model fields of a run's config that reports print."""
    return {
        "dataset": config.dataset,
        "prior": config.prior,
        "likelihood": config.likelihood,
        "guide": config.guide,
        "latent_dim": config.latent_dim,
        "hidden_dims": list(config.hidden_dims),
        "trained_with_elbo": config.elbo,
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def evaluation_file(split: str = "test", limit: int | None = None) -> str:
    """``evaluation.json`` for a whole test split; other splits and ``limit`` get their own
    names, so a quick look never overwrites the full evaluation."""
    stem = EVALUATION_FILE.removesuffix(".json")
    suffix = ("" if split == "test" else f"-{split}") + ("" if limit is None else f"-first{limit}")
    return f"{stem}{suffix}.json"


def write_evaluation(run_dir: str | Path, result: dict, name: str = EVALUATION_FILE) -> Path:
    """Write ``result`` to ``run_dir/name`` atomically; returns the path."""
    path = Path(run_dir) / name
    atomic_write_text(path, dumps_json(result))
    return path


def dumps_json(result: dict) -> str:
    """Strict JSON text of a result: NaN and infinite numbers (a diverged model) become null."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(result), indent=2, allow_nan=False) + "\n"


def format_evaluation(result: dict) -> str:
    """The results of :func:`evaluate_vae` as an aligned plain-text table."""
    n = result["num_datapoints"]
    rows = [("quantity", "mean", "stderr", "MC stderr")]
    for name, label in (("monte_carlo", "ELBO, Monte Carlo"), ("analytic_kl", "ELBO, analytic KL")):
        e = result["elbo"][name]
        rows.append((label, _fmt(e["mean"]), _fmt(e["stderr"]), _fmt(e["mc_stderr"])))
    rows.append(("reconstruction E_q log p(x|z)", _fmt(result["reconstruction"]), "", ""))
    rows.append(("KL(q(z|x) || p(z))", _fmt(result["kl"]), "", ""))
    for row in result["log_likelihood"]:
        rows.append(
            (
                f"log p(x), K={row['k']}",
                _fmt(row["mean"]),
                _fmt(row["stderr"]),
                _fmt(row["mc_stderr"]),
            )
        )
    rows.append(
        (f"bits/dim (K={result['bits_per_dim_k']})", _fmt(result["bits_per_dim"], 4), "", "")
    )
    active = result["active_units"]
    rows.append(
        (
            f"active units (var > {active['threshold']})",
            f"{active['count']}/{len(active['variances'])}",
            "",
            "",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"{result.get('dataset', 'data')} {result.get('split', '')} split, N={n}, "
        f"nats per datapoint, stderr over datapoints"
    ]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    seconds = result["seconds"]["total"]
    lines.append(f"{seconds:.1f} s, peak memory {result['peak_memory_mb']:.0f} MB")
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _stderr(values: torch.Tensor) -> float | None:
    """Standard deviation over datapoints over sqrt(N); ``None`` for one datapoint."""
    if len(values) < 2:
        return None
    return _finite_or_none(values.std() / math.sqrt(len(values)))


def _finite_or_none(value: torch.Tensor | float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
