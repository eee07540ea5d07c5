"""`hcd verify --quick` on CPU: runs the interpreter by itself, prints the table, exits 0."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_verify_quick_cli_on_cpu(tmp_path):
    # Without TRITON_INTERPRET in the environment: verify must turn the interpreter on itself (a re-exec,
    # which must carry --json along).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    record = tmp_path / "verify.json"
    out = subprocess.run([sys.executable, "-m", "hcd.engine.cli", "verify", "--quick", "--device", "cpu",
                          "--json", str(record)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(l.split()[:2] == ["shape", "loss"] for l in lines), out.stdout
    for output in ("loss", "dx_s", "dx_t", "dW", "db", "dz_s"):
        assert any(l.split()[3:4] == [output] and l.split()[2] == "float16" for l in lines), output
    assert "FAIL" not in out.stdout and "all outputs pass" in out.stdout
    # the one-call loss: its parts per stage and its gradients, at the first shape in both dtypes
    for dtype in ("float32", "float16"):
        assert {l.split()[3] for l in lines if l.split()[1:3] == ["hcd_loss", dtype]} >= {"loss", "skl2", "dx_s", "dW",
                                                                                           "db", "dz_s"}, dtype
    # the baselines (loss and student gradient) at the first shape in both dtypes
    for loss in ("dkd", "dist", "ofa"):
        for dtype in ("float32", "float16"):
            assert {l.split()[3] for l in lines if l.split()[:3] == ["odd", loss, dtype]} == {"loss", "dz_s"}, loss
    # soft targets: the three HCD losses at the soft shape in both dtypes, every gradient they return
    for loss, outputs in (("head", {"ce", "ol", "dx_s", "dW", "db", "dz_t", "dz_s"}), ("student", {"ce", "dz_s"}),
                          ("hcd_loss", {"sce2", "ol2", "dx_s", "dW", "dz_s"})):
        for dtype in ("float32", "float16"):
            assert {l.split()[3] for l in lines if l.split()[:3] == ["soft", loss, dtype]} >= outputs, (loss, dtype)
    assert not any(l.split()[:2] in (["soft", "dkd"], ["soft", "dist"], ["soft", "ofa"]) for l in lines)
    # the JSON record holds the same rows as the table, with the versions that produced them
    rec = json.loads(record.read_text())
    table = [l for l in lines if l.split()[-1:] == ["ok"] or "ok  (" in l]
    assert rec["passed"] is True and rec["failed"] == 0 and rec["quick"] is True and rec["versions"]["torch"]
    assert len(rec["rows"]) == len(table) and all(r["ok"] and r["max_abs"] <= r["tol"] for r in rec["rows"])
    assert {(r["dtype"], r["output"]) for r in rec["rows"]} >= {("float16", "dW"), ("float32", "dx_s")}


def test_verify_rejects_unknown_device():
    from hcd.engine.verify import run_verify
    assert run_verify(device="tpu") == 2
