// CPU element passes of the UAN operators: at::parallel_for over channels
// (or blocks of channels for channels-last input) and at::vec SIMD over
// elements. Each channel's sums are accumulated by one thread in a fixed
// order, so results are bitwise reproducible for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>

#include "uan_host.h"
#include "uan_math.h"

namespace uan {
namespace {

using at::vec::Vectorized;

// Vectors summed in the accumulation type before the partials are added to
// float64 totals: bounds the rounding error for channels of any length.
constexpr int64_t kFlushSpans = 128;
// Most quantities one pass accumulates per channel (3 per component).
constexpr int kMaxQuantities = 3 * kMaxComponents;

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

  // Row `row` of a (rows, K, C) table as K vectors: broadcast or per lane.
  void load_constants(const acc_t* table, int64_t row, int K, const Unit& unit, Vec* out) const {
    for (int k = 0; k < K; ++k) {
      const acc_t* base = table + (row * K + k) * view_.C + unit.first;
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

// Per-chunk slots of (Q, C) float64 sums, added into the pass's output in
// chunk order once every unit is done.
class ChunkSums {
 public:
  ChunkSums(int64_t chunks, at::Tensor& sums) : sums_(sums) {
    slots_ = chunks == 1 ? sums : at::zeros({chunks, sums.size(0), sums.size(1)}, sums.options());
  }
  double* slot(int64_t chunk) { return slots_.mutable_data_ptr<double>() + chunk * sums_.numel(); }
  void finish() {
    if (slots_.dim() == 2) {
      return;
    }
    double* out = sums_.mutable_data_ptr<double>();
    const double* in = slots_.const_data_ptr<double>();
    const int64_t size = sums_.numel();
    for (int64_t chunk = 0; chunk < slots_.size(0); ++chunk) {
      for (int64_t i = 0; i < size; ++i) {
        out[i] += in[chunk * size + i];
      }
    }
  }

 private:
  at::Tensor& sums_;
  at::Tensor slots_;
};

// Per-lane sums of Q quantities: partials in acc_t, totals in float64.
template <typename acc_t>
struct LaneSums {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t V = Vec::size();
  int quantities;
  Vec partial[kMaxQuantities];
  double total[kMaxQuantities][V];

  explicit LaneSums(int q) : quantities(q) {
    for (int i = 0; i < q; ++i) {
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
inline void mask_padding(Vec* tau, int K, int64_t count) {
  if (count < Vec::size()) {
    for (int k = 0; k < K; ++k) {
      tau[k] = Vec::set(Vec(0), tau[k], count);
    }
  }
}

template <typename F>
void for_units(int64_t units, F&& f) {
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      f(u);
    }
  });
}

void statistics_pass(const at::Tensor& x, const ChannelView& view, const at::Tensor& table, at::Tensor& sums,
                     at::Tensor& pivot) {
  const int K = static_cast<int>(table.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_statistics_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const Walker<acc_t> walker(view);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const acc_t* consts = table.const_data_ptr<acc_t>();
    ChunkSums chunk_sums(walker.num_chunks(), sums);
    acc_t* pivot_data = pivot.mutable_data_ptr<acc_t>();
    if (view.N == 0 || view.L == 0) {
      return;
    }
    for_units(walker.num_units(), [&](int64_t u) {
      const Unit unit = walker.unit(u);
      Vec mu[kMaxComponents], inv_sigma[kMaxComponents], log_prior[kMaxComponents], tau[kMaxComponents];
      walker.load_constants(consts, kMu, K, unit, mu);
      walker.load_constants(consts, kInvSigma, K, unit, inv_sigma);
      walker.load_constants(consts, kLogPrior, K, unit, log_prior);
      // The channel's first element: sums are taken around it so that
      // |mean| >> std loses no precision (see statistics_from_sums).
      const int64_t first = unit.first * view.stride_c;
      const Vec p = walker.channels_inner() ? load<scalar_t, acc_t>(x_data + first, unit.channels)
                                            : Vec(static_cast<acc_t>(x_data[first]));
      if (unit.chunk == 0) {
        p.store(pivot_data + unit.first, unit.channels);
      }
      LaneSums<acc_t> acc(3 * K);
      walker.for_each_span(
          unit,
          [&](int64_t offset, int64_t count) {
            const Vec xv = load<scalar_t, acc_t>(x_data + offset, count);
            responsibilities(xv, K, mu, inv_sigma, log_prior, tau);
            mask_padding(tau, K, count);
            const Vec d = xv - p;
            const Vec dd = d * d;
            for (int k = 0; k < K; ++k) {
              acc.partial[k] = acc.partial[k] + tau[k];
              acc.partial[K + k] = at::vec::fmadd(tau[k], d, acc.partial[K + k]);
              acc.partial[2 * K + k] = at::vec::fmadd(tau[k], dd, acc.partial[2 * K + k]);
            }
          },
          [&] { acc.flush(); });
      acc.write(walker, unit, chunk_sums.slot(unit.chunk));
    });
    chunk_sums.finish();
  });
}

void normalize_pass(const at::Tensor& x, const ChannelView& view, const at::Tensor& table, const at::Tensor& gamma,
                    const at::Tensor& beta, at::Tensor& out) {
  const int K = static_cast<int>(table.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_normalize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const Walker<acc_t> walker(view);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const acc_t* consts = table.const_data_ptr<acc_t>();
    for_units(walker.num_units(), [&](int64_t u) {
      const Unit unit = walker.unit(u);
      Vec mu[kMaxComponents], inv_sigma[kMaxComponents], log_prior[kMaxComponents], center[kMaxComponents],
          scale[kMaxComponents], tau[kMaxComponents];
      walker.load_constants(consts, kMu, K, unit, mu);
      walker.load_constants(consts, kInvSigma, K, unit, inv_sigma);
      walker.load_constants(consts, kLogPrior, K, unit, log_prior);
      walker.load_constants(consts, kCenter, K, unit, center);
      walker.load_constants(consts, kScale, K, unit, scale);
      const Vec g = walker.load_channel_values(gamma.const_data_ptr<acc_t>(), unit);
      const Vec b = walker.load_channel_values(beta.const_data_ptr<acc_t>(), unit);
      walker.for_each_span(
          unit,
          [&](int64_t offset, int64_t count) {
            const Vec xv = load<scalar_t, acc_t>(x_data + offset, count);
            responsibilities(xv, K, mu, inv_sigma, log_prior, tau);
            const Vec y = mixture_transform(xv, K, tau, center, scale);
            store<scalar_t, acc_t>(out_data + offset, at::vec::fmadd(g, y, b), count);
          },
          [] {});
    });
  });
}

void backward_reduce_pass(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                          const at::Tensor& table, at::Tensor& sums) {
  const int K = static_cast<int>(table.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const Walker<acc_t> walker(view);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
    const acc_t* consts = table.const_data_ptr<acc_t>();
    ChunkSums chunk_sums(walker.num_chunks(), sums);
    for_units(walker.num_units(), [&](int64_t u) {
      const Unit unit = walker.unit(u);
      Vec mu[kMaxComponents], inv_sigma[kMaxComponents], log_prior[kMaxComponents], center[kMaxComponents],
          tau[kMaxComponents];
      walker.load_constants(consts, kMu, K, unit, mu);
      walker.load_constants(consts, kInvSigma, K, unit, inv_sigma);
      walker.load_constants(consts, kLogPrior, K, unit, log_prior);
      walker.load_constants(consts, kCenter, K, unit, center);
      LaneSums<acc_t> acc(2 * K + 1);
      walker.for_each_span(
          unit,
          [&](int64_t offset, int64_t count) {
            const Vec xv = load<scalar_t, acc_t>(x_data + offset, count);
            const Vec dout = load<scalar_t, acc_t>(g_data + offset, count);
            responsibilities(xv, K, mu, inv_sigma, log_prior, tau);
            for (int k = 0; k < K; ++k) {
              const Vec weighted = tau[k] * dout;
              acc.partial[k] = acc.partial[k] + weighted;
              acc.partial[K + k] = at::vec::fmadd(weighted, xv - center[k], acc.partial[K + k]);
            }
            acc.partial[2 * K] = acc.partial[2 * K] + dout;
          },
          [&] { acc.flush(); });
      acc.write(walker, unit, chunk_sums.slot(unit.chunk));
    });
    chunk_sums.finish();
  });
}

void backward_elementwise_pass(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                               const at::Tensor& table, const at::Tensor& gamma, bool mixture_grads,
                               at::Tensor& grad_input, at::Tensor& sums) {
  const int K = static_cast<int>(table.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uan_backward_elementwise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const Walker<acc_t> walker(view);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dx_data = grad_input.mutable_data_ptr<scalar_t>();
    const acc_t* consts = table.const_data_ptr<acc_t>();
    ChunkSums chunk_sums(walker.num_chunks(), sums);
    for_units(walker.num_units(), [&](int64_t u) {
      const Unit unit = walker.unit(u);
      Vec c[kBackwardRows][kMaxComponents], tau[kMaxComponents], U[kMaxComponents], w[kMaxComponents];
      for (int64_t row = 0; row < kBackwardRows; ++row) {
        walker.load_constants(consts, row, K, unit, c[row]);
      }
      const BackwardComponents<Vec> params{c[kMu], c[kInvSigma], c[kLogPrior], c[kCenter],
                                           c[kScale], c[kMeanCoef], c[kVarCoef], c[kVar]};
      const Vec gam = walker.load_channel_values(gamma.const_data_ptr<acc_t>(), unit);
      LaneSums<acc_t> acc(mixture_grads ? 3 * K : 0);
      walker.for_each_span(
          unit,
          [&](int64_t offset, int64_t count) {
            const Vec xv = load<scalar_t, acc_t>(x_data + offset, count);
            const Vec g = gam * load<scalar_t, acc_t>(g_data + offset, count);
            responsibilities(xv, K, params.mu, params.inv_sigma, params.log_prior, tau);
            mask_padding(tau, K, count);
            const Vec dx = input_gradient(xv, g, K, params, tau, U, w);
            store<scalar_t, acc_t>(dx_data + offset, dx, count);
            if (mixture_grads) {
              for (int k = 0; k < K; ++k) {
                acc.partial[k] = at::vec::fmadd(U[k], w[k], acc.partial[k]);
                const Vec z_sq_minus_one = at::vec::fmsub(w[k], xv - params.mu[k], Vec(1));
                acc.partial[K + k] = at::vec::fmadd(U[k], z_sq_minus_one, acc.partial[K + k]);
                acc.partial[2 * K + k] = acc.partial[2 * K + k] + U[k];
              }
            }
          },
          [&] { acc.flush(); });
      acc.write(walker, unit, chunk_sums.slot(unit.chunk));
    });
    chunk_sums.finish();
  });
}

constexpr ElementPasses kCpuPasses{statistics_pass, normalize_pass, backward_reduce_pass, backward_elementwise_pass};

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& mass, double eps, bool mixture_grads) {
  return backward(kCpuPasses, grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, eps, mixture_grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(uan, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("forward.stats", &forward_stats_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace uan
