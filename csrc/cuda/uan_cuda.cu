// CUDA element passes of the UAN operators (the CUDA side of uan_cpu.cpp).
//
// Every pass walks x seen as (N, C, L) in "units": a tile of channels times a
// slice of each channel's N*L elements. A block owns one unit at a time
// (grid-stride over units), computes its channel's per-(k, c) constants into
// registers in the unit's prologue and, for the reduction passes, writes one
// float64 partial per (quantity, channel, slice). A per-channel finalize
// kernel sums each (quantity, channel)'s slices in a fixed order, so results
// are bitwise reproducible (no atomics), and turns them into what the next
// pass needs.
// Threads sum at most kMaxElementsPerThread elements per unit in the
// accumulation type before their sums go to float64.
//
// Block shapes, both 256 threads:
//  * channel-major (contiguous, stride_l = 1): 1 x 256, one channel per unit;
//    threads walk the channel's rows with 16-byte accesses when L and the
//    pointers allow it, else with 16 bytes' worth of scalar loads.
//  * channels-inner (channels_last or (N, C), stride_c = 1): TC x (256 / TC)
//    with TC = min(32, C rounded up to a power of 2); thread x owns one
//    channel of the tile, so a warp reads consecutive channels of a row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "uan_constants.h"
#include "uan_host.h"
#include "uan_math.h"

namespace uan {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Bytes each thread loads per input per loop iteration: one 16-byte vector,
// or as many scalars, so enough memory requests are in flight.
constexpr int kLoadBytes = 16;
// Elements one thread sums in the accumulation type within a unit before its
// partial goes to float64: bounds float32 rounding for channels of any length.
constexpr int64_t kMaxElementsPerThread = 512;
// Quantities block-reduced per round through shared memory (8 KiB).
constexpr int kReduceChunk = 4;

template <typename scalar_t>
constexpr int kVecWidth = kLoadBytes / static_cast<int>(sizeof(scalar_t));

// Kernel arguments of every pass; fields a pass does not use stay null.
template <typename scalar_t>
struct PassArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* grad_out;
  scalar_t* out;             // normalize: output; backward_elementwise: grad_input
  const acc_t* mu;           // (K, C)
  const acc_t* log_sigma;    // (K, C)
  const acc_t* mix_logits;   // (K,)
  const acc_t* mean;         // (K, C) statistics (normalize; pivot of given statistics)
  const acc_t* var;          // (K, C); null: the mixture's own, exp(2 log_sigma)
  const acc_t* gamma;        // (C,) or null (1)
  const acc_t* beta;         // (C,) or null (0)
  const acc_t* table;        // backward_elementwise: (kBackwardRows, K, C) from finalize_backward
  double* partials;          // (Q, C, slices) per-unit sums
  acc_t eps;
  bool pivot_from_mean;      // pivot mean[0, c] (given statistics), else x[0, c, 0]
  // Offsets n * stride_n + l * stride_l of the statistics pass's pivot samples (uan_constants.h).
  int64_t pivot_samples[kPivotSamples];
  int64_t N, C, L, stride_n, stride_c, stride_l;
  int64_t slices, chunk;     // each channel's N*L elements in `slices` ranges of `chunk`
  bool vector;               // channel-major with 16-byte aligned rows: 16-byte accesses
  bool accumulate;           // whether this launch writes partials
};

// Rows of the backward elementwise constants written by finalize_backward.
enum BackwardRow : int { kShift = 0, kGammaScale, kMeanCoef, kVarCoef, kVarTerm, kBackwardRows };

// The channel's pivot: its first element x[0, c, 0] in training (the
// statistics pass's, which the backward reads again), component 0's mean for
// given statistics. Passes run only when the channel has elements.
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> channel_pivot(const PassArgs<scalar_t>& a, int64_t c) {
  return a.pivot_from_mean ? a.mean[c] : static_cast<at::opmath_type<scalar_t>>(a.x[c * a.stride_c]);
}

