import json
import math
import re
import time
import types

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import (
    Comparison,
    compare_elbo_variance,
    compare_gradient_variance,
    compare_objective_gradients,
    compare_run,
    compare_training,
    load_run,
)
from pyro_vae.cli import main
from pyro_vae.compare import OBJECTIVES, _choose_objectives
from pyro_vae.objectives import get_elbo
from pyro_vae.report import format_comparison_markdown

#: log p(x) of 64 pixels under a coin-flip model, the worst a trained Bernoulli model does.
COIN_FLIPS = 64 * math.log(0.5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_tiny_run):
    return train_tiny_run(tmp_path_factory.mktemp("compare") / "run")


@pytest.fixture(scope="module")
def mixture_run_dir(tmp_path_factory, train_tiny_run):
    return train_tiny_run(tmp_path_factory.mktemp("compare") / "mixture", "mixture")


def one_draw_elbos(vae, x, num_draws):
    """Single-draw ELBO estimates written out from q, p(z) and p(x|z), shape (R, M) each:
    log p(x, z) - log q(z|x), and log p(x|z) - KL(q || p) with the diagonal Gaussian KL."""
    with torch.no_grad():
        q, p = vae.encode(x), vae.prior()
        z = q.sample((num_draws,))
        log_lik = vae.decode(z).log_prob(x)
        loc_q, scale_q = q.base_dist.loc, q.base_dist.scale
        loc_p, scale_p = p.base_dist.loc, p.base_dist.scale
        kl = (
            (scale_p / scale_q).log() + (scale_q**2 + (loc_q - loc_p) ** 2) / (2 * scale_p**2) - 0.5
        ).sum(-1)
        return {
            "monte_carlo": log_lik + p.log_prob(z) - q.log_prob(z),
            "analytic_kl": log_lik - kl,
        }


def test_elbo_estimators_agree_and_report_their_spread(run_dir, digits):
    vae = load_run(run_dir).vae
    x = digits.test_x[:200]
    result = compare_elbo_variance(vae, x, num_draws=50)
    assert result["num_points"] == 200 and len(result["std_ratios"]) == 200
    assert abs(result["difference_in_stderrs"]) < 4
    ratio = result["monte_carlo"]["mean_std"] / result["analytic_kl"]["mean_std"]
    assert result["std_ratio"] == pytest.approx(ratio)
    assert result["analytic_kl"]["analytic_sites"] == ["z"]
    # Against 400 independent single-draw estimates per datapoint computed here: the means
    # agree within their Monte Carlo errors (the data's spread cancels: same datapoints); the
    # mean std of one draw, the median std and the variance ratio within 5 sd of their Monte
    # Carlo errors (relative sd about 1%, 2.3% and 2.2%, measured over 12 seeds).
    torch.manual_seed(1)
    variances = {}
    for label, draws in one_draw_elbos(vae, x, 400).items():
        std = draws.std(0)
        variances[label] = std.pow(2).mean().item()
        stderr = (std.pow(2).sum() * (1 / 400 + 1 / 50)).sqrt().item() / 200
        assert abs(result[label]["mean"] - draws.mean().item()) < 4.5 * stderr, label
        assert result[label]["mean_std"] == pytest.approx(std.mean().item(), rel=0.06)
        assert result[label]["median_std"] == pytest.approx(std.median().item(), rel=0.12)
        assert result[label]["mean"] > COIN_FLIPS  # better than coin flips
    ratio = variances["monte_carlo"] / variances["analytic_kl"]
    assert result["variance_ratio"] == pytest.approx(ratio, rel=0.12)


def test_decoder_gradient_is_the_same_for_both_estimators(run_dir, digits):
    # With a parameter-free prior the decoder only sees log p(x|z), identical for the same z.
    vae = load_run(run_dir).vae
    result = compare_gradient_variance(vae, digits.test_x[:32], num_draws=10)
    assert result["groups"] == {
        "decoder": sum(p.numel() for p in vae.decoder.parameters()),
        "encoder": sum(p.numel() for p in vae.encoder.parameters()),
    }
    assert result["variance_ratio"]["decoder"] == pytest.approx(1.0, rel=1e-4)
    assert vae.kl_scale == 1.0
    # The encoder's statistics, recomputed here from the same 10 draws (the same seed, 0):
    # the mean gradient, the variance over draws summed over parameters, and their SNR.
    x = digits.test_x[:32]
    total_variance = {}
    for label, elbo in (("monte_carlo", "trace"), ("analytic_kl", "meanfield")):
        torch.manual_seed(0)
        grads = []
        for _ in range(10):
            loss = get_elbo(elbo).differentiable_loss(vae.model, vae.guide, x) / 32
            grad = torch.autograd.grad(loss, list(vae.encoder.parameters()))
            grads.append(torch.cat([g.flatten() for g in grad]).double())
        grads = torch.stack(grads)
        total_variance[label] = grads.var(0).sum().item()
        mean_norm = grads.mean(0).norm().item()
        encoder = result[label]["encoder"]
        assert encoder["total_variance"] == pytest.approx(total_variance[label], rel=1e-4)
        assert encoder["mean_norm"] == pytest.approx(mean_norm, rel=1e-4)
        assert encoder["snr"] == pytest.approx(mean_norm / total_variance[label] ** 0.5, rel=1e-4)
    ratio = total_variance["monte_carlo"] / total_variance["analytic_kl"]
    assert result["variance_ratio"]["encoder"] == pytest.approx(ratio, rel=1e-4)


