"""Python side of the ``torch.ops.uan`` operators: fake implementations and autograd.

Importing this module loads the compiled extension ``uan_kernels._C``, which
defines the schemas and the CPU (and, when built with CUDA, CUDA) kernels:

* ``uan::forward(input, mu, log_sigma, mix_logits, weight?, bias?, eps) -> (output, mean, var, mass)``
* ``uan::forward.stats(input, mu, log_sigma, mix_logits, mean, var, weight?, bias?, eps) -> output``
* ``uan::forward.mixture(input, mu, log_sigma, mix_logits, weight?, bias?, eps) -> output``: eval of
  update="moving_average", with the mixture's own statistics (mu, exp(2 log_sigma)) as constants
* ``uan::backward(grad_output, input, mu, log_sigma, mix_logits, weight?, mean, var, mass?, eps, mixture_grads)
  -> (grad_input, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias)``
* ``uan::moving_average_update_(mu!, log_sigma!, mix_logits!, mean, var, mass, values_per_channel, momentum)``:
  one online EM step of the mixture buffers (update="moving_average"), in place
* the training step's passes as separate operators, so that a caller can put a collective between them
  (:class:`uan_kernels.SyncUAN`): ``uan::statistics(input, mu, log_sigma, mix_logits) -> sums``,
  ``uan::statistics_finalize(sums, mu) -> (mean, var, mass)``, the normalize pass ``uan::forward.stats``
  with those statistics, ``uan::backward_reduce(grad_output, input, mu, log_sigma, mix_logits, mean) -> sums``
  and ``uan::backward_elementwise(grad_output, input, mu, log_sigma, mix_logits, weight?, mean, var, mass,
  sums, local_sums, eps, mixture_grads) -> (grad_input, grad_mu, grad_log_sigma, grad_mix_logits,
  grad_weight, grad_bias)`` (see :func:`statistics` and :func:`backward_elementwise`)
* ``uan::em_m_step(sums, pivot, prev_mean, prev_var, var_floor, min_mass, min_weight) -> (mean, var, weight,
  mu, log_sigma, mix_logits)``: MixtureNorm's EM M-step from the statistics pass's sums, CPU only
  (:func:`uan_kernels.mixture_norm._m_step_from_sums` is its definition)
* ``uan::gather_samples(input, positions) -> (1, C, S)``: the subsample MixtureNorm's EM fits, in increasing
  order of position, CPU only
  (:func:`uan_kernels.mixture_norm._em_input`)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the operators)
from .reference import compute_dtype


# Looked up once: a plain dict is also what torch.compile can trace through.
_KERNEL_DEVICES = {
    device: torch._C._dispatch_has_kernel_for_dispatch_key("uan::forward", device.upper())
    for device in ("cpu", "cuda")
}


def has_kernel(device_type: str) -> bool:
    """Whether this build of the extension has kernels for ``device_type`` ("cpu", "cuda")."""
    return _KERNEL_DEVICES.get(device_type, False)


def _stat_like(input: Tensor, mu: Tensor) -> Tensor:
    return mu.new_empty(mu.shape, dtype=compute_dtype(input.dtype))


def _output_like(input: Tensor) -> Tensor:
    # The kernels write the output in the input's layout when it is contiguous
    # or channels-last dense, and contiguous otherwise.
    if input.is_contiguous() or input.dim() < 4:
        return torch.empty_like(input, memory_format=torch.contiguous_format)
    fmt = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    if input.is_contiguous(memory_format=fmt):
        return torch.empty_like(input, memory_format=fmt)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("uan::forward")
def _forward_fake(input, mu, log_sigma, mix_logits, weight, bias, eps):
    return _output_like(input), _stat_like(input, mu), _stat_like(input, mu), _stat_like(input, mu)


@torch.library.register_fake("uan::forward.stats")
def _forward_stats_fake(input, mu, log_sigma, mix_logits, mean, var, weight, bias, eps):
    return _output_like(input)


@torch.library.register_fake("uan::forward.mixture")
def _forward_mixture_fake(input, mu, log_sigma, mix_logits, weight, bias, eps):
    return _output_like(input)


@torch.library.register_fake("uan::backward")
def _backward_fake(grad_output, input, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grads):
    channels = input.shape[1]
    return (
        _output_like(input),
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        torch.empty_like(log_sigma, memory_format=torch.contiguous_format),
        torch.empty_like(mix_logits),
        mu.new_empty((channels,)),
        mu.new_empty((channels,)),
    )


@torch.library.register_fake("uan::statistics")
def _statistics_fake(input, mu, log_sigma, mix_logits):
    return input.new_empty((3, *mu.shape), dtype=torch.float64)


@torch.library.register_fake("uan::statistics_finalize")
def _statistics_finalize_fake(sums, mu):
    return tuple(torch.empty_like(mu, memory_format=torch.contiguous_format) for _ in range(3))


@torch.library.register_fake("uan::backward_reduce")
def _backward_reduce_fake(grad_output, input, mu, log_sigma, mix_logits, mean):
    return input.new_empty((2 * mu.shape[0] + 1, mu.shape[1]), dtype=torch.float64)


@torch.library.register_fake("uan::backward_elementwise")
def _backward_elementwise_fake(grad_output, input, mu, log_sigma, mix_logits, weight, mean, var, mass, sums,
                               local_sums, eps, mixture_grads):
    return _backward_fake(grad_output, input, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grads)


@torch.library.register_fake("uan::em_m_step")
def _em_m_step_fake(sums, pivot, prev_mean, prev_var, var_floor, min_mass, min_weight):
    K = pivot.shape[0]
    return (
        *(pivot.new_empty(pivot.shape, dtype=torch.float64) for _ in range(2)),
        pivot.new_empty((K,), dtype=torch.float64),
        *(pivot.new_empty(pivot.shape) for _ in range(2)),
        pivot.new_empty((K,)),
    )


@torch.library.register_fake("uan::gather_samples")
def _gather_samples_fake(input, positions):
    return input.new_empty((1, input.shape[1], positions.shape[0]))


@torch.library.register_fake("uan::moving_average_update_")
def _moving_average_update_fake(mu, log_sigma, mix_logits, mean, var, mass, values_per_channel, momentum):
    return None


def _grads(ctx, saved, grad_output: Optional[Tensor], mass: Optional[Tensor]):
    # ``saved``: ctx.saved_tensors, unpacked once by the caller (non-reentrant
    # checkpointing allows each saved tensor to be unpacked only once).
    input, mu, log_sigma, mix_logits, weight, mean, var = saved[:7]
    mixture_grads = any(ctx.needs_input_grad[1:4])
    if grad_output is None:
        grad_output = torch.zeros_like(input)
    return torch.ops.uan.backward(
        grad_output, input, mu, log_sigma, mix_logits, weight if ctx.has_weight else None, mean, var, mass,
        ctx.eps, mixture_grads,
    )


def _setup_forward(ctx, inputs, output):
    input, mu, log_sigma, mix_logits, weight, bias, eps = inputs
    _, mean, var, mass = output
    ctx.mark_non_differentiable(mean, var, mass)
    # No zero-filled gradients for the statistics (three launches per step).
    ctx.set_materialize_grads(False)
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.eps = eps
    ctx.save_for_backward(input, mu, log_sigma, mix_logits, weight, mean, var, mass)


def _backward_forward(ctx, grad_output, grad_mean, grad_var, grad_mass):
    saved = ctx.saved_tensors
    grad_input, grad_mu, grad_log_sigma, grad_mix, grad_weight, grad_bias = _grads(ctx, saved, grad_output, saved[7])
    return (
        grad_input, grad_mu, grad_log_sigma, grad_mix,
        grad_weight if ctx.has_weight else None, grad_bias if ctx.has_bias else None, None,
    )


def _setup_forward_stats(ctx, inputs, output):
    input, mu, log_sigma, mix_logits, mean, var, weight, bias, eps = inputs
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.eps = eps
    ctx.save_for_backward(input, mu, log_sigma, mix_logits, weight, mean, var)


def _backward_forward_stats(ctx, grad_output, saved=None):
    saved = ctx.saved_tensors if saved is None else saved
    grad_input, grad_mu, grad_log_sigma, grad_mix, grad_weight, grad_bias = _grads(ctx, saved, grad_output, None)
    # The given statistics are constants of the eval transform.
    return (
        grad_input, grad_mu, grad_log_sigma, grad_mix, None, None,
        grad_weight if ctx.has_weight else None, grad_bias if ctx.has_bias else None, None,
    )


def _setup_forward_mixture(ctx, inputs, output):
    input, mu, log_sigma, mix_logits, weight, bias, eps = inputs
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.eps = eps
    ctx.save_for_backward(input, mu, log_sigma, mix_logits, weight)


def _backward_forward_mixture(ctx, grad_output):
    input, mu, log_sigma, mix_logits, weight = ctx.saved_tensors
    # The statistics (mu, sigma^2) are constants of the eval transform: forward.stats's
    # gradients without those of mean and var.
    saved = (input, mu, log_sigma, mix_logits, weight, mu.detach(), torch.exp(2.0 * log_sigma.detach()))
    grads = _backward_forward_stats(ctx, grad_output, saved)
    return grads[:4] + grads[6:]


torch.library.register_autograd("uan::forward", _backward_forward, setup_context=_setup_forward)
torch.library.register_autograd("uan::forward.stats", _backward_forward_stats, setup_context=_setup_forward_stats)
torch.library.register_autograd("uan::forward.mixture", _backward_forward_mixture,
                                setup_context=_setup_forward_mixture)


def _function(name: str, op, setup_context, backward):
    """The same forward, setup_context and backward as an autograd.Function.

    torch.library's generated autograd for a schema-defined operator has no
    setup_context, which torch.func transforms require; the package's
    forwards go through these Functions, so torch.func.grad/vjp/vmap and
    torch.compile work, while calling torch.ops.uan.* directly still uses
    the registered autograd.
    """
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        # The operators have no batching rule: vmap runs the forward per
        # sample through PyTorch's fallback (correct, but a loop).
        "generate_vmap_rule": True,
    })


_TrainingForward = _function("UANTrainingForward", torch.ops.uan.forward.default, _setup_forward, _backward_forward)
_StatisticsForward = _function("UANStatisticsForward", torch.ops.uan.forward.stats, _setup_forward_stats,
                               _backward_forward_stats)
_MixtureForward = _function("UANMixtureForward", torch.ops.uan.forward.mixture, _setup_forward_mixture,
                            _backward_forward_mixture)


def train_forward(input, mu, log_sigma, mix_logits, weight=None, bias=None, eps=1e-5):
    """Training forward through ``torch.ops.uan.forward``: ``(out, mean, var, mass)``."""
    return _TrainingForward.apply(input, mu, log_sigma, mix_logits, weight, bias, eps)


def eval_forward(input, mu, log_sigma, mix_logits, mean, var, weight=None, bias=None, eps=1e-5):
    """Eval forward with given statistics through ``torch.ops.uan.forward.stats``."""
    return _StatisticsForward.apply(input, mu, log_sigma, mix_logits, mean, var, weight, bias, eps)


def eval_mixture_forward(input, mu, log_sigma, mix_logits, weight=None, bias=None, eps=1e-5):
    """Eval forward of update="moving_average" through ``torch.ops.uan.forward.mixture``."""
    return _MixtureForward.apply(input, mu, log_sigma, mix_logits, weight, bias, eps)


def statistics(input: Tensor, mu: Tensor, log_sigma: Tensor, mix_logits: Tensor) -> Tensor:
    """The training forward's statistics pass alone (``torch.ops.uan.statistics``).

    Returns float64 sums of shape ``(3, K, C)`` over the elements ``x_i`` of each
    channel ``c``, with ``tau`` computed as the training forward does::

        sums[0, k, c] = sum_i tau_ik
        sums[1, k, c] = sum_i tau_ik (x_i - mu[k, c])
        sums[2, k, c] = sum_i tau_ik (x_i - mu[k, c])**2

    They are taken about ``mu``, which every process knows, so that the sums of
    several batches (or of the ranks of a process group) add: put a collective
    between this and :func:`statistics_finalize`. The kernels accumulate about a
    value of each channel and move their float64 totals to ``mu`` at the end,
    so accuracy is that of the training forward. Zeros for an empty input.
    Not differentiable (compose it in an ``autograd.Function``, as
    :class:`uan_kernels.SyncUAN` does).
    """
    return torch.ops.uan.statistics(input, mu, log_sigma, mix_logits)


def statistics_finalize(sums: Tensor, mu: Tensor) -> tuple:
    """``(mean, var, mass)``, each ``(K, C)`` in ``mu``'s dtype, from :func:`statistics`' sums (``uan::statistics_finalize``).

    ``mass = S``, ``mean = (mu S + T1) / (S + 1e-12)`` (= ``sum tau x / (S + 1e-12)``),
    ``var = max(0, (T2 - 2 (mean - mu) T1 + (mean - mu)**2 S) / (S + 1e-12))``,
    computed in float64: the batch statistics of the training forward (SPEC).
    """
    return torch.ops.uan.statistics_finalize(sums, mu)


def normalize(input, mu, log_sigma, mix_logits, mean, var, weight=None, bias=None, eps=1e-5):
    """The normalize pass: ``torch.ops.uan.forward.stats`` with ``(mean, var)`` from :func:`statistics_finalize`.

    SPEC's transform with the given statistics, the same as the eval forward's;
    called directly (inside an ``autograd.Function``), not through its autograd.
    """
    return torch.ops.uan.forward.stats(input, mu, log_sigma, mix_logits, mean, var, weight, bias, float(eps))


def backward_reduce(grad_output, input, mu, log_sigma, mix_logits, mean):
    """The training backward's reduce pass (``torch.ops.uan.backward_reduce``).

    Float64 ``(2K+1, C)`` sums over the elements of each channel, with ``mean``
    the batch means of the training forward (the whole batch's, the same on
    every process)::

        sums[k]      = sum_i dout_i tau_ik
        sums[K + k]  = sum_i dout_i tau_ik (x_i - mean[k, c])
        sums[2 K]    = sum_i dout_i

    so that the sums of several batches add. Not differentiable.
    """
    return torch.ops.uan.backward_reduce(grad_output, input, mu, log_sigma, mix_logits, mean)


def backward_elementwise(grad_output, input, mu, log_sigma, mix_logits, weight, mean, var, mass, sums, local_sums,
                         eps=1e-5, mixture_grads=True):
    """The training backward after its reduce pass (``torch.ops.uan.backward_elementwise``).

    Returns ``(grad_input, grad_mu, grad_log_sigma, grad_mix_logits,
    grad_weight, grad_bias)`` of this input. ``mean``, ``var``, ``mass`` are the
    batch statistics and ``sums`` the :func:`backward_reduce` sums of the whole
    batch (all processes): ``grad_input`` needs them, since every element moves
    the statistics. ``local_sums`` are this input's own reduce sums:
    ``grad_weight``, ``grad_bias`` and the mixing weights' direct term come
    from them, and the mixture parameters' other terms from this input's
    elements, so that the processes' parameter gradients add up to the whole
    batch's (as DistributedDataParallel sums them). With ``sums`` =
    ``local_sums`` of a single process this is ``torch.ops.uan.backward`` of a
    training forward. ``mixture_grads=False`` returns zeros for the mixture
    parameters. Not differentiable.
    """
    return torch.ops.uan.backward_elementwise(grad_output, input, mu, log_sigma, mix_logits, weight, mean, var,
                                              mass, sums, local_sums, float(eps), mixture_grads)
