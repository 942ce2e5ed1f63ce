"""The Triton kernels of UAN's fused passes (DESIGN.md), and the block helpers they share.

Kernels view ``x`` as ``(N, C, L)`` with its own strides and walk it in tiles
of ``BLOCK_C`` channels by ``BLOCK_N * BLOCK_L`` elements; a grid of
``(programs, channel tiles)`` programs each loops over a contiguous run of
element tiles (:mod:`.geometry`). The per-element math is in :mod:`.element_math`.
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
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _tile_elements(tile, N, L, l_tiles, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """Batch index, position along L and validity of the elements of element tile ``tile``."""
    e = tl.arange(0, BLOCK_N * BLOCK_L)
    n = (tile // l_tiles) * BLOCK_N + e // BLOCK_L
    pos = (tile % l_tiles) * BLOCK_L + e % BLOCK_L
    return n, pos, (n < N) & (pos < L)


@triton.jit
def _element_offsets(n, pos, stride_n, stride_l):
    """int64 offsets of the elements of one channel, so tensors beyond 2**31 elements work."""
    return n.to(tl.int64) * stride_n + pos.to(tl.int64) * stride_l


@triton.jit
def _load_kc(ptr, k, c, K, C, other, ACC: tl.constexpr):
    """A ``[K_PAD, BLOCK_C]`` block of a contiguous ``(K, C)`` tensor, upcast to ``ACC``."""
    mask = (k < K)[:, None] & (c < C)[None, :]
    return tl.load(ptr + k[:, None] * C + c[None, :], mask=mask, other=other).to(ACC)


@triton.jit
def _store_kc(ptr, value, k, c, K, C):
    mask = (k < K)[:, None] & (c < C)[None, :]
    tl.store(ptr + k[:, None] * C + c[None, :], value, mask=mask)


@triton.jit
def _mixture_block(mu_ptr, log_sigma_ptr, mix_logits_ptr, k, c, K, C, ACC: tl.constexpr):
    """Per-component constants of the tile's channels, as ``[K_PAD, BLOCK_C, 1]`` blocks.

    Returns ``(mu, offset, curvature, inv_sigma2, inv_sqrt_lam)``; padded
    components get ``offset = -inf`` (so ``tau = 0``) and ``inv_sqrt_lam = 0``.
    """
    mix_logits = tl.load(mix_logits_ptr + k, mask=k < K, other=_NEG_INF).to(ACC)
    log2_lam = tm.log2_mixing_weights(mix_logits)
    inv_sqrt_lam = tl.where(k < K, tl.exp2(-0.5 * log2_lam), 0.0)
    mu = _load_kc(mu_ptr, k, c, K, C, 0.0, ACC)
    log_sigma = _load_kc(log_sigma_ptr, k, c, K, C, 0.0, ACC)
    offset, curvature = tm.logit_coefficients(log2_lam[:, None], log_sigma)
    inv_sigma2 = tl.exp(-2.0 * log_sigma)
    return (
        mu[:, :, None],
        offset[:, :, None],
        curvature[:, :, None],
        inv_sigma2[:, :, None],
        inv_sqrt_lam[:, None, None],
    )


@triton.jit
def _load_channel(ptr, c, C, default, HAS: tl.constexpr, ACC: tl.constexpr):
    """A ``[BLOCK_C]`` block of an optional per-channel tensor (``default`` when absent)."""
    if HAS:
        value = tl.load(ptr + c, mask=c < C, other=default).to(ACC)
    else:
        value = tl.full(c.shape, default, ACC)
    return value


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


@triton.jit(do_not_specialize=_BATCH_DEPENDENT_ARGS)
def _stats_partials_kernel(
    x_ptr, mu_ptr, log_sigma_ptr, mix_logits_ptr, partials_ptr,
    N, C, L, x_sn, x_sc, x_sl,
    num_m_tiles, l_tiles, tiles_per_program,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
):
    """Statistics pass: per program, the weighted summary of its element tiles.

    Writes ``partials[program, :, k, c] = (sum tau, mean, sum tau (x - mean)**2)``
    of ``x - pivot_c`` (pivot: the channel's first element, so the sums stay
    of the order of the spread and not of ``|mean|``). Each tile is summarised
    with a two-pass mean/deviation on the values in registers, then
    Chan-merged into the program's running summary.
    """
    pid_m = tl.program_id(0)
    k = tl.arange(0, K_PAD)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mu, offset, curvature, _, _ = _mixture_block(mu_ptr, log_sigma_ptr, mix_logits_ptr, k, c, K, C, ACC)
    x_c = c.to(tl.int64) * x_sc
    pivot = tl.load(x_ptr + x_c, mask=c_ok, other=0.0).to(ACC)

    count = tl.zeros([K_PAD, BLOCK_C], ACC)
    mean = tl.zeros([K_PAD, BLOCK_C], ACC)
    m2 = tl.zeros([K_PAD, BLOCK_C], ACC)
    first = pid_m * tiles_per_program
    for tile in range(first, tl.minimum(first + tiles_per_program, num_m_tiles)):
        n, pos, e_ok = _tile_elements(tile, N, L, l_tiles, BLOCK_N, BLOCK_L)
        ok = c_ok[:, None] & e_ok[None, :]
        x = tl.load(x_ptr + x_c[:, None] + _element_offsets(n, pos, x_sn, x_sl)[None, :], mask=ok, other=0.0)
        x = x.to(ACC)
        tau = tm.responsibilities(x[None, :, :], mu, offset, curvature)[0]
        tau = tl.where(ok[None, :, :], tau, 0.0)
        shifted = (x - pivot[:, None])[None, :, :]
        tile_count = tl.sum(tau, 2)
        tile_mean = tl.sum(tau * shifted, 2) / tl.where(tile_count > 0, tile_count, 1.0)
        deviation = shifted - tile_mean[:, :, None]
        tile_m2 = tl.sum(tau * deviation * deviation, 2)
        count, mean, m2 = tm.chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)

    block = partials_ptr + pid_m.to(tl.int64) * (3 * K * C)
    _store_kc(block, count, k, c, K, C)
    _store_kc(block + K * C, mean, k, c, K, C)
    _store_kc(block + 2 * K * C, m2, k, c, K, C)


@triton.jit(do_not_specialize=["num_partials"])
def _merge_stats_kernel(
    partials_ptr, x_ptr, mean_ptr, var_ptr, mass_ptr,
    num_partials, C, x_sc,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Second stage of the statistics: Chan-merge the programs' summaries in a fixed order.

    Writes SPEC's ``mass = S``, ``mean = sum tau x / (S + 1e-12)`` and
    ``var = sum tau (x - mean)**2 / (S + 1e-12)`` (the ``1e-12`` makes an empty
    component's statistics zero rather than NaN).
    """
    k = tl.arange(0, K_PAD)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    count = tl.zeros([K_PAD, BLOCK_C], ACC)
    mean = tl.zeros([K_PAD, BLOCK_C], ACC)
    m2 = tl.zeros([K_PAD, BLOCK_C], ACC)
    block = partials_ptr  # advanced by pointer increments: 64-bit, however many partials
    for _ in range(num_partials):
        count, mean, m2 = tm.chan_merge(
            count, mean, m2,
            _load_kc(block, k, c, K, C, 0.0, ACC),
            _load_kc(block + K * C, k, c, K, C, 0.0, ACC),
            _load_kc(block + 2 * K * C, k, c, K, C, 0.0, ACC),
        )
        block += 3 * K * C
    pivot = tl.load(x_ptr + c.to(tl.int64) * x_sc, mask=c < C, other=0.0).to(ACC)
    weighted_mean = pivot[None, :] + mean
    denominator = count + _MASS_EPS
    spec_mean = weighted_mean * (count / denominator)
    # sum tau (x - spec_mean)**2 = m2 + S (weighted_mean - spec_mean)**2 (parallel axes).
    gap = weighted_mean - spec_mean
    _store_kc(mass_ptr, count, k, c, K, C)
    _store_kc(mean_ptr, spec_mean, k, c, K, C)
    _store_kc(var_ptr, (m2 + count * gap * gap) / denominator, k, c, K, C)


