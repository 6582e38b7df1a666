"""Likelihoods p(x|z) that turn a decoder's output into a distribution over the data.

A likelihood is an :class:`torch.nn.Module` with an ``output_dim`` (how many numbers the decoder
must produce per datapoint) and a :meth:`Likelihood.forward` mapping the decoder output of shape
``(..., output_dim)`` to a distribution with ``event_shape == (data_dim,)``. It is the only place
that knows its distribution: it also declares the data it accepts (:attr:`Likelihood.support`)
and gives the mean image used for reconstructions and samples.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from pyro_vae.checks import check_choice, check_positive
from pyro_vae.distributions import (
    DiscretizedLogisticDistribution,
    IndependentBernoulli,
    QuantizedUnitInterval,
    inverse_positive_scale,
    positive_scale,
)
from pyro_vae.parts import Part, check_options


class Likelihood(Part):
    """Base class of likelihoods.

    :param int data_dim: number of features per datapoint.
    """

    #: The set of data values the likelihood gives density to.
    support: constraints.Constraint = constraints.real
    #: Human-readable form of :attr:`support` for error messages.
    support_text: str = "real numbers"
    #: What to do when the data lie outside :attr:`support`.
    support_hint: str = ""

    def __init__(self, data_dim: int):
        super().__init__()
        self.data_dim = data_dim
        self.output_dim = data_dim

    @property
    def name(self) -> str:
        """The key of this likelihood in :data:`LIKELIHOODS` (the class name if unregistered)."""
        cls = type(self)
        return next((k for k, v in LIKELIHOODS.items() if v is cls), cls.__name__)

    def forward(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """The mean E[x|z], for plotting reconstructions and samples."""
        return self(decoder_output).mean

    def check_data(self, x: torch.Tensor) -> None:
        """Raise :class:`ValueError` if ``x`` is not finite or lies outside :attr:`support`.

        The message names the likelihood, the range of ``x`` and one offending value.

        :param torch.Tensor x: data of shape ``(N, data_dim)``.
        """
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).sum().item()
            raise ValueError(
                f"likelihood {self.name!r} got data with {bad} NaN or infinite values; "
                "clean them first"
            )
        outside = ~self.support.check(x)
        if outside.any():
            found = f"[{x.min().item():.4g}, {x.max().item():.4g}]"
            example = x[outside].flatten()[0].item()
            hint = f"; {self.support_hint}" if self.support_hint else ""
            raise ValueError(
                f"likelihood {self.name!r} needs data in {self.support_text}, but the data lie "
                f"in {found} (e.g. {example:.6g}){hint}"
            )


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels with logits from the decoder, for binary data.

    References:

    [1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014).
    """

    support = constraints.boolean
    support_text = "{0, 1}"
    support_hint = (
        "binarize the data (set config.binarize to 'dynamic' or 'static') or use "
        "continuous_bernoulli"
    )

    def forward(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        return IndependentBernoulli(decoder_output)

    def mean(self, decoder_output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(decoder_output)


class ContinuousBernoulli(Likelihood):
    """Independent continuous Bernoulli pixels, for grey levels in [0, 1].

    The Bernoulli "likelihood" often applied to grey-level data is not a density on [0, 1];
    the continuous Bernoulli adds the missing normalizing constant C(lambda), so the ELBO is a
    true bound on log p(x). The decoder gives the logits of lambda. :meth:`mean` is the mean of
    the continuous Bernoulli, not lambda = sigmoid(logits): the paper shows that lambda is a
    biased, washed-out reconstruction.

    References:

    [1] `The continuous Bernoulli: fixing a pervasive error in variational autoencoders`,
        Gabriel Loaiza-Ganem, John P. Cunningham (NeurIPS 2019).
    """

    support = constraints.unit_interval
    support_text = "[0, 1]"
    support_hint = "rescale the data to [0, 1], e.g. divide 8-bit pixel values by 255"

    def forward(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=decoder_output).to_event(1)


class FixedScaleLikelihood(Likelihood):
    """Independent pixels of a location-scale :attr:`distribution` located at the decoder's
    output, with one fixed scale; a subclass names the distribution.

    :param int data_dim: number of features per datapoint.
    :param float scale: the fixed scale of every pixel.
    """

    #: The location-scale family, called as ``distribution(loc, scale)``.
    distribution: type[dist.TorchDistribution]

    def __init__(self, data_dim: int, scale: float = 0.1):
        super().__init__(data_dim)
        self.scale = check_positive(f"{self.name} likelihood scale", scale)

    def forward(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        return self.distribution(decoder_output, self.scale).to_event(1)

    def mean(self, decoder_output: torch.Tensor) -> torch.Tensor:
        return decoder_output


class Normal(FixedScaleLikelihood):
    """Independent Gaussian pixels with the decoder's mean and a fixed scale.

    :param int data_dim: number of features per datapoint.
    :param float scale: the fixed standard deviation of every pixel.
    """

    distribution = dist.Normal


class LearnedNormal(Likelihood):
    """Independent Gaussian pixels with the decoder's mean and a learned scale that does not
    depend on z: one scale per pixel (``per_pixel=True``) or one for all pixels.

    The scale is ``softplus(raw_scale) + min_scale``
    (:func:`~pyro_vae.distributions.positive_scale`). The floor matters: on data with pixels
    that are constant across the data set (the black border of MNIST) the maximum-likelihood
    scale of those pixels is 0 and the density, hence the ELBO, would grow without bound. The
    default floor is about the standard deviation of the rounding error of 8-bit images
    (1 / (255 * sqrt(12))).

    :param int data_dim: number of features per datapoint.
    :param bool per_pixel: learn one scale per pixel, else a single global scale.
    :param float init_scale: the scale at initialization.
    :param float min_scale: the lower bound of the scale.

    References:

    [1] `Diagnosing and Enhancing VAE Models`, Bin Dai, David Wipf (ICLR 2019), on learning
        the decoder variance and its collapse towards zero.
    """

    def __init__(
        self,
        data_dim: int,
        per_pixel: bool = True,
        init_scale: float = 0.1,
        min_scale: float = 1e-3,
    ):
        super().__init__(data_dim)
        min_scale = check_positive("learned_normal likelihood min_scale", min_scale)
        init_scale = check_positive("learned_normal likelihood init_scale", init_scale)
        if not init_scale > min_scale:
            raise ValueError(
                f"learned_normal likelihood init_scale must exceed min_scale={min_scale}, "
                f"got {init_scale!r}"
            )
        self.per_pixel = bool(per_pixel)
        self.min_scale = min_scale
        raw = inverse_positive_scale(init_scale, min_scale)
        self.raw_scale = nn.Parameter(torch.full((data_dim if per_pixel else 1,), raw))

    @property
    def scale(self) -> torch.Tensor:
        """The current scale, of shape ``(data_dim,)`` or ``(1,)``."""
        return positive_scale(self.raw_scale, self.min_scale)

    def forward(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(decoder_output, self.scale).to_event(1)


class Laplace(FixedScaleLikelihood):
    """Independent Laplace pixels with the decoder's location and a fixed scale: the
    probabilistic form of an L1 reconstruction loss, less sensitive to outlying pixels than
    the Gaussian.

    :param int data_dim: number of features per datapoint.
    :param float scale: the fixed scale b of every pixel (the standard deviation is b * sqrt(2)).
    """

    distribution = dist.Laplace


class DiscretizedLogistic(Likelihood):
    """Independent discretized logistic pixels for 8-bit images (or any ``num_levels``).

    The decoder gives, per pixel, the location and the log-scale of a logistic distribution on
    the [0, 1] scale of the data, so ``output_dim = 2 * data_dim``; the mass of each of the
    ``num_levels`` bins of width 1 / (num_levels - 1) is the logistic mass over the bin, and the
    edge bins extend to -inf and +inf, so that saturated pixels get finite, well-behaved mass.
    Unlike Gaussian likelihoods on dequantized data, this is a proper probability mass function
    on the pixel levels: -log p(x) / (data_dim * log 2) is directly in bits per dimension.
    The log-scale is softly bounded below by -7 (as in PixelCNN++), a scale of about 1/4 bin.
    :meth:`mean` is the exact mean of the discretized distribution.

    :param int data_dim: number of features per datapoint.
    :param int num_levels: number of pixel levels (256 for 8-bit images).

    References: PixelCNN++ (Salimans et al., ICLR 2017) and IAF (Kingma et al., NeurIPS 2016),
    cited in full at :class:`~pyro_vae.distributions.DiscretizedLogisticDistribution`.
    """

    #: Soft lower bound of the decoder's log-scale.
    min_log_scale = -7.0

    def __init__(self, data_dim: int, num_levels: int = 256):
        super().__init__(data_dim)
        self.support = QuantizedUnitInterval(num_levels)
        self.num_levels = self.support.num_levels
        self.output_dim = 2 * data_dim
        levels = self.num_levels - 1
        self.support_text = f"multiples of 1/{levels} in [0, 1]"
        self.support_hint = (
            f"pass integer pixel levels divided by {levels}, with no dequantization noise or "
            "binarization; set num_levels to the number of grey levels of the data (17 for "
            "digits: config.likelihood_kwargs={'num_levels': 17}) or use continuous_bernoulli"
        )

    def forward(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        loc, raw_log_scale = decoder_output.split(self.data_dim, dim=-1)
        # A soft floor keeps gradients alive, unlike a clamp.
        log_scale = self.min_log_scale + F.softplus(raw_log_scale - self.min_log_scale)
        return DiscretizedLogisticDistribution(loc, log_scale.exp(), self.num_levels).to_event(1)


def get_likelihood(name: str, data_dim: int, **kwargs) -> Likelihood:
    """Build a registered likelihood by name.

    :param str name: a key of :data:`LIKELIHOODS`.
    :param int data_dim: number of features per datapoint.
    :param kwargs: options of that likelihood, e.g. ``scale`` for ``"normal"``.
    :returns: the likelihood module.
    :raises ValueError: for an unknown name, or an option the likelihood's constructor does not
        take.
    """
    cls = LIKELIHOODS[check_choice("likelihood", name, LIKELIHOODS)]
    check_options("likelihood", cls, kwargs)
    return cls(data_dim, **kwargs)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": Bernoulli,
    "continuous_bernoulli": ContinuousBernoulli,
    "discretized_logistic": DiscretizedLogistic,
    "laplace": Laplace,
    "learned_normal": LearnedNormal,
    "normal": Normal,
}
