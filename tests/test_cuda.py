"""CUDA kernels of uan_kernels._C (csrc/cuda) on a GPU.

Against the pure-PyTorch reference, autograd, the dispatcher (opcheck,
torch.compile with CUDA graphs), determinism and a tensor of more than 2**31
elements. Skipped as a module where no CUDA device is visible. Where one is, an
extension built without CUDA kernels fails the module (set
UAN_ALLOW_MISSING_CUDA_KERNELS=1 to skip instead).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import uan_kernels  # noqa: E402
from uan_kernels import _backends, ops, reference  # noqa: E402

if not ops.has_kernel("cuda"):
    # A GPU is here and torch has CUDA: an extension without CUDA kernels is a
    # broken build (nvcc missing at install time), not a reason to test nothing.
    if os.environ.get("UAN_ALLOW_MISSING_CUDA_KERNELS", "0") in ("", "0"):
        raise RuntimeError("uan_kernels._C was built without CUDA kernels on a machine with a CUDA GPU: rebuild "
                           "with nvcc available, or set UAN_ALLOW_MISSING_CUDA_KERNELS=1 to skip these tests")
    pytest.skip("uan_kernels._C was built without CUDA kernels (UAN_ALLOW_MISSING_CUDA_KERNELS=1)",
                allow_module_level=True)

import checks  # noqa: E402
from conftest import assert_compiled_training_matches_eager, make_input, make_mixture  # noqa: E402

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
EPS = 1e-5

# Input layouts, chosen to reach every path of the kernels: channel-major rows
# whose length allows 16-byte accesses in every dtype ("NCHW") or in none
# ("NCHW_odd"), channels-inner tiles narrower and wider than a warp, and
# every rank.
LAYOUTS = {
    "NCHW": ((6, 5, 8, 12), False),
    "NCHW_odd": ((5, 5, 9, 11), False),
    "channels_last": ((4, 5, 6, 7), True),
    "channels_last_wide": ((3, 37, 5, 6), True),
    "NC": ((64, 6), False),
    "NCL": ((4, 3, 50), False),
    "NCDHW": ((2, 3, 3, 4, 5), False),
    "channels_last_3d": ((2, 3, 3, 4, 5), True),
}
COMPONENTS = [1, 3, 16]


def rel_err(actual, expected):
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def rms_rel_err(actual, expected):
    """Root-mean-square error over the root-mean-square of ``expected``."""
    diff = actual.double() - expected.double()
    return (diff.pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt()).item()


def cuda_input(layout, dtype, seed=1):
    shape, channels_last = LAYOUTS[layout]
    return make_input(shape, dtype=dtype, device=CUDA, seed=seed, channels_last=channels_last)


def cuda_mixture(channels, components, dtype, seed=0):
    return make_mixture(channels, components, dtype=dtype, device=CUDA, seed=seed)


def eval_stats(channels, components, dtype):
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(components, channels, generator=g, dtype=torch.float64) * 0.5
    var = torch.rand(components, channels, generator=g, dtype=torch.float64) + 0.5
    return mean.to(CUDA, dtype), var.to(CUDA, dtype)


def double(tensors):
    return [None if t is None else t.double() for t in tensors]


def expected_format(x):
    if x.dim() in (4, 5) and not x.is_contiguous():
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("components", COMPONENTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_forward_matches_reference(layout, components, dtype, tol):
    x = cuda_input(layout, dtype)
    params = cuda_mixture(x.shape[1], components, dtype)
    actual = ops.train_forward(x, *params, EPS)
    expected = reference.uan_train(x.double(), *double(params), EPS)
    assert actual[0].dtype == dtype and actual[0].device.type == CUDA.type
    assert actual[0].is_contiguous(memory_format=expected_format(x))
    for got, want in zip(actual, expected):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("components", COMPONENTS)
@pytest.mark.parametrize("layout", ["NCHW", "NCHW_odd", "channels_last", "NC"])
def test_eval_forward_matches_reference(layout, components, dtype, tol):
    x = cuda_input(layout, dtype)
    mu, log_sigma, mix_logits, weight, bias = cuda_mixture(x.shape[1], components, dtype)
    mean, var = eval_stats(x.shape[1], components, dtype)
    actual = ops.eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, EPS)
    expected = reference.uan_eval(x.double(), *double([mu, log_sigma, mix_logits, mean, var, weight, bias]), EPS)
    assert actual.is_contiguous(memory_format=expected_format(x))
    assert rel_err(actual, expected) < tol


def gradients(forward, x, params, grad_out, train, frozen_mixture=False):
    """Output and gradients with respect to x and every parameter that requires one."""
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_(not (frozen_mixture and i < 3)) for i, p in enumerate(params)]
    if train:
        out = forward.train(x, *params, EPS)[0]
    else:
        mean, var = eval_stats(x.shape[1], params[0].shape[0], params[0].dtype)
        out = forward.eval(x, *params[:3], mean, var, *params[3:], EPS)
    inputs = [x] + [p for p in params if p.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


class Fused:
    train = staticmethod(ops.train_forward)
    eval = staticmethod(ops.eval_forward)


class Reference:
    train = staticmethod(reference.uan_train)
    eval = staticmethod(reference.uan_eval)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("frozen_mixture", [False, True], ids=["weight", "moving_average"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("components", COMPONENTS)
@pytest.mark.parametrize("layout", ["NCHW", "NCHW_odd", "channels_last", "NC"])
def test_gradients_match_reference(layout, components, train, frozen_mixture, dtype, tol):
    x = cuda_input(layout, dtype)
    params = cuda_mixture(x.shape[1], components, dtype)
    grad_out = cuda_input(layout, dtype, seed=9)
    got = gradients(Fused, x, params, grad_out, train, frozen_mixture)
    want = gradients(Reference, x.double(), double(params), grad_out.double(), train, frozen_mixture)
    assert got[1].is_contiguous(memory_format=expected_format(x))
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("components", COMPONENTS)
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_reduced_precision_error_within_twice_batchnorm(layout, components, train, dtype):
    """Output of a float16/bfloat16 input against the float32 reference on the
    same rounded data. Both this error and BatchNorm's own error in that dtype
    are measured as RMS error over RMS output, a statistic that does not hinge
    on where the largest output falls within its binade."""
    x = (make_input((16, 8, 12, 12), device=CUDA, channels_last=layout == "channels_last") * 2 + 0.5).to(dtype)
    mu, log_sigma, mix_logits, weight, bias = cuda_mixture(8, components, torch.float32)
    if train:
        out, mean, var, mass = ops.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)
        want, want_mean, want_var, want_mass = reference.uan_train(
            x.float(), mu, log_sigma, mix_logits, weight, bias, EPS)
        for got_stat, want_stat in ((mean, want_mean), (var, want_var), (mass, want_mass)):
            assert got_stat.dtype == torch.float32
            assert rel_err(got_stat, want_stat) < 1e-5
    else:
        mean, var = eval_stats(8, components, torch.float32)
        out = ops.eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, EPS)
        want = reference.uan_eval(x.float(), mu, log_sigma, mix_logits, mean, var, weight, bias, EPS)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_format(x))
    bn = F.batch_norm(x, None, None, weight, bias, training=True)  # float32 affine parameters, as under AMP
    bn_want = F.batch_norm(x.float(), None, None, weight, bias, training=True)
    assert rms_rel_err(out, want) <= 2 * rms_rel_err(bn, bn_want)


@pytest.mark.parametrize("mode", ["update_weight", "moving_average", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_gradcheck(mode, channels_last):
    x = make_input((3, 2, 3, 4), device=CUDA, channels_last=channels_last, requires_grad=True)
    mu, log_sigma, mix_logits, weight, bias = make_mixture(2, 3, device=CUDA, requires_grad=True)
    if mode == "moving_average":
        for t in (mu, log_sigma, mix_logits):
            t.requires_grad_(False)
    mean, var = eval_stats(2, 3, torch.float64)

    def fn(x, mu, log_sigma, mix_logits, weight, bias):
        if mode == "eval":
            return ops.eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, EPS)
        return ops.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)[0]

    assert torch.autograd.gradcheck(fn, (x, mu, log_sigma, mix_logits, weight, bias))


def op_args(dtype=torch.float64, channels_last=False, requires_grad=False, shape=(3, 4, 5, 2)):
    x = make_input(shape, dtype=dtype, device=CUDA, channels_last=channels_last, requires_grad=requires_grad)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = make_mixture(shape[1], 3, dtype=param_dtype, device=CUDA, requires_grad=requires_grad)
    return x, params


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_forward(dtype, requires_grad):
    x, (mu, log_sigma, mix_logits, weight, bias) = op_args(dtype, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.uan.forward.default, (x, mu, log_sigma, mix_logits, weight, bias, EPS))
    torch.library.opcheck(torch.ops.uan.forward.default, (x, mu, log_sigma, mix_logits, None, None, EPS))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_forward_stats(channels_last, requires_grad):
    x, (mu, log_sigma, mix_logits, weight, bias) = op_args(channels_last=channels_last, requires_grad=requires_grad)
    mean, var = eval_stats(4, 3, torch.float64)
    torch.library.opcheck(torch.ops.uan.forward.stats, (x, mu, log_sigma, mix_logits, mean, var, weight, bias, EPS))


@pytest.mark.parametrize("mixture_grads", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_backward(training, mixture_grads):
    x, (mu, log_sigma, mix_logits, weight, _) = op_args()
    _, mean, var, mass = ops.train_forward(x, mu, log_sigma, mix_logits, weight)
    grad = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.uan.backward.default,
        (grad, x, mu, log_sigma, mix_logits, weight, mean, var, mass if training else None, EPS, mixture_grads),
    )


def test_empty_batch_matches_cpu():
    x, (mu, log_sigma, mix_logits, weight, bias) = op_args(shape=(0, 4, 3))
    got = ops.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)
    want = ops.train_forward(*[t.cpu() for t in (x, mu, log_sigma, mix_logits, weight, bias)], EPS)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.cpu(), w, equal_nan=True)


def small_cnn(update):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), uan_kernels.UAN(8, 3, update=update, backend="cpp"),
                         nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).to(CUDA)


@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_compile_reduce_overhead_training_matches_eager(update):
    model = small_cnn(update)
    # Inductor sums the convolutions' gradients in another order than eager.
    assert_compiled_training_matches_eager(model, torch.randn(4, 3, 12, 12, device=CUDA), grad_rtol=1e-4,
                                           grad_atol=1e-5, mode="reduce-overhead", fullgraph=True)


def test_compile_reduce_overhead_inference_replays_cuda_graph():
    model = small_cnn("weight")
    model(torch.randn(8, 3, 12, 12, device=CUDA))  # non-trivial running statistics
    model.eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for seed in range(4):  # the first calls record; later ones replay the graph on new data
            x = torch.randn(4, 3, 12, 12, device=CUDA, generator=torch.Generator(CUDA).manual_seed(seed))
            out = compiled(x).clone()
            torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_deterministic(channels_last, dtype):
    """Bitwise equal results twice, on a shape whose channels span many blocks."""
    x = make_input((32, 16, 36, 36), dtype=dtype, device=CUDA, channels_last=channels_last)
    params = cuda_mixture(16, 3, torch.float32)
    grad_out = make_input(x.shape, dtype=dtype, device=CUDA, seed=3, channels_last=channels_last)
    first = gradients(Fused, x, params, grad_out, train=True)
    second = gradients(Fused, x, params, grad_out, train=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(ops.train_forward(x, *params, EPS)[1], ops.train_forward(x, *params, EPS)[1])


def test_large_mean_small_spread_is_accurate():
    """|mean| >> std: the pivot-shifted float32 sums must not cancel. The
    components sit on the data, so that every one holds mass. Tolerances: a
    few times the errors of the C++ and Triton kernels on CPU (mass 6e-8, mean
    4.3e-8, var 1e-7), which do the same float32 arithmetic; a float32 mean
    near 1e4 is itself rounded by up to 4.9e-8."""
    x = (make_input((16, 2, 32, 32), device=CUDA) + 1e4).float()
    params = cuda_mixture(2, 3, torch.float32)
    with torch.no_grad():
        params[0] += 1e4
    _, mean, var, mass = ops.train_forward(x, *params, EPS)
    _, want_mean, want_var, want_mass = reference.uan_train(x.double(), *double(params), EPS)
    assert (want_mass / want_mass.sum(0) > 0.2).all()
    assert rel_err(mass, want_mass) < 1e-6
    assert rel_err(mean, want_mean) < 1.5e-7
    assert ((var.double() - want_var) / want_var).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_float32_far_from_the_mixture(name):
    """checks.check_far_from_the_mixture (its bound explained there; on CPU in test_conditioning.py)."""
    if name not in fused_backends():
        pytest.skip(f"Triton cannot run here: {_backends.unavailable_reason('triton', CUDA)}")
    checks.check_far_from_the_mixture(_backends.resolve(name, CUDA).train, CUDA)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_float32_tight_clusters_far_apart(name):
    """checks.check_tight_clusters: each component's sums about a value of its own cluster."""
    if name not in fused_backends():
        pytest.skip(f"Triton cannot run here: {_backends.unavailable_reason('triton', CUDA)}")
    checks.check_tight_clusters(_backends.resolve(name, CUDA).train, CUDA)


