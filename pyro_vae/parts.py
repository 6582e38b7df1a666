"""The base of every swappable part (prior, likelihood, guide family): it remembers how it was
built.

A run folder records each part as a registry name plus constructor options, so that
:func:`~pyro_vae.runs.load_run` can build it again. A part built by name inside
:class:`~pyro_vae.vae.VAE` and a part built by hand and passed as an object
(``VAE(64, prior=MixtureOfGaussians(20, num_components=5))``) are recorded alike, because
:class:`Part` captures the constructor arguments of every subclass, user-written ones included,
with no code in the subclass.

:func:`check_options` is the one check of the options a part is built with by name, used by
:func:`~pyro_vae.priors.get_prior`, :func:`~pyro_vae.likelihoods.get_likelihood` and
:func:`~pyro_vae.guides.get_guide`, so that Python and command-line users get the same error.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping

from torch import nn


class Part(nn.Module):
    """Base class of :class:`~pyro_vae.priors.Prior`, :class:`~pyro_vae.likelihoods.Likelihood`
    and :class:`~pyro_vae.guides.GuideFamily`.

    Every subclass's ``__init__`` is wrapped (keeping its signature) so that the outermost call,
    the one of the class actually built, records its keyword arguments in :attr:`init_kwargs`.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _recording_init(cls.__init__)

    @property
    def init_kwargs(self) -> dict | None:
        """The arguments this part was built with after its size (``latent_dim`` or
        ``data_dim``), by name and as given (defaults are not filled in), so that
        ``type(part)(size, **part.init_kwargs)`` builds it again; ``None`` when they cannot be
        named (a constructor taking ``*args``)."""
        return self.__dict__.get("_init_kwargs")


def check_options(kind: str, cls: type, options: Mapping[str, object]) -> None:
    """Refuse options that the constructor of ``cls`` does not take, naming those it does.

    The first constructor argument is the part's size (``latent_dim`` or ``data_dim``), not an
    option. A constructor taking ``**kwargs`` accepts every option.

    :param str kind: what the part is, for the message (``"prior"``, ``"likelihood"``, ...).
    :param type cls: the part's class.
    :param options: the keyword arguments it is to be built with.
    :raises ValueError: ``<kind> <class> takes no option '<name>'; it takes [...]``.

    >>> from pyro_vae.priors import MixtureOfGaussians
    >>> check_options("prior", MixtureOfGaussians, {"num_components": 3})
    """
    params = list(inspect.signature(cls).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = sorted(p.name for p in params if p.kind in named)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"{kind} {cls.__name__} takes no option {unknown[0]!r}; it takes {accepted or 'none'}"
        )


def _recording_init(init: Callable) -> Callable:
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        # Only the outermost __init__ records: the arguments of the class being built, not
        # those it passes on to its base class.
        if "_init_kwargs" not in self.__dict__:
            # object.__setattr__: nn.Module's own __setattr__ needs its __init__ to have run.
            object.__setattr__(self, "_init_kwargs", _named_arguments(signature, args, kwargs))
        init(self, *args, **kwargs)

    return __init__


def _named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict | None:
    """The arguments after ``self`` and the size, by name; ``None`` if some have no name."""
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return None  # the constructor itself raises the real error
    named = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if len(value) > (i == 1):  # more positional values than the size alone
                return None
        elif i >= 2:
            if kind is inspect.Parameter.POSITIONAL_ONLY:
                return None
            named[name] = value
    return named
