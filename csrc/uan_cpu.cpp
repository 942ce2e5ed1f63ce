// CPU passes of the UAN operators: at::parallel_for over channels (or blocks
// of channels for channels-last input) and at::vec SIMD over elements. Each
// channel's sums are accumulated by one thread in a fixed order, so results
// are bitwise reproducible for any thread count. The per-channel constants
// and the O(K*C) steps between passes are plain loops over uan_constants.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "uan_constants.h"
#include "uan_host.h"
#include "uan_math.h"

namespace uan {
namespace {

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

// Sums per channel of the statistics pass: S_k, sum tau_k (x - p), sum tau_k (x - p)^2,
// accumulated about the component pivots p_k and moved to p in float64.
template <typename scalar_t, int K, typename acc_t>
std::vector<double> statistics_pass(const scalar_t* x_data, const Walker<acc_t>& walker,
                                    const ChannelConstants<acc_t>& consts) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  ChunkSums chunk_sums(walker.num_chunks(), 3 * K * consts.C);
  for_units(walker.num_units(), [&](int64_t u) {
    const Unit unit = walker.unit(u);
    Vec r[3][K], t[K], e[K], pk[K];
    const auto resp = consts.template load_responsibilities<K>(walker, unit, r);
    walker.load_constants(consts.component_pivot.data(), K, unit, pk);
    const Vec p = walker.load_channel_values(consts.pivot.data(), unit);
    LaneSums<acc_t, 3 * K> acc;
    walker.for_each_span(
        unit,
        [&](int64_t offset, int64_t count) {
          const Vec x = load<scalar_t, acc_t>(x_data + offset, count);
          const Vec inv_total = responsibilities(x - p, K, resp, t, e);
          mask_padding(e, K, count);
          for (int k = 0; k < K; ++k) {
            const Vec tau = e[k] * inv_total;
            const Vec d = x - pk[k];
            const Vec tau_d = tau * d;
            acc.partial[k] = acc.partial[k] + tau;
            acc.partial[K + k] = acc.partial[K + k] + tau_d;
            acc.partial[2 * K + k] = at::vec::fmadd(tau_d, d, acc.partial[2 * K + k]);
          }
        },
        [&] { acc.flush(); });
    acc_t component_pivots[V], channel_pivots[V];
    p.store(channel_pivots);
    for (int k = 0; k < K; ++k) {
      pk[k].store(component_pivots);
      for (int64_t j = 0; j < V; ++j) {
        shift_sums(static_cast<double>(component_pivots[j]) - static_cast<double>(channel_pivots[j]),
                   acc.total[k][j], acc.total[K + k][j], acc.total[2 * K + k][j]);
      }
    }
    acc.write(walker, unit, chunk_sums.slot(unit.chunk));
  });
  return chunk_sums.totals();
}

// statistics_pass for the runtime K, after choosing its component pivots:
// (3, K, C) sums about each channel's pivot.
template <typename scalar_t, typename acc_t>
std::vector<double> run_statistics_pass(const scalar_t* x_data, const ChannelView& view, const Walker<acc_t>& walker,
                                        ChannelConstants<acc_t>& consts) {
  consts.component_pivots_from_input(x_data, view);
  std::vector<double> sums;
  with_components(consts.K, [&](auto k) { sums = statistics_pass<scalar_t, decltype(k)::value>(x_data, walker, consts); });
  return sums;
}

template <typename scalar_t, int K, typename acc_t>
void normalize_pass(const scalar_t* x_data, scalar_t* out_data, const Walker<acc_t>& walker,
                    const ChannelConstants<acc_t>& consts, const acc_t* bias) {
  using Vec = Vectorized<acc_t>;
  for_units(walker.num_units(), [&](int64_t u) {
    const Unit unit = walker.unit(u);
    Vec r[3][K], slope[K], shift[K], t[K], e[K];
    const auto resp = consts.template load_responsibilities<K>(walker, unit, r);
    walker.load_constants(consts.row(ChannelConstants<acc_t>::kSlope), K, unit, slope);
    walker.load_constants(consts.row(ChannelConstants<acc_t>::kShift), K, unit, shift);
    const Vec p = walker.load_channel_values(consts.pivot.data(), unit);
    const Vec beta = bias ? walker.load_channel_values(bias, unit) : Vec(0);
    walker.for_each_span(
        unit,
        [&](int64_t offset, int64_t count) {
          const Vec xp = load<scalar_t, acc_t>(x_data + offset, count) - p;
          const Vec inv_total = responsibilities(xp, K, resp, t, e);
          store<scalar_t, acc_t>(out_data + offset, mixture_transform(xp, K, e, inv_total, slope, shift, beta),
                                 count);
        },
        [] {});
  });
}

// Sums per channel of the backward reduce pass: sum dout tau_k, sum dout tau_k (x - p), sum dout.
template <typename scalar_t, int K, typename acc_t>
std::vector<double> backward_reduce_pass(const scalar_t* g_data, const scalar_t* x_data,
                                         const Walker<acc_t>& walker, const ChannelConstants<acc_t>& consts) {
  using Vec = Vectorized<acc_t>;
  ChunkSums chunk_sums(walker.num_chunks(), (2 * K + 1) * consts.C);
  for_units(walker.num_units(), [&](int64_t u) {
    const Unit unit = walker.unit(u);
    Vec r[3][K], t[K], e[K];
    const auto resp = consts.template load_responsibilities<K>(walker, unit, r);
    const Vec p = walker.load_channel_values(consts.pivot.data(), unit);
    LaneSums<acc_t, 2 * K + 1> acc;
    walker.for_each_span(
        unit,
        [&](int64_t offset, int64_t count) {
          const Vec xp = load<scalar_t, acc_t>(x_data + offset, count) - p;
          const Vec dout = load<scalar_t, acc_t>(g_data + offset, count);
          const Vec weight = dout * responsibilities(xp, K, resp, t, e);
          for (int k = 0; k < K; ++k) {
            const Vec weighted = e[k] * weight;
            acc.partial[k] = acc.partial[k] + weighted;
            acc.partial[K + k] = at::vec::fmadd(weighted, xp, acc.partial[K + k]);
          }
          acc.partial[2 * K] = acc.partial[2 * K] + dout;
        },
        [&] { acc.flush(); });
    acc.write(walker, unit, chunk_sums.slot(unit.chunk));
  });
  return chunk_sums.totals();
}

// Writes grad_input; with mixture_grads returns the sums per channel
// sum U_k u_k, sum U_k u_k^2, sum U_k (parameter_gradients), u_k = a_k xp + b_k,
// accumulated as sum U_k xp, sum U_k xp^2, sum U_k and standardised in float64.
template <typename scalar_t, int K, bool kMixtureGrads, typename acc_t>
std::vector<double> backward_elementwise_pass(const scalar_t* g_data, const scalar_t* x_data, scalar_t* dx_data,
                                              const Walker<acc_t>& walker, const ChannelConstants<acc_t>& consts) {
  using Vec = Vectorized<acc_t>;
  using Consts = ChannelConstants<acc_t>;
  ChunkSums chunk_sums(walker.num_chunks(), kMixtureGrads ? 3 * K * consts.C : 0);
  for_units(walker.num_units(), [&](int64_t u) {
    const Unit unit = walker.unit(u);
    Vec r[3][K], c[5][K], t[K], e[K], T[K], U[K];
    const auto resp = consts.template load_responsibilities<K>(walker, unit, r);
    const typename Consts::Row rows[5] = {Consts::kShift, Consts::kGammaScale, Consts::kMeanCoef, Consts::kVarCoef,
                                          Consts::kVarTerm};
    for (int i = 0; i < 5; ++i) {
      walker.load_constants(consts.row(rows[i]), K, unit, c[i]);
    }
    const BackwardConstants<Vec> params{resp, c[0], c[1], c[2], c[3], c[4]};
    const Vec p = walker.load_channel_values(consts.pivot.data(), unit);
    LaneSums<acc_t, kMixtureGrads ? 3 * K : 0> acc;
    walker.for_each_span(
        unit,
        [&](int64_t offset, int64_t count) {
          const Vec xp = load<scalar_t, acc_t>(x_data + offset, count) - p;
          const Vec dout = load<scalar_t, acc_t>(g_data + offset, count);
          const Vec inv_total = responsibilities(xp, K, resp, t, e);
          mask_padding(e, K, count);
          store<scalar_t, acc_t>(dx_data + offset, input_gradient(xp, dout, K, params, t, e, inv_total, T, U),
                                 count);
          if constexpr (kMixtureGrads) {
            for (int k = 0; k < K; ++k) {
              const Vec U_xp = U[k] * xp;
              acc.partial[k] = acc.partial[k] + U_xp;
              acc.partial[K + k] = at::vec::fmadd(U_xp, xp, acc.partial[K + k]);
              acc.partial[2 * K + k] = acc.partial[2 * K + k] + U[k];
            }
          }
        },
        [&] { acc.flush(); });
    if constexpr (kMixtureGrads) {
      Vec a[K], b[K];
      walker.load_constants(consts.row(Consts::kA), K, unit, a);
      walker.load_constants(consts.row(Consts::kB), K, unit, b);
      acc_t a_lanes[Vec::size()], b_lanes[Vec::size()];
      for (int k = 0; k < K; ++k) {
        a[k].store(a_lanes);
        b[k].store(b_lanes);
        for (int64_t j = 0; j < Vec::size(); ++j) {
          standardize_sums(a_lanes[j], b_lanes[j], acc.total[k][j], acc.total[K + k][j], acc.total[2 * K + k][j]);
        }
      }
    }
    acc.write(walker, unit, chunk_sums.slot(unit.chunk));
  });
  return chunk_sums.totals();
}

void forward_train(const at::Tensor& x, const ChannelView& view, const Parameters& p, at::Tensor& out,
                   at::Tensor& mean, at::Tensor& var, at::Tensor& mass) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Walker<acc_t> walker(view);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    ChannelConstants<acc_t> consts(p);
    consts.pivot_from_input(x_data, view);
    consts.responsibilities(p);
    const std::vector<double> sums = run_statistics_pass<scalar_t>(x_data, view, walker, consts);
    const int K = consts.K;
    const int64_t C = consts.C;
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    acc_t* var_data = var.mutable_data_ptr<acc_t>();
    acc_t* mass_data = mass.mutable_data_ptr<acc_t>();
    for (int k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = k * C + c;
        statistics_from_sums(sums[i], sums[(K + k) * C + c], sums[(2 * K + k) * C + c],
                             static_cast<double>(consts.pivot[c]), mean_data[i], var_data[i], mass_data[i]);
      }
    }
    consts.transform(p, mean_data, var_data);
    with_components(consts.K, [&](auto k) {
      normalize_pass<scalar_t, decltype(k)::value>(x_data, out.mutable_data_ptr<scalar_t>(), walker, consts,
                                                   optional_data<acc_t>(p.bias));
    });
  });
}

