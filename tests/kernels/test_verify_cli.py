"""`hcd verify --quick` on CPU: runs the interpreter by itself, prints the table, exits 0."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_verify_quick_cli_on_cpu():
    # Without TRITON_INTERPRET in the environment: verify must turn the interpreter on itself.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-m", "engine.cli", "verify", "--quick", "--device", "cpu"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(l.split()[:2] == ["shape", "loss"] for l in lines), out.stdout
    for output in ("loss", "dx_s", "dx_t", "dW", "db", "dz_s"):
        assert any(l.split()[3:4] == [output] and l.split()[2] == "float16" for l in lines), output
    assert "FAIL" not in out.stdout and "all outputs pass" in out.stdout


def test_verify_rejects_unknown_device():
    from engine.verify import run_verify
    assert run_verify(device="tpu") == 2
