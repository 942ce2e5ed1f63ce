// MixtureNorm's EM helpers on CPU (uan_kernels/mixture_norm.py holds their
// PyTorch definitions, which other devices run):
// - uan::em_m_step, the O(K*C) update between two statistics passes in one
//   call. In PyTorch it is about twenty tensor ops of a few microseconds
//   each, which on a subsample cost as much as the pass itself.
// - uan::gather_samples, the subsample EM fits, in parallel over channels
//   (index_select over precomputed offsets of every channel runs on one
//   thread: the gather took as long as two EM iterations), with the sort of
//   the drawn positions and their offsets computed here (as tensor ops they
//   cost half as much as the gather).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "uan_host.h"
#include "uan_math.h"

namespace uan {
namespace {

void check_float64(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                   const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but pivot is on ", device);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

template <typename param_t>
void m_step(const double* sums, const param_t* pivot, const double* prev_mean, const double* prev_var,
            const double* var_floor, int64_t K, int64_t C, double min_mass, double min_weight, double* mean,
            double* var, double* weight, param_t* mu, param_t* log_sigma, param_t* mix_logits) {
  const int64_t plane = K * C;
  for (int64_t k = 0; k < K; ++k) {
    double total_mass = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = k * C + c;
      const double mass = sums[i];
      const bool alive = mass > min_mass;
      const double denom = std::max(mass, min_mass);
      const double shift = sums[plane + i] / denom;
      // sum tau (x - m)^2 / S with m = pivot + shift, from the sums about the pivot.
      const double spread = sums[2 * plane + i] / denom - shift * shift;
      mean[i] = alive ? shift + static_cast<double>(pivot[i]) : prev_mean[i];
      var[i] = std::max(alive ? spread : prev_var[i], var_floor[c]);
      mu[i] = static_cast<param_t>(mean[i]);
      log_sigma[i] = static_cast<param_t>(0.5 * std::log(var[i]));
      total_mass += mass;
    }
    weight[k] = std::max(total_mass, min_weight);
    mix_logits[k] = static_cast<param_t>(std::log(weight[k]));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_m_step_cpu(
    const at::Tensor& sums, const at::Tensor& pivot, const at::Tensor& prev_mean, const at::Tensor& prev_var,
    const at::Tensor& var_floor, double min_mass, double min_weight) {
  const char* op = "uan::em_m_step";
  TORCH_CHECK(pivot.dim() == 2, op, ": pivot must have shape (K, C), got ", pivot.sizes());
  const int64_t K = pivot.size(0);
  const int64_t C = pivot.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxComponents, op, ": 1 to ", kMaxComponents, " components are supported, got K = ",
              K);
  const auto dtype = pivot.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": pivot must be float32 or float64, got ", dtype);
  check_float64(op, "sums", sums, {3, K, C}, pivot.device());
  check_float64(op, "prev_mean", prev_mean, {K, C}, pivot.device());
  check_float64(op, "prev_var", prev_var, {K, C}, pivot.device());
  check_float64(op, "var_floor", var_floor, {C}, pivot.device());
  TORCH_CHECK(std::isfinite(min_mass) && min_mass > 0.0, op, ": min_mass must be positive, got ", min_mass);
  TORCH_CHECK(std::isfinite(min_weight) && min_weight > 0.0, op, ": min_weight must be positive, got ", min_weight);
  const auto f64 = pivot.options().dtype(at::kDouble);
  auto mean = at::empty({K, C}, f64);
  auto var = at::empty({K, C}, f64);
  auto weight = at::empty({K}, f64);
  auto mu = at::empty({K, C}, pivot.options());
  auto log_sigma = at::empty({K, C}, pivot.options());
  auto mix_logits = at::empty({K}, pivot.options());
  const auto sums_c = sums.contiguous();
  const auto pivot_c = pivot.contiguous();
  const auto prev_mean_c = prev_mean.contiguous();
  const auto prev_var_c = prev_var.contiguous();
  const auto var_floor_c = var_floor.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "uan_em_m_step_cpu", [&] {
    m_step(sums_c.const_data_ptr<double>(), pivot_c.const_data_ptr<scalar_t>(), prev_mean_c.const_data_ptr<double>(),
           prev_var_c.const_data_ptr<double>(), var_floor_c.const_data_ptr<double>(), K, C, min_mass, min_weight,
           mean.mutable_data_ptr<double>(), var.mutable_data_ptr<double>(), weight.mutable_data_ptr<double>(),
           mu.mutable_data_ptr<scalar_t>(), log_sigma.mutable_data_ptr<scalar_t>(),
           mix_logits.mutable_data_ptr<scalar_t>());
  });
  return {mean, var, weight, mu, log_sigma, mix_logits};
}

// Positions in increasing order: a counting sort when the positions are
// dense enough in [0, M) for its histogram to be cheaper than comparisons.
std::vector<int64_t> sorted_positions(const int64_t* positions, int64_t S, int64_t M) {
  std::vector<int64_t> out;
  out.reserve(S);
  if (M <= 16 * S) {
    std::vector<int32_t> count(M, 0);
    for (int64_t j = 0; j < S; ++j) {
      ++count[positions[j]];
    }
    for (int64_t m = 0; m < M; ++m) {
      out.insert(out.end(), count[m], m);
    }
  } else {
    out.assign(positions, positions + S);
    std::sort(out.begin(), out.end());
  }
  return out;
}

at::Tensor gather_samples_cpu(const at::Tensor& input, const at::Tensor& positions) {
  const char* op = "uan::gather_samples";
  TORCH_CHECK(input.dim() >= 2, op, ": input must have shape (N, C, *), got ", input.sizes());
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong, op,
              ": positions must be a 1-D int64 tensor, got ", positions.scalar_type(), " ", positions.sizes());
  TORCH_CHECK(positions.device() == input.device(), op, ": positions is on ", positions.device(),
              " but input is on ", input.device());
  const auto x = dense_input(input);
  const ChannelView view = channel_view(x);
  const int64_t M = view.N * view.L;
  const int64_t S = positions.numel();
  const auto positions_c = positions.contiguous();
  const int64_t* position = positions_c.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < S; ++j) {
    TORCH_CHECK(position[j] >= 0 && position[j] < M, op, ": position ", position[j],
                " is outside the input's N * prod(S) = ", M, " values per channel");
  }
  // In increasing order, so that the gather walks each channel forward.
  std::vector<int64_t> offset = sorted_positions(position, S, M);
  for (auto& o : offset) {
    o = view.element_offset(o);
  }
  auto out = at::empty({1, view.C, S}, input.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "uan_gather_samples_cpu", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, view.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const scalar_t* channel = x_data + c * view.stride_c;
        scalar_t* row = y + c * S;
        for (int64_t j = 0; j < S; ++j) {
          row[j] = channel[offset[j]];
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(uan, CPU, m) {
  m.impl("em_m_step", &em_m_step_cpu);
  m.impl("gather_samples", &gather_samples_cpu);
}

}  // namespace uan
