"""``nn.Module`` front ends: :class:`UAN`, :class:`SyncUAN` and :func:`convert_batchnorm`."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backends
from .functional import check_config, in_backward_recomputation, uan_and_mixture
from .sync import sync_uan_and_mixture

SIGMA_INITS = ("authors", "paper")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _storable(t: Tensor) -> bool:
    """Whether ``t`` may outlive this call: not a torch.func transform's
    wrapper, which is dead once the transform returns (checkpointing cannot
    run under those transforms, so nothing would read it)."""
    return torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(t)


class UAN(nn.Module):
    r"""Unsupervised Adaptive Normalization: a drop-in for ``nn.BatchNorm1d/2d/3d``.

    Each channel is modelled by a K-component univariate Gaussian mixture with
    means ``mu[k, c]``, scales ``exp(log_sigma[k, c])`` and channel-shared
    mixing weights ``softmax(mix_logits)[k]``. Every element is normalised by
    the responsibility-weighted statistics of each component:

    .. math::
        y = \sum_k \frac{\tau_k}{\sqrt{\lambda_k}} \frac{x - m_k}{\sqrt{v_k + \epsilon}},
        \qquad out = \gamma y + \beta

    Args:
        num_features: ``C`` of an ``(N, C, *S)`` input.
        num_components: ``K``, the number of mixture components.
        update: ``"weight"``: ``mu``, ``log_sigma``, ``mix_logits`` are
            parameters trained by gradient, and ``running_mean``/``running_var``
            track the batch statistics for eval. ``"moving_average"``: they are
            buffers updated by one online EM step per training forward, and
            eval normalises with ``(mu, sigma^2)``.
        eps: added to each component's variance.
        momentum: ``new = (1 - momentum) * old + momentum * batch_value``.
        affine: learn per-channel ``weight`` and ``bias``.
        track_running_stats: ``update="weight"`` only; when False there are no
            running statistics and eval uses batch statistics, as in BatchNorm.
        backend: ``"auto"`` (compiled C++/CUDA extension), ``"cpp"``,
            ``"triton"`` or ``"reference"`` (pure PyTorch).
        sigma_init: ``"authors"``: ``sigma^2 = softplus(U(0.001, 0.01))``
            (about 0.69, as the authors' code); ``"paper"``: ``sigma ~ U(0.001, 0.01)``.

    Shape: input ``(N, C, *S)`` with any number of trailing dims; output the
    same shape, dtype and memory format.
    """

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        *,
        update: str = "weight",
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        backend: str = "auto",
        sigma_init: str = "authors",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_positive_int("num_features", num_features)
        _check_positive_int("num_components", num_components)
        check_config(eps, momentum, update)
        _backends.check_available(backend)
        if sigma_init not in SIGMA_INITS:
            raise ValueError(f"unknown sigma_init {sigma_init!r}; expected one of {SIGMA_INITS}")
        if update == "moving_average" and not track_running_stats:
            raise ValueError(
                "track_running_stats=False applies to update='weight' only: in moving-average mode "
                "the mixture buffers are the running estimates"
            )
        _backends.check_components(backend, num_components)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_components = num_components
        self.update = update
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        self.sigma_init = sigma_init

        shapes = {"mu": (num_components, num_features), "log_sigma": (num_components, num_features),
                  "mix_logits": (num_components,)}
        for name, shape in shapes.items():
            if update == "weight":
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
            else:
                self.register_buffer(name, torch.empty(shape, **factory))
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if update == "weight" and track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_components, num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_components, num_features, **factory))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        self.reset_parameters()
        # The mixture the last training forward normalised with (moving-average
        # mode: copies taken before its EM step), for checkpointing's recomputation.
        self._mixture_of_last_step: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    def reset_running_stats(self) -> None:
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SPEC initialisation: ``mu ~ U(-1, 1)``, ``lam = u / sum(u)`` with
        ``u ~ U(0.01, 0.99)``, ``sigma`` by ``sigma_init``, ``weight = 1``, ``bias = 0``."""
        self.reset_running_stats()
        self.mu.uniform_(-1.0, 1.0)
        u = torch.empty_like(self.mix_logits).uniform_(0.01, 0.99)
        self.mix_logits.copy_(torch.log(u / u.sum()))
        draw = torch.empty_like(self.log_sigma).uniform_(0.001, 0.01)
        if self.sigma_init == "authors":
            self.log_sigma.copy_(0.5 * torch.log(F.softplus(draw)))
        else:
            self.log_sigma.copy_(torch.log(draw))
        if self.affine:
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input``; in training, update the running estimates.

        Under activation checkpointing the recomputed training forward, which
        runs inside the backward pass, normalises with the mixture the step's
        first forward used and updates nothing, so both give the gradients
        and estimates of no checkpointing.
        """
        mixture = (self.mu, self.log_sigma, self.mix_logits)
        recomputation = self.training and in_backward_recomputation()
        if recomputation and self.update == "moving_average" and self._mixture_of_last_step is not None:
            mixture = self._mixture_of_last_step
        out, used = self._normalize_and_mixture(input, mixture)
        if self.training and self.update == "moving_average" and not recomputation and _storable(used[0]):
            self._mixture_of_last_step = tuple(t.detach() for t in used)
        return out

    def _normalize_and_mixture(self, input: Tensor, mixture: Tuple[Tensor, Tensor, Tensor]):
        """The normalisation with ``mixture``, and the mixture it used (functional.uan_and_mixture)."""
        return uan_and_mixture(
            input,
            *mixture,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            update=self.update,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_components={self.num_components}, update={self.update!r}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, backend={self.backend!r}"
        )


class SyncUAN(UAN):
    r"""UAN whose training statistics are those of the whole ``torch.distributed`` process group.

    What ``nn.SyncBatchNorm`` is to BatchNorm: in training, each process
    normalises its slice of the global batch with the statistics of the whole
    global batch (their sums are all-reduced over ``process_group``, once in
    the forward and once in the backward), the running estimates are updated
    from the global statistics, identically on every process, and the
    gradients of the parameters on each process are its share of the global
    batch's gradient (DistributedDataParallel sums them). Processes may hold
    batches of different sizes, including empty ones, but every process of the
    group must run the layer at each step. In eval, or when torch.distributed
    is not initialised or the group has one process, it is :class:`UAN`.

    Args:
        process_group: the group whose statistics are shared (None: the
            default group, as ``nn.SyncBatchNorm``).
        Everything else as :class:`UAN`.
    """

    def __init__(self, num_features: int, num_components: int = 3, *, process_group=None, **uan_kwargs) -> None:
        super().__init__(num_features, num_components, **uan_kwargs)
        self.process_group = process_group

    def _normalize_and_mixture(self, input: Tensor, mixture: Tuple[Tensor, Tensor, Tensor]):
        return sync_uan_and_mixture(
            input,
            *mixture,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            update=self.update,
            backend=self.backend,
            process_group=self.process_group,
        )

    @classmethod
    def convert_sync_uan(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every :class:`UAN` layer of ``module`` by a :class:`SyncUAN` on ``process_group``.

        As ``nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers have the
        same configuration and hold the same parameter and buffer tensors (an
        optimizer built before still updates them) and training mode.
        ``module`` itself is modified and returned; a bare UAN is returned replaced.
        """
        if isinstance(module, UAN):
            layer = cls(
                module.num_features, module.num_components, update=module.update, eps=module.eps,
                momentum=module.momentum, affine=module.affine, track_running_stats=module.track_running_stats,
                backend=module.backend, sigma_init=module.sigma_init, process_group=process_group,
                device=module.mu.device, dtype=module.mu.dtype,
            )
            for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
                setattr(layer, name, tensor)
            layer.train(module.training)
            return layer
        for name, child in module.named_children():
            setattr(module, name, cls.convert_sync_uan(child, process_group))
        return module

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, process_group={self.process_group}"


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_batchnorm(module: nn.Module, **uan_kwargs) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a :class:`UAN` of the same width.

    The new layers take the BatchNorm's ``eps``, ``momentum`` (when a float),
    ``affine``, device and dtype unless ``uan_kwargs`` says otherwise; the
    BatchNorm's learned ``weight``/``bias`` are copied. An ``nn.SyncBatchNorm``
    becomes a :class:`SyncUAN` on its process group. ``module`` itself is
    modified and returned; a bare BatchNorm is returned replaced.
    """
    if isinstance(module, _BATCHNORMS):
        kwargs = {"eps": module.eps, "affine": module.affine}
        if isinstance(module.momentum, float):
            kwargs["momentum"] = module.momentum
        ref = module.weight if module.weight is not None else module.running_mean
        if ref is not None:
            kwargs.update(device=ref.device, dtype=ref.dtype)
        layer_type = UAN
        if isinstance(module, nn.SyncBatchNorm):
            layer_type = SyncUAN
            kwargs["process_group"] = module.process_group
        kwargs.update(uan_kwargs)
        layer = layer_type(module.num_features, **kwargs)
        if module.affine and layer.affine:
            with torch.no_grad():
                layer.weight.copy_(module.weight)
                layer.bias.copy_(module.bias)
        layer.train(module.training)
        return layer
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, **uan_kwargs))
    return module
