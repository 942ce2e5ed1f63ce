"""CPU, float32, (32, 64, 32, 32): UAN (C++) vs the reference, eager and compiled, vs BatchNorm2d.

Run with `pytest benchmarks/test_cpu_ops.py --benchmark-only`; compare runs
with `--benchmark-save=NAME` and `--benchmark-compare`. Groups are
"<pass> K=<k>" so each table row set reads as one comparison.
"""
import pytest
import torch
from torch import nn

from uan_kernels import reference
from uan_kernels.ops import train_forward

SHAPE = (32, 64, 32, 32)
COMPONENTS = [1, 3, 5]
IMPLEMENTATIONS = ["batchnorm2d", "uan_cpp", "uan_reference", "uan_reference_compiled"]
_compiled = {}


def make_case(components):
    g = torch.Generator().manual_seed(0)
    channels = SHAPE[1]
    x = torch.randn(SHAPE, generator=g).requires_grad_()
    params = [
        (torch.rand(components, channels, generator=g) * 2 - 1).requires_grad_(),
        (0.1 * torch.randn(components, channels, generator=g)).requires_grad_(),
        torch.randn(components, generator=g).requires_grad_(),
        torch.ones(channels, requires_grad=True),
        torch.zeros(channels, requires_grad=True),
    ]
    return x, params, torch.randn(SHAPE, generator=g)


def forward_fn(name, components):
    if name == "batchnorm2d":
        bn = nn.BatchNorm2d(SHAPE[1])
        return lambda x, params: bn(x), lambda params: [bn.weight, bn.bias]
    if name == "uan_cpp":
        return lambda x, params: train_forward(x, *params, 1e-5)[0], lambda params: params
    if name == "uan_reference":
        return lambda x, params: reference.uan_train(x, *params, 1e-5)[0], lambda params: params
    if components not in _compiled:
        _compiled[components] = torch.compile(lambda x, *params: reference.uan_train(x, *params, 1e-5)[0])
    fn = _compiled[components]
    return lambda x, params: fn(x, *params), lambda params: params


@pytest.mark.parametrize("components", COMPONENTS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_forward(benchmark, name, components):
    benchmark.group = f"forward K={components}"
    x, params, _ = make_case(components)
    fwd, _ = forward_fn(name, components)

    def run():
        with torch.no_grad():
            return fwd(x, params)

    run()  # compile / warm up outside the timed rounds
    benchmark.pedantic(run, rounds=5 if name == "uan_reference" else 15, warmup_rounds=1)


@pytest.mark.parametrize("components", COMPONENTS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_forward_backward(benchmark, name, components):
    benchmark.group = f"forward+backward K={components}"
    x, params, grad_out = make_case(components)
    fwd, trainable = forward_fn(name, components)

    def run():
        out = fwd(x, params)
        return torch.autograd.grad(out, [x, *trainable(params)], grad_out)

    run()
    benchmark.pedantic(run, rounds=5 if name == "uan_reference" else 15, warmup_rounds=1)
