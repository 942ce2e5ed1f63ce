// Per-element UAN math shared by the CPU and CUDA kernels (SPEC.md, DESIGN.md).
//
// Every function is generic over the value type V: a scalar (float, double) on
// CUDA, or at::vec::Vectorized<float|double> on CPU, where one call handles a
// whole SIMD vector of elements. The per-component constants are arrays of K
// values of the same type (broadcast or per-lane). K is a runtime argument;
// CUDA callers pass a compile-time constant so the loops unroll into registers.
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
// 2 for float on CUDA (exp2 is one MUFU.EX2 instruction, where expf also
// scales its argument and fixes up denormals), base e elsewhere. Softmax does
// not depend on the base as long as logits and exponential agree, and the
// scale multiplies per-component constants, which the element loops hoist.
C10_HOST_DEVICE inline float logit_scale(float) {
#if defined(__CUDA_ARCH__)
  return 1.4426950408889634f;  // log2(e)
#else
  return 1.0f;
#endif
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
  return ::expf(v);
#endif
}
C10_HOST_DEVICE inline double exp_of_scaled_logit(double v) { return ::exp(v); }

C10_HOST_DEVICE inline float value_max(float a, float b) { return a > b ? a : b; }
C10_HOST_DEVICE inline double value_max(double a, double b) { return a > b ? a : b; }

#if !defined(__CUDACC__)
template <typename T>
inline T logit_scale(const at::vec::Vectorized<T>&) {
  return T(1);
}
template <typename T>
inline at::vec::Vectorized<T> exp_of_scaled_logit(const at::vec::Vectorized<T>& v) {
  return v.exp_u20();
}
template <typename T>
inline at::vec::Vectorized<T> value_max(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
#endif

// Responsibilities of one element (paper eq. 7):
//   logit_k = log_prior_k - ((x - mu_k) * inv_sigma_k)^2 / 2,   tau = softmax_k(logit)
// with log_prior_k = log(lam_k) - log(sigma_k). The max is subtracted, so an
// element far from every component still gets a valid distribution.
template <typename V>
C10_HOST_DEVICE inline void responsibilities(
    const V& x, int K, const V* mu, const V* inv_sigma, const V* log_prior, V* tau) {
  const auto scale = logit_scale(x);
  V largest;
  for (int k = 0; k < K; ++k) {
    const V z = (x - mu[k]) * inv_sigma[k];
    // scale is a literal after inlining: the multiply folds away in base e.
    const V prior = (scale == 1) ? log_prior[k] : log_prior[k] * V(scale);
    tau[k] = prior - V(scale / 2) * z * z;
    largest = (k == 0) ? tau[k] : value_max(largest, tau[k]);
  }
  V total(0);
  for (int k = 0; k < K; ++k) {
    tau[k] = exp_of_scaled_logit(tau[k] - largest);
    total = total + tau[k];
  }
  const V inv_total = V(1) / total;
  for (int k = 0; k < K; ++k) {
    tau[k] = tau[k] * inv_total;
  }
}

// Mixture transform (eq. 9): y = sum_k tau_k * scale_k * (x - center_k), with
// scale_k = lam_k^-1/2 (var_k + eps)^-1/2 and center_k the component's mean.
template <typename V>
C10_HOST_DEVICE inline V mixture_transform(const V& x, int K, const V* tau, const V* center, const V* scale) {
  V y(0);
  for (int k = 0; k < K; ++k) {
    y = y + tau[k] * scale[k] * (x - center[k]);
  }
  return y;
}

// Per-(k, c) constants of the elementwise backward (DESIGN.md). With g the
// gradient reaching y and d_k = x - center_k:
//   T_k  = d_k (g scale_k + mean_coef_k) + var_coef_k (d_k^2 - var_k)     (dL/dtau_k)
//   U_k  = tau_k (T_k - sum_j tau_j T_j)                                  (dL/dlogit_k)
//   dx   = sum_k tau_k (g scale_k + mean_coef_k + 2 var_coef_k d_k)
//          - sum_k U_k (x - mu_k) inv_sigma_k^2
// mean_coef_k = Gm_k / S_k and var_coef_k = Gv_k / S_k carry the dependence of
// the batch statistics on x; both are zero in eval (given statistics).
template <typename V>
struct BackwardComponents {
  const V* mu;
  const V* inv_sigma;
  const V* log_prior;
  const V* center;
  const V* scale;
  const V* mean_coef;
  const V* var_coef;
  const V* var;
};

// Gradient with respect to x of one element; fills U_k (dL/dlogit_k) and
// w_k = (x - mu_k) inv_sigma_k^2 for the mixture-parameter sums
// (d mu_k += U_k w_k, d log_sigma_k += U_k (z_k^2 - 1), d log lam_k += U_k).
template <typename V>
C10_HOST_DEVICE inline V input_gradient(
    const V& x, const V& g, int K, const BackwardComponents<V>& p, const V* tau, V* U, V* w) {
  V tau_dot_t(0);
  V dx(0);
  for (int k = 0; k < K; ++k) {
    const V d = x - p.center[k];
    const V direct = g * p.scale[k] + p.mean_coef[k];
    U[k] = d * direct + p.var_coef[k] * (d * d - p.var[k]);
    tau_dot_t = tau_dot_t + tau[k] * U[k];
    dx = dx + tau[k] * (direct + V(2) * p.var_coef[k] * d);
  }
  for (int k = 0; k < K; ++k) {
    U[k] = tau[k] * (U[k] - tau_dot_t);
    w[k] = (x - p.mu[k]) * p.inv_sigma[k] * p.inv_sigma[k];
    dx = dx - U[k] * w[k];
  }
  return dx;
}

}  // namespace uan