// The relative-logit constants of one channel (uan_constants.h), in a
// function of their own: inlined, their float64 arithmetic made ptxas spill
// and add instructions in the element loop of the pass (Normalize at K = 3:
// 56 bytes of spills, 2 instructions per element); called, it stays in the
// unit's prologue.
template <int K, typename acc_t>
__device__ __noinline__ void relative_logit_constants(const acc_t* mu, const acc_t* log_sigma, const acc_t* mix_logits,
                                                      int64_t C, acc_t pivot, acc_t* alpha, acc_t* beta, acc_t* gamma) {
  channel_responsibility_constants(mu, log_sigma, mix_logits, K, C, pivot, alpha, beta, gamma, 1);
}

// A channel's folded responsibility constants (uan_constants.h), computed in
// each unit's prologue from the parameters: no constants step between passes.
template <int K, typename acc_t>
struct ChannelResponsibilities {
  acc_t alpha[K], beta[K], gamma[K], log_lam[K];
  acc_t pivot;

  template <typename scalar_t>
  __device__ __forceinline__ void load(const PassArgs<scalar_t>& args, int64_t c) {
    log_mixing_weights(args.mix_logits, K, log_lam);
    pivot = channel_pivot(args, c);
    relative_logit_constants<K>(args.mu + c, args.log_sigma + c, args.mix_logits, args.C, pivot, alpha, beta, gamma);
  }
  __device__ __forceinline__ ResponsibilityConstants<acc_t> constants() const { return {alpha, beta, gamma}; }
};

// ---- The four passes: per-channel constants and per-element work. ----------
// element() returns the value written to `out` (ignored when kWritesOutput is
// false) and adds this element's terms to the thread's partial sums. Passes
// with sums say whether they accumulate other sums than their partials hold,
// for accuracy or fewer instructions (kConvertsSums); then convert_sums()
// turns the thread's float64 sums into those before they are reduced.

template <typename scalar_t_, int K>
struct Statistics {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kQuantities = 3 * K;
  static constexpr bool kReadsGrad = false;
  static constexpr bool kWritesOutput = false;
  static constexpr bool kConvertsSums = true;
  ChannelResponsibilities<K, acc_t> r;
  acc_t component_pivot[K];

  __device__ void load(const PassArgs<scalar_t>& a, int64_t c) {
    r.load(a, c);
    const scalar_t* channel = a.x + c * a.stride_c;
    component_pivots([&](int j) { return static_cast<acc_t>(channel[a.pivot_samples[j]]); }, r.pivot, K,
                     r.constants(), component_pivot);
  }

  // Sums about each component's pivot, so they stay of the order of the
  // component's spread; convert_sums() takes them to the channel pivot.
  __device__ acc_t element(acc_t x, acc_t, acc_t* partial) const {
    acc_t t[K], e[K];
    const acc_t inv_total = responsibilities(x - r.pivot, K, r.constants(), t, e);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t tau = e[k] * inv_total;
      const acc_t d = x - component_pivot[k];
      const acc_t tau_d = tau * d;
      partial[k] += tau;
      partial[K + k] += tau_d;
      partial[2 * K + k] += tau_d * d;
    }
    return acc_t(0);
  }

  __device__ void convert_sums(double* sums) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      shift_sums(static_cast<double>(component_pivot[k]) - static_cast<double>(r.pivot), sums[k], sums[K + k],
                 sums[2 * K + k]);
    }
  }
};

template <typename scalar_t_, int K>
struct Normalize {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kQuantities = 0;
  static constexpr bool kReadsGrad = false;
  static constexpr bool kWritesOutput = true;
  ChannelResponsibilities<K, acc_t> r;
  acc_t slope[K], shift[K];
  acc_t beta;

