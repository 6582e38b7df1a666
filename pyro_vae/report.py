"""Reports of measurements: text tables, markdown and JSON files, apart from the measuring.

:mod:`pyro_vae.evaluate` and :mod:`pyro_vae.compare` measure and return dataclasses; this module
turns them into what people read (:func:`format_evaluation`, :func:`format_comparison_markdown`)
and into files (:func:`write_evaluation`, :func:`write_comparison`, strict JSON through
:func:`dumps_json`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from pyro_vae.compare import ESTIMATORS, Comparison
from pyro_vae.evaluate import Evaluation
from pyro_vae.plots import (
    plot_gradient_snr,
    plot_histogram,
    plot_training_comparison,
    save_figures,
)
from pyro_vae.runs import atomic_write_text

#: Where ``pyro-vae evaluate`` writes its results, inside the run folder.
EVALUATION_FILE = "evaluation.json"

COMPARISON_FILE = "comparison.json"
COMPARISON_MARKDOWN = "comparison.md"
CURVES_FIGURE = "comparison_curves.png"
STD_RATIO_FIGURE = "comparison_std_ratio.png"
SNR_FIGURE = "comparison_snr.png"

#: How reports name the two estimators of :data:`~pyro_vae.compare.ESTIMATORS`.
LABELS = {"monte_carlo": "Monte Carlo KL", "analytic_kl": "analytic KL"}


def evaluation_file(split: str = "test", limit: int | None = None) -> str:
    """``evaluation.json`` for a whole test split; other splits and ``limit`` get their own
    names, so a quick look never overwrites the full evaluation."""
    stem = EVALUATION_FILE.removesuffix(".json")
    suffix = ("" if split == "test" else f"-{split}") + ("" if limit is None else f"-first{limit}")
    return f"{stem}{suffix}.json"


def write_evaluation(
    run_dir: str | Path, result: Evaluation | dict, name: str = EVALUATION_FILE
) -> Path:
    """Write ``result`` as JSON (see :func:`dumps_json`) to ``run_dir/name`` atomically;
    returns the path."""
    path = Path(run_dir) / name
    atomic_write_text(path, dumps_json(result))
    return path


def dumps_json(result: Evaluation | Comparison | dict) -> str:
    """Strict JSON text of a result: NaN and infinite numbers (a diverged model) become null.

    >>> dumps_json({"mean": float("nan")})
    '{\\n  "mean": null\\n}\\n'
    """
    if isinstance(result, Evaluation | Comparison):
        result = result.as_dict()

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(result), indent=2, allow_nan=False) + "\n"


def format_evaluation(result: Evaluation) -> str:
    """An :class:`~pyro_vae.evaluate.Evaluation` as an aligned plain-text table."""
    lines = [
        f"{result.dataset or 'data'} {result.split or ''} split, N={result.num_datapoints}, "
        f"nats per datapoint, stderr over datapoints"
    ]
    lines += _table(_evaluation_rows(result))
    lines.append(f"{result.seconds['total']:.1f} s, peak memory {result.peak_memory_mb:.0f} MB")
    if result.note:
        lines.append(f"note: {result.note}")
    return "\n".join(lines)


def _evaluation_rows(result: Evaluation) -> list[tuple[str, str, str, str]]:
    rows = [("quantity", "mean", "stderr", "MC stderr")]
    for name, label in (("monte_carlo", "ELBO, Monte Carlo"), ("analytic_kl", "ELBO, analytic KL")):
        e = result.elbo[name]
        rows.append((label, _fmt(e["mean"]), _fmt(e["stderr"]), _fmt(e["mc_stderr"])))
    rows.append(("reconstruction E_q log p(x|z)", _fmt(result.reconstruction), "", ""))
    rows.append(("KL(q(z|x) || p(z))", _fmt(result.kl), "", ""))
    for row in result.log_likelihood:
        rows.append(
            (
                f"log p(x), K={row['k']}",
                _fmt(row["mean"]),
                _fmt(row["stderr"]),
                _fmt(row["mc_stderr"]),
            )
        )
    if result.ais:
        rows += _ais_rows(result.ais)
    rows.append((f"bits/dim (K={result.bits_per_dim_k})", _fmt(result.bits_per_dim, 4), "", ""))
    active = result.active_units
    rows.append(
        (
            f"active units (var > {active['threshold']})",
            f"{active['count']}/{len(active['variances'])}",
            "",
            "",
        )
    )
    return rows


def _ais_rows(ais: dict) -> list[tuple[str, str, str, str]]:
    """Per number of transitions T: the AIS estimate, its difference to IWAE and the BDMC gap."""
    rows = []
    for row in ais["rows"]:
        label = f"log p(x), AIS T={row['num_steps']} C={ais['num_chains']} ({ais['initial']})"
        rows.append((label, _fmt(row["mean"]), _fmt(row["stderr"]), _fmt(row["mc_stderr"])))
        if "minus_iwae" in row:
            gap = row["minus_iwae"]
            rows.append((f"  AIS - IWAE K={gap['k']}", _fmt(gap["mean"]), _fmt(gap["stderr"]), ""))
        if "bdmc" in row:
            bdmc = row["bdmc"]
            label = f"  BDMC gap, {bdmc['num_points']} simulated"
            rows.append((label, _fmt(bdmc["gap"]), _fmt(bdmc["gap_stderr"]), ""))
    return rows


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as aligned lines: the first column left-aligned, the others right-aligned, and a
    rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_comparison_markdown(result: Comparison, command: str | None = None) -> str:
    """A :class:`~pyro_vae.compare.Comparison` as markdown ready to paste into a README.

    :param command: the command that made it, shown in a code block.
    """
    model = result.model
    lines = [
        f"### Estimator study: {model['dataset']}, prior {model['prior']}, "
        f"guide {model['guide']}, latent dim {model['latent_dim']}",
        "",
    ]
    if command:
        lines += ["```bash", command, "```", ""]
    if result.note:
        lines += [f"**Note: {result.note}**", ""]
    lines += _elbo_markdown(result.elbo_variance) + [""]
    lines += _gradient_markdown(result.gradient_variance, result.analytic_kl_available)
    lines += [""] + _objective_gradients_markdown(result.objective_gradients)
    if result.training:
        lines += [""] + _training_markdown(result.training)
    return "\n".join(lines) + "\n"


def _elbo_markdown(ev: dict) -> list[str]:
    lines = [
        f"ELBO of each of {ev['num_points']} test points estimated {ev['num_draws']} times "
        "(one draw of z each), trained parameters fixed; nats per datapoint:",
        "",
        "| estimator | mean ELBO | mean std of one draw | median std |",
        "|---|---:|---:|---:|",
    ]
    for label in ESTIMATORS:
        e = ev[label]
        lines.append(
            f"| {LABELS[label]} | {e['mean']:.3f} | {e['mean_std']:.3f} | {e['median_std']:.3f} |"
        )
    lines += [
        "",
        f"Difference of the means (Monte Carlo - analytic): {ev['difference']:.4f} nats = "
        f"{_num(ev['difference_in_stderrs'])} standard errors (both estimate the same ELBO). "
        f"Std ratio Monte Carlo / analytic: {_num(ev['std_ratio'])} (variance ratio "
        f"{_num(ev['variance_ratio'])}; median per-point std ratio "
        f"{_num((ev['std_ratio_quantiles'] or {}).get('50%'))}).",
    ]
    if ev["std_ratio"] is not None and ev["std_ratio"] < 1:
        lines.append(
            "Here the Monte Carlo estimator has the lower variance: its sampled "
            "log p(z) - log q(z|x) is correlated with log p(x|z) and partly cancels its noise "
            "(at the exact posterior the cancellation is complete; Roeder et al. 2017)."
        )
    return lines


def _gradient_markdown(gv: dict, analytic: bool) -> list[str]:
    lines = [
        f"Gradient of the mean loss per datapoint on one fixed minibatch of {gv['batch_size']} "
        f"training points, {gv['num_draws']} draws per estimator (the same z for both):",
        "",
        "| parameters | estimator | norm of mean gradient | total variance | SNR |",
        "|---|---|---:|---:|---:|",
    ]
    for group in gv["groups"]:
        for label in ESTIMATORS:
            s = gv[label][group]
            lines.append(
                f"| {group} ({gv['groups'][group]}) | {LABELS[label]} | {s['mean_norm']:.4g} | "
                f"{s['total_variance']:.4g} | {_num(s['snr'])} |"
            )
    ratios = ", ".join(f"{g} {_num(r)}" for g, r in gv["variance_ratio"].items())
    lines += ["", f"Gradient variance ratio Monte Carlo / analytic: {ratios}."]
    for group, ratio in gv["variance_ratio"].items():
        if ratio is not None and ratio <= 1.05:
            if not analytic:
                why = "without a closed-form KL both are the same estimator, and drew the same z"
            elif group == "decoder":
                why = (
                    "decoder and likelihood gradients come from log p(x|z) alone, which is the "
                    "same in both estimators for the same z (only prior parameters, if any, see "
                    "the KL)"
                )
            else:
                why = "the sampled KL is not the dominant source of its gradient noise here"
            lines.append(
                f"Analytic KL does not reduce the gradient variance of the {group} parameters "
                f"(ratio {_num(ratio)}): {why}."
            )
    return lines


def _objective_gradients_markdown(grid: dict) -> list[str]:
    groups = list(grid["groups"])
    lines = [
        f"Gradient signal-to-noise ratio by objective and number of particles K, on the same "
        f"minibatch of {grid['batch_size']} training points, {grid['num_draws']} draws per row: "
        "||mean|| / sqrt(total variance), and in parentheses the median over parameters of "
        "|mean| / std. `trace`, `meanfield` and `stl` estimate the gradient of the ELBO, "
        "`iwae` and `dreg` that of the IWAE-K bound:",
        "",
        "| objective | K | " + " | ".join(f"{g} SNR | {g} total variance" for g in groups) + " |",
        "|---|---:|" + "---:|---:|" * len(groups),
    ]
    for row in grid["rows"]:
        cells = []
        for g in groups:
            s = row[g]
            cells += [f"{_num(s['snr'])} ({_num(s['median_snr'])})", _num(s["total_variance"], 4)]
        lines.append(f"| {row['objective']} | {row['num_particles']} | " + " | ".join(cells) + " |")
    return lines + ["", f"![gradient SNR against K]({SNR_FIGURE})"]


def _training_markdown(training: dict) -> list[str]:
    lines = [
        f"Trained from the same initialisation and seed for {training['seconds']:g} s of "
        f"training each, K = {training['num_particles']} for every objective; scored on the test "
        f"points by the ELBO (analytic KL, one draw), the IWAE bound "
        f"(K = {training['score_samples']}) and, at the end, log p(x) "
        f"(K = {training['num_samples']}); the difference is to the first row, paired over the "
        "same test points (± is over the test points, for this one training run of each):",
        "",
        "| trained with | steps | seconds | test ELBO | test IWAE bound | test log p(x) | "
        "difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (name, rows) in enumerate(training["curves"].items()):
        last, ll = rows[-1], training["log_likelihood"][name]
        cells = [name, str(last["step"]), _fmt(last["seconds"], 1), _fmt(last.get("test_elbo"))]
        cells.append(_fmt(last.get("test_iwae")))
        if "diverged" in ll:
            cells += [f"diverged: {ll['diverged']}", ""]
        else:
            cells.append(f"{_fmt(ll['mean'])} ± {_num(ll['stderr'])}")
            diff = f"{_fmt(ll['difference'], 2, sign=True)} ± {_num(ll['difference_stderr'])}"
            cells.append(diff if i else "reference")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Seconds count training steps only (not the scores) and depend on the load of the machine.",
        "",
        f"![test IWAE bound against steps and seconds]({CURVES_FIGURE})",
    ]
    return lines


def write_comparison(
    run_dir: str | Path, result: Comparison, command: str | None = None
) -> list[Path]:
    """Write ``comparison.json``, ``comparison.md`` and the figures into ``run_dir``.

    :param command: the command that made the comparison, for the markdown.
    :returns: the paths written.
    """
    run_dir = Path(run_dir)
    paths = [run_dir / COMPARISON_FILE, run_dir / COMPARISON_MARKDOWN]
    atomic_write_text(paths[0], dumps_json(result))
    atomic_write_text(paths[1], format_comparison_markdown(result, command))
    return paths + save_figures(comparison_figures(result), run_dir)


def comparison_figures(result: Comparison) -> dict[str, Figure]:
    """The figures of a comparison by file name: the training curves (when it has them), the
    gradient SNR against K and the histogram of the per-point std ratios."""
    figures = {}
    if result.training:
        training = result.training
        figures[CURVES_FIGURE] = plot_training_comparison(
            training["curves"],
            training["score"],
            f"test IWAE bound, K = {training['score_samples']} (nats)",
        )
    figures[SNR_FIGURE] = plot_gradient_snr(result.objective_gradients["rows"])
    ratios = [r for r in result.elbo_variance["std_ratios"] if r is not None and r > 0]
    if ratios:
        figures[STD_RATIO_FIGURE] = plot_histogram(
            ratios,
            "std of one Monte Carlo ELBO draw / std of one analytic-KL draw, per test point",
            reference=1.0,
            log_x=True,
        )
    return figures


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    return "-" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"
