"""Mixture Normalization (MN, Kalayeh & Shah): the UAN transform with an EM-fitted mixture.

SPEC, "Mixture Normalization baseline": each channel is a univariate Gaussian
mixture whose means and scales are per channel and whose mixing weights are
shared by all channels. The mixture is not learned by gradient: it is fitted by
EM on a random subsample of the current batch, or on all of it (k-means++
seeding the first time, warm-started from the previous fit afterwards), and the
batch is then normalised exactly as UAN's training forward does with those
parameters.

An EM iteration needs, per (k, c), the responsibility mass and the
responsibility-weighted sum and sum of squares: exactly the sums of UAN's
fused statistics pass for the current mixture. On the fused backends each
iteration is therefore one statistics pass over the EM's values plus O(K*C)
float64 updates (:func:`_fused_em`); the plain-PyTorch EM (:func:`_plain_em`,
over ``(K, C, n)`` temporaries) is the definition it is tested against and
the EM of the reference backend.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _backends, reference
from .functional import check_config, check_inputs, in_backward_recomputation, uan, values_per_channel
from .modules import _check_positive_int
from .reference import compute_dtype

# A backend's fused statistics pass: (input, mu, log_sigma, mix_logits) -> float64
# (3, K, C) sums of tau, tau (x - mu) and tau (x - mu)^2 (uan_kernels.ops.statistics).
StatisticsPass = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

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


def _em_input(x: Tensor, num_samples: Optional[int]) -> Tensor:
    """The values EM fits, as an ``(N, C, *S)`` input of the statistics pass.

    ``x`` itself when ``num_samples`` is None or a channel has at most
    ``num_samples`` values; otherwise a contiguous ``(1, C, num_samples)``
    tensor of positions drawn uniformly with replacement (O(n) memory, unlike a
    permutation of all positions), the same positions for every channel, in
    increasing order of position. Each channel's sample is contiguous: the
    statistics pass runs along it at the per-element speed of a full batch (it
    is slower across channels-inner rows).
    """
    if num_samples is None or values_per_channel(x) <= num_samples:
        return x
    channels = x.shape[1]
    flat = torch.randint(values_per_channel(x), (num_samples,), device=x.device)
    if _backends.has_em_helpers(x.device):
        return torch.ops.uan.gather_samples(x, flat)
    x3 = x.reshape(x.shape[0], channels, -1)  # (N, C, P): a view for contiguous and channels_last inputs
    positions = x3.shape[2]
    # In increasing order, so that the gather walks each channel's plane forward.
    flat = flat.sort().values
    batch, position = flat // positions, flat % positions
    if x3.is_contiguous():
        # One gather of (C, n) offsets into the flat input (cheaper than indexing),
        # int32 when they fit: half the index bytes to write and read.
        index_dtype = torch.int32 if x.numel() < 2**31 else torch.int64
        first = (batch * (channels * positions) + position).to(index_dtype)
        offsets = first + torch.arange(0, channels * positions, positions, device=x.device,
                                       dtype=index_dtype).unsqueeze(1)
        return x3.view(-1).index_select(0, offsets.view(-1)).view(1, channels, num_samples)
    return x3[batch, :, position].t().contiguous().unsqueeze(0)


def _variance_floor(channel_var: Tensor) -> Tensor:
    """Per-channel floor of the components' variances, from the channel variances."""
    return (_REL_VARIANCE_FLOOR * channel_var).clamp_min(_MIN_VARIANCE)


def _channel_values(data: Tensor) -> Tensor:
    """``(C, n)`` values of an EM input in the EM compute dtype (a view of a ``(1, C, n)`` sample)."""
    return data.transpose(0, 1).reshape(data.shape[1], -1).to(compute_dtype(data.dtype))


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


