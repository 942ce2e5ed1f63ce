// CUDA element passes of the UAN operators (the CUDA side of uan_cpu.cpp).
//
// Every pass walks x seen as (N, C, L) in "units": a tile of channels times a
// slice of each channel's N*L elements. A block owns one unit at a time
// (grid-stride over units), keeps its channel's per-(k, c) constants in
// registers and, for the reduction passes, writes one float64 partial per
// (quantity, channel, slice). A second kernel sums each (quantity, channel)'s
// slices in a fixed order, so results are bitwise reproducible (no atomics).
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
  const acc_t* table;        // (rows, K, C) per-component constants (TableRow)
  const acc_t* gamma;
  const acc_t* beta;
  acc_t* pivot;              // statistics: (C,) pivot written
  double* partials;          // (Q, C, slices) per-unit sums
  int64_t N, C, L, stride_n, stride_c, stride_l;
  int64_t slices, chunk;     // each channel's N*L elements in `slices` ranges of `chunk`
  bool vector;               // channel-major with 16-byte aligned rows: 16-byte accesses
  bool accumulate;           // whether this launch writes partials
};

template <int K, typename acc_t>
__device__ __forceinline__ void load_row(const acc_t* table, int row, int64_t C, int64_t c, acc_t (&out)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    out[k] = table[(static_cast<int64_t>(row) * K + k) * C + c];
  }
}

// ---- The four passes: per-channel constants and per-element work. ----------
// element() returns the value written to `out` (ignored when kWritesOutput is
// false) and adds this element's terms to the thread's partial sums.

template <typename scalar_t_, int K>
struct Statistics {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kQuantities = 3 * K;
  static constexpr bool kReadsGrad = false;
  static constexpr bool kWritesOutput = false;
  acc_t mu[K], inv_sigma[K], log_prior[K];
  acc_t pivot;

  __device__ void load(const PassArgs<scalar_t>& a, int64_t c, bool leader) {
    load_row(a.table, kMu, a.C, c, mu);
    load_row(a.table, kInvSigma, a.C, c, inv_sigma);
    load_row(a.table, kLogPrior, a.C, c, log_prior);
    // Sums are taken around the channel's first element x[0, c, 0], as on CPU
    // (statistics_from_sums undoes the shift), so |mean| >> std stays accurate.
    pivot = static_cast<acc_t>(a.x[c * a.stride_c]);
    if (leader) {
      a.pivot[c] = pivot;
    }
  }

  __device__ acc_t element(acc_t x, acc_t, acc_t* partial) const {
    acc_t tau[K];
    responsibilities(x, K, mu, inv_sigma, log_prior, tau);
    const acc_t d = x - pivot;
    const acc_t dd = d * d;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      partial[k] += tau[k];
      partial[K + k] += tau[k] * d;
      partial[2 * K + k] += tau[k] * dd;
    }
    return acc_t(0);
  }
};

template <typename scalar_t_, int K>
struct Normalize {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kQuantities = 0;
  static constexpr bool kReadsGrad = false;
  static constexpr bool kWritesOutput = true;
  acc_t mu[K], inv_sigma[K], log_prior[K], center[K], scale[K];
  acc_t gamma, beta;

  __device__ void load(const PassArgs<scalar_t>& a, int64_t c, bool) {
    load_row(a.table, kMu, a.C, c, mu);
    load_row(a.table, kInvSigma, a.C, c, inv_sigma);
    load_row(a.table, kLogPrior, a.C, c, log_prior);
    load_row(a.table, kCenter, a.C, c, center);
    load_row(a.table, kScale, a.C, c, scale);
    gamma = a.gamma[c];
    beta = a.beta[c];
  }

  __device__ acc_t element(acc_t x, acc_t, acc_t*) const {
    acc_t tau[K];
    responsibilities(x, K, mu, inv_sigma, log_prior, tau);
    return gamma * mixture_transform(x, K, tau, center, scale) + beta;
  }
};

