"""The benchmark scripts, run in their tiny modes so that they cannot rot.

No timing is checked (timings belong in the scripts' results, not in tests): only that every
section runs, writes what the README and ``benchmarks/RESULTS.md`` quote, and stays coherent.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vae.cli import main
from pyro_vae.evaluate import evaluate_run
from pyro_vae.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "objectives", "logpx", "evaluate", "peer", "profile")


def run_script(*command, env=None):
    return subprocess.run(
        command, cwd=ROOT, check=False, capture_output=True, text=True, timeout=900, env=env
    )


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def check_timings(timings: dict, names: set) -> None:
    assert set(timings) == names
    for t in timings.values():
        assert 0 < t["min"] <= t["median"] <= t["max"]


@pytest.fixture(scope="module")
def tiny_speed(tmp_path_factory):
    """``speed.py --tiny`` once with every section, then ``--sections logpx`` into the same
    folder (which must keep the other sections)."""
    out = tmp_path_factory.mktemp("speed")
    base = [sys.executable, "benchmarks/speed.py", "--tiny", "--out", str(out)]
    base += ["--results-md", str(out / "RESULTS.md")]
    first = run_script(*base)
    assert first.returncode == 0, first.stderr
    second = run_script(*base, "--sections", "logpx")
    assert second.returncode == 0, second.stderr
    return json.loads((out / "speed-cpu.json").read_text()), (out / "RESULTS.md").read_text()


def test_speed_harness_measures_every_contender_of_the_training_section(tiny_speed):
    report, _ = tiny_speed
    assert set(report["commands"]) == set(SECTIONS)
    assert "--sections logpx" in report["commands"]["logpx"]["command"]
    assert [(r["batch_size"], r["elbo"]) for r in report["train"]] == [
        (32, "trace"),
        (32, "meanfield"),
        (64, "trace"),
        (64, "meanfield"),
    ]
    for row in report["train"]:
        check_timings(row["timings"], {"pyro_vae", "plain", "plain_fused"})
        ratio = row["pyro_vae_images_per_s"] / row["plain_images_per_s"]
        assert row["fit_vs_plain"] == pytest.approx(ratio)
        assert all(positive(row[f"{n}_roofline"]) for n in ("pyro_vae", "plain", "plain_fused"))
        assert row["pyro_vae_roofline"] / row["plain_roofline"] == pytest.approx(ratio)


def test_speed_harness_measures_the_other_objectives_against_hand_written_ones(tiny_speed):
    report, text = tiny_speed
    rows = report["objectives"]
    assert [(r["elbo"], r["num_particles"]) for r in rows] == [("stl", 1), ("iwae", 5), ("dreg", 5)]
    for row in rows:
        check_timings(row["timings"], {"pyro_vae", "plain", "plain_fused"})
        ratio = row["pyro_vae_images_per_s"] / row["plain_images_per_s"]
        assert row["fit_vs_plain"] == pytest.approx(ratio)
        assert f"| {row['elbo']} | {row['num_particles']} |" in text


def test_speed_harness_logpx_peer_evaluate_and_profile_sections(tiny_speed):
    report, _ = tiny_speed
    logpx = report["logpx"]
    check_timings(logpx["timings"], {"pyro_vae", "plain"})
    assert logpx["num_samples"] == 50 and logpx["images"] == 2
    assert positive(logpx["pyro_vae_samples_per_s"]) and positive(logpx["pyro_vae_roofline"])
    assert 100 < logpx["pyro_vae_peak_mb"] < 100_000
    check_timings(report["peer"]["timings"], {"pyro_vae", "pyro_example"})
    assert positive(report["peer"]["fit_vs_example"])
    evaluation = report["evaluate"]
    assert evaluation["num_datapoints"] == 20 and evaluation["trained_here"]
    assert positive(evaluation["seconds"]) and positive(evaluation["peak_mb"])
    assert evaluation["command"].startswith("pyro-vae evaluate ")
    for part in ("train_step", "logpx"):
        fractions = [op["fraction"] for op in report["profile"][part]]
        assert len(fractions) == 8 and 0 < sum(fractions) <= 1 + 1e-9
        assert fractions == sorted(fractions, reverse=True)
        assert 0 < report["profile"]["matmul_ceiling"][part] < 2


def test_speed_harness_renders_every_section_into_results_md(tiny_speed):
    report, text = tiny_speed
    for heading in ("### Training", "### Peer", "### log p(x)", "### Full evaluation"):
        assert heading in text
    assert "Where the time goes" in text
    for row in report["train"]:
        assert f"**{row['fit_vs_plain']:.2f}**" in text
    assert report["commands"]["train"]["command"] in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sections", "train,speedup"], "unknown section 'speedup'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_speed_harness_bad_settings_are_one_line_errors(args, message, tmp_path):
    result = run_script(
        sys.executable, "benchmarks/speed.py", "--tiny", "--out", str(tmp_path), *args
    )
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_mixture_benchmark_tiny(tmp_path):
    result = run_script(
        sys.executable,
        "benchmarks/mixture_log_prob.py",
        "--num-samples",
        "50",
        "--repeats",
        "2",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "mixture_log_prob.json").read_text())
    assert [r["num_components"] for r in report["results"]] == [10, 500]
    assert all(r["DiagonalNormalMixture"]["max_abs_error"] < 1e-3 for r in report["results"])


def test_mnist_results_script_tiny(tmp_path):
    env = {**os.environ, "TINY": "1", "OUT": str(tmp_path)}
    result = run_script("bash", "benchmarks/mnist_results.sh", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    files = {p.name for p in (tmp_path / "results").iterdir()}
    runs = ("mnist", "mnist-mixture", "mnist-vamp", "mnist-fullcov", "mnist-iaf")
    for run in (*runs, "mnist-iwae-k50", "mnist-dreg-k50"):
        assert {f"{run}-metrics.csv", f"{run}-evaluation.json"} <= files
    assert {"comparison.json", "comparison.md", "mixture_log_prob.json"} <= files
    ais = json.loads((tmp_path / "results" / "mnist-ais-evaluation.json").read_text())["ais"]
    assert [row["num_steps"] for row in ais["rows"]] == [3, 10] and "bdmc" in ais["rows"][0]
    assert {"comparison_curves.png", "comparison_snr.png"} <= files
    metrics = (tmp_path / "results" / "mnist-dreg-k50-metrics.csv").read_text().splitlines()
    assert metrics[0].split(",")[:7] == [
        "epoch", "step", "kl_scale", "lr", "train_elbo", "test_elbo", "test_iwae"
    ]  # fmt: skip
    study = json.loads((tmp_path / "results" / "comparison.json").read_text())
    assert list(study["training"]["curves"]) == ["trace", "meanfield", "stl", "iwae", "dreg"]


def test_reproduce_script_tiny_labels_budget_runs_and_resumes_them(tmp_path):
    env = os.environ | {"TINY": "1", "OUT": str(tmp_path)}
    first = run_script("bash", "benchmarks/reproduce.sh", env=env)
    assert first.returncode == 0, first.stderr
    again = run_script("bash", "benchmarks/reproduce.sh", "", "vampprior-paper-vamp",
                       env=env | {"EPOCHS": "2"})  # fmt: skip
    assert again.returncode == 0, again.stderr
    runs = tmp_path / "runs"
    assert len(read_metrics(runs / "reproduce-vampprior-paper-vamp")) == 2  # resumed
    table = (tmp_path / "results" / "reproduce.md").read_text().splitlines()
    # The table holds every row run so far, from the files kept beside it.
    names = [line.split(" | ")[0] for line in table[2:]]
    assert names == ["| iwae-paper-2layer-k50", "| vampprior-paper-vamp"]
    assert (tmp_path / "results" / "reproduce-vampprior-paper-vamp" / "evaluation.json").is_file()
    cells = table[3].split(" | ")
    assert cells[1].startswith("`vampprior-paper-vamp`, given: ") and "epochs" in cells[1]
    assert cells[2] == "-82.43" and "(K=10, 300 images)" in cells[3] and cells[4] == "2"
    assert cells[5] == "**stopped by the budget** at 2 of 2000 epochs"
    assert "CPU cores" in cells[7]
    (first_row,) = [line for line in first.stdout.splitlines() if line.startswith("| iwae")]
    assert first_row.startswith("| iwae-paper-2layer-k50 | `iwae-paper-2layer`")
    assert "at 1 of 3280 epochs" in first_row
    assert (tmp_path / "results" / "reproduce_curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    "name, k", [("trace", 1), ("meanfield", 1), ("stl", 1), ("iwae", 5), ("dreg", 5)]
)
def test_hand_written_contenders_compute_the_library_objectives(name, k, monkeypatch):
    """The speed comparison is fair only if the hand-written losses are the same objectives:
    on the same draws (torch's random normals made to come out as Pyro's do), their values
    and gradients are pyro_vae's, in float64."""
    import copy

    import pyro
    import torch
    from torch.distributions.utils import _standard_normal

    sys.path.insert(0, str(ROOT / "benchmarks"))
    speed = __import__("speed")
    from pyro_vae import VAE
    from pyro_vae.objectives import get_elbo

    torch.manual_seed(0)
    vae = VAE(64, latent_dim=4, hidden_dims=(32,)).double()
    plain = speed.PlainVAE(copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder), 4)
    x = torch.bernoulli(torch.full((6, 64), 0.3, dtype=torch.float64))

    def normal(shape, device=None):
        return _standard_normal(shape, dtype=torch.float64, device=device)

    monkeypatch.setattr(torch, "randn", normal)
    monkeypatch.setattr(torch, "randn_like", lambda t: normal(t.shape, t.device))
    torch.manual_seed(1)
    expected = plain.loss(x, name, k)
    expected.backward()
    torch.manual_seed(1)
    with pyro.validation_enabled(False):
        actual = get_elbo(name, k).differentiable_loss(vae.model, vae.guide, x)
    actual.backward()
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-12, atol=1e-10)
    library = [*vae.encoder.parameters(), *vae.decoder.parameters()]
    for a, b in zip(library, plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


#: The model shipped under benchmarks/runs/ (issue 13): its evaluation over all 10,000 test
#: images, and the first 100 images evaluated again here, from the committed files.
SHIPPED = ROOT / "benchmarks" / "runs" / "mnist-dreg-k5"


def k5000(evaluation: dict) -> dict:
    return next(row for row in evaluation["log_likelihood"] if row["k"] == 5000)


def test_the_shipped_model_meets_its_target_and_re_evaluates_to_its_number(mnist_dir, tmp_path):
    full = json.loads((SHIPPED / "evaluation.json").read_text())
    assert (full["num_datapoints"], full["split"], full["binarize"]) == (10000, "test", "dynamic")
    assert k5000(full)["mean"] >= -88.0
    first = json.loads((SHIPPED / "evaluation-first100.json").read_text())
    # Another seed, from the committed config.json and checkpoint alone: the same number.
    again = evaluate_run(SHIPPED, data_dir=mnist_dir, limit=100, seed=1)
    assert again.model["epochs"] == first["model"]["epochs"] == full["model"]["epochs"]
    assert abs(k5000(again.as_dict())["mean"] - k5000(first)["mean"]) < 0.3
    assert main(["sample", str(SHIPPED), "--num", "4", "--out", str(tmp_path / "s.png")]) == 0