void forward_eval(const at::Tensor& x, const ChannelView& view, const Parameters& p, const at::Tensor& mean,
                  const at::Tensor& var, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_forward_eval_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ChannelConstants<acc_t> consts(p);
    const acc_t* mean_data = mean.const_data_ptr<acc_t>();
    std::vector<acc_t> mixture_var;
    if (!var.defined()) {
      const acc_t* log_sigma = p.log_sigma.const_data_ptr<acc_t>();
      mixture_var.resize(p.log_sigma.numel());
      for (size_t i = 0; i < mixture_var.size(); ++i) {
        mixture_var[i] = mixture_variance(log_sigma[i]);
      }
    }
    consts.pivot_from_mean(mean_data);
    consts.responsibilities(p);
    consts.transform(p, mean_data, var.defined() ? var.const_data_ptr<acc_t>() : mixture_var.data());
    with_components(consts.K, [&](auto k) {
      normalize_pass<scalar_t, decltype(k)::value>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                   Walker<acc_t>(view), consts, optional_data<acc_t>(p.bias));
    });
  });
}

// The backward's reduce pass with its sums moved to the statistics' centers:
// (2K+1, C) float64 rows A_k = sum dout tau_k, B_k = sum dout tau_k (x - center_k)
// and sum dout.
template <typename scalar_t, typename acc_t>
std::vector<double> reduce_sums_about_centers(const scalar_t* g_data, const scalar_t* x_data,
                                              const Walker<acc_t>& walker, const ChannelConstants<acc_t>& consts,
                                              const acc_t* center) {
  std::vector<double> sums;
  with_components(consts.K, [&](auto k) {
    sums = backward_reduce_pass<scalar_t, decltype(k)::value>(g_data, x_data, walker, consts);
  });
  const int K = consts.K;
  const int64_t C = consts.C;
  for (int k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = k * C + c;
      sums[(K + k) * C + c] = about_center(sums[i], sums[(K + k) * C + c], center[i] - consts.pivot[c]);
    }
  }
  return sums;
}

