"""`hcd bench` on CPU: it runs what fits, marks the interpreter, and writes the documented JSON schema.
(Correctness of the report only: the timings themselves are never asserted.)"""
import json

import pytest

from hcd.engine.bench import format_table, head_cost, run_bench
from hcd.kernels.testing import Case


def test_bench_quick_writes_the_schema(tmp_path, capsys):
    assert run_bench(device="cpu", out_dir=str(tmp_path), quick=True) == 0
    files = list(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    res = json.loads(files[0].read_text())
    assert {"device", "commit", "versions", "kernel", "step", "loader"} <= set(res)
    assert res["versions"]["torch"]
    for row in res["kernel"]:
        assert set(row["shape"]) == {"B", "C", "n", "Dp", "Dt"}
        assert row["dtype"] in ("fp32", "bf16", "fp16") and row["mode"] in ("forward", "backward", "full")
        assert row["eager_ms"] > 0
        assert {"compile_ms", "fused_ms", "fused_tflops", "fused_gbps", "peak_mem_mb"} <= set(row)
        if row["fused_ms"] is not None:  # on CPU only ever the interpreter: no speed claimed from it
            assert row["interpreter"] and row["fused_tflops"] is None and row["fused_gbps"] is None
    assert any(r["interpreter"] for r in res["kernel"])  # tests run with TRITON_INTERPRET=1
    kinds = {r["kind"] for r in res["step"]}
    assert kinds == {"hcd engine", "hcd eager", "kd engine"}
    assert all(r["ms"] > 0 for r in res["step"])
    assert {(r["loader"], r["split"]) for r in res["loader"]} >= {("torch", "train"), ("torch", "val")}
    assert all(r["images_per_s"] > 0 and r["images"] > 0 for r in res["loader"])
    assert res["complete"] is True
    out = capsys.readouterr().out
    assert "eag/fus" in out and "vs KD" in out and str(files[0]) in out
    # --report prints the same tables from the file; a run cut short says so
    from hcd.engine.cli import main
    assert main(["bench", "--report", str(files[0])]) == 0
    again = capsys.readouterr().out
    assert format_table(res["kernel"]) in again and "vs KD" in again and "incomplete" not in again
    res["complete"], res["step"] = False, []
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(res))
    assert main(["bench", "--report", str(cut)]) == 0
    assert "(incomplete: the run stopped before its last section)" in capsys.readouterr().out
    assert main(["bench", "--report", str(tmp_path / "missing.json")]) == 2
    assert "--report" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("[1, 2]")
    assert main(["bench", "--report", str(tmp_path / "other.json")]) == 2
    assert "not an hcd bench results file" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial.json"))  # the finished run replaced its partial file
    # parts of the plan are a CUDA notion: refused on CPU rather than silently ignored
    assert main(["bench", "--device", "cpu", "--n", "2", "--out", str(tmp_path)]) == 2
    assert "--dtype/--n" in capsys.readouterr().err


def test_cost_model_counts_the_three_gemms():
    case = Case(256, 1000, 4, 768, 768)
    gemm = 2 * case.B * case.n * case.C * (case.Dp + case.Dt)
    f_fwd, b_fwd = head_cost(case, 2, "forward")
    f_full, b_full = head_cost(case, 2, "full")
    assert gemm <= f_fwd < 1.2 * gemm
    assert 3 * gemm <= f_full < 3.3 * gemm and b_full > b_fwd > 0
    # as in training (hcd.engine.bench_shapes): a frozen teacher feature, dX over the Dp columns only
    frozen = Case(256, 1000, 4, 768, 768, frozen_teacher_feature=True)
    f_frozen, b_frozen = head_cost(frozen, 2, "full")
    assert f_frozen == f_full - 2 * case.B * case.n * case.C * case.Dt and b_frozen < b_full
    assert head_cost(frozen, 2, "forward") == (f_fwd, b_fwd)


def test_table_leaves_interpreter_rows_out_of_ratios():
    row = {"kernel": "head", "shape": {"B": 2, "C": 3, "n": 2, "Dp": 4, "Dt": 4}, "dtype": "fp32",
           "mode": "full", "eager_ms": 1.0, "compile_ms": 2.0, "fused_ms": 100.0, "interpreter": True}
    line = format_table([row]).splitlines()[2]
    assert "100.000i" in line and "0.01" not in line


