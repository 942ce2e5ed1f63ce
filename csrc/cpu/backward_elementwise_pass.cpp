// The CPU backward's elementwise pass (uan_passes.h).
#include "uan_passes.h"

namespace uan {
namespace cpu {

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

template <typename scalar_t>
std::vector<double> run_backward_elementwise_pass(bool mixture_grads, const scalar_t* g_data, const scalar_t* x_data,
                                                  scalar_t* dx_data, const Walker<at::opmath_type<scalar_t>>& walker,
                                                  const ChannelConstants<at::opmath_type<scalar_t>>& consts) {
  std::vector<double> sums;
  with_components(consts.K, [&](auto k) {
    constexpr int K = decltype(k)::value;
    sums = mixture_grads ? backward_elementwise_pass<scalar_t, K, true>(g_data, x_data, dx_data, walker, consts)
                         : backward_elementwise_pass<scalar_t, K, false>(g_data, x_data, dx_data, walker, consts);
  });
  return sums;
}

#define INSTANCE(scalar_t)                                                                               \
  template std::vector<double> run_backward_elementwise_pass<scalar_t>(                                   \
      bool, const scalar_t*, const scalar_t*, scalar_t*, const Walker<at::opmath_type<scalar_t>>&,        \
      const ChannelConstants<at::opmath_type<scalar_t>>&);
UAN_FOR_EACH_INPUT_TYPE(INSTANCE)

}  // namespace cpu
}  // namespace uan