// Everything after the reduce pass: grad_input and the parameter gradients.
// `sums` are the reduce sums of the whole batch (every process's, under
// SyncUAN), which the elementwise constants need; `local_sums` this input's
// own, which grad_weight, grad_bias and the direct term of d log lam take, so
// that each process's parameter gradients are its share of the whole batch's.
// Both are (2K+1, C) about the centers; consts has the pivots and the
// responsibility constants.
template <typename scalar_t, typename acc_t>
void backward_from_sums(const scalar_t* g_data, const scalar_t* x_data, const Walker<acc_t>& walker,
                        ChannelConstants<acc_t>& consts, const Parameters& p, const acc_t* mean_data,
                        const acc_t* var_data, const acc_t* mass_data, const double* sums, const double* local_sums,
                        bool mixture_grads, scalar_t* dx_data, at::Tensor& grad_mu, at::Tensor& grad_log_sigma,
                        at::Tensor& grad_mix_logits, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using Consts = ChannelConstants<acc_t>;
  const int K = consts.K;
  const int64_t C = consts.C;
  const acc_t* gamma = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  acc_t* grad_weight_data = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* grad_bias_data = grad_bias.mutable_data_ptr<acc_t>();
  std::vector<double> grad_log_lam(K, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    double weight_sum = 0.0;
    for (int k = 0; k < K; ++k) {
      const int64_t i = k * C + c;
      const auto b = component_backward(sums[i], sums[(K + k) * C + c], mean_data[i], var_data[i], consts.log_lam[k],
                                        gamma ? gamma[c] : acc_t(1), static_cast<acc_t>(p.eps), consts.pivot[c],
                                        mass_data != nullptr, mass_data ? mass_data[i] : acc_t(0));
      consts.at(Consts::kShift, k, c) = b.shift;
      consts.at(Consts::kGammaScale, k, c) = b.gamma_scale;
      consts.at(Consts::kMeanCoef, k, c) = b.mean_coef;
      consts.at(Consts::kVarCoef, k, c) = b.var_coef;
      consts.at(Consts::kVarTerm, k, c) = b.var_term;
      const ParameterTerms terms = parameter_terms(local_sums[(K + k) * C + c], b);
      weight_sum += terms.grad_weight;
      grad_log_lam[k] += terms.log_lam_direct;
    }
    grad_weight_data[c] = static_cast<acc_t>(weight_sum);
    grad_bias_data[c] = static_cast<acc_t>(local_sums[2 * K * C + c]);
  }

  std::vector<double> param_sums;
  with_components(K, [&](auto k) {
    constexpr int Kc = decltype(k)::value;
    param_sums = mixture_grads ? backward_elementwise_pass<scalar_t, Kc, true>(g_data, x_data, dx_data, walker, consts)
                               : backward_elementwise_pass<scalar_t, Kc, false>(g_data, x_data, dx_data, walker, consts);
  });
  acc_t* grad_mu_data = grad_mu.mutable_data_ptr<acc_t>();
  acc_t* grad_log_sigma_data = grad_log_sigma.mutable_data_ptr<acc_t>();
  acc_t* grad_mix_logits_data = grad_mix_logits.mutable_data_ptr<acc_t>();
  if (!mixture_grads) {
    std::fill_n(grad_mu_data, K * C, acc_t(0));
    std::fill_n(grad_log_sigma_data, K * C, acc_t(0));
    std::fill_n(grad_mix_logits_data, K, acc_t(0));
    return;
  }
  for (int k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = k * C + c;
      const double R3 = param_sums[(2 * K + k) * C + c];
      parameter_gradients(param_sums[i], param_sums[(K + k) * C + c], R3, consts.at(Consts::kA, k, c),
                          grad_mu_data[i], grad_log_sigma_data[i]);
      grad_log_lam[k] += R3;
    }
  }
  mix_logits_gradient(consts.log_lam.data(), grad_log_lam.data(), K, grad_mix_logits_data);
}