  __device__ void load(const PassArgs<scalar_t>& a, int64_t c) {
    r.load(a, c);
    const acc_t gamma = a.gamma ? a.gamma[c] : acc_t(1);
    beta = a.beta ? a.beta[c] : acc_t(0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t i = k * a.C + c;
      transform_constants(a.mean[i], a.var ? a.var[i] : mixture_variance(a.log_sigma[i]), r.log_lam[k], gamma, a.eps,
                          r.pivot, slope[k], shift[k]);
    }
  }

  __device__ acc_t element(acc_t x, acc_t, acc_t*) const {
    acc_t t[K], e[K];
    const acc_t xp = x - r.pivot;
    const acc_t inv_total = responsibilities(xp, K, r.constants(), t, e);
    return mixture_transform(xp, K, e, inv_total, slope, shift, beta);
  }
};

template <typename scalar_t_, int K>
struct BackwardReduce {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kQuantities = 2 * K + 1;
  static constexpr bool kReadsGrad = true;
  static constexpr bool kWritesOutput = false;
  static constexpr bool kConvertsSums = false;
  ChannelResponsibilities<K, acc_t> r;

  __device__ void load(const PassArgs<scalar_t>& a, int64_t c) { r.load(a, c); }

  // sum dout tau_k, sum dout tau_k (x - p), sum dout.
  __device__ acc_t element(acc_t x, acc_t dout, acc_t* partial) const {
    acc_t t[K], e[K];
    const acc_t xp = x - r.pivot;
    const acc_t weight = dout * responsibilities(xp, K, r.constants(), t, e);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t weighted = e[k] * weight;
      partial[k] += weighted;
      partial[K + k] += weighted * xp;
    }
    partial[2 * K] += dout;
    return acc_t(0);
  }
};

template <typename scalar_t_, int K>
struct BackwardElementwise {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kQuantities = 3 * K;
  static constexpr bool kReadsGrad = true;
  static constexpr bool kWritesOutput = true;
  static constexpr bool kConvertsSums = true;
  ChannelResponsibilities<K, acc_t> r;
  acc_t rows[kBackwardRows][K];
  const acc_t* mu;  // column c: mu[k * C], log_sigma[k * C]
  const acc_t* log_sigma;
  int64_t C;
  bool mixture_grads;

  __device__ void load(const PassArgs<scalar_t>& args, int64_t c) {
    r.load(args, c);
#pragma unroll
    for (int row = 0; row < kBackwardRows; ++row) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        rows[row][k] = args.table[(static_cast<int64_t>(row) * K + k) * args.C + c];
      }
    }
    mu = args.mu + c;
    log_sigma = args.log_sigma + c;
    C = args.C;
    mixture_grads = args.accumulate;
  }

  // grad_input; with mixture_grads the sums U_k xp, U_k xp^2, U_k, which
  // convert_sums() turns into the partials' U_k u_k, U_k u_k^2, U_k.
  __device__ acc_t element(acc_t x, acc_t dout, acc_t* partial) const {
    const BackwardConstants<acc_t> p{r.constants(), rows[kShift], rows[kGammaScale], rows[kMeanCoef],
                                     rows[kVarCoef], rows[kVarTerm]};
    acc_t t[K], e[K], T[K], U[K];
    const acc_t xp = x - r.pivot;
    const acc_t inv_total = responsibilities(xp, K, p.resp, t, e);
    const acc_t dx = input_gradient(xp, dout, K, p, t, e, inv_total, T, U);
    if (mixture_grads) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const acc_t U_xp = U[k] * xp;
        partial[k] += U_xp;
        partial[K + k] += U_xp * xp;
        partial[2 * K + k] += U[k];
      }
    }
    return dx;
  }

  __device__ void convert_sums(double* sums) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t a, b;
      standardization_constants(mu[k * C], log_sigma[k * C], r.pivot, a, b);
      standardize_sums(a, b, sums[k], sums[K + k], sums[2 * K + k]);
    }
  }
};

// ---- Loads, stores and the block reduction. --------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// E consecutive elements in one 16-byte access (p is 16-byte aligned).
template <int E, typename scalar_t>
__device__ __forceinline__ Packed<scalar_t, E> load_packed(const scalar_t* p) {
  return *reinterpret_cast<const Packed<scalar_t, E>*>(p);
}

