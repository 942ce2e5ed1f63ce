// CUDA kernels of the UAN operators (the CUDA side of uan_cpu.cpp): the host
// code that runs a training step's or an eval forward's passes, and the
// per-channel finalize kernels between them. The element passes themselves
// are in uan_passes.cuh, compiled in *_pass.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "uan_constants.h"
#include "uan_cuda.cuh"
#include "uan_host.h"
#include "uan_math.h"

namespace uan {
namespace {

using namespace cuda;

// ---- Second stage: per-channel finalize kernels. ---------------------------
// One warp per channel sums each quantity's slices (lanes stride over the
// slices, then a shuffle tree: a fixed order, so results do not depend on
// scheduling) and then turns the channel's sums into what the next pass or
// the caller needs (uan_constants.h). These replace the O(K*C) ATen glue.

constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kMaxFinalizeQuantities = 3 * kMaxComponents;

// sums[q] for q < quantities of channel c, in the warp's shared slot.
__device__ __forceinline__ void sum_channel_slices(const double* partials, int quantities, int64_t C, int64_t c,
                                                   int64_t slices, double* sums) {
  const int lane = threadIdx.x % kWarp;
  for (int q = 0; q < quantities; ++q) {
    double total = 0.0;
    for (int64_t s = lane; s < slices; s += kWarp) {
      total += partials[(q * C + c) * slices + s];
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      total += __shfl_xor_sync(kFullMask, total, offset);
    }
    if (lane == 0) {
      sums[q] = total;
    }
  }
  __syncwarp();
}

// The statistics pass's pivot of channel c (as Statistics::load read it).
template <typename scalar_t>
__device__ __forceinline__ double input_pivot(const scalar_t* x, int64_t stride_c, bool has_elements, int64_t c) {
  using acc_t = at::opmath_type<scalar_t>;
  return has_elements ? static_cast<double>(static_cast<acc_t>(x[c * stride_c])) : 0.0;
}

// Batch mean, var and mass (K, C) from the statistics pass's partials.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) finalize_statistics(
    const double* partials, int64_t slices, const scalar_t* x, int64_t stride_c, bool has_elements, int K,
    int64_t C, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* var, at::opmath_type<scalar_t>* mass) {
  __shared__ double sums[kWarpsPerBlock][kMaxFinalizeQuantities];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (c >= C) {
    return;
  }
  sum_channel_slices(partials, 3 * K, C, c, slices, sums[warp]);
  if (lane < K) {
    const int64_t i = lane * C + c;
    statistics_from_sums(sums[warp][lane], sums[warp][K + lane], sums[warp][2 * K + lane],
                         input_pivot(x, stride_c, has_elements, c), mean[i], var[i], mass[i]);
  }
}

// The statistics pass's (3, K, C) sums about the component means mu (the
// statistics operator) from its partials about each channel's pivot.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) finalize_statistics_sums(
    const double* partials, int64_t slices, const scalar_t* x, int64_t stride_c, bool has_elements,
    const at::opmath_type<scalar_t>* mu, int K, int64_t C, double* sums) {
  __shared__ double channel_sums[kWarpsPerBlock][kMaxFinalizeQuantities];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (c >= C) {
    return;
  }
  sum_channel_slices(partials, 3 * K, C, c, slices, channel_sums[warp]);
  if (lane < K) {
    const int64_t plane = static_cast<int64_t>(K) * C;
    const int64_t i = lane * C + c;
    const double S = channel_sums[warp][lane];
    double T1 = channel_sums[warp][K + lane];
    double T2 = channel_sums[warp][2 * K + lane];
    repivot_sums(S, T1, T2, input_pivot(x, stride_c, has_elements, c) - static_cast<double>(mu[i]));
    sums[i] = S;
    sums[plane + i] = T1;
    sums[2 * plane + i] = T2;
  }
}

