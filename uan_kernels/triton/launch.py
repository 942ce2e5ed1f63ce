"""Host launchers of the Triton kernels: the real implementations of the ``uan::triton_*`` operators.

:func:`launch_train_forward`, :func:`launch_eval_forward` and
:func:`launch_backward` take and return what the operators of :mod:`.ops` do.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backends import MAX_FUSED_COMPONENTS
from ..reference import compute_dtype
from . import geometry, interpreter, kernels
from .geometry import cdiv

# Channels per program of the finalize kernels (O(K*C) work each).
_FINALIZE_BLOCK_C = 128


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


def _on_device(x: Tensor):
    """Launch on ``x``'s GPU, whichever is current (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _finalize_grid(C: int) -> Tuple[Tuple[int], int]:
    block_c = min(_FINALIZE_BLOCK_C, triton.next_power_of_2(C))
    return (cdiv(C, block_c),), block_c


def _params(*tensors: Optional[Tensor]):
    """Contiguous ``(K, C)`` / ``(K,)`` / ``(C,)`` operands (no-ops for the usual parameters)."""
    return [None if t is None else t.contiguous() for t in tensors]


def _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, tiles):
    K, C = mu.shape
    N, _, L = x3.shape
    kernels._normalize_kernel[tiles.grid](
        x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias,
        N, C, L, *x3.stride(), *out3.stride(), *tiles.kernel_args(),
        K=K, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, MIXTURE_STATISTICS=mean is None,
        EPS=eps, ACC=_triton_dtype(compute_dtype(x3.dtype)), BF16_BY_BITS=_bf16_by_bits(out3),
        **tiles.kernel_meta(),
    )


def launch_train_forward(x, mu, log_sigma, mix_logits, weight, bias, eps):
    """Statistics pass, its finalize kernel, normalise pass: three launches."""
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
    partials = torch.empty((tiles.programs, 3, K, C), dtype=acc, device=x.device)
    pivots = torch.empty((K, C), dtype=acc, device=x.device)  # each component's pivot of the sums
    finalize_grid, finalize_block = _finalize_grid(C)
    with _on_device(x):
        kernels._stats_partials_kernel[tiles.grid](
            x3, mu, log_sigma, mix_logits, partials, pivots,
            N, C, L, *x3.stride(), *tiles.kernel_args(),
            K=K, ACC=_triton_dtype(acc), **tiles.kernel_meta(),
        )
        kernels._stats_finalize_kernel[finalize_grid](
            partials, pivots, mean, var, mass, tiles.programs, C,
            K=K, BLOCK_C=finalize_block, ACC=_triton_dtype(acc),
        )
        _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, tiles)
    if scratch:
        out.copy_(out3.view(out.shape))
    return out, mean, var, mass


def launch_eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps):
    """The normalise pass alone, with given statistics (the mixture's own when ``mean`` and ``var``
    are None): one launch."""
    _check_launch(x, mu)
    mu, log_sigma, mix_logits, mean, var, weight, bias = _params(mu, log_sigma, mix_logits, mean, var, weight, bias)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x3 = _input_ncl(x)
    out3, scratch = _output_ncl(out)
    with _on_device(x):
        _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps,
                          geometry.tile_geometry(x3, mu.shape[0]))
    if scratch:
        out.copy_(out3.view(out.shape))
    return out


def launch_backward(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad):
    """Gradients of the training (``mass`` given) or eval forward: four launches in training, three in eval,
    one fewer without ``mixture_grad``.

    Training: reduction pass, statistics' gradients, elementwise pass,
    mixture gradients. Eval: the elementwise pass also makes the reduction's
    sums (the statistics are constants, so ``dx`` needs none first).
    """
    _check_launch(x, mu)
    training = mass is not None
    acc = compute_dtype(x.dtype)
    K, C = mu.shape
    mu, log_sigma, mix_logits, weight, mean, var, mass = _params(mu, log_sigma, mix_logits, weight, mean, var, mass)
    grad_input = torch.empty_like(x)
    grad_mu, grad_log_sigma, grad_mix_logits = (torch.empty_like(t) for t in (mu, log_sigma, mix_logits))
    grad_weight, grad_bias = (mu.new_empty((C,)) for _ in range(2))
    dmean, dvar = torch.empty_like(mean), torch.empty_like(var)
    x3 = _input_ncl(x)
    dout3 = _input_ncl(grad_out)
    dx3, scratch = _output_ncl(grad_input)
    N, _, L = x3.shape
    tiles = geometry.tile_geometry(x3, K)
    programs = tiles.programs if x.numel() else 0
    launch = dict(K=K, ACC=_triton_dtype(acc), **tiles.kernel_meta())
    shape_args = (N, C, L, *x3.stride(), *dout3.stride())
    finalize_grid, finalize_block = _finalize_grid(C)
    finalize = dict(K=K, BLOCK_C=finalize_block, EPS=eps, ACC=_triton_dtype(acc))

    # Per-program partial sums; every program writes its rows in full.
    stat_partials = torch.empty((programs, 2 * K + 1, C), dtype=acc, device=x.device)
    mixture_partials = torch.empty((programs, 3, K, C), dtype=acc, device=x.device) if mixture_grad else None

    def statistic_gradients():
        kernels._statistic_gradients_kernel[finalize_grid](
            stat_partials, mix_logits, var, weight, dmean, dvar, grad_weight, grad_bias,
            grad_mu, grad_log_sigma, grad_mix_logits, programs, C,
            HAS_WEIGHT=weight is not None, MIXTURE_GRAD=mixture_grad, **finalize,
        )

    def elementwise():
        if programs:
            kernels._backward_elementwise_kernel[tiles.grid](
                x3, dout3, dx3, mu, log_sigma, mix_logits, mean, var, weight,
                mass, dmean, dvar, mixture_partials, stat_partials,
                *shape_args, *dx3.stride(), *tiles.kernel_args(),
                HAS_WEIGHT=weight is not None, TRAINING=training, MIXTURE_GRAD=mixture_grad, EPS=eps,
                BF16_BY_BITS=_bf16_by_bits(dx3), **launch,
            )

    with _on_device(x):
        if training:
            if programs:
                kernels._backward_reduce_kernel[tiles.grid](
                    x3, dout3, mu, log_sigma, mix_logits, mean, stat_partials,
                    *shape_args, *tiles.kernel_args(), **launch,
                )
            statistic_gradients()
            elementwise()
        else:
            elementwise()
            statistic_gradients()
        if mixture_grad:
            kernels._mixture_gradients_kernel[(1,)](
                mixture_partials, log_sigma, mix_logits, var, dvar, grad_mu, grad_log_sigma, grad_mix_logits,
                programs, C, **finalize,
            )
    if scratch:
        grad_input.copy_(dx3.view(grad_input.shape))
    return grad_input, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias, dmean, dvar
