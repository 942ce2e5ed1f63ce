"""Float32 where the data is far from the mixture compared with its spread, on
every CPU backend (tests/checks.py; tests/test_cuda.py runs the same on a GPU):
inputs far from every component, and two tight clusters far apart."""
import pytest
import torch

import checks
from uan_kernels import _backends

CPU = torch.device("cpu")


def train_of(name):
    if name == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs the triton package")
    return _backends.resolve(name, CPU).train


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_far_from_the_mixture(backend):
    checks.check_far_from_the_mixture(train_of(backend), CPU)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_tight_clusters_far_apart(backend):
    checks.check_tight_clusters(train_of(backend), CPU)