// (K, C) mean, var and mass from (3, K, C) sums about mu: a thread per (k, c).
template <typename T>
__global__ void __launch_bounds__(kThreads) statistics_from_sums_kernel(const double* sums, const T* mu,
                                                                        int64_t plane, T* mean, T* var, T* mass) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane; i += stride) {
    statistics_from_sums(sums[i], sums[plane + i], sums[2 * plane + i], static_cast<double>(mu[i]), mean[i], var[i],
                         mass[i]);
  }
}

// The channel's pivot of the backward passes: the input's (batch statistics,
// mass given), else component 0's mean (given statistics).
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> backward_pivot(const scalar_t* x, int64_t stride_c,
                                                                    bool has_elements, bool batch_statistics,
                                                                    const at::opmath_type<scalar_t>* mean,
                                                                    int64_t c) {
  using acc_t = at::opmath_type<scalar_t>;
  return batch_statistics ? static_cast<acc_t>(input_pivot(x, stride_c, has_elements, c)) : mean[c];
}

// (2K+1, C) reduce sums about the centers `mean` (the backward_reduce
// operator) from the reduce pass's partials about each channel's pivot.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) finalize_reduce_sums(
    const double* partials, int64_t slices, const scalar_t* x, int64_t stride_c, bool has_elements,
    const at::opmath_type<scalar_t>* mean, int K, int64_t C, double* sums) {
  __shared__ double channel_sums[kWarpsPerBlock][kMaxFinalizeQuantities];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (c >= C) {
    return;
  }
  sum_channel_slices(partials, 2 * K + 1, C, c, slices, channel_sums[warp]);
  if (lane < K) {
    const int64_t i = lane * C + c;
    const double A = channel_sums[warp][lane];
    sums[i] = A;
    sums[(K + lane) * C + c] = about_center(A, channel_sums[warp][K + lane],
                                            mean[i] - backward_pivot(x, stride_c, has_elements, true, mean, c));
  }
  if (lane == 0) {
    sums[2 * K * C + c] = channel_sums[warp][2 * K];
  }
}

// Arguments of finalize_backward; mass null means given statistics.
template <typename acc_t>
struct FinalizeBackwardArgs {
  // The whole batch's reduce sums (every process's, under SyncUAN), per
  // (quantity, channel, slice): the reduce pass's partials about each
  // channel's pivot, or (about_centers) (2K+1, C) sums about the centers
  // with slices = 1.
  const double* partials;
  int64_t slices;
  bool about_centers;
  // (2K+1, C) sums of this input about the centers, for grad_weight,
  // grad_bias and log_lam_direct; null: the partials are this input's.
  const double* local_sums;
  const acc_t* mix_logits;
  const acc_t* mean;
  const acc_t* var;
  const acc_t* mass;
  const acc_t* gamma;
  acc_t eps;
  int K;
  int64_t C;
  acc_t* table;            // (kBackwardRows, K, C)
  double* log_lam_direct;  // (K, C)
  acc_t* grad_weight;
  acc_t* grad_bias;
  // Zeroed here without mixture_grads (one kernel fewer than zeros_like).
  bool mixture_grads;
  acc_t* grad_mu;
  acc_t* grad_log_sigma;
  acc_t* grad_mix_logits;
};

