"""pytest-benchmark suites: every normalisation, pass, K and dtype on this machine's device, paired.

    pytest benchmarks --benchmark-only                                   # all
    pytest benchmarks --benchmark-only --implementations batchnorm2d uan_cpp
    pytest benchmarks --benchmark-only --benchmark-save=NAME             # then --benchmark-compare

One test per case ("<shape> <dtype> <pass> K=<k>"): each benchmarked round runs
every implementation once, in a shuffled order (uan_kernels.bench.PairedRounds),
so all of them see the same load. pytest-benchmark's statistics are those of a
whole round; each implementation's median time and its ratios to BatchNorm2d
and to the compiled reference (medians of per-round ratios, with quartiles)
are in the case's extra_info, in the saved JSON. Cases come from the same
factory as the `uan-bench` table. Triton is benchmarked on GPUs only.

``test_mixture_norm_em`` ("<shape> MixtureNorm EM <backend>"): MixtureNorm's EM
operations (one EM iteration, the seeding, the training forward with EM every
step) paired with UAN's statistics pass and training forward, with the ratios
to both in extra_info, as in the table's EM section.
"""
from dataclasses import asdict

import pytest
import torch

from uan_kernels.bench import PASSES, SHAPES, PairedRounds, em_functions, make_module, pass_function, runnable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
ROUNDS = 20 if DEVICE.type == "cuda" else 5


@pytest.mark.parametrize("components", [1, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape_name", list(SHAPES[DEVICE.type]))
@pytest.mark.parametrize("pass_name", list(PASSES))
def test_paired_round(benchmark, implementations, pass_name, shape_name, dtype, components):
    names = [name for name in implementations if runnable(name, DEVICE) is None]
    shape = SHAPES[DEVICE.type][shape_name]
    benchmark.group = f"{shape_name} {str(dtype)[6:]} {pass_name} K={components}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
    grad_out = torch.randn(shape, device=DEVICE, dtype=dtype, generator=g)
    paired = PairedRounds({name: pass_function(make_module(name, shape[1], components, DEVICE, dtype), pass_name,
                                               x, grad_out) for name in names}, DEVICE)
    paired.warm_up()  # compile and size the measurements outside the timed rounds
    benchmark.pedantic(paired.round, rounds=ROUNDS, warmup_rounds=0)
    for name in names:
        benchmark.extra_info[name] = {
            "median_ms": paired.seconds(name).median * 1e3,
            "x_batchnorm2d": _as_dict(paired.ratio(name, "batchnorm2d")),
            "speedup_vs_compiled_reference": _as_dict(paired.ratio("uan_reference_compiled", name)),
        }


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("shape_name", list(SHAPES[DEVICE.type]))
def test_mixture_norm_em(benchmark, shape_name, backend):
    why = runnable(f"uan_{backend}", DEVICE)
    if why:
        pytest.skip(why)
    benchmark.group = f"{shape_name} MixtureNorm EM {backend}"
    paired = PairedRounds(em_functions(DEVICE, SHAPES[DEVICE.type][shape_name], torch.float32, 3, backend), DEVICE)
    paired.warm_up()
    benchmark.pedantic(paired.round, rounds=ROUNDS, warmup_rounds=0)
    for name in paired.functions:
        benchmark.extra_info[name] = {
            "median_ms": paired.seconds(name).median * 1e3,
            "x_uan_statistics": _as_dict(paired.ratio(name, "uan_statistics")),
            "x_uan_forward": _as_dict(paired.ratio(name, "uan_forward")),
        }


def _as_dict(spread):
    return None if spread is None else asdict(spread)
