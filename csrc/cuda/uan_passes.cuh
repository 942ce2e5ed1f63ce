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
//    threads walk the channel's rows with vector accesses of E elements (16
//    bytes, fewer at large K: iteration_elements) when L and the pointers
//    allow it, else with E scalar loads.
//  * channels-inner (channels_last or (N, C), stride_c = 1): TC x (256 / TC)
//    with TC = min(32, C rounded up to a power of 2); thread x owns one
//    channel of the tile, so a warp reads consecutive channels of a row.
//
// Each pass is instantiated for every input type and K = 1..kMaxComponents in
// its own translation unit (UAN_RUN_PASS_INSTANCE in *_pass.cu).
#pragma once

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "uan_cuda.cuh"
#include "uan_math.h"

namespace uan {
namespace cuda {

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
  static constexpr int kComponents = K;
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

  __device__ void convert_sums(const PassArgs<scalar_t>&, int64_t, double* sums) const {
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
  static constexpr int kComponents = K;
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
  static constexpr int kComponents = K;
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
  static constexpr int kComponents = K;
  static constexpr int kQuantities = 3 * K;
  static constexpr bool kReadsGrad = true;
  static constexpr bool kWritesOutput = true;
  static constexpr bool kConvertsSums = true;
  ChannelResponsibilities<K, acc_t> r;
  acc_t rows[kBackwardRows][K];
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

  // The parameters are read from the kernel's arguments after the element
  // loop rather than held in registers through it.
  __device__ void convert_sums(const PassArgs<scalar_t>& args, int64_t c, double* sums) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t i = k * args.C + c;
      acc_t a, b;
      standardization_constants(args.mu[i], args.log_sigma[i], r.pivot, a, b);
      standardize_sums(a, b, sums[k], sums[K + k], sums[2 * K + k]);
    }
  }
};

// ---- Loads, stores and the block reduction. --------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// E consecutive elements in one access (p is aligned to them).
template <int E, typename scalar_t>
__device__ __forceinline__ Packed<scalar_t, E> load_packed(const scalar_t* p) {
  return *reinterpret_cast<const Packed<scalar_t, E>*>(p);
}

// Each thread's partials, kReduceChunk quantities at a time.
static __shared__ double reduce_scratch[kReduceChunk][kThreads];