@triton.jit(do_not_specialize=_BATCH_DEPENDENT_ARGS)
def _normalize_kernel(
    x_ptr, out_ptr, mu_ptr, log_sigma_ptr, mix_logits_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    N, C, L, x_sn, x_sc, x_sl, out_sn, out_sc, out_sl,
    num_m_tiles, l_tiles, tiles_per_program,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    """Normalise pass: ``out = gamma * sum_k tau_k (x - mean_k) / sqrt(lam_k (var_k + eps)) + beta``.

    The training forward's second pass (batch statistics) and the whole eval
    forward (given statistics). ``EPS`` is a constexpr so that it has the
    accumulation dtype's precision (a float argument would be float32).
    """
    pid_m = tl.program_id(0)
    k = tl.arange(0, K_PAD)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mu, offset, curvature, _, inv_sqrt_lam = _mixture_block(
        mu_ptr, log_sigma_ptr, mix_logits_ptr, k, c, K, C, ACC
    )
    stat_mean = _load_kc(mean_ptr, k, c, K, C, 0.0, ACC)[:, :, None]
    rstd = tl.math.rsqrt(_load_kc(var_ptr, k, c, K, C, 1.0, ACC) + EPS)[:, :, None]
    gamma = _load_channel(weight_ptr, c, C, 1.0, HAS_WEIGHT, ACC)
    beta = _load_channel(bias_ptr, c, C, 0.0, HAS_BIAS, ACC)
    scale = inv_sqrt_lam * rstd * gamma[None, :, None]
    x_c = c.to(tl.int64) * x_sc
    out_c = c.to(tl.int64) * out_sc

    first = pid_m * tiles_per_program
    for tile in range(first, tl.minimum(first + tiles_per_program, num_m_tiles)):
        n, pos, e_ok = _tile_elements(tile, N, L, l_tiles, BLOCK_N, BLOCK_L)
        ok = c_ok[:, None] & e_ok[None, :]
        x = tl.load(x_ptr + x_c[:, None] + _element_offsets(n, pos, x_sn, x_sl)[None, :], mask=ok, other=0.0)
        x = x.to(ACC)
        tau = tm.responsibilities(x[None, :, :], mu, offset, curvature)[0]
        y = tm.mixture_normalize(tau, x[None, :, :] - stat_mean, scale) + beta[:, None]
        out_ptrs = out_ptr + out_c[:, None] + _element_offsets(n, pos, out_sn, out_sl)[None, :]
        _store_rounded(out_ptrs, y, ok, BF16_BY_BITS)


@triton.jit(do_not_specialize=_BATCH_DEPENDENT_ARGS)
def _backward_reduce_kernel(
    x_ptr, dout_ptr, mu_ptr, log_sigma_ptr, mix_logits_ptr, mean_ptr, stat_partials_ptr, dbeta_partials_ptr,
    N, C, L, x_sn, x_sc, x_sl, dout_sn, dout_sc, dout_sl,
    num_m_tiles, l_tiles, tiles_per_program,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
):
    """Training backward, first pass: per program ``sum dout tau``, ``sum dout tau d`` and ``sum dout``.

    These are ``A_k / gamma``, ``B_k / gamma`` and ``dbeta`` of DESIGN.md; the
    elementwise pass needs their totals (the gradient of ``m_k``, ``v_k``).
    """
    pid_m = tl.program_id(0)
    k = tl.arange(0, K_PAD)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mu, offset, curvature, _, _ = _mixture_block(mu_ptr, log_sigma_ptr, mix_logits_ptr, k, c, K, C, ACC)
    stat_mean = _load_kc(mean_ptr, k, c, K, C, 0.0, ACC)[:, :, None]
    x_c = c.to(tl.int64) * x_sc
    dout_c = c.to(tl.int64) * dout_sc

    sum_dout_tau = tl.zeros([K_PAD, BLOCK_C], ACC)
    sum_dout_tau_d = tl.zeros([K_PAD, BLOCK_C], ACC)
    sum_dout = tl.zeros([BLOCK_C], ACC)
    first = pid_m * tiles_per_program
    for tile in range(first, tl.minimum(first + tiles_per_program, num_m_tiles)):
        n, pos, e_ok = _tile_elements(tile, N, L, l_tiles, BLOCK_N, BLOCK_L)
        ok = c_ok[:, None] & e_ok[None, :]
        x = tl.load(x_ptr + x_c[:, None] + _element_offsets(n, pos, x_sn, x_sl)[None, :], mask=ok, other=0.0)
        x = x.to(ACC)
        dout = tl.load(
            dout_ptr + dout_c[:, None] + _element_offsets(n, pos, dout_sn, dout_sl)[None, :], mask=ok, other=0.0
        ).to(ACC)
        tau = tm.responsibilities(x[None, :, :], mu, offset, curvature)[0]
        dout_tau = dout[None, :, :] * tau  # zero outside the tensor: dout was loaded as 0 there
        sum_dout_tau += tl.sum(dout_tau, 2)
        sum_dout_tau_d += tl.sum(dout_tau * (x[None, :, :] - stat_mean), 2)
        sum_dout += tl.sum(dout, 1)

    block = stat_partials_ptr + pid_m.to(tl.int64) * (2 * K * C)
    _store_kc(block, sum_dout_tau, k, c, K, C)
    _store_kc(block + K * C, sum_dout_tau_d, k, c, K, C)
    tl.store(dbeta_partials_ptr + pid_m.to(tl.int64) * C + c, sum_dout, mask=c_ok)


@triton.jit(do_not_specialize=_BATCH_DEPENDENT_ARGS)
def _backward_elementwise_kernel(
    x_ptr, dout_ptr, dx_ptr,
    mu_ptr, log_sigma_ptr, mix_logits_ptr, mean_ptr, var_ptr, weight_ptr,
    mass_ptr, dmean_ptr, dvar_ptr,
    mix_partials_ptr, stat_partials_ptr, dbeta_partials_ptr,
    N, C, L, x_sn, x_sc, x_sl, dout_sn, dout_sc, dout_sl, dx_sn, dx_sc, dx_sl,
    num_m_tiles, l_tiles, tiles_per_program,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, MIXTURE_GRAD: tl.constexpr,
    EPS: tl.constexpr, ACC: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """Backward elementwise pass: writes ``dx`` and per-program partial sums.

    ``TRAINING``: batch statistics, with ``mass`` and the loss's partials
    ``dmean = Gm``, ``dvar = Gv`` from the reduction pass. Eval: given
    statistics; the pass also sums ``dout tau``, ``dout tau d`` and ``dout``
    (``stat_partials``, ``dbeta_partials``), which eval needs only for the
    parameter gradients. ``MIXTURE_GRAD``: also sum ``U (x - mu) / sigma**2``,
    ``U (z**2 - 1)`` and ``U`` (``mix_partials``) for ``d mu``, ``d log_sigma``
    and ``d log(lam)``.
    """
    pid_m = tl.program_id(0)
    k = tl.arange(0, K_PAD)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mu, offset, curvature, inv_sigma2, inv_sqrt_lam = _mixture_block(
        mu_ptr, log_sigma_ptr, mix_logits_ptr, k, c, K, C, ACC
    )
    stat_mean = _load_kc(mean_ptr, k, c, K, C, 0.0, ACC)[:, :, None]
    var = _load_kc(var_ptr, k, c, K, C, 1.0, ACC)
    gamma = _load_channel(weight_ptr, c, C, 1.0, HAS_WEIGHT, ACC)
    # g a_k r_k = dout * component_scale: the gradient of y through d_ik alone.
    component_scale = inv_sqrt_lam * tl.math.rsqrt(var + EPS)[:, :, None] * gamma[None, :, None]
    if TRAINING:
        inv_mass = 1.0 / (_load_kc(mass_ptr, k, c, K, C, 0.0, ACC) + _MASS_EPS)
        dmean_per_mass = (_load_kc(dmean_ptr, k, c, K, C, 0.0, ACC) * inv_mass)[:, :, None]
        dvar_per_mass = (_load_kc(dvar_ptr, k, c, K, C, 0.0, ACC) * inv_mass)[:, :, None]
    x_c = c.to(tl.int64) * x_sc
    dout_c = c.to(tl.int64) * dout_sc
    dx_c = c.to(tl.int64) * dx_sc

    sum_u_w = tl.zeros([K_PAD, BLOCK_C], ACC)
    sum_u_z2m1 = tl.zeros([K_PAD, BLOCK_C], ACC)
    sum_u = tl.zeros([K_PAD, BLOCK_C], ACC)
    sum_dout_tau = tl.zeros([K_PAD, BLOCK_C], ACC)
    sum_dout_tau_d = tl.zeros([K_PAD, BLOCK_C], ACC)
    sum_dout = tl.zeros([BLOCK_C], ACC)
    first = pid_m * tiles_per_program
    for tile in range(first, tl.minimum(first + tiles_per_program, num_m_tiles)):
        n, pos, e_ok = _tile_elements(tile, N, L, l_tiles, BLOCK_N, BLOCK_L)
        ok = c_ok[:, None] & e_ok[None, :]
        x = tl.load(x_ptr + x_c[:, None] + _element_offsets(n, pos, x_sn, x_sl)[None, :], mask=ok, other=0.0)
        x = x.to(ACC)
        dout = tl.load(
            dout_ptr + dout_c[:, None] + _element_offsets(n, pos, dout_sn, dout_sl)[None, :], mask=ok, other=0.0
        ).to(ACC)
        tau, diff = tm.responsibilities(x[None, :, :], mu, offset, curvature)
        # Zero tau outside the tensor so that no partial sum sees those lanes.
        tau = tl.where(ok[None, :, :], tau, 0.0)
        centered = x[None, :, :] - stat_mean
        direct = dout[None, :, :] * component_scale
        if TRAINING:
            dtau = tm.batch_stats_dtau(direct, centered, dmean_per_mass, dvar_per_mass, var[:, :, None])
            dx = tm.batch_stats_dx_direct(tau, direct, centered, dmean_per_mass, dvar_per_mass)
        else:
            dtau = direct * centered
            dx = tl.sum(tau * direct, 0)
        u = tm.logit_gradient(tau, dtau)
        w = diff * inv_sigma2  # d logit / d mu = (x - mu) / sigma**2 = -d logit / d x
        u_w = u * w
        dx -= tl.sum(u_w, 0)
        dx_ptrs = dx_ptr + dx_c[:, None] + _element_offsets(n, pos, dx_sn, dx_sl)[None, :]
        _store_rounded(dx_ptrs, dx, ok, BF16_BY_BITS)
        if MIXTURE_GRAD:
            sum_u_w += tl.sum(u_w, 2)
            sum_u_z2m1 += tl.sum(u_w * diff - u, 2)
            sum_u += tl.sum(u, 2)
        if not TRAINING:
            dout_tau = dout[None, :, :] * tau
            sum_dout_tau += tl.sum(dout_tau, 2)
            sum_dout_tau_d += tl.sum(dout_tau * centered, 2)
            sum_dout += tl.sum(dout, 1)

    if MIXTURE_GRAD:
        block = mix_partials_ptr + pid_m.to(tl.int64) * (3 * K * C)
        _store_kc(block, sum_u_w, k, c, K, C)
        _store_kc(block + K * C, sum_u_z2m1, k, c, K, C)
        _store_kc(block + 2 * K * C, sum_u, k, c, K, C)
    if not TRAINING:
        block = stat_partials_ptr + pid_m.to(tl.int64) * (2 * K * C)
        _store_kc(block, sum_dout_tau, k, c, K, C)
        _store_kc(block + K * C, sum_dout_tau_d, k, c, K, C)
        tl.store(dbeta_partials_ptr + pid_m.to(tl.int64) * C + c, sum_dout, mask=c_ok)