def hand_gradients(vae, x, elbo, num_particles, num_draws, seed, params):
    """num_draws gradients of the mean loss by loss.backward (not autograd.grad), flattened."""
    torch.manual_seed(seed)
    grads = []
    for _ in range(num_draws):
        vae.zero_grad(set_to_none=False)
        loss = get_elbo(elbo, num_particles).differentiable_loss(vae.model, vae.guide, x)
        (loss / x.shape[0]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]).double())
    vae.zero_grad(set_to_none=True)
    return torch.stack(grads)


def test_objective_gradient_grid_has_the_identities_and_the_statistics(run_dir, digits):
    vae = load_run(run_dir).vae
    x = digits.test_x[:32]
    result = compare_objective_gradients(vae, x, num_draws=8, particles=(1, 3))
    rows = {(r["objective"], r["num_particles"]): r for r in result["rows"]}
    assert list(rows) == [(name, k) for name in OBJECTIVES for k in (1, 3)]
    assert result["groups"]["encoder"] == sum(p.numel() for p in vae.encoder.parameters())

    def same(a, b):
        for group in ("encoder", "decoder"):
            for key in ("mean_norm", "total_variance", "snr", "median_snr"):
                assert a[group][key] == pytest.approx(b[group][key], rel=1e-6), (group, key)

    # At K = 1 the IWAE bound is the ELBO and DReG is STL, on the same draws.
    same(rows["iwae", 1], rows["trace", 1])
    same(rows["dreg", 1], rows["stl", 1])
    # The decoder's gradient does not depend on how the guide's gradient is estimated.
    for k in (1, 3):
        for name in ("meanfield", "stl"):
            assert rows[name, k]["decoder"] == rows["trace", k]["decoder"]
        assert rows["dreg", k]["decoder"] == rows["iwae", k]["decoder"]
    assert rows["iwae", 3]["decoder"] != rows["trace", 3]["decoder"]
    # DReG's encoder row against gradients made here with loss.backward, where its hooks fire
    # as they do in training: the total variance, the norm of the mean and the median SNR.
    grads = hand_gradients(vae, x, "dreg", 3, 8, 0, list(vae.encoder.parameters()))
    mean, std = grads.mean(0), grads.std(0)
    encoder = rows["dreg", 3]["encoder"]
    assert encoder["total_variance"] == pytest.approx(grads.var(0).sum().item(), rel=1e-5)
    assert encoder["mean_norm"] == pytest.approx(mean.norm().item(), rel=1e-5)
    varies = std > 0
    median = (mean[varies].abs() / std[varies]).median().item()
    assert encoder["median_snr"] == pytest.approx(median, rel=1e-5)
    # The IWAE encoder gradient is noisier than DReG's at K = 3 on a trained model.
    assert rows["iwae", 3]["encoder"]["total_variance"] > encoder["total_variance"]


def race(config, digits, **options):
    small = {"eval_x": digits.test_x[:50], "num_samples": 20, "score_samples": 20}
    return compare_training(config, digits, seed=5, **{**small, **options})


