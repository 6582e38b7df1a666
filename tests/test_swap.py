"""The three ways to swap a part: by name, by object and by writing the model."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from common import TINY_PARTS as TINY
from pyro import poutine

from pyro_vae import (
    GUIDES,
    LIKELIHOODS,
    PRIORS,
    VAE,
    Config,
    compare_run,
    fit,
    load_dataset,
    load_run,
)
from pyro_vae.cli import main
from pyro_vae.describe import build_vae, class_path
from pyro_vae.estimators import estimate_elbo, estimate_log_likelihood
from pyro_vae.guides import FullCovarianceNormal
from pyro_vae.likelihoods import Normal
from pyro_vae.plots import FIGURES, run_figures, save_figures
from pyro_vae.priors import MixtureOfGaussians, Prior
from pyro_vae.report import write_comparison
from pyro_vae.runs import load_config

#: Options a part needs on digits, or that keep it small.
CLI_OPTIONS = {
    ("prior", "mixture"): ["--prior-components", "3"],
    ("prior", "vamp"): ["--prior-components", "3"],
    ("likelihood", "discretized_logistic"): ["--likelihood-option", "num_levels=17"],
}
CLI_PARTS = [("prior", n) for n in sorted(PRIORS)]
CLI_PARTS += [("likelihood", n) for n in sorted(LIKELIHOODS)]
CLI_PARTS += [("guide", n) for n in sorted(GUIDES)]


class LaplacePrior(Prior):
    """A user-written prior: independent Laplace(0, scale) coordinates."""

    def __init__(self, latent_dim: int, scale: float = 1.0):
        super().__init__(latent_dim)
        self.scale = scale
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Laplace(self.loc, torch.full_like(self.loc, self.scale)).to_event(1)


class LaplaceVAE(VAE):
    """A model written by hand: the prior is a Laplace sampled directly in ``model``."""

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(self.latent_dim)
            with poutine.scale(scale=self.kl_scale):
                z = pyro.sample("z", dist.Laplace(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        z = dist.Laplace(0.0, 1.0).sample((num_samples, self.latent_dim))
        return self.likelihood.mean(self.decoder(z))


def one_epoch_config(**kwargs) -> Config:
    return Config(**{"epochs": 1, "batch_size": 300, **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize("kind, name", CLI_PARTS, ids=[f"{k}-{n}" for k, n in CLI_PARTS])
def test_every_registered_part_trains_from_the_cli_on_digits(kind, name, tmp_path):
    out = tmp_path / "run"
    extra = CLI_OPTIONS.get((kind, name), [])
    assert main(["train", *TINY, f"--{kind}", name, *extra, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config[kind] == name
    grey = kind == "likelihood" and name != "bernoulli"
    assert config["binarize"] == ("none" if grey else "dynamic")
    run = load_run(out)
    parts = {
        "prior": run.vae.prior,
        "likelihood": run.vae.likelihood,
        "guide": run.vae.guide_family,
    }
    registries = {"prior": PRIORS, "likelihood": LIKELIHOODS, "guide": GUIDES}
    assert type(parts[kind]) is registries[kind][name]
    assert math.isfinite(run.metrics[-1]["test_elbo"])


def test_discretized_logistic_on_digits_error_names_the_option(capsys):
    assert main(["train", *TINY, "--likelihood", "discretized_logistic"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--likelihood-option num_levels=17" in err


def test_fit_records_parts_passed_as_objects(digits, tmp_path):
    vae = VAE(
        64,
        latent_dim=2,
        hidden_dims=(16,),
        prior=MixtureOfGaussians(2, num_components=3),
        likelihood=Normal(64, scale=0.2),
        guide=FullCovarianceNormal(2),
    )
    fit(
        vae, load_dataset("digits"), one_epoch_config(), run_dir=tmp_path
    )  # the config's defaults are not the VAE's
    config = load_config(tmp_path)
    assert (config.latent_dim, config.hidden_dims, config.activation) == (2, [16], "relu")
    assert (config.prior, config.prior_kwargs) == ("mixture", {"num_components": 3})
    assert (config.likelihood, config.likelihood_kwargs) == ("normal", {"scale": 0.2})
    assert (config.guide, config.guide_kwargs) == ("full_covariance", {})
    assert config.vae_class is None and config.binarize == "none"
    run = load_run(tmp_path)
    assert run.vae.prior.num_components == 3 and run.vae.likelihood.scale == 0.2
    x = digits.test_x[:5]
    assert torch.equal(run.vae.reconstruct(x), vae.eval().reconstruct(x))


def test_unregistered_part_is_recorded_by_class_path_and_reloaded_with_vae(digits, tmp_path):
    def make():
        return VAE(64, latent_dim=2, hidden_dims=(8,), prior=LaplacePrior(2, scale=0.5))

    vae = make()
    fit(vae, digits, one_epoch_config(), run_dir=tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["prior"] == class_path(LaplacePrior) and "." in config["prior"]
    assert config["prior_kwargs"] == {"scale": 0.5}
    with pytest.raises(ValueError, match=r"LaplacePrior object.*load_run\(run_dir, vae=\.\.\.\)"):
        load_run(tmp_path)
    run = load_run(tmp_path, vae=make())
    assert run.config.prior == class_path(LaplacePrior)
    x = digits.test_x[:5]
    assert torch.equal(run.vae.reconstruct(x), vae.eval().reconstruct(x))
    wrong = VAE(64, latent_dim=3, hidden_dims=(8,), prior=LaplacePrior(3))
    with pytest.raises(ValueError, match="does not fit the VAE passed as vae"):
        load_run(tmp_path, vae=wrong)


def test_user_registered_prior_by_cli_config_and_load_run(digits, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(PRIORS, "laplace", LaplacePrior)  # before main builds its parser
    out = tmp_path / "run"
    args = ["train", *TINY, "--prior", "laplace", "--prior-option", "scale=0.5", "--out", str(out)]
    assert main(args) == 0
    config = load_config(out)
    assert (config.prior, config.prior_kwargs) == ("laplace", {"scale": 0.5})
    run = load_run(out)
    assert isinstance(run.vae.prior, LaplacePrior) and run.vae.prior.scale == 0.5
    assert main(["sample", str(out), "--num", "4"]) == 0
    by_config = build_vae(Config(prior="laplace", prior_kwargs={"scale": 2.0}, data_dim=64))
    assert by_config.prior.scale == 2.0
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "laplace" in capsys.readouterr().out

    monkeypatch.delitem(PRIORS, "laplace")
    with pytest.raises(ValueError, match=r"prior 'laplace' is not in pyro_vae.priors.PRIORS.*"):
        load_run(out)
    loaded = load_run(out, vae=VAE(64, 2, (8,), prior=LaplacePrior(2, scale=0.5)))
    x = digits.test_x[:5]
    assert torch.equal(loaded.vae.reconstruct(x), run.vae.reconstruct(x))  # the trained weights


def test_custom_model_trains_evaluates_plots_and_reloads(digits, tmp_path):
    vae = LaplaceVAE(64, latent_dim=2, hidden_dims=(16,))
    rows = fit(vae, digits, one_epoch_config(epochs=2), run_dir=tmp_path)
    assert math.isfinite(rows[-1]["test_elbo"])
    trace = poutine.trace(vae.model).get_trace(digits.test_x[:3])
    assert isinstance(trace.nodes["z"]["fn"].base_dist, dist.Laplace)

    x = digits.test_x[:50]
    elbo = estimate_elbo(vae.model, vae.guide, x, num_particles=20)
    log_px = estimate_log_likelihood(vae.model, vae.guide, x, num_samples=20)
    assert elbo.shape == log_px.shape == (50,)
    assert torch.isfinite(log_px).all() and log_px.mean() > elbo.mean()
    paths = save_figures(run_figures(vae, digits, rows), tmp_path)
    assert sorted(p.name for p in paths) == sorted(FIGURES)

    config = load_config(tmp_path)
    assert config.vae_class == class_path(LaplaceVAE)
    with pytest.raises(ValueError, match="custom model class .*LaplaceVAE"):
        load_run(tmp_path)
    run = load_run(tmp_path, vae=LaplaceVAE(64, latent_dim=2, hidden_dims=(16,)))
    assert torch.equal(run.vae.reconstruct(x), vae.eval().reconstruct(x))
    assert run.config.vae_class == class_path(LaplaceVAE)


def test_custom_model_compares_given_a_way_to_build_it(digits, tmp_path):
    def make_vae() -> VAE:
        return LaplaceVAE(64, latent_dim=2, hidden_dims=(16,))

    fit(make_vae(), digits, one_epoch_config(), run_dir=tmp_path)
    run = load_run(tmp_path, vae=make_vae())
    small = {"num_draws": 5, "num_points": 20, "batch_size": 10, "particles": (1,)}
    with pytest.raises(ValueError, match=r"cannot rebuild this run's model .*make_vae="):
        compare_run(run, train_seconds=0.2, **small)
    assert compare_run(run, train_seconds=0, **small).training is None
    with pytest.raises(ValueError, match="make_vae.. builds a model whose parameters do not match"):
        compare_run(run, make_vae=lambda: LaplaceVAE(64, latent_dim=3, hidden_dims=(16,)), **small)

    race = {"train_seconds": 0.3, "train_particles": 1, "num_samples": 10}
    race["objectives"] = ("trace", "meanfield")
    result = compare_run(run, **race, make_vae=make_vae, **small)
    assert result.analytic_kl_available  # torch has KL(Normal || Laplace) in closed form
    curves = result.training["curves"]
    assert list(curves) == ["trace", "meanfield"] and curves["trace"][-1]["step"] > 0
    first = [curves[name][0]["test_iwae"] for name in curves]
    assert math.isfinite(first[0]) and first[0] == first[1]  # one initialisation for both
    paths = write_comparison(tmp_path, result)
    assert all(path.exists() for path in paths)