template <typename scalar_t_, int K>
struct BackwardReduce {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kQuantities = 2 * K + 1;
  static constexpr bool kReadsGrad = true;
  static constexpr bool kWritesOutput = false;
  acc_t mu[K], inv_sigma[K], log_prior[K], center[K];

  __device__ void load(const PassArgs<scalar_t>& a, int64_t c, bool) {
    load_row(a.table, kMu, a.C, c, mu);
    load_row(a.table, kInvSigma, a.C, c, inv_sigma);
    load_row(a.table, kLogPrior, a.C, c, log_prior);
    load_row(a.table, kCenter, a.C, c, center);
  }

  __device__ acc_t element(acc_t x, acc_t dout, acc_t* partial) const {
    acc_t tau[K];
    responsibilities(x, K, mu, inv_sigma, log_prior, tau);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t weighted = tau[k] * dout;
      partial[k] += weighted;
      partial[K + k] += weighted * (x - center[k]);
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
  acc_t c[kBackwardRows][K];
  acc_t gamma;
  bool mixture_grads;

  __device__ void load(const PassArgs<scalar_t>& a, int64_t channel, bool) {
#pragma unroll
    for (int row = 0; row < kBackwardRows; ++row) {
      load_row(a.table, row, a.C, channel, c[row]);
    }
    gamma = a.gamma[channel];
    mixture_grads = a.accumulate;
  }

  __device__ acc_t element(acc_t x, acc_t dout, acc_t* partial) const {
    const BackwardComponents<acc_t> p{c[kMu], c[kInvSigma], c[kLogPrior], c[kCenter],
                                      c[kScale], c[kMeanCoef], c[kVarCoef], c[kVar]};
    acc_t tau[K], U[K], w[K];
    responsibilities(x, K, p.mu, p.inv_sigma, p.log_prior, tau);
    const acc_t dx = input_gradient(x, gamma * dout, K, p, tau, U, w);
    if (mixture_grads) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        partial[k] += U[k] * w[k];
        partial[K + k] += U[k] * (w[k] * (x - p.mu[k]) - acc_t(1));
        partial[2 * K + k] += U[k];
      }
    }
    return dx;
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

template <int E, typename scalar_t>
__device__ __forceinline__ void store_packed(const scalar_t (*column)[kThreads], int tid, scalar_t* p) {
  Packed<scalar_t, E> packed;
#pragma unroll
  for (int v = 0; v < E; ++v) {
    packed.v[v] = column[v][tid];
  }
  *reinterpret_cast<Packed<scalar_t, E>*>(p) = packed;
}

template <int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage(const Packed<scalar_t, E>& values, acc_t (*column)[kThreads], int tid) {
#pragma unroll
  for (int v = 0; v < E; ++v) {
    column[v][tid] = static_cast<acc_t>(values.v[v]);
  }
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

// Writes the block's sums of each thread's partials for the unit's channels.
template <int Q, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_unit_partials(const acc_t (&partial)[Q], const PassArgs<scalar_t>& a,
                                                    int64_t first_channel, int64_t slice, int tid) {
  // Unrolled so that partial[] is indexed by constants and stays in registers.
#pragma unroll
  for (int q0 = 0; q0 < Q; q0 += kReduceChunk) {
#pragma unroll
    for (int i = 0; i < kReduceChunk && q0 + i < Q; ++i) {
      reduce_scratch[i][tid] = static_cast<double>(partial[q0 + i]);
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
// Per iteration it loads E elements of its channel (one 16-byte item when
// a.vector, else E one-element items TR items apart), stages them in shared
// memory and runs the per-element code over them in a rolled loop: a single
// copy of the math, which keeps the 16 K instantiations quick to compile.
// Outputs go straight to memory, or through shared memory into one 16-byte
// store when a.vector.
template <class Op>
__global__ void __launch_bounds__(kThreads) element_pass(const PassArgs<typename Op::scalar_t> a) {
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  constexpr int E = kVecWidth<scalar_t>;
  // [element][thread]: each thread uses its own column, so no barriers, and
  // a warp's accesses hit consecutive banks.
  __shared__ acc_t stage_x[E][kThreads];
  __shared__ acc_t stage_g[Op::kReadsGrad ? E : 1][kThreads];
  __shared__ scalar_t stage_y[Op::kWritesOutput ? E : 1][kThreads];

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
    if (c < a.C) {
      Op op;
      op.load(a, c, slice == 0 && threadIdx.y == 0);
      const int64_t end = std::min(elements, (slice + 1) * a.chunk);
      Cursor cur;
      cur.e = slice * a.chunk + static_cast<int64_t>(threadIdx.y) * (a.vector ? E : 1);
      cur.l = cur.e % a.L;
      cur.offset = (cur.e / a.L) * a.stride_n + c * a.stride_c + cur.l * a.stride_l;
      while (cur.e < end) {
        const Cursor first = cur;
        // Every load of the iteration is issued before any is used.
        Packed<scalar_t, E> raw_x, raw_g;
        int count = 0;
        if (a.vector) {
          raw_x = load_packed<E>(a.x + cur.offset);
          if constexpr (Op::kReadsGrad) {
            raw_g = load_packed<E>(a.grad_out + cur.offset);
          }
          count = E;
          walk.advance(cur);
        } else {
#pragma unroll
          for (int i = 0; i < E; ++i) {
            // Items past the slice's end reload the first one (in bounds) and are not counted.
            const bool valid = cur.e < end;
            const int64_t at = valid ? cur.offset : first.offset;
            raw_x.v[i] = a.x[at];
            if constexpr (Op::kReadsGrad) {
              raw_g.v[i] = a.grad_out[at];
            }
            count = valid ? i + 1 : count;
            walk.advance(cur);
          }
        }
        stage(raw_x, stage_x, tid);
        if constexpr (Op::kReadsGrad) {
          stage(raw_g, stage_g, tid);
        }
        Cursor out = first;
#pragma unroll 1
        for (int v = 0; v < count; ++v) {
          acc_t dout = acc_t(0);
          if constexpr (Op::kReadsGrad) {
            dout = stage_g[v][tid];
          }
          const acc_t y = op.element(stage_x[v][tid], dout, partial);
          if constexpr (Op::kWritesOutput) {
            if (a.vector) {
              stage_y[v][tid] = static_cast<scalar_t>(y);
            } else {
              a.out[out.offset] = static_cast<scalar_t>(y);
              walk.advance(out);
            }
          }
        }
        if constexpr (Op::kWritesOutput) {
          if (a.vector) {
            store_packed<E>(stage_y, tid, a.out + first.offset);
          }
        }
      }
    }
    if constexpr (Op::kQuantities > 0) {
      if (a.accumulate) {
        write_unit_partials(partial, a, first_channel, slice, tid);
      }
    }
  }
}

// Second stage: sums[p] = sum over s of partials[p, s] for each (quantity,
// channel) pair p, one warp per pair, lanes striding over s and then a
// shuffle tree: a fixed order, so the result does not depend on scheduling.
__global__ void __launch_bounds__(kThreads) sum_partials(const double* partials, int64_t pairs, int64_t slices,
                                                         double* sums) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; p < pairs; p += warps) {
    double total = 0.0;
    for (int64_t s = lane; s < slices; s += kWarp) {
      total += partials[p * slices + s];
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      total += __shfl_xor_sync(kFullMask, total, offset);
    }
    if (lane == 0) {
      sums[p] = total;
    }
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

template <class Op>
void launch(PassArgs<typename Op::scalar_t> a, const ChannelView& view, at::Tensor* sums) {
  constexpr int E = kVecWidth<typename Op::scalar_t>;
  const auto kernel = element_pass<Op>;
  const LaunchShape shape = launch_shape(kernel, view, a.vector ? E : 1, E);
  a.slices = shape.slices;
  a.chunk = shape.chunk;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  if (a.accumulate) {
    partials = at::empty({Op::kQuantities * view.C * shape.slices}, sums->options());
    a.partials = partials.mutable_data_ptr<double>();
  }
  kernel<<<shape.grid, shape.block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.accumulate) {
    const int64_t pairs = Op::kQuantities * view.C;
    const int64_t blocks = std::min<int64_t>(ceil_div(pairs, kThreads / kWarp), shape.grid);
    sum_partials<<<blocks, kThreads, 0, stream>>>(a.partials, pairs, shape.slices, sums->mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
void run_pass(PassArgs<scalar_t> a, const ChannelView& view, int K, at::Tensor* sums,
              std::initializer_list<const void*> data) {
  if (view.N * view.L == 0 || view.C == 0) {
    return;
  }
  a.vector = !view.channels_inner() && view.L % kVecWidth<scalar_t> == 0 &&
             std::all_of(data.begin(), data.end(),
                         [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kLoadBytes == 0; });
  dispatch_components(
      K, [&](auto components) { launch<Op<scalar_t, decltype(components)::value>>(a, view, sums); },
      std::make_integer_sequence<int, kMaxComponents>{});
}

template <typename scalar_t>
PassArgs<scalar_t> pass_args(const ChannelView& view, const at::Tensor& table) {
  PassArgs<scalar_t> a{};
  a.table = table.const_data_ptr<typename PassArgs<scalar_t>::acc_t>();
  a.N = view.N;
  a.C = view.C;
  a.L = view.L;
  a.stride_n = view.stride_n;
  a.stride_c = view.stride_c;
  a.stride_l = view.stride_l;
  return a;
}

void statistics_pass(const at::Tensor& x, const ChannelView& view, const at::Tensor& table, at::Tensor& sums,
                     at::Tensor& pivot) {
  const int K = static_cast<int>(table.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_statistics_cuda", [&] {
    auto a = pass_args<scalar_t>(view, table);
    a.x = x.const_data_ptr<scalar_t>();
    a.pivot = pivot.mutable_data_ptr<at::opmath_type<scalar_t>>();
    a.accumulate = true;
    run_pass<Statistics>(a, view, K, &sums, {a.x});
  });
}

void normalize_pass(const at::Tensor& x, const ChannelView& view, const at::Tensor& table, const at::Tensor& gamma,
                    const at::Tensor& beta, at::Tensor& out) {
  const int K = static_cast<int>(table.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_normalize_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = pass_args<scalar_t>(view, table);
    a.x = x.const_data_ptr<scalar_t>();
    a.out = out.mutable_data_ptr<scalar_t>();
    a.gamma = gamma.const_data_ptr<acc_t>();
    a.beta = beta.const_data_ptr<acc_t>();
    run_pass<Normalize>(a, view, K, nullptr, {a.x, a.out});
  });
}

void backward_reduce_pass(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                          const at::Tensor& table, at::Tensor& sums) {
  const int K = static_cast<int>(table.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_reduce_cuda", [&] {
    auto a = pass_args<scalar_t>(view, table);
    a.x = x.const_data_ptr<scalar_t>();
    a.grad_out = grad_out.const_data_ptr<scalar_t>();
    a.accumulate = true;
    run_pass<BackwardReduce>(a, view, K, &sums, {a.x, a.grad_out});
  });
}

void backward_elementwise_pass(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                               const at::Tensor& table, const at::Tensor& gamma, bool mixture_grads,
                               at::Tensor& grad_input, at::Tensor& sums) {
  const int K = static_cast<int>(table.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_elementwise_cuda", [&] {
    auto a = pass_args<scalar_t>(view, table);
    a.x = x.const_data_ptr<scalar_t>();
    a.grad_out = grad_out.const_data_ptr<scalar_t>();
    a.out = grad_input.mutable_data_ptr<scalar_t>();
    a.gamma = gamma.const_data_ptr<at::opmath_type<scalar_t>>();
    a.accumulate = mixture_grads;
    run_pass<BackwardElementwise>(a, view, K, &sums, {a.x, a.grad_out, a.out});
  });
}

constexpr ElementPasses kCudaPasses{statistics_pass, normalize_pass, backward_reduce_pass, backward_elementwise_pass};

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& mass, double eps, bool mixture_grads) {
  const c10::cuda::CUDAGuard guard(x.device());
  return backward(kCudaPasses, grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(uan, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("forward.stats", &forward_stats_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace uan
