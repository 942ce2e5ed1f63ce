// The CPU backward's reduce pass (uan_passes.h).
#include "uan_passes.h"

namespace uan {
namespace cpu {

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

template <typename scalar_t>
std::vector<double> run_backward_reduce_pass(const scalar_t* g_data, const scalar_t* x_data,
                                             const Walker<at::opmath_type<scalar_t>>& walker,
                                             const ChannelConstants<at::opmath_type<scalar_t>>& consts) {
  std::vector<double> sums;
  with_components(consts.K, [&](auto k) {
    sums = backward_reduce_pass<scalar_t, decltype(k)::value>(g_data, x_data, walker, consts);
  });
  return sums;
}

#define INSTANCE(scalar_t)                                                                               \
  template std::vector<double> run_backward_reduce_pass<scalar_t>(                                        \
      const scalar_t*, const scalar_t*, const Walker<at::opmath_type<scalar_t>>&,                         \
      const ChannelConstants<at::opmath_type<scalar_t>>&);
UAN_FOR_EACH_INPUT_TYPE(INSTANCE)

}  // namespace cpu
}  // namespace uan
