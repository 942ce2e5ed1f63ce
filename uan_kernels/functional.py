"""Functional UAN, for users who hold their own parameters and buffers.

``uan`` mirrors ``torch.nn.functional.batch_norm``: it normalises, and in
training updates the running estimates in place (under ``no_grad``, only after
the forward has succeeded, so a raised error leaves every buffer untouched).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backends
from . import reference as reference_module

UPDATE_MODES = ("weight", "moving_average")
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Floors for the moving-average buffers, so an emptied component keeps finite
# logits (log of 0 would be -inf and poison the softmax's max).
_MIN_MIXING_WEIGHT = 1e-12
_MIN_VARIANCE = 1e-12


def check_config(eps: float, momentum: float, update: str) -> None:
    """Validate the scalar options shared by the functional and module forms."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not math.isfinite(momentum)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if update not in UPDATE_MODES:
        raise ValueError(f"unknown update {update!r}; expected one of {UPDATE_MODES}")


def _check_tensor(name: str, t: Tensor, shape: tuple, device: torch.device, dtype: torch.dtype) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but mu has dtype {dtype}; all parameters must share one dtype")


def check_inputs(
    input: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
) -> None:
    """Shapes, devices and dtypes of a UAN call; raises with a clear message."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"UAN expects input of shape (N, C, *S) with at least 2 dims, got shape {tuple(input.shape)}")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"UAN input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if not isinstance(mu, Tensor) or mu.dim() != 2:
        raise ValueError(f"mu must be a (K, C) tensor, got {getattr(mu, 'shape', mu)!r}")
    num_components, channels = mu.shape
    if num_components < 1:
        raise ValueError("UAN needs at least one mixture component (K >= 1)")
    if input.shape[1] != channels:
        raise ValueError(
            f"input has {input.shape[1]} channels (dim 1 of shape {tuple(input.shape)}) but the mixture has {channels}"
        )
    param_dtype = mu.dtype
    if param_dtype != input.dtype and not (
        param_dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)
    ):
        raise TypeError(
            f"parameters have dtype {param_dtype} but input has {input.dtype}; parameters must match the input, "
            "or be float32 for float16/bfloat16 input"
        )
    _check_tensor("mu", mu, (num_components, channels), input.device, param_dtype)
    _check_tensor("log_sigma", log_sigma, (num_components, channels), input.device, param_dtype)
    _check_tensor("mix_logits", mix_logits, (num_components,), input.device, param_dtype)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(name, t, (channels,), input.device, param_dtype)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            _check_tensor(name, t, (num_components, channels), input.device, param_dtype)


def values_per_channel(input: Tensor) -> int:
    return input.numel() // input.shape[1] if input.shape[1] else 0


@torch.no_grad()
def _ema_(buffers: Sequence[Tensor], batch_values: Sequence[Tensor], momentum: float) -> None:
    """``buffer <- (1 - momentum) buffer + momentum batch_value`` for each pair, in one multi-tensor launch."""
    torch._foreach_lerp_(list(buffers), [v.to(b.dtype) for b, v in zip(buffers, batch_values)], momentum)


@torch.no_grad()
def moving_average_update_(
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    mean: Tensor,
    var: Tensor,
    mass: Tensor,
    values_per_channel: int,
    momentum: float,
) -> None:
    """One online EM step (SPEC, update="moving_average"), in plain PyTorch.

    The reference for ``torch.ops.uan.moving_average_update_``, which the
    compiled backends call instead (one launch instead of about twenty).

    ``lam <- (1-m) lam + m mean_i(tau_ik)`` over all elements of all channels,
    ``mu <- (1-m) mu + m mean_k``, ``sigma^2 <- (1-m) sigma^2 + m var_k``,
    stored back as ``mix_logits = log(lam)`` and ``log_sigma = log(sigma^2) / 2``.
    All new values are computed before any buffer is written. ``lam`` is shared
    by all channels, so a channel whose statistics are not finite (a NaN or
    inf in its input) is left out of its update, as BatchNorm confines such a
    value to its own channel; with no finite channel ``lam`` keeps its value.
    """
    lam = torch.softmax(mix_logits.double(), dim=0)
    # A NaN or inf input makes every responsibility of its element NaN, hence
    # its channel's mass in every component: nansum leaves those channels out.
    # With none finite, batch_lam is 0 and lam only shrinks by (1 - momentum),
    # which softmax(mix_logits) undoes: lam keeps its value.
    channel_mass = mass.double()
    finite_channels = torch.isfinite(channel_mass[0]).sum().clamp_min(1)
    batch_lam = channel_mass.nansum(1) / (finite_channels * values_per_channel)
    new_lam = torch.lerp(lam, batch_lam, momentum).clamp_min(_MIN_MIXING_WEIGHT)
    sigma2 = torch.exp(2.0 * log_sigma.double())
    new_sigma2 = torch.lerp(sigma2, var.double(), momentum).clamp_min(_MIN_VARIANCE)
    new_mu = torch.lerp(mu.double(), mean.double(), momentum)
    mix_logits.copy_(torch.log(new_lam))
    log_sigma.copy_(0.5 * torch.log(new_sigma2))
    mu.copy_(new_mu)


def resolve_call(
    input: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    update: str,
    backend: str,
):
    """Every check of a UAN call but the count of values per channel; returns the backend that runs it."""
    if not torch.compiler.is_compiling():
        # Plain Python checks of Python numbers: under torch.compile eps and
        # momentum may be symbolic, and the operators check eps themselves.
        check_config(eps, momentum, update)
    _backends.check_backend_name(backend)
    check_inputs(input, mu, log_sigma, mix_logits, weight, bias, running_mean, running_var)
    if update == "moving_average" and running_mean is not None:
        raise ValueError("update='moving_average' keeps its statistics in mu and log_sigma; pass no running_mean/var")
    if update == "moving_average" and any(t.requires_grad for t in (mu, log_sigma, mix_logits)) and training:
        raise ValueError("update='moving_average' updates mu, log_sigma and mix_logits in place; they must not require grad")
    _backends.check_components(backend, mu.shape[0])
    return _backends.resolve(
        "reference" if mu.shape[0] > _backends.MAX_FUSED_COMPONENTS else backend, input.device
    )


def check_values_per_channel(num_values: int, what: str) -> None:
    """BatchNorm's error for a training batch with one value per channel (``what`` says where it was counted)."""
    if num_values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {what}")


