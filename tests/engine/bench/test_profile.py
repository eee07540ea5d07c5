"""Per-launch profiles: one call's launches out of the profiler's events, named after the fused plan."""
import pytest

from hcd.engine.bench.profile import annotate_launches, per_launch


def test_per_launch_keeps_launch_order_and_measures_the_gaps():
    # two identical calls: gemm 0-10, row 12-15, gemm 40-60 (the GPU idled 25 us waiting for the host)
    call = [("gemm", 0.0, 10.0), ("row", 12.0, 15.0), ("gemm", 40.0, 60.0)]
    events = call + [(k, s + 100.0, e + 100.0) for k, s, e in call]
    out = per_launch(list(reversed(events)), calls=2)  # order of the profiler's list does not matter
    assert [(r["launch"], r["kernel"], r["us"]) for r in out["launches"]] == [(1, "gemm", 10.0), (2, "row", 3.0),
                                                                            (3, "gemm", 20.0)]
    assert out["kernel_us"] == 33.0 and out["span_us"] == 60.0 and out["per_call"] == 3


def test_per_launch_groups_by_name_when_calls_differ():
    events = [("a", 0.0, 4.0), ("b", 5.0, 6.0), ("a", 10.0, 12.0)]  # 3 events over 2 calls: not periodic
    out = per_launch(events, calls=2)
    assert out["span_us"] is None and out["per_call"] is None
    assert [(r["kernel"], r["count"], r["us"]) for r in out["launches"]] == [("a", 1.0, 3.0), ("b", 0.5, 0.5)]


def test_fused_launches_are_named_after_the_plan():
    launches = [{"launch": i + 1, "kernel": k, "us": us} for i, (k, us) in enumerate(
        [("_gemm_kernel", 10.0), ("_head_row_kernel", 5.0), ("reduce_kernel", 2.0), ("_gemm_kernel", 20.0),
         ("_gemm_kernel", 40.0)])]
    costs = {"z_gemm": (1e9, 1e6), "row": (1e6, 5e6), "dx_gemm": (1e9, 2e6), "dw_gemm": (2e9, 4e6)}
    annotate_launches(launches, costs)
    assert [x.get("plan") for x in launches] == ["z_gemm", "row", None, "dx_gemm", "dw_gemm"]
    assert launches[0]["tflops"] == pytest.approx(100.0) and launches[0]["gbps"] == pytest.approx(100.0)
    assert launches[4]["tflops"] == pytest.approx(50.0) and launches[1]["gbps"] == pytest.approx(1000.0)