void backward(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view, const Parameters& p,
              const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass, bool mixture_grads,
              at::Tensor& grad_input, at::Tensor& grad_mu, at::Tensor& grad_log_sigma, at::Tensor& grad_mix_logits,
              at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Walker<acc_t> walker(view);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
    const acc_t* mean_data = mean.const_data_ptr<acc_t>();
    const bool batch_statistics = mass.defined();
    ChannelConstants<acc_t> consts(p);
    if (batch_statistics) {
      consts.pivot_from_input(x_data, view);
    } else {
      consts.pivot_from_mean(mean_data);
    }
    consts.responsibilities(p);
    const std::vector<double> sums = reduce_sums_about_centers(g_data, x_data, walker, consts, mean_data);
    backward_from_sums(g_data, x_data, walker, consts, p, mean_data, var.const_data_ptr<acc_t>(),
                       batch_statistics ? mass.const_data_ptr<acc_t>() : nullptr, sums.data(), sums.data(),
                       mixture_grads, grad_input.mutable_data_ptr<scalar_t>(), grad_mu, grad_log_sigma,
                       grad_mix_logits, grad_weight, grad_bias);
  });
}

// The training backward's reduce pass alone (batch statistics: pivots from
// the input, as the fused backward's), its sums about the centers `mean`.
void backward_reduce(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view, const Parameters& p,
                     const at::Tensor& mean, at::Tensor& sums) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    ChannelConstants<acc_t> consts(p);
    consts.pivot_from_input(x_data, view);
    consts.responsibilities(p);
    const std::vector<double> about_centers = reduce_sums_about_centers(
        grad_out.const_data_ptr<scalar_t>(), x_data, Walker<acc_t>(view), consts, mean.const_data_ptr<acc_t>());
    std::copy(about_centers.begin(), about_centers.end(), sums.mutable_data_ptr<double>());
  });
}