// Sums reduce_scratch[i][y * TC + x] over the TR rows y for each quantity
// q0 + i < q0 + count and channel first_channel + x, and writes the sums to
// partials[(q, c, slice)]. Fixed order: `width` lanes stride over y, then a
// shuffle tree. Not inlined: one copy serves every chunk of every pass.
static __device__ __noinline__ void reduce_chunk(int q0, int count, int64_t first_channel, int64_t C, int64_t slices,
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

// A thread's position in its channel: its l and its memory offset.
struct Cursor {
  int64_t l, offset;
};

// Moving a cursor one item (TR * vec elements) on: step_l along l, plus a
// wrap to the next n when l passes L.
struct Walk {
  int64_t step_l, step_offset, wrap_offset, L;

  __device__ __forceinline__ void advance(Cursor& cur) const {
    cur.l += step_l;
    cur.offset += step_offset;
    if (cur.l >= L) {
      cur.l -= L;
      cur.offset += wrap_offset;
    }
  }
};

// Elements per thread and loop iteration of pass Op (uan_cuda.cuh).
template <class Op>
constexpr int kIterationElements = iteration_elements(sizeof(typename Op::scalar_t), Op::kComponents);

// One pass over x. Thread (x, y) of the block handles channel tile * TC + x.
// Per iteration it loads E elements of its channel into registers and runs
// the math unrolled over them: one vector item when a.vector (the common
// NCHW case; outputs leave in one vector store), else E one-element items TR
// items apart; a slice's last items that fill no group of E go one by one.
template <class Op>
__global__ void __launch_bounds__(kThreads) element_pass(const PassArgs<typename Op::scalar_t> a) {
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  constexpr int E = kIterationElements<Op>;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t tiles = (a.C + blockDim.x - 1) / blockDim.x;
  const int64_t elements = a.N * a.L;
  const int64_t step = static_cast<int64_t>(blockDim.y) * (a.vector ? E : 1);
  const Walk walk{step % a.L, (step / a.L) * a.stride_n + (step % a.L) * a.stride_l,
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
      const int64_t e = slice * a.chunk + static_cast<int64_t>(threadIdx.y) * (a.vector ? E : 1);
      // The thread's items in the slice, at most kMaxElementsPerThread: a
      // 32-bit count instead of a 64-bit element index to compare with end.
      int items = e < end ? static_cast<int>((end - e + step - 1) / step) : 0;
      Cursor cur;
      cur.l = e % a.L;
      cur.offset = (e / a.L) * a.stride_n + c * a.stride_c + cur.l * a.stride_l;
      while (items > 0) {
        const Cursor first = cur;
        // Every load of the iteration is issued before any is used.
        Packed<scalar_t, E> raw_x, raw_g;
        if (a.vector) {
          // A full vector item: the E elements straight from registers, unrolled.
          raw_x = load_packed<E>(a.x + cur.offset);
          if constexpr (Op::kReadsGrad) {
            raw_g = load_packed<E>(a.grad_out + cur.offset);
          }
          walk.advance(cur);
          --items;
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
        // Every item of the group lies in the slice: all iterations but a
        // slice's last take this path, so a warp's lanes agree on it.
        const bool full_group = items >= E;
        if (full_group) {
          // E one-element items TR items apart, also unrolled from registers.
          int64_t offsets[E];
          if (a.evenly_spaced) {
            // Offsets a constant step apart. cur.l is not advanced: for these
            // views l never wraps (L == 1) or a wrap moves no offset.
#pragma unroll
            for (int i = 0; i < E; ++i) {
              offsets[i] = cur.offset + i * walk.step_offset;
            }
            cur.offset += E * walk.step_offset;
          } else {
#pragma unroll
            for (int i = 0; i < E; ++i) {
              offsets[i] = cur.offset;
              walk.advance(cur);
            }
          }
#pragma unroll
          for (int i = 0; i < E; ++i) {
            raw_x.v[i] = a.x[offsets[i]];
            if constexpr (Op::kReadsGrad) {
              raw_g.v[i] = a.grad_out[offsets[i]];
            }
          }
#pragma unroll
          for (int v = 0; v < E; ++v) {
            const acc_t dout = Op::kReadsGrad ? static_cast<acc_t>(raw_g.v[v]) : acc_t(0);
            const acc_t y = op.element(static_cast<acc_t>(raw_x.v[v]), dout, partial);
            if constexpr (Op::kWritesOutput) {
              a.out[offsets[v]] = static_cast<scalar_t>(y);
            }
          }
          items -= E;
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
        --items;
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
            op.convert_sums(a, c, sums);
          }
        }
        write_unit_partials(sums, a, first_channel, slice, tid);
      }
    }
  }
}

// ---- Launching a pass. ----------------------------------------------------

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

// Vector access where the view is channel-major with rows of whole items and
// every pointer in `data` is aligned to an item.
template <class Op>
Partials launch(PassArgs<typename Op::scalar_t> a, const ChannelView& view, const at::TensorOptions& options,
                std::initializer_list<const void*> data) {
  constexpr int E = kIterationElements<Op>;
  constexpr int item_bytes = E * sizeof(typename Op::scalar_t);
  a.vector = !view.channels_inner() && view.L % E == 0 &&
             std::all_of(data.begin(), data.end(),
                         [](const void* p) { return reinterpret_cast<uintptr_t>(p) % item_bytes == 0; });
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

// run_pass (uan_cuda.cuh): K dispatched to Op<scalar_t, K>.
template <template <typename, int> class Op, typename scalar_t>
Partials run_pass(PassArgs<scalar_t> a, const ChannelView& view, int K, const at::TensorOptions& options,
                  std::initializer_list<const void*> data) {
  if (view.N * view.L == 0 || view.C == 0) {
    return {};
  }
  Partials partials;
  dispatch_components(
      K,
      [&](auto components) {
        partials = launch<Op<scalar_t, decltype(components)::value>>(a, view, options, data);
      },
      std::make_integer_sequence<int, kMaxComponents>{});
  return partials;
}

}  // namespace cuda
}  // namespace uan

// The explicit instance of run_pass<UAN_PASS, scalar_t>: each *_pass.cu
// defines UAN_PASS and lists the instances with UAN_FOR_EACH_INPUT_TYPE.
#define UAN_RUN_PASS_INSTANCE(scalar_t)                                                                 \
  template Partials run_pass<UAN_PASS, scalar_t>(PassArgs<scalar_t>, const ChannelView&, int,         \
                                                 const at::TensorOptions&, std::initializer_list<const void*>);
