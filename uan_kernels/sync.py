"""Synchronized UAN: the training statistics of a whole ``torch.distributed`` process group.

As ``nn.SyncBatchNorm`` does for BatchNorm, every process normalises its
slice of the global batch with the statistics of the whole global batch. The
fused backends run the training step as operators per pass with one
all-reduce between the two passes of the forward and one between the two
passes of the backward (:class:`_SyncTraining`):

    forward:  statistics -> all_reduce(sums, element count) -> statistics_finalize -> normalize
    backward: backward_reduce -> all_reduce(sums) -> backward_elementwise

The statistics pass's sums are about the component means ``mu``, the same on
every process, so they add; so are the backward's, about the global batch
means. ``grad_input`` needs the global backward sums, while each process's
parameter gradients are its own share (from its own sums), so that their sum
over processes, which DistributedDataParallel takes, is the gradient of the
whole batch. The reference backend differentiates its plain PyTorch forward
through a differentiable all-reduce instead (any K, slow).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import reference
from .functional import (
    check_values_per_channel,
    in_backward_recomputation,
    resolve_call,
    training_mixture,
    uan_and_mixture,
    update_estimates_,
    values_per_channel,
)


def synchronizes(process_group) -> bool:
    """Whether a training forward on ``process_group`` (None: the default group) needs its collectives:
    torch.distributed is initialised and the group has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _packed_with_count(sums: Tensor, input: Tensor) -> Tensor:
    """``sums`` flattened, followed by this process's number of values per channel: one tensor, one collective."""
    return torch.cat([sums.flatten(), sums.new_full((1,), values_per_channel(input))])


class _SyncTraining(torch.autograd.Function):
    """The training forward and backward of a fused backend's ``passes`` with the batch sums all-reduced.

    Returns ``(out, mean, var, mass, count)``: the global batch statistics and
    the global number of values per channel (a float64 scalar tensor), none of
    them differentiable.
    """

    @staticmethod
    def forward(ctx, input, mu, log_sigma, mix_logits, weight, bias, eps, group, passes):
        packed = _packed_with_count(passes.statistics(input, mu, log_sigma, mix_logits), input)
        dist.all_reduce(packed, group=group)
        mean, var, mass = passes.statistics_finalize(packed[:-1].view(3, *mu.shape), mu)
        out = passes.normalize(input, mu, log_sigma, mix_logits, mean, var, weight, bias, eps)
        count = packed[-1]
        ctx.mark_non_differentiable(mean, var, mass, count)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, mu, log_sigma, mix_logits, weight, mean, var, mass)
        ctx.eps, ctx.group, ctx.passes, ctx.has_bias = eps, group, passes, bias is not None
        return out, mean, var, mass, count

    @staticmethod
    def backward(ctx, grad_output, _mean, _var, _mass, _count):
        input, mu, log_sigma, mix_logits, weight, mean, var, mass = ctx.saved_tensors
        if grad_output is None:
            # The output took no part in the loss; the collective must still run on every process.
            grad_output = torch.zeros_like(input)
        local_sums = ctx.passes.backward_reduce(grad_output, input, mu, log_sigma, mix_logits, mean)
        sums = local_sums.clone()
        dist.all_reduce(sums, group=ctx.group)
        needs = ctx.needs_input_grad
        grads = ctx.passes.backward_elementwise(grad_output, input, mu, log_sigma, mix_logits, weight, mean, var,
                                                mass, sums, local_sums, ctx.eps, any(needs[1:4]))
        grad_input, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias = grads
        return (
            grad_input,
            grad_mu if needs[1] else None,
            grad_log_sigma if needs[2] else None,
            grad_mix_logits if needs[3] else None,
            grad_weight if weight is not None else None,
            grad_bias if ctx.has_bias else None,
            None,
            None,
            None,
        )


class _AllReduce(torch.autograd.Function):
    """Sum over the group; its gradient is the sum over the group of the processes' gradients."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _reference_training(input, mu, log_sigma, mix_logits, weight, bias, eps, group):
    """The reference's training forward with the group's statistics, differentiable by autograd."""
    dtype = reference.compute_dtype(input.dtype)
    x, mu_c, log_sigma_c, mix_logits_c = (t.to(dtype) for t in (input, mu, log_sigma, mix_logits))
    tau = reference.responsibilities(x, mu_c, log_sigma_c, mix_logits_c)
    # About the means, which every process knows; a constant of the sums
    # (statistics_from_sums is exact for any pivot).
    pivot = mu_c.detach().double()
    local_sums = reference.statistics_sums(x.double(), tau.double(), pivot)
    packed = _AllReduce.apply(_packed_with_count(local_sums, input), group)
    mean, var, mass = reference.statistics_from_sums(packed[:-1].view_as(local_sums), pivot)
    out = reference.uan_eval(input, mu, log_sigma, mix_logits, mean.to(dtype), var.to(dtype), weight, bias, eps)
    return out, mean.detach().to(dtype), var.detach().to(dtype), mass.detach().to(dtype), packed[-1].detach()


def sync_uan(
    input: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    update: str = "weight",
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    """:func:`uan_kernels.functional.uan` whose training statistics are those of the whole process group.

    In training, when torch.distributed is initialised and ``process_group``
    (None: the default group) has more than one process, every process calls
    this with its own slice of the global batch (any size, zero included) and
    gets its slice of the output normalised with the global batch's
    statistics; the running estimates (``running_mean``/``running_var``, or
    the mixture buffers of ``update="moving_average"``) are updated from the
    global statistics, identically on every process. Every process of the
    group must call it the same number of times, in the same order (each call
    runs collectives, in the forward and in the backward). Otherwise it is
    :func:`~uan_kernels.functional.uan`.

    The global number of values per channel is read on the host (one
    device-to-host copy per call): the updates need it as a number.
    """
    return sync_uan_and_mixture(input, mu, log_sigma, mix_logits, weight, bias, running_mean, running_var, training,
                                momentum, eps, update, backend, process_group)[0]


def sync_uan_and_mixture(
    input: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    update: str = "weight",
    backend: str = "auto",
    process_group=None,
):
    """:func:`sync_uan`, also returning the mixture it normalised with, as
    :func:`uan_kernels.functional.uan_and_mixture` does."""
    if not (training and synchronizes(process_group)):
        return uan_and_mixture(input, mu, log_sigma, mix_logits, weight, bias, running_mean, running_var, training,
                               momentum, eps, update, backend)
    impl = resolve_call(input, mu, log_sigma, mix_logits, weight, bias, running_mean, running_var, training,
                        momentum, eps, update, backend)
    eps = float(eps)
    # A checkpointed step's recomputation runs the collectives again on every
    # process, but updates nothing.
    updates = not in_backward_recomputation()
    mixture = training_mixture(mu, log_sigma, mix_logits, update, updates)
    if impl.passes is None:
        out, mean, var, mass, count = _reference_training(input, *mixture, weight, bias, eps, process_group)
    else:
        out, mean, var, mass, count = _SyncTraining.apply(input, *mixture, weight, bias, eps, process_group,
                                                          impl.passes)
    num_values = int(count.item())
    # The same count on every process: all raise, or none.
    check_values_per_channel(num_values, "1 value per channel in the whole process group")
    if num_values > 0 and updates:
        # As BatchNorm: an empty (global) batch updates nothing.
        update_estimates_(impl, mu, log_sigma, mix_logits, running_mean, running_var, mean, var, mass, num_values,
                          momentum, update)
    return out, mixture
