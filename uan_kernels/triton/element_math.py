"""Per-element math of UAN shared by the Triton kernels of :mod:`.kernels`, on folded constants.

Every per-(k, c) quantity that does not depend on the element is computed once
per program (or by a finalize kernel), so that an element costs a few fused
multiply-adds per component (DESIGN.md, "Instruction-minimal element math").

Conventions: a kernel holds its ``K`` components as tuples of ``K`` blocks
(unrolled with ``tl.static_range``), so exactly ``K`` exponentials are computed
per element, never padded ones. Per-component constants are ``[BLOCK_C, 1]``
blocks, element values ``[BLOCK_C, BLOCK_E]`` blocks. Elements enter as
``xs = x - pivot``, centred on a per-channel pivot (a value of the channel), so
that folded offsets stay of the order of the data's spread and do not cancel
when ``|x| >> spread``. Element arithmetic happens in the dtype of the inputs
(float32, or float64 for float64 tensors); the logits' coefficients are taken
in float64 first (:func:`relative_logit_coefficients`).

Notation of DESIGN.md: ``tau`` responsibilities, ``d = x - m_k``,
``T = dL/dtau``, ``U = dL/dlogit``.
"""
import math

import triton
import triton.language as tl

from .interpreter import INTERPRETED

LOG2E = tl.constexpr(1.4426950408889634)
# s_k = a_k (x - mu_k) with a_k = RESPONSIBILITY_SCALE / sigma_k has
# log2(e) * z**2 / 2 = s**2 (the standardised element of the mixture-parameter sums).
RESPONSIBILITY_SCALE = tl.constexpr(math.sqrt(1.4426950408889634 / 2))
# (x - mu) / sigma**2 = s * a * GRADIENT_SCALE and z**2 = s**2 * GRADIENT_SCALE.
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
def logit_expansion(mu, log_sigma, log_prior, pivot):
    """float64 ``(curvature, tilt, value)`` of ``log2(e) logit = value - 2 tilt xs - curvature xs**2``.

    ``curvature = log2(e) / (2 sigma**2)``, ``tilt = curvature (pivot - mu)``,
    ``value`` the scaled logit at the pivot; ``log_prior`` may be the mixing
    logits (a constant shared by the components cancels in ``tau``).
    """
    mu = mu.to(tl.float64)
    log_sigma = log_sigma.to(tl.float64)
    curvature = tl.exp(-2.0 * log_sigma) * (0.5 * LOG2E)
    q = pivot.to(tl.float64) - mu
    tilt = curvature * q
    return curvature, tilt, (log_prior.to(tl.float64) - log_sigma) * LOG2E - tilt * q


@triton.jit
def relative_logit_coefficients(mu, log_sigma, mix_logits, pivot, K: tl.constexpr, ACC: tl.constexpr):
    """Tuples ``(alpha, beta, gamma)``: ``log2(e) (logit_k - logit_r) = (alpha_k xs + beta_k) xs + gamma_k``.

    ``r`` is each channel's widest component (the largest ``log_sigma``, the
    first on ties), whose logit varies least over the data; its coefficients
    are zero. The differences are taken in float64 and then rounded, so an
    element far from every component keeps the competing components'
    difference, which squaring ``(x - mu_k) / sigma_k`` in float32 would round
    away (README, fidelity notes). ``mu``, ``log_sigma``: tuples of per-channel
    blocks; ``mix_logits``: a tuple of scalars.
    """
    expansions = ()
    for k in tl.static_range(K):
        expansions = expansions + (logit_expansion(mu[k], log_sigma[k], mix_logits[k], pivot),)
    ref_curvature, ref_tilt, ref_value = expansions[0]
    ref_log_sigma = log_sigma[0]
    for k in tl.static_range(1, K):
        wider = log_sigma[k] > ref_log_sigma
        ref_log_sigma = tl.where(wider, log_sigma[k], ref_log_sigma)
        ref_curvature = tl.where(wider, expansions[k][0], ref_curvature)
        ref_tilt = tl.where(wider, expansions[k][1], ref_tilt)
        ref_value = tl.where(wider, expansions[k][2], ref_value)
    alpha = ()
    beta = ()
    gamma = ()
    for k in tl.static_range(K):
        curvature, tilt, value = expansions[k]
        alpha = alpha + ((ref_curvature - curvature).to(ACC),)
        beta = beta + ((2.0 * (ref_tilt - tilt)).to(ACC),)
        gamma = gamma + ((value - ref_value).to(ACC),)
    return alpha, beta, gamma


