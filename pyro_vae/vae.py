"""The variational autoencoder: a Pyro ``model`` p(z) p(x|z) and ``guide`` q(z|x)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_vae.checks import check_int
from pyro_vae.guides import GuideFamily, get_guide
from pyro_vae.likelihoods import Likelihood, get_likelihood
from pyro_vae.networks import MLP
from pyro_vae.priors import Prior, get_prior


def point_estimate(q: dist.Distribution) -> torch.Tensor:
    """The mean of ``q`` where it has one in closed form (flows do not), else one sample."""
    try:
        return q.mean
    except NotImplementedError:
        return q.sample()


class VAE(nn.Module):
    """A variational autoencoder written as a Pyro model/guide pair.

    The model is p(z) p(x|z) with sample sites ``"z"`` and ``"x"`` under one
    ``pyro.plate("data", N)``; the guide is q(z|x) with site ``"z"``. The prior, the likelihood
    and the variational family are registered parts (see :data:`~pyro_vae.priors.PRIORS`,
    :data:`~pyro_vae.likelihoods.LIKELIHOODS`, :data:`~pyro_vae.guides.GUIDES`) given by name or
    as ready-made modules. The KL weight (beta times the warm-up factor) lives in
    :attr:`kl_scale` and is applied with :func:`pyro.poutine.scale` to site ``"z"`` in both the
    model and the guide, so that every ELBO sees beta * KL.

    A part is swapped in one of three ways:

    - by name: ``VAE(64, prior="mixture", prior_kwargs={"num_components": 10})``, as the CLI
      and :class:`~pyro_vae.config.Config` do; a class registered in the registry dict
      (``PRIORS["my_prior"] = MyPrior``) is available by name like the built-in ones;
    - by object: ``VAE(64, latent_dim=2, prior=MixtureOfGaussians(2, num_components=10))``,
      also with an instance of your own subclass of :class:`~pyro_vae.priors.Prior`, ...;
      :func:`~pyro_vae.train.fit` records it in ``config.json`` by registry name and
      constructor options, or by class path when its class is not registered;
    - by writing the model: subclass :class:`VAE` and override :meth:`model` (and
      :meth:`sample`, if the prior is no longer :attr:`prior`). Keep the sites ``"z"`` and
      ``"x"`` under one ``pyro.plate("data", N)`` and let tensors broadcast over a leading
      particle dimension, so that :func:`~pyro_vae.train.fit`, the estimators of
      :mod:`pyro_vae.estimators` (which also take any model and guide functions) and the plots
      work unchanged; reload such a run with ``load_run(run_dir, vae=MyVAE(...))``.

    :param int data_dim: number of features per datapoint (784 for MNIST).
    :param int latent_dim: size of the latent code.
    :param hidden_dims: hidden layer sizes of the encoder; the decoder mirrors them.
    :param str activation: activation between hidden layers, a key of
        :data:`~pyro_vae.networks.ACTIVATIONS`, or ``"gated"`` for gated dense hidden layers
        (:class:`~pyro_vae.networks.GatedDense`).
    :param prior: a key of :data:`~pyro_vae.priors.PRIORS` or a :class:`~pyro_vae.priors.Prior`.
    :param likelihood: a key of :data:`~pyro_vae.likelihoods.LIKELIHOODS` or a
        :class:`~pyro_vae.likelihoods.Likelihood`.
    :param guide: a key of :data:`~pyro_vae.guides.GUIDES` or a
        :class:`~pyro_vae.guides.GuideFamily`.
    :param dict prior_kwargs: options for the prior when given by name.
    :param dict likelihood_kwargs: options for the likelihood when given by name.
    :param dict guide_kwargs: options for the variational family when given by name.

    >>> vae = VAE(data_dim=64, latent_dim=2, hidden_dims=(32,), likelihood="normal")
    >>> pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, torch.rand(5, 64)) > 0
    True
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 20,
        hidden_dims: Sequence[int] = (400, 400),
        activation: str = "relu",
        prior: str | Prior = "normal",
        likelihood: str | Likelihood = "bernoulli",
        guide: str | GuideFamily = "diagonal",
        prior_kwargs: dict | None = None,
        likelihood_kwargs: dict | None = None,
        guide_kwargs: dict | None = None,
    ):
        super().__init__()
        check_int("data_dim", data_dim)
        check_int("latent_dim", latent_dim)
        hidden_dims = tuple(hidden_dims)
        for h in hidden_dims:
            check_int("every hidden size", h)
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.hidden_dims = hidden_dims
        self.activation = activation
        self.kl_scale = 1.0
        if isinstance(prior, str):
            prior = get_prior(prior, latent_dim, **(prior_kwargs or {}))
        if isinstance(likelihood, str):
            likelihood = get_likelihood(likelihood, data_dim, **(likelihood_kwargs or {}))
        if isinstance(guide, str):
            guide = get_guide(guide, latent_dim, **(guide_kwargs or {}))
        self.prior = prior
        self.likelihood = likelihood
        self.guide_family = guide
        self.build_networks()
        self.prior.bind(self)

    def build_networks(self) -> None:
        """Build the encoder x -> q(z|x) parameters and the decoder z -> p(x|z) parameters; a
        subclass with other networks overrides this (it runs before the prior is bound)."""
        hidden, activation = self.hidden_dims, self.activation
        self.encoder = MLP(self.data_dim, hidden, self.guide_family.output_dim, activation)
        self.decoder = MLP(self.latent_dim, hidden[::-1], self.likelihood.output_dim, activation)

    @contextlib.contextmanager
    def kl_weight(self, weight: float) -> Iterator[None]:
        """Run the block with the KL weight :attr:`kl_scale` set to ``weight``, and put the old
        value back afterwards (also when the block raises).

        >>> vae = VAE(64, latent_dim=2, hidden_dims=(8,))
        >>> with vae.kl_weight(0.5):
        ...     vae.kl_scale
        0.5
        >>> vae.kl_scale
        1.0
        """
        previous, self.kl_scale = self.kl_scale, weight
        try:
            yield
        finally:
            self.kl_scale = previous

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`TypeError`/:class:`ValueError` unless ``x`` is an ``(N, data_dim)``
        floating-point tensor."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point torch.Tensor, got {kind}")
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(
                f"x must have shape (N, {self.data_dim}), got {tuple(x.shape)}; "
                "flatten images to one row per datapoint"
            )

    def model(self, x: torch.Tensor) -> None:
        """The generative model p(z) p(x|z), with ``x`` observed."""
        self.check_input(x)
        pyro.module("decoder", self.decoder)
        pyro.module("prior", self.prior)
        pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            with self._kl_scaled():
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """The amortized variational posterior q(z|x)."""
        self.check_input(x)
        pyro.module("encoder", self.encoder)
        pyro.module("guide_family", self.guide_family)
        with pyro.plate("data", x.shape[0]):
            with self._kl_scaled():
                pyro.sample("z", self.encode(x))

    def _kl_scaled(self) -> contextlib.AbstractContextManager:
        """``poutine.scale`` by :attr:`kl_scale`, for the latent site in model and guide (no
        handler at all at weight 1)."""
        if self.kl_scale == 1.0:
            return contextlib.nullcontext()
        return poutine.scale(scale=self.kl_scale)

    def encode(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x): batch shape ``(N,)``, event shape ``(latent_dim,)``."""
        return self.guide_family(self.encoder(x))

    def decode(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x|z): event shape ``(data_dim,)``."""
        return self.likelihood(self.decoder(z))

    @torch.no_grad()
    def latent_code(self, x: torch.Tensor) -> torch.Tensor:
        """A point estimate of the code of ``x``: the posterior mean, or a sample for flows."""
        return point_estimate(self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) at the code of ``x``: the images to show beside the originals."""
        return self.likelihood.mean(self.decoder(self.latent_code(x)))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Mean of p(x|z) for ``num_samples`` codes z drawn from the prior."""
        z = self.prior().sample((num_samples,))
        return self.likelihood.mean(self.decoder(z))
