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


def test_whole_loss_row_reads_the_targets(monkeypatch):
    """A whole-loss row (hcd_loss, 4 heads + student) on an H200: its floor is the cost model at the card's
    peaks, and the target ratios are taken on device time, compile's also with TF32 allowed."""
    from hcd.engine.bench import kernel_rows
    from hcd.engine.bench.roofline import ROOFLINES, loss_cost
    monkeypatch.setattr(kernel_rows, "roofline_for", lambda device: ROOFLINES["H200"])
    shape = Case(256, 1000, 4, 768, 768, frozen_teacher_feature=True)
    ieee = Measured(ms={"eager": 9.0, "compile": 2.0, "triton": 0.5},
                    device={"eager": 3.0, "compile": 0.4, "triton": 0.1})
    tf32 = Measured(ms={"eager": 8.0, "compile": 1.5}, device={"eager": 2.0, "compile": 0.25})
    row = kernel_row("loss", shape, "fp32", "full", torch.device("cpu"), ieee, tf32)
    flops, moved = loss_cost(shape, 4, 4, "full")
    floor = max(flops / 67e12, moved / 4800e9) * 1e3
    assert row["stages"] == 4 and row["configs"] == ["imagenet/convnext_tiny-deit_tiny.yaml",
                                                      "imagenet/swin_tiny-resnet18.yaml"]  # both (1000, 768, 768)
    assert abs(row["floor_ms"] - floor) < 1e-12 and abs(row["fused_over_floor"] - 0.1 / floor) < 1e-9
    assert abs(row["compile_over_fused"] - 4.0) < 1e-12 and abs(row["compile_tf32_over_fused"] - 2.5) < 1e-12
    # without a device time (CPU, or a failed capture) no ratio is claimed
    cpu = kernel_row("loss", shape, "fp32", "full", torch.device("cpu"), Measured(ms={"eager": 9.0, "compile": 2.0}))
    assert cpu["fused_over_floor"] is None and cpu["compile_over_fused"] is None


def test_whole_loss_row_runs_on_cpu():
    """The CPU plan's whole-loss row at a tiny shape: eager timed, and under the interpreter the fused path
    runs (marked, no rate); the row names the stages and the configs of its head shape (none here)."""
    import os
    from hcd.engine.bench.kernel_rows import bench_kernel_row
    backends = ["eager"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    row = bench_kernel_row("loss", Case(8, 10, 2, 16, 12), "fp32", "full", torch.device("cpu"), quick=True,
                           backends=backends)
    assert row["kernel"] == "loss" and row["stages"] == 4 and row["eager_ms"] > 0 and row["configs"] == []
    assert row["interpreter"] == ("triton" in backends) and row["fused_tflops"] is None
