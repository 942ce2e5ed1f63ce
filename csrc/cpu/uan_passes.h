// What the CPU passes share: SIMD loads and stores, the walk over units of
// channels, float64 sums in a fixed order, the per-(k, c) constants of a call,
// and the passes' entry points. Each pass is compiled for every K in its own
// translation unit (*_pass.cpp), so the build compiles them in parallel; the
// host code that runs them is uan_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "uan_constants.h"
#include "uan_host.h"
#include "uan_math.h"

namespace uan {
namespace cpu {

using at::vec::Vectorized;

// Vectors summed in the accumulation type before the partials are added to
// float64 totals: bounds the rounding error for channels of any length.
constexpr int64_t kFlushSpans = 128;

template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load(const scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p, count);
  } else {
    acc_t buf[Vectorized<acc_t>::size()] = {};
    for (int64_t i = 0; i < count; ++i) {
      buf[i] = static_cast<acc_t>(p[i]);
    }
    return Vectorized<acc_t>::loadu(buf);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* p, const Vectorized<acc_t>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else {
    acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t i = 0; i < count; ++i) {
      p[i] = static_cast<scalar_t>(buf[i]);
    }
  }
}

// A unit of work: one channel (channel-major input: SIMD lanes run along the
// channel's elements), or, for channels-inner input, a block of up to V
// channels (lane j holds channel first + j) over one chunk of rows. Chunking
// the rows keeps a chunk's lines in cache while its channel blocks are
// visited in turn; each chunk's sums go to their own slot and the slots are
// added in chunk order, so results do not depend on the thread count.
struct Unit {
  int64_t first;
  int64_t channels;
  int64_t chunk;
  int64_t row_begin;
  int64_t row_end;
};

// Rows (one element of every channel) per chunk of channels-inner input.
constexpr int64_t kRowsPerChunk = 2048;

template <typename acc_t>
class Walker {
 public:
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t V = Vec::size();

  explicit Walker(const ChannelView& view)
      : view_(view),
        inner_(view.channels_inner()),
        rows_(view.N * view.L),
        blocks_(inner_ ? (view.C + V - 1) / V : view.C),
        chunks_(inner_ ? std::max<int64_t>(1, (rows_ + kRowsPerChunk - 1) / kRowsPerChunk) : 1) {}

  int64_t num_units() const { return blocks_ * chunks_; }
  int64_t num_chunks() const { return chunks_; }

  Unit unit(int64_t u) const {
    if (!inner_) {
      return {u, 1, 0, 0, rows_};
    }
    const int64_t chunk = u / blocks_;
    const int64_t first = (u % blocks_) * V;
    return {first, std::min<int64_t>(V, view_.C - first), chunk, chunk * kRowsPerChunk,
            std::min<int64_t>(rows_, (chunk + 1) * kRowsPerChunk)};
  }

  // A (K, C) block of per-component constants as K vectors: broadcast or per lane.
  void load_constants(const acc_t* block, int K, const Unit& unit, Vec* out) const {
    for (int k = 0; k < K; ++k) {
      const acc_t* base = block + k * view_.C + unit.first;
      out[k] = inner_ ? Vec::loadu(base, unit.channels) : Vec(*base);
    }
  }

  // A (C,) vector of per-channel values, broadcast or per lane.
  Vec load_channel_values(const acc_t* values, const Unit& unit) const {
    return inner_ ? Vec::loadu(values + unit.first, unit.channels) : Vec(values[unit.first]);
  }

  // f(offset, count) for every span of up to V elements of the unit, then
  // flush() every kFlushSpans spans and once at the end.
  template <typename F, typename Flush>
  void for_each_span(const Unit& unit, F&& f, Flush&& flush) const {
    int64_t spans = 0;
    auto visit = [&](int64_t offset, int64_t count) {
      f(offset, count);
      if (++spans == kFlushSpans) {
        flush();
        spans = 0;
      }
    };
    if (inner_) {
      int64_t n = unit.row_begin / view_.L;
      int64_t l = unit.row_begin % view_.L;
      for (int64_t r = unit.row_begin; r < unit.row_end; ++r) {
        visit(n * view_.stride_n + l * view_.stride_l + unit.first, unit.channels);
        if (++l == view_.L) {
          l = 0;
          ++n;
        }
      }
    } else {
      for (int64_t n = 0; n < view_.N; ++n) {
        const int64_t row = n * view_.stride_n + unit.first * view_.stride_c;
        for (int64_t l = 0; l < view_.L; l += V) {
          visit(row + l, std::min<int64_t>(V, view_.L - l));
        }
      }
    }
    flush();
  }

  bool channels_inner() const { return inner_; }
  const ChannelView& view() const { return view_; }

 private:
  ChannelView view_;
  bool inner_;
  int64_t rows_;
  int64_t blocks_;
  int64_t chunks_;
};