def _initial_fit(values: Tensor, channel_var: Tensor, var_floor: Tensor,
                 num_components: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Starting point of a first fit: ``(mean, var, lam)`` of the hard nearest-seed
    assignment of ``(C, n)`` values to greedy k-means++ seeds.

    Seeds come in a random order per channel, but the mixing weights are shared:
    components are labelled by the size of their cluster, largest first, in every
    channel. An empty cluster (duplicate seeds) falls back to its seed and the
    channel variance.
    """
    seeds = _kmeans_pp(values, num_components)
    nearest = (values - seeds.unsqueeze(2)).square().argmin(0)
    hard = (nearest == torch.arange(num_components, device=values.device)[:, None, None]).to(values.dtype)
    order = torch.argsort(hard.sum(2), dim=0, descending=True, stable=True)
    seeds = seeds.gather(0, order)
    hard = hard.gather(0, order.unsqueeze(2).expand_as(hard))
    return _m_step(values, hard, seeds, channel_var.expand_as(seeds), var_floor)


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


def _plain_em(values: Tensor, mean: Tensor, var: Tensor, lam: Tensor, var_floor: Tensor,
              iterations: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``iterations`` EM iterations in plain PyTorch on ``(C, n)`` values: the definition
    the fused EM is tested against, and the EM of the reference backend."""
    for _ in range(iterations):
        tau = _e_step(values, mean, var, lam)
        mean, var, lam = _m_step(values, tau, mean, var, var_floor)
    return mean, var, lam


def _channel_variance_from_sums(sums: Tensor, pivot: Tensor, count: int) -> Tensor:
    """Biased variance ``(C,)`` of each channel's ``count`` values from an E-step's
    ``(3, K, C)`` sums about ``pivot`` (any mixture: ``sum_k tau_k = 1`` for every value).

    About the channel mean ``m``: ``sum_k [T2_k + 2 (p_k - m) T1_k + (p_k - m)^2 S_k]``,
    each component's term being ``sum tau_k (x - m)^2 >= 0``.
    """
    mass, shifted_sum, shifted_square_sum = sums.unbind(0)
    offset = pivot - (torch.addcmul(shifted_sum, mass, pivot).sum(0) / count)
    return torch.addcmul(shifted_square_sum, offset, torch.addcmul(2.0 * shifted_sum, offset, mass)).sum(0) / count


def _m_step_from_sums(sums: Tensor, pivot: Tensor, prev_mean: Tensor, prev_var: Tensor, var_floor: Tensor,
                      min_weight: float, min_mass: float = _MIN_MASS) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`_m_step` from the E-step's float64 ``(3, K, C)`` sums about ``pivot``.

    ``sums`` holds ``sum tau``, ``sum tau (x - pivot)`` and ``sum tau (x - pivot)^2``
    per (k, c). The same rules as the plain M-step, on ``(K, C)`` tensors: a
    component with at most ``min_mass`` keeps its previous mean and variance,
    variances are floored, mixing weights are pooled over channels. Returns
    ``(mean, var, weight)`` with ``weight_k = max(sum_c mass_kc, min_weight)``:
    the plain M-step's ``lam`` times the number of values (``min_weight`` is
    ``_MIN_MIXING_WEIGHT`` times it), not normalised, as ``softmax(log(weight))``
    is ``lam``. Few tensor ops: each costs microseconds whatever its size.
    """
    mass, shifted_sum, shifted_square_sum = sums.unbind(0)
    alive = mass > min_mass
    denom = mass.clamp_min(min_mass)
    shift = shifted_sum / denom
    # sum tau (x - m)^2 / S with m = pivot + shift, from the sums about the pivot.
    var = torch.addcmul(shifted_square_sum / denom, shift, shift, value=-1.0)
    mean = torch.where(alive, shift.add_(pivot), prev_mean)
    var = torch.maximum(torch.where(alive, var, prev_var), var_floor)
    return mean, var, mass.sum(1).clamp_min_(min_weight)


# An M-step from the statistics pass's sums that also returns the next pass's
# parameters: (sums, pivot, prev_mean, prev_var, var_floor, min_mass, min_weight)
# -> (mean, var, weight, mu, log_sigma, mix_logits), as uan::em_m_step.
MStep = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float, float], Tuple[Tensor, ...]]


def _m_step_and_parameters(sums: Tensor, pivot: Tensor, prev_mean: Tensor, prev_var: Tensor, var_floor: Tensor,
                           min_mass: float, min_weight: float) -> Tuple[Tensor, ...]:
    """``uan::em_m_step`` in PyTorch: :func:`_m_step_from_sums` and the next pass's
    ``(mu, log_sigma, mix_logits)`` in ``pivot``'s dtype (the M-step on devices without the C++ op)."""
    mean, var, weight = _m_step_from_sums(sums, pivot.to(torch.float64), prev_mean, prev_var, var_floor, min_weight,
                                          min_mass)
    dtype = pivot.dtype
    return mean, var, weight, mean.to(dtype), torch.log(var).mul_(0.5).to(dtype), torch.log(weight).to(dtype)


def _m_step_for(device: torch.device) -> MStep:
    """The C++ M-step (one call instead of about twenty small tensor ops) where it runs, else PyTorch's."""
    return torch.ops.uan.em_m_step if _backends.has_em_helpers(device) else _m_step_and_parameters


