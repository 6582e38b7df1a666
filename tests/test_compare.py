import json
import math
import time

import pytest
import torch

from pyro_vae import (
    Comparison,
    compare_elbo_variance,
    compare_gradient_variance,
    compare_run,
    compare_training,
    load_run,
)
from pyro_vae.cli import main
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


def test_training_curves_start_from_one_initialisation(run_dir, digits):
    config = load_run(run_dir).config
    start = time.perf_counter()
    result = compare_training(config, digits, num_epochs=1, seed=5, eval_x=digits.test_x[:50])
    seconds = time.perf_counter() - start
    mc, an = result["curves"]["monte_carlo"], result["curves"]["analytic_kl"]
    assert len(mc) == len(an) == 2
    assert mc[0] == an[0]  # same initial model, same scores
    assert mc[-1]["step"] == an[-1]["step"] == 24
    assert 0 < mc[-1]["seconds"] and mc[-1]["seconds"] + an[-1]["seconds"] <= seconds
    assert result["score"] in mc[-1]
    for rows in (mc, an):
        # One epoch (24 steps) takes the model from worse than coin flips (-45.1 nats) past
        # them (about -42.8 averaged over the epoch), and the scored test ELBO up by about 5.5
        # nats (one draw on 50 points, noise about 0.5 nats): the trained model is scored.
        assert rows[-1]["train_elbo"] > COIN_FLIPS
        assert rows[-1][result["score"]] > rows[0][result["score"]] + 2


def test_no_analytic_kl_is_said_plainly_and_the_estimators_coincide(mixture_run_dir):
    result = compare_run(mixture_run_dir, num_draws=5, num_points=30, batch_size=16, train_epochs=0)
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
    assert main([*argv, "--train-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "| Monte Carlo KL |" in out and "comparison.json" in out
    result = json.loads((run_dir / "comparison.json").read_text())
    assert result["settings"]["num_draws"] == 5 and result["settings"]["num_points"] == 30
    markdown = (run_dir / "comparison.md").read_text()
    assert "pyro-vae compare" in markdown and "--draws 5" in markdown
    assert "does not reduce the gradient variance of the decoder" in markdown
    for name in ("comparison_curves.png", "comparison_std_ratio.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_compare_run_returns_a_comparison_whose_dict_is_comparison_json(run_dir):
    state = torch.get_rng_state()
    result = compare_run(run_dir, num_draws=3, num_points=10, batch_size=8, train_epochs=0)
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
        "training",
    ]
    assert data["settings"] == {
        "num_draws": 3,
        "num_points": 10,
        "batch_size": 8,
        "train_epochs": 0,
        "seed": 0,
    }
    assert Comparison(**data) == result
    again = compare_run(run_dir, num_draws=3, num_points=10, batch_size=8, train_epochs=0)
    assert again.elbo_variance == result.elbo_variance
    assert again.gradient_variance == result.gradient_variance


def test_bad_arguments_errors(run_dir, capsys):
    with pytest.raises(ValueError, match="num_draws must be an integer >= 2, got 1"):
        compare_run(run_dir, num_draws=1)
    with pytest.raises(ValueError, match="train_epochs must be a non-negative integer, got -1"):
        compare_run(run_dir, train_epochs=-1)
    assert main(["compare", str(run_dir), "--draws", "1"]) == 2
    err = capsys.readouterr().err
    assert "--draws must be at least 2" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(run_dir), "--num-points", "0"])
    assert exit_info.value.code == 2
