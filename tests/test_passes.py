"""The operators per pass of the C++ and Triton backends (what SyncUAN runs with collectives between them).

statistics -> statistics_finalize -> normalize, and backward_reduce ->
backward_elementwise. The sums of the statistics pass are about the component
means ``mu`` and those of the reduce pass about the batch means, so that the
sums of several batches add: they are checked against the float64 reference,
across dtypes and layouts, for additivity over a split batch, and, with the
other passes, against the fused operators and against autograd of the
reference on the concatenated batch (a batch split in parts, each part's
passes run with the sums of all the parts, is the whole batch). Each backend
runs on every device it supports here (the C++ operators on CPU, and on CUDA
in a CUDA build with a GPU; Triton on the GPU, or on CPU under the
interpreter, which is slow: shapes are small).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from conftest import SHAPES, make_input, make_mixture  # noqa: E402
from uan_kernels import ops, reference  # noqa: E402

pytest.importorskip("triton", reason="the Triton backend needs the triton package")
from uan_kernels import triton as uan_triton  # noqa: E402

# Each backend's functions (the same names in both: statistics,
# statistics_finalize, normalize, backward_reduce, backward_elementwise, and
# the fused train_forward they must agree with), and the device they run on.
_MODULES = {"cpp": ops, "triton": uan_triton}
_GPU = torch.cuda.is_available()
_CASES = [("cpp", "cpu")] + ([("cpp", "cuda")] if _GPU and ops.has_kernel("cuda") else []) + [
    ("triton", "cuda" if _GPU else "cpu")]
BACKENDS = {f"{name}-{device}": (_MODULES[name], torch.device(device)) for name, device in _CASES}
# The operators under each backend's functions.
OPERATORS = {
    "cpp": ("statistics", "statistics_finalize", "backward_reduce", "backward_elementwise"),
    "triton": ("triton_statistics", "triton_statistics_finalize", "triton_backward_reduce",
               "triton_backward_elementwise"),
}
K = 3
EPS = 1e-5


def operators(backend):
    return [getattr(torch.ops.uan, name).default for name in OPERATORS[backend.split("-")[0]]]


def reference_sums(x, mu, log_sigma, mix_logits):
    """(3, K, C) float64 sums about mu, from the reference's responsibilities (on the CPU)."""
    x, mu, log_sigma, mix_logits = (t.detach().to("cpu", torch.float64) for t in (x, mu, log_sigma, mix_logits))
    return reference.statistics_sums(x, reference.responsibilities(x, mu, log_sigma, mix_logits), mu)


def assert_rows_close(got, want, rtol):
    """Each row (quantity) to ``rtol`` of its largest magnitude, on the CPU."""
    assert got.dtype == torch.float64 and got.shape == want.shape and got.is_contiguous()
    got, want = got.cpu(), want.cpu()
    for q in range(got.shape[0]):
        torch.testing.assert_close(got[q], want[q], rtol=rtol, atol=rtol * want[q].abs().max().item())


def assert_close_to_scale(got, want, rtol):
    torch.testing.assert_close(got.cpu().to(want.dtype), want.cpu(), rtol=rtol,
                               atol=rtol * want.abs().max().item())


def inputs(shape, dtype=torch.float64, device="cpu", channels_last=False, offset=0.0, seed=1):
    """Input and mixture (float32 parameters for float32/16-bit input), the means shifted by ``offset`` too."""
    x = make_input(shape, dtype=torch.float64, channels_last=channels_last, seed=seed) + offset
    mu, log_sigma, mix_logits, weight, bias = make_mixture(shape[1], K)
    mu = mu + offset
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(device, dtype), [t.to(device, param_dtype) for t in (mu, log_sigma, mix_logits, weight, bias)]


