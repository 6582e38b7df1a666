import json
import math

import pytest

from pyro_vae import Comparison, Evaluation, compare_run
from pyro_vae.report import (
    COMPARISON_FILE,
    COMPARISON_MARKDOWN,
    CURVES_FIGURE,
    EVALUATION_FILE,
    SNR_FIGURE,
    STD_RATIO_FIGURE,
    comparison_figures,
    dumps_json,
    evaluation_file,
    format_comparison_markdown,
    format_evaluation,
    write_comparison,
    write_evaluation,
)


def evaluation(**changes) -> Evaluation:
    """A small evaluation result, as evaluate_run makes them."""
    estimator = {"mean": -30.0, "stderr": 0.5, "mc_stderr": 0.01}
    values = {
        "num_datapoints": 300,
        "data_dim": 64,
        "seed": 0,
        "num_samples": 100,
        "elbo": {"monte_carlo": estimator, "analytic_kl": {**estimator, "mean": -29.5}},
        "analytic_kl_available": True,
        "reconstruction": -25.0,
        "kl": 4.5,
        "log_likelihood": [
            {"k": 1, "mean": -30.0, "stderr": 0.5, "mc_stderr_mean": None, "mc_stderr": None},
            {"k": 100, "mean": -27.25, "stderr": 0.5, "mc_stderr_mean": 0.1, "mc_stderr": 0.01},
        ],
        "bits_per_dim": 27.25 / (64 * math.log(2)),
        "bits_per_dim_k": 100,
        "active_units": {"count": 1, "threshold": 0.01, "variances": [0.5, 0.001]},
        "note": None,
        "seconds": {"total": 1.25},
        "peak_memory_mb": 512.0,
        "run_dir": "runs/r",
        "dataset": "digits",
        "split": "test",
        "binarize": "dynamic",
        "model": {"prior": "normal"},
    }
    return Evaluation(**{**values, **changes})


def comparison(training: bool = True, std_ratio: float = 1.5, note: str | None = None):
    """A small comparison result, as compare_run makes them."""
    per_estimator = {"mean": -30.0, "mean_std": 3.0, "median_std": 2.0}
    elbo_variance = {
        "num_points": 10,
        "num_draws": 5,
        "monte_carlo": per_estimator,
        "analytic_kl": {**per_estimator, "mean": -30.1, "mean_std": 2.0},
        "difference": 0.1,
        "difference_stderr": 0.2,
        "difference_in_stderrs": 0.5,
        "std_ratio": std_ratio,
        "variance_ratio": std_ratio**2,
        "std_ratio_quantiles": {"50%": std_ratio},
        "std_ratios": [std_ratio, None, 2.0],
    }
    group = {"mean_norm": 1.0, "total_variance": 2.0, "snr": 0.7, "median_snr": 0.4}
    gradient_variance = {
        "batch_size": 8,
        "num_draws": 5,
        "groups": {"decoder": 10, "encoder": 20},
        "monte_carlo": {"decoder": group, "encoder": group},
        "analytic_kl": {"decoder": group, "encoder": {**group, "total_variance": 1.0}},
        "variance_ratio": {"decoder": 1.0, "encoder": 2.0},
        "snr_ratio": {"decoder": 1.0, "encoder": 0.7},
    }
    grid = {key: gradient_variance[key] for key in ("batch_size", "num_draws", "groups")}
    grid["rows"] = [
        {"objective": name, "num_particles": k, "decoder": group, "encoder": {**group, "snr": snr}}
        for name, k, snr in (("trace", 1, 0.5), ("trace", 5, 1.0), ("dreg", 5, 2.0))
    ]
    rows = [{"epoch": 0, "step": 0, "seconds": 0.0, "test_elbo": -41.0, "test_iwae": -40.0}]
    rows.append({"epoch": 1, "step": 8, "seconds": 0.5, "test_elbo": -36.0, "test_iwae": -35.0})
    ll = {"mean": -34.5, "stderr": 1.5, "difference": 0.0, "difference_stderr": 0.0}
    curves = {"seconds": 0.5, "num_particles": 5, "score": "test_iwae", "score_samples": 100}
    curves |= {"num_samples": 5000, "curves": {"trace": rows, "dreg": rows[:1]}}
    curves["log_likelihood"] = {"trace": ll, "dreg": {**ll, "difference": -5.5}}
    return Comparison(
        run_dir="runs/r",
        model={"dataset": "digits", "prior": "normal", "guide": "diagonal", "latent_dim": 2},
        analytic_kl_available=note is None,
        note=note,
        settings={"num_draws": 5},
        elbo_variance=elbo_variance,
        gradient_variance=gradient_variance,
        objective_gradients=grid,
        training=curves if training else None,
    )


