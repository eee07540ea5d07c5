"""`hcd bench` on CPU: it runs what fits, marks the interpreter, and writes the documented JSON schema.
(Correctness of the report only: the timings themselves are never asserted.)"""
import json

import pytest

from hcd.engine.bench import run_bench
from hcd.engine.bench.report import format_table


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
    assert [r["kind"] for r in res["step"]] == ["reference loop", "hcd engine", "kd engine", "vit recipe"]
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 for r in res["step"])
    assert {(r["loader"], r["split"]) for r in res["loader"]} >= {("torch", "train"), ("torch", "val")}
    assert all(r["images_per_s"] > 0 and r["images"] > 0 for r in res["loader"])
    assert res["complete"] is True
    out = capsys.readouterr().out
    assert "eag/fus" in out and "HCD/KD" in out and "breakdown of one hcd engine step" in out and str(files[0]) in out
    # --report prints the same tables from the file; a run cut short says so
    from hcd.engine.cli import main
    assert main(["bench", "--report", str(files[0])]) == 0
    again = capsys.readouterr().out
    assert format_table(res["kernel"]) in again and "HCD/KD" in again and "incomplete" not in again
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
    assert main(["bench", "--device", "cpu", "--only", "kernel,steps", "--out", str(tmp_path)]) == 2
    assert "--only: steps not among kernel, profile, step, loader" in capsys.readouterr().err


def test_bench_without_deepspeed_leaves_the_step_rows_out(tmp_path, monkeypatch, capsys):
    from hcd.engine.bench import step_rows
    monkeypatch.setattr(step_rows, "deepspeed_missing", lambda: "DeepSpeed is not installed")
    monkeypatch.setattr(step_rows, "step_rows", lambda *a, **k: pytest.fail("step rows ran without DeepSpeed"))
    assert run_bench(device="cpu", out_dir=str(tmp_path), quick=True, only=["step"]) == 0
    (path,) = tmp_path.glob("cpu-*.json")
    assert json.loads(path.read_text())["step"] == []
    assert "training steps left out: DeepSpeed is not installed" in capsys.readouterr().err


def test_bench_only_runs_the_named_sections(tmp_path, monkeypatch, capsys):
    """--only loader: no kernel, profile or step rows; the file name says which part it holds."""
    from hcd.engine.bench import loader_rows
    monkeypatch.setattr(loader_rows, "loader_rows", lambda quick: [{"loader": "torch", "split": "train", "workers": 2,
                                                                   "images": 8, "images_per_s": 1.0}])
    assert run_bench(device="cpu", out_dir=str(tmp_path), quick=True, only=["loader"]) == 0
    (path,) = tmp_path.glob("cpu-*-onlyloader.json")
    res = json.loads(path.read_text())
    assert res["kernel"] == [] and res["profile"] == [] and res["step"] == [] and len(res["loader"]) == 1
    assert "loader torch" in capsys.readouterr().out
