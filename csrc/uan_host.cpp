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

static void check_parameter(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                            at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but input is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), " but mu has dtype ", dtype,
              "; all parameters must share one dtype");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_mixture_inputs(const char* op, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
                          const at::Tensor& mix_logits) {
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
}

void check_forward_inputs(
    const char* op, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_mixture_inputs(op, x, mu, log_sigma, mix_logits);
  const auto pt = mu.scalar_type();
  const int64_t C = mu.size(1);
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

}  // namespace uan

namespace uan {

static Parameters parameters(const at::Tensor& mu, const at::Tensor& log_sigma, const at::Tensor& mix_logits,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             double eps) {
  return {mu.contiguous(),
          log_sigma.contiguous(),
          mix_logits.contiguous(),
          weight.has_value() ? weight->contiguous() : at::Tensor(),
          bias.has_value() ? bias->contiguous() : at::Tensor(),
          eps,
          mu.size(0)};
}

// (K, C) statistics in the accumulation type, contiguous (no copy when they already are).
static at::Tensor statistic(const at::Tensor& stat, at::ScalarType acc) { return stat.to(acc).contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_training(
    const DevicePasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  check_forward_inputs("uan::forward", x, mu, log_sigma, mix_logits, weight, bias, eps);
  const auto xd = dense_input(x);
  const auto view = channel_view(xd);
  const auto p = parameters(mu, log_sigma, mix_logits, weight, bias, eps);
  auto out = at::empty_like(xd);
  auto mean = at::empty_like(p.mu);
  auto var = at::empty_like(p.mu);
  auto mass = at::empty_like(p.mu);
  passes.forward_train(xd, view, p, out, mean, var, mass);
  return {out, mean, var, mass};
}

at::Tensor forward_with_statistics(
    const DevicePasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  check_forward_inputs("uan::forward", x, mu, log_sigma, mix_logits, weight, bias, eps);
  check_statistics("uan::forward", "mean", mean, mu);
  check_statistics("uan::forward", "var", var, mu);
  const auto xd = dense_input(x);
  const auto acc = mu.scalar_type();
  auto out = at::empty_like(xd);
  passes.forward_eval(xd, channel_view(xd), parameters(mu, log_sigma, mix_logits, weight, bias, eps),
                      statistic(mean, acc), statistic(var, acc), out);
  return out;
}

at::Tensor forward_with_mixture_statistics(
    const DevicePasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  check_forward_inputs("uan::forward", x, mu, log_sigma, mix_logits, weight, bias, eps);
  const auto xd = dense_input(x);
  const auto p = parameters(mu, log_sigma, mix_logits, weight, bias, eps);
  auto out = at::empty_like(xd);
  passes.forward_eval(xd, channel_view(xd), p, p.mu, at::Tensor(), out);
  return out;
}

static void check_grad_output(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.device() == x.device(),
              op, ": grad_output must match input in shape, dtype and device; got ", grad_out.sizes(), " ",
              grad_out.scalar_type(), " vs ", x.sizes(), " ", x.scalar_type());
}

// (2K+1, C) float64 reduce sums on mu's device.
static void check_reduce_sums(const char* op, const char* name, const at::Tensor& sums, const at::Tensor& mu) {
  TORCH_CHECK(sums.device() == mu.device(), op, ": ", name, " is on ", sums.device(), " but mu is on ", mu.device());
  TORCH_CHECK(sums.scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ", sums.scalar_type());
  const int64_t K = mu.size(0);
  TORCH_CHECK(sums.sizes() == at::IntArrayRef({2 * K + 1, mu.size(1)}), op, ": ", name, " must have shape (",
              2 * K + 1, ", ", mu.size(1), "), got ", sums.sizes());
}

// The gradients' tensors, in the layout of the input and the parameters.
struct Gradients {
  at::Tensor input, mu, log_sigma, mix_logits, weight, bias;

  Gradients(const at::Tensor& xd, const Parameters& p)
      : input(at::empty_like(xd)),
        mu(at::empty_like(p.mu)),
        log_sigma(at::empty_like(p.mu)),
        mix_logits(at::empty_like(p.mix_logits)),
        weight(at::empty({xd.size(1)}, p.mu.options())),
        bias(at::empty({xd.size(1)}, p.mu.options())) {}

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {input, mu, log_sigma, mix_logits, weight, bias};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const DevicePasses& passes, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& log_sigma, const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& mass, double eps,
    bool mixture_grads) {
  check_forward_inputs("uan::backward", x, mu, log_sigma, mix_logits, weight, std::nullopt, eps);
  check_grad_output("uan::backward", grad_out, x);
  check_statistics("uan::backward", "mean", mean, mu);
  check_statistics("uan::backward", "var", var, mu);
  if (mass.has_value()) {
    check_statistics("uan::backward", "mass", *mass, mu);
  }
  const auto xd = dense_input(x);
  const auto gd = like_input_layout(grad_out, xd);
  const auto acc = mu.scalar_type();
  const auto p = parameters(mu, log_sigma, mix_logits, weight, std::nullopt, eps);
  Gradients g(xd, p);
  passes.backward(gd, xd, channel_view(xd), p, statistic(mean, acc), statistic(var, acc),
                  mass.has_value() ? statistic(*mass, acc) : at::Tensor(), mixture_grads, g.input, g.mu, g.log_sigma,
                  g.mix_logits, g.weight, g.bias);
  return g.tuple();
}

at::Tensor backward_reduce(const DevicePasses& passes, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& mu, const at::Tensor& log_sigma, const at::Tensor& mix_logits,
                           const at::Tensor& mean) {
  const char* op = "uan::backward_reduce";
  check_mixture_inputs(op, x, mu, log_sigma, mix_logits);
  check_grad_output(op, grad_out, x);
  check_statistics(op, "mean", mean, mu);
  const auto xd = dense_input(x);
  // The reduce pass reads neither the affine parameters nor eps.
  const auto p = parameters(mu, log_sigma, mix_logits, std::nullopt, std::nullopt, 0.0);
  auto sums = at::empty({2 * p.K + 1, mu.size(1)}, mu.options().dtype(at::kDouble));
  passes.backward_reduce(like_input_layout(grad_out, xd), xd, channel_view(xd), p, statistic(mean, mu.scalar_type()),
                         sums);
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_elementwise(
    const DevicePasses& passes, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& log_sigma, const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass, const at::Tensor& sums,
    const at::Tensor& local_sums, double eps, bool mixture_grads) {
  const char* op = "uan::backward_elementwise";
  check_forward_inputs(op, x, mu, log_sigma, mix_logits, weight, std::nullopt, eps);
  check_grad_output(op, grad_out, x);
  check_statistics(op, "mean", mean, mu);
  check_statistics(op, "var", var, mu);
  check_statistics(op, "mass", mass, mu);
  check_reduce_sums(op, "sums", sums, mu);
  check_reduce_sums(op, "local_sums", local_sums, mu);
  const auto xd = dense_input(x);
  const auto acc = mu.scalar_type();
  const auto p = parameters(mu, log_sigma, mix_logits, weight, std::nullopt, eps);
  Gradients g(xd, p);
  passes.backward_elementwise(like_input_layout(grad_out, xd), xd, channel_view(xd), p, statistic(mean, acc),
                              statistic(var, acc), statistic(mass, acc), sums.contiguous(), local_sums.contiguous(),
                              mixture_grads, g.input, g.mu, g.log_sigma, g.mix_logits, g.weight, g.bias);
  return g.tuple();
}

at::Tensor statistics(const DevicePasses& passes, const at::Tensor& x, const at::Tensor& mu,
                      const at::Tensor& log_sigma, const at::Tensor& mix_logits) {
  check_mixture_inputs("uan::statistics", x, mu, log_sigma, mix_logits);
  const auto xd = dense_input(x);
  // The statistics pass reads neither the affine parameters nor eps.
  const auto p = parameters(mu, log_sigma, mix_logits, std::nullopt, std::nullopt, 0.0);
  auto sums = at::empty({3, p.K, mu.size(1)}, mu.options().dtype(at::kDouble));
  passes.statistics(xd, channel_view(xd), p, sums);
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> statistics_finalize(const DevicePasses& passes, const at::Tensor& sums,
                                                                   const at::Tensor& mu) {
  const char* op = "uan::statistics_finalize";
  TORCH_CHECK(mu.dim() == 2, op, ": mu must have shape (K, C), got ", mu.sizes());
  const int64_t K = mu.size(0);
  TORCH_CHECK(K >= 1 && K <= kMaxComponents, op, ": 1 to ", kMaxComponents, " components are supported, got K = ",
              K);
  const auto dtype = mu.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": mu must be float32 or float64, got ", dtype);
  TORCH_CHECK(sums.device() == mu.device(), op, ": sums is on ", sums.device(), " but mu is on ", mu.device());
  TORCH_CHECK(sums.scalar_type() == at::kDouble, op, ": sums must be float64, got ", sums.scalar_type());
  TORCH_CHECK(sums.sizes() == at::IntArrayRef({3, K, mu.size(1)}), op, ": sums must have shape (3, ", K, ", ",
              mu.size(1), "), got ", sums.sizes());
  const auto mu_c = mu.contiguous();
  auto mean = at::empty_like(mu_c);
  auto var = at::empty_like(mu_c);
  auto mass = at::empty_like(mu_c);
  passes.statistics_finalize(sums.contiguous(), mu_c, mean, var, mass);
  return {mean, var, mass};
}

void moving_average_update(const DevicePasses& passes, at::Tensor& mu, at::Tensor& log_sigma,
                           at::Tensor& mix_logits, const at::Tensor& mean, const at::Tensor& var,
                           const at::Tensor& mass, int64_t values_per_channel, double momentum) {
  const char* op = "uan::moving_average_update_";
  TORCH_CHECK(mu.dim() == 2, op, ": mu must have shape (K, C), got ", mu.sizes());
  const int64_t K = mu.size(0);
  TORCH_CHECK(K >= 1 && K <= kMaxComponents, op, ": 1 to ", kMaxComponents, " components are supported, got K = ",
              K);
  const auto dtype = mu.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": mu must be float32 or float64, got ", dtype);
  check_parameter(op, "log_sigma", log_sigma, mu, dtype, mu.sizes());
  check_parameter(op, "mix_logits", mix_logits, mu, dtype, {K});
  for (const auto* t : {&mu, &log_sigma, &mix_logits}) {
    TORCH_CHECK(t->is_contiguous(), op, ": the mixture buffers must be contiguous");
  }
  check_statistics(op, "mean", mean, mu);
  check_statistics(op, "var", var, mu);
  check_statistics(op, "mass", mass, mu);
  TORCH_CHECK(values_per_channel >= 1, op, ": values_per_channel must be >= 1, got ", values_per_channel);
  TORCH_CHECK(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0, op,
              ": momentum must be in [0, 1], got ", momentum);
  passes.moving_average_update(mu, log_sigma, mix_logits, statistic(mean, dtype), statistic(var, dtype),
                               statistic(mass, dtype), values_per_channel, momentum);
}

}  // namespace uan
