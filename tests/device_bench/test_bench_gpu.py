"""device_bench/bench_gpu.py: argument parsing and the clean exit (status 2) on a machine without CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_shapes_parse_as_out_by_in():
    from salr_edge.device_bench.bench_gpu import _parse_args, _parse_shapes

    assert _parse_shapes("4096x4096,4096X14336") == [(4096, 4096), (4096, 14336)]
    args = _parse_args([])
    assert (args.shapes, args.m, args.sparsity) == ("4096x4096,4096x14336", "1,2048", 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_exits_2_without_cuda(tmp_path, capsys):
    from salr_edge.device_bench.bench_gpu import main

    assert main(["--out-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written