// The training backward's elementwise pass and parameter gradients from given
// reduce sums (backward_from_sums).
void backward_elementwise(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                          const Parameters& p, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass,
                          const at::Tensor& sums, const at::Tensor& local_sums, bool mixture_grads,
                          at::Tensor& grad_input, at::Tensor& grad_mu, at::Tensor& grad_log_sigma,
                          at::Tensor& grad_mix_logits, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_elementwise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    ChannelConstants<acc_t> consts(p);
    consts.pivot_from_input(x_data, view);
    consts.responsibilities(p);
    backward_from_sums(grad_out.const_data_ptr<scalar_t>(), x_data, Walker<acc_t>(view), consts, p,
                       mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), mass.const_data_ptr<acc_t>(),
                       sums.const_data_ptr<double>(), local_sums.const_data_ptr<double>(), mixture_grads,
                       grad_input.mutable_data_ptr<scalar_t>(), grad_mu, grad_log_sigma, grad_mix_logits, grad_weight,
                       grad_bias);
  });
}

// The statistics pass about each channel's first element, as the training
// forward's, with its float64 totals moved to the component means mu.
void statistics(const at::Tensor& x, const ChannelView& view, const Parameters& p, at::Tensor& sums) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_statistics_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    ChannelConstants<acc_t> consts(p);
    consts.pivot_from_input(x_data, view);
    consts.responsibilities(p);
    std::vector<double> about_pivot = run_statistics_pass<scalar_t>(x_data, view, Walker<acc_t>(view), consts);
    const int64_t plane = consts.K * consts.C;
    const acc_t* mu = p.mu.const_data_ptr<acc_t>();
    for (int64_t i = 0; i < plane; ++i) {
      repivot_sums(about_pivot[i], about_pivot[plane + i], about_pivot[2 * plane + i],
                   static_cast<double>(consts.pivot[i % consts.C]) - static_cast<double>(mu[i]));
    }
    std::copy(about_pivot.begin(), about_pivot.end(), sums.mutable_data_ptr<double>());
  });
}

void statistics_finalize(const at::Tensor& sums, const at::Tensor& mu, at::Tensor& mean, at::Tensor& var,
                         at::Tensor& mass) {
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "uan_statistics_finalize_cpu", [&] {
    const int64_t plane = mu.numel();
    const double* s = sums.const_data_ptr<double>();
    const scalar_t* mu_data = mu.const_data_ptr<scalar_t>();
    scalar_t* mean_data = mean.mutable_data_ptr<scalar_t>();
    scalar_t* var_data = var.mutable_data_ptr<scalar_t>();
    scalar_t* mass_data = mass.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < plane; ++i) {
      statistics_from_sums(s[i], s[plane + i], s[2 * plane + i], static_cast<double>(mu_data[i]), mean_data[i],
                           var_data[i], mass_data[i]);
    }
  });
}

