"""MixtureNorm: EM fit of the mixture, normalisation against the reference, module behaviour."""
import math

import pytest
import torch

import uan_kernels
from uan_kernels import _backends, mixture_norm, reference
from uan_kernels.mixture_norm import MixtureNorm


def make(num_features=3, **kwargs):
    """A MixtureNorm on its default backend ("auto": the C++ kernels on CPU), so
    that comparisons with ``reference`` test what users run."""
    return MixtureNorm(num_features, **kwargs)


def test_default_backend_is_the_compiled_extension():
    assert make().backend == "auto"
    assert _backends.resolve("auto", torch.device("cpu")).module is uan_kernels.ops


def randomize_affine(m):
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)


def snapshot(m):
    return {name: t.detach().clone() for name, t in m.state_dict().items()}


def assert_state_equal(m, snap):
    state = m.state_dict()
    assert state.keys() == snap.keys()
    for name, t in snap.items():
        assert torch.equal(state[name], t), f"{name} changed"


def mixture(m):
    return m.mu.clone(), m.log_sigma.clone(), m.mix_logits.clone()


def sample_mixture(n, mean, std, weights, generator):
    """``(n, C)`` draws: channel c from the mixture with means ``mean[:, c]``, scales ``std[:, c]``."""
    labels = torch.multinomial(weights, n * mean.shape[1], replacement=True, generator=generator)
    labels = labels.reshape(n, mean.shape[1])
    channel = torch.arange(mean.shape[1])
    noise = torch.randn(n, mean.shape[1], generator=generator, dtype=mean.dtype)
    return mean[labels, channel] + std[labels, channel] * noise


