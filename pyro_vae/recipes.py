"""Named recipes: every setting of a published training protocol, in one name.

A recipe is a plain dict of :class:`~pyro_vae.config.Config` fields in :data:`RECIPES`.
:meth:`Config.from_recipe <pyro_vae.config.Config.from_recipe>` builds the config of a recipe,
with any field given explicitly taking precedence; ``pyro-vae train --recipe NAME`` does the
same with the flags given. The config records the recipe's name in ``recipe`` and the fields
that were given over it in ``recipe_overrides``, so ``config.json`` says which protocol a run
followed and where it left it.

What the papers did and the library does not (yet) repeat: the IWAE code's own Adam (beta1 =
0.99, epsilon added to the uncorrected root of the second moment, which starts at one) and its
decoder output bias initialized at the data's mean; torch's Adam with the paper's stated
settings and the library's initialization are used here.

References:

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (ICLR
    2016), section 5 and its code (github.com/yburda/iwae, ``experiments.py``,
    ``optimizers.py``).
[2] `VAE with a VampPrior`, Jakub M. Tomczak, Max Welling (AISTATS 2018), section 4 and its
    code (github.com/jmtomczak/vae_vampprior, ``experiment.py``).
"""

from __future__ import annotations

from pyro_vae.checks import check_choice

#: The IWAE paper's protocol [1]: dynamically binarized MNIST, all 60,000 training images,
#: tanh MLPs, the IWAE bound with K = 50, 3**i epochs at 1e-3 * 10**(-i/7) for i = 0..7 (3,280
#: epochs), batch 20, Adam with epsilon = 1e-4 (the paper's section 5; its code's own Adam
#: defaults to beta1 = 0.99 but starts the second moment at one, another optimizer; with torch's
#: Adam, beta1 = 0.99 trains far slower: docs/runs.md).
_IWAE_PAPER = {
    "dataset": "mnist",
    "binarize": "dynamic",
    "latent_dim": 50,
    "hidden_dims": [200, 200],
    "activation": "tanh",
    "lower_latent_dim": None,
    "elbo": "iwae",
    "num_particles": 50,
    "lr": 1e-3,
    "lr_schedule": "iwae",
    "epochs": 3280,
    "batch_size": 20,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-4,
    "warmup_epochs": 0,
    "validation_size": 0,
    "patience": None,
    "prior": "normal",
    "guide": "diagonal",
    "likelihood": "bernoulli",
}
#: The VampPrior paper's protocol [2]: z of 40, gated dense 300-300 MLPs, Adam 5e-4, batch 100,
#: KL warm-up over 100 epochs, 10,000 training images held out for early stopping with
#: patience 50 (at most 2,000 epochs), the ELBO with one sample.
_VAMPPRIOR_PAPER = {
    "dataset": "mnist",
    "binarize": "dynamic",
    "latent_dim": 40,
    "hidden_dims": [300, 300],
    "activation": "gated",
    "lower_latent_dim": None,
    "elbo": "trace",
    "num_particles": 1,
    "lr": 5e-4,
    "lr_schedule": "constant",
    "epochs": 2000,
    "batch_size": 100,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "warmup_epochs": 100,
    "validation_size": 10000,
    "patience": 50,
    "prior": "normal",
    "guide": "diagonal",
    "likelihood": "bernoulli",
}
_TWO_LAYERS_IWAE = {"lower_latent_dim": 100, "inner_hidden_dims": [100, 100], "hierarchy": "iwae"}
_TWO_LAYERS_VAMP = {"lower_latent_dim": 40, "inner_hidden_dims": [300, 300]}
_TWO_LAYERS_VAMP |= {"hierarchy": "vampprior"}
_VAMP = {"prior": "vamp", "prior_kwargs": {"num_components": 500}}

#: name -> (one line on what it reproduces, the Config fields it sets).
RECIPES: dict[str, tuple[str, dict]] = {
    "iwae-paper": (
        "Burda et al. 2016, 1 layer: 200-200-50 tanh, iwae K=50, 3280 epochs",
        _IWAE_PAPER,
    ),
    "iwae-paper-2layer": (
        "the same with 2 layers: z1=100 (200-200 tanh), z2=50 (100-100 tanh)",
        _IWAE_PAPER | _TWO_LAYERS_IWAE,
    ),
    "vampprior-paper": (
        "Tomczak & Welling 2018: z=40, gated 300-300, normal prior, early stop",
        _VAMPPRIOR_PAPER,
    ),
    "vampprior-paper-vamp": (
        "the same with the VampPrior (500 pseudo-inputs)",
        _VAMPPRIOR_PAPER | _VAMP,
    ),
    "vampprior-paper-2layer": (
        "its two-layer HVAE: z1=z2=40, gated 300-300, N(0, I) prior",
        _VAMPPRIOR_PAPER | _TWO_LAYERS_VAMP,
    ),
    "vampprior-paper-2layer-vamp": (
        "its two-layer HVAE with the VampPrior (500 pseudo-inputs)",
        _VAMPPRIOR_PAPER | _TWO_LAYERS_VAMP | _VAMP,
    ),
}


def recipe_settings(name: str) -> dict:
    """The Config fields recipe ``name`` sets (a fresh copy).

    :raises ValueError: for an unknown name, naming the known ones.
    """
    settings = RECIPES[check_choice("recipe", name, RECIPES)][1]
    return {key: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
            for key, v in settings.items()}  # fmt: skip
