// What the CUDA host code (uan_cuda.cu) and the element passes (*_pass.cu)
// share: launch constants, the passes' kernel arguments, their per-unit sums,
// and run_pass, which each *_pass.cu instantiates for its pass in its own
// translation unit so that the build compiles the passes in parallel.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>

#include "uan_constants.h"
#include "uan_host.h"

namespace uan {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Bytes each thread loads per input per loop iteration at most: one 16-byte
// vector, or as many scalars, so enough memory requests are in flight.
constexpr int kLoadBytes = 16;
// Elements one thread sums in the accumulation type within a unit before its
// partial goes to float64: bounds float32 rounding for channels of any length.
constexpr int64_t kMaxElementsPerThread = 512;
// Quantities block-reduced per round through shared memory (8 KiB).
constexpr int kReduceChunk = 4;

// Component evaluations one loop iteration of a pass unrolls at most
// (elements x K) when it has more than kLargeKElements elements: bfloat16 at
// K = 8, 8 elements of one 16-byte load, spilled.
constexpr int kMaxUnrolledComponents = 32;
// Elements per iteration then: what float32 loads at any K (fewer made its
// K = 16 passes slower and spilled all the same).
constexpr int kLargeKElements = 4;

// Elements a thread handles per loop iteration of a pass with K components:
// one 16-byte load's worth, or kLargeKElements when that unrolls too many
// components.
constexpr int iteration_elements(int itemsize, int K) {
  const int elements = kLoadBytes / itemsize;
  return elements > kLargeKElements && elements * K > kMaxUnrolledComponents ? kLargeKElements : elements;
}

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
  bool vector;               // channel-major with rows of whole aligned items: vector accesses
  bool evenly_spaced;        // a channel's elements equally spaced: a wrap to the next n moves no offset
  bool accumulate;           // whether this launch writes partials
};

// Rows of the backward elementwise constants written by finalize_backward.
enum BackwardRow : int { kShift = 0, kGammaScale, kMeanCoef, kVarCoef, kVarTerm, kBackwardRows };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A pass's per-unit sums: (Q, C, slices) float64, slices = 0 when the pass
// had no elements (the finalize kernels then sum nothing).
struct Partials {
  at::Tensor values;
  int64_t slices = 0;
  const double* data() const { return slices > 0 ? values.const_data_ptr<double>() : nullptr; }
};

// The element passes (uan_passes.cuh), templated on the input type and K.
template <typename scalar_t_, int K>
struct Statistics;
template <typename scalar_t_, int K>
struct Normalize;
template <typename scalar_t_, int K>
struct BackwardReduce;
template <typename scalar_t_, int K>
struct BackwardElementwise;

// Runs pass Op<scalar_t, K> over x; `data` are the tensors read or written
// element by element, which must all be aligned to an item for vector access.
template <template <typename, int> class Op, typename scalar_t>
Partials run_pass(PassArgs<scalar_t> a, const ChannelView& view, int K, const at::TensorOptions& options,
                  std::initializer_list<const void*> data);

}  // namespace cuda
}  // namespace uan