// Per-chunk slots of (Q, C) float64 sums, added in chunk order once every
// unit is done, so the result does not depend on which thread ran which unit.
class ChunkSums {
 public:
  ChunkSums(int64_t chunks, int64_t size) : size_(size), slots_(chunks * size, 0.0) {}
  double* slot(int64_t chunk) { return slots_.data() + chunk * size_; }
  // Sums over chunks, (Q, C).
  std::vector<double> totals() const {
    std::vector<double> out(slots_.begin(), slots_.begin() + size_);
    for (size_t i = size_; i < slots_.size(); ++i) {
      out[i % size_] += slots_[i];
    }
    return out;
  }

 private:
  int64_t size_;
  std::vector<double> slots_;
};

// Per-lane sums of Q quantities: partials in acc_t, totals in float64. Q is a
// compile-time constant so that the partials stay in vector registers.
template <typename acc_t, int Q>
struct LaneSums {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t V = Vec::size();
  static constexpr int quantities = Q;
  Vec partial[Q > 0 ? Q : 1];
  double total[Q > 0 ? Q : 1][V];

  LaneSums() {
    for (int i = 0; i < Q; ++i) {
      partial[i] = Vec(0);
      for (int64_t j = 0; j < V; ++j) {
        total[i][j] = 0.0;
      }
    }
  }

  void flush() {
    acc_t buf[V];
    for (int i = 0; i < quantities; ++i) {
      partial[i].store(buf);
      for (int64_t j = 0; j < V; ++j) {
        total[i][j] += buf[j];
      }
      partial[i] = Vec(0);
    }
  }

  // Adds the unit's totals into out, a (Q, C) float64 array.
  void write(const Walker<acc_t>& walker, const Unit& unit, double* out) const {
    const int64_t C = walker.view().C;
    for (int i = 0; i < quantities; ++i) {
      if (walker.channels_inner()) {
        for (int64_t j = 0; j < unit.channels; ++j) {
          out[i * C + unit.first + j] += total[i][j];
        }
      } else {
        double sum = 0.0;
        for (int64_t j = 0; j < V; ++j) {
          sum += total[i][j];
        }
        out[i * C + unit.first] += sum;
      }
    }
  }
};

// Zero the responsibilities of padding lanes so they add nothing to any sum.
template <typename Vec>
inline void mask_padding(Vec* e, int K, int64_t count) {
  if (count < Vec::size()) {
    for (int k = 0; k < K; ++k) {
      e[k] = Vec::set(Vec(0), e[k], count);
    }
  }
}

// Calls f(std::integral_constant<int, K>) for the runtime K in 1..kMaxComponents,
// so that each pass's per-component loops unroll and its values stay in registers.
template <typename F, int... Ks>
void dispatch_components(int K, F&& f, std::integer_sequence<int, Ks...>) {
  const bool found = ((K == Ks + 1 && (f(std::integral_constant<int, Ks + 1>{}), true)) || ...);
  TORCH_CHECK(found, "uan: the CPU kernels support 1 to ", kMaxComponents, " components, got ", K);
}

template <typename F>
void with_components(int K, F&& f) {
  dispatch_components(K, std::forward<F>(f), std::make_integer_sequence<int, kMaxComponents>{});
}

template <typename F>
void for_units(int64_t units, F&& f) {
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      f(u);
    }
  });
}

// Per-(k, c) constants of one call, rows of (K, C) blocks, and the (C,) pivots.
template <typename acc_t>
struct ChannelConstants {
  int K;
  int64_t C;
  std::vector<acc_t> log_lam;          // (K,)
  std::vector<acc_t> pivot;            // (C,)
  std::vector<acc_t> component_pivot;  // (K, C): the statistics pass's p_k (uan_constants.h)
  std::vector<acc_t> rows;             // (kRows, K, C)

  enum Row { kAlpha, kBeta, kGamma, kA, kB, kSlope, kShift, kGammaScale, kMeanCoef, kVarCoef, kVarTerm, kRows };

  ChannelConstants(const Parameters& p) : K(static_cast<int>(p.K)), C(p.mu.size(1)), log_lam(K), pivot(C) {
    rows.resize(kRows * K * C);
    log_mixing_weights(p.mix_logits.const_data_ptr<acc_t>(), K, log_lam.data());
  }
  acc_t* row(Row r) { return rows.data() + r * K * C; }
  const acc_t* row(Row r) const { return rows.data() + r * K * C; }
  acc_t& at(Row r, int k, int64_t c) { return rows[(r * K + k) * C + c]; }

  // Pivots: the channel's first element (training: the statistics pass's
  // pivot, re-read by the backward), or component 0's mean (given statistics).
  template <typename scalar_t>
  void pivot_from_input(const scalar_t* x, const ChannelView& view) {
    for (int64_t c = 0; c < C; ++c) {
      pivot[c] = view.N * view.L > 0 ? static_cast<acc_t>(x[c * view.stride_c]) : acc_t(0);
    }
  }
  void pivot_from_mean(const acc_t* mean) {
    for (int64_t c = 0; c < C; ++c) {
      pivot[c] = mean[c];
    }
  }

