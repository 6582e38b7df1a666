"""A VAE with two stochastic layers, written as an ordinary Pyro model/guide pair.

The top code ``z2`` has the registered prior, the lower code ``z1`` a diagonal Gaussian
p(z1|z2) whose mean and scale come from a network of ``z2``. Two wirings are registered in
:data:`HIERARCHIES`:

- ``"iwae"`` [1]: p(z2) p(z1|z2) p(x|z1), guide q(z1|x) q(z2|z1) — a plain stack, each layer
  inferred from the one below;
- ``"vampprior"`` [2]: p(z2) p(z1|z2) p(x|z1,z2), guide q(z2|x) q(z1|x,z2) — the decoder sees
  both codes and the guide infers the top code first.

Both are a :class:`~pyro_vae.vae.VAE` whose :meth:`model` and :meth:`guide` have two latent
sites, ``"z1"`` and ``"z2"``, under one ``pyro.plate("data", N)``, so the estimators, training,
evaluation and the plots take it as they take the one-layer model. The prior, the guide family
(of ``z2``), the likelihood and the KL weight (on both sites) work as in the one-layer VAE; the
lower layer's guide is a diagonal Gaussian in both papers and here.

:meth:`encode` is q(z2|x), what the VampPrior's components, :func:`~pyro_vae.active_units` and
the latent-space plot use. In the ``"vampprior"`` wiring the guide has it; in the ``"iwae"``
wiring it is q(z2|z1) at the mean of q(z1|x), a point-estimate summary (a VampPrior on this
wiring is then a mixture of these, a valid learned prior but not the paper's).

References:

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (ICLR
    2016), section 5: two stochastic layers of 100 and 50 units.
[2] `VAE with a VampPrior`, Jakub M. Tomczak, Max Welling (AISTATS 2018), section 3.2 (the
    two-layer model, HVAE).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.checks import check_choice, check_int
from pyro_vae.guides import DiagonalNormal, GuideFamily
from pyro_vae.likelihoods import Likelihood
from pyro_vae.networks import MLP
from pyro_vae.priors import Prior
from pyro_vae.vae import VAE

#: The wirings of the two layers: name -> what it is.
HIERARCHIES = {
    "iwae": "p(x|z1) p(z1|z2), q(z1|x) q(z2|z1) (Burda et al.)",
    "vampprior": "p(x|z1,z2) p(z1|z2), q(z2|x) q(z1|x,z2) (Tomczak and Welling)",
}


class HierarchicalVAE(VAE):
    """A two-layer VAE: top code ``z2`` of size ``latent_dim`` under the prior, lower code
    ``z1`` of size ``lower_latent_dim`` between it and the data.

    The networks that touch x (the lower encoder and the decoder) have ``hidden_dims``; those
    between the codes (q(z2|z1) in the ``"iwae"`` wiring, p(z1|z2) in both) have
    ``inner_hidden_dims``. The other arguments are those of :class:`~pyro_vae.vae.VAE`.

    :param int data_dim: number of features per datapoint.
    :param int latent_dim: size of the top code z2 (the prior's).
    :param int lower_latent_dim: size of the lower code z1.
    :param hidden_dims: hidden sizes of the networks from and to x.
    :param inner_hidden_dims: hidden sizes of the networks between z1 and z2.
    :param str hierarchy: a key of :data:`HIERARCHIES`.

    >>> vae = HierarchicalVAE(64, latent_dim=2, lower_latent_dim=3, hidden_dims=(16,))
    >>> trace = pyro.poutine.trace(vae.guide).get_trace(torch.rand(5, 64))
    >>> [trace.nodes[name]["value"].shape for name in ("z1", "z2")]
    [torch.Size([5, 3]), torch.Size([5, 2])]
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 50,
        lower_latent_dim: int = 100,
        hidden_dims: Sequence[int] = (200, 200),
        inner_hidden_dims: Sequence[int] = (100, 100),
        hierarchy: str = "iwae",
        activation: str = "relu",
        prior: str | Prior = "normal",
        likelihood: str | Likelihood = "bernoulli",
        guide: str | GuideFamily = "diagonal",
        prior_kwargs: dict | None = None,
        likelihood_kwargs: dict | None = None,
        guide_kwargs: dict | None = None,
    ):
        self.lower_latent_dim = check_int("lower_latent_dim", lower_latent_dim)
        self.inner_hidden_dims = tuple(inner_hidden_dims)
        for h in self.inner_hidden_dims:
            check_int("every inner hidden size", h)
        self.hierarchy = check_choice("hierarchy", hierarchy, HIERARCHIES)
        super().__init__(
            data_dim, latent_dim, hidden_dims, activation, prior, likelihood, guide,
            prior_kwargs, likelihood_kwargs, guide_kwargs,
        )  # fmt: skip

    def build_networks(self) -> None:
        """The encoder gives q(z2|.), the lower encoder q(z1|.), the conditional prior
        p(z1|z2) and the decoder p(x|.), with the inputs the wiring gives them."""
        z1, z2, act = self.lower_latent_dim, self.latent_dim, self.activation
        hidden, inner, top_out = (
            self.hidden_dims,
            self.inner_hidden_dims,
            self.guide_family.output_dim,
        )
        self.lower_family = DiagonalNormal(z1)  # q(z1|.) and p(z1|z2) alike
        self.conditional_prior = MLP(z2, inner[::-1], self.lower_family.output_dim, act)
        if self.hierarchy == "iwae":
            self.lower_encoder = MLP(self.data_dim, hidden, self.lower_family.output_dim, act)
            self.encoder = MLP(z1, inner, top_out, act)
            self.decoder = MLP(z1, hidden[::-1], self.likelihood.output_dim, act)
        else:
            self.encoder = MLP(self.data_dim, hidden, top_out, act)
            self.lower_encoder = MLP(self.data_dim + z2, hidden, self.lower_family.output_dim, act)
            self.decoder = MLP(z1 + z2, hidden[::-1], self.likelihood.output_dim, act)

    def model(self, x: torch.Tensor) -> None:
        """The generative model p(z2) p(z1|z2) p(x|.), with ``x`` observed."""
        self.check_input(x)
        pyro.module("decoder", self.decoder)
        pyro.module("conditional_prior", self.conditional_prior)
        pyro.module("prior", self.prior)
        pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            with self._kl_scaled():
                z2 = pyro.sample("z2", self.prior())
                z1 = pyro.sample("z1", self.lower_family(self.conditional_prior(z2)))
            pyro.sample("x", self.likelihood(self.decoder(self._decoder_input(z1, z2))), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """The amortized posterior: q(z1|x) q(z2|z1) or q(z2|x) q(z1|x,z2), by the wiring."""
        self.check_input(x)
        pyro.module("encoder", self.encoder)
        pyro.module("lower_encoder", self.lower_encoder)
        pyro.module("guide_family", self.guide_family)
        with pyro.plate("data", x.shape[0]), self._kl_scaled():
            if self.hierarchy == "iwae":
                z1 = pyro.sample("z1", self.lower_family(self.lower_encoder(x)))
                pyro.sample("z2", self.guide_family(self.encoder(z1)))
            else:
                z2 = pyro.sample("z2", self.encode(x))
                pyro.sample("z1", self.lower_family(self.lower_encoder(_joined(x, z2))))

    def _lower_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of q(z1|x) in the ``"iwae"`` wiring, where the guide infers z1 from x."""
        return self.lower_family(self.lower_encoder(x)).mean

    def _decoder_input(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return z1 if self.hierarchy == "iwae" else torch.cat([z1, z2], dim=-1)

    def encode(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z2|x): the guide's in the ``"vampprior"`` wiring; q(z2|z1) at the mean of q(z1|x)
        in the ``"iwae"`` wiring. Batch shape ``(N,)``, event shape ``(latent_dim,)``."""
        if self.hierarchy == "iwae":
            return self.guide_family(self.encoder(self._lower_mean(x)))
        return self.guide_family(self.encoder(x))

    def decode(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x|z2) at the mean of p(z1|z2): event shape ``(data_dim,)``."""
        z1 = self.lower_family(self.conditional_prior(z)).mean
        return self.likelihood(self.decoder(self._decoder_input(z1, z)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|.) at point estimates of both codes of ``x``."""
        if self.hierarchy == "iwae":
            return self.likelihood.mean(self.decoder(self._lower_mean(x)))
        z2 = self.latent_code(x)
        z1 = self.lower_family(self.lower_encoder(_joined(x, z2))).mean
        return self.likelihood.mean(self.decoder(torch.cat([z1, z2], dim=-1)))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Mean of p(x|.) for codes drawn ancestrally: z2 from the prior, z1 from p(z1|z2)."""
        z2 = self.prior().sample((num_samples,))
        z1 = self.lower_family(self.conditional_prior(z2)).sample()
        return self.likelihood.mean(self.decoder(self._decoder_input(z1, z2)))


def _joined(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``x`` and ``z`` side by side, ``x`` broadcast over the leading (particle) dims of ``z``."""
    return torch.cat([x.expand(z.shape[:-1] + x.shape[-1:]), z], dim=-1)
