// Per-channel UAN constants shared by the CPU and CUDA kernels: everything
// the element passes need that does not depend on the element (the folded
// responsibilities and transform of uan_math.h), and the O(K*C) steps
// between passes (batch statistics from the statistics pass's sums, the
// backward's per-component coefficients from the reduce pass's sums, the
// parameter gradients from the elementwise pass's sums). One thread computes
// one channel, on CPU in a loop and on CUDA in the passes' prologues and the
// finalize kernels, so the formulas live here once (DESIGN.md).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "uan_math.h"

namespace uan {

// log lam_k = log_softmax(mix_logits)_k for the K components.
template <typename T>
C10_HOST_DEVICE inline void log_mixing_weights(const T* mix_logits, int K, T* log_lam) {
  T largest = mix_logits[0];
  for (int k = 1; k < K; ++k) {
    largest = value_max(largest, mix_logits[k]);
  }
  T total(0);
  for (int k = 0; k < K; ++k) {
    total += std::exp(mix_logits[k] - largest);
  }
  const T log_total = std::log(total) + largest;
  for (int k = 0; k < K; ++k) {
    log_lam[k] = mix_logits[k] - log_total;
  }
}

// a = sqrt(s / 2) / sigma: u = a (x - mu) has s ((x - mu) / sigma)^2 / 2 = u^2,
// the standardised element of the mixture-parameter sums (parameter_gradients).
template <typename T>
C10_HOST_DEVICE inline T responsibility_slope(T log_sigma) {
  return std::exp(-log_sigma) * std::sqrt(logit_scale(T(0)) / T(2));
}

// u = a xp + b with b = a (p - mu), for pivot p.
template <typename T>
C10_HOST_DEVICE inline void standardization_constants(T mu, T log_sigma, T pivot, T& a, T& b) {
  a = responsibility_slope(log_sigma);
  b = a * (pivot - mu);
}

// A component's scaled logit as a quadratic in xp = x - p, in float64:
//   s logit(x) = L - A (xp + q)^2 = value - 2 tilt xp - curvature xp^2
// with curvature A = s / (2 sigma^2), q = p - mu, tilt = A q and
// L = s (log_prior - log_sigma). log_prior may be mix_logits: a constant
// shared by the components cancels in the responsibilities.
struct LogitExpansion {
  double curvature;
  double tilt;
  double value;  // s logit at the pivot
};

C10_HOST_DEVICE inline LogitExpansion logit_expansion(double mu, double log_sigma, double log_prior, double pivot,
                                                      double s) {
  const double curvature = 0.5 * s * std::exp(-2.0 * log_sigma);
  const double q = pivot - mu;
  return {curvature, curvature * q, s * (log_prior - log_sigma) - curvature * q * q};
}

// The reference component r of a channel's relative logits (uan_math.h): its
// widest (the largest log_sigma, the first on ties), whose logit varies least
// over the data, so that the other components' differences to it stay small.
template <typename T>
C10_HOST_DEVICE inline int widest_component(const T* log_sigma, int K, int64_t stride) {
  int widest = 0;
  for (int k = 1; k < K; ++k) {
    if (log_sigma[k * stride] > log_sigma[widest * stride]) {
      widest = k;
    }
  }
  return widest;
}

// The responsibility constants of one channel about pivot p (uan_math.h):
// D_k = s (logit_k - logit_r) has
//   alpha_k = A_r - A_k,  beta_k = 2 (tilt_r - tilt_k),  gamma_k = value_k - value_r,
// taken in float64 before rounding, so that far from the mixture the large
// common parts of the logits cancel exactly. mu and log_sigma are column c of
// (K, C) tensors (`stride` = C, pointing at row 0); the outputs are written
// `out_stride` apart.
template <typename T>
C10_HOST_DEVICE inline void channel_responsibility_constants(const T* mu, const T* log_sigma, const T* mix_logits,
                                                             int K, int64_t stride, T pivot, T* alpha, T* beta,
                                                             T* gamma, int64_t out_stride) {
  const double s = static_cast<double>(logit_scale(T(0)));
  const double p = static_cast<double>(pivot);
  const int r = widest_component(log_sigma, K, stride);
  const LogitExpansion ref = logit_expansion(static_cast<double>(mu[r * stride]),
                                             static_cast<double>(log_sigma[r * stride]),
                                             static_cast<double>(mix_logits[r]), p, s);
  for (int k = 0; k < K; ++k) {
    const LogitExpansion e = logit_expansion(static_cast<double>(mu[k * stride]),
                                             static_cast<double>(log_sigma[k * stride]),
                                             static_cast<double>(mix_logits[k]), p, s);
    alpha[k * out_stride] = static_cast<T>(ref.curvature - e.curvature);
    beta[k * out_stride] = static_cast<T>(2.0 * (ref.tilt - e.tilt));
    gamma[k * out_stride] = static_cast<T>(e.value - ref.value);
  }
}

// The statistics pass takes its accumulation-type sums of component k about
// a pivot p_k of its own, a value of the channel where the component
// competes, so that they stay of the order of the component's spread however
// far it lies from the channel pivot p (two tight clusters far apart); the
// float64 totals are then moved to p (shift_sums), so every consumer sees sums
// about the channel pivot. p_k is, of kPivotSamples elements evenly spread
// over the channel, the first whose relative logit D_k is closest to its
// largest (the channel pivot if every sample is NaN).
constexpr int kPivotSamples = 16;

// Index j < kPivotSamples of the samples among a channel's M elements.
C10_HOST_DEVICE inline int64_t pivot_sample(int j, int64_t M) {
  return static_cast<int64_t>(j) * M / kPivotSamples;
}

// Fills pivots[k] from sample(j), the value of sample j (uan_math.h constants).
template <typename T, typename Sample>
C10_HOST_DEVICE inline void component_pivots(Sample&& sample, T pivot, int K, const ResponsibilityConstants<T>& r,
                                             T* pivots) {
  T best[kMaxComponents];
  for (int k = 0; k < K; ++k) {
    pivots[k] = pivot;
    best[k] = -std::numeric_limits<T>::infinity();
  }
  for (int j = 0; j < kPivotSamples; ++j) {
    const T x = sample(j);
    const T xp = x - pivot;
    T logit[kMaxComponents];
    T largest;
    for (int k = 0; k < K; ++k) {
      logit[k] = madd(madd(r.alpha[k], xp, r.beta[k]), xp, r.gamma[k]);
      largest = (k == 0) ? logit[k] : value_max(largest, logit[k]);
    }
    for (int k = 0; k < K; ++k) {
      const T score = logit[k] - largest;
      if (score > best[k]) {
        best[k] = score;
        pivots[k] = x;
      }
    }
  }
}

// The elementwise backward's sums R1 = sum U xp, R2 = sum U xp^2 (R3 = sum U)
// turned into sum U u, sum U u^2 with u = a xp + b (parameter_gradients), in
// float64: sum U u = a R1 + b R3, sum U u^2 = a^2 R2 + 2 a b R1 + b^2 R3.
template <typename T>
C10_HOST_DEVICE inline void standardize_sums(T a, T b, double& R1, double& R2, double R3) {
  const double a64 = static_cast<double>(a);
  const double b64 = static_cast<double>(b);
  R2 = a64 * (a64 * R2 + 2.0 * b64 * R1) + b64 * b64 * R3;
  R1 = a64 * R1 + b64 * R3;
}

// Sums S, T1 = sum tau (x - p_k), T2 = sum tau (x - p_k)^2 about p_k moved,
// exactly up to float64 rounding, to sums about p, with delta = p_k - p:
//   sum tau (x - p) = T1 + delta S,  sum tau (x - p)^2 = T2 + 2 delta T1 + delta^2 S.
C10_HOST_DEVICE inline void shift_sums(double delta, double S, double& T1, double& T2) {
  T2 += delta * (2.0 * T1 + delta * S);
  T1 += delta * S;
}

// scale_k = lam_k^-1/2 (var_k + eps)^-1/2.
template <typename T>
C10_HOST_DEVICE inline T normalization_scale(T log_lam, T var, T eps) {
  return std::exp(T(-0.5) * log_lam) / std::sqrt(var + eps);
}

// The mixture's own variance sigma^2 (eval statistics of update="moving_average").
template <typename T>
C10_HOST_DEVICE inline T mixture_variance(T log_sigma) {
  return std::exp(T(2) * log_sigma);
}

// The transform constants of component k about pivot p (mixture_transform).
template <typename T>
C10_HOST_DEVICE inline void transform_constants(T center, T var, T log_lam, T gamma, T eps, T pivot, T& slope,
                                                T& shift) {
  slope = gamma * normalization_scale(log_lam, var, eps);
  shift = center - pivot;
}

// Batch statistics of component k from the statistics pass's float64 sums
// about pivot p: S = sum tau, T1 = sum tau (x - p), T2 = sum tau (x - p)^2.
//   m = (p S + T1) / (S + e),  v = (T2 - 2 (m - p) T1 + (m - p)^2 S) / (S + e)
// are exact rewrites of SPEC's sums (e = kMassEps).
template <typename T>
C10_HOST_DEVICE inline void statistics_from_sums(double S, double T1, double T2, double pivot, T& mean, T& var,
                                                 T& mass) {
  const double denom = S + kMassEps;
  const double m = (pivot * S + T1) / denom;
  const double offset = m - pivot;
  const double v = (T2 - 2.0 * offset * T1 + offset * offset * S) / denom;
  mean = static_cast<T>(m);
  var = static_cast<T>(v > 0.0 ? v : 0.0);
  mass = static_cast<T>(S);
}

// The statistics pass's sums about pivot p re-expressed about pivot q, with
// offset = p - q (x - q = (x - p) + offset):
//   T1' = T1 + offset S,   T2' = T2 + 2 offset T1 + offset^2 S.
// Passes accumulate about a value of the channel (accurate in float32); sums
// about a pivot every process knows (the component mean mu) add across batches.
C10_HOST_DEVICE inline void repivot_sums(double S, double& T1, double& T2, double offset) {
  T2 += offset * (2.0 * T1 + offset * S);
  T1 += offset * S;
}

// The reduce pass's sum Bp = sum dout tau_k (x - p) about the pivot p moved
// to the component's center, B = sum dout tau_k (x - center_k), with
// shift = center_k - p and A = sum dout tau_k.
template <typename T>
C10_HOST_DEVICE inline double about_center(double A, double Bp, T shift) {
  return Bp - static_cast<double>(shift) * A;
}

// Backward coefficients of component k (BackwardConstants of uan_math.h) from
// the reduce sums of the whole batch (of every process, under SyncUAN), about
// the center: A = sum dout tau_k, B = sum dout tau_k (x - center_k). For batch
// statistics (mass given), Gm_k = -scale_k gamma A, Gv_k = -scale_k gamma B /
// (2 (var_k + eps)), each divided by S_k + e; with given statistics both are 0.
template <typename T>
struct ComponentBackward {
  T scale, shift, gamma_scale, mean_coef, var_coef, var_term;
};

template <typename T>
C10_HOST_DEVICE inline ComponentBackward<T> component_backward(double A, double B, T center, T var, T log_lam,
                                                               T gamma, T eps, T pivot, bool batch_statistics,
                                                               T mass) {
  ComponentBackward<T> out;
  out.scale = normalization_scale(log_lam, var, eps);
  out.shift = center - pivot;
  out.gamma_scale = gamma * out.scale;
  if (batch_statistics) {
    const double denom = static_cast<double>(mass) + kMassEps;
    out.mean_coef = static_cast<T>(-static_cast<double>(out.gamma_scale) * A / denom);
    out.var_coef = static_cast<T>(-0.5 * static_cast<double>(out.gamma_scale) * B /
                                  ((static_cast<double>(var) + eps) * denom));
  } else {
    out.mean_coef = T(0);
    out.var_coef = T(0);
  }
  out.var_term = out.var_coef * var;
  return out;
}

// One batch's own terms of the parameter gradients, from its B about the
// center (its part of the whole batch's B, so that the terms of several
// processes add up to the whole batch's):
//   grad_weight += scale_k B,   d loss / d log lam_k (through lam^-1/2) += -gamma scale_k B / 2.
struct ParameterTerms {
  double grad_weight, log_lam_direct;
};

template <typename T>
C10_HOST_DEVICE inline ParameterTerms parameter_terms(double B, const ComponentBackward<T>& component) {
  return {static_cast<double>(component.scale) * B, -0.5 * static_cast<double>(component.gamma_scale) * B};
}

// Gradients of mu_k and log_sigma_k of one channel from the elementwise
// pass's sums R1 = sum U_k u_k, R2 = sum U_k u_k^2, R3 = sum U_k, with
// a_k = sqrt(s / 2) / sigma_k: (x - mu) / sigma^2 = u a 2 / s and
// ((x - mu) / sigma)^2 = u^2 2 / s, so
//   d mu = 2 a R1 / s,   d log sigma = 2 R2 / s - R3,   d log lam (through tau) = R3.
template <typename T>
C10_HOST_DEVICE inline void parameter_gradients(double R1, double R2, double R3, T a, T& grad_mu, T& grad_log_sigma) {
  const double two_over_s = 2.0 / static_cast<double>(logit_scale(T(0)));
  grad_mu = static_cast<T>(two_over_s * static_cast<double>(a) * R1);
  grad_log_sigma = static_cast<T>(two_over_s * R2 - R3);
}

// Gradient of mix_logits from d loss / d log lam_k (the softmax Jacobian):
//   d mix_logits_k = g_k - lam_k sum_j g_j.
template <typename T>
C10_HOST_DEVICE inline void mix_logits_gradient(const T* log_lam, const double* grad_log_lam, int K, T* out) {
  double total = 0.0;
  for (int k = 0; k < K; ++k) {
    total += grad_log_lam[k];
  }
  for (int k = 0; k < K; ++k) {
    out[k] = static_cast<T>(grad_log_lam[k] - std::exp(static_cast<double>(log_lam[k])) * total);
  }
}

// Floors of the moving-average update, so that an emptied component keeps
// finite logits (log 0 would poison the softmax's max).
constexpr double kMinMixingWeight = 1e-12;
constexpr double kMinVariance = 1e-12;

// One online EM step of component k of channel c (SPEC, update="moving_average"):
// mu <- (1 - m) mu + m mean, sigma^2 <- (1 - m) sigma^2 + m var, in float64.
template <typename T>
C10_HOST_DEVICE inline void moving_average_component(T& mu, T& log_sigma, T mean, T var, double momentum) {
  const double sigma_sq = std::exp(2.0 * static_cast<double>(log_sigma));
  double new_sigma_sq = sigma_sq + momentum * (static_cast<double>(var) - sigma_sq);
  new_sigma_sq = new_sigma_sq > kMinVariance ? new_sigma_sq : kMinVariance;
  mu = static_cast<T>(static_cast<double>(mu) + momentum * (static_cast<double>(mean) - static_cast<double>(mu)));
  log_sigma = static_cast<T>(0.5 * std::log(new_sigma_sq));
}

// Whether channel c's statistics enter the shared mixing weights: a NaN or
// inf in its input makes its masses NaN, and it is left out (SPEC).
template <typename T>
C10_HOST_DEVICE inline bool finite_channel(const T* mass, int K, int64_t C, int64_t c) {
  bool finite = true;
  for (int k = 0; k < K; ++k) {
    const double m = static_cast<double>(mass[k * C + c]);
    finite = finite && m - m == 0.0;
  }
  return finite;
}

// lam <- (1 - m) lam + m batch_lam with batch_lam_k = mass_k / (finite channels * values
// per channel), in float64, stored as mix_logits = log lam. With no finite
// channel batch_lam is 0 and lam only shrinks by (1 - m), which
// softmax(mix_logits) undoes: lam keeps its value.
template <typename T>
C10_HOST_DEVICE inline void moving_average_mixing_weights(T* mix_logits, const double* channel_mass_sums,
                                                          int64_t finite_channels, int64_t values_per_channel,
                                                          int K, double momentum) {
  double logits[kMaxComponents];
  double log_lam[kMaxComponents];
  for (int k = 0; k < K; ++k) {
    logits[k] = static_cast<double>(mix_logits[k]);
  }
  log_mixing_weights(logits, K, log_lam);
  const double count = static_cast<double>(finite_channels > 0 ? finite_channels : 1) *
                       static_cast<double>(values_per_channel);
  for (int k = 0; k < K; ++k) {
    const double lam = std::exp(log_lam[k]);
    double new_lam = lam + momentum * (channel_mass_sums[k] / count - lam);
    new_lam = new_lam > kMinMixingWeight ? new_lam : kMinMixingWeight;
    mix_logits[k] = static_cast<T>(std::log(new_lam));
  }
}

}  // namespace uan
