#include "uan_host.h"

#include <ATen/ATen.h>

#include <cmath>

#include "uan_math.h"

namespace uan {

at::Tensor dense_input(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return x;
  }
  return x.contiguous();
}

ChannelView channel_view(const at::Tensor& x) {
  ChannelView v;
  v.N = x.size(0);
  v.C = x.size(1);
  v.L = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    v.L *= x.size(d);
  }
  v.stride_n = v.C * v.L;
  const bool channels_last = !x.is_contiguous() && x.dim() > 2;
  v.stride_c = channels_last ? 1 : v.L;
  v.stride_l = channels_last ? v.C : 1;
  return v;
}

at::Tensor like_input_layout(const at::Tensor& grad_output, const at::Tensor& x) {
  if (x.is_contiguous()) {
    return grad_output.contiguous();
  }
  const auto format = x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  return grad_output.contiguous(format);
}

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

static void check_parameter(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                            at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but input is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), " but mu has dtype ", dtype,
              "; all parameters must share one dtype");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_forward_inputs(
    const char* op, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x.dim() >= 2, op, ": input must have shape (N, C, *S) with at least 2 dims, got ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kHalf || xt == at::kBFloat16, op,
              ": input must be float16, bfloat16, float32 or float64, got ", xt);
  TORCH_CHECK(mu.dim() == 2, op, ": mu must have shape (K, C), got ", mu.sizes());
  const int64_t K = mu.size(0);
  const int64_t C = mu.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxComponents, op, ": the fused kernels support 1 to ", kMaxComponents,
              " components, got K = ", K);
  TORCH_CHECK(x.size(1) == C, op, ": input has ", x.size(1), " channels but mu has ", C);
  const auto pt = mu.scalar_type();
  TORCH_CHECK(pt == xt || (pt == at::kFloat && (xt == at::kHalf || xt == at::kBFloat16)), op,
              ": parameters have dtype ", pt, " but input has ", xt,
              "; parameters must match the input, or be float32 for float16/bfloat16 input");
  check_parameter(op, "mu", mu, x, pt, {K, C});
  check_parameter(op, "log_sigma", log_sigma, x, pt, {K, C});
  check_parameter(op, "mix_logits", mix_logits, x, pt, {K});
  if (weight.has_value()) {
    check_parameter(op, "weight", *weight, x, pt, {C});
  }
  if (bias.has_value()) {
    check_parameter(op, "bias", *bias, x, pt, {C});
  }
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be finite and > 0, got ", eps);
}

void check_statistics(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& mu) {
  TORCH_CHECK(stat.device() == mu.device(), op, ": ", name, " is on ", stat.device(), " but mu is on ", mu.device());
  TORCH_CHECK(stat.sizes() == mu.sizes(), op, ": ", name, " must have shape ", mu.sizes(), ", got ", stat.sizes());
  TORCH_CHECK(at::isFloatingType(stat.scalar_type()), op, ": ", name, " must be floating point, got ",
              stat.scalar_type());
}

at::Tensor responsibility_constants(
    const at::Tensor& mu, const at::Tensor& log_sigma, const at::Tensor& mix_logits, at::ScalarType acc) {
  const auto log_sigma_acc = log_sigma.to(acc);
  const auto log_lam = at::log_softmax(mix_logits.to(acc), 0).unsqueeze(1);
  return at::stack({mu.to(acc), at::exp(-log_sigma_acc), log_lam - log_sigma_acc}).contiguous();
}