def test_per_launch_keeps_launch_order_and_measures_the_gaps():
    from hcd.engine.timing import per_launch
    # two identical calls: gemm 0-10, row 12-15, gemm 40-60 (the GPU idled 25 us waiting for the host)
    call = [("gemm", 0.0, 10.0), ("row", 12.0, 15.0), ("gemm", 40.0, 60.0)]
    events = call + [(k, s + 100.0, e + 100.0) for k, s, e in call]
    out = per_launch(list(reversed(events)), calls=2)  # order of the profiler's list does not matter
    assert [(r["launch"], r["kernel"], r["us"]) for r in out["launches"]] == [(1, "gemm", 10.0), (2, "row", 3.0),
                                                                            (3, "gemm", 20.0)]
    assert out["kernel_us"] == 33.0 and out["span_us"] == 60.0 and out["per_call"] == 3


def test_per_launch_groups_by_name_when_calls_differ():
    from hcd.engine.timing import per_launch
    events = [("a", 0.0, 4.0), ("b", 5.0, 6.0), ("a", 10.0, 12.0)]  # 3 events over 2 calls: not periodic
    out = per_launch(events, calls=2)
    assert out["span_us"] is None and out["per_call"] is None
    assert [(r["kernel"], r["count"], r["us"]) for r in out["launches"]] == [("a", 1.0, 3.0), ("b", 0.5, 0.5)]


def _gpu_row(**extra):
    row = {"kernel": "head", "shape": {"B": 256, "C": 1000, "n": 4, "Dp": 768, "Dt": 768}, "dtype": "bf16",
           "mode": "full", "eager_ms": 3.0, "compile_ms": 1.2, "fused_ms": 1.5, "interpreter": False,
           "host_ms": {"triton": 0.4}, "device_ms": {"eager": 0.9, "compile": 0.3, "triton": 0.15},
           "device_errors": {}, "device_tflops": 62.5, "device_gbps": 300.0, "roofline_fraction_device": 0.12}
    row.update(extra)
    return row


def test_gpu_table_shows_both_time_bases():
    from hcd.engine.bench import format_table
    lines = format_table([_gpu_row()]).splitlines()
    assert "g.fused" in lines[0] and "host" in lines[0]
    cells = lines[2].split()
    assert cells[cells.index("|") + 1:cells.index("|") + 6] == ["0.900", "0.300", "0.150", "6.00", "2.00"]
    assert cells[cells.index("|") - 1] == "0.400" and "12%" in cells  # host time, device roofline
    assert ["2.00", "0.80"] == cells[11:13]  # launch-inclusive ratios: 3.0/1.5, 1.2/1.5 (after B C n Dp Dt)


def test_gpu_table_reports_a_failed_capture():
    from hcd.engine.bench import format_table
    row = _gpu_row(device_ms={"eager": 0.9, "compile": None, "triton": 0.15},
                   device_errors={"compile": "RuntimeError: operation not permitted when stream is capturing"})
    text = format_table([row])
    assert "graph capture failed, compile: RuntimeError: operation not permitted" in text
    assert text.splitlines()[2].split()[-5] == "-"  # cmp/fus on device time: no ratio without a number


def test_profile_table_lists_the_fused_launches():
    from hcd.engine.bench import format_profile
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


def test_fused_launches_are_named_after_the_plan():
    from hcd.engine.bench import annotate_launches
    launches = [{"launch": i + 1, "kernel": k, "us": us} for i, (k, us) in enumerate(
        [("_gemm_kernel", 10.0), ("_head_row_kernel", 5.0), ("reduce_kernel", 2.0), ("_gemm_kernel", 20.0),
         ("_gemm_kernel", 40.0)])]
    costs = {"z_gemm": (1e9, 1e6), "row": (1e6, 5e6), "dx_gemm": (1e9, 2e6), "dw_gemm": (2e9, 4e6)}
    annotate_launches(launches, costs)
    assert [x.get("plan") for x in launches] == ["z_gemm", "row", None, "dx_gemm", "dw_gemm"]
    assert launches[0]["tflops"] == pytest.approx(100.0) and launches[0]["gbps"] == pytest.approx(100.0)
    assert launches[4]["tflops"] == pytest.approx(50.0) and launches[1]["gbps"] == pytest.approx(1000.0)


def test_try_cuda_reports_the_first_cause_in_one_line():
    from hcd.engine.timing import try_cuda

    def capture():
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    assert try_cuda(lambda: 1.5) == (1.5, None)
    value, reason = try_cuda(capture)
    assert value is None and reason == "RuntimeError: operation not permitted when stream is capturing"


