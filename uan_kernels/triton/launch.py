"""Host launchers of the Triton kernels: the real implementations of the ``uan::triton_*`` operators.

:func:`launch_train_forward`, :func:`launch_eval_forward` and
:func:`launch_backward` take and return what the operators of :mod:`.ops` do.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backends import MAX_FUSED_COMPONENTS
from ..reference import compute_dtype
from . import geometry, interpreter, kernels
from .geometry import cdiv

# Channels per program of the statistics merge.
_MERGE_BLOCK_C = 128


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bf16_by_bits(out: Tensor) -> bool:
    return interpreter.INTERPRETED and out.dtype == torch.bfloat16


def _as_ncl(t: Tensor) -> Optional[Tensor]:
    """``t`` viewed as ``(N, C, L)`` without a copy, or None if its strides do not allow it.

    Contiguous and channels_last(_3d) tensors always allow it.
    """
    length = 1
    for size in t.shape[2:]:
        length *= size
    try:
        return t.view(t.shape[0], t.shape[1], length)
    except RuntimeError:
        return None


def _input_ncl(t: Tensor) -> Tensor:
    """``(N, C, L)`` view of an input; only layouts that cannot be viewed so (rare dense permutations) are copied."""
    view = _as_ncl(t)
    return view if view is not None else _as_ncl(t.contiguous())


def _output_ncl(out: Tensor) -> Tuple[Tensor, bool]:
    """Where a kernel writes ``out``: its ``(N, C, L)`` view, or a scratch buffer (True) to copy back."""
    view = _as_ncl(out)
    if view is not None:
        return view, False
    return _as_ncl(torch.empty(out.shape, dtype=out.dtype, device=out.device)), True


def _check_launch(x: Tensor, mu: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"UAN expects input of shape (N, C, *S), got shape {tuple(x.shape)}")
    if mu.dim() != 2 or mu.shape[1] != x.shape[1]:
        raise ValueError(f"mu must have shape (K, C) with C = {x.shape[1]}, got {tuple(mu.shape)}")
    if not 1 <= mu.shape[0] <= MAX_FUSED_COMPONENTS:
        raise ValueError(
            f"the Triton kernels support 1 to {MAX_FUSED_COMPONENTS} components, got {mu.shape[0]}"
        )
    if x.device.type == "cpu" and not interpreter.INTERPRETED:
        raise RuntimeError(
            "the Triton backend runs CPU tensors only under the Triton interpreter: "
            "set TRITON_INTERPRET=1 before importing uan_kernels"
        )


def _params(*tensors: Optional[Tensor]):
    """Contiguous ``(K, C)`` / ``(K,)`` / ``(C,)`` operands (no-ops for the usual parameters)."""
    return [None if t is None else t.contiguous() for t in tensors]


def _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, tiles):
    K, C = mu.shape
    N, _, L = x3.shape
    kernels._normalize_kernel[tiles.grid](
        x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias,
        N, C, L, *x3.stride(), *out3.stride(), *tiles.kernel_args(),
        K=K, K_PAD=triton.next_power_of_2(K), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        EPS=eps, ACC=_triton_dtype(compute_dtype(x3.dtype)), BF16_BY_BITS=_bf16_by_bits(out3),
        **tiles.kernel_meta(),
    )


def launch_train_forward(x, mu, log_sigma, mix_logits, weight, bias, eps):
    _check_launch(x, mu)
    acc = compute_dtype(x.dtype)
    K, C = mu.shape
    mu, log_sigma, mix_logits, weight, bias = _params(mu, log_sigma, mix_logits, weight, bias)
    out = torch.empty_like(x)
    if x.numel() == 0:
        # No element: zero mass, and SPEC's statistics 0 / (0 + 1e-12) = 0.
        return out, *(torch.zeros(mu.shape, dtype=acc, device=mu.device) for _ in range(3))
    mean, var, mass = (torch.empty(mu.shape, dtype=acc, device=mu.device) for _ in range(3))
    x3 = _input_ncl(x)
    out3, scratch = _output_ncl(out)
    tiles = geometry.tile_geometry(x3, K)
    N, _, L = x3.shape
    k_pad = triton.next_power_of_2(K)
    partials = torch.empty((tiles.programs, 3, K, C), dtype=acc, device=x.device)
    kernels._stats_partials_kernel[tiles.grid](
        x3, mu, log_sigma, mix_logits, partials,
        N, C, L, *x3.stride(), *tiles.kernel_args(),
        K=K, K_PAD=k_pad, ACC=_triton_dtype(acc), **tiles.kernel_meta(),
    )
    merge_block = min(_MERGE_BLOCK_C, triton.next_power_of_2(C))
    kernels._merge_stats_kernel[(cdiv(C, merge_block),)](
        partials, x3, mean, var, mass, tiles.programs, C, x3.stride(1),
        K=K, K_PAD=k_pad, BLOCK_C=merge_block, ACC=_triton_dtype(acc),
    )
    _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, tiles)
    if scratch:
        out.copy_(out3.view(out.shape))
    return out, mean, var, mass


def launch_eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps):
    _check_launch(x, mu)
    mu, log_sigma, mix_logits, mean, var, weight, bias = _params(mu, log_sigma, mix_logits, mean, var, weight, bias)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x3 = _input_ncl(x)
    out3, scratch = _output_ncl(out)
    _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, geometry.tile_geometry(x3, mu.shape[0]))
    if scratch:
        out.copy_(out3.view(out.shape))
    return out


def launch_backward(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad):
    _check_launch(x, mu)
    training = mass is not None
    acc = compute_dtype(x.dtype)
    K, C = mu.shape
    mu, log_sigma, mix_logits, weight, mean, var, mass = _params(mu, log_sigma, mix_logits, weight, mean, var, mass)
    grad_input = torch.empty_like(x)
    x3 = _input_ncl(x)
    dout3 = _input_ncl(grad_out)
    dx3, scratch = _output_ncl(grad_input)
    N, _, L = x3.shape
    tiles = geometry.tile_geometry(x3, K)
    programs = tiles.programs if x.numel() else 0
    launch = dict(K=K, K_PAD=triton.next_power_of_2(K), ACC=_triton_dtype(acc), **tiles.kernel_meta())
    shape_args = (N, C, L, *x3.stride(), *dout3.stride())

    # O(K*C) terms of DESIGN.md in the accumulation dtype: lam, and a_k r_k.
    log_lam = torch.log_softmax(mix_logits.to(acc), dim=0)
    rstd = torch.rsqrt(var.to(acc) + eps)
    component_scale = torch.exp(-0.5 * log_lam)[:, None] * rstd
    gamma = weight.to(acc)[None, :] if weight is not None else 1.0

    # Per-program partial sums; every program writes its rows in full.
    stat_partials = torch.empty((programs, 2, K, C), dtype=acc, device=x.device)
    dbeta_partials = torch.empty((programs, C), dtype=acc, device=x.device)
    mix_partials = torch.empty((programs, 3, K, C), dtype=acc, device=x.device) if mixture_grad else None

    def statistic_gradients():
        """``sum dout tau``, ``sum dout tau d`` and ``Gm = dL/dmean``, ``Gv = dL/dvar``."""
        dout_tau, dout_tau_d = stat_partials.sum(0)
        dmean = -component_scale * gamma * dout_tau
        dvar = -0.5 * component_scale * rstd * rstd * gamma * dout_tau_d
        return dout_tau_d, dmean, dvar

    def launch_elementwise(dmean, dvar):
        if programs:
            kernels._backward_elementwise_kernel[tiles.grid](
                x3, dout3, dx3, mu, log_sigma, mix_logits, mean, var, weight,
                mass, dmean, dvar, mix_partials, stat_partials, dbeta_partials,
                *shape_args, *dx3.stride(), *tiles.kernel_args(),
                HAS_WEIGHT=weight is not None, TRAINING=training, MIXTURE_GRAD=mixture_grad, EPS=eps,
                BF16_BY_BITS=_bf16_by_bits(dx3), **launch,
            )

    if training:
        if programs:
            kernels._backward_reduce_kernel[tiles.grid](
                x3, dout3, mu, log_sigma, mix_logits, mean, stat_partials, dbeta_partials,
                *shape_args, *tiles.kernel_args(), **launch,
            )
        dout_tau_d, dmean, dvar = statistic_gradients()
        launch_elementwise(dmean, dvar)
    else:
        # Eval: the statistics are constants, so dx needs no reduction first.
        launch_elementwise(None, None)
        dout_tau_d, dmean, dvar = statistic_gradients()
    if scratch:
        grad_input.copy_(dx3.view(grad_input.shape))

    grad_weight = (component_scale * dout_tau_d).sum(0)
    grad_bias = dbeta_partials.sum(0)
    if mixture_grad:
        # One sum per quantity: outputs of an operator must not be views of one tensor.
        grad_mu, grad_log_sigma, sum_u = (mix_partials[:, q].sum(0) for q in range(3))
        # d log(lam_k): through the logits (sum U) and through a_k = lam_k**-0.5.
        grad_log_lam = (sum_u - 0.5 * component_scale * gamma * dout_tau_d).sum(1)
        grad_mix_logits = grad_log_lam - log_lam.exp() * grad_log_lam.sum()
    else:
        grad_mu = torch.zeros_like(mu)
        grad_log_sigma = torch.zeros_like(log_sigma)
        grad_mix_logits = torch.zeros_like(mix_logits)
    param_dtype = mu.dtype
    return (
        grad_input,
        grad_mu.to(param_dtype),
        grad_log_sigma.to(param_dtype),
        grad_mix_logits.to(param_dtype),
        grad_weight.to(param_dtype),
        grad_bias.to(param_dtype),
        dmean.to(mean.dtype),
        dvar.to(var.dtype),
    )

