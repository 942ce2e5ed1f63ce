"""The operators per pass (statistics, statistics_finalize) of the C++ and Triton backends.

The statistics pass's sums are about the component means ``mu``, so that the
sums of several batches add (SyncUAN all-reduces them across processes): they
are checked against the float64 reference, across dtypes and layouts, for
additivity over a split batch, and through the finalize step against the
fused training forward's statistics. Each backend runs on every device it
supports here (the C++ operators on CPU, and on CUDA in a CUDA build with a
GPU; Triton on the GPU, or on CPU under the interpreter, which is slow: shapes
are small).
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

# The statistics operators of each backend, with the training forward that
# they must agree with, and the device they run on.
_OPERATORS = {
    "cpp": (ops.statistics, ops.statistics_finalize, ops.train_forward),
    "triton": (uan_triton.statistics, uan_triton.statistics_finalize, uan_triton.train_forward),
}
_GPU = torch.cuda.is_available()
_CASES = [("cpp", "cpu")] + ([("cpp", "cuda")] if _GPU and ops.has_kernel("cuda") else []) + [
    ("triton", "cuda" if _GPU else "cpu")]
BACKENDS = {f"{name}-{device}": (*_OPERATORS[name], torch.device(device)) for name, device in _CASES}
K = 3


def reference_sums(x, mu, log_sigma, mix_logits):
    """(3, K, C) float64 sums about mu, from the reference's responsibilities (on the CPU)."""
    x, mu, log_sigma, mix_logits = (t.detach().to("cpu", torch.float64) for t in (x, mu, log_sigma, mix_logits))
    tau = reference.responsibilities(x, mu, log_sigma, mix_logits)
    d = x.unsqueeze(0) - mu.reshape(mu.shape[0], 1, mu.shape[1], *([1] * (x.dim() - 2)))
    dims = (1,) + tuple(range(3, x.dim() + 1))
    return torch.stack([tau.sum(dims), (tau * d).sum(dims), (tau * d * d).sum(dims)])


def assert_sums_close(got, want, rtol):
    """Each quantity to ``rtol`` of its largest magnitude."""
    assert got.dtype == torch.float64 and got.shape == want.shape and got.is_contiguous()
    got, want = got.cpu(), want.cpu()
    for q in range(3):
        scale = want[q].abs().max().item()
        torch.testing.assert_close(got[q], want[q], rtol=rtol, atol=rtol * scale)