# -- JSON -----------------------------------------------------------------------------------------


def test_dumps_json_writes_nan_and_infinities_as_null():
    text = dumps_json({"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, "x")})
    assert json.loads(text) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"]}
    assert "NaN" not in text and "Infinity" not in text and text.endswith("}\n")


def test_dumps_json_of_a_result_is_its_dict():
    result = evaluation(kl=math.nan)
    assert json.loads(dumps_json(result)) == {**result.as_dict(), "kl": None}
    assert list(json.loads(dumps_json(comparison()))) == list(comparison().as_dict())


def test_write_evaluation_writes_the_json_and_returns_the_path(tmp_path):
    path = write_evaluation(tmp_path, evaluation())
    assert path == tmp_path / EVALUATION_FILE
    assert json.loads(path.read_text()) == evaluation().as_dict()
    assert [p.name for p in tmp_path.iterdir()] == [EVALUATION_FILE]


def test_evaluation_file_names_a_quick_look_apart_from_the_full_evaluation():
    assert evaluation_file() == "evaluation.json"
    assert evaluation_file("train") == "evaluation-train.json"
    assert evaluation_file("test", 40) == "evaluation-first40.json"
    assert evaluation_file("train", 5) == "evaluation-train-first5.json"


# -- text table -----------------------------------------------------------------------------------


def test_format_evaluation_is_an_aligned_table():
    lines = format_evaluation(evaluation()).splitlines()
    assert lines[0] == "digits test split, N=300, nats per datapoint, stderr over datapoints"
    header, rule = lines[1], lines[2]
    assert header.split() == ["quantity", "mean", "stderr", "MC", "stderr"]
    assert set(rule) == {"-", " "} and len(rule) == len(lines[3])
    assert lines[3].split()[-3:] == ["-30.00", "0.50", "0.01"]
    assert lines[3].startswith("ELBO, Monte Carlo") and lines[4].startswith("ELBO, analytic KL")
    assert "log p(x), K=1" in lines[7] and lines[7].endswith("-") and "-27.25" in lines[8]
    assert lines[9].startswith("bits/dim (K=100)") and lines[9].endswith("0.6143")
    assert lines[10].split()[-1] == "1/2" and "var > 0.01" in lines[10]
    assert lines[11] == "1.2 s, peak memory 512 MB" and len(lines) == 12
    with_note = format_evaluation(evaluation(note="a density", dataset=None, split=None))
    assert with_note.splitlines()[-1] == "note: a density"
    assert with_note.startswith("data  split, N=300")


def test_format_evaluation_puts_the_ais_rows_after_the_iwae_rows():
    row = {"num_steps": 100, "mean": -27.0, "stderr": 0.5, "mc_stderr": 0.02}
    row |= {"minus_iwae": {"k": 100, "mean": 0.25, "stderr": 0.01}}
    row |= {"bdmc": {"num_points": 50, "gap": 0.125, "gap_stderr": 0.03}}
    ais = {"num_chains": 8, "initial": "guide", "rows": [row, {**row, "num_steps": 500}]}
    lines = format_evaluation(evaluation(ais=ais)).splitlines()
    assert "-27.25" in lines[8] and lines[9].startswith("log p(x), AIS T=100 C=8 (guide)")
    assert lines[9].split()[-3:] == ["-27.00", "0.50", "0.02"]
    assert lines[10].split() == ["AIS", "-", "IWAE", "K=100", "0.25", "0.01"]
    assert lines[11].split() == ["BDMC", "gap,", "50", "simulated", "0.12", "0.03"]
    assert lines[12].startswith("log p(x), AIS T=500") and lines[15].startswith("bits/dim")
    widths = {len(line) for line in lines[2:4]}
    assert len(widths) == 1  # the table stays aligned with the longer labels


# -- markdown and figures -------------------------------------------------------------------------


def test_format_comparison_markdown_has_the_tables_and_the_command():
    markdown = format_comparison_markdown(comparison(), "pyro-vae compare runs/r --draws 5")
    lines = markdown.splitlines()
    assert lines[0] == "### Estimator study: digits, prior normal, guide diagonal, latent dim 2"
    assert lines[2:5] == ["```bash", "pyro-vae compare runs/r --draws 5", "```"]
    assert "| Monte Carlo KL | -30.000 | 3.000 | 2.000 |" in lines
    assert "| decoder (10) | analytic KL | 1 | 2 | 0.7 |" in lines
    assert "Gradient variance ratio Monte Carlo / analytic: decoder 1, encoder 2." in lines
    assert "does not reduce the gradient variance of the decoder parameters" in markdown
    assert "encoder parameters" not in markdown  # its ratio is 2: the analytic KL helps there
    assert "| objective | K | decoder SNR | decoder total variance | encoder SNR |" in markdown
    assert "| dreg | 5 | 0.7 (0.4) | 2 | 2 (0.4) | 2 |" in lines
    assert f"![gradient SNR against K]({SNR_FIGURE})" in lines
    assert "for 0.5 s of training each, K = 5 for every objective" in markdown
    assert "| trace | 8 | 0.5 | -36.00 | -35.00 | -34.50 ± 1.5 | reference |" in lines
    assert "| dreg | 0 | 0.0 | -41.00 | -40.00 | -34.50 ± 1.5 | -5.50 ± 0 |" in lines
    assert f"![test IWAE bound against steps and seconds]({CURVES_FIGURE})" in lines
    assert "Monte Carlo estimator has the lower variance" not in markdown
    assert markdown.endswith("\n") and not markdown.endswith("\n\n")


def test_format_comparison_markdown_reads_back_json_nulls_and_divergence():
    result = comparison()
    result.objective_gradients["rows"][0]["decoder"] = dict.fromkeys(
        ("mean_norm", "total_variance", "snr", "median_snr")
    )
    result.training["curves"]["trace"][-1]["test_iwae"] = None
    result.training["log_likelihood"]["dreg"] = {"diverged": "the loss became nan at epoch 1"}
    lines = format_comparison_markdown(result).splitlines()
    assert "| trace | 1 | n/a (n/a) | n/a | 0.5 (0.4) | 2 |" in lines
    assert "| trace | 8 | 0.5 | -36.00 | - | -34.50 ± 1.5 | reference |" in lines
    assert (
        "| dreg | 0 | 0.0 | -41.00 | -40.00 | diverged: the loss became nan at epoch 1 |  |"
        in lines
    )


def test_format_comparison_markdown_says_what_the_numbers_mean():
    markdown = format_comparison_markdown(comparison(training=False, std_ratio=0.8, note="no KL"))
    assert "```" not in markdown and "**Note: no KL**" in markdown
    assert "Monte Carlo estimator has the lower variance" in markdown
    assert "without a closed-form KL both are the same estimator" in markdown
    assert "Trained from the same initialisation" not in markdown


def test_comparison_figures_skip_the_curves_without_training():
    figures = {CURVES_FIGURE, SNR_FIGURE, STD_RATIO_FIGURE}
    assert set(comparison_figures(comparison())) == figures
    assert set(comparison_figures(comparison(training=False))) == {SNR_FIGURE, STD_RATIO_FIGURE}


def test_write_comparison_writes_json_markdown_and_figures(tmp_path):
    paths = write_comparison(tmp_path, comparison(), "pyro-vae compare X")
    names = [p.name for p in paths]
    assert names == [
        COMPARISON_FILE,
        COMPARISON_MARKDOWN,
        CURVES_FIGURE,
        SNR_FIGURE,
        STD_RATIO_FIGURE,
    ]
    assert json.loads((tmp_path / COMPARISON_FILE).read_text()) == comparison().as_dict()
    assert "pyro-vae compare X" in (tmp_path / COMPARISON_MARKDOWN).read_text()
    for path in paths[2:]:
        assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def mixture_run_dir(tmp_path_factory, train_tiny_run):
    return train_tiny_run(tmp_path_factory.mktemp("report") / "mixture", "mixture")


def test_write_comparison_without_training_skips_the_curves(mixture_run_dir, tmp_path):
    small = {"num_points": 10, "batch_size": 8, "particles": (1,), "train_seconds": 0}
    result = compare_run(mixture_run_dir, num_draws=3, **small)
    names = {p.name for p in write_comparison(tmp_path, result)}
    assert names == {
        "comparison.json",
        "comparison.md",
        "comparison_snr.png",
        "comparison_std_ratio.png",
    }