// Each thread's partials, kReduceChunk quantities at a time.
__shared__ double reduce_scratch[kReduceChunk][kThreads];

// Sums reduce_scratch[i][y * TC + x] over the TR rows y for each quantity
// q0 + i < q0 + count and channel first_channel + x, and writes the sums to
// partials[(q, c, slice)]. Fixed order: `width` lanes stride over y, then a
// shuffle tree. Not inlined: one copy serves every chunk of every pass.
__device__ __noinline__ void reduce_chunk(int q0, int count, int64_t first_channel, int64_t C, int64_t slices,
                                          int64_t slice, double* partials) {
  __syncthreads();
  const int tc = blockDim.x;
  const int tr = blockDim.y;
  const int tid = threadIdx.y * tc + threadIdx.x;
  const int lane = tid % kWarp;
  const int width = tr < kWarp ? tr : kWarp;
  const int pairs = count * tc;
  const int per_pass = (kThreads / kWarp) * (kWarp / width);
  for (int p0 = 0; p0 < pairs; p0 += per_pass) {
    const int p = p0 + (tid / kWarp) * (kWarp / width) + lane / width;
    const int i = p / tc;
    const int x = p % tc;
    double v = 0.0;
    if (p < pairs) {
      for (int y = lane % width; y < tr; y += width) {
        v += reduce_scratch[i][y * tc + x];
      }
    }
    for (int offset = width / 2; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(kFullMask, v, offset);
    }
    if (p < pairs && lane % width == 0 && first_channel + x < C) {
      partials[((q0 + i) * C + first_channel + x) * slices + slice] = v;
    }
  }
  __syncthreads();
}

// Writes the block's sums of each thread's float64 sums for the unit's channels.
template <int Q, typename scalar_t>
__device__ __forceinline__ void write_unit_partials(const double (&sums)[Q], const PassArgs<scalar_t>& a,
                                                    int64_t first_channel, int64_t slice, int tid) {
  // Unrolled so that sums[] is indexed by constants and stays in registers.
#pragma unroll
  for (int q0 = 0; q0 < Q; q0 += kReduceChunk) {
#pragma unroll
    for (int i = 0; i < kReduceChunk && q0 + i < Q; ++i) {
      reduce_scratch[i][tid] = sums[q0 + i];
    }
    reduce_chunk(q0, Q - q0 < kReduceChunk ? Q - q0 : kReduceChunk, first_channel, a.C, a.slices, slice,
                 a.partials);
  }
}

// ---- The kernels. ----------------------------------------------------------

// A thread's position in its channel: element index e among the channel's
// N*L, its l, and its memory offset.
struct Cursor {
  int64_t e, l, offset;
};

// Moving a cursor one item (TR * vec elements) on: step_l along l, plus a
// wrap to the next n when l passes L.
struct Walk {
  int64_t step, step_l, step_offset, wrap_offset, L;

  __device__ __forceinline__ void advance(Cursor& cur) const {
    cur.e += step;
    cur.l += step_l;
    cur.offset += step_offset;
    if (cur.l >= L) {
      cur.l -= L;
      cur.offset += wrap_offset;
    }
  }
};

