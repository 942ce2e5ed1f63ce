"""The instruction census (benchmarks/census.py) and the launch counts it reports.

The launch counts are pinned to their current values: a change of the host
code that adds or removes kernel launches or ATen ops per step must update
them here, on purpose. The census itself runs for the K=3 float32 rows (NCHW
and channels_last, the README's shape) in a child process, since Triton
compiles real kernels only outside the interpreter these tests use on CPU
machines; the instruction targets of a training step are held there.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import census as census_tool  # noqa: E402
import launch_counts  # noqa: E402

CENSUS_SHAPE = "256x128x36x36"
# Steady-state SASS instructions per element of a K=3 float32 NCHW training
# step (update="weight"), at most; channels_last at most this multiple of it.
TRAIN_STEP_TARGET = {"cuda": 200, "triton": 240}
CHANNELS_LAST_FACTOR = 1.3

# (ATen ops, fused operators, Triton kernels) per phase, measured with torch 2.13.
EXPECTED_LAUNCHES = {
    "cpp": {
        "train weight": (1, 2, 0),
        "train moving_average": (1, 3, 0),
        "eval weight": (0, 1, 0),
        "eval moving_average": (0, 1, 0),
    },
    "triton": {
        "train weight": (1, 2, 7),
        "train moving_average": (1, 3, 6),
        "eval weight": (0, 1, 1),
        "eval moving_average": (0, 1, 1),
    },
}
TRITON_TRAIN_KERNELS = {
    "_stats_partials_kernel": 1, "_stats_finalize_kernel": 1, "_normalize_kernel": 1,
    "_backward_reduce_kernel": 1, "_statistic_gradients_kernel": 1,
    "_backward_elementwise_kernel": 1, "_mixture_gradients_kernel": 1,
}
# The Triton host code adds no ATen op of its own to a step: a training step's
# only one is the running-statistics update of functional.uan.
TRITON_TRAIN_WEIGHT_ATEN = {"aten::_foreach_lerp_": 1}


def _as_json(counts):
    return {b: c if isinstance(c, str) else {p: vars(v) for p, v in c.items()} for b, c in counts.items()}


@pytest.fixture(scope="module")
def counts():
    return launch_counts.count_launches()


@pytest.mark.parametrize("backend", sorted(EXPECTED_LAUNCHES))
def test_launch_counts_are_pinned_and_stable(counts, backend):
    if isinstance(counts[backend], str):
        pytest.skip(counts[backend])
    for phase, expected in EXPECTED_LAUNCHES[backend].items():
        count = counts[backend][phase]
        assert (count.aten_ops, count.fused_ops, count.triton_kernels) == expected, (phase, count)
        assert sum(count.aten_by_name.values()) == count.aten_ops
        assert launch_counts.count_phase(backend, phase) == count  # stable from one step to the next
    if backend == "triton":
        assert counts["triton"]["train weight"].triton_by_name == TRITON_TRAIN_KERNELS
        assert counts["triton"]["train weight"].aten_by_name == TRITON_TRAIN_WEIGHT_ATEN


# Kernel launches on a GPU per training step (forward + backward, autograd's
# accumulation into .grad not counted) and per eval forward.
LAUNCH_TARGETS = {"train weight": 8, "train moving_average": 8, "eval weight": 1, "eval moving_average": 1}


@pytest.mark.parametrize("backend", sorted(EXPECTED_LAUNCHES))
def test_backends_meet_the_launch_targets(counts, backend):
    if isinstance(counts[backend], str):
        pytest.skip(counts[backend])
    kernels = census_tool.fused_operator_kernels(backend)
    for phase, target in LAUNCH_TARGETS.items():
        count = counts[backend][phase]
        launches = census_tool.gpu_launches({**vars(count), "cuda_pass_kernels": kernels.get(phase, 0)})
        assert launches <= target, (phase, launches, count)


def test_views_and_allocations_are_not_counted(counts):
    for phases in counts.values():
        if isinstance(phases, str):
            continue
        for count in phases.values():
            assert not set(count.aten_by_name) & launch_counts.NO_KERNEL_OPS


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    """census.py --ci on the K=3 float32 rows of one shape: exit status, JSON report, Markdown."""
    out = tmp_path_factory.mktemp("census")
    backends = ["cuda", "triton"] if shutil.which("nvcc") else ["triton"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "census.py"), "--ci", "--backends", *backends, "--dtypes", "float32",
         "--layouts", "nchw", "channels_last", "--components", "3", "--shapes", CENSUS_SHAPE,
         "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "census.json").read_text()), (out / "census.md").read_text()


def test_census_ci_row_passes(census):
    report, markdown = census
    assert report["errors"] == []
    for layout in ("nchw", "channels_last"):
        assert f"| float32 | {layout} | 3 | {CENSUS_SHAPE} |" in markdown
    assert "instructions/element" in markdown  # the budget arithmetic


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_census_counts_every_kernel_without_spills(census, backend):
    if backend == "cuda" and not shutil.which("nvcc"):
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compiled here")
    report, _ = census
    kernels = [k for k in report["kernels"] if k["backend"] == backend]
    passes = {k["pass_name"] for k in kernels}
    assert passes == {"statistics", "normalize", "backward reduce", "backward elementwise", "eval"}
    for k in kernels:
        assert not k["error"], k
        assert k["registers"] > 0 and k["occupancy"] > 0, k
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, k
        if k["per_element_kernel"]:
            assert k["iteration_instructions"] > 0 and k["instructions_per_element"] > 0, k
            assert k["elements_per_thread_per_iteration"] > 0, k
    for summary in [c for c in report["cases"] if c["backend"] == backend]:
        assert summary["budget_train_step"] == pytest.approx(316, abs=1)
        for update in ("weight", "moving_average"):
            assert summary["train_step"][update] > summary["eval_forward"] > 0


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_training_step_meets_the_instruction_targets(census, backend):
    if backend == "cuda" and not shutil.which("nvcc"):
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compiled here")
    report, _ = census
    steps = {c["layout"]: c["train_step"] for c in report["cases"] if c["backend"] == backend}
    assert steps["nchw"]["weight"] <= TRAIN_STEP_TARGET[backend], steps
    for update in ("weight", "moving_average"):
        assert steps["channels_last"][update] <= CHANNELS_LAST_FACTOR * steps["nchw"][update], (update, steps)


def test_census_reports_the_launch_counts(census, counts):
    report, _ = census
    reported = report["launch_counts"]
    for backend, phases in _as_json(counts).items():
        if isinstance(phases, str):
            continue
        for phase, count in phases.items():
            assert {k: v for k, v in reported[backend][phase].items() if k != "cuda_pass_kernels"} == count
