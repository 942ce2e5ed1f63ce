// The CPU statistics pass (uan_passes.h).
#include "uan_passes.h"

namespace uan {
namespace cpu {

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

template <typename scalar_t>
std::vector<double> run_statistics_pass(const scalar_t* x_data, const ChannelView& view,
                                        const Walker<at::opmath_type<scalar_t>>& walker,
                                        ChannelConstants<at::opmath_type<scalar_t>>& consts) {
  consts.component_pivots_from_input(x_data, view);
  std::vector<double> sums;
  with_components(consts.K, [&](auto k) {
    sums = statistics_pass<scalar_t, decltype(k)::value>(x_data, walker, consts);
  });
  return sums;
}

#define INSTANCE(scalar_t)                                                                                        \
  template std::vector<double> run_statistics_pass<scalar_t>(const scalar_t*, const ChannelView&,                \
                                                             const Walker<at::opmath_type<scalar_t>>&,           \
                                                             ChannelConstants<at::opmath_type<scalar_t>>&);
UAN_FOR_EACH_INPUT_TYPE(INSTANCE)

}  // namespace cpu
}  // namespace uan
