// CPU kernels of the UAN operators: the host code that runs a training
// step's or an eval forward's passes (cpu/*_pass.cpp: at::parallel_for over
// channels, or blocks of channels for channels-last input, and at::vec SIMD
// over elements). Each channel's sums are accumulated by one thread in a
// fixed order, so results are bitwise reproducible for any thread count. The
// per-channel constants and the O(K*C) steps between passes are plain loops
// over uan_constants.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/uan_passes.h"
#include "uan_constants.h"
#include "uan_host.h"
#include "uan_math.h"

namespace uan {
namespace {

using namespace cpu;

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
    run_normalize_pass(x_data, out.mutable_data_ptr<scalar_t>(), walker, consts, optional_data<acc_t>(p.bias));
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
    run_normalize_pass(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), Walker<acc_t>(view), consts,
                       optional_data<acc_t>(p.bias));
  });
}

// The backward's reduce pass with its sums moved to the statistics' centers:
// (2K+1, C) float64 rows A_k = sum dout tau_k, B_k = sum dout tau_k (x - center_k)
// and sum dout.
template <typename scalar_t, typename acc_t>
std::vector<double> reduce_sums_about_centers(const scalar_t* g_data, const scalar_t* x_data,
                                              const Walker<acc_t>& walker, const ChannelConstants<acc_t>& consts,
                                              const acc_t* center) {
  std::vector<double> sums = run_backward_reduce_pass(g_data, x_data, walker, consts);
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

  const std::vector<double> param_sums =
      run_backward_elementwise_pass(mixture_grads, g_data, x_data, dx_data, walker, consts);
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