@triton.jit
def relative_logits(xs, alpha, beta, gamma, K: tl.constexpr):
    """``(t, logits)``: ``t_k = alpha_k xs + beta_k`` and the relative logits ``t_k xs + gamma_k``."""
    t = ()
    logits = ()
    for k in tl.static_range(K):
        t_k = alpha[k] * xs + beta[k]
        t = t + (t_k,)
        logits = logits + (t_k * xs + gamma[k],)
    return t, logits


@triton.jit
def largest_logit(logits, K: tl.constexpr):
    top = logits[0]
    for k in tl.static_range(1, K):
        top = tl.maximum(top, logits[k])
    return top


@triton.jit
def component_weights(xs, alpha, beta, gamma, K: tl.constexpr):
    """``(t, e, total)``: ``t_k = alpha_k xs + beta_k``, unnormalised ``e_k`` and ``total = sum_k e_k``.

    ``tau_k = e_k / total``. The largest logit is subtracted before ``exp2``, so
    an element far from every component still gets a valid distribution (the
    largest ``e_k`` is exactly 1, so ``total`` is in ``[1, K]``).
    """
    t, logits = relative_logits(xs, alpha, beta, gamma, K)
    top = largest_logit(logits, K)
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
def accumulate_moments(mass, first, second, e, inv_total, x, pivots, K: tl.constexpr):
    """Add an element's ``tau_k``, ``tau_k d_k`` and ``tau_k d_k**2`` (``d_k = x - pivot_k``) to the running sums.

    Each component's sums are about its own pivot, a value of the channel where
    it competes, so they stay of the order of its spread however far it lies
    from the channel's pivot.
    """
    new_mass = ()
    new_first = ()
    new_second = ()
    for k in tl.static_range(K):
        tau = e[k] * inv_total
        d = x - pivots[k]
        tau_d = tau * d
        new_mass = new_mass + (mass[k] + tau,)
        new_first = new_first + (first[k] + tau_d,)
        new_second = new_second + (second[k] + tau_d * d,)
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
def logit_gradients(e, dtau, t, inv_total, weighted_dtau, alpha, xs, K: tl.constexpr):
    """``(U, sum_k U_k (x - mu_k) / sigma_k**2)`` with ``U_k = tau_k (T_k - sum_j tau_j T_j)``.

    The second is what ``dx`` loses through the logits (``d logit / d x = -(x - mu) / sigma**2``),
    taken through the relative logits: the ``U_k`` sum to 0, so it is
    ``-sum_k U_k d D_k / d xs / log2(e)`` with ``d D_k / d xs = alpha_k xs + t_k``,
    which does not grow with the distance from the mixture.
    """
    mean_dtau = weighted_dtau * inv_total
    u = ()
    through_relative = tl.zeros_like(mean_dtau)
    for k in tl.static_range(K):
        u_k = (e[k] * inv_total) * (dtau[k] - mean_dtau)
        u = u + (u_k,)
        through_relative += u_k * (alpha[k] * xs + t[k])
    return u, through_relative * (-1.0 / LOG2E)


@triton.jit
def accumulate_logit_gradients(sum_u_xs, sum_u_xs2, sum_u, u, xs, K: tl.constexpr):
    """Add ``U xs``, ``U xs**2`` and ``U`` to the running sums (:func:`standardized_sums` turns them
    into the sums ``d mu``, ``d log_sigma`` and ``d log lam`` need)."""
    new_u_xs = ()
    new_u_xs2 = ()
    new_u = ()
    for k in tl.static_range(K):
        u_xs = u[k] * xs
        new_u_xs = new_u_xs + (sum_u_xs[k] + u_xs,)
        new_u_xs2 = new_u_xs2 + (sum_u_xs2[k] + u_xs * xs,)
        new_u = new_u + (sum_u[k] + u[k],)
    return new_u_xs, new_u_xs2, new_u


@triton.jit
def standardization(mu, log_sigma, pivot):
    """``(a, b)``: ``s = a xs + b = RESPONSIBILITY_SCALE (x - mu) / sigma``, so that ``z**2 = GRADIENT_SCALE s**2``."""
    a = RESPONSIBILITY_SCALE * tl.exp(-log_sigma)
    return a, (pivot - mu) * a


@triton.jit
def standardized_sums(a, b, sum_u_xs, sum_u_xs2, sum_u):
    """``(sum U s, sum U s**2)`` from ``sum U xs``, ``sum U xs**2``, ``sum U``, in float64
    (``s = a xs + b``): ``a R1 + b R3`` and ``a**2 R2 + 2 a b R1 + b**2 R3``."""
    a = a.to(tl.float64)
    b = b.to(tl.float64)
    r1 = sum_u_xs.to(tl.float64)
    r3 = sum_u.to(tl.float64)
    return a * r1 + b * r3, a * (a * sum_u_xs2.to(tl.float64) + 2.0 * b * r1) + b * b * r3