# --------------------------------------------------------------------------- #
# statistics, statistics_finalize
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_statistics_match_the_reference_in_float64(backend, shape):
    passes, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs(SHAPES[shape], device=device)
    sums = passes.statistics(x, mu, log_sigma, mix_logits)
    assert_rows_close(sums, reference_sums(x, mu, log_sigma, mix_logits), 1e-10)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_float32_statistics_are_as_accurate_as_the_training_forward(backend, offset):
    """float32 input against the float64 reference on the same values, also with |mean| >> std
    (the kernels' sums are taken about a value of the channel, then moved to mu in float64)."""
    passes, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs((6, 4, 50), dtype=torch.float32, device=device, offset=offset)
    sums = passes.statistics(x, mu, log_sigma, mix_logits)
    assert_rows_close(sums, reference_sums(x, mu, log_sigma, mix_logits), 2e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape", ["NCHW", "NCDHW"])
def test_channels_last_gives_the_sums_of_contiguous_input(backend, shape):
    passes, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs(SHAPES[shape], device=device)
    x_cl = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    assert_rows_close(passes.statistics(x_cl, mu, log_sigma, mix_logits),
                      passes.statistics(x, mu, log_sigma, mix_logits), 1e-12)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_sums_of_two_half_batches_are_the_sums_of_the_batch(backend, dtype, rtol):
    passes, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs((6, 4, 30), dtype=dtype, device=device, offset=3.0)
    halves = (passes.statistics(x[:2], mu, log_sigma, mix_logits)
              + passes.statistics(x[2:], mu, log_sigma, mix_logits))
    assert_rows_close(halves, passes.statistics(x, mu, log_sigma, mix_logits), rtol)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_empty_input_gives_zero_sums(backend):
    passes, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs((0, 4, 5), device=device)
    sums = passes.statistics(x, mu, log_sigma, mix_logits)
    assert sums.shape == (3, K, 4) and sums.dtype == torch.float64
    assert torch.count_nonzero(sums) == 0


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_finalize_gives_the_training_forward_statistics(backend, dtype, rtol):
    passes, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, weight, bias) = inputs(SHAPES["NCHW"], dtype=dtype, device=device, offset=2.0)
    mean, var, mass = passes.statistics_finalize(passes.statistics(x, mu, log_sigma, mix_logits), mu)
    _, want_mean, want_var, want_mass = passes.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)
    for got, want in ((mean, want_mean), (var, want_var), (mass, want_mass)):
        assert got.dtype == mu.dtype and got.shape == mu.shape
        assert_close_to_scale(got, want, rtol)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_finalize_of_an_empty_component_gives_zero_statistics(backend):
    """S = 0: mean = var = 0, as the training forward's 0 / (0 + 1e-12)."""
    passes, device = BACKENDS[backend]
    mu = torch.randn(K, 4, dtype=torch.float64, device=device)
    mean, var, mass = passes.statistics_finalize(torch.zeros(3, K, 4, dtype=torch.float64, device=device), mu)
    assert torch.count_nonzero(torch.stack([mean, var, mass])) == 0


# --------------------------------------------------------------------------- #
# backward_reduce, backward_elementwise, and the whole step
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape", ["NCL", "NCHW"])
def test_backward_reduce_matches_the_reference_in_float64(backend, shape):
    passes, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, weight, bias) = inputs(SHAPES[shape], device=device, offset=1.0)
    grad = make_input(x.shape, seed=7).to(device)
    _, mean, _, _ = passes.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)
    sums = passes.backward_reduce(grad, x, mu, log_sigma, mix_logits, mean)
    x64, g64, mean64 = x.cpu(), grad.cpu(), mean.cpu()
    tau = reference.responsibilities(x64, *(t.cpu() for t in (mu, log_sigma, mix_logits)))
    dims = (1,) + tuple(range(3, x.dim() + 1))
    g_tau = g64.unsqueeze(0) * tau
    centered = x64.unsqueeze(0) - mean64.reshape(K, 1, -1, *([1] * (x.dim() - 2)))
    want = torch.cat([g_tau.sum(dims), (g_tau * centered).sum(dims), g64.sum([0, *range(2, x.dim())])[None]])
    assert sums.shape == (2 * K + 1, x.shape[1])
    assert_rows_close(sums, want, 1e-10)


def split_batch_step(passes, parts, grads, params, mixture_grads=True):
    """One training step of the passes on a batch split in ``parts``, the sums of all parts shared
    (what SyncUAN does with one part per process): each part's output and gradients."""
    mu, log_sigma, mix_logits, weight, bias = params
    sums = sum(passes.statistics(x, mu, log_sigma, mix_logits) for x in parts)
    mean, var, mass = passes.statistics_finalize(sums, mu)
    outs = [passes.normalize(x, mu, log_sigma, mix_logits, mean, var, weight, bias, EPS) for x in parts]
    local = [passes.backward_reduce(g, x, mu, log_sigma, mix_logits, mean) for g, x in zip(grads, parts)]
    total = sum(local)
    part_grads = [passes.backward_elementwise(g, x, mu, log_sigma, mix_logits, weight, mean, var, mass, total,
                                              own, EPS, mixture_grads)
                  for g, x, own in zip(grads, parts, local)]
    return outs, part_grads, (mean, var, mass)