def _fused_em(statistics: StatisticsPass, data: Tensor, mean: Tensor, var: Tensor, lam: Tensor,
              var_floor: Optional[Tensor], iterations: int,
              param_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """``iterations`` EM iterations, each one statistics pass over ``data`` (the E-step and
    the sums of the M-step) and one M-step on O(K*C) float64 values; returns float64 ``(mean, var, lam)``.

    ``statistics(data, mu, log_sigma, mix_logits)`` is a backend's fused pass, called
    with the mixture in ``param_dtype``; its sums are about that ``mu``. A
    ``var_floor`` of None is taken from the channel variances that the first
    E-step's sums give (:func:`_channel_variance_from_sums`), with no pass of its own.
    """
    mean, var, weight = (t.to(torch.float64) for t in (mean, var, lam))
    var_floor = None if var_floor is None else var_floor.to(torch.float64)
    count = values_per_channel(data)
    min_weight = _MIN_MIXING_WEIGHT * count * data.shape[1]
    m_step = _m_step_for(data.device)
    mu = mean.to(param_dtype)
    log_sigma = torch.log(var).mul_(0.5).to(param_dtype)
    mix_logits = torch.log(weight).to(param_dtype)
    for _ in range(iterations):
        sums = statistics(data, mu, log_sigma, mix_logits)
        if var_floor is None:
            var_floor = _variance_floor(_channel_variance_from_sums(sums, mu.to(torch.float64), count))
        mean, var, weight, mu, log_sigma, mix_logits = m_step(sums, mu, mean, var, var_floor, _MIN_MASS, min_weight)
    return mean, var, weight / weight.sum()


class MixtureNorm(nn.Module):
    r"""Mixture Normalization (Kalayeh & Shah), the EM-fitted baseline of UAN.

    Channel ``c`` is modelled by a K-component univariate Gaussian mixture with
    means ``mu[k, c]``, scales ``exp(log_sigma[k, c])`` and mixing weights
    ``softmax(mix_logits)[k]`` shared by all channels. In training, every
    ``em_every`` steps (the first included) the mixture is refitted by EM on a
    subsample of the detached batch (or on all of it); then the batch is
    normalised with the responsibility-weighted batch statistics of each
    component (SPEC's training forward) and ``running_mean``/``running_var``
    follow those statistics by momentum. Eval normalises with the running
    statistics. The mixture is held in buffers: no gradient flows through it,
    while ``x``, ``weight`` and ``bias`` get exact gradients.

    EM (per channel, vectorised over channels, no gradient): the first fit seeds
    the K means by greedy k-means++, labels the components of every channel by the
    size of their nearest-seed cluster (largest first, so that component ``k``
    has a similar share in every channel, as the shared weights assume),
    initialises means, variances and weights from that hard assignment, then
    runs ``em_iterations`` EM iterations; later fits start from the current
    buffers. Variances are floored at ``1e-3`` times the channel's variance
    over the values EM fits; a component with no responsibility mass keeps its
    previous mean and variance. On the fused backends an EM iteration is one
    pass of the backend's statistics operator over the values EM fits (the
    batch itself when it fits whole: no copy) and O(K*C) float64 updates; on
    the reference backend it is plain PyTorch over ``(K, C, n)`` temporaries.

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
            a channel has fewer). ``None``: every value of the batch.
        backend: normalisation backend, as for :class:`uan_kernels.UAN`
            (``"auto"``, ``"cpp"``, ``"triton"``, ``"reference"``); EM runs on
            the same backend's statistics pass (plain PyTorch for
            ``"reference"``).

    The random subsample and k-means++ seeds use PyTorch's global generator of
    the input's device (seed it with ``torch.manual_seed``).

    Shape: input ``(N, C, *S)`` with any number of trailing dims; output the
    same shape, dtype and memory format. Responsibilities are computed in
    float32 (float64 for float64 input); the fused EM accumulates its sums and
    updates the mixture in float64.
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
        em_samples: Optional[int] = 4096,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_positive_int("num_features", num_features)
        _check_positive_int("num_components", num_components)
        _check_positive_int("em_every", em_every)
        _check_positive_int("em_iterations", em_iterations)
        if em_samples is not None:
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
        """EM fit on ``input`` (or its subsample); returns new ``(mu, log_sigma, mix_logits)``
        in the buffers' dtype without storing them."""
        fitted = bool(self.fitted)
        data = _em_input(input.detach(), self.em_samples)
        statistics = self._statistics_pass(data.device)
        # (C, n) values for the plain EM and k-means++ seeding; the fused EM of a
        # warm start takes the channel variances from its first E-step's sums instead.
        values = None if statistics is not None and fitted else _channel_values(data)
        channel_var = None if values is None else values.var(1, unbiased=False)
        var_floor = None if channel_var is None else _variance_floor(channel_var)
        if fitted:
            # From the buffers as they are: the variance floor applies in each M-step.
            dtype = compute_dtype(data.dtype)
            mean = self.mu.to(dtype)
            var = torch.exp(2.0 * self.log_sigma.to(dtype))
            lam = torch.softmax(self.mix_logits.to(dtype), dim=0)
        else:
            mean, var, lam = _initial_fit(values, channel_var, var_floor, self.num_components)
        if statistics is None:
            mean, var, lam = _plain_em(values, mean, var, lam, var_floor, self.em_iterations)
        else:
            mean, var, lam = _fused_em(statistics, data, mean, var, lam, var_floor, self.em_iterations,
                                       self.mu.dtype)
        dtype = self.mu.dtype
        return mean.to(dtype), (0.5 * torch.log(var)).to(dtype), torch.log(lam).to(dtype)

    def _statistics_pass(self, device: torch.device) -> Optional[StatisticsPass]:
        """The fused statistics pass of the backend that normalises on ``device``
        (as :func:`uan_kernels.functional.uan` resolves it); None for the reference
        backend, whose EM is plain PyTorch."""
        name = "reference" if self.num_components > _backends.MAX_FUSED_COMPONENTS else self.backend
        backend = _backends.resolve(name, device)
        return None if backend.module is reference else backend.module.statistics

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