def test_training_race_starts_from_one_initialisation_and_pairs_the_objectives(run_dir, digits):
    config = load_run(run_dir).config
    objectives = ("trace", "iwae", "stl", "dreg")
    result = race(config, digits, seconds=600, max_steps=20, objectives=objectives, num_particles=1)
    curves = result["curves"]
    assert list(curves) == list(objectives) == list(result["log_likelihood"])
    assert result["num_particles"] == 1 and result["score"] == "test_iwae"
    for name, rows in curves.items():
        assert rows[0] == curves["trace"][0]  # the same initial model, the same scores
        # 20 steps cut the first epoch of 24: the curve ends where the budget does.
        assert [(r["epoch"], r["step"]) for r in rows] == [(0, 0), (1, 20)]
        assert 0 < rows[-1]["seconds"] < 600
        assert rows[-1]["train_objective"] > COIN_FLIPS
        assert rows[-1]["test_iwae"] > rows[0]["test_iwae"] + 1  # the trained model is scored
        # K=num_samples = score_samples: the final log p(x) is the last IWAE score, same seed.
        assert result["log_likelihood"][name]["mean"] == pytest.approx(rows[-1]["test_iwae"])
    # At K = 1 IWAE trains exactly as the ELBO does, and DReG as STL: the same curves.
    for a, b in (("iwae", "trace"), ("dreg", "stl")):
        for row_a, row_b in zip(curves[a], curves[b]):
            for key in ("step", "test_elbo", "test_iwae", "train_objective"):
                assert row_a[key] == pytest.approx(row_b[key], rel=1e-5), (a, key)
        ll = result["log_likelihood"][a]
        assert abs(ll["difference"] - result["log_likelihood"][b]["difference"]) < 1e-3
    # The differences are paired over the test points: iwae's from trace's is zero to rounding.
    iwae = result["log_likelihood"]["iwae"]
    assert iwae["difference_stderr"] < 1e-4 < iwae["stderr"]
    first = result["log_likelihood"]["trace"]
    assert first["difference"] == 0 and first["stderr"] > 0


def test_training_race_gives_every_objective_the_same_wall_clock_budget(run_dir, digits):
    config = load_run(run_dir).config
    start = time.perf_counter()
    result = race(config, digits, seconds=0.4, objectives=("meanfield", "dreg"), num_particles=2)
    elapsed = time.perf_counter() - start
    for rows in result["curves"].values():
        assert rows[-1]["step"] > 0 and rows[-1]["seconds"] >= 0.4
        assert [r["seconds"] for r in rows] == sorted(r["seconds"] for r in rows)
        assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert sum(rows[-1]["seconds"] for rows in result["curves"].values()) <= elapsed


def test_a_diverging_objective_ends_its_own_curve_and_not_the_race(run_dir, digits, monkeypatch):
    import pyro_vae.compare

    def train_epoch(vae, optimizer, x, config, epoch, step, stop):
        if config.elbo == "trace" and epoch == 2:
            raise FloatingPointError(f"the loss became nan at epoch {epoch}, step {step + 1}")
        return train(vae, optimizer, x, config, epoch, step, stop)

    train = pyro_vae.compare.train_epoch
    monkeypatch.setattr(pyro_vae.compare, "train_epoch", train_epoch)
    config = load_run(run_dir).config
    result = race(config, digits, seconds=600, max_steps=48, objectives=("trace", "dreg"))
    trace, dreg = result["curves"]["trace"], result["curves"]["dreg"]
    assert [r["epoch"] for r in trace] == [0, 1] and [r["epoch"] for r in dreg] == [0, 1, 2]
    lines = result["log_likelihood"]
    assert lines["trace"] == {"diverged": "the loss became nan at epoch 2, step 25"}
    assert lines["dreg"]["difference"] == 0 and math.isfinite(lines["dreg"]["mean"])


def test_an_objective_the_model_cannot_run_is_refused_before_any_study():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Bernoulli(pyro.sample("z", dist.Bernoulli(0.5))), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.3))

    vae = types.SimpleNamespace(model=model, guide=guide)
    x = torch.ones(4)
    settings = {"objectives": ["trace"]}
    assert _choose_objectives(vae, x, settings) == []  # score-function gradients: fine
    assert settings["objectives"] == ["trace"]
    match = r"objective 'stl' cannot run on this model: guide site 'z' \(Bernoulli\) has no rsample"
    with pytest.raises(ValueError, match=match + ".*; leave it out of objectives$"):
        _choose_objectives(vae, x, {"objectives": ["trace", "stl", "iwae"]})
    # By default the study takes the objectives the model can run and names the others.
    settings = {"objectives": None}
    (note,) = _choose_objectives(vae, x, settings)
    assert settings["objectives"] == ["trace"]
    assert note.startswith("left out objectives ['dreg', 'iwae', 'meanfield', 'stl']: ")


def test_no_analytic_kl_is_said_plainly_and_the_estimators_coincide(mixture_run_dir):
    small = {"num_points": 30, "batch_size": 16, "particles": (1,), "train_seconds": 0}
    result = compare_run(mixture_run_dir, num_draws=5, **small)
    assert not result.analytic_kl_available
    assert "no analytic KL" in result.note and "MixtureOfGaussians" in result.note
    assert result.training is None
    # TraceMeanField_ELBO falls back to the Monte Carlo KL: the same gradients, draw by draw.
    for ratio in result.gradient_variance["variance_ratio"].values():
        assert ratio == pytest.approx(1.0, rel=1e-4)
    markdown = format_comparison_markdown(result, "pyro-vae compare X")
    assert "no analytic KL" in markdown and "pyro-vae compare X" in markdown