def whole_batch_step(x, grad, params):
    """Output, statistics and gradients (x, mu, log_sigma, mix_logits, weight, bias) of the float64 reference."""
    x = x.detach().cpu().double().requires_grad_()
    params = [p.detach().cpu().double().requires_grad_() for p in params]
    out, mean, var, mass = reference.uan_train(x, *params, EPS)
    grads = torch.autograd.grad(out, [x, *params], grad.cpu().double())
    return out.detach(), grads, (mean, var, mass)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("split", [(1, 3), (2, 2), (0, 4)], ids=["uneven", "even", "empty_part"])
def test_passes_on_a_split_batch_give_the_whole_batch_step(backend, split):
    """Parts' outputs and input gradients are the whole batch's, the parts' parameter gradients add up to
    the whole batch's (float64, 1e-10)."""
    passes, device = BACKENDS[backend]
    x, params = inputs((4, 3, 5, 2), device=device, offset=0.5)
    grad = make_input(x.shape, seed=7).to(device)
    parts, grads = x.split(list(split)), grad.split(list(split))
    outs, part_grads, stats = split_batch_step(passes, parts, grads, params)
    want_out, want_grads, want_stats = whole_batch_step(x, grad, params)
    for got, want in zip(stats, want_stats):
        assert_close_to_scale(got, want, 1e-10)
    assert_close_to_scale(torch.cat(outs), want_out, 1e-10)
    assert_close_to_scale(torch.cat([g[0] for g in part_grads]), want_grads[0], 1e-10)
    for i in range(1, 6):
        assert_close_to_scale(sum(g[i] for g in part_grads), want_grads[i], 1e-10)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mixture_grads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_passes_on_one_batch_are_the_fused_training_step(backend, mixture_grads, dtype):
    """With one part, the passes give what the fused forward and backward give (same kernels' math)."""
    passes, device = BACKENDS[backend]
    x, params = inputs(SHAPES["NCHW"], dtype=dtype, device=device, offset=0.5)
    grad = make_input(x.shape, seed=7).to(device, dtype)
    (out,), (got,), _ = split_batch_step(passes, [x], [grad], params, mixture_grads)
    mu, log_sigma, mix_logits, weight, bias = (p.detach().requires_grad_(i >= 3 or mixture_grads)
                                               for i, p in enumerate(params))
    x_req = x.detach().requires_grad_()
    fused = passes.train_forward(x_req, mu, log_sigma, mix_logits, weight, bias, EPS)[0]
    wrt = [x_req, mu, log_sigma, mix_logits, weight, bias]
    want = torch.autograd.grad(fused, [t for t in wrt if t.requires_grad], grad)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_to_scale(out, fused.detach(), rtol)
    want = iter(want)
    for g, t in zip(got, wrt):
        if t.requires_grad:
            assert_close_to_scale(g, next(want), rtol)
        else:
            assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_opcheck_operators_per_pass(backend):
    passes, device = BACKENDS[backend]
    statistics_op, finalize_op, reduce_op, elementwise_op = operators(backend)
    x, (mu, log_sigma, mix_logits, weight, bias) = inputs(SHAPES["NCHW"], device=device)
    torch.library.opcheck(statistics_op, (x, mu, log_sigma, mix_logits))
    torch.library.opcheck(statistics_op, (x.to(memory_format=torch.channels_last).bfloat16(), mu.float(),
                                          log_sigma.float(), mix_logits.float()))
    torch.library.opcheck(statistics_op, (x[:0], mu, log_sigma, mix_logits))
    sums = passes.statistics(x, mu, log_sigma, mix_logits)
    torch.library.opcheck(finalize_op, (sums, mu))
    torch.library.opcheck(finalize_op, (sums, mu.float()))
    mean, var, mass = passes.statistics_finalize(sums, mu)
    grad = torch.randn_like(x)
    torch.library.opcheck(reduce_op, (grad, x, mu, log_sigma, mix_logits, mean))
    torch.library.opcheck(reduce_op, (grad[:0], x[:0], mu, log_sigma, mix_logits, mean))
    reduced = passes.backward_reduce(grad, x, mu, log_sigma, mix_logits, mean)
    for mixture_grads in (True, False):
        torch.library.opcheck(elementwise_op, (grad, x, mu, log_sigma, mix_logits, weight, mean, var, mass, reduced,
                                               reduced, EPS, mixture_grads))
    torch.library.opcheck(elementwise_op, (grad[:0], x[:0], mu, log_sigma, mix_logits, None, mean, var, mass,
                                           reduced, torch.zeros_like(reduced), EPS, True))


