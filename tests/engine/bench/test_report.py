"""The tables of a results JSON: which numbers go where, and what is left out of the ratios."""
from hcd.engine.bench.report import (format_loss_targets, format_profile, format_step_table, format_table,
                                    format_tf32_table)


def test_table_leaves_interpreter_rows_out_of_ratios():
    row = {"kernel": "head", "shape": {"B": 2, "C": 3, "n": 2, "Dp": 4, "Dt": 4}, "dtype": "fp32",
           "mode": "full", "eager_ms": 1.0, "compile_ms": 2.0, "fused_ms": 100.0, "interpreter": True}
    line = format_table([row]).splitlines()[2]
    assert "100.000i" in line and "0.01" not in line


def _gpu_row(**extra):
    row = {"kernel": "head", "shape": {"B": 256, "C": 1000, "n": 4, "Dp": 768, "Dt": 768}, "dtype": "bf16",
           "mode": "full", "eager_ms": 3.0, "compile_ms": 1.2, "fused_ms": 1.5, "interpreter": False,
           "host_ms": {"triton": 0.4}, "device_ms": {"eager": 0.9, "compile": 0.3, "triton": 0.15},
           "device_errors": {}, "device_tflops": 62.5, "device_gbps": 300.0, "roofline_fraction_device": 0.12}
    row.update(extra)
    return row


def test_gpu_table_shows_both_time_bases():
    lines = format_table([_gpu_row()]).splitlines()
    assert "g.fused" in lines[0] and "host" in lines[0]
    cells = lines[2].split()
    assert cells[cells.index("|") + 1:cells.index("|") + 6] == ["0.900", "0.300", "0.150", "6.00", "2.00"]
    assert cells[cells.index("|") - 1] == "0.400" and "12%" in cells  # host time, device roofline
    assert ["2.00", "0.80"] == cells[11:13]  # launch-inclusive ratios: 3.0/1.5, 1.2/1.5 (after B C n Dp Dt)


def test_gpu_table_reports_a_failed_capture():
    row = _gpu_row(device_ms={"eager": 0.9, "compile": None, "triton": 0.15},
                   device_errors={"compile": "RuntimeError: operation not permitted when stream is capturing"})
    text = format_table([row])
    assert "graph capture failed, compile: RuntimeError: operation not permitted" in text
    assert text.splitlines()[2].split()[-5] == "-"  # cmp/fus on device time: no ratio without a number


def test_profile_table_lists_the_fused_launches():
    fused = {"dtype": "bf16", "backend": "triton", "host_ms": 0.25, "error": None, "per_call": 2,
             "kernel_us": 30.0, "span_us": 80.0,
             "launches": [{"launch": 1, "kernel": "_gemm_kernel", "us": 20.0},
                          {"launch": 2, "kernel": "_head_row_kernel", "us": 10.0}]}
    eager = {"dtype": "bf16", "backend": "eager", "host_ms": 1.0, "error": None, "per_call": None,
             "kernel_us": 90.0, "span_us": None, "launches": [{"launch": None, "kernel": "k", "count": 40, "us": 90.0}]}
    for r in (eager, fused):
        r["shape"] = {"B": 256, "C": 1000, "n": 4, "Dp": 512, "Dt": 192}
    text = format_profile([eager, fused])
    assert text.startswith("profile: head B=256 C=1000 n=4 Dp=512 Dt=192 full")
    assert "bf16  eager          40      90.0        -   1000.0" in text
    assert "bf16  triton          2      30.0     80.0    250.0" in text
    assert "bf16 fused launches (us): _gemm_kernel 20.0, _head_row_kernel 10.0" in text


def test_tf32_table_lists_fp32_rows_with_both_precisions():
    row = _gpu_row(dtype="fp32", eager_tf32_ms=2.0, compile_tf32_ms=0.9, device_tf32_ms={"eager": 0.5, "compile": 0.2},
                   device_tf32_errors={})
    text = format_tf32_table([_gpu_row(), row])  # the bf16 row has no TF32 measurement: left out
    lines = text.splitlines()
    assert len(lines) == 4 and "e.tf32" in lines[0] and "g.c.tf32" in lines[0]
    cells = lines[2].split()
    assert cells[5:11] == ["3.000", "2.000", "1.200", "0.900", "1.500", "0.60"]  # eager, e.tf32, compile, c.tf32, fused
    assert cells[-3:] == ["0.200", "0.150", "1.33"]  # device: compile tf32, fused, ratio
    assert format_tf32_table([_gpu_row()]) == ""


def test_step_table_shows_images_per_s_ratios_and_the_breakdown():
    setup = {"config": "imagenet/swin_tiny-resnet18.yaml", "precision": "bf16", "zero_stage": 1, "loss_backend": "triton"}
    bd = {"teacher forward": {"host_ms": 1.0, "device_ms": 20.0}, "total": {"host_ms": 9.0, "device_ms": 60.0}}
    rows = [{"name": "reference loop x", "kind": "reference loop", "ms": 100.0, "images_per_s": 1280.0, "setup": setup},
            {"name": "hcd engine x", "kind": "hcd engine", "ms": 50.0, "images_per_s": 2560.0, "vs_reference": 2.0,
             "hcd_vs_kd": 1.04, "setup": setup, "breakdown": bd}]
    text = format_step_table(rows)
    assert text.startswith("step: imagenet/swin_tiny-resnet18.yaml bf16 ZeRO-1")
    assert "hcd engine x" in text and "2560.0" in text and "2.00" in text and "1.04" in text
    assert "breakdown of one hcd engine step" in text
    assert [line.split()[-2:] for line in text.splitlines()[-2:]] == [["1.00", "20.00"], ["9.00", "60.00"]]


def test_step_table_reads_an_earlier_results_file():
    """Step rows of an earlier hcd bench (no setup config, vs_kd instead of hcd_vs_kd) still print."""
    rows = [{"name": "hcd engine swin->resnet18@224/B128", "ms": 37.75, "vs_eager": 1.13, "vs_kd": 1.12,
             "setup": {"teacher": "swin_tiny_patch4_window7_224"}}]
    lines = format_step_table(rows).splitlines()
    assert lines[0].startswith("step rows of an earlier hcd bench") and lines[2].split()[-3:] == ["-", "-", "1.12"]


def test_loss_targets_table_reads_one_row():
    """The whole loss's row on a GPU: device times, the floor and the target ratios in one line; rows without
    device time (CPU) and other kernels give no table."""
    row = _gpu_row(kernel="loss", dtype="fp32", stages=4, device_ms={"eager": 2.0, "compile": 0.4, "triton": 0.1},
                   device_tf32_ms={"eager": 1.0, "compile": 0.25}, floor_ms=0.048, fused_over_floor=2.0833,
                   compile_over_fused=4.0, compile_tf32_over_fused=2.5)
    lines = format_loss_targets([_gpu_row(), row]).splitlines()
    assert len(lines) == 4 and "fus/flr" in lines[0] and "ctf/fus" in lines[0]
    assert lines[2].split()[7:] == ["0.100", "0.0480", "2.08", "0.400", "4.00", "0.250", "2.50"]
    assert format_loss_targets([_gpu_row()]) == ""
    cpu = {k: v for k, v in row.items() if k not in ("device_ms", "host_ms")}
    assert format_loss_targets([cpu]) == ""
    assert "loss = hcd_loss, the whole loss of a step: 4 heads" in format_table([row])