def test_cli_compare_writes_json_markdown_and_figures(run_dir, capsys):
    argv = ["compare", str(run_dir), "--draws", "5", "--num-points", "30", "--batch-size", "16"]
    argv += ["--objectives", "trace", "dreg", "--particles", "1", "2", "--num-samples", "30"]
    assert main([*argv, "--train-seconds", "0.2", "--train-particles", "2"]) == 0
    out = capsys.readouterr().out
    assert "| Monte Carlo KL |" in out and "comparison.json" in out
    result = json.loads((run_dir / "comparison.json").read_text())
    assert result["settings"]["num_draws"] == 5 and result["settings"]["num_points"] == 30
    grid = [(r["objective"], r["num_particles"]) for r in result["objective_gradients"]["rows"]]
    assert grid == [("trace", 1), ("trace", 2), ("dreg", 1), ("dreg", 2)]
    assert list(result["training"]["curves"]) == ["trace", "dreg"]
    assert result["training"]["num_particles"] == 2 and result["training"]["seconds"] == 0.2
    assert result["training"]["num_samples"] == 30
    markdown = (run_dir / "comparison.md").read_text()
    assert "pyro-vae compare" in markdown and "--draws 5" in markdown
    assert "does not reduce the gradient variance of the decoder" in markdown
    assert "| dreg | 2 |" in markdown and "| trace |" in markdown and "reference |" in markdown
    for name in ("comparison_curves.png", "comparison_std_ratio.png", "comparison_snr.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_compare_run_returns_a_comparison_whose_dict_is_comparison_json(run_dir):
    state = torch.get_rng_state()
    small = {"num_points": 10, "batch_size": 8, "particles": (1, 2), "train_seconds": 0}
    result = compare_run(run_dir, num_draws=3, **small)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(result, Comparison) and result.analytic_kl_available
    assert result.note is None and result.run_dir == str(run_dir)
    data = result.as_dict()
    assert list(data) == [
        "run_dir",
        "model",
        "analytic_kl_available",
        "note",
        "settings",
        "elbo_variance",
        "gradient_variance",
        "objective_gradients",
        "training",
    ]
    assert data["settings"] == {
        "num_draws": 3,
        "num_points": 10,
        "batch_size": 8,
        "objectives": list(OBJECTIVES),
        "particles": [1, 2],
        "train_seconds": 0.0,
        "train_particles": 5,
        "num_samples": 5000,
        "seed": 0,
    }
    assert len(data["objective_gradients"]["rows"]) == 2 * len(OBJECTIVES)
    assert Comparison(**data) == result
    again = compare_run(run_dir, num_draws=3, **small)
    assert again.elbo_variance == result.elbo_variance
    assert again.gradient_variance == result.gradient_variance
    assert again.objective_gradients == result.objective_gradients


def test_bad_arguments_errors(run_dir, capsys):
    with pytest.raises(ValueError, match="num_draws must be an integer >= 2, got 1"):
        compare_run(run_dir, num_draws=1)
    match = "train_seconds must be 0 or a positive finite number, got -1"
    with pytest.raises(ValueError, match=match):
        compare_run(run_dir, train_seconds=-1)
    with pytest.raises(ValueError, match="particles must be a positive integer, got 0"):
        compare_run(run_dir, particles=(1, 0))
    with pytest.raises(ValueError, match="unknown objective 'renyi'; choose one of"):
        compare_run(run_dir, objectives=("trace", "renyi"))
    for bad in ((), "trace", ("iwae", "iwae")):
        match = f"objectives must be a non-empty sequence without repeats, got {bad!r}"
        with pytest.raises(ValueError, match=re.escape(match)):
            compare_run(run_dir, objectives=bad)
    with pytest.raises(ValueError, match="train_particles must be a positive integer, got 0"):
        compare_run(run_dir, train_particles=0)
    assert main(["compare", str(run_dir), "--draws", "1"]) == 2
    err = capsys.readouterr().err
    assert "--draws must be at least 2" in err and len(err.strip().splitlines()) == 1
    for flag, value in (("--num-points", "0"), ("--train-seconds", "-1"), ("--particles", "0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", str(run_dir), flag, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: expected" in err and len(err.strip().splitlines()) == 1