// The elementwise backward's constants, grad_weight and grad_bias from the
// reduce sums.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) finalize_backward(
    FinalizeBackwardArgs<at::opmath_type<scalar_t>> a, const scalar_t* x, int64_t stride_c, bool has_elements) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double sums[kWarpsPerBlock][kMaxFinalizeQuantities];
  __shared__ double weight_terms[kWarpsPerBlock][kMaxComponents];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (!a.mixture_grads && c == 0 && lane < a.K) {
    a.grad_mix_logits[lane] = acc_t(0);
  }
  if (c >= a.C) {
    return;
  }
  sum_channel_slices(a.partials, 2 * a.K + 1, a.C, c, a.slices, sums[warp]);
  const int K = a.K;
  if (lane < K) {
    acc_t log_lam[kMaxComponents];
    log_mixing_weights(a.mix_logits, K, log_lam);
    const int64_t i = lane * a.C + c;
    const acc_t pivot = backward_pivot(x, stride_c, has_elements, a.mass != nullptr, a.mean, c);
    const double A = sums[warp][lane];
    const double B = a.about_centers ? sums[warp][K + lane] : about_center(A, sums[warp][K + lane], a.mean[i] - pivot);
    const auto b = component_backward(A, B, a.mean[i], a.var[i], log_lam[lane], a.gamma ? a.gamma[c] : acc_t(1),
                                      a.eps, pivot, a.mass != nullptr, a.mass ? a.mass[i] : acc_t(0));
    const ParameterTerms terms = parameter_terms(a.local_sums ? a.local_sums[(K + lane) * a.C + c] : B, b);
    const int64_t plane = static_cast<int64_t>(K) * a.C;
    a.table[kShift * plane + i] = b.shift;
    a.table[kGammaScale * plane + i] = b.gamma_scale;
    a.table[kMeanCoef * plane + i] = b.mean_coef;
    a.table[kVarCoef * plane + i] = b.var_coef;
    a.table[kVarTerm * plane + i] = b.var_term;
    a.log_lam_direct[i] = terms.log_lam_direct;
    weight_terms[warp][lane] = terms.grad_weight;
    if (!a.mixture_grads) {
      a.grad_mu[i] = acc_t(0);
      a.grad_log_sigma[i] = acc_t(0);
    }
  }
  __syncwarp();
  if (lane == 0) {
    double weight_sum = 0.0;
    for (int k = 0; k < K; ++k) {
      weight_sum += weight_terms[warp][k];
    }
    a.grad_weight[c] = static_cast<acc_t>(weight_sum);
    a.grad_bias[c] = static_cast<acc_t>(a.local_sums ? a.local_sums[2 * K * a.C + c] : sums[warp][2 * K]);
  }
}

constexpr int kParameterThreads = 1024;

// totals[k] = the block's sum of every thread's owned[k], k < K, in a fixed
// tree (deterministic); tree holds blockDim.x doubles (a power of two).
__device__ void block_component_sums(const double (&owned)[kMaxComponents], int K, double* tree, double* totals) {
  for (int k = 0; k < K; ++k) {
    // Selected over the constant bound so that `owned` stays in registers.
#pragma unroll
    for (int j = 0; j < kMaxComponents; ++j) {
      if (j == k) {
        tree[threadIdx.x] = owned[j];
      }
    }
    __syncthreads();
    for (int width = blockDim.x / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) {
        tree[threadIdx.x] += tree[threadIdx.x + width];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      totals[k] = tree[0];
    }
    __syncthreads();
  }
}

// grad_mu, grad_log_sigma and grad_mix_logits from the elementwise pass's
// partials: one block, since mix_logits sums over every channel; thread t
// owns the (k, c) pairs t, t + 1024, ... and the per-k totals are reduced in
// a fixed tree, so the result is deterministic.
template <typename acc_t>
__global__ void __launch_bounds__(kParameterThreads) finalize_parameters(
    const double* partials, int64_t slices, const acc_t* log_sigma, const acc_t* mix_logits,
    const double* log_lam_direct, int K, int64_t C, acc_t* grad_mu, acc_t* grad_log_sigma, acc_t* grad_mix_logits) {
  __shared__ double tree[kParameterThreads];
  __shared__ double grad_log_lam[kMaxComponents];
  double owned[kMaxComponents] = {};
  const int64_t plane = static_cast<int64_t>(K) * C;
  for (int64_t i = threadIdx.x; i < plane; i += kParameterThreads) {
    double R[3] = {0.0, 0.0, 0.0};
    for (int j = 0; j < 3; ++j) {
      const double* row = partials + (j * plane + i) * slices;
      for (int64_t s = 0; s < slices; ++s) {
        R[j] += row[s];
      }
    }
    const int k = static_cast<int>(i / C);
    parameter_gradients(R[0], R[1], R[2], responsibility_slope(log_sigma[i]), grad_mu[i], grad_log_sigma[i]);
    // Unrolled over the constant bound so that `owned` stays in registers.
#pragma unroll
    for (int j = 0; j < kMaxComponents; ++j) {
      owned[j] += (j == k) ? R[2] + log_lam_direct[i] : 0.0;
    }
  }
  block_component_sums(owned, K, tree, grad_log_lam);
  if (threadIdx.x == 0) {
    acc_t log_lam[kMaxComponents];
    log_mixing_weights(mix_logits, K, log_lam);
    mix_logits_gradient(log_lam, grad_log_lam, K, grad_mix_logits);
  }
}