  // The relative-logit constants of the responsibilities and, for the
  // mixture-parameter sums, the standardisation u = a xp + b.
  void responsibilities(const Parameters& p) {
    const acc_t* mu = p.mu.const_data_ptr<acc_t>();
    const acc_t* log_sigma = p.log_sigma.const_data_ptr<acc_t>();
    const acc_t* mix_logits = p.mix_logits.const_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      channel_responsibility_constants(mu + c, log_sigma + c, mix_logits, K, C, pivot[c], &at(kAlpha, 0, c),
                                       &at(kBeta, 0, c), &at(kGamma, 0, c), C);
      for (int k = 0; k < K; ++k) {
        standardization_constants(mu[k * C + c], log_sigma[k * C + c], pivot[c], at(kA, k, c), at(kB, k, c));
      }
    }
  }

  // The statistics pass's component pivots, from kPivotSamples elements of
  // each channel (after responsibilities()).
  template <typename scalar_t>
  void component_pivots_from_input(const scalar_t* x, const ChannelView& view) {
    component_pivot.assign(K * C, acc_t(0));
    const int64_t M = view.N * view.L;
    if (M == 0) {
      return;
    }
    int64_t offsets[kPivotSamples];  // the same in every channel
    for (int j = 0; j < kPivotSamples; ++j) {
      offsets[j] = view.element_offset(pivot_sample(j, M));
    }
    for (int64_t c = 0; c < C; ++c) {
      acc_t alpha[kMaxComponents], beta[kMaxComponents], gamma[kMaxComponents], pivots[kMaxComponents];
      for (int k = 0; k < K; ++k) {
        alpha[k] = at(kAlpha, k, c);
        beta[k] = at(kBeta, k, c);
        gamma[k] = at(kGamma, k, c);
      }
      const scalar_t* channel = x + c * view.stride_c;
      const auto sample = [&](int j) { return static_cast<acc_t>(channel[offsets[j]]); };
      component_pivots(sample, pivot[c], K, ResponsibilityConstants<acc_t>{alpha, beta, gamma}, pivots);
      for (int k = 0; k < K; ++k) {
        component_pivot[k * C + c] = pivots[k];
      }
    }
  }

  void transform(const Parameters& p, const acc_t* mean, const acc_t* var) {
    const acc_t* gamma = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
    for (int k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        transform_constants(mean[k * C + c], var[k * C + c], log_lam[k], gamma ? gamma[c] : acc_t(1),
                            static_cast<acc_t>(p.eps), pivot[c], at(kSlope, k, c), at(kShift, k, c));
      }
    }
  }

  template <int K>
  ResponsibilityConstants<Vectorized<acc_t>> load_responsibilities(const Walker<acc_t>& walker, const Unit& unit,
                                                                   Vectorized<acc_t> (*out)[K]) const {
    walker.load_constants(row(kAlpha), K, unit, out[0]);
    walker.load_constants(row(kBeta), K, unit, out[1]);
    walker.load_constants(row(kGamma), K, unit, out[2]);
    return {out[0], out[1], out[2]};
  }
};

// ---- The passes for the runtime K, one translation unit each. -------------

// The statistics pass after choosing its component pivots: (3, K, C) sums
// S_k, sum tau_k (x - p), sum tau_k (x - p)^2 about each channel's pivot p
// (statistics_pass.cpp).
template <typename scalar_t>
std::vector<double> run_statistics_pass(const scalar_t* x_data, const ChannelView& view,
                                        const Walker<at::opmath_type<scalar_t>>& walker,
                                        ChannelConstants<at::opmath_type<scalar_t>>& consts);

// Writes the normalized output (normalize_pass.cpp).
template <typename scalar_t>
void run_normalize_pass(const scalar_t* x_data, scalar_t* out_data, const Walker<at::opmath_type<scalar_t>>& walker,
                        const ChannelConstants<at::opmath_type<scalar_t>>& consts,
                        const at::opmath_type<scalar_t>* bias);

// (2K+1, C) sums sum dout tau_k, sum dout tau_k (x - p), sum dout (backward_reduce_pass.cpp).
template <typename scalar_t>
std::vector<double> run_backward_reduce_pass(const scalar_t* g_data, const scalar_t* x_data,
                                             const Walker<at::opmath_type<scalar_t>>& walker,
                                             const ChannelConstants<at::opmath_type<scalar_t>>& consts);

// Writes grad_input; with mixture_grads returns the (3K, C) sums of the
// mixture parameters' gradients, else nothing (backward_elementwise_pass.cpp).
template <typename scalar_t>
std::vector<double> run_backward_elementwise_pass(bool mixture_grads, const scalar_t* g_data, const scalar_t* x_data,
                                                  scalar_t* dx_data, const Walker<at::opmath_type<scalar_t>>& walker,
                                                  const ChannelConstants<at::opmath_type<scalar_t>>& consts);

}  // namespace cpu
}  // namespace uan
