"""The named recipes: each sets what its paper says; flags given beside one override it, say
so and are recorded."""

import dataclasses
import json

import pytest
from common import one_line_error, usage_error

from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.describe import build_vae
from pyro_vae.hierarchical import HierarchicalVAE
from pyro_vae.recipes import RECIPES, recipe_settings
from pyro_vae.schedules import iwae_lr_factor

#: What each paper says, typed from the papers (IWAE: section 5;
#: VampPrior: section 4 and its experiment script), not from the recipes.
IWAE_PAPER = {
    "dataset": "mnist", "binarize": "dynamic", "latent_dim": 50, "hidden_dims": [200, 200],
    "activation": "tanh", "elbo": "iwae", "num_particles": 50, "lr": 1e-3, "lr_schedule": "iwae",
    "epochs": 3280, "batch_size": 20, "adam_betas": [0.9, 0.999], "adam_eps": 1e-4,
    "validation_size": 0, "prior": "normal", "lower_latent_dim": None,
}  # fmt: skip
VAMPPRIOR_PAPER = {
    "dataset": "mnist", "binarize": "dynamic", "latent_dim": 40, "hidden_dims": [300, 300],
    "activation": "gated", "elbo": "trace", "num_particles": 1, "lr": 5e-4, "batch_size": 100,
    "warmup_epochs": 100, "validation_size": 10000, "patience": 50, "prior": "normal",
    "lr_schedule": "constant", "lower_latent_dim": None,
}  # fmt: skip
VAMP = {"prior": "vamp", "prior_kwargs": {"num_components": 500}}
PAPERS = {
    "iwae-paper": IWAE_PAPER,
    "iwae-paper-2layer": IWAE_PAPER
    | {"lower_latent_dim": 100, "inner_hidden_dims": [100, 100], "hierarchy": "iwae"},
    "vampprior-paper": VAMPPRIOR_PAPER,
    "vampprior-paper-vamp": VAMPPRIOR_PAPER | VAMP,
    "vampprior-paper-2layer": VAMPPRIOR_PAPER
    | {"lower_latent_dim": 40, "inner_hidden_dims": [300, 300], "hierarchy": "vampprior"},
    "vampprior-paper-2layer-vamp": VAMPPRIOR_PAPER
    | VAMP
    | {"lower_latent_dim": 40, "inner_hidden_dims": [300, 300], "hierarchy": "vampprior"},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_sets_what_its_paper_says_and_builds_its_model(name):
    config = Config.from_recipe(name)
    assert {key: getattr(config, key) for key in PAPERS[name]} == PAPERS[name]
    assert (config.recipe, config.recipe_overrides) == (name, [])
    vae = build_vae(dataclasses.replace(config, data_dim=784))
    assert isinstance(vae, HierarchicalVAE) == ("2layer" in name)
    assert vae.prior.__class__.__name__ == (
        "VampPrior" if name.endswith("vamp") else "StandardNormal"
    )


def test_the_iwae_recipe_ends_on_the_last_step_of_the_papers_schedule():
    epochs = Config.from_recipe("iwae-paper").epochs
    assert epochs == sum(3**i for i in range(8))  # 3**i epochs for i = 0..7
    assert iwae_lr_factor(epochs) == pytest.approx(10 ** (-7 / 7))
    assert iwae_lr_factor(epochs - 3**7) == pytest.approx(10 ** (-6 / 7))


def test_every_recipe_field_is_a_config_field_and_a_copy_is_returned():
    fields = {f.name for f in dataclasses.fields(Config)}
    for name in RECIPES:
        settings = recipe_settings(name)
        assert set(settings) <= fields
        settings["hidden_dims"].append(1)
        assert recipe_settings(name)["hidden_dims"] != settings["hidden_dims"]


def test_given_fields_override_the_recipe_and_are_recorded():
    config = Config.from_recipe("vampprior-paper", epochs=3, hidden_dims=(300, 300), seed=7)
    assert config.epochs == 3 and config.seed == 7 and config.activation == "gated"
    # seed is not a recipe field, hidden_dims is given at the recipe's value: no overrides.
    assert config.recipe_overrides == ["epochs"]
    with pytest.raises(ValueError, match="unknown recipe 'burda'; choose one of"):
        Config.from_recipe("burda")
    with pytest.raises(ValueError, match=r"recipe_overrides must name config fields .*\['lr'\]"):
        Config(recipe_overrides=["lr"])  # overrides without a recipe
    for bad in ([3], ["lr", None], ["no_such_field"]):
        with pytest.raises(ValueError, match="recipe_overrides must name config fields"):
            Config(recipe="iwae-paper", recipe_overrides=bad)


def test_cli_recipe_flags_override_it_say_so_and_resume_keeps_it(tmp_path, capsys):
    out = tmp_path / "recipe"
    argv = ["train", "--recipe", "vampprior-paper-2layer-vamp", "--dataset", "digits",
            "--epochs", "2", "--hidden-dims", "16", "--inner-hidden-dims", "8",
            "--latent-dim", "2", "--lower-latent-dim", "3", "--validation-size", "100",
            "--warmup-epochs", "1", "--prior-components", "5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recipe vampprior-paper-2layer-vamp: --epochs 2 overrides its 2000" in printed
    assert "--hidden-dims 16 overrides its 300 300" in printed
    assert "--prior-option num_components=5 overrides its num_components=500" in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["recipe"] == "vampprior-paper-2layer-vamp"
    assert saved["activation"] == "gated" and saved["lr"] == 5e-4 and saved["patience"] == 50
    assert "epochs" in saved["recipe_overrides"] and "lr" not in saved["recipe_overrides"]
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 0
    again = json.loads((out / "config.json").read_text())
    assert again["recipe_overrides"] == saved["recipe_overrides"] and again["epochs"] == 3
    code = main(["train", "--resume", str(out), "--recipe", "iwae-paper"])
    message = one_line_error(capsys, code, expected_code=2)
    assert (
        "only --epochs, --device, --data-dir and --tensorboard may be given with it (got --recipe)"
        in message
    )


def test_help_lists_each_recipe_on_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for name, (line, _) in RECIPES.items():
        (shown,) = [text for text in lines if text.split()[:1] == [name]]
        assert shown.split(None, 1)[1] == line and len(shown) <= 100
    assert usage_error(capsys, ["train", "--recipe", "nope"]).startswith(
        "pyro-vae train: error: argument --recipe: invalid choice: 'nope'"
    )
