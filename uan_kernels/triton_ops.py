"""Triton backend of UAN: fused kernels, their launchers and the ``uan::triton_*`` operators.

Public functions (the ``"triton"`` backend of :mod:`uan_kernels._backends`):

* :func:`train_forward` ``(x, mu, log_sigma, mix_logits, weight, bias, eps) -> (out, mean, var, mass)``
* :func:`eval_forward` ``(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps) -> out``

with the semantics of :func:`uan_kernels.reference.uan_train` and
:func:`~uan_kernels.reference.uan_eval`, differentiable with the exact gradient
(DESIGN.md). The batch statistics returned by :func:`train_forward` are marked
non-differentiable: their dependence on ``x`` is already part of ``out``'s
gradient.

Operators (``torch.library.custom_op``, with fake implementations and autograd,
so they work under ``torch.compile(fullgraph=True)``)::

    uan::triton_forward(Tensor x, Tensor mu, Tensor log_sigma, Tensor mix_logits,
                        Tensor? weight, Tensor? bias, float eps)
        -> (Tensor out, Tensor mean, Tensor var, Tensor mass)
    uan::triton_forward_eval(Tensor x, Tensor mu, Tensor log_sigma, Tensor mix_logits,
                             Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps)
        -> Tensor
    uan::triton_backward(Tensor grad_out, Tensor x, Tensor mu, Tensor log_sigma,
                         Tensor mix_logits, Tensor? weight, Tensor mean, Tensor var,
                         Tensor? mass, float eps, bool mixture_grad)
        -> (Tensor grad_input, Tensor grad_mu, Tensor grad_log_sigma,
            Tensor grad_mix_logits, Tensor grad_weight, Tensor grad_bias,
            Tensor grad_mean, Tensor grad_var)

``triton_backward`` differentiates the training forward when ``mass`` is given
(``mean``, ``var``, ``mass`` are then the batch statistics, functions of ``x``)
and the eval forward when it is None (given statistics). ``mixture_grad=False``
skips the sums of the mixture-parameter gradients (``update="moving_average"``,
where they are buffers) and returns zeros for them. ``grad_weight`` is the
gradient w.r.t. ``gamma`` (computed as if ``gamma = 1`` when ``weight`` is None);
``grad_mean``/``grad_var`` are the loss's partial derivatives w.r.t. the
statistics used to normalise (``-a r A`` and ``-a r^3 B / 2`` of DESIGN.md):
in eval the gradients of the given ``mean``/``var``, in training
the intermediate terms already folded into ``grad_input``. ``triton_backward``
is itself differentiable (double backward), through the reference's PyTorch
math rather than fused kernels.

Kernels view ``x`` as ``(N, C, L)`` with its own strides (a view for contiguous
and channels_last tensors, so no hidden copy) and walk it in tiles of
``BLOCK_C`` channels by ``BLOCK_N * BLOCK_L`` elements. A grid of
``(programs, channel tiles)`` programs each loops over a contiguous run of
element tiles. Training forward: a statistics pass (per program Chan-merged
weighted summaries, shifted by a per-channel pivot) + a deterministic merge
kernel + a normalise pass. Eval forward: the normalise pass alone. Backward:
a reduction pass (training only) + an elementwise pass writing ``grad_input``
and per-program partial sums, reduced by ``torch.sum`` (no atomics, so every
result is bitwise reproducible).

``eps`` is a compile-time constant of the kernels (so that it keeps float64
precision for float64 input): each distinct value compiles its own kernels.
Statistics and all accumulation are float32, or float64 for float64 input.

On CPU tensors the kernels run under the Triton interpreter, which must be
enabled (``TRITON_INTERPRET=1``) before this module is imported.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from . import triton_math as tm
from ._backends import MAX_FUSED_COMPONENTS
from .reference import MASS_EPS, compute_dtype


def _interpreter_enabled() -> bool:
    """Triton's own reading of ``TRITON_INTERPRET`` (``triton.knobs`` since Triton 3.4)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Whether @triton.jit functions run in the interpreter (the only way to run
# them on CPU tensors); Triton reads the setting when the kernels below are defined.
INTERPRETED: bool = _interpreter_enabled()

