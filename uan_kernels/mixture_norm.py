"""Mixture Normalization (MN, Kalayeh & Shah): the UAN transform with an EM-fitted mixture.

SPEC, "Mixture Normalization baseline": each channel is a univariate Gaussian
mixture whose means and scales are per channel and whose mixing weights are
shared by all channels. The mixture is not learned by gradient: it is fitted by
EM on a random subsample of the current batch (k-means++ seeding the first time,
warm-started from the previous fit afterwards), and the batch is then
normalised exactly as UAN's training forward does with those parameters.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from . import _backends
from .functional import check_config, check_inputs, in_backward_recomputation, uan, values_per_channel
from .modules import _check_positive_int
from .reference import compute_dtype

# A component's variance is floored at this fraction of its channel's variance
# (scale-free), and at _MIN_VARIANCE for constant channels, so EM cannot
# collapse a component onto one value (sampling with replacement repeats values).
_REL_VARIANCE_FLOOR = 1e-3
_MIN_VARIANCE = 1e-12
# Mixing weights stay above this so log(lam) and 1/sqrt(lam) remain finite.
_MIN_MIXING_WEIGHT = 1e-8
# A component with less responsibility mass than this (in samples) has no data
# to estimate from; it keeps its previous mean and variance instead of 0/0.
_MIN_MASS = 1e-6


def _sample_values(x: Tensor, num_samples: int) -> Tensor:
    """``(C, n)`` values of ``x`` in the EM compute dtype.

    All values when a channel has at most ``num_samples``; otherwise
    ``num_samples`` positions drawn uniformly with replacement (O(n) memory,
    unlike a permutation of all positions), the same positions for every channel.
    """
    channels = x.shape[1]
    dtype = compute_dtype(x.dtype)
    if values_per_channel(x) <= num_samples:
        return x.transpose(0, 1).reshape(channels, -1).to(dtype)
    # (N, C, P); a view for contiguous and channels_last inputs.
    x3 = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)
    positions = x3.shape[2]
    flat = torch.randint(x3.shape[0] * positions, (num_samples,), device=x.device)
    return x3[flat // positions, :, flat % positions].t().to(dtype)


def _kmeans_pp(values: Tensor, num_components: int) -> Tensor:
    """Greedy k-means++ seeds ``(K, C)``, drawn independently per channel, vectorised over channels.

    Each new seed is the best, by the k-means potential, of ``2 + floor(ln K)``
    candidates drawn with probability proportional to the squared distance to
    the nearest seed so far (Arthur & Vassilvitskii's greedy variant, as in
    scikit-learn): plain k-means++ too often puts two seeds in one cluster,
    which EM with shared weights does not undo. Candidates are drawn by
    inverse-CDF sampling (``searchsorted``), which has no category limit and
    never raises on degenerate (all-zero) rows.
    """
    channels, n = values.shape
    trials = 2 + int(math.log(num_components))
    first = torch.randint(n, (channels, 1), device=values.device)
    seeds = [values.gather(1, first)]
    dist2 = (values - seeds[0]).square()
    for _ in range(num_components - 1):
        cdf = dist2.cumsum(1)
        u = torch.rand(channels, trials, device=values.device, dtype=values.dtype) * cdf[:, -1:]
        candidates = values.gather(1, torch.searchsorted(cdf, u, right=True).clamp_max(n - 1))
        candidate_dist2 = torch.minimum(dist2.unsqueeze(1), (values.unsqueeze(1) - candidates.unsqueeze(2)).square())
        best = candidate_dist2.sum(2).argmin(1, keepdim=True)
        seeds.append(candidates.gather(1, best))
        dist2 = candidate_dist2.gather(1, best.unsqueeze(2).expand(channels, 1, n)).squeeze(1)
    return torch.cat(seeds, 1).t()


def _m_step(
    values: Tensor, tau: Tensor, prev_mean: Tensor, prev_var: Tensor, var_floor: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Maximisation step: per-(k, c) means and variances, mixing weights tied across channels.

    ``values`` is ``(C, n)``, ``tau`` ``(K, C, n)``; returns ``(mean, var, lam)``
    with ``lam_k`` the mean of ``tau_k`` over all channels and samples.
    """
    mass = tau.sum(2)
    denom = mass.clamp_min(_MIN_MASS)
    mean = (tau * values).sum(2) / denom
    var = (tau * (values - mean.unsqueeze(2)).square()).sum(2) / denom
    alive = mass > _MIN_MASS
    mean = torch.where(alive, mean, prev_mean)
    var = torch.maximum(torch.where(alive, var, prev_var), var_floor)
    lam = (mass.sum(1) / tau[0].numel()).clamp_min(_MIN_MIXING_WEIGHT)
    return mean, var, lam / lam.sum()


