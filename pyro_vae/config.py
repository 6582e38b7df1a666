"""One frozen :func:`dataclasses.dataclass` per run, saved as ``config.json`` beside the outputs.

A :class:`Config` never changes once made: every change is :func:`dataclasses.replace`, which
builds and checks a new one. The fields with ``help`` in their metadata are the settings a user
chooses (the ``pyro-vae train`` flags are made from them); the others are filled in when
training starts.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

from pyro_vae.checks import check_choice, check_int, check_positive
from pyro_vae.data import BINARIZATIONS, DATASETS
from pyro_vae.devices import check_device_name
from pyro_vae.guides import GUIDES
from pyro_vae.hierarchical import HIERARCHIES
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.networks import ACTIVATION_CHOICES
from pyro_vae.objectives import ELBOS
from pyro_vae.priors import PRIORS
from pyro_vae.recipes import RECIPES, recipe_settings
from pyro_vae.schedules import LR_SCHEDULES, NEEDS_VALIDATION

#: Bumped when a saved run can no longer be read by this version of the code.
FORMAT_VERSION = 1

#: When training runs Pyro's validation (argument, support and trace-shape checks): on the first
#: step of every epoch only, which catches a model that breaks the rules and keeps the hot loop
#: free of checks, or on every step, as Pyro's own ``SVI`` does.
VALIDATIONS = {
    "first_step": "Pyro's checks on the first step of each epoch",
    "every_step": "Pyro's checks on every step",
}

#: The fields naming a registered choice, and the names each may take.
CHOICES = {
    "dataset": DATASETS,
    "binarize": BINARIZATIONS,
    "activation": ACTIVATION_CHOICES,
    "hierarchy": HIERARCHIES,
    "prior": PRIORS,
    "likelihood": LIKELIHOODS,
    "guide": GUIDES,
    "elbo": ELBOS,
    "validation": VALIDATIONS,
    "lr_schedule": LR_SCHEDULES,
    "recipe": RECIPES,
}

#: The parts, whose field may also hold the import path of an unregistered class.
PART_FIELDS = ("prior", "likelihood", "guide")


def _setting(default, help: str):
    """A field the user chooses: ``help`` is the text of its ``pyro-vae train`` flag."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    """Every setting of a training run: enough to rebuild the model and repeat the run.

    ``binarize=None`` means: dynamic binarization when the likelihood needs binary data,
    none otherwise. ``clip_norm=None`` means no gradient clipping. A config is checked when it
    is made (see :meth:`validate`) and never changes: use :func:`dataclasses.replace`.

    >>> config = Config(epochs=3)
    >>> dataclasses.replace(config, lr=3e-3).lr
    0.003
    """

    dataset: str = _setting("digits", "data set")
    data_dir: str | None = _setting(
        None, "folder holding torchvision data sets (default: $PYRO_VAE_DATA or the user cache)"
    )
    binarize: str | None = _setting(
        None, "binarization of grey levels (default: dynamic for Bernoulli likelihoods, else none)"
    )
    latent_dim: int = _setting(20, "size of the latent code z")
    hidden_dims: list[int] = _setting([400, 400], "hidden layer sizes of encoder and decoder")
    activation: str = _setting("relu", "activation of the hidden layers")
    lower_latent_dim: int | None = _setting(
        None,
        "size of a second stochastic layer z1 between x and the code z2 of --latent-dim: a "
        "two-layer hierarchical VAE (default: one layer)",
    )
    inner_hidden_dims: list[int] = _setting(
        [100, 100], "hidden layer sizes of the networks between z1 and z2 (two layers only)"
    )
    hierarchy: str = _setting(
        "iwae",
        "wiring of the two layers: iwae = p(x|z1) p(z1|z2), q(z1|x) q(z2|z1); vampprior = "
        "p(x|z1,z2) p(z1|z2), q(z2|x) q(z1|x,z2) (docs/parts.md)",
    )
    prior: str = _setting("normal", "prior p(z)")
    likelihood: str = _setting("bernoulli", "likelihood p(x|z)")
    guide: str = _setting("diagonal", "variational family q(z|x)")
    prior_kwargs: dict = field(default_factory=dict)
    likelihood_kwargs: dict = field(default_factory=dict)
    guide_kwargs: dict = field(default_factory=dict)
    elbo: str = _setting(
        "trace",
        "training objective: trace = Monte Carlo ELBO, meanfield = analytic KL, stl = ELBO with "
        "path-derivative gradients, iwae = importance-weighted bound, dreg = iwae with doubly "
        "reparameterized gradients (docs/objectives.md)",
    )
    num_particles: int = _setting(1, "samples of z per datapoint and step (vectorized)")
    lr: float = _setting(1e-3, "Adam learning rate")
    adam_betas: list[float] = _setting([0.9, 0.999], "Adam's two averaging coefficients")
    adam_eps: float = _setting(1e-8, "Adam's term added to the denominator")
    lr_schedule: str = _setting(
        "constant",
        "learning rate by epoch: constant, iwae = 3**i epochs at lr*10**(-i/7) for i = 0..7, "
        "exponential = lr*lr_decay**(epoch-1), plateau = times plateau_factor when valid_elbo "
        "has not risen for plateau_patience epochs (docs/runs.md)",
    )
    lr_decay: float = _setting(0.99, "factor on the learning rate per epoch, for exponential")
    plateau_factor: float = _setting(
        0.1, "factor on the learning rate when valid_elbo stalls, for plateau"
    )
    plateau_patience: int = _setting(
        10, "epochs without a higher valid_elbo before plateau lowers the learning rate"
    )
    clip_norm: float | None = _setting(
        None, "clip the gradient norm to this value (default: no clipping)"
    )
    epochs: int = _setting(100, "passes over the training set")
    batch_size: int = _setting(100, "datapoints per step")
    beta: float = _setting(1.0, "weight of the KL term")
    warmup_epochs: int = _setting(0, "epochs of linear KL warm-up from 0 to beta")
    seed: int = _setting(0, "random seed (same seed on CPU, same numbers)")
    validation_size: int = _setting(
        0, "training images held out to measure valid_elbo (0: no validation split)"
    )
    validation_seed: int = _setting(0, "seed of the choice of the held-out images")
    patience: int | None = _setting(
        None,
        "stop when valid_elbo has not risen for this many epochs (default: no early stopping)",
    )
    device: str = _setting("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    validation: str = _setting(
        "first_step",
        "when Pyro validates distributions and traces: first_step of each epoch "
        "(fast) or every_step",
    )
    #: The recipe of :data:`~pyro_vae.recipes.RECIPES` the settings came from
    #: (:meth:`from_recipe`), and the fields given over it.
    recipe: str | None = None
    recipe_overrides: list[str] = field(default_factory=list)
    #: Filled in from the data set when training starts; needed to rebuild the model.
    data_dim: int | None = None
    image_shape: list[int] | None = None
    #: Filled in by training: the import path of the VAE subclass trained (a custom model),
    #: ``None`` for :class:`~pyro_vae.vae.VAE` itself.
    vae_class: str | None = None
    #: Filled in by training: the processes that trained the run together (``torchrun``; see
    #: :mod:`pyro_vae.distributed`) and the backend of their process group (``None`` for a
    #: single process).
    world_size: int | None = None
    backend: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Sequences are stored as lists, as config.json reads them back.
        for name in (
            "hidden_dims",
            "inner_hidden_dims",
            "image_shape",
            "adam_betas",
            "recipe_overrides",
        ):
            value = getattr(self, name)
            if isinstance(value, tuple | range):
                object.__setattr__(self, name, list(value))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first setting that is out of range or unknown.

        A config may come from a ``config.json`` someone else wrote, so every field is checked
        for its type as well as its range before anything is built from it.
        """
        for name in ("latent_dim", "num_particles", "epochs", "batch_size"):
            check_int(name, getattr(self, name))
        check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)
        _check_int_list("hidden_dims", self.hidden_dims)
        _check_int_list("inner_hidden_dims", self.inner_hidden_dims)
        if self.lower_latent_dim is not None:
            check_int("lower_latent_dim", self.lower_latent_dim)
        check_positive("lr", self.lr)
        check_positive("beta", self.beta)
        if self.clip_norm is not None:
            check_positive("clip_norm", self.clip_norm)
        self._check_names()
        self._check_optimizer()
        self._check_validation()
        self._check_data_shape()
        _check_format_version(self.format_version)

    def _check_names(self) -> None:
        for name, registry in CHOICES.items():
            value = getattr(self, name)
            if name in ("binarize", "recipe") and value is None:
                continue
            if name in PART_FIELDS and isinstance(value, str) and "." in value:
                continue  # the import path of an unregistered part's class, as fit() records it
            try:
                check_choice(name, value, registry)
            except ValueError as e:
                if name != "binarize":
                    raise
                raise ValueError(f"{e} or None") from None  # None: chosen by the likelihood
        overrides, fields = self.recipe_overrides, {f.name for f in dataclasses.fields(self)}
        names = isinstance(overrides, list) and all(
            isinstance(k, str) and k in fields for k in overrides
        )
        if not names or (overrides and self.recipe is None):
            raise ValueError(
                f"recipe_overrides must name config fields given over the recipe, got {overrides!r}"
            )
        for name in ("prior_kwargs", "likelihood_kwargs", "guide_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a dict of options by name, got {value!r}")
        if self.vae_class is not None and not isinstance(self.vae_class, str):
            raise ValueError(f"vae_class must be an import path or None, got {self.vae_class!r}")
        if self.world_size is not None:
            check_int("world_size", self.world_size)
        if self.backend is not None and not isinstance(self.backend, str):
            raise ValueError(
                f"backend must be a process-group backend or None, got {self.backend!r}"
            )
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu', got {self.device!r}")
        check_device_name(self.device)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError(f"data_dir must be a path string or None, got {self.data_dir!r}")

    def _check_optimizer(self) -> None:
        betas = self.adam_betas
        if not (isinstance(betas, list) and len(betas) == 2 and all(map(_is_fraction, betas))):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        check_positive("adam_eps", self.adam_eps)
        check_positive("lr_decay", self.lr_decay)
        if self.lr_decay > 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if not (_is_fraction(self.plateau_factor) and self.plateau_factor > 0):
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor!r}")
        check_int("plateau_patience", self.plateau_patience, minimum=0)

    def _check_validation(self) -> None:
        check_int("validation_size", self.validation_size, minimum=0)
        check_int("validation_seed", self.validation_seed, minimum=0, maximum=2**32 - 1)
        if self.patience is not None:
            check_int("patience", self.patience)
        if self.validation_size > 0:
            return
        if self.patience is not None:
            raise ValueError(
                f"patience {self.patience} stops on valid_elbo, which needs a validation split; "
                "set config.validation_size to a positive number of images"
            )
        if self.lr_schedule in NEEDS_VALIDATION:
            raise ValueError(
                f"lr_schedule {self.lr_schedule!r} steps on valid_elbo, which needs a validation "
                "split; set config.validation_size to a positive number of images"
            )

    def _check_data_shape(self) -> None:
        if self.data_dim is not None and not _all_positive_ints([self.data_dim]):
            raise ValueError(f"data_dim must be a positive integer or None, got {self.data_dim!r}")
        shape = self.image_shape
        if shape is None:
            return
        if not isinstance(shape, list) or len(shape) != 2 or not _all_positive_ints(shape):
            raise ValueError(f"image_shape must be [height, width], got {shape!r}")
        if self.data_dim is not None and shape[0] * shape[1] != self.data_dim:
            raise ValueError(f"image_shape {shape} does not hold data_dim={self.data_dim} pixels")

    def to_dict(self) -> dict:
        """The fields as plain JSON values, as ``config.json`` holds them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_recipe(cls, name: str, **given) -> Config:
        """The config of recipe ``name`` (a key of :data:`~pyro_vae.recipes.RECIPES`), with
        every field in ``given`` taking precedence over the recipe's value.

        ``recipe_overrides`` lists the given fields whose value differs from the recipe's;
        given fields the recipe leaves alone (``data_dir``, ``seed``) are not overrides.

        >>> config = Config.from_recipe("vampprior-paper", epochs=10, seed=3)
        >>> config.activation, config.epochs, config.recipe_overrides
        ('gated', 10, ['epochs'])
        """
        settings = recipe_settings(name)
        config = cls(**(settings | given | {"recipe": name}))
        overrides = sorted(k for k in given if k in settings and getattr(config, k) != settings[k])
        return dataclasses.replace(config, recipe_overrides=overrides)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """Rebuild a config, refusing unknown keys and runs saved in another format."""
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
        _check_format_version(data.get("format_version", FORMAT_VERSION))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def model_summary(config: Config) -> dict:
    """The model fields of a run's config that reports print."""
    return {
        "dataset": config.dataset,
        "prior": config.prior,
        "likelihood": config.likelihood,
        "guide": config.guide,
        "latent_dim": config.latent_dim,
        "hidden_dims": list(config.hidden_dims),
        "trained_with_elbo": config.elbo,
    }


def _all_positive_ints(values: list) -> bool:
    try:
        for value in values:
            check_int("", value)
    except ValueError:
        return False
    return True


def _is_fraction(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool) in [0, 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value < 1


def _check_int_list(name: str, values: object) -> None:
    if not isinstance(values, list) or not _all_positive_ints(values):
        raise ValueError(f"{name} must be positive integers, got {values!r}")


def _check_format_version(version: object) -> None:
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise ValueError(
            f"this run was saved in format version {version!r}; this pyro_vae reads "
            f"format_version {FORMAT_VERSION}: use the pyro_vae version that wrote it"
        )
