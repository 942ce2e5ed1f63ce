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
# (k, c) pairs per program of the elementwise O(K*C) kernels.
_FINALIZE_BLOCK = 1024


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


def _launch_stats_partials(x3, mu, log_sigma, mix_logits, tiles, acc) -> Tuple[Tensor, Tensor]:
    """The statistics pass: per program, sums about each component's pivot, ``(programs, 3, K, C)``, and the
    pivots, ``(K, C)``."""
    K, C = mu.shape
    N, _, L = x3.shape
    partials = torch.empty((tiles.programs, 3, K, C), dtype=acc, device=x3.device)
    pivots = torch.empty((K, C), dtype=acc, device=x3.device)
    kernels._stats_partials_kernel[tiles.grid](
        x3, mu, log_sigma, mix_logits, partials, pivots,
        N, C, L, *x3.stride(), *tiles.kernel_args(),
        K=K, ACC=_triton_dtype(acc), **tiles.kernel_meta(),
    )
    return partials, pivots


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
    finalize_grid, finalize_block = _finalize_grid(C)
    with _on_device(x):
        partials, pivots = _launch_stats_partials(x3, mu, log_sigma, mix_logits, tiles, acc)
        kernels._stats_finalize_kernel[finalize_grid](
            partials, pivots, mean, var, mass, tiles.programs, C,
            K=K, BLOCK_C=finalize_block, ACC=_triton_dtype(acc),
        )
        _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, tiles)
    if scratch:
        out.copy_(out3.view(out.shape))
    return out, mean, var, mass


def launch_statistics(x, mu, log_sigma, mix_logits):
    """The statistics pass and its float64 sums about ``mu``, ``(3, K, C)``: two launches (none when empty)."""
    _check_launch(x, mu)
    acc = compute_dtype(x.dtype)
    K, C = mu.shape
    mu, log_sigma, mix_logits = _params(mu, log_sigma, mix_logits)
    if x.numel() == 0:
        return torch.zeros((3, K, C), dtype=torch.float64, device=x.device)
    sums = torch.empty((3, K, C), dtype=torch.float64, device=x.device)
    x3 = _input_ncl(x)
    tiles = geometry.tile_geometry(x3, K)
    finalize_grid, finalize_block = _finalize_grid(C)
    with _on_device(x):
        partials, pivots = _launch_stats_partials(x3, mu, log_sigma, mix_logits, tiles, acc)
        kernels._stats_sums_kernel[finalize_grid](
            partials, pivots, mu, sums, tiles.programs, C,
            K=K, BLOCK_C=finalize_block, ACC=_triton_dtype(acc),
        )
    return sums


def _check_sums(op: str, name: str, sums: Tensor, mu: Tensor, expected: Tuple[int, ...]) -> None:
    """Raise unless ``sums`` is a float64 tensor of shape ``expected`` on ``mu``'s device."""
    if sums.dtype != torch.float64 or tuple(sums.shape) != expected or sums.device != mu.device:
        raise ValueError(f"{op}: {name} must be float64 of shape {expected} on {mu.device}, "
                         f"got {sums.dtype} {tuple(sums.shape)} on {sums.device}")


def launch_statistics_finalize(sums, mu):
    """``(mean, var, mass)`` in ``mu``'s dtype from ``(3, K, C)`` float64 sums about ``mu``: one launch."""
    op = "uan::triton_statistics_finalize"
    if mu.dim() != 2 or mu.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: mu must be a float32 or float64 (K, C) tensor, got {mu.dtype} {tuple(mu.shape)}")
    _check_sums(op, "sums", sums, mu, (3, *mu.shape))
    mu = mu.contiguous()
    sums = sums.contiguous()
    mean, var, mass = (torch.empty_like(mu) for _ in range(3))
    plane = mu.numel()
    if plane:
        block = min(_FINALIZE_BLOCK, triton.next_power_of_2(plane))
        with _on_device(mu):
            kernels._statistics_from_sums_kernel[(cdiv(plane, block),)](sums, mu, mean, var, mass, plane,
                                                                         BLOCK=block)
    return mean, var, mass


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


