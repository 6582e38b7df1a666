"""Priors p(z) over the latent code.

A prior is an :class:`torch.nn.Module` whose :meth:`Prior.forward` takes no input and returns
a distribution with ``event_shape == (latent_dim,)`` and an empty batch shape; the model
broadcasts it over the data plate. Learnable priors simply own parameters; the VAE registers
them with ``pyro.module("prior", ...)``. Priors that need the rest of the VAE (the VampPrior
pushes pseudo-inputs through the encoder) receive it through :meth:`Prior.bind`.

Constant tensors are buffers and trainable ones parameters, so every prior follows the VAE's
``.to(device)`` and ``.double()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.checks import check_choice, check_int, check_positive
from pyro_vae.distributions import (
    DiagonalNormalMixture,
    inverse_positive_scale,
    mixture,
    positive_scale,
)
from pyro_vae.parts import Part, check_options

if TYPE_CHECKING:
    from pyro_vae.vae import VAE


class Prior(Part):
    """Base class of priors.

    :param int latent_dim: size of the latent code.
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def bind(self, vae: VAE) -> None:
        """Hook called once by :class:`~pyro_vae.vae.VAE` after construction; no-op by default."""

    def forward(self) -> dist.TorchDistribution:
        raise NotImplementedError


class StandardNormal(Prior):
    """The standard Normal prior N(0, I) of the original VAE.

    References:

    [1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014).
    """

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        # Buffers, not parameters: they follow .to(device) and dtype but are never trained.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedNormal(Prior):
    """A diagonal Gaussian N(loc, diag(scale^2)) whose loc and scale are trained with the VAE.

    The scale is ``softplus(raw_scale) + MIN_SCALE`` (see
    :func:`~pyro_vae.distributions.positive_scale`)
    and starts at 1, the loc at 0, so training starts from N(0, I). With an affine first decoder
    layer this prior is no more expressive than N(0, I) (the decoder can absorb any affine map of
    z); it is the simplest learnable prior and keeps the analytic KL of the diagonal guide.

    :param int latent_dim: size of the latent code.

    References:

    [1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014),
        where the prior p_theta(z) may carry generative parameters.
    """

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(torch.full((latent_dim,), inverse_positive_scale(1.0)))

    @property
    def scale(self) -> torch.Tensor:
        return positive_scale(self.raw_scale)

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class MixtureOfGaussians(Prior):
    """A learnable mixture of ``num_components`` diagonal Gaussians with learnable weights.

    The component locs start at independent N(0, I) draws (so that no two components coincide
    and the mixture covers the region N(0, I) covers), the component scales at 0.5 and the
    weights uniform. Pyro has no closed-form KL against a mixture, so mean-field ELBOs fall back
    to a Monte Carlo estimate of the KL term.

    :param int latent_dim: size of the latent code.
    :param int num_components: number of Gaussians K.

    References:

    [1] `Deep Unsupervised Clustering with Gaussian Mixture Variational Autoencoders`,
        Nat Dilokthanakul, Pedro A. M. Mediano, Marta Garnelo, Matthew C. H. Lee,
        Hugh Salimbeni, Kai Arulkumaran, Murray Shanahan (2016).
    [2] `VAE with a VampPrior`, Jakub M. Tomczak, Max Welling (AISTATS 2018), section 2.2
        (the mixture-of-Gaussians prior as a learnable baseline).
    """

    def __init__(self, latent_dim: int, num_components: int = 10):
        super().__init__(latent_dim)
        num_components = check_int("mixture prior num_components", num_components)
        self.num_components = num_components
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim))
        self.raw_scales = nn.Parameter(
            torch.full((num_components, latent_dim), inverse_positive_scale(0.5))
        )
        self.logits = nn.Parameter(torch.zeros(num_components))

    def forward(self) -> dist.TorchDistribution:
        return DiagonalNormalMixture(self.logits, self.locs, positive_scale(self.raw_scales))


