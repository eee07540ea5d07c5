"""`hcd bench` on CPU: it runs what fits, marks the interpreter, and writes the documented JSON schema.
(Correctness of the report only: the timings themselves are never asserted.)"""
import json

from engine.bench import format_table, head_cost, run_bench
from kernels.compare import Case


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
    out = capsys.readouterr().out
    assert "eag/fus" in out and "vs KD" in out and str(files[0]) in out


def test_cost_model_counts_the_three_gemms():
    case = Case(256, 1000, 4, 768, 768)
    gemm = 2 * case.B * case.n * case.C * (case.Dp + case.Dt)
    f_fwd, b_fwd = head_cost(case, 2, "forward")
    f_full, b_full = head_cost(case, 2, "full")
    assert gemm <= f_fwd < 1.2 * gemm
    assert 3 * gemm <= f_full < 3.3 * gemm and b_full > b_fwd > 0


def test_table_leaves_interpreter_rows_out_of_ratios():
    row = {"kernel": "head", "shape": {"B": 2, "C": 3, "n": 2, "Dp": 4, "Dt": 4}, "dtype": "fp32",
           "mode": "full", "eager_ms": 1.0, "compile_ms": 2.0, "fused_ms": 100.0, "interpreter": True}
    line = format_table([row]).splitlines()[2]
    assert "100.000i" in line and "0.01" not in line