// One online EM step of the mixture buffers (update="moving_average"): one
// block, since the mixing weights sum every channel's mass; each thread sums
// its own channels, then a fixed tree per component, so it is deterministic.
template <typename T>
__global__ void __launch_bounds__(kThreads) moving_average_kernel(T* mu, T* log_sigma, T* mix_logits, const T* mean,
                                                                  const T* var, const T* mass, int K, int64_t C,
                                                                  int64_t values_per_channel, double momentum) {
  __shared__ double tree[kThreads];
  __shared__ double mass_sums[kMaxComponents];
  __shared__ double finite_channels;
  double owned[kMaxComponents] = {};
  int64_t finite = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    if (finite_channel(mass, K, C, c)) {
      ++finite;
#pragma unroll
      for (int k = 0; k < kMaxComponents; ++k) {
        owned[k] += k < K ? static_cast<double>(mass[k * C + c]) : 0.0;
      }
    }
  }
  block_component_sums(owned, K, tree, mass_sums);
  // The count of finite channels, through the same tree (exact in float64).
  const double finite_owned[kMaxComponents] = {static_cast<double>(finite)};
  block_component_sums(finite_owned, 1, tree, &finite_channels);
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(K) * C; i += kThreads) {
    moving_average_component(mu[i], log_sigma[i], mean[i], var[i], momentum);
  }
  if (threadIdx.x == 0) {
    moving_average_mixing_weights(mix_logits, mass_sums, static_cast<int64_t>(finite_channels), values_per_channel,
                                  K, momentum);
  }
}

// ---- Host side. ------------------------------------------------------------

template <typename scalar_t>
PassArgs<scalar_t> pass_args(const at::Tensor& x, const ChannelView& view, const Parameters& p) {
  using acc_t = at::opmath_type<scalar_t>;
  PassArgs<scalar_t> a{};
  a.x = x.const_data_ptr<scalar_t>();
  a.mu = p.mu.const_data_ptr<acc_t>();
  a.log_sigma = p.log_sigma.const_data_ptr<acc_t>();
  a.mix_logits = p.mix_logits.const_data_ptr<acc_t>();
  a.gamma = optional_data<acc_t>(p.weight);
  a.beta = optional_data<acc_t>(p.bias);
  a.eps = static_cast<acc_t>(p.eps);
  a.N = view.N;
  a.C = view.C;
  a.L = view.L;
  a.stride_n = view.stride_n;
  a.stride_c = view.stride_c;
  a.stride_l = view.stride_l;
  // n's rows back to back (channels_last) or one l per n ((N, C) input).
  a.evenly_spaced = view.stride_n == view.L * view.stride_l || view.L == 1;
  const int64_t M = view.N * view.L;
  for (int j = 0; j < kPivotSamples; ++j) {
    a.pivot_samples[j] = M > 0 ? view.element_offset(pivot_sample(j, M)) : 0;
  }
  return a;
}

unsigned channel_blocks(int64_t C) { return static_cast<unsigned>(ceil_div(C, kWarpsPerBlock)); }

