"""Fused backends (C++ and Triton) against the float64 reference.

Each test runs for every fused backend: "cpp" on CPU tensors, and "triton" on
CUDA tensors where a GPU is visible, else on CPU tensors under the Triton
interpreter (kept to small shapes: it is slow). Tensors are built on the CPU
and moved to the backend's device inside the call (differentiably), so every
test reads the same on either machine.
"""
import importlib.util
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
    bn = F.batch_norm(x, None, None, weight.to(dtype), bias.to(dtype), training=True)
    bn_want = F.batch_norm(x.float(), None, None, weight, bias, training=True)
    assert rel_err(out, want) <= 2 * rel_err(bn, bn_want)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("mode", ["update_weight", "moving_average", "eval"])
def test_gradcheck(name, mode):
    impl = backend(name)
    x = make_input((3, 2, 3, 2), requires_grad=True)
    mu, log_sigma, mix_logits, weight, bias = make_mixture(2, 3, requires_grad=True)
    if mode == "moving_average":
        for t in (mu, log_sigma, mix_logits):
            t.requires_grad_(False)
    mean, var = eval_stats(2, 3)

    def fn(x, mu, log_sigma, mix_logits, weight, bias):
        if mode == "eval":
            return impl.eval(x, mu, log_sigma, mix_logits, mean, var, weight, bias, 1e-5)
        return impl.train(x, mu, log_sigma, mix_logits, weight, bias, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, mu, log_sigma, mix_logits, weight, bias))


def gradients(impl, x, params, grad_out, train=True):
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    if train:
        out = impl.train(x, *params, 1e-5)[0]
    else:
        mean, var = eval_stats(x.shape[1], params[0].shape[0], params[0].dtype)
        out = impl.eval(x, *params[:3], mean, var, *params[3:], 1e-5)
    return [out.detach(), *torch.autograd.grad(out, [x, *params], grad_out)]


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("components", [1, 3, 16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_components_and_gradients_float32(name, components, train):
    x = make_input((4, 5, 6, 6), dtype=torch.float32)
    params = make_mixture(5, components, dtype=torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, seed=9)
    got = gradients(backend(name), x, params, grad_out, train)
    want = gradients(backend("reference"), x.double(), [p.double() for p in params], grad_out.double(), train)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-4


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_memory_formats(name, layout):
    base = make_input((4, 6, 5, 7), dtype=torch.float32)
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    else:
        x = make_input((4, 6, 5, 14), dtype=torch.float32)[..., ::2]
        base = x.contiguous()
    params = make_mixture(6, 3, dtype=torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, seed=3)
    got = gradients(backend(name), x, params, grad_out)
    want = gradients(backend(name), base, params, grad_out)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("name", FUSED)
def test_deterministic(name):
    x = make_input((6, 4, 9, 9), dtype=torch.float32)
    params = make_mixture(4, 3, dtype=torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, seed=3)
    first = gradients(backend(name), x, params, grad_out)
    second = gradients(backend(name), x, params, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpp_bitwise_equal_across_thread_counts():
    x = make_input((8, 6, 16, 16), dtype=torch.float32)
    params = make_mixture(6, 3, dtype=torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = gradients(backend("cpp"), x, params, grad_out)
        torch.set_num_threads(max(2, threads))
        multi = gradients(backend("cpp"), x, params, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


# The C++ channels-inner path: channels_last input (blocks of 16 channels as
# SIMD lanes) and (N, C) input longer than one 2048-row chunk.
CHANNELS_INNER_CASES = {"channels_last": ((8, 40, 24, 24), True), "rows": ((4100, 20), False)}


# float32: at most 1.3e-6 measured (max error over a tensor / its largest entry).
@pytest.mark.parametrize("case", sorted(CHANNELS_INNER_CASES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cpp_channels_inner_path_matches_reference(case, train, dtype, tol):
    shape, channels_last = CHANNELS_INNER_CASES[case]
    x = make_input(shape, dtype=dtype, channels_last=channels_last)
    params = make_mixture(shape[1], 3, dtype=dtype)
    grad_out = make_input(shape, dtype=dtype, seed=4, channels_last=channels_last)
    got = gradients(backend("cpp"), x, params, grad_out, train)
    want = gradients(backend("reference"), x.double(), [p.double() for p in params], grad_out.double(), train)
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert rel_err(g, w) < tol


def test_cpp_channels_last_bitwise_equal_across_thread_counts():
    shape, _ = CHANNELS_INNER_CASES["channels_last"]
    x = make_input(shape, dtype=torch.float32, channels_last=True)
    params = make_mixture(shape[1], 3, dtype=torch.float32)
    grad_out = make_input(shape, dtype=torch.float32, seed=3, channels_last=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = gradients(backend("cpp"), x, params, grad_out)
        torch.set_num_threads(max(2, threads))
        multi = gradients(backend("cpp"), x, params, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


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
    """|mean| >> std: float32 statistics must not cancel catastrophically."""
    x = make_input((16, 2, 32, 32), dtype=torch.float64) + 1e4
    params = make_mixture(2, 3, dtype=torch.float32)
    _, mean, var, _ = backend(name).train(x.float(), *params, 1e-5)
    _, want_mean, want_var, _ = reference.uan_train(x.float().double(), *[p.double() for p in params])
    assert rel_err(mean, want_mean) < 1e-6
    assert rel_err(var, want_var) < 1e-3


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
