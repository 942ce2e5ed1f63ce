"""Per-element math of UAN shared by the Triton kernels of :mod:`.kernels`, on folded constants.

Every per-(k, c) quantity that does not depend on the element is computed once
per program (or by a finalize kernel), so that an element costs a few fused
multiply-adds per component (DESIGN.md, "Instruction-minimal element math").

Conventions: a kernel holds its ``K`` components as tuples of ``K`` blocks
(unrolled with ``tl.static_range``), so exactly ``K`` exponentials are computed
per element, never padded ones. Per-component constants are ``[BLOCK_C, 1]``
blocks, element values ``[BLOCK_C, BLOCK_E]`` blocks. Elements enter as
``xs = x - pivot``, centred on a per-channel pivot (a value of the channel), so
that folded offsets such as ``b_k = -a_k (mu_k - pivot)`` stay of the order of
the data's spread and do not cancel when ``|x| >> spread``. All arithmetic
happens in the dtype of the inputs (float32, or float64 for float64 tensors).

Notation of DESIGN.md: ``tau`` responsibilities, ``d = x - m_k``,
``T = dL/dtau``, ``U = dL/dlogit``.
"""
import math

import triton
import triton.language as tl

from .interpreter import INTERPRETED

LOG2E = tl.constexpr(1.4426950408889634)
# t_k = a_k (x - mu_k) with a_k = RESPONSIBILITY_SCALE / sigma_k makes the base-2
# logit's quadratic term exactly t_k**2: log2(e) * z**2 / 2 = t**2.
RESPONSIBILITY_SCALE = tl.constexpr(math.sqrt(1.4426950408889634 / 2))
# (x - mu) / sigma**2 = t * a * GRADIENT_SCALE and z**2 = t**2 * GRADIENT_SCALE.
GRADIENT_SCALE = tl.constexpr(2 / 1.4426950408889634)
# The interpreter runs no PTX.
_PTX = tl.constexpr(not INTERPRETED)


@triton.jit
def reciprocal(x):
    """``1 / x``; in float32 on a GPU the hardware's approximation (relative error below 2**-22).

    ``x`` is a sum of the ``e_k``, in ``[1, K]``: no operand is near a range
    limit, so the IEEE division's scaling fix-ups (8 instructions) are not needed.
    """
    if _PTX and x.dtype == tl.float32:
        inverse = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        inverse = 1.0 / x
    return inverse


@triton.jit
def log2_mixing_weights(mix_logits, K: tl.constexpr):
    """``log2(softmax(mix_logits))`` of a tuple of ``K`` logits (base 2: the responsibilities use ``exp2``)."""
    top = mix_logits[0]
    for k in tl.static_range(1, K):
        top = tl.maximum(top, mix_logits[k])
    total = tl.exp2((mix_logits[0] - top) * LOG2E)
    for k in tl.static_range(1, K):
        total += tl.exp2((mix_logits[k] - top) * LOG2E)
    log2_total = top * LOG2E + tl.log2(total)
    log2_lam = ()
    for k in tl.static_range(K):
        log2_lam = log2_lam + (mix_logits[k] * LOG2E - log2_total,)
    return log2_lam


@triton.jit
def logit_coefficients(mu, log_sigma, log2_lam, pivot):
    """Per-component ``(a, b, prior)``: ``log2(e) * logit = prior - (a * xs + b)**2``.

    ``a = RESPONSIBILITY_SCALE / sigma``, ``b = -a (mu - pivot)``,
    ``prior = log2(lam) - log2(e) log_sigma``: one multiply-add and one
    negated multiply-add per element and component.
    """
    a = RESPONSIBILITY_SCALE * tl.exp(-log_sigma)
    b = (pivot - mu) * a
    prior = log2_lam - LOG2E * log_sigma
    return a, b, prior


@triton.jit
def component_weights(xs, a, b, prior, K: tl.constexpr):
    """``(t, e, total)``: ``t_k = a_k xs + b_k``, unnormalised ``e_k`` and ``total = sum_k e_k``.

    ``tau_k = e_k / total``. The largest logit is subtracted before ``exp2``, so
    an element far from every component still gets a valid distribution (the
    largest ``e_k`` is exactly 1, so ``total`` is in ``[1, K]``).
    """
    t = ()
    logits = ()
    for k in tl.static_range(K):
        t_k = a[k] * xs + b[k]
        t = t + (t_k,)
        logits = logits + (prior[k] - t_k * t_k,)
    top = logits[0]
    for k in tl.static_range(1, K):
        top = tl.maximum(top, logits[k])
    e = (tl.exp2(logits[0] - top),)
    total = e[0]
    for k in tl.static_range(1, K):
        e_k = tl.exp2(logits[k] - top)
        e = e + (e_k,)
        total += e_k
    return t, e, total


@triton.jit
def mixture_transform(xs, e, scale, offset, K: tl.constexpr):
    """``sum_k e_k (scale_k xs + offset_k)``: times ``1 / total``, the normalised element (SPEC eq. 9).

    ``scale_k = gamma / sqrt(lam_k (var_k + eps))`` and
    ``offset_k = beta - scale_k (mean_k - pivot)``: beta folds into the offsets
    because the ``tau_k`` sum to 1.
    """
    acc = tl.zeros_like(xs)
    for k in tl.static_range(K):
        acc += e[k] * (scale[k] * xs + offset[k])
    return acc