def test_values_far_from_every_component_stay_finite():
    x = make_input((4, 3, 5, 5), dtype=torch.float32, device=CUDA)
    x = x + torch.tensor([1e4, -1e4, 3e4], device=CUDA).view(1, 3, 1, 1)
    params = cuda_mixture(3, 3, torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, device=CUDA, seed=3)
    for train in (True, False):
        for t in gradients(Fused, x, params, grad_out, train):
            assert torch.isfinite(t).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_matches_first():
    results = []
    for device in ("cuda:0", "cuda:1"):
        x = make_input((4, 5, 6, 7), dtype=torch.float32, device=device)
        params = make_mixture(5, 3, dtype=torch.float32, device=device)
        results.append([t.cpu() for t in ops.train_forward(x, *params, EPS)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def chunked_statistics(x, mu, log_sigma, mix_logits, chunk=2**25):
    """Float64 (K, C) mass, mean and biased variance of a (N, C, L) tensor, in
    two passes over chunks of one channel's rows so that memory stays bounded."""
    N, C, L = x.shape
    mass, mean, var = torch.zeros(3, mu.shape[0], C, dtype=torch.float64, device=x.device)

    def pieces(c):
        for n in range(N):
            for start in range(0, L, chunk):
                values = x[n, c, start:start + chunk].double()
                tau = reference.responsibilities(values.view(1, 1, -1), mu[:, c:c + 1].double(),
                                                 log_sigma[:, c:c + 1].double(), mix_logits.double())
                yield values, tau.view(mu.shape[0], -1)

    for c in range(C):
        for values, tau in pieces(c):
            mass[:, c] += tau.sum(1)
            mean[:, c] += tau @ values
        mean[:, c] /= mass[:, c]
        for values, tau in pieces(c):
            centered = values.unsqueeze(0) - mean[:, c].unsqueeze(1)
            var[:, c] += (tau * centered * centered).sum(1)
        var[:, c] /= mass[:, c]
    return mass, mean, var


@pytest.mark.slow
def test_bfloat16_beyond_two_to_the_31_elements():
    """A bfloat16 tensor of 2**31 + 2**20 elements: 64-bit indexing throughout,
    statistics against float64 sums taken in chunks, and outputs at both ends
    and past element 2**31."""
    N, C = 2, 4
    L = (2**31 + 2**20) // (N * C)
    bytes_needed = 2 * N * C * L * 2 + 6 * 2**30  # input, output, reference chunks
    if torch.cuda.mem_get_info()[0] < bytes_needed:
        pytest.skip(f"needs {bytes_needed / 2**30:.0f} GiB of free GPU memory")
    g = torch.Generator(CUDA).manual_seed(0)
    x = torch.randn(N, C, L, device=CUDA, dtype=torch.bfloat16, generator=g)
    x += torch.arange(C, device=CUDA, dtype=torch.bfloat16).view(1, C, 1) * 3
    assert x.numel() > 2**31
    mu, log_sigma, mix_logits, _, _ = cuda_mixture(C, 3, torch.float32)
    mu = mu + torch.arange(C, device=CUDA).view(1, C) * 3
    out, mean, var, mass = ops.train_forward(x, mu, log_sigma, mix_logits, None, None, EPS)

    want_mass, want_mean, want_var = chunked_statistics(x, mu, log_sigma, mix_logits)
    torch.testing.assert_close(mass.double(), want_mass, rtol=1e-5, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=0)
    assert ((mean.double() - want_mean).abs() <= 1e-5 * want_var.sqrt()).all()

    span = 2**20
    for n, c, start in ((0, 0, 0), (N - 1, C - 1, L - span), (N // 2, C // 2, L // 2)):
        piece = x[n, c, start:start + span].view(1, 1, span)
        want = reference.uan_eval(piece, mu[:, c:c + 1], log_sigma[:, c:c + 1], mix_logits,
                                  want_mean[:, c:c + 1].float(), want_var[:, c:c + 1].float(), eps=EPS)
        got = out[n, c, start:start + span].view(1, 1, span)
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)


def free_gpu_bytes():
    return torch.cuda.mem_get_info()[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["NCL", "channels_last"])
def test_bfloat16_training_step_beyond_two_to_the_31_elements(layout):
    """Forward and backward of a bfloat16 input of 2**31 + 2**20 elements, and
    of a channels_last one: 1366 copies of a block along L (NCL) or N
    (channels_last), so that the output and grad_input are copies of the
    block's and the parameter gradients 1366 times the block's, all checked
    against the float64 reference on one block (tests/checks.py; the same
    check runs on CPU in test_checks.py, where its tolerances were measured).
    Every copy is compared, including those past element 2**31."""
    repeats = 1366
    if layout == "NCL":
        block_shape, dim, fmt = (2, 4, 3 * 2**16), 2, torch.contiguous_format
    else:
        block_shape, dim, fmt = (1, 16, 96, 1024), 0, torch.channels_last
    numel = repeats * math.prod(block_shape)
    assert numel > 2**31
    bytes_needed = 4 * 2 * numel + 6 * 2**30  # input, grad_output, output, grad_input; compare chunks
    if free_gpu_bytes() < bytes_needed:
        pytest.skip(f"needs {bytes_needed / 2**30:.0f} GiB of free GPU memory")
    channels = block_shape[1]
    offsets = (torch.arange(channels, dtype=torch.float64) * 3).view(1, channels, *[1] * (len(block_shape) - 2))
    block = (make_input(block_shape, device=CUDA) + offsets.to(CUDA)).to(torch.bfloat16)
    grad_block = make_input(block_shape, device=CUDA, seed=2).to(torch.bfloat16)
    mu, log_sigma, mix_logits, weight, bias = cuda_mixture(channels, 3, torch.float32)
    mu = mu + offsets.view(1, channels).to(CUDA, torch.float32)
    checks.check_periodic_training_step(ops.train_forward, block, grad_block, [mu, log_sigma, mix_logits, weight, bias],
                                        repeats=repeats, dim=dim, memory_format=fmt)
    torch.cuda.empty_cache()


# Tolerances of the checks below, as error over a tensor's largest entry: those
# measured on CPU for the same checks (test_checks.py: float32 at most 4e-6,
# bfloat16 2.4e-3, the rounding of output and grad_input), with a margin for
# the other order of summation on the GPU.
CHECK_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("misaligned", ["input", "grad_output", "both"])
def test_misaligned_storage_offset_takes_the_scalar_path(misaligned, dtype):
    """Rows whose length allows 16-byte accesses, but data that starts one
    element into its storage: the kernels must fall back to scalar loads."""
    x = make_input((6, 5, 8, 12), dtype=dtype, device=CUDA)
    grad_out = make_input(x.shape, dtype=dtype, device=CUDA, seed=9)
    if misaligned in ("input", "both"):
        x = checks.misaligned_copy(x)
        assert x.data_ptr() % 16 != 0
    if misaligned in ("grad_output", "both"):
        grad_out = checks.misaligned_copy(grad_out)
        assert grad_out.data_ptr() % 16 != 0
    params = cuda_mixture(5, 3, torch.float64 if dtype == torch.float64 else torch.float32)
    checks.check_against_reference(ops.train_forward, x, params, grad_out, CHECK_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("x_layout,grad_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                                  ("contiguous", "sliced"), ("channels_last", "expanded")])
def test_grad_output_in_another_layout(x_layout, grad_layout, dtype):
    x = make_input((4, 5, 8, 12), dtype=dtype, device=CUDA, channels_last=x_layout == "channels_last")
    grad_out = make_input(x.shape, dtype=dtype, device=CUDA, seed=9)
    if grad_layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    elif grad_layout == "sliced":
        grad_out = make_input((4, 5, 8, 24), dtype=dtype, device=CUDA, seed=9)[..., ::2]
    else:  # stride 0 along N
        grad_out = grad_out[:1].expand(x.shape)
    params = cuda_mixture(5, 3, torch.float32)
    checks.check_against_reference(ops.train_forward, x, params, grad_out, CHECK_TOL[dtype])


def fused_backends():
    names = ["cpp"]
    if not _backends.unavailable_reason("triton", CUDA):
        names.append("triton")
    return names


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_non_default_stream(name):
    """Forward and backward on a side stream, behind ~50 ms of GPU sleep and
    the copies that write the input: a kernel launched on the default stream
    instead of the current one would run before the copies and read zeros."""
    if name not in fused_backends():
        pytest.skip(f"backend {name!r} cannot run here: {_backends.unavailable_reason(name, CUDA)}")
    impl = _backends.resolve(name, CUDA)
    src = make_input((8, 6, 32, 32), dtype=torch.float32, device=CUDA)
    grad_src = make_input(src.shape, dtype=torch.float32, device=CUDA, seed=9)
    params = cuda_mixture(6, 3, torch.float32)
    x, grad_out = torch.zeros_like(src), torch.zeros_like(src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    assert side != torch.cuda.current_stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(src)
        grad_out.copy_(grad_src)
        forward, grads = checks.train_and_grads(impl.train, x, params, grad_out)
    torch.cuda.synchronize()
    want_forward, want_grads = checks.reference_train_and_grads(src, params, grad_src)
    for got, want in zip(forward + grads, want_forward + want_grads):
        assert rel_err(got.cpu(), want) < CHECK_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("update", ["weight", "moving_average"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_module_training_step_matches_reference(update, dtype, channels_last):
    """UAN(backend="auto") on the GPU: one SGD step (output, parameter
    gradients, every parameter and buffer after it, an eval forward) against a
    float64 twin on the reference backend. Float32: 8.1e-6 measured on CPU
    (test_checks.py, contiguous), tolerance 3e-5."""
    checks.check_module_training_step(update, CUDA, dtype, tol=1e-10 if dtype == torch.float64 else 3e-5,
                                      channels_last=channels_last)


def test_auto_backend_on_cuda_is_the_cuda_kernels():
    assert _backends.resolve("auto", CUDA) is _backends._load("cpp")[0]
    assert uan_kernels.available_backends("cuda")[0] == "cpp"


@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_auto_backend_falls_back_to_triton_without_cuda_kernels(monkeypatch, update):
    """A build without CUDA kernels (has_kernel("cuda") False): backend="auto"
    runs the Triton kernels, and a training step still matches the reference."""
    if "triton" not in fused_backends():
        pytest.skip(f"Triton cannot run here: {_backends.unavailable_reason('triton', CUDA)}")
    monkeypatch.setitem(ops._KERNEL_DEVICES, "cuda", False)
    triton_backend = _backends._load("triton")[0]
    assert _backends.resolve("auto", CUDA) is triton_backend
    calls = []
    for fn in ("train", "eval"):
        original = getattr(triton_backend, fn)
        monkeypatch.setattr(triton_backend, fn, lambda *a, _f=original, _n=fn: calls.append(_n) or _f(*a))
    checks.check_module_training_step(update, CUDA, torch.float32, tol=3e-5)
    assert calls == ["train", "eval"]


def test_auto_backend_falls_back_to_reference_with_a_warning(monkeypatch):
    monkeypatch.setitem(ops._KERNEL_DEVICES, "cuda", False)
    monkeypatch.setitem(_backends._loaded, "triton", (None, "ImportError: no triton"))
    with pytest.warns(UserWarning, match="slow reference"):
        checks.check_module_training_step("weight", CUDA, torch.float32, tol=3e-5)
