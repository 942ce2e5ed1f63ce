"""The Triton kernels of UAN's fused passes (DESIGN.md), and the block helpers they share.

Element passes view ``x`` as ``(N, C, L)`` with its own strides and walk it in
tiles of ``BLOCK_C`` channels by ``BLOCK_N * BLOCK_L`` elements; a grid of
``(channel tiles, programs)`` programs each loops over a contiguous run of
element tiles (:mod:`.geometry`), carries per-lane partial sums in registers
and reduces them once, after the loop, into its row of a partials buffer.
Finalize kernels turn those rows, summed in a fixed order (no atomics, so
results are bitwise reproducible), into the O(K*C) results and constants.
The per-element math is in :mod:`.element_math`.
"""
import triton
import triton.language as tl

from ..reference import MASS_EPS
from . import element_math as tm

# Ints that vary with the batch size are not specialised on (divisibility by
# 16, equality to 1), so a new batch size does not trigger a recompilation.
_BATCH_DEPENDENT_ARGS = ["N", "num_m_tiles", "tiles_per_program"]

# Globals read inside kernels must be constexpr.
_MASS_EPS = tl.constexpr(MASS_EPS)
# Samples per channel for the statistics pass's component pivots (uan_constants.h, kPivotSamples).
PIVOT_SAMPLES = tl.constexpr(16)


# --------------------------------------------------------------------------- #
# Block helpers
# --------------------------------------------------------------------------- #


