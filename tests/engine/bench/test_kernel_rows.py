"""Kernel rows' TF32 baselines (CUDA-only measurements): the flags are scoped to them, and the row keeps both
precisions apart. The timings themselves need a GPU and are never asserted."""
import torch

from hcd.engine.bench.kernel_rows import Measured, kernel_row, tf32_matmul
from hcd.kernels.testing import Case


def test_tf32_is_scoped_to_the_measurement():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    with tf32_matmul():
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == before


def test_row_keeps_ieee_and_tf32_baselines_apart():
    shape = Case(64, 100, 4, 256, 192, frozen_teacher_feature=True)
    ieee = Measured(ms={"eager": 3.0, "compile": 2.0}, device={"eager": 1.0, "compile": 0.8})
    tf32 = Measured(ms={"eager": 2.5, "compile": 1.5}, device={"eager": 0.7, "compile": 0.4})
    row = kernel_row("head", shape, "fp32", "full", torch.device("cpu"), ieee, tf32)
    assert (row["eager_ms"], row["compile_ms"]) == (3.0, 2.0)
    assert (row["eager_tf32_ms"], row["compile_tf32_ms"]) == (2.5, 1.5)
    assert row["device_tf32_ms"] == {"eager": 0.7, "compile": 0.4} and row["device_tf32_errors"] == {}
    assert "eager_tf32_ms" not in kernel_row("head", shape, "fp32", "full", torch.device("cpu"), ieee)
