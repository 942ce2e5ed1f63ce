// Per-element UAN math shared by the CPU and CUDA kernels (SPEC.md, DESIGN.md).
//
// Every function is generic over the value type V: a scalar (float, double) on
// CUDA, or at::vec::Vectorized<float|double> on CPU, where one call handles a
// whole SIMD vector of elements. Per-component constants are arrays of K
// values of the same type (broadcast or per lane), computed once per channel
// by uan_constants.h so that the element loops do only what depends on the
// element. Elements enter as xp = x - p, x shifted by a per-channel pivot p
// (an element of the channel, or a component mean): with |mean| >> std the
// shifted values stay small and float32 keeps its precision. CUDA callers
// pass a compile-time K so the loops unroll into registers.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

namespace uan {

// Fused kernels keep an element's K values in fixed arrays.
constexpr int kMaxComponents = 16;
// Added to every division by a component's mass (SPEC).
constexpr double kMassEps = 1e-12;

// Logits are kept in the base of each value type's fastest exponential: base
// 2 for float (on CUDA exp2 is one MUFU.EX2 instruction, where expf also
// scales its argument and fixes up denormals; on CPU exp2 of a logit
// difference <= 0 is a floor, a polynomial and a scaling, see
// exp_of_scaled_logit below), base e for double. Softmax does not depend on
// the base as long as logits and exponential agree; the scale is folded into
// the per-component constants.
C10_HOST_DEVICE inline float logit_scale(float) {
  return 1.4426950408889634f;  // log2(e)
}
C10_HOST_DEVICE inline double logit_scale(double) { return 1.0; }

// exp of a logit in logit_scale's base; the arguments are logit - max <= 0.
C10_HOST_DEVICE inline float exp_of_scaled_logit(float v) {
#if defined(__CUDA_ARCH__)
  // Hardware exp2, a few ulp; results below 2^-126 flush to zero, which is a
  // responsibility of zero either way.
  float result;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(v));
  return result;
#else
  return ::exp2f(v);
#endif
}
C10_HOST_DEVICE inline double exp_of_scaled_logit(double v) { return ::exp(v); }

// 1 / v for the softmax denominator, which is >= 1 (the largest term is 1).
C10_HOST_DEVICE inline float softmax_reciprocal(float v) {
#if defined(__CUDA_ARCH__)
  // One MUFU.RCP, within 1 ulp; v >= 1 is never denormal.
  float result;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(v));
  return result;
#else
  return 1.0f / v;
#endif
}
C10_HOST_DEVICE inline double softmax_reciprocal(double v) { return 1.0 / v; }

// One FMNMX on CUDA (a compare and a select otherwise). Logits are NaN only
// when the element or a parameter is, and then every logit is.
C10_HOST_DEVICE inline float value_max(float a, float b) { return ::fmaxf(a, b); }
C10_HOST_DEVICE inline double value_max(double a, double b) { return ::fmax(a, b); }

// a * b + c in one rounding (nvcc contracts the scalar forms).
C10_HOST_DEVICE inline float madd(float a, float b, float c) { return a * b + c; }
C10_HOST_DEVICE inline double madd(double a, double b, double c) { return a * b + c; }

