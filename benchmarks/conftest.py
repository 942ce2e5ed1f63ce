"""Benchmarks are pytest-benchmark suites: `pytest benchmarks --benchmark-only`."""
import pytest
import torch

from uan_kernels.bench import IMPLEMENTATIONS


def pytest_addoption(parser):
    parser.addoption("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                     help="implementations measured in each paired round (default: all)")


@pytest.fixture
def implementations(request):
    return request.config.getoption("--implementations")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
