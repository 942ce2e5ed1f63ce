"""Pure-PyTorch UAN: the readable definition every fused backend is tested against.

Shapes follow SPEC: ``x`` is ``(N, C, *S)``; ``mu`` and ``log_sigma`` are
``(K, C)``; ``mix_logits`` is ``(K,)``; statistics are ``(K, C)``. Equation
numbers refer to the UAN paper (Faye et al.). Everything is differentiable with
ordinary autograd, which makes this module the float64 oracle of the test suite.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# Added to every division by a component's mass S_k (SPEC), so an empty
# component yields zero statistics instead of NaN.
MASS_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 computes in float64; every other floating dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_component(t: Tensor, ndim: int) -> Tensor:
    """View a ``(K, C)`` tensor so it broadcasts against ``(K, N, C, *S)``."""
    return t.reshape(t.shape[0], 1, t.shape[1], *([1] * (ndim - 2)))


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """View a ``(C,)`` tensor so it broadcasts against ``(N, C, *S)``."""
    return t.reshape(1, t.shape[0], *([1] * (ndim - 2)))


def _per_prior(t: Tensor, ndim: int) -> Tensor:
    """View a ``(K,)`` tensor so it broadcasts against ``(K, N, C, *S)``."""
    return t.reshape(t.shape[0], *([1] * ndim))


def _reduce_dims(ndim: int) -> Tuple[int, ...]:
    """Dims of ``(K, N, C, *S)`` that a per-(k, c) statistic sums over."""
    return (1,) + tuple(range(3, ndim + 1))


def responsibilities(x: Tensor, mu: Tensor, log_sigma: Tensor, mix_logits: Tensor) -> Tensor:
    """Soft assignments ``tau`` of shape ``(K, N, C, *S)`` (paper eq. 7).

    ``logit_k = log(lam_k) - log(sigma_k) - (x - mu_k)^2 / (2 sigma_k^2)``,
    ``tau = softmax_k(logit)``. The softmax sees the logits relative to each
    channel's widest component ``r`` (the largest ``log_sigma``), written as a
    quadratic in ``x - p`` (``p`` the channel's first element) whose
    coefficients are differences taken in float64, as the fused kernels do
    (``csrc/uan_math.h``): for ``x`` far from every component the large common
    parts of the logits cancel in the coefficients, where squaring
    ``(x - mu_k) / sigma_k`` in float32 would round them away. The softmax
    subtracts the max, so every element gets a valid distribution.
    """
    ndim = x.dim()
    channels = x.shape[1]
    # Any p gives the same function; a value of the channel keeps x - p small.
    pivot = x.detach().transpose(0, 1).reshape(channels, -1)[:, 0] if x.numel() else x.new_zeros(channels)
    mu64, log_sigma64 = mu.double(), log_sigma.double()
    curvature = 0.5 * torch.exp(-2.0 * log_sigma64)  # log tau = ... - curvature (x - p + q)^2, q = p - mu
    q = pivot.double() - mu64
    tilt = curvature * q
    value = (mix_logits.double()[:, None] - log_sigma64) - tilt * q  # the logit at x = p, up to log(sum exp)
    widest = torch.argmax(log_sigma64, dim=0, keepdim=True)
    alpha = (curvature.gather(0, widest) - curvature).to(x.dtype)
    beta = (2.0 * (tilt.gather(0, widest) - tilt)).to(x.dtype)
    gamma = (value - value.gather(0, widest)).to(x.dtype)
    xp = (x - _per_channel(pivot, ndim)).unsqueeze(0)
    relative_logits = (_per_component(alpha, ndim) * xp + _per_component(beta, ndim)) * xp + _per_component(gamma, ndim)
    return torch.softmax(relative_logits, dim=0)


def batch_statistics(x: Tensor, tau: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Responsibility-weighted mean, biased variance and mass per (k, c) (eq. 8).

    The variance is the two-pass form ``sum tau (x - m)^2 / S``, accurate when
    ``|mean| >> std``.
    """
    dims = _reduce_dims(x.dim())
    mass = tau.sum(dims)
    mean = (tau * x.unsqueeze(0)).sum(dims) / (mass + MASS_EPS)
    centered = x.unsqueeze(0) - _per_component(mean, x.dim())
    var = (tau * centered * centered).sum(dims) / (mass + MASS_EPS)
    return mean, var, mass


def statistics_sums(x: Tensor, tau: Tensor, pivot: Tensor) -> Tensor:
    """``(3, K, C)`` sums ``sum tau``, ``sum tau (x - pivot)``, ``sum tau (x - pivot)^2`` per (k, c).

    The statistics pass of the operators per pass (``uan::statistics``, with
    ``pivot = mu``): taken about a ``(K, C)`` pivot that every process knows,
    the sums of several batches add, and :func:`statistics_from_sums` turns
    their total into the statistics of the whole batch.
    """
    dims = _reduce_dims(x.dim())
    d = x.unsqueeze(0) - _per_component(pivot, x.dim())
    weighted = tau * d
    return torch.stack([tau.sum(dims), weighted.sum(dims), (weighted * d).sum(dims)])


def statistics_from_sums(sums: Tensor, pivot: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance and mass (eq. 8) from :func:`statistics_sums` about ``pivot``.

    ``mean = (pivot S + T1) / (S + 1e-12)`` is ``sum tau x / (S + 1e-12)``, and
    ``var = (T2 - 2 (mean - pivot) T1 + (mean - pivot)^2 S) / (S + 1e-12)`` is
    ``sum tau (x - mean)^2 / (S + 1e-12)``, exactly; clamped at 0 against rounding.
    """
    mass, first, second = sums.unbind(0)
    denominator = mass + MASS_EPS
    mean = (pivot * mass + first) / denominator
    offset = mean - pivot
    var = ((second - 2 * offset * first + offset * offset * mass) / denominator).clamp_min(0)
    return mean, var, mass


def mixture_transform(
    x: Tensor, tau: Tensor, mean: Tensor, var: Tensor, mix_logits: Tensor, eps: float
) -> Tensor:
    """``y = sum_k tau_k / sqrt(lam_k) * (x - mean_k) / sqrt(var_k + eps)`` (eq. 9)."""
    ndim = x.dim()
    inv_sqrt_lam = torch.exp(-0.5 * torch.log_softmax(mix_logits, dim=0))
    scale = _per_prior(inv_sqrt_lam, ndim) * torch.rsqrt(_per_component(var, ndim) + eps)
    return (tau * scale * (x.unsqueeze(0) - _per_component(mean, ndim))).sum(0)


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    shape = (1, y.shape[1]) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _as_input(out: Tensor, x: Tensor) -> Tensor:
    """``out`` in ``x``'s dtype and memory format (channels_last stays channels_last)."""
    out = out.to(x.dtype)
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return out.contiguous(memory_format=fmt)
    return out.contiguous()


def _upcast(x: Tensor, *tensors: Optional[Tensor]):
    dtype = compute_dtype(x.dtype)
    return [None if t is None else t.to(dtype) for t in (x, *tensors)]


def uan_train(
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward with batch statistics.

    Returns ``(out, mean, var, mass)``: ``out`` in ``x``'s dtype, the ``(K, C)``
    statistics in the compute dtype (float32, or float64 for float64 input).
    """
    xc, mu, log_sigma, mix_logits, weight, bias = _upcast(x, mu, log_sigma, mix_logits, weight, bias)
    tau = responsibilities(xc, mu, log_sigma, mix_logits)
    mean, var, mass = batch_statistics(xc, tau)
    y = mixture_transform(xc, tau, mean, var, mix_logits, eps)
    return _as_input(_affine(y, weight, bias), x), mean, var, mass


def uan_eval(
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Eval forward with given ``(K, C)`` statistics ``mean`` and ``var``."""
    xc, mu, log_sigma, mix_logits, mean, var, weight, bias = _upcast(
        x, mu, log_sigma, mix_logits, mean, var, weight, bias
    )
    tau = responsibilities(xc, mu, log_sigma, mix_logits)
    y = mixture_transform(xc, tau, mean, var, mix_logits, eps)
    return _as_input(_affine(y, weight, bias), x)
