"""The ``uan::triton_*`` operators: ``torch.library`` custom ops, their fake implementations and autograd.

See the package docstring for the schemas; the launchers of :mod:`.launch` implement them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..reference import compute_dtype
from .launch import (
    launch_backward,
    launch_backward_elementwise,
    launch_backward_reduce,
    launch_eval_forward,
    launch_statistics,
    launch_statistics_finalize,
    launch_train_forward,
)


@torch.library.custom_op("uan::triton_forward", mutates_args=())
def _triton_forward(
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward: ``(out, mean, var, mass)`` with batch statistics (SPEC eq. 8-9)."""
    return launch_train_forward(x, mu, log_sigma, mix_logits, weight, bias, eps)


@torch.library.custom_op("uan::triton_forward_eval", mutates_args=())
def _triton_forward_eval(
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    """Eval forward with given ``(K, C)`` statistics ``mean`` and ``var``."""
    return launch_eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps)


@torch.library.custom_op("uan::triton_forward_mixture", mutates_args=())
def _triton_forward_mixture(
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    """Eval forward of update="moving_average": the mixture's own ``(mu, exp(2 log_sigma))`` as statistics."""
    return launch_eval_forward(x, mu, log_sigma, mix_logits, None, None, weight, bias, eps)


@torch.library.custom_op("uan::triton_backward", mutates_args=())
def _triton_backward(
    grad_out: Tensor,
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    mass: Optional[Tensor],
    eps: float,
    mixture_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the training (``mass`` given) or eval (``mass`` None) forward; see the module docstring."""
    return launch_backward(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad)


@torch.library.custom_op("uan::triton_statistics", mutates_args=())
def _triton_statistics(x: Tensor, mu: Tensor, log_sigma: Tensor, mix_logits: Tensor) -> Tensor:
    """The statistics pass: float64 ``(3, K, C)`` sums of ``tau``, ``tau (x - mu)``, ``tau (x - mu)**2``."""
    return launch_statistics(x, mu, log_sigma, mix_logits)


@torch.library.custom_op("uan::triton_statistics_finalize", mutates_args=())
def _triton_statistics_finalize(sums: Tensor, mu: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, mass)`` in ``mu``'s dtype from ``(3, K, C)`` sums about ``mu``."""
    return launch_statistics_finalize(sums, mu)


@torch.library.custom_op("uan::triton_backward_reduce", mutates_args=())
def _triton_backward_reduce(
    grad_out: Tensor, x: Tensor, mu: Tensor, log_sigma: Tensor, mix_logits: Tensor, mean: Tensor
) -> Tensor:
    """The training backward's reduction pass: float64 ``(2K+1, C)`` sums about the batch means ``mean``."""
    return launch_backward_reduce(grad_out, x, mu, log_sigma, mix_logits, mean)


@torch.library.custom_op("uan::triton_backward_elementwise", mutates_args=())
def _triton_backward_elementwise(
    grad_out: Tensor,
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    mass: Tensor,
    sums: Tensor,
    local_sums: Tensor,
    eps: float,
    mixture_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training backward after its reduction pass, from the whole batch's and this input's reduction sums."""
    return launch_backward_elementwise(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, sums,
                                       local_sums, eps, mixture_grad)


@_triton_backward_reduce.register_fake
def _(grad_out, x, mu, log_sigma, mix_logits, mean):
    return x.new_empty((2 * mu.shape[0] + 1, mu.shape[1]), dtype=torch.float64)


@_triton_backward_elementwise.register_fake
def _(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, sums, local_sums, eps, mixture_grad):
    channels = mu.shape[1]
    return (
        torch.empty_like(x),
        torch.empty_like(mu),
        torch.empty_like(log_sigma),
        torch.empty_like(mix_logits),
        mu.new_empty((channels,)),
        mu.new_empty((channels,)),
    )


@_triton_statistics.register_fake
def _(x, mu, log_sigma, mix_logits):
    return x.new_empty((3, *mu.shape), dtype=torch.float64)


@_triton_statistics_finalize.register_fake
def _(sums, mu):
    return tuple(torch.empty_like(mu, memory_format=torch.contiguous_format) for _ in range(3))


@_triton_forward.register_fake
def _(x, mu, log_sigma, mix_logits, weight, bias, eps):
    stat_dtype = compute_dtype(x.dtype)
    return (
        torch.empty_like(x),
        mu.new_empty(mu.shape, dtype=stat_dtype),
        mu.new_empty(mu.shape, dtype=stat_dtype),
        mu.new_empty(mu.shape, dtype=stat_dtype),
    )


@_triton_forward_eval.register_fake
def _(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps):
    return torch.empty_like(x)


@_triton_forward_mixture.register_fake
def _(x, mu, log_sigma, mix_logits, weight, bias, eps):
    return torch.empty_like(x)


@_triton_backward.register_fake
def _(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad):
    channels = mu.shape[1]
    return (
        torch.empty_like(x),
        torch.empty_like(mu),
        torch.empty_like(log_sigma),
        torch.empty_like(mix_logits),
        mu.new_empty((channels,)),
        mu.new_empty((channels,)),
        torch.empty_like(mean),
        torch.empty_like(var),
    )


def _needs_mixture_grad(ctx) -> bool:
    return any(ctx.needs_input_grad[1:4])


def _setup_forward(ctx, inputs, output):
    x, mu, log_sigma, mix_logits, weight, bias, eps = inputs
    _, mean, var, mass = output
    ctx.mark_non_differentiable(mean, var, mass)
    # The statistics get no gradient: no zero tensors (three fills) for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mu, log_sigma, mix_logits, weight, mean, var, mass)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _backward_forward(ctx, grad_out, _grad_mean, _grad_var, _grad_mass):
    if grad_out is None:  # grads are not materialised: out took no part in the loss
        return (None,) * 7
    x, mu, log_sigma, mix_logits, weight, mean, var, mass = ctx.saved_tensors
    grads = torch.ops.uan.triton_backward(
        grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, ctx.eps, _needs_mixture_grad(ctx)
    )
    grad_x, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias, _, _ = grads
    return (
        grad_x,
        grad_mu,
        grad_log_sigma,
        grad_mix_logits,
        grad_weight if weight is not None else None,
        grad_bias if ctx.has_bias else None,
        None,
    )


def _setup_forward_eval(ctx, inputs, output):
    x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(x, mu, log_sigma, mix_logits, mean, var, weight)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _backward_forward_eval(ctx, grad_out, saved=None):
    x, mu, log_sigma, mix_logits, mean, var, weight = ctx.saved_tensors if saved is None else saved
    grads = torch.ops.uan.triton_backward(
        grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, None, ctx.eps, _needs_mixture_grad(ctx)
    )
    grad_x, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias, grad_mean, grad_var = grads
    return (
        grad_x,
        grad_mu,
        grad_log_sigma,
        grad_mix_logits,
        grad_mean,
        grad_var,
        grad_weight if weight is not None else None,
        grad_bias if ctx.has_bias else None,
        None,
    )


def _differentiable_backward(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad):
    """``triton_backward``'s outputs as a differentiable PyTorch graph (reference math).

    Used only for double backward: differentiating these gives the exact second
    derivatives, at the reference's speed. In training (``mass`` given) the
    batch statistics are recomputed from ``x`` so that their dependence on ``x``
    is part of the graph; ``grad_mean``/``grad_var`` are the gradients reaching
    the statistics, as in the fused backward.
    """
    acc = compute_dtype(x.dtype)
    xc, g, mu_c, log_sigma_c, mix_logits_c = (t.to(acc) for t in (x, grad_out, mu, log_sigma, mix_logits))
    channel_shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    gamma = weight.to(acc) if weight is not None else torch.ones(x.shape[1], dtype=acc, device=x.device)
    gamma = gamma if gamma.requires_grad else gamma.detach().requires_grad_()
    tau = reference.responsibilities(xc, mu_c, log_sigma_c, mix_logits_c)
    if mass is not None:
        stat_mean, stat_var, _ = reference.batch_statistics(xc, tau)
    else:
        stat_mean, stat_var = mean.to(acc), var.to(acc)
    out = reference.mixture_transform(xc, tau, stat_mean, stat_var, mix_logits_c, eps) * gamma.view(channel_shape)
    wrt = [xc, mu_c, log_sigma_c, mix_logits_c, gamma, stat_mean, stat_var]
    grads = torch.autograd.grad(out, wrt, g, create_graph=True, allow_unused=True)
    grad_x, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_mean, grad_var = (
        torch.zeros_like(t) if grad is None else grad for grad, t in zip(grads, wrt)
    )
    if not mixture_grad:
        grad_mu, grad_log_sigma, grad_mix_logits = (torch.zeros_like(t) for t in (mu_c, log_sigma_c, mix_logits_c))
    grad_bias = g.sum([d for d in range(x.dim()) if d != 1])
    param_dtype = mu.dtype
    return (
        grad_x.to(x.dtype),
        *(t.to(param_dtype) for t in (grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias)),
        grad_mean.to(mean.dtype),
        grad_var.to(var.dtype),
    )


def _setup_backward(ctx, inputs, output):
    *tensors, eps, mixture_grad = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps = eps
    ctx.mixture_grad = mixture_grad


def _double_backward(ctx, *output_grads):
    """Vector-Jacobian product of ``triton_backward`` through :func:`_differentiable_backward`."""
    with torch.enable_grad():
        inputs = [None if t is None else t.detach().requires_grad_() for t in ctx.saved_tensors]
        outputs = _differentiable_backward(*inputs, ctx.eps, ctx.mixture_grad)
        pairs = [(o, g) for o, g in zip(outputs, output_grads) if g is not None and o.requires_grad]
        present = [t for t in inputs if t is not None]
        if not pairs:
            return (None,) * (len(inputs) + 2)
        grads = iter(torch.autograd.grad([o for o, _ in pairs], present, [g for _, g in pairs], allow_unused=True))
    return (*(None if t is None else next(grads) for t in inputs), None, None)


def _setup_forward_mixture(ctx, inputs, output):
    x, mu, log_sigma, mix_logits, weight, bias, eps = inputs
    ctx.save_for_backward(x, mu, log_sigma, mix_logits, weight)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _backward_forward_mixture(ctx, grad_out):
    x, mu, log_sigma, mix_logits, weight = ctx.saved_tensors
    # The statistics (mu, sigma^2) are constants of the eval transform: the
    # eval forward's gradients without those of mean and var.
    grads = _backward_forward_eval(ctx, grad_out, (x, mu, log_sigma, mix_logits, mu.detach(),
                                                   torch.exp(2.0 * log_sigma.detach()), weight))
    return grads[:4] + grads[6:]


_triton_forward.register_autograd(_backward_forward, setup_context=_setup_forward)
_triton_forward_eval.register_autograd(_backward_forward_eval, setup_context=_setup_forward_eval)
_triton_forward_mixture.register_autograd(_backward_forward_mixture, setup_context=_setup_forward_mixture)
_triton_backward.register_autograd(_double_backward, setup_context=_setup_backward)



def train_forward(
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward with batch statistics, as :func:`uan_kernels.reference.uan_train`.

    Returns ``(out, mean, var, mass)``: ``out`` in ``x``'s dtype and memory
    format, the ``(K, C)`` statistics in float32 (float64 for float64 input),
    non-differentiable. ``out`` is differentiable w.r.t. ``x``, ``mu``,
    ``log_sigma``, ``mix_logits``, ``weight`` and ``bias``.
    """
    return torch.ops.uan.triton_forward(x, mu, log_sigma, mix_logits, weight, bias, float(eps))


def eval_forward(
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
    """Eval forward with given statistics, as :func:`uan_kernels.reference.uan_eval`.

    Differentiable w.r.t. every tensor argument, ``mean`` and ``var`` included.
    """
    return torch.ops.uan.triton_forward_eval(x, mu, log_sigma, mix_logits, mean, var, weight, bias, float(eps))


def eval_mixture_forward(
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Eval forward of update="moving_average" (statistics ``(mu, exp(2 log_sigma))``, constants) in one kernel."""
    return torch.ops.uan.triton_forward_mixture(x, mu, log_sigma, mix_logits, weight, bias, float(eps))


def statistics(x: Tensor, mu: Tensor, log_sigma: Tensor, mix_logits: Tensor) -> Tensor:
    """The statistics pass (``uan::triton_statistics``), as :func:`uan_kernels.ops.statistics`.

    Float64 ``(3, K, C)`` sums over the elements of each channel of ``tau_k``,
    ``tau_k (x - mu_k)`` and ``tau_k (x - mu_k)**2``: about ``mu``, so that the
    sums of several batches (or processes) add. Zeros for an empty input.
    Not differentiable.
    """
    return torch.ops.uan.triton_statistics(x, mu, log_sigma, mix_logits)


def statistics_finalize(sums: Tensor, mu: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, mass)`` of SPEC's training forward from :func:`statistics`' sums (``uan::triton_statistics_finalize``)."""
    return torch.ops.uan.triton_statistics_finalize(sums, mu)


def normalize(
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
    """The normalize pass (``uan::triton_forward_eval``) with ``(mean, var)`` from :func:`statistics_finalize`."""
    return torch.ops.uan.triton_forward_eval(x, mu, log_sigma, mix_logits, mean, var, weight, bias, float(eps))


def backward_reduce(grad_out: Tensor, x: Tensor, mu: Tensor, log_sigma: Tensor, mix_logits: Tensor,
                    mean: Tensor) -> Tensor:
    """The training backward's reduction pass (``uan::triton_backward_reduce``), as :func:`uan_kernels.ops.backward_reduce`."""
    return torch.ops.uan.triton_backward_reduce(grad_out, x, mu, log_sigma, mix_logits, mean)


def backward_elementwise(
    grad_out: Tensor,
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    mass: Tensor,
    sums: Tensor,
    local_sums: Tensor,
    eps: float = 1e-5,
    mixture_grad: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training backward after its reduction pass (``uan::triton_backward_elementwise``), as
    :func:`uan_kernels.ops.backward_elementwise`."""
    return torch.ops.uan.triton_backward_elementwise(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var,
                                                     mass, sums, local_sums, float(eps), mixture_grad)
