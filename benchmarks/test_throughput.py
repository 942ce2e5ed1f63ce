"""pytest-benchmark suites: every normalisation, pass, K and dtype on this machine's device.

    pytest benchmarks --benchmark-only                       # all
    pytest benchmarks --benchmark-only -k "uan_cpp or batchnorm2d"
    pytest benchmarks --benchmark-only --benchmark-save=NAME  # then --benchmark-compare

Groups are "<shape> <dtype> <pass> K=<k>", so each group's table compares the
implementations on one case. Cases come from uan_kernels.bench, the same
factory as the `uan-bench` table. Triton is benchmarked on GPUs only.
"""
import pytest
import torch

from uan_kernels.bench import IMPLEMENTATIONS, PASSES, SHAPES, make_module, pass_function, runnable, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
SLOW = ("uan_reference", "mixturenorm_em1", "mixturenorm_em10")


@pytest.mark.parametrize("components", [1, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape_name", list(SHAPES[DEVICE.type]))
@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_pass(benchmark, name, pass_name, shape_name, dtype, components):
    why = runnable(name, DEVICE)
    if why:
        pytest.skip(why)
    shape = SHAPES[DEVICE.type][shape_name]
    benchmark.group = f"{shape_name} {str(dtype)[6:]} {pass_name} K={components}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
    grad_out = torch.randn(shape, device=DEVICE, dtype=dtype, generator=g)
    module = make_module(name, shape[1], components, DEVICE, dtype)
    run = pass_function(module, pass_name, x, grad_out)

    def timed():
        run()
        synchronize(DEVICE)

    timed()  # compile and warm up outside the timed rounds
    benchmark.pedantic(timed, rounds=5 if name in SLOW else 20, warmup_rounds=1)