// One pass over x. Thread (x, y) of the block handles channel tile * TC + x.
// Per iteration it loads E elements of its channel into registers and runs
// the math unrolled over them: one 16-byte item when a.vector (the common
// NCHW case; outputs leave in one 16-byte store), else E one-element items TR
// items apart; a slice's last items that fill no group of E go one by one.
template <class Op>
__global__ void __launch_bounds__(kThreads) element_pass(const PassArgs<typename Op::scalar_t> a) {
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  constexpr int E = kVecWidth<scalar_t>;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t tiles = (a.C + blockDim.x - 1) / blockDim.x;
  const int64_t elements = a.N * a.L;
  const int64_t step = static_cast<int64_t>(blockDim.y) * (a.vector ? E : 1);
  const Walk walk{step, step % a.L, (step / a.L) * a.stride_n + (step % a.L) * a.stride_l,
                  a.stride_n - a.L * a.stride_l, a.L};

  for (int64_t unit = blockIdx.x; unit < tiles * a.slices; unit += gridDim.x) {
    const int64_t slice = unit % a.slices;
    const int64_t first_channel = (unit / a.slices) * blockDim.x;
    const int64_t c = first_channel + threadIdx.x;
    // At least one slot so that passes without sums still compile.
    acc_t partial[Op::kQuantities > 0 ? Op::kQuantities : 1] = {};
    Op op;
    if (c < a.C) {
      op.load(a, c);
      const int64_t end = std::min(elements, (slice + 1) * a.chunk);
      Cursor cur;
      cur.e = slice * a.chunk + static_cast<int64_t>(threadIdx.y) * (a.vector ? E : 1);
      cur.l = cur.e % a.L;
      cur.offset = (cur.e / a.L) * a.stride_n + c * a.stride_c + cur.l * a.stride_l;
      const int64_t full_item_span = (E - 1) * walk.step;
      while (cur.e < end) {
        const Cursor first = cur;
        // Every load of the iteration is issued before any is used.
        Packed<scalar_t, E> raw_x, raw_g;
        if (a.vector) {
          // A full 16-byte item: the E elements straight from registers, unrolled.
          raw_x = load_packed<E>(a.x + cur.offset);
          if constexpr (Op::kReadsGrad) {
            raw_g = load_packed<E>(a.grad_out + cur.offset);
          }
          walk.advance(cur);
          Packed<scalar_t, E> y;
#pragma unroll
          for (int v = 0; v < E; ++v) {
            const acc_t dout = Op::kReadsGrad ? static_cast<acc_t>(raw_g.v[v]) : acc_t(0);
            y.v[v] = static_cast<scalar_t>(op.element(static_cast<acc_t>(raw_x.v[v]), dout, partial));
          }
          if constexpr (Op::kWritesOutput) {
            *reinterpret_cast<Packed<scalar_t, E>*>(a.out + first.offset) = y;
          }
          continue;
        }
        if (cur.e + full_item_span < end) {
          // E one-element items TR items apart, also unrolled from registers.
          int64_t offsets[E];
#pragma unroll
          for (int i = 0; i < E; ++i) {
            offsets[i] = cur.offset;
            raw_x.v[i] = a.x[cur.offset];
            if constexpr (Op::kReadsGrad) {
              raw_g.v[i] = a.grad_out[cur.offset];
            }
            walk.advance(cur);
          }
#pragma unroll
          for (int v = 0; v < E; ++v) {
            const acc_t dout = Op::kReadsGrad ? static_cast<acc_t>(raw_g.v[v]) : acc_t(0);
            const acc_t y = op.element(static_cast<acc_t>(raw_x.v[v]), dout, partial);
            if constexpr (Op::kWritesOutput) {
              a.out[offsets[v]] = static_cast<scalar_t>(y);
            }
          }
          continue;
        }
        // A slice's last items that fill no group of E: one at a time, in a
        // rolled loop (a single copy of the math).
        const acc_t dout = Op::kReadsGrad ? static_cast<acc_t>(a.grad_out[cur.offset]) : acc_t(0);
        const acc_t y = op.element(static_cast<acc_t>(a.x[cur.offset]), dout, partial);
        if constexpr (Op::kWritesOutput) {
          a.out[cur.offset] = static_cast<scalar_t>(y);
        }
        walk.advance(cur);
      }
    }
    if constexpr (Op::kQuantities > 0) {
      if (a.accumulate) {
        double sums[Op::kQuantities];
#pragma unroll
        for (int q = 0; q < Op::kQuantities; ++q) {
          sums[q] = static_cast<double>(partial[q]);
        }
        if constexpr (Op::kConvertsSums) {
          if (c < a.C) {
            op.convert_sums(sums);
          }
        }
        write_unit_partials(sums, a, first_channel, slice, tid);
      }
    }
  }
}

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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct LaunchShape {
  dim3 block;
  int64_t grid;
  int64_t slices;
  int64_t chunk;
};

