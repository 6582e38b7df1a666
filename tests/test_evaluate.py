import dataclasses
import json
import math
import platform
import resource
import sys
import time

import pyro.distributions as dist
import pytest
import torch

from pyro_vae import VAE, Evaluation, active_units, evaluate_run, evaluate_vae, load_run
from pyro_vae.cli import main
from pyro_vae.data import select_split
from pyro_vae.distributions import inverse_positive_scale
from pyro_vae.evaluate import RUN_FIELDS, fix_malloc_threshold
from pyro_vae.report import EVALUATION_FILE

#: log p(x) of 64 pixels under a coin-flip model, the worst a trained Bernoulli model does.
COIN_FLIPS = 64 * math.log(0.5)

#: Draws per datapoint of each ELBO estimator: enough for the paired difference of the two to
#: resolve a 15% error in the KL (about 0.25 nats here; see below).
NUM_ELBO_PARTICLES = 100


def max_rss_mb():
    """Peak resident memory of this process in MB (getrusage: kilobytes; bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_tiny_run):
    return train_tiny_run(tmp_path_factory.mktemp("evaluate") / "run")


@pytest.fixture(scope="module")
def measured(run_dir):
    """The evaluation, with the wall-clock time and peak memory measured around it."""
    rss_before, start = max_rss_mb(), time.perf_counter()
    result = evaluate_run(run_dir, num_samples=100, num_elbo_particles=NUM_ELBO_PARTICLES)
    return {
        "result": result,
        "seconds": time.perf_counter() - start,
        "rss_mb": (rss_before, max_rss_mb()),
    }


@pytest.fixture(scope="module")
def result(measured):
    return measured["result"]


def test_evaluate_run_reports_every_quantity(result, measured):
    data = result.as_dict()
    for key in ("elbo", "reconstruction", "kl", "log_likelihood", "bits_per_dim"):
        assert key in data
    assert {"active_units", "seconds", "peak_memory_mb", "analytic_kl_available"} <= set(data)
    assert result.dataset == "digits" and result.split == "test"
    assert result.binarize == "dynamic" and result.num_datapoints == 300
    assert [row["k"] for row in result.log_likelihood] == [1, 10, 100]
    assert result.analytic_kl_available and result.note is None
    assert result.elbo["analytic_kl"]["analytic_sites"] == ["z"]
    assert result.elbo["monte_carlo"]["sampled_sites"] == ["z"]
    assert result.log_likelihood[0]["mc_stderr"] is None  # undefined for K = 1
    seconds = result.seconds
    assert 0 < seconds["total"] <= measured["seconds"]
    parts = seconds["elbo"] + seconds["log_likelihood"] + seconds["active_units"]
    assert parts == pytest.approx(seconds["total"], rel=1e-9)
    # The process's peak resident memory in MB: between the peaks before and after the call.
    rss_before, rss_after = measured["rss_mb"]
    assert rss_before <= result.peak_memory_mb <= rss_after
    json.dumps(data, allow_nan=False)


def test_evaluation_as_dict_is_evaluation_json_in_its_order(result):
    data = result.as_dict()
    assert list(data) == [
        *RUN_FIELDS,
        "num_datapoints",
        "data_dim",
        "seed",
        "num_samples",
        "elbo",
        "analytic_kl_available",
        "reconstruction",
        "kl",
        "log_likelihood",
        "bits_per_dim",
        "bits_per_dim_k",
        "active_units",
        "note",
        "seconds",
        "peak_memory_mb",
        "ais",
    ]
    assert data["model"] == {
        "dataset": "digits",
        "prior": "normal",
        "likelihood": "bernoulli",
        "guide": "diagonal",
        "latent_dim": 2,
        "hidden_dims": [16],
        "trained_with_elbo": "trace",
        "epochs": 2,
        "checkpoint": "checkpoint.pt",
    }
    assert Evaluation(**{**data, "model": dict(data["model"])}) == result


def test_evaluate_vae_has_no_run_fields(run_dir, digits):
    vae = load_run(run_dir).vae
    result = evaluate_vae(vae, digits.test_x[:20], num_samples=5, ks=(1,))
    assert isinstance(result, Evaluation) and result.run_dir is None
    data = result.as_dict()
    assert not set(RUN_FIELDS) & set(data) and list(data)[0] == "num_datapoints"
    assert [row["k"] for row in result.log_likelihood] == [1, 5]


def test_log_likelihood_increases_with_num_samples(result):
    means = [row["mean"] for row in result.log_likelihood]
    assert means[-1] > means[0]
    for lower, higher in zip(result.log_likelihood, result.log_likelihood[1:]):
        assert higher["mean"] >= lower["mean"] - 3 * (lower["mc_stderr"] or 0)
    # The ELBO is a lower bound of the IWAE bound for any K > 1.
    assert result.elbo["analytic_kl"]["mean"] < means[-1]


def test_log_likelihood_matches_an_independent_importance_sampler(run_dir, digits, result):
    """log p(x) at K = 100 against importance sampling written out here from q, p(z) and
    p(x|z); independent draws, so the means agree within their Monte Carlo errors (a missing
    -log K would add log 100 = 4.6 nats). K = 1 is a one-draw ELBO: it agrees with the Monte
    Carlo ELBO within the noise of one draw per datapoint."""
    vae = load_run(run_dir).vae
    x = select_split(digits, "test")
    assert x.shape[0] == result.num_datapoints
    k = 100
    torch.manual_seed(1)
    with torch.no_grad():
        q = vae.encode(x)
        z = q.sample((k,))
        log_w = vae.decode(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)
    log_px = log_w.logsumexp(0) - math.log(k)
    v = log_w.softmax(0)
    mc_stderr = ((k * v.pow(2).sum(0) - 1) / (k - 1)).mean().sqrt() / math.sqrt(x.shape[0])
    row = result.log_likelihood[-1]
    assert row["k"] == k
    tolerance = 4.5 * math.hypot(row["mc_stderr"], mc_stderr)
    assert abs(row["mean"] - log_px.mean().item()) < tolerance, (row, log_px.mean(), tolerance)
    assert tolerance < 0.2

    one, elbo = result.log_likelihood[0], result.elbo["monte_carlo"]
    assert one["k"] == 1
    # mc_stderr * sqrt(P) is the noise of a mean of one draw per datapoint.
    tolerance = 4.5 * elbo["mc_stderr"] * math.sqrt(NUM_ELBO_PARTICLES + 1)
    assert abs(one["mean"] - elbo["mean"]) < tolerance, (one, elbo, tolerance)


def test_elbo_estimators_agree_within_standard_errors(result):
    """The two estimators estimate the same ELBO on the same datapoints: their paired
    difference has only Monte Carlo noise (0.02 nats with 100 draws per datapoint on 300), so
    an analytic KL 15% off (0.25 nats here) is resolved."""
    an = result.elbo["analytic_kl"]
    difference = result.elbo["difference"]
    assert abs(difference["mean"]) < 4 * difference["stderr"]
    assert 4 * difference["stderr"] < 0.15 * result.kl / 2
    assert result.reconstruction - result.kl == pytest.approx(an["mean"], abs=1e-4)
    assert result.kl > 0


def test_bits_per_dim_is_minus_log_likelihood_over_dims_ln2(result):
    best = result.log_likelihood[-1]
    assert result.bits_per_dim_k == best["k"] == 100
    assert result.bits_per_dim == -best["mean"] / (64 * math.log(2))


def test_a_coin_flip_model_has_one_bit_per_dim(digits):
    """Pinned by hand: a decoder with zero weights gives p(x|z) = Bernoulli(0.5) for every
    pixel, and a guide equal to the prior makes every importance weight p(x) = 2^-64, so every
    estimate is exactly 64 log(1/2) nats, every K included, with KL 0: 1 bit per dimension."""
    torch.manual_seed(0)
    vae = VAE(data_dim=64, latent_dim=2, hidden_dims=(16,)).eval()
    with torch.no_grad():
        for layer in (vae.decoder[-1], vae.encoder[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
        vae.encoder[-1].bias[2:] = inverse_positive_scale(1.0)  # q(z|x) = N(0, I)
    result = evaluate_vae(vae, select_split(digits, "test")[:50], num_samples=20)
    assert result.bits_per_dim == pytest.approx(1.0, abs=1e-6)
    assert [row["k"] for row in result.log_likelihood] == [1, 10, 20]
    for row in result.log_likelihood:
        assert row["mean"] == pytest.approx(COIN_FLIPS, abs=1e-4)
    for estimator in ("monte_carlo", "analytic_kl"):
        elbo = result.elbo[estimator]
        assert elbo["mean"] == pytest.approx(COIN_FLIPS, abs=1e-4)
        assert elbo["kl"] == pytest.approx(0.0, abs=1e-4)
    assert result.active_units["count"] == 0


def test_active_units_count_matches_variances(result, run_dir, digits):
    active = result.active_units
    assert len(active["variances"]) == 2
    assert active["count"] == sum(v > active["threshold"] for v in active["variances"])
    assert active["posterior_mean"] == "closed form"
    # Var over the test set of the Gaussian guide's mean, computed here from the encoder.
    with torch.no_grad():
        loc = load_run(run_dir).vae.encode(select_split(digits, "test")).mean
    expected = loc.var(0, correction=0).tolist()
    assert active["variances"] == pytest.approx(expected, rel=1e-4, abs=1e-7)


class _Encoder:
    """Stands in for a VAE in active_units: q(z|x) = N((x0, 0.01 x1), 1) or its flow form."""

    def __init__(self, flow):
        self.flow = flow

    def encode(self, x):
        base = dist.Normal(x[:, :2] * torch.tensor([1.0, 0.01]), 1.0).to_event(1)
        return dist.TransformedDistribution(base, []) if self.flow else base


def test_active_units_closed_form_variances():
    x = torch.randn(1000, 3)
    active = active_units(_Encoder(flow=False), x)
    expected = (x[:, :2] * torch.tensor([1.0, 0.01])).var(0, correction=0)
    assert active["variances"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert active["count"] == 1


class _RecordingEncoder(_Encoder):
    """The flow form of :class:`_Encoder`, recording every draw active_units makes."""

    def __init__(self):
        super().__init__(flow=True)
        self.draws = []

    def encode(self, x):
        q = super().encode(x)
        sample = q.sample

        def recorded(sample_shape=()):
            self.draws.append(sample(sample_shape))
            return self.draws[-1]

        q.sample = recorded
        return q


def test_active_units_sample_mean_is_corrected_for_its_noise():
    # With 20 draws the sample mean of an unused unit varies by 1/20 = 0.05 > 0.01 over x.
    x = torch.randn(8000, 3) * torch.tensor([0.5, 1.0, 1.0])
    encoder = _RecordingEncoder()
    active = active_units(encoder, x, num_mean_samples=20)
    assert active["posterior_mean"] == "mean of 20 draws"
    # Var_x of the 20-draw mean of dim 0 is Var(x0) + 1/20 + noise: 2 Cov(x0, noise) has sd
    # 2 sqrt(0.25 * 0.05 / 8000) = 0.0025, so abs=0.02 is 8 sd, and a missing or a double
    # correction (off by 0.05) fails.
    assert active["variances"][0] == pytest.approx(x[:, 0].var().item(), abs=0.02)
    assert active["variances"][1] < 0.01
    assert active["count"] == 1
    # The correction subtracted is E_x[Var_q(z_0 | x)] / 20 = 1 / 20, estimated from the draws
    # with sd sqrt(2 / 19 / 8000) / 20 = 0.0002.
    assert sum(d.shape[1] for d in encoder.draws) == 8000
    means = torch.cat([d.mean(0) for d in encoder.draws])
    uncorrected = means.var(0, correction=0)
    assert uncorrected[0] - active["variances"][0] == pytest.approx(1 / 20, abs=0.001)


def test_evaluation_repeats_with_seed_and_restores_the_rng(run_dir):
    state = torch.get_rng_state()
    first = evaluate_run(run_dir, num_samples=10, limit=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = evaluate_run(run_dir, num_samples=10, limit=20, seed=3)
    assert first.log_likelihood == second.log_likelihood
    assert first.elbo == second.elbo and first.num_datapoints == 20
    # The seed, not the caller's RNG state, fixes the draws: another seed gives other
    # numbers, and seed 3 repeats from another global state.
    other = evaluate_run(run_dir, num_samples=10, limit=20, seed=4)
    assert other.log_likelihood != first.log_likelihood
    assert other.elbo != first.elbo
    torch.manual_seed(999)
    third = evaluate_run(run_dir, num_samples=10, limit=20, seed=3)
    assert third.log_likelihood == first.log_likelihood and third.elbo == first.elbo


def test_evaluate_train_split_and_tensor_input(run_dir, digits):
    result = evaluate_run(run_dir, split="train", num_samples=5, limit=50)
    assert result.split == "train" and result.num_datapoints == 50
    x = select_split(digits, "train")[:50]
    assert evaluate_run(run_dir, x, num_samples=5).log_likelihood == result.log_likelihood


def test_no_analytic_kl_is_said_plainly(tmp_path, train_tiny_run):
    run_dir = train_tiny_run(tmp_path / "mixture", prior="mixture")
    run = load_run(run_dir)
    result = evaluate_run(run, num_samples=5, limit=30)
    assert not result.analytic_kl_available
    assert result.elbo["analytic_kl"]["analytic_sites"] == []
    assert "no analytic KL" in result.note and "'z'" in result.note
    assert "MixtureOfGaussians" in result.note


def test_evaluate_run_leaves_the_callers_run_config_alone(run_dir):
    run = load_run(run_dir)
    run = dataclasses.replace(run, config=dataclasses.replace(run.config, binarize=None))
    result = evaluate_run(run, num_samples=2, limit=5)
    assert result.binarize == "dynamic"  # resolved from the Bernoulli likelihood
    assert run.config.binarize is None


def test_bad_arguments_errors(run_dir):
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 0"):
        evaluate_run(run_dir, num_samples=0)
    with pytest.raises(ValueError, match="unknown split 'valid'; choose one of"):
        evaluate_run(run_dir, split="valid")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        evaluate_run(run_dir, limit=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_run(run_dir / "missing")


def test_cli_evaluate_writes_json_atomically_and_prints_a_table(run_dir, capsys):
    (run_dir / EVALUATION_FILE).unlink(missing_ok=True)
    argv = ["evaluate", str(run_dir), "--num-samples", "20", "--limit", "40", "--seed", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "log p(x), K=20" in out and "bits/dim" in out and "active units" in out
    # A look at the first 40 points gets its own file: it never overwrites a full evaluation.
    assert not (run_dir / EVALUATION_FILE).exists()
    saved = json.loads((run_dir / "evaluation-first40.json").read_text())
    assert saved["num_samples"] == 20 and saved["num_datapoints"] == 40 and saved["seed"] == 1
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert main(["evaluate", str(run_dir), "--num-samples", "5", "--split", "train"]) == 0
    saved = json.loads((run_dir / "evaluation-train.json").read_text())
    assert saved["split"] == "train" and saved["num_datapoints"] == 1497
    assert main(["evaluate", str(run_dir), "--num-samples", "5"]) == 0
    assert json.loads((run_dir / EVALUATION_FILE).read_text())["num_datapoints"] == 300

    # With the full evaluation in place, neither --limit nor --split train touches it.
    full = (run_dir / EVALUATION_FILE).read_bytes()
    assert main(["evaluate", str(run_dir), "--num-samples", "3", "--limit", "40"]) == 0
    assert json.loads((run_dir / "evaluation-first40.json").read_text())["num_samples"] == 3
    assert main(["evaluate", str(run_dir), "--num-samples", "3", "--split", "train"]) == 0
    assert json.loads((run_dir / "evaluation-train.json").read_text())["num_samples"] == 3
    assert (run_dir / EVALUATION_FILE).read_bytes() == full


def test_evaluate_with_ais_reports_each_budget_its_iwae_gap_and_the_bdmc_gap(run_dir, digits):
    vae = load_run(run_dir).vae
    x = digits.test_x[:12]
    ais = {"num_steps": [10, 3], "num_chains": 2, "bdmc_points": 5}
    result = evaluate_vae(vae, x, num_samples=20, ks=(1,), ais=ais)
    assert result.ais["num_chains"] == 2 and result.ais["initial"] == "guide"
    rows = result.ais["rows"]
    assert [row["num_steps"] for row in rows] == [3, 10]
    iwae = result.log_likelihood[-1]
    for row in rows:
        assert row["minus_iwae"]["k"] == 20
        # The paired mean difference is the difference of the means.
        assert row["minus_iwae"]["mean"] == pytest.approx(row["mean"] - iwae["mean"], abs=1e-4)
        assert 0 < row["acceptance_rate"] <= 1 and row["step_size"] > 0
        bdmc = row["bdmc"]
        assert bdmc["num_points"] == 5 and bdmc["gap_stderr"] > 0
        assert bdmc["gap"] == pytest.approx(bdmc["upper"] - bdmc["lower"], abs=1e-4)
    seconds = result.seconds
    parts = ("elbo", "log_likelihood", "active_units", "ais")
    assert sum(seconds[p] for p in parts) == pytest.approx(seconds["total"], rel=1e-9)
    assert json.loads(json.dumps(result.as_dict(), allow_nan=False))["ais"] == result.ais
    # The same seed repeats every number; without ais there is no AIS entry.
    again = evaluate_vae(vae, x, num_samples=20, ks=(1,), ais=ais)
    assert [r["mean"] for r in again.ais["rows"]] == [r["mean"] for r in rows]
    assert evaluate_vae(vae, x, num_samples=20, ks=(1,)).ais is None


def test_cli_evaluate_ais_adds_rows_and_shows_progress_only_on_a_terminal(run_dir, capsys):
    argv = ["evaluate", str(run_dir), "--num-samples", "5", "--limit", "8", "--ais"]
    argv += ["--ais-steps", "4", "--ais-chains", "2", "--bdmc-points", "4"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert (
        "log p(x), AIS T=4 C=2 (guide)" in captured.out and "BDMC gap, 4 simulated" in captured.out
    )
    assert "AIS - IWAE K=5" in captured.out and captured.err == ""
    saved = json.loads((run_dir / "evaluation-first8.json").read_text())
    assert saved["ais"]["rows"][0]["num_steps"] == 4 and "bdmc" in saved["ais"]["rows"][0]
    assert main([*argv, "--bdmc-points", "0"]) == 0
    saved = json.loads((run_dir / "evaluation-first8.json").read_text())
    assert "bdmc" not in saved["ais"]["rows"][0] and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-samples", "0"], "--num-samples: expected a positive integer, got '0'"),
        (["--limit", "-3"], "--limit: expected a positive integer"),
        (["--split", "valid"], "--split: invalid choice"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--ais", "--ais-steps", "0"], "--ais-steps: expected a positive integer, got '0'"),
        (["--ais", "--ais-chains", "0"], "--ais-chains: expected a positive integer, got '0'"),
        (["--ais-leapfrog-steps", "-1"], "--ais-leapfrog-steps: expected a positive integer"),
        (["--ais-initial", "posterior"], "--ais-initial: invalid choice: 'posterior'"),
        (["--bdmc-points", "-1"], "--bdmc-points: expected a non-negative integer, got '-1'"),
    ],
)
def test_cli_evaluate_bad_values_exit_2_with_one_line(run_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(run_dir), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_data_folder_named_in_the_run_must_exist(run_dir, tmp_path):
    run = load_run(run_dir)
    moved = dataclasses.replace(run.config, data_dir=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="the data folder .*gone.* does not exist here"):
        evaluate_run(dataclasses.replace(run, config=moved), num_samples=2, limit=5)
    result = evaluate_run(
        dataclasses.replace(run, config=moved), num_samples=2, limit=5, data_dir=tmp_path
    )
    assert result.num_datapoints == 5 and not (tmp_path / "gone").exists()


def test_malloc_threshold_is_fixed_on_glibc():
    assert fix_malloc_threshold() == (platform.libc_ver()[0] == "glibc")
