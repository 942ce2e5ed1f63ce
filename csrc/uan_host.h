// Host-side pieces shared by the CPU and CUDA operators: argument checks,
// the (N, C, L) view of an input, and the O(K*C) per-component constants
// computed with ATen before and between the element passes.
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
};

// x itself when contiguous or channels_last(_3d)-dense, else a contiguous copy.
at::Tensor dense_input(const at::Tensor& x);
// The view of a tensor returned by dense_input.
ChannelView channel_view(const at::Tensor& x);
// grad_output in the memory layout of x (a copy only when they differ).
at::Tensor like_input_layout(const at::Tensor& grad_output, const at::Tensor& x);

// float for float16/bfloat16/float32 inputs, double for float64.
at::ScalarType accumulate_type(at::ScalarType input_type);

void check_forward_inputs(
    const char* op, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);
void check_statistics(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& mu);

// Per-(k, c) constants of the responsibilities, stacked as (3, K, C) in the
// accumulation type: mu, inv_sigma = exp(-log_sigma), log_prior = log(lam) - log_sigma.
at::Tensor responsibility_constants(
    const at::Tensor& mu, const at::Tensor& log_sigma, const at::Tensor& mix_logits, at::ScalarType acc);
// scale_kc = lam_k^-1/2 * (var_kc + eps)^-1/2, shape (K, C).
at::Tensor normalization_scale(const at::Tensor& mix_logits, const at::Tensor& var, double eps);
// Batch statistics (mean, var, mass) from the pivot-shifted sums of the
// statistics pass, stacked (3, K, C) as S, sum tau (x - p), sum tau (x - p)^2.
std::tuple<at::Tensor, at::Tensor, at::Tensor> statistics_from_sums(
    const at::Tensor& sums, const at::Tensor& pivot, at::ScalarType acc);
// weight (or ones) as a (C,) tensor of type acc.
at::Tensor gamma_or_ones(const std::optional<at::Tensor>& weight, int64_t C, const at::Tensor& like, at::ScalarType acc);
at::Tensor beta_or_zeros(const std::optional<at::Tensor>& bias, int64_t C, const at::Tensor& like, at::ScalarType acc);

// Constants of the elementwise backward pass and the O(K*C) pieces of the
// parameter gradients, from the reduction pass's sums over elements:
//   dout_tau = sum dout tau_k, dout_tau_d = sum dout tau_k (x - center_k).
struct BackwardPlan {
  at::Tensor element_constants;  // (8, K, C): mu, inv_sigma, log_prior, center, scale, mean_coef, var_coef, var
  at::Tensor grad_weight;        // (C,) acc type
  at::Tensor log_lam_direct;     // (K,): d loss / d log lam_k through the lam^-1/2 factor
};
BackwardPlan plan_backward(
    const at::Tensor& responsibility_consts, const at::Tensor& mix_logits, const at::Tensor& center,
    const at::Tensor& var, const std::optional<at::Tensor>& mass, const at::Tensor& gamma,
    const at::Tensor& dout_tau, const at::Tensor& dout_tau_d, double eps);
// Gradient of mix_logits from d log lam_k (softmax Jacobian).
at::Tensor mix_logits_gradient(const at::Tensor& mix_logits, const at::Tensor& grad_log_lam);

// Rows of the per-(k, c) constant tables the element passes read; each row is
// a (K, C) block of the accumulation type. Forward passes read rows 0-4,
// the backward element pass rows 0-7.
enum TableRow : int64_t {
  kMu = 0, kInvSigma, kLogPrior, kCenter, kScale, kMeanCoef, kVarCoef, kVar,
  kForwardRows = kCenter + 2, kBackwardRows = kVar + 1
};

// The four element passes of a device. Sums are (Q, C) float64 tensors, zeroed
// by the caller, each row one quantity per channel.
struct ElementPasses {
  // Rows k, K+k, 2K+k: S_k, sum tau_k (x - p), sum tau_k (x - p)^2; pivot p (C,) = x[0, c, 0].
  void (*statistics)(const at::Tensor& x, const ChannelView& view, const at::Tensor& table, at::Tensor& sums,
                     at::Tensor& pivot);
  // out = gamma * sum_k tau_k scale_k (x - center_k) + beta.
  void (*normalize)(const at::Tensor& x, const ChannelView& view, const at::Tensor& table, const at::Tensor& gamma,
                    const at::Tensor& beta, at::Tensor& out);
  // Rows k, K+k, 2K: sum dout tau_k, sum dout tau_k (x - center_k), sum dout.
  void (*backward_reduce)(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                          const at::Tensor& table, at::Tensor& sums);
  // Writes grad_input; when mixture_grads, rows k, K+k, 2K+k: sum U_k w_k, sum U_k (z_k^2 - 1), sum U_k.
  void (*backward_elementwise)(const at::Tensor& grad_out, const at::Tensor& x, const ChannelView& view,
                               const at::Tensor& table, const at::Tensor& gamma, bool mixture_grads,
                               at::Tensor& grad_input, at::Tensor& sums);
};

// The operators, written once over a device's element passes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_training(
    const ElementPasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps);
at::Tensor forward_with_statistics(
    const ElementPasses& passes, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& mix_logits, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const ElementPasses& passes, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mu,
    const at::Tensor& log_sigma, const at::Tensor& mix_logits, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& mass, double eps,
    bool mixture_grads);

}  // namespace uan