void moving_average_update(at::Tensor& mu, at::Tensor& log_sigma, at::Tensor& mix_logits, const at::Tensor& mean,
                           const at::Tensor& var, const at::Tensor& mass, int64_t values_per_channel,
                           double momentum) {
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "uan_moving_average_update_cpu", [&] {
    const int K = static_cast<int>(mu.size(0));
    const int64_t C = mu.size(1);
    const scalar_t* mass_data = mass.const_data_ptr<scalar_t>();
    double mass_sums[kMaxComponents] = {};
    int64_t finite_channels = 0;
    for (int64_t c = 0; c < C; ++c) {
      if (finite_channel(mass_data, K, C, c)) {
        ++finite_channels;
        for (int k = 0; k < K; ++k) {
          mass_sums[k] += static_cast<double>(mass_data[k * C + c]);
        }
      }
    }
    scalar_t* mu_data = mu.mutable_data_ptr<scalar_t>();
    scalar_t* log_sigma_data = log_sigma.mutable_data_ptr<scalar_t>();
    const scalar_t* mean_data = mean.const_data_ptr<scalar_t>();
    const scalar_t* var_data = var.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < K * C; ++i) {
      moving_average_component(mu_data[i], log_sigma_data[i], mean_data[i], var_data[i], momentum);
    }
    moving_average_mixing_weights(mix_logits.mutable_data_ptr<scalar_t>(), mass_sums, finite_channels,
                                  values_per_channel, K, momentum);
  });
}

constexpr DevicePasses kCpuPasses{forward_train, forward_eval, backward, statistics, statistics_finalize,
                                   backward_reduce, backward_elementwise, moving_average_update};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma, const at::Tensor& mix_logits,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  return forward_training(kCpuPasses, x, mu, log_sigma, mix_logits, weight, bias, eps);
}

at::Tensor forward_stats_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
                             const at::Tensor& mix_logits, const at::Tensor& mean, const at::Tensor& var,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             double eps) {
  return forward_with_statistics(kCpuPasses, x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps);
}

at::Tensor forward_mixture_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
                               const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
  return forward_with_mixture_statistics(kCpuPasses, x, mu, log_sigma, mix_logits, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& mass, double eps, bool mixture_grads) {
  return uan::backward(kCpuPasses, grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps,
                       mixture_grads);
}

at::Tensor statistics_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
                          const at::Tensor& mix_logits) {
  return uan::statistics(kCpuPasses, x, mu, log_sigma, mix_logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> statistics_finalize_cpu(const at::Tensor& sums, const at::Tensor& mu) {
  return uan::statistics_finalize(kCpuPasses, sums, mu);
}

at::Tensor backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu,
                               const at::Tensor& log_sigma, const at::Tensor& mix_logits, const at::Tensor& mean) {
  return uan::backward_reduce(kCpuPasses, grad_out, x, mu, log_sigma, mix_logits, mean);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_elementwise_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& mass, const at::Tensor& sums, const at::Tensor& local_sums, double eps,
    bool mixture_grads) {
  return uan::backward_elementwise(kCpuPasses, grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, sums,
                                   local_sums, eps, mixture_grads);
}

void moving_average_update_cpu(at::Tensor& mu, at::Tensor& log_sigma, at::Tensor& mix_logits, const at::Tensor& mean,
                               const at::Tensor& var, const at::Tensor& mass, int64_t values_per_channel,
                               double momentum) {
  uan::moving_average_update(kCpuPasses, mu, log_sigma, mix_logits, mean, var, mass, values_per_channel, momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(uan, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("forward.stats", &forward_stats_cpu);
  m.impl("forward.mixture", &forward_mixture_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("statistics", &statistics_cpu);
  m.impl("statistics_finalize", &statistics_finalize_cpu);
  m.impl("backward_reduce", &backward_reduce_cpu);
  m.impl("backward_elementwise", &backward_elementwise_cpu);
  m.impl("moving_average_update_", &moving_average_update_cpu);
}

}  // namespace uan
