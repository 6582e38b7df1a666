"""Variational families q(z|x) that turn an encoder's output into a distribution.

A guide family is an :class:`torch.nn.Module` with an ``output_dim`` (how many numbers the
encoder must produce per datapoint) and a :meth:`GuideFamily.forward` mapping the encoder output
of shape ``(N, output_dim)`` to a distribution with batch shape ``(N,)`` and
``event_shape == (latent_dim,)``.

The distributions and flow steps written here, and the closed-form KL from a full-covariance
to a diagonal Gaussian, live in :mod:`pyro_vae.distributions`. Which latent sites of a model
have no closed-form KL is answered by :func:`pyro_vae.estimators.sampled_kl_sites`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from pyro_vae.checks import check_choice, check_int
from pyro_vae.distributions import GatedAffineAutoregressive, conditioned_made, positive_scale
from pyro_vae.parts import Part, check_options


class GuideFamily(Part):
    """Base class of variational families.

    :param int latent_dim: size of the latent code.
    """

    output_dim: int

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError


class DiagonalNormal(GuideFamily):
    """Diagonal Gaussian q(z|x) = N(loc(x), diag(scale(x)^2)), the usual mean-field guide.

    References:

    [1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014).
    """

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.output_dim = 2 * latent_dim

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        loc, raw_scale = encoder_output.split(self.latent_dim, dim=-1)
        return dist.Normal(loc, positive_scale(raw_scale)).to_event(1)


class FullCovarianceNormal(GuideFamily):
    """Gaussian q(z|x) = N(loc(x), L(x) L(x)^T) with a full covariance.

    The encoder produces ``latent_dim`` locs and ``latent_dim * (latent_dim + 1) / 2`` numbers
    for the lower-triangular Cholesky factor, row by row: the diagonal ones give the scales
    ``s = positive_scale(.)``, the strictly lower ones a unit lower-triangular matrix U, and
    ``L = U diag(s)``, so that z = loc + U (s * eps). Scaling column j of L by s_j keeps the
    correlations in proportion as the posterior narrows (with the lower entries of L taken as
    they are, training is slower: ``docs/results.md`` has the comparison). The KL to a
    diagonal Gaussian prior is in closed form (registered in :mod:`pyro_vae.distributions`).

    :param int latent_dim: size of the latent code.

    References:

    [1] `An Introduction to Variational Autoencoders`, Diederik P. Kingma, Max Welling
        (Foundations and Trends in Machine Learning, 2019), "Full-covariance Gaussian
        posterior".
    """

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.num_tril = latent_dim * (latent_dim + 1) // 2
        self.output_dim = latent_dim + self.num_tril
        rows, cols = torch.tril_indices(latent_dim, latent_dim)
        self.register_buffer("tril_rows", rows, persistent=False)
        self.register_buffer("tril_cols", cols, persistent=False)

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        loc, raw_tril = encoder_output.split([self.latent_dim, self.num_tril], dim=-1)
        size = (self.latent_dim, self.latent_dim)
        tril = raw_tril.new_zeros(raw_tril.shape[:-1] + size)
        tril[..., self.tril_rows, self.tril_cols] = raw_tril
        scale = positive_scale(tril.diagonal(dim1=-2, dim2=-1))
        unit_tril = tril.tril(-1) + torch.eye(self.latent_dim, dtype=tril.dtype, device=tril.device)
        return dist.MultivariateNormal(loc, scale_tril=unit_tril * scale.unsqueeze(-2))


class InverseAutoregressiveFlow(GuideFamily):
    """A diagonal Gaussian from the encoder followed by ``num_flows`` inverse autoregressive
    flows: q(z|x) is the law of f_K(...f_1(z0; h(x))...; h(x)) with z0 ~ N(loc(x),
    diag(scale(x)^2)).

    As in the IAF paper, the encoder outputs a context vector h(x) besides the Gaussian's
    parameters, and every flow takes it as an extra input, so the flows are amortized like the
    Gaussian. Each flow is the gated ("stable") IAF step of the paper,
    z <- sigma * z + (1 - sigma) * m, where sigma and m come from a MADE network
    (:class:`~pyro.nn.ConditionalAutoRegressiveNN`) fed with z and h(x), with a fresh random
    variable order per flow. The density of the guide's own samples is cheap (the transforms
    cache their inputs); the density of other points needs one MADE pass per latent
    dimension. There is no closed-form mean or KL: point estimates use a sample and mean-field
    ELBOs fall back to a Monte Carlo KL.

    :param int latent_dim: size of the latent code (at least 2).
    :param int num_flows: number of flows K.
    :param hidden_dims: hidden sizes of each flow's MADE network; defaults to
        ``(3 * latent_dim + 1,)`` as in Pyro.
    :param int context_dim: size of the context h(x); defaults to ``latent_dim``.

    References:

    [1] `Improved Variational Inference with Inverse Autoregressive Flow`, Diederik P. Kingma,
        Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya Sutskever, Max Welling (NeurIPS 2016).
    [2] `MADE: Masked Autoencoder for Distribution Estimation`, Mathieu Germain, Karol Gregor,
        Iain Murray, Hugo Larochelle (ICML 2015).
    """

    def __init__(
        self,
        latent_dim: int,
        num_flows: int = 2,
        hidden_dims: Sequence[int] | None = None,
        context_dim: int | None = None,
    ):
        super().__init__(latent_dim)
        if latent_dim < 2:
            raise ValueError(
                f"iaf guide needs latent_dim >= 2, got {latent_dim}; use the diagonal guide"
            )
        num_flows = check_int("iaf guide num_flows", num_flows)
        context_dim = latent_dim if context_dim is None else context_dim
        context_dim = check_int("iaf guide context_dim", context_dim)
        hidden_dims = [3 * latent_dim + 1] if hidden_dims is None else list(hidden_dims)
        if not hidden_dims or min(hidden_dims) < latent_dim:
            raise ValueError(
                f"iaf guide hidden_dims must be non-empty and each >= latent_dim={latent_dim}, "
                f"got {hidden_dims!r}"
            )
        self.context_dim = context_dim
        self.output_dim = 2 * latent_dim + context_dim
        self.flows = nn.ModuleList(
            ConditionalAutoRegressiveNN(latent_dim, context_dim, hidden_dims)
            for _ in range(num_flows)
        )

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        sizes = [self.latent_dim, self.latent_dim, self.context_dim]
        loc, raw_scale, context = encoder_output.split(sizes, dim=-1)
        base = dist.Normal(loc, positive_scale(raw_scale)).to_event(1)
        flows = [GatedAffineAutoregressive(conditioned_made(made, context)) for made in self.flows]
        return dist.TransformedDistribution(base, flows)


def get_guide(name: str, latent_dim: int, **kwargs) -> GuideFamily:
    """Build a registered variational family by name.

    :param str name: a key of :data:`GUIDES`.
    :param int latent_dim: size of the latent code.
    :param kwargs: options of that family, e.g. ``num_flows`` for ``"iaf"``.
    :returns: the guide family module.
    :raises ValueError: for an unknown name, or an option the family's constructor does not take.
    """
    cls = GUIDES[check_choice("guide", name, GUIDES)]
    check_options("guide", cls, kwargs)
    return cls(latent_dim, **kwargs)


GUIDES: dict[str, type[GuideFamily]] = {
    "diagonal": DiagonalNormal,
    "full_covariance": FullCovarianceNormal,
    "iaf": InverseAutoregressiveFlow,
}
