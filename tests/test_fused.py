"""Fused backends (C++ and Triton) against the float64 reference.

Each test runs for every fused backend: "cpp" on CPU tensors, and "triton" on
CUDA tensors where a GPU is visible, else on CPU tensors under the Triton
interpreter (kept to small shapes: it is slow). Tensors are built on the CPU
and moved to the backend's device inside the call (differentiably), so every
test reads the same on either machine.
"""
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import SHAPES, make_input, make_mixture
from uan_kernels import _backends, reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
FUSED = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))]
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend(name):
    """Backend ``name`` as train/eval functions of CPU tensors, run on its device."""
    device = TRITON_DEVICE if name == "triton" else torch.device("cpu")
    impl = _backends.resolve(name, device)
    if device.type == "cpu":
        return impl

    def moved(fn):
        def call(*args):
            out = fn(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
            return out.cpu() if isinstance(out, torch.Tensor) else tuple(t.cpu() for t in out)
        return call

    return SimpleNamespace(train=moved(impl.train), eval=moved(impl.eval))


def rel_err(actual, expected):
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def run_train(impl, x, params, affine=True):
    mu, log_sigma, mix_logits, weight, bias = params
    return impl.train(x, mu, log_sigma, mix_logits, weight if affine else None, bias if affine else None, 1e-5)


def eval_stats(channels, components, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(components, channels, generator=g, dtype=torch.float64) * 0.5
    var = torch.rand(components, channels, generator=g, dtype=torch.float64) + 0.5
    return mean.to(dtype), var.to(dtype)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NC", "NCDHW"])
def test_training_forward_matches_reference(name, dtype, tol, affine, layout):
    x = make_input(SHAPES[layout], dtype=dtype)
    params = make_mixture(x.shape[1], 3, dtype=dtype)
    expected = run_train(backend("reference"), x.double(), [p.double() for p in params], affine)
    actual = run_train(backend(name), x, params, affine)
    assert actual[0].dtype == dtype
    for got, want in zip(actual, expected):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_forward_matches_reference(name, dtype, tol, affine):
    x = make_input((4, 3, 6, 5), dtype=dtype)
    mu, log_sigma, mix_logits, weight, bias = make_mixture(3, 3, dtype=dtype)
    mean, var = eval_stats(3, 3, dtype)
    w, b = (weight, bias) if affine else (None, None)
    expected = reference.uan_eval(x.double(), mu.double(), log_sigma.double(), mix_logits.double(), mean.double(),
                                  var.double(), None if w is None else w.double(), None if b is None else b.double())
    actual = backend(name).eval(x, mu, log_sigma, mix_logits, mean, var, w, b, 1e-5)
    assert rel_err(actual, expected) < tol


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_error_within_twice_batchnorm(name, dtype):
    """Output error of a float16/bfloat16 input against a float32 reference on
    the same rounded data, compared with BatchNorm's own error in that dtype."""
    x = (make_input((8, 4, 8, 8)) * 2 + 0.5).to(dtype)
    mu, log_sigma, mix_logits, weight, bias = make_mixture(4, 3, dtype=torch.float32)
    out = backend(name).train(x, mu, log_sigma, mix_logits, weight, bias, 1e-5)[0]
    assert out.dtype == dtype
    want = reference.uan_train(x.float(), mu, log_sigma, mix_logits, weight, bias, 1e-5)[0]
    bn = F.batch_norm(x, None, None, weight, bias, training=True)  # float32 affine parameters, as under AMP
    bn_want = F.batch_norm(x.float(), None, None, weight, bias, training=True)
    assert rel_err(out, want) <= 2 * rel_err(bn, bn_want)


AFFINE = {"affine": (True, True), "no_affine": (False, False), "weight_only": (True, False),
          "bias_only": (False, True)}


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("mode", ["update_weight", "moving_average", "eval"])
def test_gradcheck(name, mode, affine):
    """Numerical gradients of the fused backward, with and without each affine
    parameter (weight=None and bias=None take their own branches). The Triton
    cases check one random projection (fast_mode): the full Jacobian of the
    same kernels is checked in test_triton_ops.py, and costs ~5 s a case in the
    interpreter."""
    impl = backend(name)
    x = make_input((3, 2, 3, 2), requires_grad=True)
    mu, log_sigma, mix_logits, weight, bias = make_mixture(2, 3, requires_grad=True)
    has_weight, has_bias = AFFINE[affine]
    weight = weight if has_weight else None
    bias = bias if has_bias else None
    if mode == "moving_average":
        for t in (mu, log_sigma, mix_logits):
            t.requires_grad_(False)
    mean, var = eval_stats(2, 3)

    def fn(x, mu, log_sigma, mix_logits, *affine_params):
        w = affine_params[0] if has_weight else None
        b = affine_params[-1] if has_bias else None
        if mode == "eval":
            return impl.eval(x, mu, log_sigma, mix_logits, mean, var, w, b, 1e-5)
        return impl.train(x, mu, log_sigma, mix_logits, w, b, 1e-5)[0]

    inputs = (x, mu, log_sigma, mix_logits, *[t for t in (weight, bias) if t is not None])
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=name == "triton")


def gradients(impl, x, params, grad_out, train=True):
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    if train:
        out = impl.train(x, *params, 1e-5)[0]
    else:
        mean, var = eval_stats(x.shape[1], params[0].shape[0], params[0].dtype)
        out = impl.eval(x, *params[:3], mean, var, *params[3:], 1e-5)
    return [out.detach(), *torch.autograd.grad(out, [x, *params], grad_out)]


def reference_gradients(x, params, grad_out, train=True):
    """``gradients`` of the float64 reference on the same (rounded) values."""
    return gradients(backend("reference"), x.double(), [p.double() for p in params], grad_out.double(), train)


# Float32 output and gradients against the float64 reference, as error over
# each tensor's largest entry. Measured on the cases of
# test_gradients_match_reference and test_memory_formats: at most 3.1e-6 for
# "cpp" and 3.0e-6 for "triton" (K=3, train; the gradients of the mixture
# parameters are sums over every element with cancellation).
FLOAT32_GRAD_TOL = {"cpp": 1e-5, "triton": 1e-5}


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("components", [1, 3, 16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradients_match_reference(name, dtype, components, train):
    """Output and the gradients of x and of every parameter against the float64 reference."""
    x = make_input((4, 5, 6, 6) if name == "cpp" else (2, 5, 3, 4), dtype=dtype)
    params = make_mixture(5, components, dtype=dtype)
    grad_out = make_input(x.shape, dtype=dtype, seed=9)
    got = gradients(backend(name), x, params, grad_out, train)
    want = reference_gradients(x, params, grad_out, train)
    tol = 1e-10 if dtype == torch.float64 else FLOAT32_GRAD_TOL[name]
    assert all(g.dtype == dtype for g in got)
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol


def rms_rel_err(actual, expected):
    """Root-mean-square error over the root-mean-square of ``expected``."""
    diff = actual.double() - expected.double()
    return (diff.pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("components", [1, 3, 16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_reduced_precision_backward_against_batchnorm(name, dtype, components, channels_last):
    """float16/bfloat16 input and grad_output, float32 parameters (as under
    autocast), against the float64 reference on the same rounded values.

    The output and grad_input are rounded to ``dtype``: their RMS error must be
    at most twice BatchNorm's own error on the same tensors (BatchNorm in
    ``dtype`` with float32 affine parameters against BatchNorm in float64);
    measured: at most 1.07 times. The parameter gradients are float32 sums of
    values that the reference sees exactly, so their error is float32
    arithmetic: at most 3.5e-6 of the tensor's largest entry was measured;
    tolerance 1.5e-5."""
    x = (make_input((8, 4, 8, 8), channels_last=channels_last) * 2 + 0.5).to(dtype)
    grad_out = make_input(x.shape, seed=9, channels_last=channels_last).to(dtype)
    params = make_mixture(4, components, dtype=torch.float32)
    got = gradients(backend(name), x, params, grad_out)
    want = reference_gradients(x, params, grad_out)
    out, grad_x, *param_grads = got
    assert out.dtype == grad_x.dtype == dtype
    assert all(g.dtype == torch.float32 for g in param_grads)

    def batch_norm_grads(x, weight, bias, grad_out):
        x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
        y = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
        return [y.detach(), *torch.autograd.grad(y, (x, weight, bias), grad_out)]

    weight, bias = params[3:]
    bn = batch_norm_grads(x, weight, bias, grad_out)
    bn_want = batch_norm_grads(x.double(), weight.double(), bias.double(), grad_out.double())
    assert bn[0].dtype == bn[1].dtype == dtype and bn[2].dtype == torch.float32
    for index in (0, 1):
        assert rms_rel_err(got[index], want[index]) <= 2 * rms_rel_err(bn[index], bn_want[index])
    for g, w in zip(param_grads, want[2:]):
        assert rel_err(g, w) < 1.5e-5


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "strided"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_memory_formats(name, layout, dtype, train):
    """Non-contiguous inputs against the float64 reference; the output and
    grad_input keep a channels_last input's memory format."""
    if layout == "strided":  # every other column: not dense
        x = make_input((4, 6, 5, 14), dtype=dtype)[..., ::2]
    else:
        x = make_input((4, 6, 5, 7) if layout == "channels_last" else (2, 6, 3, 4, 5), dtype=dtype,
                       channels_last=True)
    params = make_mixture(6, 3, dtype=dtype)
    grad_out = make_input(x.shape, dtype=dtype, seed=3)
    got = gradients(backend(name), x, params, grad_out, train)
    want = reference_gradients(x, params, grad_out, train)
    if layout != "strided":
        fmt = getattr(torch, layout)
        assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    tol = 1e-10 if dtype == torch.float64 else FLOAT32_GRAD_TOL[name]
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol


@pytest.mark.parametrize("name", FUSED)
def test_deterministic(name):
    x = make_input((6, 4, 9, 9), dtype=torch.float32)
    params = make_mixture(4, 3, dtype=torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, seed=3)
    first = gradients(backend(name), x, params, grad_out)
    second = gradients(backend(name), x, params, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# Inputs whose channels are the innermost dimension, large enough for the C++
# kernels' channels-inner path with several chunks of 2048 rows and several
# blocks of SIMD lanes (one channel per lane), the last one partly filled.
CHANNELS_INNER = {"channels_last": ((8, 40, 24, 24), True), "NC_4100_rows": ((4100, 20), False)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CHANNELS_INNER))
def test_cpp_channels_inner_matches_reference(case, dtype):
    """Forward (output, mean, var, mass), eval output and every gradient.
    Float32, measured: at most 1.3e-6 of a tensor's largest entry (grad of
    weight, (4100, 20)); tolerance 5e-6."""
    shape, channels_last = CHANNELS_INNER[case]
    x = make_input(shape, dtype=dtype, channels_last=channels_last)
    assert x.stride(1) == 1
    params = make_mixture(shape[1], 3, dtype=dtype)
    grad_out = make_input(shape, dtype=dtype, seed=9, channels_last=channels_last)
    tol = 1e-10 if dtype == torch.float64 else 5e-6
    forward = backend("cpp").train(x, *params, 1e-5)
    for got, want in zip(forward, reference.uan_train(x.double(), *[p.double() for p in params], 1e-5)):
        assert rel_err(got, want) < tol
    for train in (True, False):
        got = gradients(backend("cpp"), x, params, grad_out, train)
        want = reference_gradients(x, params, grad_out, train)
        assert got[1].stride() == x.stride()
        for g, w in zip(got, want):
            assert rel_err(g, w) < tol


@pytest.mark.parametrize("case", list(CHANNELS_INNER))
def test_cpp_bitwise_equal_across_thread_counts(case):
    """Channels-inner input: the units (row chunk x channel block) are split
    over the threads, and each chunk's sums must still be added in one order."""
    shape, channels_last = CHANNELS_INNER[case]
    x = make_input(shape, dtype=torch.float32, channels_last=channels_last)
    params = make_mixture(shape[1], 3, dtype=torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, seed=3, channels_last=channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [*gradients(backend("cpp"), x, params, grad_out), *backend("cpp").train(x, *params, 1e-5)[1:]]
        torch.set_num_threads(2)
        multi = [*gradients(backend("cpp"), x, params, grad_out), *backend("cpp").train(x, *params, 1e-5)[1:]]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    sys.platform != "linux" or "OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's intra-op threads are OpenMP's only on Linux builds that say so",
)
def test_cpp_kernels_run_on_torch_threads():
    """at::parallel_for is inline: an extension compiled without OpenMP runs every
    pass on one thread whatever torch.set_num_threads says. Built with it, the
    extension imports the OpenMP runtime's parallel-region entry point."""
    import uan_kernels._C as extension

    with open(extension.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()


@pytest.mark.parametrize("name", FUSED)
def test_values_far_from_every_component_stay_finite(name):
    x = make_input((4, 3, 5, 5), dtype=torch.float32) + torch.tensor([1e4, -1e4, 3e4]).view(1, 3, 1, 1)
    params = make_mixture(3, 3, dtype=torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, seed=3)
    for train in (True, False):
        for t in gradients(backend(name), x, params, grad_out, train):
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", FUSED)
def test_large_mean_small_spread_is_accurate(name):
    """|mean| >> std in float32, with the components on the data (every one
    holds a share of the mass, so the sums of each are exercised): the
    statistics must not cancel catastrophically. Measured (error over the
    largest entry; for var, the largest error relative to each entry): mass
    6e-8, mean 4.3e-8 (a float32 mean near 1e4 is rounded by up to 4.9e-8),
    var 9.8e-8 (cpp) and 7e-8 (triton)."""
    x = (make_input((16, 2, 32, 32), dtype=torch.float64) + 1e4).float()
    params = make_mixture(2, 3, dtype=torch.float32)
    with torch.no_grad():
        params[0] += 1e4
    _, mean, var, mass = backend(name).train(x, *params, 1e-5)
    _, want_mean, want_var, want_mass = reference.uan_train(x.double(), *[p.double() for p in params])
    assert (want_mass / want_mass.sum(0) > 0.2).all()
    assert rel_err(mass, want_mass) < 3e-7
    assert rel_err(mean, want_mean) < 1.5e-7
    assert ((var.double() - want_var) / want_var).abs().max() < 5e-7


def test_cpp_hundred_million_values_per_channel():
    """1e8 float32 values in one channel, offset from zero: mean and variance
    stay accurate (pivot-shifted partial sums flushed to float64)."""
    n = 10**8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 1, n // 100, generator=g).add_(1e3)
    mu = torch.zeros(1, 1)
    _, mean, var, mass = backend("cpp").train(x, mu, torch.zeros(1, 1), torch.zeros(1), None, None, 1e-5)
    flat = x.view(-1)
    want_mean = torch.stack([c.double().sum() for c in flat.split(10**7)]).sum() / n
    want_var = torch.stack([((c.double() - want_mean) ** 2).sum() for c in flat.split(10**7)]).sum() / n
    assert mass.item() == pytest.approx(n, rel=1e-7)
    assert mean.item() == pytest.approx(want_mean.item(), rel=1e-7)
    assert var.item() == pytest.approx(want_var.item(), rel=1e-5)