def test_gpu_plan_parts_and_order():
    import torch
    from hcd.engine.bench import kernel_plan
    cuda = torch.device("cuda")  # the plan only: nothing runs
    full = kernel_plan(cuda, quick=False)
    # (B, C) per dataset x the shipped configs' distinct (Dp, Dt): CIFAR-100 3, ImageNet 2; n in {2, 4, 8}
    shapes = {r[1] for r in full if r[0] == "head"}
    assert len(shapes) == 5 * 3
    assert len(full) == len(shapes) * 3 * 3 + 2 * 3  # shapes x dtypes x modes (head) + student shapes x dtypes
    first = full[0][1]
    assert (first.B, first.C, first.n, first.Dp, first.Dt) == (256, 1000, 4, 768, 768) and full[0][2] == "bf16"
    quick = kernel_plan(cuda, quick=True)
    assert {r[2] for r in quick} == {"bf16", "fp32"} and {r[1].n for r in quick if r[0] == "head"} == {4}
    assert {(r[1].C, r[1].Dp, r[1].Dt) for r in quick if r[0] == "head"} == {(100, 768, 768), (1000, 768, 768)}
    part = kernel_plan(cuda, quick=False, dtypes=["fp16"], ns=[2, 8])
    assert {r[2] for r in part} == {"fp16"} and {r[1].n for r in part if r[0] == "head"} == {2, 8}
    assert len(part) == 5 * 2 * 3 + 2 and part[0][1].C == 1000


def test_head_shapes_follow_the_shipped_configs():
    """Dp/Dt of every shipped CIFAR-100 / ImageNet config, as the models' widths give them (D_p = max(D_s, D_t))."""
    from hcd.engine.bench_shapes import config_widths, configs_for, gpu_head_shapes, headline_shape
    widths = {w.config: (w.C, w.Dp, w.Dt) for w in config_widths()}
    assert widths == {"cifar100/mixer_b16-resnet18.yaml": (100, 768, 768),       # Mixer-B/16 768, ResNet18 512
                      "cifar100/swin_tiny-mobilenetv2.yaml": (100, 1280, 768),   # MobileNetV2 1280
                      "cifar100/swin_tiny-resnet18.yaml": (100, 768, 768),
                      "cifar100/vit_small-resnet18.yaml": (100, 512, 384),        # ViT-S 384
                      "imagenet/deit_tiny-resnet18.yaml": (1000, 512, 192),       # DeiT-T 192
                      "imagenet/swin_tiny-resnet18.yaml": (1000, 768, 768)}
    head = headline_shape()
    assert (head.B, head.C, head.n, head.Dp, head.Dt) == (256, 1000, 4, 768, 768)
    assert all(s.frozen_teacher_feature for s in gpu_head_shapes())  # as in training: no dX for x_teacher
    assert configs_for(head) == ["imagenet/swin_tiny-resnet18.yaml"]
    cifar = [s for s in gpu_head_shapes(ns=(4,)) if s.C == 100]
    assert {(s.B, s.Dp, s.Dt) for s in cifar} == {(128, 768, 768), (128, 1280, 768), (128, 512, 384)}
    assert configs_for(next(s for s in cifar if s.Dp == 768)) == ["cifar100/mixer_b16-resnet18.yaml",
                                                                  "cifar100/swin_tiny-resnet18.yaml"]


def test_tile_sweep_marks_default_fastest_and_mismatches():
    from bench.tile_sweep import format_rows, main
    rows = [{"dtype": "bfloat16", "launch": "z_gemm", "candidate": "default", "us": 20.0, "tflops": 150.0,
             "matches_default": True, "error": None},
            {"dtype": "bfloat16", "launch": "z_gemm", "candidate": [128, 128, 64, 8, 3], "us": 15.0, "tflops": 200.0,
             "matches_default": False, "error": None},
            {"dtype": "bfloat16", "launch": "z_gemm", "candidate": [64, 256, 64, 8, 3], "us": None, "tflops": None,
             "matches_default": None, "error": "OutOfResources: shared memory"}]
    lines = format_rows(rows).splitlines()
    assert lines[1].rstrip().endswith("*")
    assert "<" in lines[2] and "output differs from the default's" in lines[2]
    assert "OutOfResources: shared memory" in lines[3] and " - " in lines[3]
    assert main([]) == 2  # no CUDA here: a clear refusal, not interpreter timings