def inputs(shape, dtype=torch.float64, device="cpu", channels_last=False, offset=0.0, seed=1):
    """Input and mixture (float32 parameters for float32/16-bit input), the means shifted by ``offset`` too."""
    x = make_input(shape, dtype=torch.float64, channels_last=channels_last, seed=seed) + offset
    mu, log_sigma, mix_logits, weight, bias = make_mixture(shape[1], K)
    mu = mu + offset
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(device, dtype), [t.to(device, param_dtype) for t in (mu, log_sigma, mix_logits, weight, bias)]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_statistics_match_the_reference_in_float64(backend, shape):
    statistics, _, _, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs(SHAPES[shape], device=device)
    assert_sums_close(statistics(x, mu, log_sigma, mix_logits), reference_sums(x, mu, log_sigma, mix_logits), 1e-10)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_float32_statistics_are_as_accurate_as_the_training_forward(backend, offset):
    """float32 input against the float64 reference on the same values, also with |mean| >> std
    (the kernels' sums are taken about a value of the channel, then moved to mu in float64)."""
    statistics, _, _, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs((6, 4, 50), dtype=torch.float32, device=device, offset=offset)
    assert_sums_close(statistics(x, mu, log_sigma, mix_logits), reference_sums(x, mu, log_sigma, mix_logits), 2e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape", ["NCHW", "NCDHW"])
def test_channels_last_gives_the_sums_of_contiguous_input(backend, shape):
    statistics, _, _, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs(SHAPES[shape], device=device)
    x_cl = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    assert_sums_close(statistics(x_cl, mu, log_sigma, mix_logits), statistics(x, mu, log_sigma, mix_logits), 1e-12)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_sums_of_two_half_batches_are_the_sums_of_the_batch(backend, dtype, rtol):
    statistics, _, _, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs((6, 4, 30), dtype=dtype, device=device, offset=3.0)
    halves = statistics(x[:2], mu, log_sigma, mix_logits) + statistics(x[2:], mu, log_sigma, mix_logits)
    assert_sums_close(halves, statistics(x, mu, log_sigma, mix_logits), rtol)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_empty_input_gives_zero_sums(backend):
    statistics, _, _, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs((0, 4, 5), device=device)
    sums = statistics(x, mu, log_sigma, mix_logits)
    assert sums.shape == (3, K, 4) and sums.dtype == torch.float64
    assert torch.count_nonzero(sums) == 0


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_finalize_gives_the_training_forward_statistics(backend, dtype, rtol):
    statistics, finalize, train, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, weight, bias) = inputs(SHAPES["NCHW"], dtype=dtype, device=device, offset=2.0)
    mean, var, mass = finalize(statistics(x, mu, log_sigma, mix_logits), mu)
    _, want_mean, want_var, want_mass = train(x, mu, log_sigma, mix_logits, weight, bias, 1e-5)
    for got, want in ((mean, want_mean), (var, want_var), (mass, want_mass)):
        assert got.dtype == mu.dtype and got.shape == mu.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_finalize_of_summed_half_batches_gives_the_whole_batch_statistics(backend):
    """What SyncUAN computes on two processes: the statistics of the concatenated batch."""
    statistics, finalize, _, device = BACKENDS[backend]
    x, (mu, log_sigma, mix_logits, _, _) = inputs((5, 4, 6), device=device)
    sums = statistics(x[:1], mu, log_sigma, mix_logits) + statistics(x[1:], mu, log_sigma, mix_logits)
    cpu = [t.cpu() for t in (x, mu, log_sigma, mix_logits)]
    for got, want in zip(finalize(sums, mu), reference.batch_statistics(cpu[0], reference.responsibilities(*cpu))):
        got = got.cpu()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_finalize_of_an_empty_component_gives_zero_statistics(backend):
    """S = 0: mean = var = 0, as the training forward's 0 / (0 + 1e-12)."""
    _, finalize, _, device = BACKENDS[backend]
    mu = torch.randn(K, 4, dtype=torch.float64, device=device)
    mean, var, mass = finalize(torch.zeros(3, K, 4, dtype=torch.float64, device=device), mu)
    assert torch.count_nonzero(torch.stack([mean, var, mass])) == 0


# The operators under each backend's functions: (statistics, statistics_finalize).
OPERATOR_NAMES = {"cpp": ("statistics", "statistics_finalize"),
                  "triton": ("triton_statistics", "triton_statistics_finalize")}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_opcheck_statistics_operators(backend):
    statistics, finalize, _, device = BACKENDS[backend]
    statistics_op, finalize_op = (getattr(torch.ops.uan, name).default
                                  for name in OPERATOR_NAMES[backend.split("-")[0]])
    x, (mu, log_sigma, mix_logits, _, _) = inputs(SHAPES["NCHW"], device=device)
    torch.library.opcheck(statistics_op, (x, mu, log_sigma, mix_logits))
    torch.library.opcheck(statistics_op, (x.to(memory_format=torch.channels_last).bfloat16(), mu.float(),
                                          log_sigma.float(), mix_logits.float()))
    torch.library.opcheck(statistics_op, (x[:0], mu, log_sigma, mix_logits))
    sums = statistics(x, mu, log_sigma, mix_logits)
    torch.library.opcheck(finalize_op, (sums, mu))
    torch.library.opcheck(finalize_op, (sums, mu.float()))


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda x, mu, s: (s.float(), mu), "sums must be float64"),
        (lambda x, mu, s: (s[:2], mu), "sums must have shape"),
        (lambda x, mu, s: (s, mu[:2]), "sums must have shape"),
        (lambda x, mu, s: (s, mu.unsqueeze(0)), "mu must have shape"),
        (lambda x, mu, s: (s, mu.half()), "mu must be float32 or float64"),
    ],
)
def test_cpp_finalize_rejects_bad_arguments(args, message):
    x, (mu, log_sigma, mix_logits, _, _) = inputs(SHAPES["NCL"])
    sums = ops.statistics(x, mu, log_sigma, mix_logits)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uan.statistics_finalize(*args(x, mu, sums))


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


def test_triton_finalize_rejects_bad_sums():
    mu = torch.zeros(K, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="sums must be float64 of shape"):
        uan_triton.statistics_finalize(torch.zeros(3, K, 4), mu)
    with pytest.raises(ValueError, match="sums must be float64 of shape"):
        uan_triton.statistics_finalize(torch.zeros(2, K, 4, dtype=torch.float64), mu)