def test_recovers_known_mixture_per_channel():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    channel = torch.arange(4, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    # Channel-specific means, in a different order in channels 1 and 3: the fit
    # must still match components across channels, as the shared weights require.
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    true_mean = torch.tensor([-8.0, 0.0, 7.0], dtype=torch.float64)[:, None] * (1 + 0.2 * channel) * sign + 2 * channel
    true_std = torch.tensor([0.5, 1.0, 0.8], dtype=torch.float64)[:, None] * (1 + 0.1 * channel)
    x = sample_mixture(20000, true_mean, true_std, weights, gen).float()

    m = make(4, em_iterations=50, em_samples=4096)
    m.fit_mixture(x)

    # Fitted component k is true component match[k] in every channel.
    match = (m.mu.double().unsqueeze(1) - true_mean.unsqueeze(0)).abs().argmin(1)
    assert torch.equal(match, match[:, :1].expand_as(match)), match
    match = match[:, 0]
    assert sorted(match.tolist()) == [0, 1, 2]
    mu = m.mu.double()
    std = m.log_sigma.exp().double()
    lam = torch.softmax(m.mix_logits, 0).double()
    # Tolerances: about 5 standard errors of a 4096-sample fit (the widest
    # component has ~1200 samples, sigma 1.3: mean SE 0.04, relative sigma SE 2%).
    assert torch.allclose(mu, true_mean[match], atol=0.2), (mu, true_mean[match])
    assert torch.allclose(std, true_std[match], rtol=0.12), (std, true_std[match])
    assert torch.allclose(lam, weights[match], atol=0.03), (lam, weights[match])


def test_warm_start_continues_from_buffers_without_reseeding(monkeypatch):
    seeding_calls = []
    kmeans_pp = mixture_norm._kmeans_pp
    monkeypatch.setattr(mixture_norm, "_kmeans_pp", lambda *a: seeding_calls.append(1) or kmeans_pp(*a))
    torch.manual_seed(0)
    # em_samples covers the whole batch, so EM sees every value and is deterministic.
    m = make(3, em_iterations=5, em_samples=10**6, dtype=torch.float64)
    m.fit_mixture(torch.randn(64, 3, 4, dtype=torch.float64) * 2)
    assert len(seeding_calls) == 1
    mu0, log_sigma0, mix_logits0 = mixture(m)

    x = torch.randn(64, 3, 4, dtype=torch.float64) * 2 + 0.5
    m.em_iterations = 1
    m.fit_mixture(x)
    assert len(seeding_calls) == 1

    # One EM step from the previous fit: the E-step is SPEC's tau, the M-step the
    # tau-weighted batch statistics, with the mixing weights pooled over channels.
    tau = reference.responsibilities(x, mu0, log_sigma0, mix_logits0)
    mean, var, mass = reference.batch_statistics(x, tau)
    lam = mass.sum(1) / mass.sum()
    assert torch.allclose(m.mu, mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(m.log_sigma, 0.5 * torch.log(var), rtol=1e-10, atol=1e-12)
    assert torch.allclose(torch.softmax(m.mix_logits, 0), lam, rtol=1e-10, atol=1e-12)


def test_em_runs_only_every_em_every_steps():
    torch.manual_seed(0)
    m = make(3, em_every=3, em_samples=64)
    before = mixture(m)
    for step in range(7):
        running = m.running_mean.clone()
        m(torch.randn(16, 3, 5) + step)
        after = mixture(m)
        changed = [not torch.equal(a, b) for a, b in zip(before, after)]
        if step % 3 == 0:
            assert all(changed), step
        else:
            assert not any(changed), step
        assert not torch.equal(m.running_mean, running), step
        before = after
    assert int(m.num_batches_tracked) == 7


def test_train_output_and_running_stats_match_reference_with_fitted_mixture():
    torch.manual_seed(0)
    m = make(4, momentum=0.3, dtype=torch.float64)
    randomize_affine(m)
    x = torch.randn(8, 4, 6, 5, dtype=torch.float64) * 3 + 1
    out = m(x)
    expected, mean, var, _ = reference.uan_train(x, m.mu, m.log_sigma, m.mix_logits, m.weight, m.bias, m.eps)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(m.running_mean, 0.3 * mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(m.running_var, 0.7 + 0.3 * var, rtol=1e-12, atol=1e-12)
    assert bool(m.fitted) and int(m.num_batches_tracked) == 1


def test_eval_uses_running_statistics():
    torch.manual_seed(0)
    m = make(3)
    randomize_affine(m)
    for _ in range(3):
        m(torch.randn(16, 3, 8) * 2 + 1)
    m.eval()
    snap = snapshot(m)
    x = torch.randn(16, 3, 8) * 2 + 1
    out = m(x)
    expected = reference.uan_eval(x, m.mu, m.log_sigma, m.mix_logits, m.running_mean, m.running_var,
                                  m.weight, m.bias, m.eps)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    batch_stats_out = reference.uan_train(x, m.mu, m.log_sigma, m.mix_logits, m.weight, m.bias, m.eps)[0]
    assert not torch.allclose(out, batch_stats_out, atol=1e-2)
    assert_state_equal(m, snap)


def test_gradient_flows_to_input_and_affine_not_to_mixture():
    torch.manual_seed(0)
    m = make(3, dtype=torch.float64)
    randomize_affine(m)
    assert [name for name, _ in m.named_parameters()] == ["weight", "bias"]
    x = (torch.randn(10, 3, 7, dtype=torch.float64) * 2).requires_grad_()
    grad_out = torch.randn(10, 3, 7, dtype=torch.float64)
    (m(x) * grad_out).sum().backward()
    assert all(not t.requires_grad and t.grad is None for t in (m.mu, m.log_sigma, m.mix_logits))

    # Same function with the fitted mixture held constant, differentiated by plain autograd.
    x_ref = x.detach().clone().requires_grad_()
    weight = m.weight.detach().clone().requires_grad_()
    bias = m.bias.detach().clone().requires_grad_()
    out = reference.uan_train(x_ref, m.mu, m.log_sigma, m.mix_logits, weight, bias, m.eps)[0]
    (out * grad_out).sum().backward()
    for got, want in ((x.grad, x_ref.grad), (m.weight.grad, weight.grad), (m.bias.grad, bias.grad)):
        assert got is not None and got.abs().max() > 0
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("em_every", [1, 2])
def test_checkpointing_gives_the_gradients_and_updates_of_no_checkpointing(em_every, use_reentrant):
    """The recomputation (inside the backward pass) normalises with the fit the
    first forward stored: no second EM on another random subsample, no second
    running-statistics update or step count."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), make(6, em_every=em_every,
                                                                          em_samples=50), torch.nn.ReLU())
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    block(x)  # fitted; with em_every=2 the next step reuses the fit
    start = snapshot(block)

    def step(run):
        block.load_state_dict(start)
        x.grad = None
        block.zero_grad()
        torch.manual_seed(1)  # the same subsample for EM in both steps
        run().square().sum().backward()
        return [x.grad.clone(), *(p.grad.clone() for p in block.parameters())], snapshot(block)

    plain, after_plain = step(lambda: block(x))
    checkpointed, after_checkpointed = step(
        lambda: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant))
    for got, want in zip(checkpointed, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert_state_equal(block, after_plain)


def test_state_dict_round_trip_preserves_fit_and_step_counter():
    torch.manual_seed(0)
    kwargs = {"em_every": 2, "em_samples": 50}
    a = make(3, **kwargs)
    randomize_affine(a)
    a(torch.randn(16, 3, 6))
    b = make(3, **kwargs)
    b.load_state_dict(a.state_dict())
    assert bool(b.fitted) and int(b.num_batches_tracked) == 1
    assert_state_equal(b, snapshot(a))
    # Step 1 skips EM, step 2 warm-starts it; a lost counter or fit flag would
    # refit (re-seeding) and diverge.
    for step in range(2):
        x = torch.randn(16, 3, 6)
        torch.manual_seed(10 + step)
        out_a = a(x)
        torch.manual_seed(10 + step)
        out_b = b(x)
        assert torch.equal(out_a, out_b)
        assert_state_equal(b, snapshot(a))


BAD_INPUTS = {
    "wrong_channels": (lambda: torch.randn(4, 5, 3), ValueError),
    "one_dim": (lambda: torch.randn(6), ValueError),
    "integer_dtype": (lambda: torch.randint(0, 5, (4, 3, 2)), TypeError),
    "float64_into_float32": (lambda: torch.randn(4, 3, 2, dtype=torch.float64), TypeError),
    "one_value_per_channel": (lambda: torch.randn(1, 3), ValueError),
    "one_value_per_channel_3d": (lambda: torch.randn(1, 3, 1, 1), ValueError),
    "not_a_tensor": (lambda: [[1.0, 2.0, 3.0]], TypeError),
}


@pytest.mark.parametrize("call", ["forward", "fit_mixture"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_and_leaves_every_buffer_unchanged(case, call):
    torch.manual_seed(0)
    m = make(3)
    m(torch.randn(8, 3, 4))
    snap = snapshot(m)
    make_input, error = BAD_INPUTS[case]
    with pytest.raises(error):
        getattr(m, call)(make_input())
    assert_state_equal(m, snap)


def test_failure_inside_normalisation_leaves_fitted_mixture_unstored(monkeypatch):
    torch.manual_seed(0)
    m = make(3)
    m(torch.randn(8, 3, 4))
    snap = snapshot(m)

    def failing_uan(*args, **kwargs):
        raise RuntimeError("backend failed")

    # E.g. a backend that cannot run on this device: raised after EM has run.
    monkeypatch.setattr(mixture_norm, "uan", failing_uan)
    with pytest.raises(RuntimeError, match="backend failed"):
        m(torch.randn(8, 3, 4))
    assert_state_equal(m, snap)


@pytest.mark.parametrize("attr, value", [("momentum", 1.5), ("eps", 0.0), ("backend", "nope")])
def test_bad_config_after_construction_raises_before_em(attr, value):
    torch.manual_seed(0)
    m = make(3)
    m(torch.randn(8, 3, 4))
    snap = snapshot(m)
    setattr(m, attr, value)
    with pytest.raises(ValueError, match=attr):
        m(torch.randn(8, 3, 4))
    assert_state_equal(m, snap)


SHAPES = [(16, 3), (8, 3, 10), (4, 3, 5, 6), (2, 3, 3, 4, 5)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_runs_on_every_rank_and_memory_format(shape, channels_last):
    if channels_last and len(shape) < 4:
        pytest.skip("channels_last needs 4 or 5 dims")
    torch.manual_seed(0)
    # em_samples below most batches' size exercises the random subsample too.
    m = make(3, em_samples=50, backend="reference")
    randomize_affine(m)
    x = torch.randn(shape) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = reference.uan_train(x, m.mu, m.log_sigma, m.mix_logits, m.weight, m.bias, m.eps)[0]
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    m.eval()
    assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("gather", ["cpp", "pytorch"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subsample_takes_the_same_positions_for_every_channel(channels_last, gather, monkeypatch):
    if gather == "pytorch":  # the gather of devices without uan::gather_samples
        monkeypatch.setattr(_backends, "has_em_helpers", lambda device: False)
    torch.manual_seed(0)
    n, c, h, w = 5, 3, 4, 6
    # Value encodes (position, channel): 10 * flat position + channel.
    position = torch.arange(n * h * w, dtype=torch.float32).reshape(n, 1, h, w)
    x = 10 * position + torch.arange(c, dtype=torch.float32).reshape(1, c, 1, 1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    sample = mixture_norm._em_input(x, 40)
    assert sample.shape == (1, c, 40) and sample.is_contiguous()
    values = mixture_norm._channel_values(sample)
    assert values.shape == (c, 40)
    assert torch.equal(values - torch.arange(c).reshape(c, 1), (values[0] // 10 * 10).expand(c, 40))
    assert values.unique().numel() > 3 * 10
    # A batch that fits whole is EM's input as it is (no copy), in either memory format.
    for num_samples in (10**6, n * h * w, None):
        assert mixture_norm._em_input(x, num_samples) is x
    assert torch.equal(mixture_norm._channel_values(x).sort(1).values, x.transpose(0, 1).reshape(c, -1).sort(1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cpp_gather_samples_is_the_pytorch_gather(layout, dtype, monkeypatch):
    x = torch.randn(6, 5, 7, 9).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(6, 10, 7, 9).to(dtype)[:, ::2]  # reshape copies it: the sample comes from the copy
    samples = []
    for helpers in (True, False):
        monkeypatch.setattr(_backends, "has_em_helpers", lambda device: helpers)
        torch.manual_seed(3)
        samples.append(mixture_norm._em_input(x, 100))
    assert samples[0].shape == (1, 5, 100) and samples[0].is_contiguous() and samples[0].dtype == dtype
    assert torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("num_samples", [30, 5])  # dense positions (counting sort) and sparse ones
def test_cpp_gather_samples_takes_positions_in_increasing_order(num_samples):
    x = torch.randn(4, 3, 5, 7)[:, :, 1:]  # (N, C, L) = (4, 3, 28), not dense: gathered from a copy
    positions = torch.randint(4 * 28, (num_samples,))
    ordered = positions.sort().values
    expected = x.reshape(4, 3, 28)[ordered // 28, :, ordered % 28].t().unsqueeze(0)
    assert torch.equal(torch.ops.uan.gather_samples(x, positions), expected)


def test_cpp_gather_samples_checks_its_arguments():
    x = torch.randn(2, 3, 4)
    torch.library.opcheck(torch.ops.uan.gather_samples.default, (x, torch.tensor([7, 0, 5, 3])))
    assert torch.equal(torch.ops.uan.gather_samples(x, torch.tensor([7, 0])), x[[0, 1], :, [0, 3]].t()[None])
    with pytest.raises(RuntimeError, match="outside the input"):
        torch.ops.uan.gather_samples(x, torch.tensor([8]))  # (2, 3): past the last position
    with pytest.raises(RuntimeError, match="outside the input"):
        torch.ops.uan.gather_samples(x, torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="1-D int64"):
        torch.ops.uan.gather_samples(x, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"shape \(N, C, \*\)"):
        torch.ops.uan.gather_samples(torch.randn(4), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_double_precision_inputs(dtype):
    torch.manual_seed(0)
    m = make(3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = (torch.randn(8, 3, 6) * 2 + 1).to(dtype)
    out = m(x)
    assert out.dtype == dtype
    assert all(torch.isfinite(t).all() for t in mixture(m))
    expected = reference.uan_train(x, m.mu, m.log_sigma, m.mix_logits, m.weight, m.bias, m.eps)[0]
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert torch.allclose(out.double(), expected.double(), rtol=tol, atol=tol)


def test_variance_floor_keeps_degenerate_channels_finite():
    torch.manual_seed(0)
    x = torch.zeros(32, 3, 4)
    x[:, 1] = (torch.arange(32 * 4).reshape(32, 4) % 2).float()  # two distinct values, three components
    x[:, 2] = torch.randn(32, 4)
    m = make(3, em_iterations=20)
    out = m(x)
    assert all(torch.isfinite(t).all() for t in mixture(m))
    assert torch.isfinite(out).all()
    channel_var = x.transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
    assert (torch.exp(2 * m.log_sigma.double()) >= 0.999e-3 * channel_var.double()).all()


def test_fit_mixture_only_touches_the_mixture():
    torch.manual_seed(0)
    m = make(3)
    running = (m.running_mean.clone(), m.running_var.clone())
    before = mixture(m)
    m.fit_mixture(torch.randn(16, 3, 4) * 3)
    assert bool(m.fitted)
    assert all(not torch.equal(a, b) for a, b in zip(before, mixture(m)))
    assert torch.equal(m.running_mean, running[0]) and torch.equal(m.running_var, running[1])
    assert int(m.num_batches_tracked) == 0
    assert math.isclose(float(torch.softmax(m.mix_logits, 0).sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_features": 0}, "num_features"),
        ({"num_features": 2.0}, "num_features"),
        ({"num_features": True}, "num_features"),
        ({"num_components": 0}, "num_components"),
        ({"em_every": 0}, "em_every"),
        ({"em_iterations": -1}, "em_iterations"),
        ({"em_samples": 0}, "em_samples"),
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"momentum": 1.5}, "momentum"),
        ({"momentum": float("inf")}, "momentum"),
        ({"affine": "yes"}, "affine"),
        ({"backend": "nope"}, "backend"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, name):
    args = {"num_features": 3, "backend": "reference", **kwargs}
    with pytest.raises(ValueError, match=name):
        MixtureNorm(args.pop("num_features"), **args)


def test_affine_false_and_extra_repr():
    torch.manual_seed(0)
    m = make(3, affine=False, em_every=2, em_iterations=4, em_samples=128)
    assert m.weight is None and m.bias is None and not list(m.parameters())
    x = torch.randn(8, 3, 5)
    out = m(x)
    assert torch.allclose(out, reference.uan_train(x, m.mu, m.log_sigma, m.mix_logits, eps=m.eps)[0], atol=1e-5)
    text = repr(m)
    for part in ("3, num_components=3", "em_every=2", "em_iterations=4", "em_samples=128", "backend='auto'"):
        assert part in text
    assert uan_kernels.MixtureNorm is MixtureNorm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_like_on_cpu():
    torch.manual_seed(0)
    m = make(4, em_samples=256).cuda()
    x = torch.randn(8, 4, 6, 6, device="cuda").to(memory_format=torch.channels_last)
    out = m(x)
    assert out.device.type == "cuda" and all(t.is_cuda for t in m.buffers())
    expected = reference.uan_train(x, m.mu, m.log_sigma, m.mix_logits, m.weight, m.bias, m.eps)[0]
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    m.eval()
    assert torch.isfinite(m(x)).all()


# The fused EM (one statistics pass of the backend per iteration) against the plain-PyTorch EM.
FUSED_BACKENDS = ["cpp", "triton"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def skip_unless_available(backend, device="cpu"):
    why = _backends.unavailable_reason(backend, torch.device(device))
    if why:
        pytest.skip(why)


def plain_sums(values, mean, var, lam):
    """The E-step's float64 ``(3, K, C)`` sums about ``mean`` in plain PyTorch (what the
    statistics operators compute): ``sum tau``, ``sum tau (x - mean)``, ``sum tau (x - mean)^2``."""
    tau = mixture_norm._e_step(values, mean, var, lam)
    diff = values - mean.unsqueeze(2)
    return torch.stack([tau.sum(2), (tau * diff).sum(2), (tau * diff.square()).sum(2)])


def em_problem(shape=(4, 3, 5, 6), device="cpu"):
    """Float64 input and a starting mixture that exercise both M-step rules.

    Channel 0 holds three separated clusters; channel 1 only the values 0 and 1
    (three components on two values: variances collapse to the floor); channel
    2 is Gaussian and its component 2 starts far from its values (a responsibility
    mass below _MIN_MASS but not 0: it keeps its mean and variance).
    """
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[:, 0] += 6.0 * torch.randint(-1, 2, x[:, 0].shape, generator=g).double()
    x[:, 1] = torch.randint(0, 2, x[:, 1].shape, generator=g).double()
    mean = torch.tensor([[-5.0, -0.2, -1.0], [0.5, 0.4, 0.0], [5.0, 1.2, 9.0]], dtype=torch.float64)
    var = torch.tensor([[2.0, 0.1, 1.0], [1.0, 0.1, 1.0], [2.0, 0.1, 1.0]], dtype=torch.float64)
    lam = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    return tuple(t.to(device) for t in (x, mean, var, lam))


def test_m_step_from_sums_is_the_plain_m_step():
    x, mean, var, lam = em_problem()
    values = mixture_norm._channel_values(x)
    floor = 1e-3 * values.var(1, unbiased=False)
    for _ in range(6):
        channel_var = mixture_norm._channel_variance_from_sums(plain_sums(values, mean, var, lam), mean,
                                                               values.shape[1])
        torch.testing.assert_close(channel_var, values.var(1, unbiased=False), rtol=1e-12, atol=0)
        tau = mixture_norm._e_step(values, mean, var, lam)
        expected = mixture_norm._m_step(values, tau, mean, var, floor)
        min_weight = mixture_norm._MIN_MIXING_WEIGHT * values.numel()
        got_mean, got_var, weight = mixture_norm._m_step_from_sums(plain_sums(values, mean, var, lam), mean, mean,
                                                                   var, floor, min_weight)
        for a, b in zip((got_mean, got_var, weight / weight.sum()), expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        mass = tau[2, 2].sum()
        assert 0 < mass <= mixture_norm._MIN_MASS, mass
        mean, var, lam = expected
    assert mean[2, 2] == 9.0 and var[2, 2] == 1.0  # the empty component kept its previous estimates
    assert (var[:, 1] == floor[1]).any()  # and a component of channel 1 sits on the floor


def em_m_step_arguments(pivot_dtype):
    """Arguments of ``uan::em_m_step`` on :func:`em_problem`'s sums: a live component, one
    below ``_MIN_MASS`` (channel 2, component 2) and floored variances (channel 1)."""
    x, mean, var, lam = em_problem()
    values = mixture_norm._channel_values(x)
    pivot = mean.to(pivot_dtype)
    sums = plain_sums(values, pivot.double(), var, lam)
    floor = 0.05 * values.var(1, unbiased=False)  # above two of channel 1's component variances
    min_weight = mixture_norm._MIN_MIXING_WEIGHT * values.numel()
    return sums, pivot, mean + 0.25, var * 2.0, floor, mixture_norm._MIN_MASS, min_weight


@pytest.mark.parametrize("pivot_dtype", [torch.float32, torch.float64])
def test_cpp_em_m_step_is_the_pytorch_m_step(pivot_dtype):
    args = em_m_step_arguments(pivot_dtype)
    got = torch.ops.uan.em_m_step(*args)
    expected = mixture_norm._m_step_and_parameters(*args)
    for name, a, b in zip(("mean", "var", "weight", "mu", "log_sigma", "mix_logits"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, msg=name)
    mean, var = got[:2]
    sums, _, prev_mean, prev_var, floor = args[:5]
    assert sums[0, 2, 2] <= mixture_norm._MIN_MASS
    assert mean[2, 2] == prev_mean[2, 2] and var[2, 2] == prev_var[2, 2]  # kept by the empty component
    assert (var[:, 1] == floor[1]).any()  # a floored variance
    assert mixture_norm._m_step_for(torch.device("cpu")) is torch.ops.uan.em_m_step


def test_cpp_em_m_step_opcheck():
    torch.library.opcheck(torch.ops.uan.em_m_step.default, em_m_step_arguments(torch.float32))


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0].float(), *a[1:]), "sums must be float64"),
    (lambda a: (a[0][:, :2], *a[1:]), "sums must have shape"),
    (lambda a: (a[0], a[1].half(), *a[2:]), "pivot must be float32 or float64"),
    (lambda a: (a[0], a[1][0], *a[2:]), r"pivot must have shape \(K, C\)"),
    (lambda a: (*a[:2], a[2].float(), *a[3:]), "prev_mean must be float64"),
    (lambda a: (*a[:3], a[3][:, :2], *a[4:]), "prev_var must have shape"),
    (lambda a: (*a[:4], a[4].expand(3, 3), *a[5:]), "var_floor must have shape"),
    (lambda a: (*a[:5], 0.0, a[6]), "min_mass must be positive"),
    (lambda a: (*a[:6], math.nan), "min_weight must be positive"),
])
def test_cpp_em_m_step_rejects_bad_arguments(change, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uan.em_m_step(*change(em_m_step_arguments(torch.float64)))


@pytest.mark.parametrize("subsample", [False, True], ids=["full_batch", "subsample"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_em_matches_plain_em_over_iterations(device, backend, subsample):
    skip_unless_available(backend, device)
    statistics = _backends.resolve(backend, torch.device(device)).module.statistics
    x, mean, var, lam = em_problem(device=device)
    # The subsample is EM's (1, C, n) tensor of sampled positions; the full batch is the input itself.
    data = mixture_norm._em_input(x, 50) if subsample else x
    assert data.shape == ((1, 3, 50) if subsample else x.shape)
    values = mixture_norm._channel_values(data)
    floor = (1e-3 * values.var(1, unbiased=False)).clamp_min(1e-12)
    plain = fused = (mean, var, lam)
    floored = 0
    for step in range(8):
        plain = mixture_norm._plain_em(values, *plain, floor, iterations=1)
        # None: the floor from the channel variances of the E-step's sums, as a warm start does.
        fused = mixture_norm._fused_em(statistics, data, *fused, floor if step % 2 else None, iterations=1,
                                       param_dtype=torch.float64)
        for a, b in zip(fused, plain):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        floored += int((plain[1] == floor).sum())
    assert fused[0][2, 2] == 9.0 and fused[1][2, 2] == 1.0
    assert floored > 0


def test_fused_em_with_the_pytorch_m_step_matches_plain_em(monkeypatch):
    """The M-step of devices without ``uan::em_m_step`` (CUDA), run here on CPU."""
    monkeypatch.setattr(_backends, "has_em_helpers", lambda device: False)
    assert mixture_norm._m_step_for(torch.device("cpu")) is mixture_norm._m_step_and_parameters
    test_fused_em_matches_plain_em_over_iterations("cpu", "cpp", subsample=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("em_samples", [None, 40], ids=["full_batch", "subsample"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_fit_matches_plain_fit_from_seeding_on(device, backend, em_samples, channels_last, monkeypatch):
    skip_unless_available(backend, device)
    plain_calls = []
    plain_em = mixture_norm._plain_em
    monkeypatch.setattr(mixture_norm, "_plain_em", lambda *a: plain_calls.append(1) or plain_em(*a))
    kwargs = {"em_iterations": 6, "em_samples": em_samples, "dtype": torch.float64, "device": device}
    fused = MixtureNorm(3, backend=backend, **kwargs)
    plain = MixtureNorm(3, backend="reference", **kwargs)
    x = em_problem(device=device)[0]
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    # Seeding, then a warm start on another batch: the same draws, the same fit.
    for step, batch in enumerate((x, x.flip(0) * 1.5 + 0.5)):
        for m in (fused, plain):
            torch.manual_seed(step)
            m.fit_mixture(batch)
        for a, b in zip(mixture(fused), mixture(plain)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(plain_calls) == 2  # the reference module's fits only


def test_fused_em_in_float32_agrees_with_plain_em():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    true_mean = torch.tensor([[-4.0, 1.0], [0.0, 3.0], [5.0, 7.0]], dtype=torch.float64)
    true_std = torch.tensor([[0.5, 0.6], [1.0, 0.4], [0.8, 0.9]], dtype=torch.float64)
    x = sample_mixture(3000, true_mean, true_std, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), gen).float()
    fused = make(2, em_iterations=20, em_samples=None)
    plain = make(2, em_iterations=20, em_samples=None, backend="reference")
    for m in (fused, plain):
        torch.manual_seed(0)
        m.fit_mixture(x)
    # float32 responsibilities in both; float64 sums and updates in the fused EM only.
    torch.testing.assert_close(fused.mu, plain.mu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.log_sigma, plain.log_sigma, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.mix_logits, plain.mix_logits, rtol=1e-4, atol=1e-4)


def test_em_samples_none_fits_every_value(monkeypatch):
    seen = []
    fused_em = mixture_norm._fused_em
    monkeypatch.setattr(mixture_norm, "_fused_em", lambda s, data, *a: seen.append(data) or fused_em(s, data, *a))
    x = torch.randn(64, 3, 8, 8)
    m = make(3, em_samples=None)
    m(x)
    assert seen[0].data_ptr() == x.data_ptr() and seen[0].shape == x.shape and "em_samples=None" in repr(m)
    m.em_samples = 100
    m(x)
    assert seen[1].shape == (1, 3, 100)
