"""Host code of the Triton backend: runs the kernels for the operators in :mod:`.ops`."""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backends import MAX_FUSED_COMPONENTS
from ..reference import compute_dtype
from . import geometry, kernels
from .geometry import MERGE_BLOCK_C, cdiv


def _on_device_of(position: int):
    """Run the decorated launcher with its ``position``-th argument's CUDA device
    current: Triton launches on the current device, which need not be the one
    holding the tensors (e.g. cuda:1)."""

    def decorate(launcher):
        @functools.wraps(launcher)
        def run(*args):
            x = args[position]
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                return launcher(*args)

        return run

    return decorate


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bf16_by_bits(out: Tensor) -> bool:
    return kernels.INTERPRETED and out.dtype == torch.bfloat16


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
    if x.device.type == "cpu" and not kernels.INTERPRETED:
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
    kernels.normalize_kernel[tiles.grid](
        x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias,
        N, C, L, *x3.stride(), *out3.stride(), *tiles.kernel_args(),
        K=K, K_PAD=triton.next_power_of_2(K), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        MIXTURE_STATISTICS=mean is None, EPS=eps, ACC=_triton_dtype(compute_dtype(x3.dtype)),
        BF16_BY_BITS=_bf16_by_bits(out3),
        **tiles.kernel_meta(),
    )


@_on_device_of(0)
def forward_train(x, mu, log_sigma, mix_logits, weight, bias, eps):
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
    kernels.stats_partials_kernel[tiles.grid](
        x3, mu, log_sigma, mix_logits, partials,
        N, C, L, *x3.stride(), *tiles.kernel_args(),
        K=K, K_PAD=k_pad, ACC=_triton_dtype(acc), **tiles.kernel_meta(),
    )
    merge_block = min(MERGE_BLOCK_C, triton.next_power_of_2(C))
    kernels.merge_stats_kernel[(cdiv(C, merge_block),)](
        partials, x3, mean, var, mass, tiles.programs, C, x3.stride(1),
        K=K, K_PAD=k_pad, BLOCK_C=merge_block, ACC=_triton_dtype(acc),
    )
    _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, tiles)
    if scratch:
        out.copy_(out3.view(out.shape))
    return out, mean, var, mass


@_on_device_of(0)
def forward_eval(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps):
    """Eval forward with given statistics, or with the mixture's own when ``mean`` and ``var`` are None."""
    _check_launch(x, mu)
    mu, log_sigma, mix_logits, mean, var, weight, bias = _params(mu, log_sigma, mix_logits, mean, var, weight, bias)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x3 = _input_ncl(x)
    out3, scratch = _output_ncl(out)
    tiles = geometry.tile_geometry(x3, mu.shape[0])
    _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, tiles)
    if scratch:
        out.copy_(out3.view(out.shape))
    return out


@_on_device_of(1)
def backward(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad):
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

    # Per-program partial sums; every program writes its rows in full.
    stat_partials = torch.empty((programs, 2, K, C), dtype=acc, device=x.device)
    dbeta_partials = torch.empty((programs, C), dtype=acc, device=x.device)
    mix_partials = torch.empty((programs, 3, K, C), dtype=acc, device=x.device) if mixture_grad else None
    # What backward_statistics_kernel and parameter_gradients_kernel write: no
    # O(K*C) tensor ops between the passes.
    dmean, dvar, log_lam_direct = (torch.empty((K, C), dtype=acc, device=x.device) for _ in range(3))
    grad_weight, grad_bias = (torch.empty(C, dtype=acc, device=x.device) for _ in range(2))
    grad_mu, grad_log_sigma = (torch.empty((K, C), dtype=acc, device=x.device) for _ in range(2))
    grad_mix_logits = torch.empty(K, dtype=acc, device=x.device)
    finalize_block = min(MERGE_BLOCK_C, triton.next_power_of_2(C))

    def statistic_gradients():
        """``Gm = dL/dmean``, ``Gv = dL/dvar``, ``grad_weight``, ``grad_bias`` from the programs' sums."""
        kernels.backward_statistics_kernel[(cdiv(C, finalize_block),)](
            stat_partials, dbeta_partials, mix_logits, var, weight,
            dmean, dvar, grad_weight, grad_bias, log_lam_direct, grad_mu, grad_log_sigma, grad_mix_logits,
            programs, C, K=K, K_PAD=launch["K_PAD"], BLOCK_C=finalize_block, HAS_WEIGHT=weight is not None,
            ZERO_MIXTURE_GRADS=not mixture_grad, EPS=eps, ACC=launch["ACC"],
        )

    def launch_elementwise():
        if programs:
            kernels.backward_elementwise_kernel[tiles.grid](
                x3, dout3, dx3, mu, log_sigma, mix_logits, mean, var, weight,
                mass, dmean, dvar, mix_partials, stat_partials, dbeta_partials,
                *shape_args, *dx3.stride(), *tiles.kernel_args(),
                HAS_WEIGHT=weight is not None, TRAINING=training, MIXTURE_GRAD=mixture_grad, EPS=eps,
                BF16_BY_BITS=_bf16_by_bits(dx3), **launch,
            )

    if training:
        if programs:
            kernels.backward_reduce_kernel[tiles.grid](
                x3, dout3, mu, log_sigma, mix_logits, mean, stat_partials, dbeta_partials,
                *shape_args, *tiles.kernel_args(), **launch,
            )
        statistic_gradients()
        launch_elementwise()
    else:
        # Eval: the statistics are constants, so dx needs no reduction first.
        launch_elementwise()
        statistic_gradients()
    if scratch:
        grad_input.copy_(dx3.view(grad_input.shape))
    if mixture_grad:
        kernels.parameter_gradients_kernel[(1,)](
            mix_partials, log_lam_direct, mix_logits, grad_mu, grad_log_sigma, grad_mix_logits,
            programs, C, K=K, K_PAD=launch["K_PAD"], BLOCK_C=finalize_block, ACC=launch["ACC"],
        )
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
