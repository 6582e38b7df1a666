"""Distributions, transforms and KL rules that torch and Pyro lack, used by the parts.

The plug-in modules (:mod:`~pyro_vae.priors`, :mod:`~pyro_vae.likelihoods`,
:mod:`~pyro_vae.guides`) say *which* distribution a part returns; this module holds the ones
written here:

- :func:`positive_scale` and :func:`inverse_positive_scale`: the softplus map with a floor that
  every learned scale goes through;
- :class:`DiagonalNormalMixture` and :func:`mixture`: a mixture of diagonal Normals whose
  density costs two matrix products (the ``mixture`` and ``vamp`` priors);
- :class:`IndependentBernoulli`: ``Bernoulli(logits=l).to_event(1)`` with a log-density that
  makes fewer passes over the logits (the ``bernoulli`` likelihood);
- :class:`DiscretizedLogisticDistribution` and its support :class:`QuantizedUnitInterval`
  (the ``discretized_logistic`` likelihood);
- the closed-form KL(N(m, L L^T) || N(mu, diag(s^2))), registered with
  :func:`torch.distributions.kl_divergence` on import (the ``full_covariance`` guide);
- :class:`GatedAffineAutoregressive` and :func:`conditioned_made`: the flow step of the ``iaf``
  guide.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import ConditionalAutoRegressiveNN
from torch.distributions import Independent, MultivariateNormal, Normal, constraints, register_kl
from torch.distributions.transforms import _InverseTransform
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

from pyro_vae.checks import check_int

#: Added to softplus scales so that q(z|x) never collapses to a point, whatever the encoder says.
MIN_SCALE = 1e-4


def positive_scale(raw: torch.Tensor, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """Map unconstrained values to scales that are strictly positive and numerically safe:
    ``softplus(raw) + min_scale``.

    :param torch.Tensor raw: unconstrained values.
    :param float min_scale: the floor of the scale.
    """
    return F.softplus(raw) + min_scale


def inverse_positive_scale(scale: float, min_scale: float = MIN_SCALE) -> float:
    """The unconstrained value that :func:`positive_scale` maps to ``scale``.

    :param float scale: a scale greater than ``min_scale``.
    :param float min_scale: the floor of the scale.

    >>> round(inverse_positive_scale(1.0 + MIN_SCALE), 4)
    0.5413
    """
    if not scale > min_scale:
        raise ValueError(f"scale must be greater than min_scale={min_scale}, got {scale!r}")
    return math.log(math.expm1(scale - min_scale))


class DiagonalNormalMixture(dist.MixtureSameFamily):
    """A mixture of K diagonal Normals N(loc_k, diag(scale_k^2)) whose :meth:`log_prob` costs
    two matrix products.

    :class:`~torch.distributions.MixtureSameFamily` evaluates every value against every component
    in an ``(n, K, D)`` tensor. Expanding the square instead,
    ``sum_d (z_d - loc_kd)^2 / scale_kd^2 = (z*z) @ w.T - 2 z @ (loc*w).T + sum_d loc_kd^2 w_kd``
    with ``w = scale^-2``, costs two ``(n, D) x (D, K)`` products and no ``(n, K, D)`` tensor,
    which matters for the many components of a VampPrior (``benchmarks/mixture_log_prob.py``
    measures it). The expansion subtracts large numbers, so it is computed in float64 (a few
    small products, cheap on GPUs too); everything else keeps the dtype of the inputs. For
    float32 inputs it is as accurate as the generic class. For float64 inputs it loses digits
    the generic class keeps, where ``|z| / scale`` is huge.

    :param torch.Tensor logits: unnormalized mixture weights, shape ``(K,)``.
    :param torch.Tensor loc: component means, shape ``(K, D)``.
    :param torch.Tensor scale: component standard deviations, shape ``(K, D)``.

    >>> mix = DiagonalNormalMixture(torch.zeros(3), torch.randn(3, 2), torch.ones(3, 2))
    >>> mix.log_prob(torch.randn(5, 2)).shape
    torch.Size([5])
    """

    def __init__(
        self,
        logits: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor,
        validate_args: bool | None = None,
    ):
        if loc.dim() != 2 or scale.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise ValueError(
                "DiagonalNormalMixture needs logits of shape (K,) and loc and scale of shape "
                f"(K, D), got {tuple(logits.shape)}, {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        super().__init__(
            dist.Categorical(logits=logits),
            dist.Normal(loc, scale).to_event(1),
            validate_args=validate_args,
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalNormalMixture, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        # The parameters as built, shapes (K,) and (K, D): an expanded mixture repeats them.
        first = (0,) * len(self.batch_shape)
        logits = self.mixture_distribution.logits[first]
        normal = self.component_distribution.base_dist
        loc, scale = normal.loc[first], normal.scale[first]
        dtype = torch.promote_types(value.dtype, loc.dtype)
        z = value.reshape(-1, loc.shape[-1]).double()
        w = scale.double().pow(-2)
        loc64 = loc.double()
        quad = torch.addmm((loc64 * loc64 * w).sum(-1), z * z, w.T)
        quad = torch.addmm(quad, z, (loc64 * w).T, alpha=-2).to(dtype).clamp(min=0)
        log_norm = scale.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        log_weights = torch.log_softmax(logits, dim=-1)
        log_prob = torch.logsumexp(log_weights - log_norm - 0.5 * quad, dim=-1)
        log_prob = log_prob.reshape(value.shape[:-1])
        shape = torch.broadcast_shapes(log_prob.shape, self.batch_shape)
        return log_prob if shape == log_prob.shape else log_prob.expand(shape).contiguous()


def mixture(logits: torch.Tensor, components: dist.TorchDistribution) -> dist.MixtureSameFamily:
    """The mixture of ``components`` (batch shape ``(K,)``) with weights ``softmax(logits)``:
    a :class:`DiagonalNormalMixture` when the components are diagonal Normals, else a
    :class:`~pyro.distributions.MixtureSameFamily`.
    """
    normal = getattr(components, "base_dist", None)
    if (
        isinstance(components, torch.distributions.Independent)
        and components.reinterpreted_batch_ndims == 1
        and type(normal) in (dist.Normal, torch.distributions.Normal)
        and normal.loc.dim() == 2
    ):
        return DiagonalNormalMixture(logits, normal.loc, normal.scale)
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diagonal_normal(q: MultivariateNormal, p: Independent) -> torch.Tensor:
    # KL(N(m, L L^T) || N(mu, diag(s^2))); Pyro registers only the opposite direction.
    if not (isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    loc, scale = p.base_dist.loc, p.base_dist.scale
    trace = (q.scale_tril / scale.unsqueeze(-1)).pow(2).sum((-2, -1))
    mahalanobis = ((q.loc - loc) / scale).pow(2).sum(-1)
    log_det_q = q.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_det_p = scale.log().sum(-1)
    return 0.5 * (trace + mahalanobis - q.event_shape[0]) + log_det_p - log_det_q


class IndependentBernoulli(dist.Independent):
    """Independent Bernoulli variables along the last dimension of ``logits``: the distribution
    ``Bernoulli(logits=logits).to_event(1)``, with a log-density that avoids its extra passes.

    ``Bernoulli.log_prob`` negates a full ``(..., D)`` tensor of cross-entropies before
    ``to_event`` sums it; here the sum comes first. When the data broadcast over leading draws
    of the logits and no gradient is needed (an importance-sampling estimate of log p(x)), the
    log-density is computed as ``sum_d x_d l_d - softplus(l_d)``, whose first sum is a
    matrix-vector product instead of a pass over an expanded copy of the data. Both equal the
    sum of Bernoulli log-probabilities up to rounding. Sampling, the mean and ``base_dist``
    are those of the Bernoulli.

    :param torch.Tensor logits: shape ``batch_shape + (D,)``.
    """

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None):
        base = dist.Bernoulli(logits=logits, validate_args=validate_args)
        super().__init__(base, 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(IndependentBernoulli, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.base_dist.logits
        if value.numel() < logits.numel() and not (logits.requires_grad or value.requires_grad):
            return torch.einsum("...d,...d->...", logits, value) - F.softplus(logits).sum(-1)
        logits, value = torch.broadcast_tensors(logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class QuantizedUnitInterval(constraints.Constraint):
    """The values k / (num_levels - 1), k = 0, ..., num_levels - 1: pixel intensities with
    ``num_levels`` levels (256 for 8-bit images) divided by their maximum.

    :param int num_levels: number of levels, at least 2.
    """

    is_discrete = True
    event_dim = 0

    def __init__(self, num_levels: int = 256):
        self.num_levels = check_int("num_levels", num_levels, minimum=2)
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        level = value * (self.num_levels - 1)
        # Tolerance in units of one level: k / 255 in float32 is off by ~1e-5 levels at most.
        on_grid = (level - level.round()).abs() < 1e-3
        return (value >= 0) & (value <= 1) & on_grid

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_levels={self.num_levels})"


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d < 0, accurate for d near 0 and for very negative d."""
    d = d.clamp(max=-torch.finfo(d.dtype).tiny)
    return torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