template <typename Kernel>
LaunchShape launch_shape(Kernel kernel, const ChannelView& view, int vec, int per_iteration) {
  int device = 0;
  int multiprocessors = 0;
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  const int64_t resident = static_cast<int64_t>(multiprocessors) * std::max(blocks_per_sm, 1);

  int64_t tc = 1;
  if (view.channels_inner()) {
    while (tc < kWarp && tc < view.C) {
      tc *= 2;
    }
  }
  const int64_t tr = kThreads / tc;
  const int64_t tiles = ceil_div(view.C, tc);
  // As many slices per channel as fill one wave of resident blocks (no tail
  // wave), but at least one iteration and at most kMaxElementsPerThread
  // elements per thread and unit.
  const int64_t elements = view.N * view.L;
  int64_t chunk = ceil_div(elements, std::max<int64_t>(1, resident / tiles));
  chunk = std::clamp(chunk, tr * per_iteration, tr * kMaxElementsPerThread);
  chunk = ceil_div(chunk, vec) * vec;  // slices start on vector boundaries
  const int64_t slices = ceil_div(elements, chunk);
  return {dim3(static_cast<unsigned>(tc), static_cast<unsigned>(tr)), std::min(tiles * slices, resident), slices,
          chunk};
}

// A pass's per-unit sums: (Q, C, slices) float64, slices = 0 when the pass
// had no elements (the finalize kernels then sum nothing).
struct Partials {
  at::Tensor values;
  int64_t slices = 0;
  const double* data() const { return slices > 0 ? values.const_data_ptr<double>() : nullptr; }
};

template <class Op>
Partials launch(PassArgs<typename Op::scalar_t> a, const ChannelView& view, const at::TensorOptions& options) {
  constexpr int E = kVecWidth<typename Op::scalar_t>;
  const auto kernel = element_pass<Op>;
  const LaunchShape shape = launch_shape(kernel, view, a.vector ? E : 1, E);
  a.slices = shape.slices;
  a.chunk = shape.chunk;
  Partials partials;
  if (a.accumulate) {
    partials.values = at::empty({Op::kQuantities * view.C * shape.slices}, options.dtype(at::kDouble));
    partials.slices = shape.slices;
    a.partials = partials.values.mutable_data_ptr<double>();
  }
  kernel<<<shape.grid, shape.block, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// Calls f(std::integral_constant<int, K>) for the runtime K in 1..kMaxComponents.
template <typename F, int... Ks>
void dispatch_components(int K, F&& f, std::integer_sequence<int, Ks...>) {
  const bool found = ((K == Ks + 1 && (f(std::integral_constant<int, Ks + 1>{}), true)) || ...);
  TORCH_CHECK(found, "uan: the CUDA kernels support 1 to ", kMaxComponents, " components, got ", K);
}

// Runs pass Op<scalar_t, K> over x; `data` are the tensors read or written
// element by element, which must all be 16-byte aligned for vector access.
template <template <typename, int> class Op, typename scalar_t>
Partials run_pass(PassArgs<scalar_t> a, const ChannelView& view, int K, const at::TensorOptions& options,
                  std::initializer_list<const void*> data) {
  if (view.N * view.L == 0 || view.C == 0) {
    return {};
  }
  a.vector = !view.channels_inner() && view.L % kVecWidth<scalar_t> == 0 &&
             std::all_of(data.begin(), data.end(),
                         [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kLoadBytes == 0; });
  Partials partials;
  dispatch_components(
      K, [&](auto components) { partials = launch<Op<scalar_t, decltype(components)::value>>(a, view, options); },
      std::make_integer_sequence<int, kMaxComponents>{});
  return partials;
}

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