@triton.jit
def accumulate_moments(mass, first, second, e, inv_total, xs, K: tl.constexpr):
    """Add an element's ``tau_k``, ``tau_k xs`` and ``tau_k xs**2`` to the running per-lane sums."""
    new_mass = ()
    new_first = ()
    new_second = ()
    for k in tl.static_range(K):
        tau = e[k] * inv_total
        tau_x = tau * xs
        new_mass = new_mass + (mass[k] + tau,)
        new_first = new_first + (first[k] + tau_x,)
        new_second = new_second + (second[k] + tau_x * xs,)
    return new_mass, new_first, new_second


@triton.jit
def accumulate_dout_moments(dout_tau_sum, dout_tau_d_sum, dout_per_total, e, xs, delta, K: tl.constexpr):
    """Add ``dout tau_k`` and ``dout tau_k d_k`` (``d_k = xs - delta_k = x - m_k``) to the running sums."""
    new_tau = ()
    new_tau_d = ()
    for k in tl.static_range(K):
        dout_tau = dout_per_total * e[k]
        new_tau = new_tau + (dout_tau_sum[k] + dout_tau,)
        new_tau_d = new_tau_d + (dout_tau_d_sum[k] + dout_tau * (xs - delta[k]),)
    return new_tau, new_tau_d


@triton.jit
def batch_stats_dtau(xs, dout, e, scale, delta, dmean_per_mass, dvar_per_mass, var, K: tl.constexpr):
    """Training: ``(T, sum_k e_k T_k, sum_k e_k direct_k)`` with ``m_k``, ``v_k`` depending on ``tau``.

    ``T_k = (g_k + Gm_k/S_k) d_k + Gv_k/S_k (d_k**2 - v_k)`` with
    ``g_k = dout scale_k`` (DESIGN.md); ``direct_k = g_k + Gm_k/S_k + 2 Gv_k/S_k d_k``
    is the part of ``dx`` that does not pass through ``tau``.
    """
    dtau = ()
    weighted_dtau = tl.zeros_like(xs)
    weighted_direct = tl.zeros_like(xs)
    for k in tl.static_range(K):
        d = xs - delta[k]
        g = dout * scale[k] + dmean_per_mass[k]
        dtau_k = g * d + dvar_per_mass[k] * (d * d - var[k])
        dtau = dtau + (dtau_k,)
        weighted_dtau += e[k] * dtau_k
        weighted_direct += e[k] * (g + 2.0 * dvar_per_mass[k] * d)
    return dtau, weighted_dtau, weighted_direct


@triton.jit
def given_stats_dtau(xs, dout, e, scale, delta, K: tl.constexpr):
    """Eval: ``(T, sum_k e_k T_k, sum_k e_k g_k)`` with given statistics, ``T_k = g_k d_k``, ``g_k = dout scale_k``."""
    dtau = ()
    weighted_dtau = tl.zeros_like(xs)
    weighted_direct = tl.zeros_like(xs)
    for k in tl.static_range(K):
        g = dout * scale[k]
        dtau_k = g * (xs - delta[k])
        dtau = dtau + (dtau_k,)
        weighted_dtau += e[k] * dtau_k
        weighted_direct += e[k] * g
    return dtau, weighted_dtau, weighted_direct


@triton.jit
def logit_gradients(e, dtau, t, inv_total, weighted_dtau, a, K: tl.constexpr):
    """``(U t, U, sum_k U_k (x - mu_k) / sigma_k**2)`` with ``U_k = tau_k (T_k - sum_j tau_j T_j)``.

    ``(x - mu_k) / sigma_k**2 = t_k a_k GRADIENT_SCALE``; the last term is what
    ``dx`` loses through the logits (``d logit / d x = -(x - mu) / sigma**2``).
    """
    mean_dtau = weighted_dtau * inv_total
    u_t = ()
    u = ()
    through_logits = tl.zeros_like(mean_dtau)
    for k in tl.static_range(K):
        u_k = (e[k] * inv_total) * (dtau[k] - mean_dtau)
        u_t_k = u_k * t[k]
        u = u + (u_k,)
        u_t = u_t + (u_t_k,)
        through_logits += (a[k] * GRADIENT_SCALE) * u_t_k
    return u_t, u, through_logits


@triton.jit
def accumulate_logit_gradients(sum_u_t, sum_u_t2, sum_u, u_t, u, t, K: tl.constexpr):
    """Add ``U t``, ``U t**2`` and ``U`` (for ``d mu``, ``d log_sigma``, ``d log lam``) to the running sums."""
    new_u_t = ()
    new_u_t2 = ()
    new_u = ()
    for k in tl.static_range(K):
        new_u_t = new_u_t + (sum_u_t[k] + u_t[k],)
        new_u_t2 = new_u_t2 + (sum_u_t2[k] + u_t[k] * t[k],)
        new_u = new_u + (sum_u[k] + u[k],)
    return new_u_t, new_u_t2, new_u
