"""The benchmark table machinery on a tiny case: rows, ratios, saved bytes, outputs."""
import json
import os
from dataclasses import asdict

import pytest
import torch

from uan_kernels import bench


@pytest.fixture(scope="module")
def report():
    return bench.measure(torch.device("cpu"), {"tiny": (4, 8, 4, 4)}, [torch.float32], 3,
                         ["batchnorm2d", "uan_cpp", "uan_triton", "mixturenorm_em10"], rounds=3, thread_counts=[2, 1])


def test_rows_cover_every_runnable_implementation_and_pass(report):
    assert sorted((r.threads, r.implementation, r.pass_name) for r in report.rows) == sorted(
        (t, name, p) for t in (2, 1) for name in ("batchnorm2d", "uan_cpp", "mixturenorm_em10") for p in bench.PASSES
    )
    assert all(r.rounds == 3 for r in report.rows)
    assert "uan_triton" in report.skipped
    assert report.copy_bandwidth_gb_per_s > 0


def test_ratios_and_counted_bytes(report):
    for r in report.rows:
        assert r.median_ms > 0
        moved = bench.PASSES[r.pass_name] * 4 * 8 * 4 * 4 * 4
        assert r.gb_per_s == pytest.approx(moved / (r.median_ms * 1e-3) / 1e9)
        assert r.copy_fraction == pytest.approx(r.gb_per_s / report.copy_bandwidth_gb_per_s)
        assert r.ms.min <= r.ms.q1 <= r.median_ms <= r.ms.q3 <= r.ms.max
        if r.implementation == "batchnorm2d":
            assert asdict(r.vs_batchnorm) == dict(median=1.0, q1=1.0, q3=1.0, min=1.0, max=1.0)
        assert r.speedup_vs_compiled_reference is None  # the compiled reference was not measured
    assert sorted((r.threads, r.operation) for r in report.em) == sorted(
        (t, op) for t in (2, 1) for op in bench.EM_OPERATIONS
    )
    for r in report.em:
        assert r.backend == "cpp" and r.rounds == 3 and r.ms.median > 0
        assert r.vs_uan_statistics.min > 0 and r.vs_uan_forward.min > 0
        if r.operation == "uan_statistics":
            assert asdict(r.vs_uan_statistics) == dict(median=1.0, q1=1.0, q3=1.0, min=1.0, max=1.0)


def test_saved_for_backward_is_input_plus_small_statistics(report):
    saved = {r.implementation: r.saved_for_backward_mb for r in report.rows if r.pass_name == "forward+backward"}
    input_mb = 4 * 8 * 4 * 4 * 4 / 2**20
    assert input_mb <= saved["uan_cpp"] < input_mb + 0.01


def test_outputs_written(report, tmp_path):
    table = bench.format_table(report)
    assert "| 1 | (4, 8, 4, 4) | float32 | forward | uan_cpp |" in table
    assert "| 2 | (4, 8, 4, 4) | float32 | cpp | em_iteration_full |" in table
    bench.plot(report, str(tmp_path / "table.png"))
    assert (tmp_path / "table.png").stat().st_size > 1000
    json.dumps(asdict(report))


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="unknown implementation"):
        bench.make_module("layernorm", 4, 3, "cpu")


def test_paired_ratios_are_taken_within_rounds():
    """A ratio is the median of per-round ratios: a load change that slows
    both sides of one round leaves it unchanged, unlike a ratio of medians."""
    paired = bench.PairedRounds({"a": lambda: None, "b": lambda: None}, torch.device("cpu"))
    paired.times = {"a": [1.0, 10.0, 1.0, 10.0, 10.0], "b": [2.0, 20.0, 2.0, 20.0, 20.0]}
    assert asdict(paired.ratio("a", "b")) == dict(median=0.5, q1=0.5, q3=0.5, min=0.5, max=0.5)
    assert paired.ratio("a", "missing") is None


def test_paired_rounds_run_every_implementation_once_per_round_in_shuffled_orders():
    calls = []
    paired = bench.PairedRounds({name: (lambda name=name: calls.append(name)) for name in "abcd"},
                                torch.device("cpu"), seed=3)
    paired.warm_up()
    calls.clear()
    for _ in range(6):
        paired.round()
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1
    assert all(len(t) == 6 for t in paired.times.values())