def in_backward_recomputation() -> bool:
    """Whether this call runs inside a backward pass, as the recomputed forward
    of activation checkpointing does (``torch.utils.checkpoint``, reentrant or
    not). A training forward there updates no running estimate: the first
    forward of the step already has. False while ``torch.compile`` traces (the
    answer would be frozen into the graph)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def training_mixture(mu: Tensor, log_sigma: Tensor, mix_logits: Tensor, update: str, updates: bool):
    """The mixture a training forward runs with: a copy when the update (``updates``) rewrites the buffers
    afterwards."""
    if updates and update == "moving_average":
        # The update rewrites the buffers in place; autograd must see the
        # mixture this forward used. An arithmetic copy, not clone():
        # torch.compile drops a clone of an input it later mutates and would
        # hand the backward the updated buffers. One multi-tensor launch.
        return tuple(torch._foreach_add((mu, log_sigma, mix_logits), 0))
    return mu, log_sigma, mix_logits


def update_estimates_(
    impl,
    mu: Tensor,
    log_sigma: Tensor,
    mix_logits: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    mass: Tensor,
    num_values: int,
    momentum: float,
    update: str,
) -> None:
    """After a training forward with statistics ``(mean, var, mass)`` of ``num_values`` values per channel:
    the running statistics' momentum step (``update="weight"``) or the online EM step of the mixture."""
    if update == "weight" and running_mean is not None:
        _ema_((running_mean, running_var), (mean.detach(), var.detach()), momentum)
    elif update == "moving_average":
        step = (
            torch.ops.uan.moving_average_update_
            if impl.module is not reference_module and _backends.has_fused_moving_average_update(mu.device)
            else moving_average_update_
        )
        step(mu, log_sigma, mix_logits, mean.detach(), var.detach(), mass.detach(), num_values, momentum)


def uan(
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
) -> Tensor:
    """Unsupervised Adaptive Normalization of ``input`` (SPEC.md).

    Args:
        input: ``(N, C, *S)`` tensor, float16/bfloat16/float32/float64, any memory format.
        mu, log_sigma: ``(K, C)`` component means and log-scales.
        mix_logits: ``(K,)``; the mixing weights are ``softmax(mix_logits)``.
        weight, bias: optional ``(C,)`` affine parameters.
        running_mean, running_var: optional ``(K, C)`` running statistics
            (``update="weight"`` only); updated in place when ``training``.
        training: use batch statistics and update the running estimates.
        momentum: BatchNorm's convention, ``new = (1 - m) * old + m * batch``.
        eps: added to every component variance.
        update: ``"weight"`` (mixture parameters learned by gradient) or
            ``"moving_average"`` (``mu``, ``log_sigma``, ``mix_logits`` are
            buffers updated in place by one online EM step per training call;
            eval normalises with ``(mu, exp(2 * log_sigma))``).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.

    Statistics are used as in ``F.batch_norm``: batch statistics in training,
    and in eval the running statistics (``update="weight"``; batch statistics
    if none are given) or the mixture itself (``update="moving_average"``).
    A training call inside a backward pass (activation checkpointing's
    recomputation, see :func:`in_backward_recomputation`) updates nothing.
    """
    return uan_and_mixture(input, mu, log_sigma, mix_logits, weight, bias, running_mean, running_var, training,
                           momentum, eps, update, backend)[0]


def uan_and_mixture(
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
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """:func:`uan`, also returning the ``(mu, log_sigma, mix_logits)`` the
    normalisation used: in a moving-average training step that updates the
    buffers, copies taken before the update (what a recomputation of this
    step must normalise with); otherwise the arguments themselves."""
    impl = resolve_call(input, mu, log_sigma, mix_logits, weight, bias, running_mean, running_var, training,
                        momentum, eps, update, backend)
    num_values = values_per_channel(input)
    if training:
        check_values_per_channel(num_values, f"input size {tuple(input.shape)}")
    eps = float(eps)

    mixture = (mu, log_sigma, mix_logits)
    if training and num_values == 0:
        # As BatchNorm: an empty batch gives an empty output and updates nothing.
        return impl.train(input, *mixture, weight, bias, eps)[0], mixture
    if training or (update == "weight" and running_mean is None):
        # (Outside training only update="weight" gets here.)
        updates = training and not in_backward_recomputation()
        mixture = training_mixture(mu, log_sigma, mix_logits, update, updates)
        out, mean, var, mass = impl.train(input, *mixture, weight, bias, eps)
        if updates:
            update_estimates_(impl, mu, log_sigma, mix_logits, running_mean, running_var, mean, var, mass,
                              num_values, momentum, update)
        return out, mixture
    if update == "weight":
        stat_mean, stat_var = running_mean, running_var
    elif hasattr(impl, "eval_mixture"):
        return impl.eval_mixture(input, *mixture, weight, bias, eps), mixture
    else:
        stat_mean, stat_var = mu.detach(), torch.exp(2.0 * log_sigma.detach())
    return impl.eval(input, *mixture, stat_mean, stat_var, weight, bias, eps), mixture
