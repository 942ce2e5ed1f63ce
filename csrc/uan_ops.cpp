// Operator schemas of the uan namespace and the Python module entry point.
// Kernels are registered per device in uan_cpu.cpp (passes in cpu/) and
// cuda/uan_cuda.cu (passes in cuda/uan_passes.cuh);
// fake implementations and autograd are registered from Python (uan_kernels/ops.py).
#include <Python.h>
#include <torch/library.h>

// Importing uan_kernels._C loads this library, which runs the registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(uan, m) {
  // Training forward: batch statistics. Returns the output and the (K, C)
  // batch mean, biased variance and mass S_k = sum_i tau_ik.
  m.def(
      "forward(Tensor input, Tensor mu, Tensor log_sigma, Tensor mix_logits, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor output, Tensor mean, Tensor var, Tensor mass)");
  // Eval forward: given (K, C) statistics. With a batch's statistics (from
  // statistics_finalize) it is also the training forward's normalize pass:
  // SPEC's transform is the same, only where the statistics come from differs.
  m.def(
      "forward.stats(Tensor input, Tensor mu, Tensor log_sigma, Tensor mix_logits, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? bias, float eps) -> Tensor output");
  // Eval forward of update="moving_average": the mixture's own statistics,
  // (mean, var) = (mu, exp(2 log_sigma)), taken as constants.
  m.def(
      "forward.mixture(Tensor input, Tensor mu, Tensor log_sigma, Tensor mix_logits, Tensor? weight, Tensor? bias, "
      "float eps) -> Tensor output");
  // Backward of all three: with mass, mean/var are the batch statistics of the
  // training forward (their dependence on input is differentiated); without,
  // they are given constants. mixture_grads=False skips the mu, log_sigma and
  // mix_logits sums (buffers in update="moving_average") and returns zeros.
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor mu, Tensor log_sigma, Tensor mix_logits, "
      "Tensor? weight, Tensor mean, Tensor var, Tensor? mass, float eps, bool mixture_grads) -> "
      "(Tensor grad_input, Tensor grad_mu, Tensor grad_log_sigma, Tensor grad_mix_logits, Tensor grad_weight, "
      "Tensor grad_bias)");
  // Operators per pass, so that a caller can put a collective between them
  // (SyncUAN). The statistics pass: float64 (3, K, C) sums over the input's
  // elements of tau_k, tau_k (x - mu_k) and tau_k (x - mu_k)^2, about the
  // component means mu, which every process knows, so that sums of several
  // batches add. Zeros for an empty input.
  m.def("statistics(Tensor input, Tensor mu, Tensor log_sigma, Tensor mix_logits) -> Tensor sums");
  // (K, C) batch mean, biased variance and mass, in mu's dtype, from such sums.
  // The normalize pass is forward.stats with these statistics.
  m.def("statistics_finalize(Tensor sums, Tensor mu) -> (Tensor mean, Tensor var, Tensor mass)");
  // The training backward's reduce pass, with the batch statistics' means:
  // float64 (2K+1, C) sums over the input's elements of dout tau_k (rows k),
  // dout tau_k (x - mean_k) (rows K + k) and dout (row 2K), so that sums of
  // several batches add.
  m.def(
      "backward_reduce(Tensor grad_output, Tensor input, Tensor mu, Tensor log_sigma, Tensor mix_logits, "
      "Tensor mean) -> Tensor sums");
  // The training backward after its reduce pass. sums: the whole batch's
  // reduce sums (of every process), which grad_input needs with the batch
  // statistics mean, var, mass; local_sums: this input's, from which
  // grad_weight, grad_bias and the mixing weights' direct term are taken, so
  // that every batch's parameter gradients add up to the whole batch's. With
  // sums = local_sums it is uan::backward of a training forward.
  m.def(
      "backward_elementwise(Tensor grad_output, Tensor input, Tensor mu, Tensor log_sigma, Tensor mix_logits, "
      "Tensor? weight, Tensor mean, Tensor var, Tensor mass, Tensor sums, Tensor local_sums, float eps, "
      "bool mixture_grads) -> (Tensor grad_input, Tensor grad_mu, Tensor grad_log_sigma, Tensor grad_mix_logits, "
      "Tensor grad_weight, Tensor grad_bias)");
  // MixtureNorm's EM: the M-step from a statistics pass's sums about pivot
  // (the mu that pass was given), with prev_mean/prev_var kept where a
  // component's mass is at most min_mass and variances floored at var_floor
  // (C,). Returns the float64 mean, var and weight_k = max(sum_c mass, min_weight)
  // (unnormalised mixing weights) and the next pass's mu, log_sigma and
  // mix_logits = log(weight) in pivot's dtype. CPU only (uan_kernels/mixture_norm.py).
  m.def(
      "em_m_step(Tensor sums, Tensor pivot, Tensor prev_mean, Tensor prev_var, Tensor var_floor, float min_mass, "
      "float min_weight) -> (Tensor mean, Tensor var, Tensor weight, Tensor mu, Tensor log_sigma, "
      "Tensor mix_logits)");
  // MixtureNorm's EM subsample: (1, C, S) contiguous, output[0, c, j] =
  // channel c's value at the j-th smallest of the S positions, a position
  // being n * L + l in the (N, C, L) view of the input (L the product of its
  // trailing dims). CPU only (uan_kernels/mixture_norm.py).
  m.def("gather_samples(Tensor input, Tensor positions) -> Tensor");
  // update="moving_average": one online EM step of the mixture buffers from a
  // training forward's (K, C) mean, var and mass, in place, in float64 (SPEC).
  m.def(
      "moving_average_update_(Tensor(a!) mu, Tensor(b!) log_sigma, Tensor(c!) mix_logits, Tensor mean, "
      "Tensor var, Tensor mass, int values_per_channel, float momentum) -> ()");
}