# Element-tile sizes. The interpreter runs one numpy operation per block
# operation, so large tiles amortise its per-operation overhead. On a GPU the
# K_PAD values per element live in registers: the tile shrinks as K grows, and
# by half again when channels are the innermost axis (each thread then also
# holds the per-(k, c) constants of several channels). These keep the heaviest
# kernel (training backward) at <= 255 registers without spills on sm_90.
_INTERPRETER_TILE = 16384
_GPU_COMPONENT_VALUES_PER_TILE = 4096
_GPU_MAX_TILE = 2048
# Channels per tile when channels are the innermost axis (channels_last,
# (N, C) input): 32 float32 values fill a 128-byte memory transaction.
_GPU_CHANNEL_BLOCK = 32
# With L-contiguous data and a small L, several channels share a tile so that
# each run of consecutive addresses (BLOCK_C * L elements) is at least this long.
_MIN_CONTIGUOUS_RUN = 128
# Programs per channel tile under the interpreter: more than one exercises the
# cross-program merge, more would only slow the interpreter down.
_INTERPRETER_PROGRAMS = 2
_GPU_PROGRAMS_PER_SM = 4
_MERGE_BLOCK_C = 128

# Ints that vary with the batch size are not specialised on (divisibility by
# 16, equality to 1), so a new batch size does not trigger a recompilation.
_BATCH_DEPENDENT_ARGS = ["N", "num_m_tiles", "tiles_per_program"]