# --------------------------------------------------------------------------- #
# Bad arguments
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda mu, s: (s.float(), mu), "sums must be float64"),
        (lambda mu, s: (s[:2], mu), "sums must have shape"),
        (lambda mu, s: (s, mu[:2]), "sums must have shape"),
        (lambda mu, s: (s, mu.unsqueeze(0)), "mu must have shape"),
        (lambda mu, s: (s, mu.half()), "mu must be float32 or float64"),
    ],
)
def test_cpp_finalize_rejects_bad_arguments(args, message):
    x, (mu, log_sigma, mix_logits, _, _) = inputs(SHAPES["NCL"])
    sums = ops.statistics(x, mu, log_sigma, mix_logits)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uan.statistics_finalize(*args(mu, sums))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(x=a["x"][:, :2]), "channels"),
        (lambda a: a.update(x=a["x"].int()), "input must be float16"),
        (lambda a: a.update(mu=a["mu"].float()), "dtype"),
        (lambda a: a.update(mix_logits=a["mix_logits"][:2]), "mix_logits must have shape"),
    ],
)
def test_cpp_statistics_rejects_bad_arguments(mutate, message):
    x, (mu, log_sigma, mix_logits, _, _) = inputs(SHAPES["NCL"])
    args = dict(x=x, mu=mu, log_sigma=log_sigma, mix_logits=mix_logits)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uan.statistics(*args.values())


def backward_arguments():
    x, (mu, log_sigma, mix_logits, weight, _) = inputs(SHAPES["NCL"])
    grad = torch.randn_like(x)
    mean, var, mass = ops.statistics_finalize(ops.statistics(x, mu, log_sigma, mix_logits), mu)
    sums = ops.backward_reduce(grad, x, mu, log_sigma, mix_logits, mean)
    return dict(grad=grad, x=x, mu=mu, log_sigma=log_sigma, mix_logits=mix_logits, weight=weight, mean=mean,
                var=var, mass=mass, sums=sums, local_sums=sums, eps=EPS, mixture_grads=True)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(grad=a["grad"][:, :, :3]), "grad_output must match input"),
        (lambda a: a.update(mean=a["mean"][:2]), "mean must have shape"),
        (lambda a: a.update(mass=a["mass"][:, :2]), "mass must have shape"),
        (lambda a: a.update(sums=a["sums"][:K]), r"sums must have shape \(7, 3\)"),
        (lambda a: a.update(local_sums=a["local_sums"].float()), "local_sums must be float64"),
        (lambda a: a.update(eps=float("inf")), "eps must be finite"),
    ],
)
def test_cpp_backward_elementwise_rejects_bad_arguments(mutate, message):
    args = backward_arguments()
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uan.backward_elementwise(*args.values())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(grad=a["grad"].float()), "grad_output must match input"),
        (lambda a: a.update(mean=a["mean"][:, :2]), "mean must have shape"),
        (lambda a: a.update(mu=a["mu"][:2]), "log_sigma must have shape"),
    ],
)
def test_cpp_backward_reduce_rejects_bad_arguments(mutate, message):
    args = backward_arguments()
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uan.backward_reduce(*(args[k] for k in ("grad", "x", "mu", "log_sigma", "mix_logits", "mean")))


def test_triton_passes_reject_bad_sums():
    _, device = BACKENDS[next(name for name in BACKENDS if name.startswith("triton"))]
    x, (mu, log_sigma, mix_logits, weight, _) = inputs(SHAPES["NCL"], device=device)
    channels = x.shape[1]
    with pytest.raises(ValueError, match="sums must be float64 of shape"):
        uan_triton.statistics_finalize(torch.zeros(3, K, channels, device=device), mu)
    with pytest.raises(ValueError, match="sums must be float64 of shape"):
        uan_triton.statistics_finalize(torch.zeros(2, K, channels, dtype=torch.float64, device=device), mu)
    mean, var, mass = (mu.clone() for _ in range(3))
    sums = torch.zeros(2 * K + 1, channels, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="local_sums must be float64 of shape"):
        uan_triton.backward_elementwise(torch.randn_like(x), x, mu, log_sigma, mix_logits, weight, mean, var, mass,
                                        sums, sums[:K], EPS)