#if !defined(__CUDACC__)
template <typename T>
inline at::vec::Vectorized<T> madd(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                   const at::vec::Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}
template <typename T>
inline T logit_scale(const at::vec::Vectorized<T>&) {
  return logit_scale(T(0));
}
inline at::vec::Vectorized<double> exp_of_scaled_logit(const at::vec::Vectorized<double>& v) {
  return v.exp_u20();
}
// 2^v for v <= 0 (a logit difference): 2^n p(f) with n = floor(v), f = v - n
// in [0, 1) and p a degree-5 fit of 2^f with p(0) = 1 (relative error below
// 1.6e-7 in float32, about 2 ulp). p(0) = 1 exactly keeps the largest term
// exactly 1, so an element that belongs to one component alone gets
// tau = 1 exactly and zero logit gradients, as in float64. v is first raised
// to -125, so that no result is denormal (slow on some CPUs): exp2(-125) ~
// 2e-38 is a responsibility of zero next to the largest term's 1. A NaN stays
// NaN (max returns its second operand when one is NaN). 9 vector
// instructions with AVX-512, 12 with AVX2.
inline at::vec::Vectorized<float> exp_of_scaled_logit(const at::vec::Vectorized<float>& v) {
  using Vec = at::vec::Vectorized<float>;
  // p's coefficients, highest degree first.
  constexpr float kCoefficients[] = {0.0018671234f, 0.0090171015f, 0.055799797f, 0.24016450f, 0.69315130f, 1.0f};
#if defined(CPU_CAPABILITY_AVX512)
  const Vec x = _mm512_max_ps(_mm512_set1_ps(-125.0f), v);
#elif defined(CPU_CAPABILITY_AVX2)
  const Vec x = _mm256_max_ps(_mm256_set1_ps(-125.0f), v);
#else
  const Vec x = at::vec::maximum(Vec(-125.0f), v);
#endif
  const Vec n = x.floor();
  const Vec f = x - n;
  Vec p(kCoefficients[0]);
  for (int i = 1; i < 6; ++i) {
    p = at::vec::fmadd(p, f, Vec(kCoefficients[i]));
  }
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return p * Vec(_mm256_castsi256_ps(two_to_n));
#else
  return p * n.exp2();
#endif
}
template <typename T>
inline at::vec::Vectorized<T> softmax_reciprocal(const at::vec::Vectorized<T>& v) {
  return v.reciprocal();
}
#if defined(CPU_CAPABILITY_AVX512)
// A 14-bit estimate and one Newton step (about 1 ulp) instead of a division,
// which issues far slower than the FMAs around it; v >= 1 is never denormal.
inline at::vec::Vectorized<float> softmax_reciprocal(const at::vec::Vectorized<float>& v) {
  const __m512 r = _mm512_rcp14_ps(v);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(v, r, _mm512_set1_ps(1.0f)), r);
}
#endif
template <typename T>
inline at::vec::Vectorized<T> value_max(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
#endif

// Responsibilities of one element (paper eq. 7), on folded constants:
//   D_k = s (logit_k - logit_r) = (alpha_k xp + beta_k) xp + gamma_k,   t_k = alpha_k xp + beta_k
//   e_k = exp_s(D_k - max_j D_j),   tau_k = e_k / sum_j e_j
// with s = logit_scale and r the channel's reference component (its widest;
// its coefficients are zero). The coefficients are differences of the
// components' logit expansions about the pivot, taken in float64
// (uan_constants.h), so an element far from every component keeps the
// competing components' difference: squaring (x - mu_k) / sigma_k in float32
// would round each logit by ~1e-7 of its square. Fills t and the unnormalised
// e; returns 1 / sum e, so callers multiply once instead of normalising every
// component. The max is subtracted, so every element gets a valid distribution.
template <typename V>
struct ResponsibilityConstants {
  const V* alpha;
  const V* beta;
  const V* gamma;
};

template <typename V>
C10_HOST_DEVICE inline V responsibilities(const V& xp, int K, const ResponsibilityConstants<V>& r, V* t, V* e) {
  V largest;
  for (int k = 0; k < K; ++k) {
    t[k] = madd(r.alpha[k], xp, r.beta[k]);
    e[k] = madd(t[k], xp, r.gamma[k]);
    largest = (k == 0) ? e[k] : value_max(largest, e[k]);
  }
  V total;
  for (int k = 0; k < K; ++k) {
    e[k] = exp_of_scaled_logit(e[k] - largest);
    total = (k == 0) ? e[k] : total + e[k];
  }
  return softmax_reciprocal(total);
}

// d D_k / d xp = 2 alpha_k xp + beta_k, from t_k of responsibilities().
template <typename V>
C10_HOST_DEVICE inline V relative_logit_slope(const V& xp, const V& alpha, const V& t) {
  return madd(alpha, xp, t);
}

// Mixture transform with gamma folded in (eq. 9):
//   out = sum_k tau_k slope_k (xp - shift_k) + beta
// where slope_k = gamma scale_k, shift_k = center_k - p and
// scale_k = lam_k^-1/2 (var_k + eps)^-1/2. The difference xp - shift_k =
// x - center_k is taken first, so that it is exact near the component
// however far the component is from the pivot (no large terms cancel).
template <typename V>
C10_HOST_DEVICE inline V mixture_transform(const V& xp, int K, const V* e, const V& inv_total, const V* slope,
                                           const V* shift, const V& beta) {
  V y(0);
  for (int k = 0; k < K; ++k) {
    y = madd(e[k], slope[k] * (xp - shift[k]), y);
  }
  return madd(y, inv_total, beta);
}

// Per-(k, c) constants of the elementwise backward (DESIGN.md), about the
// pivot: with g = gamma dout, d_k = x - center_k = xp - shift_k,
//   h_k = g scale_k + mean_coef_k + var_coef_k d_k
//   T_k = d_k (g scale_k + mean_coef_k) + var_coef_k (d_k^2 - var_k) = d_k h_k - var_term_k   (dL/dtau_k)
//   U_k = tau_k (T_k - sum_j tau_j T_j)                                                     (dL/dlogit_k)
//   dx  = sum_k tau_k (h_k + var_coef_k d_k) - sum_k U_k (x - mu_k) / sigma_k^2
// gamma_scale_k = gamma scale_k; mean_coef_k = Gm_k / S_k and var_coef_k =
// Gv_k / S_k carry the dependence of the batch statistics on x (both zero in
// eval); var_term_k = var_coef_k var_k.
template <typename V>
struct BackwardConstants {
  ResponsibilityConstants<V> resp;
  const V* shift;
  const V* gamma_scale;
  const V* mean_coef;
  const V* var_coef;
  const V* var_term;
};

// Gradient with respect to x of one element. Fills U_k (dL/dlogit_k) and
// uses t_k, e_k, inv_total from responsibilities(). The logits' share is
// taken through the relative logits: sum_k U_k = 0, so
//   sum_k U_k (x - mu_k) / sigma_k^2 = -(1 / s) sum_k U_k d D_k / d xp,
// which, unlike the per-component terms, does not grow with the distance
// from the mixture. The mixture-parameter sums are U_k u_k, U_k u_k^2 and
// U_k with u_k = a_k xp + b_k (uan_constants.h, parameter_gradients).
template <typename V>
C10_HOST_DEVICE inline V input_gradient(const V& xp, const V& dout, int K, const BackwardConstants<V>& p,
                                        const V* t, const V* e, const V& inv_total, V* T, V* U) {
  V e_dot_t(0);
  V direct(0);
  for (int k = 0; k < K; ++k) {
    const V d = xp - p.shift[k];
    const V h = madd(dout, p.gamma_scale[k], madd(p.var_coef[k], d, p.mean_coef[k]));
    T[k] = madd(d, h, -p.var_term[k]);
    e_dot_t = madd(e[k], T[k], e_dot_t);
    direct = madd(e[k], madd(p.var_coef[k], d, h), direct);
  }
  const V tau_dot_t = e_dot_t * inv_total;
  V through_logits(0);
  for (int k = 0; k < K; ++k) {
    U[k] = (e[k] * inv_total) * (T[k] - tau_dot_t);
    through_logits = madd(U[k], relative_logit_slope(xp, p.resp.alpha[k], t[k]), through_logits);
  }
  return madd(through_logits, V(decltype(logit_scale(xp))(1) / logit_scale(xp)), direct * inv_total);
}

}  // namespace uan