// Launches: statistics pass, finalize_statistics, normalize pass.
void forward_train(const at::Tensor& x, const ChannelView& view, const Parameters& p, at::Tensor& out,
                   at::Tensor& mean, at::Tensor& var, at::Tensor& mass) {
  if (view.C == 0) {
    return;
  }
  const int K = static_cast<int>(p.K);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = pass_args<scalar_t>(x, view, p);
    a.accumulate = true;
    const Partials sums = run_pass<Statistics>(a, view, K, x.options(), {a.x});
    finalize_statistics<scalar_t><<<channel_blocks(view.C), kThreads, 0, stream>>>(
        sums.data(), sums.slices, a.x, view.stride_c, view.N * view.L > 0, K, view.C,
        mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), mass.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.accumulate = false;
    a.mean = mean.const_data_ptr<acc_t>();
    a.var = var.const_data_ptr<acc_t>();
    a.out = out.mutable_data_ptr<scalar_t>();
    run_pass<Normalize>(a, view, K, x.options(), {a.x, a.out});
  });
}

// One launch: the normalize pass.
void forward_eval(const at::Tensor& x, const ChannelView& view, const Parameters& p, const at::Tensor& mean,
                  const at::Tensor& var, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_forward_eval_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = pass_args<scalar_t>(x, view, p);
    a.mean = mean.const_data_ptr<acc_t>();
    a.var = optional_data<acc_t>(var);
    a.pivot_from_mean = true;
    a.out = out.mutable_data_ptr<scalar_t>();
    run_pass<Normalize>(a, view, static_cast<int>(p.K), x.options(), {a.x, a.out});
  });
}

// The whole batch's reduce sums as finalize_backward reads them, and this
// input's own (FinalizeBackwardArgs).
struct ReduceSums {
  const double* partials;
  int64_t slices;
  bool about_centers;
  const double* local_sums;
};