# Globals read inside kernels must be constexpr.
_MASS_EPS = tl.constexpr(MASS_EPS)
_NEG_INF = tl.constexpr(float("-inf"))


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Launch geometry
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TileGeometry:
    """How a ``(N, C, L)`` tensor is cut into tiles and programs.

    Block sizes depend on ``C``, ``L``, the layout, ``K`` and the device, never
    on ``N``: a new batch size changes only the (runtime) program count and loop
    bounds, so it reuses the compiled kernels.
    """

    block_c: int
    block_n: int
    block_l: int
    c_tiles: int
    l_tiles: int
    m_tiles: int
    programs: int
    tiles_per_program: int
    num_warps: int

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.programs, self.c_tiles)

    def kernel_args(self) -> Tuple[int, int, int]:
        return (self.m_tiles, self.l_tiles, self.tiles_per_program)

    def kernel_meta(self) -> dict:
        return dict(BLOCK_C=self.block_c, BLOCK_N=self.block_n, BLOCK_L=self.block_l, num_warps=self.num_warps)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fit_block(extent: int, cap: int) -> int:
    """A power-of-two block for an axis of length ``extent``, at most ``cap``.

    The largest one whose padding (``cdiv(extent, b) * b - extent``) is at most
    1/8 of ``extent``, looking down to an eighth of the largest candidate;
    otherwise the least-padded of those. E.g. L = 36*36 = 1296 with cap 1024
    gets 128 (1408 lanes, 8% masked) rather than 1024 (2048 lanes, 37% masked).
    """
    largest = min(triton.next_power_of_2(max(extent, 1)), cap)
    best = block = largest
    while block >= max(1, largest // 8):
        padded = _cdiv(extent, block) * block
        if 8 * padded <= 9 * extent:
            return block
        if padded < _cdiv(extent, best) * best:
            best = block
        block //= 2
    return best


@functools.lru_cache(maxsize=None)
def _gpu_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_geometry(x3: Tensor, num_components: int) -> TileGeometry:
    """Block sizes, grid and loop bounds for the kernels on ``x3`` of shape ``(N, C, L)``."""
    N, C, L = x3.shape
    k_pad = triton.next_power_of_2(num_components)
    on_gpu = x3.device.type == "cuda"
    _, stride_c, stride_l = x3.stride()
    channels_innermost = stride_c == 1 and (L == 1 or stride_l != 1)
    if on_gpu:
        tile = min(_GPU_MAX_TILE, _GPU_COMPONENT_VALUES_PER_TILE // k_pad)
        tile //= 2 if channels_innermost else 1
        # At least 8 elements per channel: at K = 16 a 32-channel tile spills.
        channel_cap = min(_GPU_CHANNEL_BLOCK, tile // 8)
    else:
        tile = channel_cap = _INTERPRETER_TILE
    if channels_innermost:
        block_c = _fit_block(C, min(channel_cap, tile))
        block_l = _fit_block(L, tile // block_c)
    else:
        block_l = _fit_block(L, tile)
        block_c = _fit_block(C, max(1, _MIN_CONTIGUOUS_RUN // block_l))
    block_n = max(1, tile // (block_c * block_l))
    l_tiles = _cdiv(L, block_l)
    c_tiles = _cdiv(C, block_c)
    m_tiles = _cdiv(N, block_n) * l_tiles
    if on_gpu:
        target = _cdiv(_GPU_PROGRAMS_PER_SM * _gpu_sm_count(x3.device.index or 0), c_tiles)
    else:
        target = _INTERPRETER_PROGRAMS
    programs = max(1, min(m_tiles, target))
    tiles_per_program = _cdiv(m_tiles, programs)
    programs = max(1, _cdiv(m_tiles, max(1, tiles_per_program)))
    num_warps = 8 if tile >= 256 else 4
    return TileGeometry(block_c, block_n, block_l, c_tiles, l_tiles, m_tiles, programs, tiles_per_program, num_warps)


# --------------------------------------------------------------------------- #
# Launchers (the real implementations of the operators)
# --------------------------------------------------------------------------- #


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bf16_by_bits(out: Tensor) -> bool:
    return INTERPRETED and out.dtype == torch.bfloat16


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
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "uan_kernels.triton_ops runs CPU tensors only under the Triton interpreter: "
            "set TRITON_INTERPRET=1 before importing uan_kernels"
        )


def _params(*tensors: Optional[Tensor]):
    """Contiguous ``(K, C)`` / ``(K,)`` / ``(C,)`` operands (no-ops for the usual parameters)."""
    return [None if t is None else t.contiguous() for t in tensors]


def _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, geometry):
    K, C = mu.shape
    N, _, L = x3.shape
    _normalize_kernel[geometry.grid](
        x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias,
        N, C, L, *x3.stride(), *out3.stride(), *geometry.kernel_args(),
        K=K, K_PAD=triton.next_power_of_2(K), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        EPS=eps, ACC=_triton_dtype(compute_dtype(x3.dtype)), BF16_BY_BITS=_bf16_by_bits(out3),
        **geometry.kernel_meta(),
    )


def _forward_train_impl(x, mu, log_sigma, mix_logits, weight, bias, eps):
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
    geometry = tile_geometry(x3, K)
    N, _, L = x3.shape
    k_pad = triton.next_power_of_2(K)
    partials = torch.empty((geometry.programs, 3, K, C), dtype=acc, device=x.device)
    _stats_partials_kernel[geometry.grid](
        x3, mu, log_sigma, mix_logits, partials,
        N, C, L, *x3.stride(), *geometry.kernel_args(),
        K=K, K_PAD=k_pad, ACC=_triton_dtype(acc), **geometry.kernel_meta(),
    )
    merge_block = min(_MERGE_BLOCK_C, triton.next_power_of_2(C))
    _merge_stats_kernel[(_cdiv(C, merge_block),)](
        partials, x3, mean, var, mass, geometry.programs, C, x3.stride(1),
        K=K, K_PAD=k_pad, BLOCK_C=merge_block, ACC=_triton_dtype(acc),
    )
    _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, geometry)
    if scratch:
        out.copy_(out3.view(out.shape))
    return out, mean, var, mass


def _forward_eval_impl(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps):
    _check_launch(x, mu)
    mu, log_sigma, mix_logits, mean, var, weight, bias = _params(mu, log_sigma, mix_logits, mean, var, weight, bias)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x3 = _input_ncl(x)
    out3, scratch = _output_ncl(out)
    _launch_normalize(x3, out3, mu, log_sigma, mix_logits, mean, var, weight, bias, eps, tile_geometry(x3, mu.shape[0]))
    if scratch:
        out.copy_(out3.view(out.shape))
    return out


def _backward_impl(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad):
    _check_launch(x, mu)
    training = mass is not None
    acc = compute_dtype(x.dtype)
    K, C = mu.shape
    mu, log_sigma, mix_logits, weight, mean, var, mass = _params(mu, log_sigma, mix_logits, weight, mean, var, mass)
    grad_input = torch.empty_like(x)
    x3 = _input_ncl(x)
    dout3 = _input_ncl(grad_out)
    dx3, scratch = _output_ncl(grad_input)
    N, _, L = x3.shape
    geometry = tile_geometry(x3, K)
    programs = geometry.programs if x.numel() else 0
    launch = dict(K=K, K_PAD=triton.next_power_of_2(K), ACC=_triton_dtype(acc), **geometry.kernel_meta())
    shape_args = (N, C, L, *x3.stride(), *dout3.stride())

    # O(K*C) terms of DESIGN.md in the accumulation dtype: lam, and a_k r_k.
    log_lam = torch.log_softmax(mix_logits.to(acc), dim=0)
    rstd = torch.rsqrt(var.to(acc) + eps)
    component_scale = torch.exp(-0.5 * log_lam)[:, None] * rstd
    gamma = weight.to(acc)[None, :] if weight is not None else 1.0

    # Per-program partial sums; every program writes its rows in full.
    stat_partials = torch.empty((programs, 2, K, C), dtype=acc, device=x.device)
    dbeta_partials = torch.empty((programs, C), dtype=acc, device=x.device)
    mix_partials = torch.empty((programs, 3, K, C), dtype=acc, device=x.device) if mixture_grad else None

    def statistic_gradients():
        """``sum dout tau``, ``sum dout tau d`` and ``Gm = dL/dmean``, ``Gv = dL/dvar``."""
        dout_tau, dout_tau_d = stat_partials.sum(0)
        dmean = -component_scale * gamma * dout_tau
        dvar = -0.5 * component_scale * rstd * rstd * gamma * dout_tau_d
        return dout_tau_d, dmean, dvar

    def launch_elementwise(dmean, dvar):
        if programs:
            _backward_elementwise_kernel[geometry.grid](
                x3, dout3, dx3, mu, log_sigma, mix_logits, mean, var, weight,
                mass, dmean, dvar, mix_partials, stat_partials, dbeta_partials,
                *shape_args, *dx3.stride(), *geometry.kernel_args(),
                HAS_WEIGHT=weight is not None, TRAINING=training, MIXTURE_GRAD=mixture_grad, EPS=eps,
                BF16_BY_BITS=_bf16_by_bits(dx3), **launch,
            )

    if training:
        if programs:
            _backward_reduce_kernel[geometry.grid](
                x3, dout3, mu, log_sigma, mix_logits, mean, stat_partials, dbeta_partials,
                *shape_args, *geometry.kernel_args(), **launch,
            )
        dout_tau_d, dmean, dvar = statistic_gradients()
        launch_elementwise(dmean, dvar)
    else:
        # Eval: the statistics are constants, so dx needs no reduction first.
        launch_elementwise(None, None)
        dout_tau_d, dmean, dvar = statistic_gradients()
    if scratch:
        grad_input.copy_(dx3.view(grad_input.shape))

    grad_weight = (component_scale * dout_tau_d).sum(0)
    grad_bias = dbeta_partials.sum(0)
    if mixture_grad:
        # One sum per quantity: outputs of an operator must not be views of one tensor.
        grad_mu, grad_log_sigma, sum_u = (mix_partials[:, q].sum(0) for q in range(3))
        # d log(lam_k): through the logits (sum U) and through a_k = lam_k**-0.5.
        grad_log_lam = (sum_u - 0.5 * component_scale * gamma * dout_tau_d).sum(1)
        grad_mix_logits = grad_log_lam - log_lam.exp() * grad_log_lam.sum()
    else:
        grad_mu = torch.zeros_like(mu)
        grad_log_sigma = torch.zeros_like(log_sigma)
        grad_mix_logits = torch.zeros_like(mix_logits)
    param_dtype = mu.dtype
    return (
        grad_input,
        grad_mu.to(param_dtype),
        grad_log_sigma.to(param_dtype),
        grad_mix_logits.to(param_dtype),
        grad_weight.to(param_dtype),
        grad_bias.to(param_dtype),
        dmean.to(mean.dtype),
        dvar.to(var.dtype),
    )


# --------------------------------------------------------------------------- #
# Operators and autograd
# --------------------------------------------------------------------------- #


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
    return _forward_train_impl(x, mu, log_sigma, mix_logits, weight, bias, eps)


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
    return _forward_eval_impl(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps)


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
    return _backward_impl(grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grad)


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
    ctx.save_for_backward(x, mu, log_sigma, mix_logits, weight, mean, var, mass)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _backward_forward(ctx, grad_out, _grad_mean, _grad_var, _grad_mass):
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


def _backward_forward_eval(ctx, grad_out):
    x, mu, log_sigma, mix_logits, mean, var, weight = ctx.saved_tensors
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


_triton_forward.register_autograd(_backward_forward, setup_context=_setup_forward)
_triton_forward_eval.register_autograd(_backward_forward_eval, setup_context=_setup_forward_eval)
_triton_backward.register_autograd(_double_backward, setup_context=_setup_backward)


# --------------------------------------------------------------------------- #
# Backend entry points
# --------------------------------------------------------------------------- #


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
