"""Per-element math of UAN shared by the Triton kernels of :mod:`.kernels`.

Conventions: axis 0 of every 3-D block is the component axis (``K_PAD``, the
power of two >= K, padded components masked by the caller), axis 1 the channels
of the tile and axis 2 its elements. Per-component values are passed as
``[K_PAD, BLOCK_C, 1]`` blocks and element values as ``[1, BLOCK_C, BLOCK_E]``
blocks, so the functions below broadcast them to ``[K_PAD, BLOCK_C, BLOCK_E]``.
All arithmetic happens in the dtype of the inputs (float32, or float64 for
float64 tensors); Python float constants adopt that dtype.

Notation of DESIGN.md: ``tau`` responsibilities, ``d = x - m_k`` the element
centred on a component's statistic, ``T = dL/dtau``, ``U = dL/dlogit``.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def log2_mixing_weights(mix_logits):
    """``log2(softmax(mix_logits))`` of a ``[K_PAD]`` vector whose padding holds ``-inf``.

    Padded entries stay ``-inf``; base 2 because the responsibilities use ``exp2``.
    """
    scaled = mix_logits * LOG2E
    shifted = scaled - tl.max(scaled, 0)
    return shifted - tl.log2(tl.sum(tl.exp2(shifted), 0))


@triton.jit
def logit_coefficients(log2_lam, log_sigma):
    """Per-component ``(offset, curvature)`` of the base-2 logits.

    ``log2(e) * logit_k = offset_k - curvature_k * (x - mu_k)**2`` with
    ``offset = log2(lam) - log2(e) * log_sigma`` and
    ``curvature = log2(e) / (2 sigma**2)``: two multiply-adds per element and
    component instead of a division and a logarithm.
    """
    offset = log2_lam - log_sigma * LOG2E
    curvature = (0.5 * LOG2E) * tl.exp(-2.0 * log_sigma)
    return offset, curvature


@triton.jit
def responsibilities(x, mu, offset, curvature):
    """``(tau, x - mu)``: the softmax over components of the element's logits.

    The max is subtracted before ``exp2`` so an element far from every
    component still gets a valid distribution (the largest term is exactly 1,
    hence the sum is in ``[1, K]`` and its reciprocal never overflows).
    Padded components must carry ``offset = -inf``, which gives them ``tau = 0``.
    """
    diff = x - mu
    logit2 = offset - curvature * diff * diff
    weights = tl.exp2(logit2 - tl.max(logit2, 0, keep_dims=True))
    tau = weights * (1.0 / tl.sum(weights, 0, keep_dims=True))
    return tau, diff


@triton.jit
def mixture_normalize(tau, centered, scale):
    """``sum_k tau_k * scale_k * centered_k``, the normalised element (SPEC eq. 9).

    ``scale_k = gamma / (sqrt(lam_k) * sqrt(var_k + eps))``; ``centered_k = x - m_k``.
    """
    return tl.sum(tau * scale * centered, 0)


@triton.jit
def batch_stats_dtau(direct, centered, dmean_per_mass, dvar_per_mass, var):
    """``T = dL/dtau`` in training, where ``m_k`` and ``v_k`` also depend on ``tau``.

    ``direct = g a_k r_k`` (the gradient reaching ``y`` times the component
    scale), ``dmean_per_mass = Gm_k / S_k`` and ``dvar_per_mass = Gv_k / S_k``
    (DESIGN.md): ``T = (direct + Gm/S) d + Gv/S (d**2 - v)``.
    """
    return (direct + dmean_per_mass) * centered + dvar_per_mass * (centered * centered - var)


@triton.jit
def batch_stats_dx_direct(tau, direct, centered, dmean_per_mass, dvar_per_mass):
    """The part of ``dx`` that does not pass through ``tau`` in training.

    ``sum_k tau_k (g a_k r_k + Gm_k / S_k + 2 Gv_k d_k / S_k)``: ``x`` enters
    ``d_k`` directly and ``m_k``, ``v_k`` through their weighted sums.
    """
    return tl.sum(tau * (direct + dmean_per_mass + 2.0 * dvar_per_mass * centered), 0)


@triton.jit
def logit_gradient(tau, dtau):
    """``U = dL/dlogit = tau * (T - sum_j tau_j T_j)``, the softmax's Jacobian applied to ``T``."""
    return tau * (dtau - tl.sum(tau * dtau, 0, keep_dims=True))


@triton.jit
def chan_merge(count, mean, m2, part_count, part_mean, part_m2):
    """Merge two weighted ``(sum of weights, mean, sum of squared deviations)`` summaries.

    Chan et al.'s pairwise update: no ``E[x^2] - E[x]^2`` cancellation, so the
    variance stays accurate when ``|mean| >> std``. Empty summaries (zero
    weight) leave the other one unchanged.
    """
    total = count + part_count
    part_share = part_count / tl.where(total > 0, total, 1.0)
    delta = part_mean - mean
    merged_mean = mean + delta * part_share
    merged_m2 = m2 + part_m2 + delta * delta * count * part_share
    return total, merged_mean, merged_m2
