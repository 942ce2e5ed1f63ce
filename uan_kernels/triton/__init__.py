"""Triton backend of UAN: fused kernels, their launchers and the ``uan::triton_*`` operators.

Modules: :mod:`.kernels` (the ``@triton.jit`` kernels), :mod:`.element_math`
(their per-element math), :mod:`.geometry` (block sizes and grid),
:mod:`.launch` (host launchers), :mod:`.ops` (operators, fake
implementations, autograd), :mod:`.interpreter` (whether the kernels run in
Triton's interpreter).

Public functions (the ``"triton"`` backend of :mod:`uan_kernels._backends`):

* :func:`train_forward` ``(x, mu, log_sigma, mix_logits, weight, bias, eps) -> (out, mean, var, mass)``
* :func:`eval_forward` ``(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps) -> out``
* the training step's passes as separate operators, so that the sums of several
  processes can be added between them (:class:`uan_kernels.SyncUAN`; see
  :func:`uan_kernels.ops.statistics`): :func:`statistics` ``(x, mu, log_sigma,
  mix_logits) -> sums``, :func:`statistics_finalize` ``(sums, mu) -> (mean, var,
  mass)``, :func:`normalize` (the eval forward with those statistics),
  :func:`backward_reduce` ``(grad_out, x, mu, log_sigma, mix_logits, mean) ->
  sums`` and :func:`backward_elementwise` ``(grad_out, x, mu, log_sigma,
  mix_logits, weight, mean, var, mass, sums, local_sums, eps, mixture_grad) ->
  (grad_input, grad_mu, grad_log_sigma, grad_mix_logits, grad_weight, grad_bias)``

with the semantics of :func:`uan_kernels.reference.uan_train` and
:func:`~uan_kernels.reference.uan_eval`, differentiable with the exact gradient
(DESIGN.md). The batch statistics returned by :func:`train_forward` are marked
non-differentiable: their dependence on ``x`` is already part of ``out``'s
gradient.

Operators (``torch.library.custom_op``, with fake implementations and autograd,
so they work under ``torch.compile(fullgraph=True)``)::

    uan::triton_forward(Tensor x, Tensor mu, Tensor log_sigma, Tensor mix_logits,
                        Tensor? weight, Tensor? bias, float eps)
        -> (Tensor out, Tensor mean, Tensor var, Tensor mass)
    uan::triton_forward_eval(Tensor x, Tensor mu, Tensor log_sigma, Tensor mix_logits,
                             Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps)
        -> Tensor
    uan::triton_forward_mixture(Tensor x, Tensor mu, Tensor log_sigma, Tensor mix_logits,
                                Tensor? weight, Tensor? bias, float eps) -> Tensor
    uan::triton_statistics(Tensor x, Tensor mu, Tensor log_sigma, Tensor mix_logits) -> Tensor
    uan::triton_statistics_finalize(Tensor sums, Tensor mu) -> (Tensor, Tensor, Tensor)
    uan::triton_backward_reduce(Tensor grad_out, Tensor x, Tensor mu, Tensor log_sigma,
                                Tensor mix_logits, Tensor mean) -> Tensor
    uan::triton_backward_elementwise(Tensor grad_out, Tensor x, Tensor mu, Tensor log_sigma,
                                     Tensor mix_logits, Tensor? weight, Tensor mean, Tensor var,
                                     Tensor mass, Tensor sums, Tensor local_sums, float eps,
                                     bool mixture_grad)
        -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)
    uan::triton_backward(Tensor grad_out, Tensor x, Tensor mu, Tensor log_sigma,
                         Tensor mix_logits, Tensor? weight, Tensor mean, Tensor var,
                         Tensor? mass, float eps, bool mixture_grad)
        -> (Tensor grad_input, Tensor grad_mu, Tensor grad_log_sigma,
            Tensor grad_mix_logits, Tensor grad_weight, Tensor grad_bias,
            Tensor grad_mean, Tensor grad_var)

``triton_backward`` differentiates the training forward when ``mass`` is given
(``mean``, ``var``, ``mass`` are then the batch statistics, functions of ``x``)
and the eval forward when it is None (given statistics). ``mixture_grad=False``
skips the sums of the mixture-parameter gradients (``update="moving_average"``,
where they are buffers) and returns zeros for them. ``grad_weight`` is the
gradient w.r.t. ``gamma`` (computed as if ``gamma = 1`` when ``weight`` is None);
``grad_mean``/``grad_var`` are the loss's partial derivatives w.r.t. the
statistics used to normalise (``-a r A`` and ``-a r^3 B / 2`` of DESIGN.md):
in eval the gradients of the given ``mean``/``var``, in training
the intermediate terms already folded into ``grad_input``. ``triton_backward``
is itself differentiable (double backward), through the reference's PyTorch
math rather than fused kernels.

Kernels view ``x`` as ``(N, C, L)`` with its own strides (a view for contiguous
and channels_last tensors, so no hidden copy) and walk it in tiles of
``BLOCK_C`` channels by ``BLOCK_N * BLOCK_L`` elements. A grid of
``(channel tiles, programs)`` programs each loops over a contiguous run of
element tiles, carrying per-lane partial sums that it reduces once at the end.
Training forward (3 launches): a statistics pass (sums shifted by a
per-channel pivot), a finalize kernel (mean, var, mass), a normalise pass.
Eval forward (1 launch): the normalise pass alone. Training backward (4
launches): a reduction pass, a finalize kernel (the statistics' and affine
gradients), an elementwise pass writing ``grad_input``, a finalize kernel (the
mixture parameters' gradients); eval backward drops the reduction pass, its
sums coming from the elementwise pass. Per-program partial sums are added in
a fixed order, without atomics, so every result is bitwise reproducible.

``eps`` is a compile-time constant of the kernels (so that it keeps float64
precision for float64 input): each distinct value compiles its own kernels.
Statistics and all accumulation are float32, or float64 for float64 input.

On CPU tensors the kernels run under the Triton interpreter, which must be
enabled (``TRITON_INTERPRET=1``) before this package is imported.
"""
from .ops import (
    backward_elementwise,
    backward_reduce,
    eval_forward,
    eval_mixture_forward,
    normalize,
    statistics,
    statistics_finalize,
    train_forward,
)

__all__ = [
    "backward_elementwise",
    "backward_reduce",
    "eval_forward",
    "eval_mixture_forward",
    "normalize",
    "statistics",
    "statistics_finalize",
    "train_forward",
]
