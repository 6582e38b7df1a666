"""One :func:`dataclasses.dataclass` per run, saved as ``config.json`` beside the outputs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from pyro_vae.data import BINARIZATIONS, DATASETS
from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.networks import ACTIVATIONS
from pyro_vae.objectives import ELBOS
from pyro_vae.priors import PRIORS

#: Bumped when a saved run can no longer be read by this version of the code.
FORMAT_VERSION = 1


@dataclass
class Config:
    """Every setting of a training run: enough to rebuild the model and repeat the run.

    ``binarize=None`` means: dynamic binarization when the likelihood needs binary data,
    none otherwise. ``clip_norm=None`` means no gradient clipping.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    binarize: str | None = None
    latent_dim: int = 20
    hidden_dims: list[int] = field(default_factory=lambda: [400, 400])
    activation: str = "relu"
    prior: str = "normal"
    likelihood: str = "bernoulli"
    guide: str = "diagonal"
    prior_kwargs: dict = field(default_factory=dict)
    likelihood_kwargs: dict = field(default_factory=dict)
    guide_kwargs: dict = field(default_factory=dict)
    elbo: str = "trace"
    num_particles: int = 1
    lr: float = 1e-3
    clip_norm: float | None = None
    epochs: int = 100
    batch_size: int = 100
    beta: float = 1.0
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    #: Filled in from the data set when training starts; needed to rebuild the model.
    data_dim: int | None = None
    image_shape: list[int] | None = None
    #: Filled in by training: the import path of the VAE subclass trained (a custom model),
    #: ``None`` for :class:`~pyro_vae.vae.VAE` itself.
    vae_class: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.hidden_dims, tuple | range):
            self.hidden_dims = list(self.hidden_dims)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first setting that is out of range or unknown.

        A config may come from a ``config.json`` someone else wrote, so every field is checked
        for its type as well as its range before anything is built from it.
        """
        for name in ("latent_dim", "epochs", "batch_size", "num_particles"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.hidden_dims, list) or not all(
            _is_positive_int(h) for h in self.hidden_dims
        ):
            raise ValueError(f"hidden_dims must be positive integers, got {self.hidden_dims!r}")
        for name in ("lr", "beta", "clip_norm"):
            value = getattr(self, name)
            if value is None and name == "clip_norm":
                continue
            if not _is_positive_number(value):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int):
            raise ValueError(f"warmup_epochs must be an integer, got {self.warmup_epochs!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**32
        ):
            raise ValueError(f"seed must be an integer in [0, 2**32 - 1], got {self.seed!r}")
        self._check_names()
        self._check_data_shape()
        _check_format_version(self.format_version)

    def _check_names(self) -> None:
        registries = {
            "dataset": DATASETS,
            "activation": ACTIVATIONS,
            "prior": PRIORS,
            "likelihood": LIKELIHOODS,
            "guide": GUIDES,
            "elbo": ELBOS,
        }
        for name, registry in registries.items():
            value = getattr(self, name)
            if name in ("prior", "likelihood", "guide") and isinstance(value, str) and "." in value:
                continue  # the import path of an unregistered part's class, as fit() records it
            if not isinstance(value, str) or value not in registry:
                raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(registry)}")
        if self.binarize is not None and self.binarize not in BINARIZATIONS:
            raise ValueError(
                f"unknown binarize {self.binarize!r}; choose one of {list(BINARIZATIONS)} or None"
            )
        for name in ("prior_kwargs", "likelihood_kwargs", "guide_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a dict of options by name, got {value!r}")
        if self.vae_class is not None and not isinstance(self.vae_class, str):
            raise ValueError(f"vae_class must be an import path or None, got {self.vae_class!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu', got {self.device!r}")
        if not _is_device_name(self.device):
            raise ValueError(f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError(f"data_dir must be a path string or None, got {self.data_dir!r}")

    def _check_data_shape(self) -> None:
        if self.data_dim is not None and not _is_positive_int(self.data_dim):
            raise ValueError(f"data_dim must be a positive integer or None, got {self.data_dim!r}")
        if self.image_shape is None:
            return
        shape = self.image_shape
        if not isinstance(shape, list) or len(shape) != 2 or not all(map(_is_positive_int, shape)):
            raise ValueError(f"image_shape must be [height, width], got {shape!r}")
        if self.data_dim is not None and shape[0] * shape[1] != self.data_dim:
            raise ValueError(f"image_shape {shape} does not hold data_dim={self.data_dim} pixels")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_positive_number(value) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def _is_device_name(text: str) -> bool:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, as the CLI's ``--device`` takes."""
    try:
        return text == "auto" or torch.device(text).type in ("cpu", "cuda")
    except (RuntimeError, TypeError):
        return False


def _check_format_version(version) -> None:
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise ValueError(
            f"this run was saved in format version {version!r}; this pyro_vae reads "
            f"format_version {FORMAT_VERSION}: use the pyro_vae version that wrote it"
        )
