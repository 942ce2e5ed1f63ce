// Host-side pieces shared by the CPU and CUDA operators: argument checks, the
// (N, C, L) view of an input, output allocation, and the operators written
// once over a device's passes (DevicePasses). The O(K*C) steps between passes
// run inside each device's code (uan_constants.h), not as ATen ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace uan {

// x seen as (N, C, L): L is the product of the trailing dims (1 for (N, C)).
struct ChannelView {
  int64_t N, C, L;
  int64_t stride_n, stride_c, stride_l;
  // Channels are the innermost dim (channels_last, or (N, C) input).
  bool channels_inner() const { return stride_c == 1; }
  // Memory offset of a channel's element e < N * L from its first element.
  int64_t element_offset(int64_t e) const { return (e / L) * stride_n + (e % L) * stride_l; }
};

// x itself when contiguous or channels_last(_3d)-dense, else a contiguous copy.
at::Tensor dense_input(const at::Tensor& x);
// The view of a tensor returned by dense_input.
ChannelView channel_view(const at::Tensor& x);
// grad_output in the memory layout of x (a copy only when they differ).
at::Tensor like_input_layout(const at::Tensor& grad_output, const at::Tensor& x);

// Input and mixture parameters of an operator (no affine, no eps).
void check_mixture_inputs(const char* op, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
                          const at::Tensor& mix_logits);
void check_forward_inputs(
    const char* op, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);
void check_statistics(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& mu);

// Data of an optional tensor (undefined: null), for kernels that default it.
template <typename acc_t>
const acc_t* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// The mixture and affine parameters of a call, in the accumulation type
// (parameters are float32 for float16/bfloat16 input, else the input's type),
// contiguous. weight and bias may be undefined (1 and 0).
struct Parameters {
  at::Tensor mu, log_sigma, mix_logits, weight, bias;
  double eps;
  int64_t K;
};

// What the operators need of a device; every output is allocated by the
// caller and fully written by the device (no zero-filled inputs).
struct DevicePasses {
  // Batch statistics (K, C) mean, var, mass of x and out = UAN(x) with them.
  void (*forward_train)(const at::Tensor& x, const ChannelView& view, const Parameters& p, at::Tensor& out,
                        at::Tensor& mean, at::Tensor& var, at::Tensor& mass);
  // out = UAN(x) with given (K, C) statistics (accumulation type); var
  // undefined means the mixture's own, exp(2 log_sigma).
  void (*forward_eval)(const at::Tensor& x, const ChannelView& view, const Parameters& p, const at::Tensor& mean,
                       const at::Tensor& var, at::Tensor& out);
  // Gradients; mass defined means mean/var are x's batch statistics. Without
  // mixture_grads, grad_mu, grad_log_sigma and grad_mix_logits are zeros.
  void (*backward)(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view, const Parameters& p,
                   const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass, bool mixture_grads,
                   at::Tensor& grad_input, at::Tensor& grad_mu, at::Tensor& grad_log_sigma,
                   at::Tensor& grad_mix_logits, at::Tensor& grad_weight, at::Tensor& grad_bias);
  // The statistics pass's (3, K, C) float64 sums about the component means
  // mu (the statistics operator); zeros when x has no element.
  void (*statistics)(const at::Tensor& x, const ChannelView& view, const Parameters& p, at::Tensor& sums);
  // (K, C) mean, var, mass in mu's dtype (float32 or float64) from (3, K, C)
  // contiguous sums about mu.
  void (*statistics_finalize)(const at::Tensor& sums, const at::Tensor& mu, at::Tensor& mean, at::Tensor& var,
                              at::Tensor& mass);
  // The training backward's reduce pass over x with the batch statistics'
  // means `mean`: (2K+1, C) float64 sums about them (backward_reduce operator).
  void (*backward_reduce)(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                          const Parameters& p, const at::Tensor& mean, at::Tensor& sums);
  // The training backward after its reduce pass, from (2K+1, C) reduce sums:
  // `sums` of the whole batch for grad_input, `local_sums` of x for grad_weight,
  // grad_bias and the mixing weights' direct term (backward_elementwise operator).
  void (*backward_elementwise)(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                               const Parameters& p, const at::Tensor& mean, const at::Tensor& var,
                               const at::Tensor& mass, const at::Tensor& sums, const at::Tensor& local_sums,
                               bool mixture_grads, at::Tensor& grad_input, at::Tensor& grad_mu,
                               at::Tensor& grad_log_sigma, at::Tensor& grad_mix_logits, at::Tensor& grad_weight,
                               at::Tensor& grad_bias);
  // One online EM step of the (contiguous) mixture buffers, in place.
  void (*moving_average_update)(at::Tensor& mu, at::Tensor& log_sigma, at::Tensor& mix_logits,
                                const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass,
                                int64_t values_per_channel, double momentum);
};

// The operators, written once over a device's passes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_training(
    const DevicePasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps);

at::Tensor forward_with_mixture_statistics(
    const DevicePasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps);

at::Tensor forward_with_statistics(
    const DevicePasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const DevicePasses& passes, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& log_sigma, const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& mass, double eps,
    bool mixture_grads);

at::Tensor statistics(const DevicePasses& passes, const at::Tensor& x, const at::Tensor& mu,
                      const at::Tensor& log_sigma, const at::Tensor& mix_logits);

std::tuple<at::Tensor, at::Tensor, at::Tensor> statistics_finalize(const DevicePasses& passes, const at::Tensor& sums,
                                                                   const at::Tensor& mu);

at::Tensor backward_reduce(const DevicePasses& passes, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& mu, const at::Tensor& log_sigma, const at::Tensor& mix_logits,
                           const at::Tensor& mean);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_elementwise(
    const DevicePasses& passes, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& log_sigma, const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mass, const at::Tensor& sums,
    const at::Tensor& local_sums, double eps, bool mixture_grads);

void moving_average_update(const DevicePasses& passes, at::Tensor& mu, at::Tensor& log_sigma,
                           at::Tensor& mix_logits, const at::Tensor& mean, const at::Tensor& var,
                           const at::Tensor& mass, int64_t values_per_channel, double momentum);

}  // namespace uan

// The input types the operators dispatch to (AT_DISPATCH_FLOATING_TYPES_AND2
// with Half and BFloat16): INSTANCE(scalar_t) for each, for the passes'
// explicit instances on every device.
#define UAN_FOR_EACH_INPUT_TYPE(INSTANCE) \
  INSTANCE(double)                        \
  INSTANCE(float)                         \
  INSTANCE(c10::Half)                     \
  INSTANCE(c10::BFloat16)