def launch_backward(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad,
                    reduce_sums=None):
    """Gradients of the training (``mass`` given) or eval forward: four launches in training, three in eval,
    one fewer without ``mixture_grad``.

    Training: reduction pass, statistics' gradients, elementwise pass,
    mixture gradients. Eval: the elementwise pass also makes the reduction's
    sums (the statistics are constants, so ``dx`` needs none first).
    ``reduce_sums = (sums, local_sums)`` (training only,
    ``uan::triton_backward_elementwise``): the reduction pass's sums are given,
    the whole batch's and this input's (see :func:`launch_backward_elementwise`),
    and the reduction pass does not run.
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
    if reduce_sums is None:
        stat_partials, num_stat_partials, local_sums, local_dvar = (
            torch.empty((programs, 2 * K + 1, C), dtype=acc, device=x.device), programs, None, dvar)
    else:
        (stat_partials, local_sums), num_stat_partials = _params(*reduce_sums), 1
        local_dvar = torch.empty_like(dvar)
    mixture_partials = torch.empty((programs, 3, K, C), dtype=acc, device=x.device) if mixture_grad else None

    def statistic_gradients():
        kernels._statistic_gradients_kernel[finalize_grid](
            stat_partials, local_sums, mix_logits, var, weight, dmean, dvar, local_dvar, grad_weight, grad_bias,
            grad_mu, grad_log_sigma, grad_mix_logits, num_stat_partials, C,
            HAS_WEIGHT=weight is not None, MIXTURE_GRAD=mixture_grad, LOCAL_SUMS=local_sums is not None, **finalize,
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
            if programs and reduce_sums is None:
                _launch_backward_reduce(x3, dout3, mu, log_sigma, mix_logits, mean, stat_partials, tiles, acc)
            statistic_gradients()
            elementwise()
        else:
            elementwise()
            statistic_gradients()
        if mixture_grad:
            kernels._mixture_gradients_kernel[(1,)](
                mixture_partials, log_sigma, mix_logits, var, local_dvar, grad_mu, grad_log_sigma, grad_mix_logits,
                programs, C, **finalize,
            )
    if scratch:
        grad_input.copy_(dx3.view(grad_input.shape))
    return grad_input, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias, dmean, dvar


def _launch_backward_reduce(x3, dout3, mu, log_sigma, mix_logits, mean, partials, tiles, acc):
    """The training backward's reduction pass: per program ``(2K+1, C)`` sums about ``mean`` into ``partials``."""
    K, C = mu.shape
    N, _, L = x3.shape
    kernels._backward_reduce_kernel[tiles.grid](
        x3, dout3, mu, log_sigma, mix_logits, mean, partials,
        N, C, L, *x3.stride(), *dout3.stride(), *tiles.kernel_args(),
        K=K, ACC=_triton_dtype(acc), **tiles.kernel_meta(),
    )


def launch_backward_reduce(grad_out, x, mu, log_sigma, mix_logits, mean):
    """The training backward's reduction pass and its float64 totals, ``(2K+1, C)``: two launches (none when empty).

    Rows ``k``: ``sum dout tau_k``; rows ``K + k``: ``sum dout tau_k (x - mean_k)``; row ``2K``: ``sum dout``.
    """
    _check_launch(x, mu)
    acc = compute_dtype(x.dtype)
    K, C = mu.shape
    mu, log_sigma, mix_logits, mean = _params(mu, log_sigma, mix_logits, mean)
    if x.numel() == 0:
        return torch.zeros((2 * K + 1, C), dtype=torch.float64, device=x.device)
    x3 = _input_ncl(x)
    tiles = geometry.tile_geometry(x3, K)
    partials = torch.empty((tiles.programs, 2 * K + 1, C), dtype=acc, device=x.device)
    sums = torch.empty((2 * K + 1, C), dtype=torch.float64, device=x.device)
    size = sums.numel()
    block = min(_FINALIZE_BLOCK, triton.next_power_of_2(size))
    with _on_device(x):
        _launch_backward_reduce(x3, _input_ncl(grad_out), mu, log_sigma, mix_logits, mean, partials, tiles, acc)
        kernels._partials_total_kernel[(cdiv(size, block),)](partials, sums, tiles.programs, size, BLOCK=block)
    return sums


def launch_backward_elementwise(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, sums, local_sums,
                                eps, mixture_grad):
    """The training backward after its reduction pass, from given ``(2K+1, C)`` reduction sums: three launches,
    two without ``mixture_grad``.

    ``sums`` (the whole batch's, every process's) give ``grad_input``;
    ``local_sums`` (this input's) give ``grad_weight``, ``grad_bias`` and the
    direct term of ``d mix_logits``, so that the processes' parameter
    gradients add up to the whole batch's.
    """
    op = "uan::triton_backward_elementwise"
    for name, t in (("sums", sums), ("local_sums", local_sums)):
        _check_sums(op, name, t, mu, (2 * mu.shape[0] + 1, mu.shape[1]))
    return launch_backward(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad,
                           reduce_sums=(sums, local_sums))[:6]
