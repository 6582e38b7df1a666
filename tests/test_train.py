import dataclasses
import math

import pytest
import torch
from common import without_seconds as strip_seconds

from pyro_vae import VAE, Config, evaluate_elbo, fit, load_dataset
from pyro_vae.estimators import AnalyticKLWarning
from pyro_vae.runs import load_checkpoint, read_metrics
from pyro_vae.train import kl_weight, prepare_fit


def small_config(**kwargs):
    return Config(
        **{"latent_dim": 4, "hidden_dims": [32], "epochs": 2, "batch_size": 100, **kwargs}
    )


def small_vae(config):
    return VAE(64, latent_dim=config.latent_dim, hidden_dims=config.hidden_dims)


@pytest.mark.slow
@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_training_loss_falls_on_average(digits, elbo):
    config = small_config(epochs=30, elbo=elbo, lr=3e-3)
    rows = fit(small_vae(config), digits, config)
    first = sum(r["train_elbo"] for r in rows[:5]) / 5
    last = sum(r["train_elbo"] for r in rows[-5:]) / 5
    assert last > first + 3.0, (first, last)
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] + 3.0


def test_same_seed_same_numbers(digits):
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        config = small_config(seed=7, num_particles=2)
        results.append(strip_seconds(fit(small_vae(config), digits, config)))
    assert results[0] == results[1]
    config = small_config(seed=8, num_particles=2)
    torch.manual_seed(123)
    assert strip_seconds(fit(small_vae(config), digits, config)) != results[0]


def test_metrics_rows_have_the_documented_columns(digits):
    config = small_config()
    rows = fit(small_vae(config), digits, config)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "step", "kl_scale", "train_elbo", "test_elbo", "seconds"}
    assert rows[-1]["step"] == 2 * math.ceil(len(digits.train_x) / 100)
    assert all(r["test_elbo"] < 0 and r["seconds"] > 0 for r in rows)


def test_evaluate_elbo_leaves_parameters_and_kl_scale_alone(digits):
    vae = VAE(64, latent_dim=2, hidden_dims=(16,))
    vae.kl_scale = 0.3
    before = [p.clone() for p in vae.parameters()]
    value = evaluate_elbo(vae, digits.test_x, "meanfield", num_particles=3)
    assert math.isfinite(value) and value < 0
    assert vae.kl_scale == 0.3
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters()))


def test_kl_warmup_is_linear_then_beta():
    config = small_config(beta=2.0, warmup_epochs=2)
    weights = [kl_weight(config, step, steps_per_epoch=5) for step in range(12)]
    assert weights[0] == pytest.approx(0.2)
    assert weights[4] == pytest.approx(1.0)
    assert weights[9:] == [2.0, 2.0, 2.0]
    assert all(a <= b for a, b in zip(weights, weights[1:]))
    assert kl_weight(small_config(beta=0.5), 0, 5) == 0.5


def test_warmup_shows_in_metrics(digits):
    config = small_config(warmup_epochs=2, epochs=3)
    rows = fit(small_vae(config), digits, config)
    assert rows[0]["kl_scale"] == pytest.approx(0.5)
    assert rows[1]["kl_scale"] == rows[2]["kl_scale"] == 1.0


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(digits, tmp_path):
    config = small_config(epochs=3)
    vae = small_vae(config)

    def poison(row):
        if row["epoch"] == 1:
            with torch.no_grad():
                vae.decoder[0].weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"loss became nan at epoch 2, step 16"):
        fit(vae, digits, config, run_dir=tmp_path, on_epoch_end=poison)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]


def test_data_outside_the_likelihood_support_is_refused():
    grey = load_dataset("digits", binarize="none")
    config = small_config()
    with pytest.raises(ValueError, match=r"'bernoulli' needs data in \{0, 1\}.*config.binarize"):
        fit(small_vae(config), grey, config)
    assert config.binarize is None  # the caller's config is never changed


def test_prepare_fit_returns_the_config_completed_from_the_data_and_the_model(digits):
    config = small_config()
    vae = VAE(
        64, latent_dim=3, hidden_dims=(8,), prior="mixture", prior_kwargs={"num_components": 2}
    )
    completed = prepare_fit(vae, digits, config)
    assert completed.binarize == "dynamic" and completed.image_shape == [8, 8]
    assert (completed.latent_dim, completed.hidden_dims, completed.prior) == (3, [8], "mixture")
    assert completed.prior_kwargs == {"num_components": 2} and completed.data_dim == 64
    assert config == small_config()  # recorded in a new config
    assert dataclasses.replace(completed, epochs=5).epochs == 5


def test_config_binarize_must_match_the_data_set(digits):
    config = small_config(binarize="static")
    with pytest.raises(ValueError, match="config.binarize is 'static' but the dataset was loaded"):
        fit(small_vae(config), digits, config)


def test_meanfield_without_closed_form_kl_says_so(digits):
    config = small_config(elbo="meanfield", epochs=1)
    vae = VAE(64, latent_dim=4, hidden_dims=(32,), prior="mixture")
    with pytest.warns(UserWarning, match=r"no closed form for latent site\(s\) \['z'\]") as record:
        fit(vae, digits, config)
    assert [w.category for w in record] == [AnalyticKLWarning]
    assert "config.elbo meanfield" in str(record[0].message)


def test_meanfield_with_closed_form_kl_is_silent(digits, recwarn):
    config = small_config(elbo="meanfield", epochs=1)
    fit(small_vae(config), digits, config)
    assert not [w for w in recwarn if "closed form" in str(w.message)]


def test_fit_puts_the_kl_weight_back_and_reports_the_warm_up_in_the_rows(digits):
    config = small_config(warmup_epochs=2, epochs=1)
    vae = small_vae(config)
    with vae.kl_weight(0.7):
        rows = fit(vae, digits, config)
        assert vae.kl_scale == 0.7
    assert rows[0]["kl_scale"] == pytest.approx(0.5) and vae.kl_scale == 1.0


def test_fit_trains_with_the_optimizer_it_is_given(digits):
    config = small_config(epochs=1)
    vae = small_vae(config)
    optimizer = torch.optim.SGD(vae.parameters(), lr=0.0)
    before = [p.clone() for p in vae.parameters()]
    fit(vae, digits, config, optimizer=optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters()))


def test_divergence_errors_name_config_fields(digits):
    config = small_config(epochs=2)
    vae = small_vae(config)

    def poison(row):
        with torch.no_grad():
            vae.decoder[0].weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="try a lower config.lr or set config.clip_norm"):
        fit(vae, digits, config, on_epoch_end=poison)
