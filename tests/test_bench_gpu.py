"""The GPU bench and check (batchnorm.bench_gpu, benchmarks/gpu_check.sh) on a machine without CUDA.

Without a CUDA device both stop with a clear message (exit status 1); every part that does not need
CUDA (row builders, the variants, the model stand-ins, timing with a wall clock, the report) runs
here on CPU tensors at toy sizes. No assertion on a timing: only that rows are built and measured.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from batchnorm import bench, bench_gpu

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a CUDA device")
CPU = torch.device("cpu")


@no_cuda
def test_bench_device_cuda_without_a_gpu_says_so(capsys):
    assert bench.main(["--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "batchnorm bench: --device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here" in err
    assert "a CUDA build of torch" in err


@no_cuda
def test_gpu_check_script_without_a_gpu_fails_cleanly():
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 1
    assert "gpu_check: benchmarks/gpu_check.sh (python -m batchnorm.bench_gpu check) needs a CUDA GPU" in run.stderr
    assert "Traceback" not in run.stderr


def test_gpu_check_script_names_a_python_that_cannot_import_batchnorm():
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHON": "/bin/false"}, cwd=ROOT)
    assert run.returncode == 1 and "cannot import batchnorm and torch" in run.stderr


def test_bench_device_is_checked_like_every_argument(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "tpu"])
    assert exc.value.code == 2
    assert "argument --device: invalid choice: 'tpu' (choose from 'cpu', 'cuda')" in capsys.readouterr().err


@pytest.fixture
def one_thread():
    """Toy shapes on one thread (two threads on a shared machine only add waiting)."""
    before = torch.get_num_threads()
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is optional
        numba = None
    numba_before = numba.get_num_threads() if numba else None
    if numba:
        numba.set_num_threads(1)
    torch.set_num_threads(1)  # after numba's: launching numba's OpenMP pool resets the process's thread count
    assert torch.get_num_threads() == 1
    yield
    torch.set_num_threads(before)
    if numba:
        numba.set_num_threads(numba_before)


def test_every_row_builds_and_measures_on_cpu_tensors(one_thread, monkeypatch):
    """The sections' code on CPU tensors (wall clock): sweep, every variant, fused ReLU, crossover, models."""
    monkeypatch.setattr(bench_gpu, "WARMUP", 1)
    rows = bench_gpu.sweep_rows(CPU, 1, True, shapes=[((4, 3, 5, 5), "cl")])
    rows += bench_gpu.variant_rows(CPU, 1, True, shapes=[(8, 3, 4, 4)])
    rows += bench_gpu.crossover_rows(CPU, 1, True, sizes=[(4, 3, 2, 2)])
    names = [r.name for r in rows]
    expected = [f"{v} (8, 3, 4, 4) vs torch plain" for v in bench_gpu.variants(3, 8) if v != "plain"]
    assert set(expected) <= set(names) and "BN+ReLU fused (8, 3, 4, 4) vs torch BN, relu" in names
    assert names[0] == "plain (4, 3, 5, 5) channels-last"
    for r in rows:
        assert r.ours_ms > 0 and r.torch_ms > 0 and math.isfinite(r.ratio)
        assert len(r.samples["ours"]) == len(r.samples["torch"]) == 1
        assert r.name in bench_gpu.format_result(r)
    models = bench_gpu.model_rows(CPU, 1, True, small=True)
    assert [r.name for r in models] == ["model ResNet-18 (CIFAR)", "model ResNet-50"]


def test_the_resnet50_stand_in_has_torchvisions_53_batch_norms():
    model = bench_gpu.ResNet50(10, width=4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 53
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with torch.device("meta"):  # shapes only: the full-size network without allocating or initializing it
        full = bench_gpu.ResNet50()
    assert sum(p.numel() for p in full.parameters()) == 25_557_032  # torchvision's resnet50


@pytest.mark.parametrize("ratios, words", [
    ([0.5, 0.8, 0.9], "triton faster at every size measured"),
    ([1.5, 1.2], "cuDNN faster at every size measured"),
    ([0.7, 0.9, 1.1, 1.3], "faster one changes between (32, 64, 2, 2) and (32, 64, 3, 3)"),
])
def test_crossover_point_names_where_the_faster_backend_changes(ratios, words):
    rows = [bench_gpu.Result("crossover", f"triton vs cuDNN (32, 64, {i}, {i}) (1.0 MB)", r, 1.0, None)
            for i, r in enumerate(ratios, 1)]
    assert bench_gpu.crossover_point(rows) == words


def test_one_table_lists_each_check():
    table = bench_gpu.markdown_table([("no host sync: plain (train + eval step)", "ok", ""),
                                      ("model ResNet-50", "MISSED", "1.10x torch (target <= 1)")])
    assert table.splitlines()[0] == "| check | result | figure |"
    assert "| model ResNet-50 | MISSED | 1.10x torch (target <= 1) |" in table