// Everything after the reduce pass. Launches: finalize_backward, the
// elementwise pass, and with mixture_grads finalize_parameters.
template <typename scalar_t>
void backward_from_sums(PassArgs<scalar_t> a, const ChannelView& view, const Parameters& p, const at::Tensor& mass,
                        const ReduceSums& sums, bool mixture_grads, at::Tensor& grad_input, at::Tensor& grad_mu,
                        at::Tensor& grad_log_sigma, at::Tensor& grad_mix_logits, at::Tensor& grad_weight,
                        at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int K = static_cast<int>(p.K);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto table = at::empty({kBackwardRows, K, view.C}, p.mu.options());
  auto log_lam_direct = at::empty({K, view.C}, p.mu.options().dtype(at::kDouble));
  FinalizeBackwardArgs<acc_t> f{};
  f.partials = sums.partials;
  f.slices = sums.slices;
  f.about_centers = sums.about_centers;
  f.local_sums = sums.local_sums;
  f.mix_logits = a.mix_logits;
  f.mean = a.mean;
  f.var = a.var;
  f.mass = optional_data<acc_t>(mass);
  f.gamma = a.gamma;
  f.eps = a.eps;
  f.K = K;
  f.C = view.C;
  f.table = table.mutable_data_ptr<acc_t>();
  f.log_lam_direct = log_lam_direct.mutable_data_ptr<double>();
  f.grad_weight = grad_weight.mutable_data_ptr<acc_t>();
  f.grad_bias = grad_bias.mutable_data_ptr<acc_t>();
  f.mixture_grads = mixture_grads;
  f.grad_mu = grad_mu.mutable_data_ptr<acc_t>();
  f.grad_log_sigma = grad_log_sigma.mutable_data_ptr<acc_t>();
  f.grad_mix_logits = grad_mix_logits.mutable_data_ptr<acc_t>();
  finalize_backward<scalar_t><<<channel_blocks(view.C), kThreads, 0, stream>>>(f, a.x, view.stride_c,
                                                                             view.N * view.L > 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  a.table = table.const_data_ptr<acc_t>();
  a.out = grad_input.mutable_data_ptr<scalar_t>();
  a.accumulate = mixture_grads;
  const Partials params = run_pass<BackwardElementwise>(a, view, K, grad_input.options(), {a.x, a.grad_out, a.out});
  if (mixture_grads) {
    finalize_parameters<acc_t><<<1, kParameterThreads, 0, stream>>>(
        params.data(), params.slices, a.log_sigma, a.mix_logits, log_lam_direct.const_data_ptr<double>(), K, view.C,
        grad_mu.mutable_data_ptr<acc_t>(), grad_log_sigma.mutable_data_ptr<acc_t>(),
        grad_mix_logits.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The arguments of the backward passes.
template <typename scalar_t>
PassArgs<scalar_t> backward_args(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                                 const Parameters& p, const at::Tensor& mean, const at::Tensor& var,
                                 bool batch_statistics) {
  using acc_t = at::opmath_type<scalar_t>;
  auto a = pass_args<scalar_t>(x, view, p);
  a.grad_out = grad_out.const_data_ptr<scalar_t>();
  a.mean = mean.const_data_ptr<acc_t>();
  a.var = optional_data<acc_t>(var);
  a.pivot_from_mean = !batch_statistics;
  return a;
}

// Launches: reduce pass, then backward_from_sums's.
void backward(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view, const Parameters& p,
              const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass, bool mixture_grads,
              at::Tensor& grad_input, at::Tensor& grad_mu, at::Tensor& grad_log_sigma, at::Tensor& grad_mix_logits,
              at::Tensor& grad_weight, at::Tensor& grad_bias) {
  if (view.C == 0) {
    grad_mix_logits.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_cuda", [&] {
    auto a = backward_args<scalar_t>(grad_out, x, view, p, mean, var, mass.defined());
    a.accumulate = true;
    const Partials reduced = run_pass<BackwardReduce>(a, view, static_cast<int>(p.K), x.options(), {a.x, a.grad_out});
    backward_from_sums(a, view, p, mass, ReduceSums{reduced.data(), reduced.slices, false, nullptr}, mixture_grads,
                       grad_input, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias);
  });
}

// Launches: reduce pass, finalize_reduce_sums.
void backward_reduce(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view, const Parameters& p,
                     const at::Tensor& mean, at::Tensor& sums) {
  if (view.C == 0) {
    return;
  }
  const int K = static_cast<int>(p.K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_reduce_cuda", [&] {
    auto a = backward_args<scalar_t>(grad_out, x, view, p, mean, at::Tensor(), true);
    a.accumulate = true;
    const Partials reduced = run_pass<BackwardReduce>(a, view, K, x.options(), {a.x, a.grad_out});
    finalize_reduce_sums<scalar_t><<<channel_blocks(view.C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reduced.data(), reduced.slices, a.x, view.stride_c, view.N * view.L > 0, a.mean, K, view.C,
        sums.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// backward_from_sums's launches, from given reduce sums.
void backward_elementwise(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                          const Parameters& p, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass,
                          const at::Tensor& sums, const at::Tensor& local_sums, bool mixture_grads,
                          at::Tensor& grad_input, at::Tensor& grad_mu, at::Tensor& grad_log_sigma,
                          at::Tensor& grad_mix_logits, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  if (view.C == 0) {
    grad_mix_logits.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_elementwise_cuda", [&] {
    backward_from_sums(backward_args<scalar_t>(grad_out, x, view, p, mean, var, true), view, p, mass,
                       ReduceSums{sums.const_data_ptr<double>(), 1, true, local_sums.const_data_ptr<double>()},
                       mixture_grads, grad_input, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias);
  });
}

// Launches: statistics pass, finalize_statistics_sums.
void statistics(const at::Tensor& x, const ChannelView& view, const Parameters& p, at::Tensor& sums) {
  if (view.C == 0) {
    return;
  }
  const int K = static_cast<int>(p.K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_statistics_cuda", [&] {
    auto a = pass_args<scalar_t>(x, view, p);
    a.accumulate = true;
    const Partials partials = run_pass<Statistics>(a, view, K, x.options(), {a.x});
    finalize_statistics_sums<scalar_t><<<channel_blocks(view.C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        partials.data(), partials.slices, a.x, view.stride_c, view.N * view.L > 0, a.mu, K, view.C,
        sums.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One launch.
void statistics_finalize(const at::Tensor& sums, const at::Tensor& mu, at::Tensor& mean, at::Tensor& var,
                         at::Tensor& mass) {
  const int64_t plane = mu.numel();
  if (plane == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "uan_statistics_finalize_cuda", [&] {
    statistics_from_sums_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(plane, kThreads)), kThreads, 0,
                                            c10::cuda::getCurrentCUDAStream()>>>(
        sums.const_data_ptr<double>(), mu.const_data_ptr<scalar_t>(), plane, mean.mutable_data_ptr<scalar_t>(),
        var.mutable_data_ptr<scalar_t>(), mass.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One launch.
void moving_average_update(at::Tensor& mu, at::Tensor& log_sigma, at::Tensor& mix_logits, const at::Tensor& mean,
                           const at::Tensor& var, const at::Tensor& mass, int64_t values_per_channel,
                           double momentum) {
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "uan_moving_average_update_cuda", [&] {
    moving_average_kernel<scalar_t><<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        mu.mutable_data_ptr<scalar_t>(), log_sigma.mutable_data_ptr<scalar_t>(), mix_logits.mutable_data_ptr<scalar_t>(),
        mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), mass.const_data_ptr<scalar_t>(),
        static_cast<int>(mu.size(0)), mu.size(1), values_per_channel, momentum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr DevicePasses kCudaPasses{forward_train, forward_eval, backward, statistics, statistics_finalize,
                                    backward_reduce, backward_elementwise, moving_average_update};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma, const at::Tensor& mix_logits,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return forward_training(kCudaPasses, x, mu, log_sigma, mix_logits, weight, bias, eps);
}

at::Tensor forward_stats_cuda(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
                              const at::Tensor& mix_logits, const at::Tensor& mean, const at::Tensor& var,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return forward_with_statistics(kCudaPasses, x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps);
}

at::Tensor forward_mixture_cuda(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
                                const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return forward_with_mixture_statistics(kCudaPasses, x, mu, log_sigma, mix_logits, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& mass, double eps, bool mixture_grads) {
  const c10::cuda::CUDAGuard guard(x.device());
  return uan::backward(kCudaPasses, grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps,
                       mixture_grads);
}

at::Tensor statistics_cuda(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
                           const at::Tensor& mix_logits) {
  const c10::cuda::CUDAGuard guard(x.device());
  return uan::statistics(kCudaPasses, x, mu, log_sigma, mix_logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> statistics_finalize_cuda(const at::Tensor& sums,
                                                                        const at::Tensor& mu) {
  const c10::cuda::CUDAGuard guard(mu.device());
  return uan::statistics_finalize(kCudaPasses, sums, mu);
}

at::Tensor backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu,
                                const at::Tensor& log_sigma, const at::Tensor& mix_logits, const at::Tensor& mean) {
  const c10::cuda::CUDAGuard guard(x.device());
  return uan::backward_reduce(kCudaPasses, grad_out, x, mu, log_sigma, mix_logits, mean);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_elementwise_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& mass, const at::Tensor& sums, const at::Tensor& local_sums, double eps,
    bool mixture_grads) {
  const c10::cuda::CUDAGuard guard(x.device());
  return uan::backward_elementwise(kCudaPasses, grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, sums,
                                   local_sums, eps, mixture_grads);
}

void moving_average_update_cuda(at::Tensor& mu, at::Tensor& log_sigma, at::Tensor& mix_logits,
                                const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass,
                                int64_t values_per_channel, double momentum) {
  const c10::cuda::CUDAGuard guard(mu.device());
  uan::moving_average_update(kCudaPasses, mu, log_sigma, mix_logits, mean, var, mass, values_per_channel, momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(uan, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("forward.stats", &forward_stats_cuda);
  m.impl("forward.mixture", &forward_mixture_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("statistics", &statistics_cuda);
  m.impl("statistics_finalize", &statistics_finalize_cuda);
  m.impl("backward_reduce", &backward_reduce_cuda);
  m.impl("backward_elementwise", &backward_elementwise_cuda);
  m.impl("moving_average_update_", &moving_average_update_cuda);
}

}  // namespace uan