at::Tensor normalization_scale(const at::Tensor& mix_logits, const at::Tensor& var, double eps) {
  const auto inv_sqrt_lam = at::exp(-0.5 * at::log_softmax(mix_logits.to(var.scalar_type()), 0)).unsqueeze(1);
  return inv_sqrt_lam * at::rsqrt(var + eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> statistics_from_sums(
    const at::Tensor& sums, const at::Tensor& pivot, at::ScalarType acc) {
  // m = (p S + T1) / (S + e),  v = (T2 - 2 (m - p) T1 + (m - p)^2 S) / (S + e):
  // exact rewrites of SPEC's sums around the per-channel pivot p.
  const auto mass = sums[0];
  const auto shifted = sums[1];
  const auto shifted_sq = sums[2];
  const auto denom = mass + kMassEps;
  const auto p = pivot.to(sums.scalar_type()).unsqueeze(0);
  const auto mean = (p * mass + shifted) / denom;
  const auto offset = mean - p;
  const auto var = ((shifted_sq - 2.0 * offset * shifted + offset * offset * mass) / denom).clamp_min(0.0);
  return {mean.to(acc), var.to(acc), mass.to(acc)};
}

at::Tensor gamma_or_ones(const std::optional<at::Tensor>& weight, int64_t C, const at::Tensor& like,
                         at::ScalarType acc) {
  return weight.has_value() ? weight->to(acc).contiguous() : at::ones({C}, like.options().dtype(acc));
}

at::Tensor beta_or_zeros(const std::optional<at::Tensor>& bias, int64_t C, const at::Tensor& like,
                         at::ScalarType acc) {
  return bias.has_value() ? bias->to(acc).contiguous() : at::zeros({C}, like.options().dtype(acc));
}

BackwardPlan plan_backward(
    const at::Tensor& responsibility_consts, const at::Tensor& mix_logits, const at::Tensor& center,
    const at::Tensor& var, const std::optional<at::Tensor>& mass, const at::Tensor& gamma,
    const at::Tensor& dout_tau, const at::Tensor& dout_tau_d, double eps) {
  const auto acc = dout_tau.scalar_type();
  const auto var_acc = var.to(acc);
  const auto scale = normalization_scale(mix_logits, var_acc, eps);
  // The gradient reaching y is g = gamma * dout, so A_k = gamma sum dout tau, B_k = gamma sum dout tau d.
  const auto A = gamma.unsqueeze(0) * dout_tau;
  const auto B = gamma.unsqueeze(0) * dout_tau_d;
  at::Tensor mean_coef;
  at::Tensor var_coef;
  if (mass.has_value()) {
    // Gm_k = -a_k r_k A_k, Gv_k = -a_k r_k^3 B_k / 2 (DESIGN.md), divided by S_k.
    const auto inv_std_sq = 1.0 / (var_acc + eps);
    const auto denom = mass->to(acc) + kMassEps;
    mean_coef = -scale * A / denom;
    var_coef = -0.5 * scale * inv_std_sq * B / denom;
  } else {
    mean_coef = at::zeros_like(scale);
    var_coef = at::zeros_like(scale);
  }
  BackwardPlan plan;
  plan.element_constants =
      at::cat({responsibility_consts.to(acc), at::stack({center.to(acc), scale, mean_coef, var_coef, var_acc})})
          .contiguous();
  plan.grad_weight = (scale * dout_tau_d).sum(0);
  plan.log_lam_direct = (-0.5 * scale * B).sum(1);
  return plan;
}

at::Tensor mix_logits_gradient(const at::Tensor& mix_logits, const at::Tensor& grad_log_lam) {
  const auto lam = at::softmax(mix_logits.to(grad_log_lam.scalar_type()), 0);
  return grad_log_lam - lam * grad_log_lam.sum();
}

}  // namespace uan

namespace uan {

static at::Tensor forward_table(const at::Tensor& responsibility_consts, const at::Tensor& mix_logits,
                                const at::Tensor& center, const at::Tensor& var, double eps) {
  const auto acc = responsibility_consts.scalar_type();
  const auto var_acc = var.to(acc);
  return at::cat({responsibility_consts, at::stack({center.to(acc), normalization_scale(mix_logits, var_acc, eps)})})
      .contiguous();
}

static at::Tensor normalize(const ElementPasses& passes, const at::Tensor& xd, const ChannelView& view,
                            const at::Tensor& table, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias) {
  const auto acc = table.scalar_type();
  auto out = at::empty_like(xd);
  passes.normalize(xd, view, table, gamma_or_ones(weight, view.C, xd, acc), beta_or_zeros(bias, view.C, xd, acc),
                   out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_training(
    const ElementPasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  check_forward_inputs("uan::forward", x, mu, log_sigma, mix_logits, weight, bias, eps);
  const auto xd = dense_input(x);
  const auto view = channel_view(xd);
  const auto acc = accumulate_type(x.scalar_type());
  const int64_t K = mu.size(0);
  const auto consts = responsibility_constants(mu, log_sigma, mix_logits, acc);
  auto sums = at::zeros({3 * K, view.C}, xd.options().dtype(at::kDouble));
  auto pivot = at::zeros({view.C}, xd.options().dtype(acc));
  passes.statistics(xd, view, consts, sums, pivot);
  auto [mean, var, mass] = statistics_from_sums(sums.view({3, K, view.C}), pivot, acc);
  auto out = normalize(passes, xd, view, forward_table(consts, mix_logits, mean, var, eps), weight, bias);
  return {out, mean, var, mass};
}

at::Tensor forward_with_statistics(
    const ElementPasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  check_forward_inputs("uan::forward", x, mu, log_sigma, mix_logits, weight, bias, eps);
  check_statistics("uan::forward", "mean", mean, mu);
  check_statistics("uan::forward", "var", var, mu);
  const auto xd = dense_input(x);
  const auto acc = accumulate_type(x.scalar_type());
  const auto consts = responsibility_constants(mu, log_sigma, mix_logits, acc);
  return normalize(passes, xd, channel_view(xd), forward_table(consts, mix_logits, mean, var, eps), weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const ElementPasses& passes, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& log_sigma, const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& mass, double eps,
    bool mixture_grads) {
  check_forward_inputs("uan::backward", x, mu, log_sigma, mix_logits, weight, std::nullopt, eps);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.device() == x.device(),
              "uan::backward: grad_output must match input in shape, dtype and device; got ", grad_out.sizes(), " ",
              grad_out.scalar_type(), " vs ", x.sizes(), " ", x.scalar_type());
  check_statistics("uan::backward", "mean", mean, mu);
  check_statistics("uan::backward", "var", var, mu);
  if (mass.has_value()) {
    check_statistics("uan::backward", "mass", *mass, mu);
  }
  const auto xd = dense_input(x);
  const auto gd = like_input_layout(grad_out, xd);
  const auto view = channel_view(xd);
  const auto acc = accumulate_type(x.scalar_type());
  const int64_t K = mu.size(0);
  const int64_t C = view.C;
  const auto param_options = mu.options();
  const auto consts = responsibility_constants(mu, log_sigma, mix_logits, acc);
  const auto center = mean.to(acc);

  auto reduce_sums = at::zeros({2 * K + 1, C}, xd.options().dtype(at::kDouble));
  passes.backward_reduce(gd, xd, view, forward_table(consts, mix_logits, center, var, eps), reduce_sums);
  const auto reduced = reduce_sums.to(acc);
  const auto gamma = gamma_or_ones(weight, C, xd, acc);
  const auto plan = plan_backward(consts, mix_logits, center, var, mass, gamma, reduced.narrow(0, 0, K),
                                  reduced.narrow(0, K, K), eps);

  auto grad_input = at::empty_like(xd);
  auto param_sums = at::zeros({3 * K, C}, xd.options().dtype(at::kDouble));
  passes.backward_elementwise(gd, xd, view, plan.element_constants, gamma, mixture_grads, grad_input, param_sums);

  at::Tensor grad_mu, grad_log_sigma, grad_mix_logits;
  if (mixture_grads) {
    // Copies, not views: the outputs must not alias one another.
    const auto sums = param_sums.to(acc);
    grad_mu = sums.narrow(0, 0, K).to(param_options.dtype(), false, true);
    grad_log_sigma = sums.narrow(0, K, K).to(param_options.dtype(), false, true);
    const auto grad_log_lam = sums.narrow(0, 2 * K, K).sum(1) + plan.log_lam_direct;
    grad_mix_logits = mix_logits_gradient(mix_logits, grad_log_lam).to(param_options.dtype());
  } else {
    grad_mu = at::zeros_like(mu);
    grad_log_sigma = at::zeros_like(log_sigma);
    grad_mix_logits = at::zeros_like(mix_logits);
  }
  return {grad_input,
          grad_mu,
          grad_log_sigma,
          grad_mix_logits,
          plan.grad_weight.to(param_options.dtype()),
          reduced[2 * K].to(param_options.dtype(), false, true)};
}

}  // namespace uan
