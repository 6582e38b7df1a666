"""One :func:`dataclasses.dataclass` per run, saved as ``config.json`` beside the outputs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

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
    batch_size: int = 128
    beta: float = 1.0
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    #: Filled in from the data set when training starts; needed to rebuild the model.
    data_dim: int | None = None
    image_shape: list[int] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.hidden_dims = list(self.hidden_dims)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first setting that is out of range."""
        for name in ("latent_dim", "epochs", "batch_size", "num_particles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for h in self.hidden_dims:
            if isinstance(h, bool) or not isinstance(h, int) or h < 1:
                raise ValueError(f"hidden_dims must be positive integers, got {self.hidden_dims!r}")
        for name in ("lr", "beta", "clip_norm"):
            value = getattr(self, name)
            if value is None and name == "clip_norm":
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int):
            raise ValueError(f"warmup_epochs must be an integer, got {self.warmup_epochs!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """Rebuild a config, refusing unknown keys and runs saved in another format."""
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"this run was saved in format version {version!r}; this pyro_vae reads "
                f"version {FORMAT_VERSION}: use the pyro_vae version that wrote it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)