def _e_step(values: Tensor, mean: Tensor, var: Tensor, lam: Tensor) -> Tensor:
    """Responsibilities ``(K, C, n)`` of the univariate mixture of each channel."""
    diff = values - mean.unsqueeze(2)
    logits = (
        torch.log(lam)[:, None, None] - 0.5 * torch.log(var).unsqueeze(2) - 0.5 * diff.square() / var.unsqueeze(2)
    )
    return torch.softmax(logits, dim=0)


class MixtureNorm(nn.Module):
    r"""Mixture Normalization (Kalayeh & Shah), the EM-fitted baseline of UAN.

    Channel ``c`` is modelled by a K-component univariate Gaussian mixture with
    means ``mu[k, c]``, scales ``exp(log_sigma[k, c])`` and mixing weights
    ``softmax(mix_logits)[k]`` shared by all channels. In training, every
    ``em_every`` steps (the first included) the mixture is refitted by EM on a
    subsample of the detached batch; then the batch is normalised with the
    responsibility-weighted batch statistics of each component (SPEC's training
    forward) and ``running_mean``/``running_var`` follow those statistics by
    momentum. Eval normalises with the running statistics. The mixture is held
    in buffers: no gradient flows through it, while ``x``, ``weight`` and
    ``bias`` get exact gradients.

    EM (per channel, vectorised over channels, no gradient): the first fit seeds
    the K means by greedy k-means++, labels the components of every channel by the
    size of their nearest-seed cluster (largest first, so that component ``k``
    has a similar share in every channel, as the shared weights assume),
    initialises means, variances and weights from that hard assignment, then
    runs ``em_iterations`` EM iterations; later fits start from the current
    buffers. Variances are floored at ``1e-3`` times the channel's sample
    variance.

    Args:
        num_features: ``C`` of an ``(N, C, *S)`` input.
        num_components: ``K``, the number of mixture components.
        eps: added to each component's variance when normalising.
        momentum: ``running = (1 - momentum) * running + momentum * batch_value``.
        affine: learn per-channel ``weight`` and ``bias``.
        em_every: refit the mixture every this many training forwards.
        em_iterations: EM iterations per fit.
        em_samples: values per channel the EM fits (drawn at random with
            replacement, the same positions for all channels; all values when
            a channel has fewer).
        backend: normalisation backend, as for :class:`uan_kernels.UAN`
            (``"auto"``, ``"cpp"``, ``"triton"``, ``"reference"``). EM itself
            is plain PyTorch on the input's device.

    The random subsample and k-means++ seeds use PyTorch's global generator of
    the input's device (seed it with ``torch.manual_seed``).

    Shape: input ``(N, C, *S)`` with any number of trailing dims; output the
    same shape, dtype and memory format. EM computes in float32 (float64 for
    float64 input).
    """

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        em_every: int = 1,
        em_iterations: int = 10,
        em_samples: int = 4096,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_positive_int("num_features", num_features)
        _check_positive_int("num_components", num_components)
        _check_positive_int("em_every", em_every)
        _check_positive_int("em_iterations", em_iterations)
        _check_positive_int("em_samples", em_samples)
        check_config(eps, momentum, "weight")
        if not isinstance(affine, bool):
            raise ValueError(f"affine must be a bool, got {affine!r}")
        _backends.check_available(backend)
        _backends.check_components(backend, num_components)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.em_every = em_every
        self.em_iterations = em_iterations
        self.em_samples = em_samples
        self.backend = backend

        self.register_buffer("mu", torch.empty(num_components, num_features, **factory))
        self.register_buffer("log_sigma", torch.empty(num_components, num_features, **factory))
        self.register_buffer("mix_logits", torch.empty(num_components, **factory))
        self.register_buffer("running_mean", torch.empty(num_components, num_features, **factory))
        self.register_buffer("running_var", torch.empty(num_components, num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        # Whether the mixture holds an EM fit: decides k-means++ seeding vs warm start.
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running statistics to ``(0, 1)`` and the training-step counter to 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unfitted mixture (means evenly spaced in ``[-1, 1]``, unit scales,
        equal weights; the next fit seeds by k-means++), ``weight = 1``, ``bias = 0``."""
        self.reset_running_stats()
        grid = torch.linspace(-1.0, 1.0, self.num_components) if self.num_components > 1 else torch.zeros(1)
        self.mu.copy_(grid.unsqueeze(1).expand_as(self.mu))
        self.log_sigma.zero_()
        self.mix_logits.zero_()
        self.fitted.fill_(False)
        if self.affine:
            self.weight.fill_(1.0)
            self.bias.zero_()

    def _check_input(self, input: Tensor, training: bool) -> None:
        """Every check the normalisation would make, done before EM touches anything."""
        check_config(self.eps, self.momentum, "weight")
        _backends.check_backend_name(self.backend)
        check_inputs(input, self.mu, self.log_sigma, self.mix_logits, self.weight, self.bias,
                     self.running_mean, self.running_var)
        if training and values_per_channel(input) < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
            )

    @torch.no_grad()
    def _fit(self, input: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """EM fit on a subsample of ``input``; returns new ``(mu, log_sigma, mix_logits)``
        in the buffers' dtype without storing them."""
        values = _sample_values(input.detach(), self.em_samples)
        var_floor = (_REL_VARIANCE_FLOOR * values.var(1, unbiased=False)).clamp_min(_MIN_VARIANCE)
        if bool(self.fitted):
            mean = self.mu.to(values.dtype)
            var = torch.exp(2.0 * self.log_sigma.to(values.dtype)).clamp_min(var_floor)
            lam = torch.softmax(self.mix_logits.to(values.dtype), dim=0)
        else:
            seeds = _kmeans_pp(values, self.num_components)
            nearest = (values - seeds.unsqueeze(2)).square().argmin(0)
            hard = (nearest == torch.arange(self.num_components, device=values.device)[:, None, None])
            hard = hard.to(values.dtype)
            # Seeds come in a random order per channel, but the mixing weights are
            # shared: label components by cluster size, largest first, in every channel.
            order = torch.argsort(hard.sum(2), dim=0, descending=True, stable=True)
            seeds = seeds.gather(0, order)
            hard = hard.gather(0, order.unsqueeze(2).expand_as(hard))
            # An empty seed cluster (duplicate seeds) falls back to the seed and the channel variance.
            mean, var, lam = _m_step(values, hard, seeds, values.var(1, unbiased=False).expand_as(seeds), var_floor)
        for _ in range(self.em_iterations):
            tau = _e_step(values, mean, var, lam)
            mean, var, lam = _m_step(values, tau, mean, var, var_floor)
        dtype = self.mu.dtype
        return mean.to(dtype), (0.5 * torch.log(var)).to(dtype), torch.log(lam).to(dtype)

    @torch.no_grad()
    def _store(self, mu: Tensor, log_sigma: Tensor, mix_logits: Tensor) -> None:
        self.mu.copy_(mu)
        self.log_sigma.copy_(log_sigma)
        self.mix_logits.copy_(mix_logits)
        self.fitted.fill_(True)

    def fit_mixture(self, input: Tensor) -> None:
        """Fit the mixture buffers to ``input`` by EM (no normalisation).

        Seeds by k-means++ when the module has never been fitted, otherwise
        warm-starts from the current buffers. Leaves the running statistics and
        the step counter alone; the training forward calls the same EM.
        """
        self._check_input(input, training=True)
        self._store(*self._fit(input))

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input``; in training, first refit the mixture when due.

        The input is validated before EM runs, and the new fit, the running
        statistics and the step counter are written only once the normalisation
        has succeeded, so a raised error leaves every buffer unchanged.
        """
        self._check_input(input, self.training)
        if not self.training or in_backward_recomputation():
            # A checkpointed step's recomputation normalises with the fit its
            # first forward stored, and refits and counts nothing.
            return self._normalize(input, self.mu, self.log_sigma, self.mix_logits, training=self.training)
        refit = not bool(self.fitted) or int(self.num_batches_tracked) % self.em_every == 0
        mixture = self._fit(input) if refit else (self.mu, self.log_sigma, self.mix_logits)
        out = self._normalize(input, *mixture, training=True)
        # Stored only once the normalisation has succeeded, so an error leaves every buffer as it was.
        if refit:
            self._store(*mixture)
        self.num_batches_tracked.add_(1)
        return out

    def _normalize(self, input: Tensor, mu: Tensor, log_sigma: Tensor, mix_logits: Tensor, training: bool) -> Tensor:
        return uan(
            input,
            mu,
            log_sigma,
            mix_logits,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=training,
            momentum=self.momentum,
            eps=self.eps,
            update="weight",
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_components={self.num_components}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, em_every={self.em_every}, "
            f"em_iterations={self.em_iterations}, em_samples={self.em_samples}, backend={self.backend!r}"
        )
