"""The checks that tests/test_cuda.py runs on a GPU, run here on CPU tensors
with the C++ backend at small sizes (tests/checks.py), and the order in which
backend="auto" picks a backend."""
import warnings

import pytest
import torch

import checks
from conftest import make_input, make_mixture
from uan_kernels import _backends, ops, reference


def cpp_train(*args):
    return ops.train_forward(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("layout", ["NCL_along_L", "channels_last_along_N"])
def test_periodic_training_step(layout, dtype):
    """The check behind test_cuda.py's tensors past 2**31 elements, at 5 copies.
    Measured here (C++ backend), against the check's tolerances: output and
    grad_input 2.3e-3 of the block's largest entry in bfloat16 (its rounding,
    up to 2**-9 of each value, plus float32 arithmetic; tolerance 2**-8) and
    1.1e-6 in float32; parameter gradients 4.3e-6 (tolerance 2e-5); mass, var
    and mean 1.6e-6 at most (tolerance 1e-5)."""
    if layout == "NCL_along_L":
        block, dim, fmt = make_input((2, 4, 3 * 37), seed=1), 2, torch.contiguous_format
        grad_block = make_input(block.shape, seed=2)
    else:
        block, dim, fmt = make_input((2, 4, 5, 7), seed=1), 0, torch.channels_last
        grad_block = make_input(block.shape, seed=2)
    block = (block * 2 + torch.arange(4, dtype=torch.float64).view(1, 4, *[1] * (block.dim() - 2))).to(dtype)
    grad_block = grad_block.to(dtype)
    mu, log_sigma, mix_logits, weight, bias = make_mixture(4, 3, dtype=torch.float32)
    mu = mu + torch.arange(4).view(1, 4)
    checks.check_periodic_training_step(cpp_train, block, grad_block, [mu, log_sigma, mix_logits, weight, bias],
                                        repeats=5, dim=dim, memory_format=fmt, copies_per_compare=2)


def test_periodic_training_step_detects_a_wrong_copy():
    """A backend whose output is wrong in one copy only fails the check."""
    block = make_input((2, 3, 8), dtype=torch.float32)
    params = make_mixture(3, 2, dtype=torch.float32)

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out):
            out = out.clone()
            out[1, 2, -1] += 0.5  # the last element, in the last copy
            return out

        @staticmethod
        def backward(ctx, grad):
            return grad

    def wrong_train(*args):
        out, *stats = ops.train_forward(*args)
        return (Wrong.apply(out), *stats)

    checks.check_periodic_training_step(cpp_train, block, block, params, repeats=3, dim=2)
    with pytest.raises(AssertionError):
        checks.check_periodic_training_step(wrong_train, block, block, params, repeats=3, dim=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("misaligned", ["input", "grad_output", "both"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_misaligned_storage_offset(channels_last, misaligned, dtype):
    """Tensors that start one element into their storage. Measured against the
    float64 reference (error over a tensor's largest entry): float32 7.9e-7,
    bfloat16 2.4e-3 (the rounding of output and grad_input)."""
    tol = {torch.float64: 1e-10, torch.float32: 3e-6, torch.bfloat16: 1e-2}[dtype]
    x = make_input((6, 5, 8, 12), dtype=dtype, channels_last=channels_last)
    grad_out = make_input(x.shape, dtype=dtype, seed=9, channels_last=channels_last)
    if misaligned in ("input", "both"):
        x = checks.misaligned_copy(x)
    if misaligned in ("grad_output", "both"):
        grad_out = checks.misaligned_copy(grad_out)
    params = make_mixture(5, 3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    checks.check_against_reference(cpp_train, x, params, grad_out, tol)


@pytest.mark.parametrize("x_layout,grad_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                                  ("contiguous", "sliced"), ("channels_last", "expanded")])
def test_grad_output_in_another_layout(x_layout, grad_layout):
    """Measured against the float64 reference, float32: at most 4e-6 of a
    tensor's largest entry (channels_last: the C++ channels-inner path sums
    each channel in one SIMD lane, serially); tolerance 1.5e-5."""
    x = make_input((4, 5, 6, 7), dtype=torch.float32, channels_last=x_layout == "channels_last")
    grad_out = make_input(x.shape, dtype=torch.float32, seed=9)
    if grad_layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    elif grad_layout == "sliced":
        grad_out = make_input((4, 5, 6, 14), dtype=torch.float32, seed=9)[..., ::2]
    else:  # the same values for every sample: stride 0 along N
        grad_out = grad_out[:1].expand(x.shape)
    params = make_mixture(5, 3, dtype=torch.float32)
    checks.check_against_reference(cpp_train, x, params, grad_out, 1.5e-5)


@pytest.mark.parametrize("update", ["weight", "moving_average"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_module_training_step_on_default_backend(update, dtype):
    """UAN(backend="auto") on CPU (the C++ kernels) against a float64 twin on
    the reference. Float32, measured: at most 8.1e-6 of a tensor's largest
    entry (grad of mix_logits); tolerance 3e-5."""
    checks.check_module_training_step(update, "cpu", dtype, tol=1e-10 if dtype == torch.float64 else 3e-5)


# --------------------------------------------------------------------------- #
# backend="auto"
# --------------------------------------------------------------------------- #


def test_auto_on_cpu_is_the_cpp_backend():
    assert _backends.resolve("auto", torch.device("cpu")).module is ops


def test_auto_on_cuda_order_cpp_then_triton_then_reference(monkeypatch):
    """Resolution only (no tensor is made): the CUDA kernels when built, else
    Triton, else the reference with a warning."""
    pytest.importorskip("triton", reason="the Triton fallback needs the triton package")
    cuda = torch.device("cuda")
    monkeypatch.setitem(ops._KERNEL_DEVICES, "cuda", True)
    assert _backends.resolve("auto", cuda).module is ops
    monkeypatch.setitem(ops._KERNEL_DEVICES, "cuda", False)
    assert _backends.resolve("auto", cuda) is _backends._load("triton")[0]
    monkeypatch.setitem(_backends._loaded, "triton", (None, "ImportError: no triton"))
    with pytest.warns(UserWarning, match="slow reference"):
        assert _backends.resolve("auto", cuda).module is reference


def test_auto_on_cpu_without_kernels_falls_back_to_reference_with_a_warning(monkeypatch):
    monkeypatch.setitem(ops._KERNEL_DEVICES, "cpu", False)
    x = make_input((4, 3, 5))
    params = make_mixture(3, 2)
    from uan_kernels import functional
    with pytest.warns(UserWarning, match="slow reference"):
        out = functional.uan(x, *params[:3], *params[3:], training=True, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(out, reference.uan_train(x, *params)[0], rtol=0, atol=0)
