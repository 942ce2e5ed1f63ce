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
                         ["batchnorm2d", "uan_cpp", "uan_triton", "mixturenorm_em10"], repeats=2)


def test_rows_cover_every_runnable_implementation_and_pass(report):
    assert {(r.implementation, r.pass_name) for r in report.rows} == {
        (name, p) for name in ("batchnorm2d", "uan_cpp", "mixturenorm_em10") for p in bench.PASSES
    }
    assert "uan_triton" in report.skipped
    assert report.copy_bandwidth_gb_per_s > 0


def test_ratios_and_counted_bytes(report):
    for r in report.rows:
        assert r.median_ms > 0
        moved = bench.PASSES[r.pass_name] * 4 * 8 * 4 * 4 * 4
        assert r.gb_per_s == pytest.approx(moved / (r.median_ms * 1e-3) / 1e9)
        assert r.copy_fraction == pytest.approx(r.gb_per_s / report.copy_bandwidth_gb_per_s)
        if r.implementation == "batchnorm2d":
            assert r.vs_batchnorm == 1.0
        assert r.speedup_vs_compiled_reference is None  # the compiled reference was not measured
    assert "tiny float32" in report.em_fit_ms


def test_saved_for_backward_is_input_plus_small_statistics(report):
    saved = {r.implementation: r.saved_for_backward_mb for r in report.rows if r.pass_name == "forward+backward"}
    input_mb = 4 * 8 * 4 * 4 * 4 / 2**20
    assert input_mb <= saved["uan_cpp"] < input_mb + 0.01


def test_outputs_written(report, tmp_path):
    table = bench.format_table(report)
    assert "| (4, 8, 4, 4) | float32 | forward | uan_cpp |" in table
    bench.plot(report, str(tmp_path / "table.png"))
    assert (tmp_path / "table.png").stat().st_size > 1000
    json.dumps(asdict(report))


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="unknown implementation"):
        bench.make_module("layernorm", 4, 3, "cpu")