@triton.jit
def _tile_lanes(BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """Each lane's ``(n, position)`` relative to its tile's first element, the same for every tile."""
    e = tl.arange(0, BLOCK_N * BLOCK_L)
    return e // BLOCK_L, e % BLOCK_L


@triton.jit
def _lane_offsets(c, stride_c, stride_n, stride_l, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """int64 offsets of a tile's ``[BLOCK_C, BLOCK_E]`` elements from its first one, computed once per program."""
    lane_n, lane_pos = _tile_lanes(BLOCK_N, BLOCK_L)
    lanes = lane_n.to(tl.int64) * stride_n + lane_pos.to(tl.int64) * stride_l
    return c.to(tl.int64)[:, None] * stride_c + lanes[None, :]


@triton.jit
def _tile_origin(tile, l_tiles, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """Batch index and position along L of element tile ``tile``'s first element."""
    return (tile // l_tiles) * BLOCK_N, (tile % l_tiles) * BLOCK_L


@triton.jit
def _tile_offset(n0, pos0, stride_n, stride_l):
    """int64 offset of a tile's first element, so tensors beyond 2**31 elements work."""
    return n0.to(tl.int64) * stride_n + pos0.to(tl.int64) * stride_l


@triton.jit
def _load_scalars(ptr, K: tl.constexpr, ACC: tl.constexpr):
    values = ()
    for k in tl.static_range(K):
        values = values + (tl.load(ptr + k).to(ACC),)
    return values


@triton.jit
def _load_row(ptr, k, c, C, other, ACC: tl.constexpr):
    """Row ``k`` of a contiguous ``(K, C)`` tensor at channels ``c``, upcast to ``ACC``."""
    return tl.load(ptr + k * C + c, mask=c < C, other=other).to(ACC)


@triton.jit
def _store_row(ptr, k, c, C, value):
    tl.store(ptr + k * C + c, value.to(ptr.dtype.element_ty), mask=c < C)


@triton.jit
def _load_channel(ptr, c, C, default, HAS: tl.constexpr, ACC: tl.constexpr):
    """A ``[BLOCK_C]`` block of an optional per-channel tensor (``default`` when absent)."""
    if HAS:
        value = tl.load(ptr + c, mask=c < C, other=default).to(ACC)
    else:
        value = tl.full(c.shape, default, ACC)
    return value


@triton.jit
def _channel_pivot(x_ptr, x_c, c_ok, ACC: tl.constexpr):
    """Each channel's first element: elements are taken relative to it (see :mod:`.element_math`)."""
    return tl.load(x_ptr + x_c, mask=c_ok, other=0.0).to(ACC)


@triton.jit
def _responsibility_constants(mu_ptr, log_sigma_ptr, mix_logits_ptr, c, C, pivot, K: tl.constexpr,
                              ACC: tl.constexpr):
    """Per component ``(alpha, beta, gamma)`` of the relative logits as ``[BLOCK_C, 1]`` blocks, and ``log2(lam)``."""
    mix_logits = _load_scalars(mix_logits_ptr, K, ACC)
    mu = ()
    log_sigma = ()
    for k in tl.static_range(K):
        mu = mu + (_load_row(mu_ptr, k, c, C, 0.0, ACC),)
        log_sigma = log_sigma + (_load_row(log_sigma_ptr, k, c, C, 0.0, ACC),)
    alpha, beta, gamma = tm.relative_logit_coefficients(mu, log_sigma, mix_logits, pivot, K, ACC)
    alpha_blocks = ()
    beta_blocks = ()
    gamma_blocks = ()
    for k in tl.static_range(K):
        alpha_blocks = alpha_blocks + (alpha[k][:, None],)
        beta_blocks = beta_blocks + (beta[k][:, None],)
        gamma_blocks = gamma_blocks + (gamma[k][:, None],)
    return alpha_blocks, beta_blocks, gamma_blocks, tm.log2_mixing_weights(mix_logits, K)


@triton.jit
def _component_pivots(x_ptr, x_c, c_ok, N, L, x_sn, x_sl, pivot, alpha, beta, gamma, K: tl.constexpr,
                      ACC: tl.constexpr):
    """The statistics pass's pivot of each component, a tuple of ``[BLOCK_C]`` blocks.

    Of ``PIVOT_SAMPLES`` elements evenly spread over the channel, the first whose
    relative logit is closest to its largest (a value of the channel where the
    component competes; the channel's pivot if every sample is NaN), as the C++
    kernels choose them (``uan_constants.h``). Every program computes the same.
    """
    j = tl.arange(0, PIVOT_SAMPLES)
    e = j.to(tl.int64) * (N.to(tl.int64) * L) // PIVOT_SAMPLES
    offsets = (e // L) * x_sn + (e % L) * x_sl
    samples = tl.load(x_ptr + x_c[:, None] + offsets[None, :], mask=c_ok[:, None], other=0.0).to(ACC)
    _, logits = tm.relative_logits(samples - pivot[:, None], alpha, beta, gamma, K)
    top = tm.largest_logit(logits, K)
    pivots = ()
    for k in tl.static_range(K):
        score = logits[k] - top
        best = tl.max(tl.where(score == score, score, float("-inf")), 1)
        first = tl.min(tl.where(score == best[:, None], j[None, :], PIVOT_SAMPLES), 1)
        chosen = tl.sum(tl.where(j[None, :] == first[:, None], samples, 0.0), 1)
        pivots = pivots + (tl.where(first < PIVOT_SAMPLES, chosen, pivot),)
    return pivots


@triton.jit
def _statistic_scales(log2_lam, var_ptr, c, C, gamma, K: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr):
    """Per component ``gamma / sqrt(lam_k (var_k + eps))`` as ``[BLOCK_C]`` blocks (``a_k r_k gamma``)."""
    scale = ()
    for k in tl.static_range(K):
        rstd = tl.math.rsqrt(_load_row(var_ptr, k, c, C, 1.0, ACC) + EPS)
        scale = scale + (tl.exp2(-0.5 * log2_lam[k]) * rstd * gamma,)
    return scale


@triton.jit
def _mixture_scales(log2_lam, log_sigma_ptr, c, C, gamma, K: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr):
    """``_statistic_scales`` with the mixture's own variances ``exp(2 log_sigma)``."""
    scale = ()
    for k in tl.static_range(K):
        rstd = tl.math.rsqrt(tl.exp(2.0 * _load_row(log_sigma_ptr, k, c, C, 0.0, ACC)) + EPS)
        scale = scale + (tl.exp2(-0.5 * log2_lam[k]) * rstd * gamma,)
    return scale


@triton.jit
def _zeros(shape, K: tl.constexpr, ACC: tl.constexpr):
    values = ()
    for k in tl.static_range(K):
        values = values + (tl.zeros(shape, ACC),)
    return values


@triton.jit
def _store_lane_sums(ptr, sums, c, C, K: tl.constexpr):
    """Reduce per-lane ``[BLOCK_C, BLOCK_E]`` sums over the lanes and store them as rows ``0..K-1`` at ``ptr``."""
    for k in tl.static_range(K):
        _store_row(ptr, k, c, C, tl.sum(sums[k], 1))


@triton.jit
def _store_rounded(ptrs, value, mask, BF16_BY_BITS: tl.constexpr):
    """Store float32/float64 ``value`` in the pointee dtype, rounding to nearest even.

    ``BF16_BY_BITS``: the Triton interpreter truncates float32 -> bfloat16
    (errors up to one ulp), so round in integer arithmetic instead.
    """
    if BF16_BY_BITS:
        bits = value.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptrs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Training forward
# --------------------------------------------------------------------------- #


@triton.jit(do_not_specialize=_BATCH_DEPENDENT_ARGS)
def _stats_partials_kernel(
    x_ptr, mu_ptr, log_sigma_ptr, mix_logits_ptr, partials_ptr, pivots_ptr,
    N, C, L, x_sn, x_sc, x_sl,
    num_m_tiles, l_tiles, tiles_per_program,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
):
    """Statistics pass: per program ``sum tau``, ``sum tau d`` and ``sum tau d**2`` of its element tiles.

    ``d = x - pivot_k``, the component's pivot (:func:`_component_pivots`,
    written to ``pivots`` by the first program of each channel tile), so the
    sums are of the order of the component's spread and not of ``|mean|`` or of
    the distance between components. Rows ``partials[program, q, k, c]``.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    program = tl.program_id(1)
    c_ok = c < C
    x_c = c.to(tl.int64) * x_sc
    pivot = _channel_pivot(x_ptr, x_c, c_ok, ACC)
    rel_alpha, rel_beta, rel_gamma, log2_lam = _responsibility_constants(mu_ptr, log_sigma_ptr, mix_logits_ptr, c, C,
                                                                         pivot, K, ACC)
    component_pivots = _component_pivots(x_ptr, x_c, c_ok, N, L, x_sn, x_sl, pivot, rel_alpha, rel_beta, rel_gamma, K,
                                         ACC)
    pivots = ()
    for k in tl.static_range(K):
        if program == 0:
            _store_row(pivots_ptr, k, c, C, component_pivots[k])
        pivots = pivots + (component_pivots[k][:, None],)
    lane_n, lane_pos = _tile_lanes(BLOCK_N, BLOCK_L)
    x_ptrs = x_ptr + _lane_offsets(c, x_sc, x_sn, x_sl, BLOCK_N, BLOCK_L)
    pivot = pivot[:, None]

    shape: tl.constexpr = [BLOCK_C, BLOCK_N * BLOCK_L]
    mass = _zeros(shape, K, ACC)
    first = _zeros(shape, K, ACC)
    second = _zeros(shape, K, ACC)
    start = program * tiles_per_program
    for tile in range(start, tl.minimum(start + tiles_per_program, num_m_tiles)):
        n0, pos0 = _tile_origin(tile, l_tiles, BLOCK_N, BLOCK_L)
        ok = c_ok[:, None] & ((lane_n < N - n0) & (lane_pos < L - pos0))[None, :]
        x = tl.load(x_ptrs + _tile_offset(n0, pos0, x_sn, x_sl), mask=ok, other=0.0).to(ACC)
        t, e, total = tm.component_weights(x - pivot, rel_alpha, rel_beta, rel_gamma, K)
        inv_total = tl.where(ok, tm.reciprocal(total), 0.0)  # lanes outside the tensor add nothing
        mass, first, second = tm.accumulate_moments(mass, first, second, e, inv_total, x, pivots, K)

    row = partials_ptr + program.to(tl.int64) * (3 * K * C)
    _store_lane_sums(row, mass, c, C, K)
    _store_lane_sums(row + K * C, first, c, C, K)
    _store_lane_sums(row + 2 * K * C, second, c, C, K)


@triton.jit(do_not_specialize=["num_partials"])
def _stats_finalize_kernel(
    partials_ptr, pivots_ptr, mean_ptr, var_ptr, mass_ptr,
    num_partials, C,
    K: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Second stage of the statistics: the programs' sums, added in a fixed order, to SPEC's statistics.

    ``mass = S``, ``mean = sum tau x / (S + 1e-12)``,
    ``var = sum tau (x - mean)**2 / (S + 1e-12)`` (the ``1e-12`` makes an empty
    component's statistics zero rather than NaN). The sums are about each
    component's pivot, ``pivots[k, c]``.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    for k in tl.static_range(K):
        pivot = _load_row(pivots_ptr, k, c, C, 0.0, ACC)
        mass = tl.zeros([BLOCK_C], ACC)
        first = tl.zeros([BLOCK_C], ACC)
        second = tl.zeros([BLOCK_C], ACC)
        row = partials_ptr  # advanced by pointer increments: 64-bit, however many partials
        for _ in range(num_partials):
            mass += _load_row(row, k, c, C, 0.0, ACC)
            first += _load_row(row + K * C, k, c, C, 0.0, ACC)
            second += _load_row(row + 2 * K * C, k, c, C, 0.0, ACC)
            row += 3 * K * C
        shift = first / tl.where(mass > 0, mass, 1.0)  # weighted mean of d = x - pivot
        m2 = tl.maximum(second - first * shift, 0.0)  # sum tau (d - shift)**2
        weighted_mean = pivot + shift
        denominator = mass + _MASS_EPS
        spec_mean = weighted_mean * (mass / denominator)
        # sum tau (x - spec_mean)**2 = m2 + S (weighted_mean - spec_mean)**2 (parallel axes).
        gap = weighted_mean - spec_mean
        _store_row(mass_ptr, k, c, C, mass)
        _store_row(mean_ptr, k, c, C, spec_mean)
        _store_row(var_ptr, k, c, C, (m2 + mass * gap * gap) / denominator)


@triton.jit(do_not_specialize=["num_partials"])
def _stats_sums_kernel(
    partials_ptr, pivots_ptr, mu_ptr, sums_ptr,
    num_partials, C,
    K: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """The statistics pass's sums about the component means, ``(3, K, C)`` float64 (``uan::triton_statistics``).

    The programs' partials (about each component's pivot ``p = pivots[k, c]``) are added in
    float64 in a fixed order, then moved to the pivot ``mu`` that every process
    knows, so that sums of several batches add:
    ``T1' = T1 + (p - mu) S``, ``T2' = T2 + 2 (p - mu) T1 + (p - mu)**2 S``.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    for k in tl.static_range(K):
        pivot = _load_row(pivots_ptr, k, c, C, 0.0, tl.float64)
        mass = tl.zeros([BLOCK_C], tl.float64)
        first = tl.zeros([BLOCK_C], tl.float64)
        second = tl.zeros([BLOCK_C], tl.float64)
        row = partials_ptr  # advanced by pointer increments: 64-bit, however many partials
        for _ in range(num_partials):
            mass += _load_row(row, k, c, C, 0.0, tl.float64)
            first += _load_row(row + K * C, k, c, C, 0.0, tl.float64)
            second += _load_row(row + 2 * K * C, k, c, C, 0.0, tl.float64)
            row += 3 * K * C
        offset = pivot - _load_row(mu_ptr, k, c, C, 0.0, tl.float64)
        second += offset * (2.0 * first + offset * mass)
        first += offset * mass
        _store_row(sums_ptr, k, c, C, mass)
        _store_row(sums_ptr + K * C, k, c, C, first)
        _store_row(sums_ptr + 2 * K * C, k, c, C, second)


@triton.jit(do_not_specialize=["num_partials"])
def _partials_total_kernel(partials_ptr, sums_ptr, num_partials, size, BLOCK: tl.constexpr):
    """Float64 totals over the programs of ``(programs, size)`` partial sums, added in a fixed order."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < size
    total = tl.zeros([BLOCK], tl.float64)
    row = partials_ptr  # advanced by pointer increments: 64-bit, however many partials
    for _ in range(num_partials):
        total += tl.load(row + i, mask=ok, other=0.0).to(tl.float64)
        row += size
    tl.store(sums_ptr + i, total, mask=ok)


@triton.jit
def _statistics_from_sums_kernel(sums_ptr, mu_ptr, mean_ptr, var_ptr, mass_ptr, plane, BLOCK: tl.constexpr):
    """``(K, C)`` mean, var and mass from ``(3, K, C)`` float64 sums about ``mu``, in float64 (SPEC's statistics).

    ``mean = (mu S + T1) / (S + 1e-12)`` (``sum tau x / (S + 1e-12)``, so an empty component's mean is 0 as
    in the training forward), ``var = (T2 - 2 (mean - mu) T1 + (mean - mu)**2 S) / (S + 1e-12)``, as
    ``statistics_from_sums`` of csrc/uan_constants.h.
    """
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < plane
    mass = tl.load(sums_ptr + i, mask=ok, other=0.0)
    first = tl.load(sums_ptr + plane + i, mask=ok, other=0.0)
    second = tl.load(sums_ptr + 2 * plane + i, mask=ok, other=0.0)
    pivot = tl.load(mu_ptr + i, mask=ok, other=0.0).to(tl.float64)
    denominator = mass + _MASS_EPS
    mean = (pivot * mass + first) / denominator
    offset = mean - pivot
    var = tl.maximum((second - 2.0 * offset * first + offset * offset * mass) / denominator, 0.0)
    tl.store(mean_ptr + i, mean.to(mean_ptr.dtype.element_ty), mask=ok)
    tl.store(var_ptr + i, var.to(var_ptr.dtype.element_ty), mask=ok)
    tl.store(mass_ptr + i, mass.to(mass_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=_BATCH_DEPENDENT_ARGS)
def _normalize_kernel(
    x_ptr, out_ptr, mu_ptr, log_sigma_ptr, mix_logits_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    N, C, L, x_sn, x_sc, x_sl, out_sn, out_sc, out_sl,
    num_m_tiles, l_tiles, tiles_per_program,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MIXTURE_STATISTICS: tl.constexpr, EPS: tl.constexpr,
    ACC: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """Normalise pass: ``out = gamma * sum_k tau_k (x - mean_k) / sqrt(lam_k (var_k + eps)) + beta``.

    The training forward's second pass (batch statistics) and the whole eval
    forward (given statistics; with ``MIXTURE_STATISTICS`` the mixture's own
    ``(mu, exp(2 log_sigma))``, the eval of update="moving_average"). ``EPS`` is a constexpr so that it has the
    accumulation dtype's precision (a float argument would be float32).
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    program = tl.program_id(1)
    c_ok = c < C
    x_c = c.to(tl.int64) * x_sc
    pivot = _channel_pivot(x_ptr, x_c, c_ok, ACC)
    rel_alpha, rel_beta, rel_gamma, log2_lam = _responsibility_constants(mu_ptr, log_sigma_ptr, mix_logits_ptr, c, C,
                                                                         pivot, K, ACC)
    gamma = _load_channel(weight_ptr, c, C, 1.0, HAS_WEIGHT, ACC)
    beta = _load_channel(bias_ptr, c, C, 0.0, HAS_BIAS, ACC)
    if MIXTURE_STATISTICS:
        scale = _mixture_scales(log2_lam, log_sigma_ptr, c, C, gamma, K, EPS, ACC)
        centers_ptr = mu_ptr
    else:
        scale = _statistic_scales(log2_lam, var_ptr, c, C, gamma, K, EPS, ACC)
        centers_ptr = mean_ptr
    scales = ()
    offsets = ()
    for k in tl.static_range(K):
        offsets = offsets + ((beta - scale[k] * (_load_row(centers_ptr, k, c, C, 0.0, ACC) - pivot))[:, None],)
        scales = scales + (scale[k][:, None],)
    lane_n, lane_pos = _tile_lanes(BLOCK_N, BLOCK_L)
    x_ptrs = x_ptr + _lane_offsets(c, x_sc, x_sn, x_sl, BLOCK_N, BLOCK_L)
    out_ptrs = out_ptr + _lane_offsets(c, out_sc, out_sn, out_sl, BLOCK_N, BLOCK_L)
    pivot = pivot[:, None]

    start = program * tiles_per_program
    for tile in range(start, tl.minimum(start + tiles_per_program, num_m_tiles)):
        n0, pos0 = _tile_origin(tile, l_tiles, BLOCK_N, BLOCK_L)
        ok = c_ok[:, None] & ((lane_n < N - n0) & (lane_pos < L - pos0))[None, :]
        xs = tl.load(x_ptrs + _tile_offset(n0, pos0, x_sn, x_sl), mask=ok, other=0.0).to(ACC) - pivot
        t, e, total = tm.component_weights(xs, rel_alpha, rel_beta, rel_gamma, K)
        y = tm.mixture_transform(xs, e, scales, offsets, K) * tm.reciprocal(total)
        _store_rounded(out_ptrs + _tile_offset(n0, pos0, out_sn, out_sl), y, ok, BF16_BY_BITS)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #


@triton.jit(do_not_specialize=_BATCH_DEPENDENT_ARGS)
def _backward_reduce_kernel(
    x_ptr, dout_ptr, mu_ptr, log_sigma_ptr, mix_logits_ptr, mean_ptr, partials_ptr,
    N, C, L, x_sn, x_sc, x_sl, dout_sn, dout_sc, dout_sl,
    num_m_tiles, l_tiles, tiles_per_program,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
):
    """Training backward, first pass: per program ``sum dout tau``, ``sum dout tau d`` and ``sum dout``.

    These are ``A_k / gamma``, ``B_k / gamma`` and ``dbeta`` of DESIGN.md; the
    elementwise pass needs their totals (the gradients of ``m_k``, ``v_k``).
    Rows ``partials[program, q, :, c]``: ``q = 0, 1`` hold ``K`` rows, ``q = 2`` one.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    program = tl.program_id(1)
    c_ok = c < C
    x_c = c.to(tl.int64) * x_sc
    pivot = _channel_pivot(x_ptr, x_c, c_ok, ACC)
    rel_alpha, rel_beta, rel_gamma, log2_lam = _responsibility_constants(mu_ptr, log_sigma_ptr, mix_logits_ptr, c, C,
                                                                         pivot, K, ACC)
    delta = ()
    for k in tl.static_range(K):
        delta = delta + ((_load_row(mean_ptr, k, c, C, 0.0, ACC) - pivot)[:, None],)
    lane_n, lane_pos = _tile_lanes(BLOCK_N, BLOCK_L)
    x_ptrs = x_ptr + _lane_offsets(c, x_sc, x_sn, x_sl, BLOCK_N, BLOCK_L)
    dout_ptrs = dout_ptr + _lane_offsets(c, dout_sc, dout_sn, dout_sl, BLOCK_N, BLOCK_L)
    pivot = pivot[:, None]

    shape: tl.constexpr = [BLOCK_C, BLOCK_N * BLOCK_L]
    dout_tau = _zeros(shape, K, ACC)
    dout_tau_d = _zeros(shape, K, ACC)
    dout_sum = tl.zeros(shape, ACC)
    start = program * tiles_per_program
    for tile in range(start, tl.minimum(start + tiles_per_program, num_m_tiles)):
        n0, pos0 = _tile_origin(tile, l_tiles, BLOCK_N, BLOCK_L)
        ok = c_ok[:, None] & ((lane_n < N - n0) & (lane_pos < L - pos0))[None, :]
        xs = tl.load(x_ptrs + _tile_offset(n0, pos0, x_sn, x_sl), mask=ok, other=0.0).to(ACC) - pivot
        # dout is 0 outside the tensor, so those lanes add nothing.
        dout = tl.load(dout_ptrs + _tile_offset(n0, pos0, dout_sn, dout_sl), mask=ok, other=0.0).to(ACC)
        t, e, total = tm.component_weights(xs, rel_alpha, rel_beta, rel_gamma, K)
        dout_per_total = dout * tm.reciprocal(total)
        dout_tau, dout_tau_d = tm.accumulate_dout_moments(dout_tau, dout_tau_d, dout_per_total, e, xs, delta, K)
        dout_sum += dout

    row = partials_ptr + program.to(tl.int64) * ((2 * K + 1) * C)
    _store_lane_sums(row, dout_tau, c, C, K)
    _store_lane_sums(row + K * C, dout_tau_d, c, C, K)
    _store_row(row + 2 * K * C, 0, c, C, tl.sum(dout_sum, 1))


@triton.jit(do_not_specialize=["num_partials"])
def _statistic_gradients_kernel(
    partials_ptr, local_sums_ptr, mix_logits_ptr, var_ptr, weight_ptr,
    dmean_ptr, dvar_ptr, local_dvar_ptr, grad_weight_ptr, grad_bias_ptr,
    grad_mu_ptr, grad_log_sigma_ptr, grad_mix_logits_ptr,
    num_partials, C,
    K: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, MIXTURE_GRAD: tl.constexpr,
    LOCAL_SUMS: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr,
):
    """The programs' ``sum dout tau``, ``sum dout tau d``, ``sum dout`` to the statistics' gradients.

    ``dmean = Gm = -a r gamma A``, ``dvar = Gv = -a r**3 gamma B / 2`` (DESIGN.md,
    ``A``, ``B`` here without gamma), ``grad_weight = sum_k a_k r_k B_k`` and
    ``grad_bias = sum dout``, with ``a_k r_k = 1 / sqrt(lam_k (var_k + eps))``.
    Without ``MIXTURE_GRAD`` (update="moving_average") it also writes the zero
    mixture gradients, so that no kernel runs for them.

    ``LOCAL_SUMS`` (``uan::triton_backward_elementwise``): the partials are the
    whole batch's reduce sums (every process's, ``num_partials = 1``), and
    ``local_sums`` (``(2K+1, C)``) this input's: ``grad_weight``, ``grad_bias``
    and ``local_dvar`` (``Gv`` of this input's ``B``, whose ``Gv (v + eps)`` is
    its share of ``d log(lam)``'s direct term) are taken from these, so that the
    processes' parameter gradients add up to the whole batch's.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    log2_lam = tm.log2_mixing_weights(_load_scalars(mix_logits_ptr, K, ACC), K)
    gamma = _load_channel(weight_ptr, c, C, 1.0, HAS_WEIGHT, ACC)
    scale = _statistic_scales(log2_lam, var_ptr, c, C, 1.0, K, EPS, ACC)
    grad_weight = tl.zeros([BLOCK_C], ACC)
    for k in tl.static_range(K):
        dout_tau = tl.zeros([BLOCK_C], ACC)
        dout_tau_d = tl.zeros([BLOCK_C], ACC)
        row = partials_ptr  # advanced by pointer increments: 64-bit, however many partials
        for _ in range(num_partials):
            dout_tau += _load_row(row, k, c, C, 0.0, ACC)
            dout_tau_d += _load_row(row + K * C, k, c, C, 0.0, ACC)
            row += (2 * K + 1) * C
        rstd2 = 1.0 / (_load_row(var_ptr, k, c, C, 1.0, ACC) + EPS)
        _store_row(dmean_ptr, k, c, C, -scale[k] * gamma * dout_tau)
        _store_row(dvar_ptr, k, c, C, -0.5 * scale[k] * rstd2 * gamma * dout_tau_d)
        if LOCAL_SUMS:
            local_tau_d = _load_row(local_sums_ptr + K * C, k, c, C, 0.0, ACC)
            _store_row(local_dvar_ptr, k, c, C, -0.5 * scale[k] * rstd2 * gamma * local_tau_d)
            grad_weight += scale[k] * local_tau_d
        else:
            grad_weight += scale[k] * dout_tau_d
    if LOCAL_SUMS:
        dout_sum = _load_row(local_sums_ptr + 2 * K * C, 0, c, C, 0.0, ACC)
    else:
        dout_sum = tl.zeros([BLOCK_C], ACC)
        row = partials_ptr + 2 * K * C
        for _ in range(num_partials):
            dout_sum += _load_row(row, 0, c, C, 0.0, ACC)
            row += (2 * K + 1) * C
    _store_row(grad_weight_ptr, 0, c, C, grad_weight)
    _store_row(grad_bias_ptr, 0, c, C, dout_sum)
    if not MIXTURE_GRAD:
        for k in tl.static_range(K):
            _store_row(grad_mu_ptr, k, c, C, tl.zeros([BLOCK_C], ACC))
            _store_row(grad_log_sigma_ptr, k, c, C, tl.zeros([BLOCK_C], ACC))
            if tl.program_id(0) == 0:
                tl.store(grad_mix_logits_ptr + k, tl.zeros([], ACC).to(grad_mix_logits_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=_BATCH_DEPENDENT_ARGS)
def _backward_elementwise_kernel(
    x_ptr, dout_ptr, dx_ptr,
    mu_ptr, log_sigma_ptr, mix_logits_ptr, mean_ptr, var_ptr, weight_ptr,
    mass_ptr, dmean_ptr, dvar_ptr,
    mixture_partials_ptr, stat_partials_ptr,
    N, C, L, x_sn, x_sc, x_sl, dout_sn, dout_sc, dout_sl, dx_sn, dx_sc, dx_sl,
    num_m_tiles, l_tiles, tiles_per_program,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, MIXTURE_GRAD: tl.constexpr,
    EPS: tl.constexpr, ACC: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """Backward elementwise pass: writes ``dx`` and per-program partial sums.

    ``TRAINING``: batch statistics, with ``mass`` and the loss's partials
    ``dmean = Gm``, ``dvar = Gv`` from :func:`_statistic_gradients_kernel`.
    Eval: given statistics; the pass also sums ``dout tau``, ``dout tau d`` and
    ``dout`` (``stat_partials``, laid out as the reduction pass's), which eval
    needs only for the statistics' and affine gradients. ``MIXTURE_GRAD``: also
    sum ``U s``, ``U s**2`` and ``U`` (``mixture_partials``; ``s`` the standardised
    element of ``tm.standardization``, summed as ``U xs``, ``U xs**2`` and turned
    into them once per program) for ``d mu``, ``d log_sigma`` and ``d log(lam)``.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    program = tl.program_id(1)
    c_ok = c < C
    x_c = c.to(tl.int64) * x_sc
    pivot = _channel_pivot(x_ptr, x_c, c_ok, ACC)
    rel_alpha, rel_beta, rel_gamma, log2_lam = _responsibility_constants(mu_ptr, log_sigma_ptr, mix_logits_ptr, c, C,
                                                                         pivot, K, ACC)
    gamma = _load_channel(weight_ptr, c, C, 1.0, HAS_WEIGHT, ACC)
    scale = _statistic_scales(log2_lam, var_ptr, c, C, gamma, K, EPS, ACC)
    scales = ()
    delta = ()
    var = ()
    dmean_per_mass = ()
    dvar_per_mass = ()
    for k in tl.static_range(K):
        scales = scales + (scale[k][:, None],)
        delta = delta + ((_load_row(mean_ptr, k, c, C, 0.0, ACC) - pivot)[:, None],)
        if TRAINING:
            inv_mass = 1.0 / (_load_row(mass_ptr, k, c, C, 0.0, ACC) + _MASS_EPS)
            var = var + (_load_row(var_ptr, k, c, C, 1.0, ACC)[:, None],)
            dmean_per_mass = dmean_per_mass + ((_load_row(dmean_ptr, k, c, C, 0.0, ACC) * inv_mass)[:, None],)
            dvar_per_mass = dvar_per_mass + ((_load_row(dvar_ptr, k, c, C, 0.0, ACC) * inv_mass)[:, None],)
    lane_n, lane_pos = _tile_lanes(BLOCK_N, BLOCK_L)
    x_ptrs = x_ptr + _lane_offsets(c, x_sc, x_sn, x_sl, BLOCK_N, BLOCK_L)
    dout_ptrs = dout_ptr + _lane_offsets(c, dout_sc, dout_sn, dout_sl, BLOCK_N, BLOCK_L)
    dx_ptrs = dx_ptr + _lane_offsets(c, dx_sc, dx_sn, dx_sl, BLOCK_N, BLOCK_L)
    lane_pivot = pivot[:, None]

    shape: tl.constexpr = [BLOCK_C, BLOCK_N * BLOCK_L]
    sum_u_xs = _zeros(shape, K, ACC)
    sum_u_xs2 = _zeros(shape, K, ACC)
    sum_u = _zeros(shape, K, ACC)
    dout_tau = _zeros(shape, K, ACC)
    dout_tau_d = _zeros(shape, K, ACC)
    dout_sum = tl.zeros(shape, ACC)
    start = program * tiles_per_program
    for tile in range(start, tl.minimum(start + tiles_per_program, num_m_tiles)):
        n0, pos0 = _tile_origin(tile, l_tiles, BLOCK_N, BLOCK_L)
        ok = c_ok[:, None] & ((lane_n < N - n0) & (lane_pos < L - pos0))[None, :]
        xs = tl.load(x_ptrs + _tile_offset(n0, pos0, x_sn, x_sl), mask=ok, other=0.0).to(ACC) - lane_pivot
        dout = tl.load(dout_ptrs + _tile_offset(n0, pos0, dout_sn, dout_sl), mask=ok, other=0.0).to(ACC)
        t, e, total = tm.component_weights(xs, rel_alpha, rel_beta, rel_gamma, K)
        inv_total = tl.where(ok, tm.reciprocal(total), 0.0)  # lanes outside the tensor add nothing
        if TRAINING:
            dtau, weighted_dtau, weighted_direct = tm.batch_stats_dtau(
                xs, dout, e, scales, delta, dmean_per_mass, dvar_per_mass, var, K
            )
        else:
            dtau, weighted_dtau, weighted_direct = tm.given_stats_dtau(xs, dout, e, scales, delta, K)
            dout_tau, dout_tau_d = tm.accumulate_dout_moments(dout_tau, dout_tau_d, dout * inv_total, e, xs,
                                                              delta, K)
            dout_sum += dout
        u, through_logits = tm.logit_gradients(e, dtau, t, inv_total, weighted_dtau, rel_alpha, xs, K)
        dx = weighted_direct * inv_total - through_logits
        _store_rounded(dx_ptrs + _tile_offset(n0, pos0, dx_sn, dx_sl), dx, ok, BF16_BY_BITS)
        if MIXTURE_GRAD:
            sum_u_xs, sum_u_xs2, sum_u = tm.accumulate_logit_gradients(sum_u_xs, sum_u_xs2, sum_u, u, xs, K)

    if MIXTURE_GRAD:
        row = mixture_partials_ptr + program.to(tl.int64) * (3 * K * C)
        for k in tl.static_range(K):
            std_a, std_b = tm.standardization(_load_row(mu_ptr, k, c, C, 0.0, ACC),
                                              _load_row(log_sigma_ptr, k, c, C, 0.0, ACC), pivot)
            program_u = tl.sum(sum_u[k], 1)
            u_s, u_s2 = tm.standardized_sums(std_a, std_b, tl.sum(sum_u_xs[k], 1), tl.sum(sum_u_xs2[k], 1), program_u)
            _store_row(row, k, c, C, u_s)
            _store_row(row + K * C, k, c, C, u_s2)
            _store_row(row + 2 * K * C, k, c, C, program_u)
    if not TRAINING:
        row = stat_partials_ptr + program.to(tl.int64) * ((2 * K + 1) * C)
        _store_lane_sums(row, dout_tau, c, C, K)
        _store_lane_sums(row + K * C, dout_tau_d, c, C, K)
        _store_row(row + 2 * K * C, 0, c, C, tl.sum(dout_sum, 1))


@triton.jit(do_not_specialize=["num_partials"])
def _mixture_gradients_kernel(
    partials_ptr, log_sigma_ptr, mix_logits_ptr, var_ptr, dvar_ptr,
    grad_mu_ptr, grad_log_sigma_ptr, grad_mix_logits_ptr,
    num_partials, C,
    K: tl.constexpr, BLOCK_C: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr,
):
    """One program: the mixture parameters' gradients from the elementwise pass's sums.

    ``d mu = a GRADIENT_SCALE sum U s``, ``d log_sigma = GRADIENT_SCALE sum U s**2 - sum U``
    (``z**2 = GRADIENT_SCALE s**2``); ``d log(lam_k) = sum_c [sum U_k + Gv_k (v_k + eps)]``
    (the second term is ``-a_k r_k B_k / 2`` through ``a_k = lam_k**-0.5``), then
    the softmax Jacobian to ``d mix_logits``. Summed over every channel, hence one program.
    """
    log2_lam = tm.log2_mixing_weights(_load_scalars(mix_logits_ptr, K, ACC), K)
    grad_log_lam = _zeros([BLOCK_C], K, ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        grad_log_lam_next = ()
        for k in tl.static_range(K):
            sum_u_t = tl.zeros([BLOCK_C], ACC)
            sum_u_t2 = tl.zeros([BLOCK_C], ACC)
            sum_u = tl.zeros([BLOCK_C], ACC)
            row = partials_ptr  # advanced by pointer increments: 64-bit, however many partials
            for _ in range(num_partials):
                sum_u_t += _load_row(row, k, c, C, 0.0, ACC)
                sum_u_t2 += _load_row(row + K * C, k, c, C, 0.0, ACC)
                sum_u += _load_row(row + 2 * K * C, k, c, C, 0.0, ACC)
                row += 3 * K * C
            a = tm.RESPONSIBILITY_SCALE * tl.exp(-_load_row(log_sigma_ptr, k, c, C, 0.0, ACC))
            var_eps = _load_row(var_ptr, k, c, C, 1.0, ACC) + EPS
            through_scale = _load_row(dvar_ptr, k, c, C, 0.0, ACC) * var_eps
            sum_u_t *= a * tm.GRADIENT_SCALE
            sum_u_t2 = sum_u_t2 * tm.GRADIENT_SCALE - sum_u
            _store_row(grad_mu_ptr, k, c, C, sum_u_t)
            _store_row(grad_log_sigma_ptr, k, c, C, sum_u_t2)
            grad_log_lam_next = grad_log_lam_next + (grad_log_lam[k] + (sum_u + through_scale),)
        grad_log_lam = grad_log_lam_next
    total = tl.sum(grad_log_lam[0], 0)
    for k in tl.static_range(1, K):
        total += tl.sum(grad_log_lam[k], 0)
    for k in tl.static_range(K):
        grad = tl.sum(grad_log_lam[k], 0) - tl.exp2(log2_lam[k]) * total
        tl.store(grad_mix_logits_ptr + k, grad.to(grad_mix_logits_ptr.dtype.element_ty))
