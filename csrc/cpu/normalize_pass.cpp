// The CPU normalize pass (uan_passes.h).
#include "uan_passes.h"

namespace uan {
namespace cpu {

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

template <typename scalar_t>
void run_normalize_pass(const scalar_t* x_data, scalar_t* out_data, const Walker<at::opmath_type<scalar_t>>& walker,
                        const ChannelConstants<at::opmath_type<scalar_t>>& consts,
                        const at::opmath_type<scalar_t>* bias) {
  with_components(consts.K, [&](auto k) {
    normalize_pass<scalar_t, decltype(k)::value>(x_data, out_data, walker, consts, bias);
  });
}

#define INSTANCE(scalar_t)                                                                                      \
  template void run_normalize_pass<scalar_t>(const scalar_t*, scalar_t*, const Walker<at::opmath_type<scalar_t>>&, \
                                             const ChannelConstants<at::opmath_type<scalar_t>>&,                   \
                                             const at::opmath_type<scalar_t>*);
UAN_FOR_EACH_INPUT_TYPE(INSTANCE)

}  // namespace cpu
}  // namespace uan