class VampPrior(Prior):
    """The VampPrior p(z) = 1/K sum_k q(z|u_k): the VAE's own posterior at K learnable
    pseudo-inputs u_k.

    The pseudo-inputs are created by :meth:`bind` (they need the VAE's ``data_dim``), drawn
    uniformly from ``init_range`` (the [0, 1] of image data by default) and then trained freely,
    without clamping. The components come from ``vae.encode``, so the prior works with any guide
    family whose distribution for K inputs has batch shape (K,): diagonal, full-covariance or
    flow posteriors. The encoder's weights receive gradients from the model's prior term too.
    Pyro has no closed-form KL against a mixture, so mean-field ELBOs fall back to a Monte
    Carlo estimate of the KL term.

    :param int latent_dim: size of the latent code.
    :param int num_components: number of pseudo-inputs K (500 in the paper for MNIST).
    :param tuple init_range: ``(low, high)`` of the uniform initialization of the pseudo-inputs.

    References:

    [1] `VAE with a VampPrior`, Jakub M. Tomczak, Max Welling (AISTATS 2018).
    """

    def __init__(
        self,
        latent_dim: int,
        num_components: int = 500,
        init_range: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__(latent_dim)
        self.num_components = check_int("vamp prior num_components", num_components)
        low, high = (float(v) for v in init_range)
        if not low < high:
            raise ValueError(f"vamp prior init_range must have low < high, got {init_range!r}")
        self.init_range = (low, high)
        self.register_parameter("pseudo_inputs", None)

    def bind(self, vae: VAE) -> None:
        """Create the pseudo-inputs for ``vae`` and keep a reference to it.

        :param vae: the VAE whose encoder and guide family define the components.
        """
        if self.pseudo_inputs is None:
            weight = next(vae.encoder.parameters())
            u = torch.empty(self.num_components, vae.data_dim, dtype=weight.dtype)
            self.pseudo_inputs = nn.Parameter(u.uniform_(*self.init_range).to(weight.device))
        elif self.pseudo_inputs.shape[-1] != vae.data_dim:
            raise ValueError(
                f"vamp prior has pseudo-inputs of size {self.pseudo_inputs.shape[-1]} but the VAE "
                f"has data_dim={vae.data_dim}; build a new VampPrior for this VAE"
            )
        # A plain attribute, not a submodule: the VAE owns this prior, so registering the VAE
        # here would make a module cycle and list the encoder's parameters twice.
        object.__setattr__(self, "_vae", vae)

    def forward(self) -> dist.TorchDistribution:
        if self.pseudo_inputs is None:
            raise RuntimeError(
                "vamp prior is not bound to a VAE; pass it to VAE(prior=...) before using it"
            )
        components = self._vae.encode(self.pseudo_inputs)
        return mixture(self.pseudo_inputs.new_zeros(self.num_components), components)


class StudentT(Prior):
    """Independent Student-t latents with ``df`` degrees of freedom, location 0 and scale 1.

    Heavier tails than N(0, I) leave room for outlying codes and, unlike N(0, I), are not
    rotation invariant, which favours axis-aligned (sparser) codes. Pyro has no closed-form KL
    from a Gaussian to a Student-t, so mean-field ELBOs fall back to a Monte Carlo estimate of
    the KL term.

    :param int latent_dim: size of the latent code.
    :param float df: degrees of freedom (> 0); smaller is heavier-tailed, the variance is
        finite only for ``df > 2`` and the prior tends to N(0, I) as ``df`` grows.

    References:

    [1] `Disentangling Disentanglement in Variational Autoencoders`, Emile Mathieu,
        Tom Rainforth, N. Siddharth, Yee Whye Teh (ICML 2019).
    [2] `t^3-Variational Autoencoder: Learning Heavy-tailed Data with Student's t and Power
        Divergence`, Juno Kim, Jaehyuk Kwon, Mincheol Cho, Hyunjong Lee, Joong-Ho Won
        (ICLR 2024).
    """

    def __init__(self, latent_dim: int, df: float = 3.0):
        super().__init__(latent_dim)
        df = check_positive("student_t prior df", df)
        self.register_buffer("df", torch.full((latent_dim,), df))
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


def get_prior(name: str, latent_dim: int, **kwargs) -> Prior:
    """Build a registered prior by name.

    :param str name: a key of :data:`PRIORS`.
    :param int latent_dim: size of the latent code.
    :param kwargs: options of that prior, e.g. ``num_components`` for ``"mixture"``.
    :returns: the prior module.
    :raises ValueError: for an unknown name, or an option the prior's constructor does not take.

    >>> get_prior("mixture", 2, num_components=3)().event_shape
    torch.Size([2])
    """
    cls = PRIORS[check_choice("prior", name, PRIORS)]
    check_options("prior", cls, kwargs)
    return cls(latent_dim, **kwargs)


PRIORS: dict[str, type[Prior]] = {
    "learned_normal": LearnedNormal,
    "mixture": MixtureOfGaussians,
    "normal": StandardNormal,
    "student_t": StudentT,
    "vamp": VampPrior,
}
