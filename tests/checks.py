"""Device-independent checks of the fused backends against the float64 reference.

tests/test_cuda.py runs them on a GPU (at full size: past 2**31 elements, on a
side stream, ...); tests/test_checks.py runs the same functions on CPU
tensors with the C++ backend at small sizes, so that their logic (and the
tolerances measured there) is exercised on every machine.
"""
import copy
import math

import torch

from uan_kernels import UAN, reference

EPS = 1e-5


def rel_err(actual, expected):
    """Largest absolute error over the largest expected magnitude."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def detached(tensors, dtype=None, requires_grad=False):
    return [None if t is None else t.detach().to(dtype=dtype or t.dtype).requires_grad_(requires_grad)
            for t in tensors]


def train_and_grads(train, x, params, grad_out):
    """Forward ``(out, mean, var, mass)`` of ``train`` and the gradients of
    ``(out * grad_out).sum()`` w.r.t. x and every parameter that is not None."""
    x = x.detach().requires_grad_()
    params = detached(params, requires_grad=True)
    out, mean, var, mass = train(x, *params, EPS)
    inputs = [x] + [p for p in params if p is not None]
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out.detach(), mean, var, mass], list(grads)


def reference_train_and_grads(x, params, grad_out):
    """``train_and_grads`` of the reference in float64 on the same values, on the CPU."""
    cpu64 = [None if t is None else t.detach().to("cpu", torch.float64) for t in (x, *params, grad_out)]
    return train_and_grads(reference.uan_train, cpu64[0], cpu64[1:-1], cpu64[-1])


# --------------------------------------------------------------------------- #
# Inputs made of identical copies of a small block
# --------------------------------------------------------------------------- #


def periodic(block, repeats, dim, memory_format=torch.contiguous_format):
    """``repeats`` copies of ``block`` concatenated along ``dim``, in
    ``memory_format``, written by one broadcast copy (no second full-size tensor)."""
    shape = list(block.shape)
    shape[dim] *= repeats
    out = torch.empty(shape, dtype=block.dtype, device=block.device, memory_format=memory_format)
    out.unflatten(dim, (repeats, block.shape[dim])).copy_(block.unsqueeze(dim).expand(
        *block.shape[:dim], repeats, *block.shape[dim:]))
    return out


def check_periodic_training_step(train, block, grad_block, params, repeats, dim,
                                 memory_format=torch.contiguous_format, out_tol=2**-8, param_tol=2e-5,
                                 stat_tol=1e-5, copies_per_compare=64):
    """Forward and backward of an input made of ``repeats`` copies of ``block``
    along ``dim`` (grad_output likewise of ``grad_block``), against the float64
    reference on one block.

    Copies leave every channel's statistics unchanged (the mass is multiplied
    by ``repeats``), so the output and grad_input are copies of the block's,
    and the parameter gradients, sums over all elements, are ``repeats`` times
    the block's. This checks tensors too large for the reference (more than
    2**31 elements) everywhere, with one block's worth of reference work.
    ``out_tol``: output and grad_input, relative to the block's largest entry;
    ``param_tol``: parameter gradients, relative to each one's largest entry;
    ``stat_tol``: relative error of mass and var, and mean error in units of
    the channel's standard deviation.
    """
    x = periodic(block, repeats, dim, memory_format)
    grad_out = periodic(grad_block, repeats, dim, memory_format)
    (out, mean, var, mass), grads = train_and_grads(train, x, params, grad_out)
    del x, grad_out
    (want_out, want_mean, want_var, want_mass), want_grads = reference_train_and_grads(block, params, grad_block)
    device = out.device

    torch.testing.assert_close(mass.cpu().double(), repeats * want_mass, rtol=stat_tol, atol=0)
    torch.testing.assert_close(var.cpu().double(), want_var, rtol=stat_tol, atol=0)
    assert ((mean.cpu().double() - want_mean).abs() <= stat_tol * want_var.sqrt()).all()

    assert out.is_contiguous(memory_format=memory_format) and grads[0].is_contiguous(memory_format=memory_format)
    for got, want in ((out, want_out), (grads[0], want_grads[0])):
        want = want.to(device=device, dtype=torch.float32).unsqueeze(dim)
        bound = out_tol * want.abs().max().item()
        copies = got.unflatten(dim, (repeats, block.shape[dim]))
        for first in range(0, repeats, copies_per_compare):
            part = copies.narrow(dim, first, min(copies_per_compare, repeats - first))
            worst = (part.float() - want).abs().max().item()
            assert worst <= bound, (first, worst, bound)
    for got, want in zip(grads[1:], want_grads[1:]):
        assert got.dtype == params[0].dtype
        assert rel_err(got.cpu(), repeats * want) < param_tol


# --------------------------------------------------------------------------- #
# Unusual inputs of ordinary size
# --------------------------------------------------------------------------- #


def misaligned_copy(t, elements=1):
    """A copy of ``t`` (same strides) whose data starts ``elements`` past the
    start of its storage: off the 16-byte alignment of vector loads."""
    storage = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    out = storage[elements:].view(t.shape) if t.is_contiguous() else None
    if out is None:  # channels_last: the same strides over an offset storage
        out = storage.as_strided(t.shape, t.stride(), elements)
    out.copy_(t)
    assert out.storage_offset() == elements and out.stride() == t.stride()
    return out


def check_against_reference(train, x, params, grad_out, tol):
    """Forward (output and statistics) and every gradient within ``tol`` of the
    float64 reference (error over each tensor's largest entry); grad_input in
    the input's memory format."""
    forward, grads = train_and_grads(train, x, params, grad_out)
    want_forward, want_grads = reference_train_and_grads(x, params, grad_out)
    fmt = memory_format_of(x)
    assert forward[0].is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    for got, want in zip(forward + grads, want_forward + want_grads):
        assert rel_err(got.cpu(), want) < tol


def memory_format_of(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# --------------------------------------------------------------------------- #
# A training step of the module
# --------------------------------------------------------------------------- #


def check_module_training_step(update, device, dtype, backend="auto", tol=1e-10, shape=(6, 4, 5, 5),
                               channels_last=False):
    """One SGD step of a UAN layer on ``device`` against a float64 twin on the
    reference backend (CPU) from the same state: output, parameter gradients,
    every parameter and buffer after the step, and an eval forward after it."""
    torch.manual_seed(0)
    layer = UAN(shape[1], 3, update=update, momentum=0.3, backend=backend, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    twin = copy.deepcopy(layer).to("cpu", torch.float64)
    twin.backend = "reference"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
    x_dev = x.to(device, dtype)
    if channels_last:
        x_dev = x_dev.contiguous(memory_format=torch.channels_last)
    results = []
    for module, inp in ((layer, x_dev), (twin, x_dev.to("cpu", torch.float64))):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        module.train()
        out = module(inp)
        out.backward(grad_out.to(out.device, out.dtype))
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        opt.step()
        module.eval()
        with torch.no_grad():
            evaluated = module(inp)
        results.append((out.detach(), grads, copy.deepcopy(module.state_dict()), evaluated))
    (out, grads, state, evaluated), (want_out, want_grads, want_state, want_evaluated) = results
    assert out.device.type == torch.device(device).type and out.dtype == dtype
    assert rel_err(out.cpu(), want_out) < tol
    assert grads.keys() == want_grads.keys() and len(grads) == (5 if update == "weight" else 2)
    for name, grad in grads.items():
        assert rel_err(grad.cpu(), want_grads[name]) < tol, name
    assert state.keys() == want_state.keys()
    for name, value in state.items():
        if value.is_floating_point():
            assert rel_err(value.cpu(), want_state[name]) < tol, name
        else:
            assert torch.equal(value.cpu(), want_state[name]), name
    assert rel_err(evaluated.cpu(), want_evaluated) < tol


# --------------------------------------------------------------------------- #
# Float32 conditioning
# --------------------------------------------------------------------------- #


def check_far_from_the_mixture(train, device, seeds=range(4), shape=(4, 16, 6, 6)):
    """Training forward in float32 on ``x * 1e3 + 1e4`` through a freshly
    initialised UAN (mixture means in [-1, 1], every sigma ~0.83), against the
    float64 reference on the same float32 values.

    Bound: rounding the input itself to float32 (2**-24 of 1e4) moves the exact
    output by ``input_rounding`` (large at elements near a crossover of two
    components, where tau changes fast); the float32 computation may lose at
    most 4 times that, plus 1e-5 (the outputs are O(1); BatchNorm's float32
    error here is ~1e-6). Logits squared in float32 lost up to 4.7 here.
    """
    for seed in seeds:
        torch.manual_seed(seed)
        layer = UAN(shape[1], 3)
        params = [t.detach() for t in (layer.mu, layer.log_sigma, layer.mix_logits, layer.weight, layer.bias)]
        g = torch.Generator().manual_seed(seed + 100)
        x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 1e3 + 1e4
        x32 = x64.float()
        exact = reference.uan_train(x32.double(), *(p.double() for p in params), EPS)[0]
        input_rounding = (exact - reference.uan_train(x64, *(p.double() for p in params), EPS)[0]).abs().max()
        out = train(x32.to(device), *(p.to(device) for p in params), EPS)[0]
        error = (out.cpu().double() - exact).abs().max()
        assert error <= 4 * input_rounding + 1e-5, (seed, error.item(), input_rounding.item())


def tight_clusters(shape, dtype, device, centers=(-5.0, 5.0), std=0.05):
    """Values in two clusters of ``std`` around ``centers`` (chosen at random per
    element) and the mixture fitted to them: ``(x, mu, log_sigma, mix_logits)``."""
    g = torch.Generator().manual_seed(0)
    which = torch.randint(0, len(centers), shape, generator=g)
    x = torch.tensor(centers, dtype=torch.float64)[which] + std * torch.randn(shape, generator=g,
                                                                               dtype=torch.float64)
    K, C = len(centers), shape[1]
    mu = torch.tensor(centers, dtype=torch.float64)[:, None].expand(K, C)
    log_sigma = torch.full((K, C), math.log(std), dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, mu, log_sigma, torch.zeros(K, dtype=torch.float64))]


def check_tight_clusters(train, device, shape=(16, 2, 32, 32)):
    """Two tight clusters far apart compared with their spread (at -5 and +5,
    std 0.05) with the mixture fitted to them: the float32 statistics and
    gradients against float64 on the same values.

    Each component's sums are taken about a value of its own cluster, so its
    variance keeps float32's precision: a few roundings of 2**-24 (measured
    9e-8 relative; bound 1e-6), where sums about one value of the other
    cluster lost (10 / 0.05)**2 = 4e4 times that (2.6e-3 on the CPU before).
    Means within 1e-6 relative (a float32 rounding of +-5 is 6e-8 relative);
    the input gradient, like every float32 gradient of the suite, within 1e-5
    of its largest entry. Every element belongs to one component alone (the
    other's responsibility underflows, its own is exactly 1 when the largest
    exponential is exactly 1), so the logit gradients vanish and mu and
    log_sigma get none; an exponential with exp(0) one rounding off 1 gave
    them 1.6e-6 of the input gradient's scale (bound 1e-9).
    """
    x, mu, log_sigma, mix_logits = tight_clusters(shape, torch.float32, device)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.ones(shape[1], device=device)
    (out, mean, var, mass), grads = train_and_grads(train, x, [mu, log_sigma, mix_logits, weight, None],
                                                    grad_out.to(device, torch.float32))
    (want_out, want_mean, want_var, want_mass), want_grads = reference_train_and_grads(
        x, [mu, log_sigma, mix_logits, weight, None], grad_out)
    torch.testing.assert_close(var.cpu().double(), want_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.cpu().double(), want_mean, rtol=1e-6, atol=0)
    assert rel_err(grads[0].cpu(), want_grads[0]) < 1e-5
    for grad in grads[1:3]:
        assert grad.abs().max().item() <= 1e-9 * want_grads[0].abs().max().item()