class DiscretizedLogisticDistribution(dist.TorchDistribution):
    """A logistic distribution with location ``loc`` and scale ``scale`` whose mass is gathered
    into ``num_levels`` equally spaced bins centred on k / (num_levels - 1) in [0, 1]; the first
    and last bins extend to -inf and +inf.

    Bin masses are differences of logistic CDFs, computed as log-sigmoid differences taken in
    whichever tail keeps both sigmoids small, so that masses far below float precision
    (e.g. 1e-40) still have an accurate log. When a bin is narrow compared to the scale
    (width / scale < :attr:`narrow_bin`), where that difference would cancel, the mass is the
    density at the bin centre times the width (relative error below 1e-5).

    :param torch.Tensor loc: location, on the [0, 1] scale of the data.
    :param torch.Tensor scale: scale (positive).
    :param int num_levels: number of bins (256 for 8-bit data), at least 2.

    References:

    [1] `PixelCNN++: Improving the PixelCNN with Discretized Logistic Mixture Likelihood and
        Other Modifications`, Tim Salimans, Andrej Karpathy, Xi Chen, Diederik P. Kingma
        (ICLR 2017).
    [2] `Improved Variational Inference with Inverse Autoregressive Flow`, Diederik P. Kingma,
        Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya Sutskever, Max Welling (NeurIPS 2016).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = False
    #: Bins narrower than this many scales use the midpoint rule (see the class docstring).
    narrow_bin = 1e-2

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        num_levels: int = 256,
        validate_args: bool | None = None,
    ):
        self._support = QuantizedUnitInterval(num_levels)
        self.num_levels = self._support.num_levels
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> constraints.Constraint:
        return self._support

    @property
    def bin_width(self) -> float:
        return 1.0 / (self.num_levels - 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.num_levels = self.num_levels
        new._support = self._support
        super(DiscretizedLogisticDistribution, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        half = 0.5 * self.bin_width
        centred = (value - self.loc) / self.scale
        upper = centred + half / self.scale
        lower = centred - half / self.scale
        # sigmoid(upper) - sigmoid(lower) == sigmoid(-lower) - sigmoid(-upper): use the form
        # whose arguments are mostly negative, where log-sigmoid keeps full relative precision.
        flip = centred > 0
        a = torch.where(flip, -lower, upper)
        b = torch.where(flip, -upper, lower)
        log_sig_a = F.logsigmoid(a)
        interior = log_sig_a + _log1mexp(F.logsigmoid(b) - log_sig_a)
        log_density = F.logsigmoid(centred) + F.logsigmoid(-centred) - self.scale.log()
        midpoint = log_density + math.log(self.bin_width)
        narrow = self.bin_width / self.scale < self.narrow_bin
        interior = torch.where(narrow | ~torch.isfinite(interior), midpoint, interior)
        first = value < half
        last = value > 1 - half
        log_p = torch.where(first, F.logsigmoid(upper), interior)
        return torch.where(last, F.logsigmoid(-lower), log_p)

    def sample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
            y = self.loc + self.scale * (u.log() - (-u).log1p())
            levels = self.num_levels - 1
            return (y.clamp(0, 1) * levels).round() / levels

    @property
    def mean(self) -> torch.Tensor:
        # E[x] = width * sum_k P(x >= k * width), k = 1 .. num_levels - 1; a loop over levels
        # keeps the memory at one batch of pixels.
        half = 0.5 * self.bin_width
        total = torch.zeros_like(self.loc)
        for k in range(1, self.num_levels):
            total = total + torch.sigmoid((self.loc - (k * self.bin_width - half)) / self.scale)
        return total * self.bin_width


class GatedAffineAutoregressive(T.AffineAutoregressive):
    """Pyro's gated ("stable") IAF step, with an inverse that keeps the dtype of its input and
    lets the context broadcast the batch shape.

    Pyro 1.9's inverse starts from float32 zeros whatever the dtype, which breaks float64 models
    that evaluate the flow density at points it did not sample (the VampPrior does), and
    assumes that the output has the batch shape of the input. This class is also free of
    reference cycles, so a transform is freed as soon as its distribution is.

    :param autoregressive_nn: a MADE returning ``(mean, logit_scale)``, e.g. from
        :func:`conditioned_made`.
    """

    def __init__(self, autoregressive_nn: Callable):
        super().__init__(autoregressive_nn, stable=True)
        # Pyro stores the stable methods as bound methods on the instance: a reference cycle
        # that would keep each guide call's transforms and their cached tensors alive until
        # the garbage collector runs, and fragment memory in long evaluations.
        del self._call, self._inverse

    @property
    def inv(self) -> T.Transform:
        # torch 2.14 holds the inverse strongly, and the inverse holds this transform: another
        # cycle. Hold it weakly, as earlier torch releases did.
        inv = self._inv() if isinstance(self._inv, weakref.ref) else None
        if inv is None:
            inv = _InverseTransform(self)
            self._inv = weakref.ref(inv)
        return inv

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._call_stable(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._inverse_stable(y)

    def _inverse_stable(self, y: torch.Tensor) -> torch.Tensor:
        x = [y.new_zeros(y.shape[:-1])] * y.size(-1)
        for idx in self.arn.permutation:
            mean, logit_scale = self.arn(torch.stack(torch.broadcast_tensors(*x), dim=-1))
            inverse_scale = 1 + torch.exp(-logit_scale[..., idx] - self.sigmoid_bias)
            x[idx] = inverse_scale * y[..., idx] + (1 - inverse_scale) * mean[..., idx]
        self._cached_log_scale = self.logsigmoid(logit_scale + self.sigmoid_bias)
        return torch.stack(torch.broadcast_tensors(*x), dim=-1)


def conditioned_made(made: ConditionalAutoRegressiveNN, context: torch.Tensor) -> Callable:
    """The MADE with its context bound, as Pyro's ``ConditionalAffineAutoregressive.condition``
    makes it, but broadcasting z and the context against each other both ways (Pyro's expands
    only the context), so that a flow's density can be evaluated at points of another batch
    shape: a VampPrior evaluates its K components at z of shape ``(..., 1, latent_dim)``.

    :param made: the conditional MADE of one flow step.
    :param torch.Tensor context: the context vectors, shape ``(..., context_dim)``.
    :returns: a function of z returning ``(mean, logit_scale)``, with the MADE's permutation.
    """

    def made_at_context(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_shape = torch.broadcast_shapes(z.shape[:-1], context.shape[:-1])
        z = z.expand(batch_shape + z.shape[-1:])
        return made(z, context.expand(batch_shape + context.shape[-1:]))

    made_at_context.permutation = made.permutation
    return made_at_context
