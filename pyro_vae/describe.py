"""A model and its description in a :class:`~pyro_vae.config.Config`, both ways.

:func:`describe_model` says how ``config.json`` records a :class:`~pyro_vae.vae.VAE` (its sizes
and, for each part, a registry name and constructor options, or the import path of an
unregistered class); :func:`build_vae` builds the untrained model a config describes.
"""

from __future__ import annotations

import dataclasses
import json

from pyro_vae.config import Config
from pyro_vae.guides import GUIDES
from pyro_vae.hierarchical import HierarchicalVAE
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.priors import PRIORS
from pyro_vae.vae import VAE

#: Each swappable part: the config field naming it, its registry and the registry's path.
PART_REGISTRIES = {
    "prior": (PRIORS, "pyro_vae.priors.PRIORS"),
    "likelihood": (LIKELIHOODS, "pyro_vae.likelihoods.LIKELIHOODS"),
    "guide": (GUIDES, "pyro_vae.guides.GUIDES"),
}


def build_vae(config: Config) -> VAE:
    """Build the (untrained) VAE a config describes.

    :raises ValueError: if a part is not registered under the name the config gives, or the
        run trained a custom model class; the message says how to load such a run.
    """
    if config.data_dim is None:
        raise ValueError("config.data_dim is not set; it is filled in when training starts")
    check_buildable(config.to_dict())
    options = {
        "data_dim": config.data_dim,
        "latent_dim": config.latent_dim,
        "hidden_dims": config.hidden_dims,
        "activation": config.activation,
        "prior": config.prior,
        "likelihood": config.likelihood,
        "guide": config.guide,
        "prior_kwargs": config.prior_kwargs,
        "likelihood_kwargs": config.likelihood_kwargs,
        "guide_kwargs": config.guide_kwargs,
    }
    if config.lower_latent_dim is None:
        return VAE(**options)
    return HierarchicalVAE(
        lower_latent_dim=config.lower_latent_dim,
        inner_hidden_dims=config.inner_hidden_dims,
        hierarchy=config.hierarchy,
        **options,
    )


def check_buildable(config: dict) -> None:
    """Raise :class:`ValueError`, saying how to load the run instead, if :func:`build_vae`
    cannot rebuild the model that ``config`` (a config as a dict) describes.

    That is the case when the run trained a VAE subclass (a custom model) or used a part whose
    name is not registered in this process: a part passed as an object of an unregistered
    class (recorded by its import path), or a user-registered part not registered again.
    """
    how = "build the model as in training and pass it: load_run(run_dir, vae=...)"
    vae_class = config.get("vae_class")
    if vae_class is not None:
        raise ValueError(
            f"this run trained a custom model class {vae_class!r}, which config.json cannot "
            f"rebuild; {how}"
        )
    for kind, (registry, registry_path) in PART_REGISTRIES.items():
        name = config.get(kind, getattr(Config, kind))
        if not isinstance(name, str) or name in registry:
            continue
        if "." in name:  # a class path: the part was an object of an unregistered class
            raise ValueError(
                f"this run's {kind} was a {name} object, whose class is not registered in "
                f"{registry_path} or whose options are not JSON, so config.json cannot rebuild "
                f"it; {how}"
            )
        raise ValueError(
            f"this run's {kind} {name!r} is not in {registry_path} (which has "
            f"{sorted(registry)}); register its class before loading "
            f"({registry_path}[{name!r}] = YourClass) or {how}"
        )


def is_buildable(config: Config) -> bool:
    """Whether :func:`build_vae` can rebuild the model ``config`` describes (see
    :func:`check_buildable`); if not, :func:`~pyro_vae.runs.load_run` needs the model passed
    as ``vae``."""
    try:
        check_buildable(config.to_dict())
    except ValueError:
        return False
    return True


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class, as config.json records unregistered parts."""
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_part(part, registry: dict[str, type]) -> tuple[str, dict]:
    """How config.json records a part: its registry name and constructor options, or, when it
    cannot be rebuilt by name, the import path of its class (and its options for reference).

    A part cannot be rebuilt by name when its class is not in ``registry`` or its options are
    unknown (see :attr:`~pyro_vae.parts.Part.init_kwargs`) or not JSON.

    :param part: a prior, likelihood or guide family.
    :param dict registry: :data:`~pyro_vae.priors.PRIORS`, ... for that kind of part.
    :returns: ``(name, kwargs)`` for the config fields ``prior`` and ``prior_kwargs``, ....
    """
    kwargs = getattr(part, "init_kwargs", None)
    name = next((k for k in sorted(registry) if registry[k] is type(part)), None)
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        return class_path(type(part)), json.loads(json.dumps(kwargs, default=repr))
    if name is None or kwargs is None:
        return class_path(type(part)), dict(kwargs or {})
    return name, dict(kwargs)


def describe_model(vae: VAE) -> dict:
    """The model fields of a :class:`~pyro_vae.config.Config` for ``vae``: the inverse of
    :func:`build_vae`, also for parts passed to the VAE as objects.

    :param VAE vae: the model.
    :returns: ``data_dim``, ``latent_dim``, ``hidden_dims``, ``activation``, ``prior``,
        ``prior_kwargs``, ``likelihood``, ..., ``guide_kwargs`` and ``vae_class`` (the import
        path of a VAE subclass, ``None`` for :class:`~pyro_vae.vae.VAE` and
        :class:`~pyro_vae.hierarchical.HierarchicalVAE`, which a config describes); for the
        latter also ``lower_latent_dim``, ``inner_hidden_dims`` and ``hierarchy``.
    """
    fields = {
        "data_dim": vae.data_dim,
        "latent_dim": vae.latent_dim,
        "hidden_dims": list(vae.hidden_dims),
        "activation": vae.activation,
        "vae_class": None if type(vae) in (VAE, HierarchicalVAE) else class_path(type(vae)),
    }
    if isinstance(vae, HierarchicalVAE):
        fields["lower_latent_dim"] = vae.lower_latent_dim
        fields["inner_hidden_dims"] = list(vae.inner_hidden_dims)
        fields["hierarchy"] = vae.hierarchy
    parts = {"prior": vae.prior, "likelihood": vae.likelihood, "guide": vae.guide_family}
    for kind, part in parts.items():
        fields[kind], fields[f"{kind}_kwargs"] = describe_part(part, PART_REGISTRIES[kind][0])
    return fields


def record_model(config: Config, vae: VAE) -> Config:
    """``config`` with its model fields describing ``vae`` (see :func:`describe_model`)."""
    return dataclasses.replace(config, **describe_model(vae))
