"""backend="triton": bad inputs raise the same ValueErrors as eager; without the interpreter on CPU it refuses."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hcd.kernels import HCDLossConfig, hcd_head_loss, student_loss
from tests.kernels.helpers import Case, make_inputs

ROOT = Path(__file__).resolve().parents[2]
CFG = HCDLossConfig(n_sublogits=2)


def _head(**override):
    t = make_inputs(Case(B=4, C=7, n=2, Dp=3, Dt=5), torch.float32)
    t.update(override)
    return (t["x_student"], t["x_teacher"], t["weight"], t["bias"], t["teacher_logits"], t["student_logits"],
            t["target"])


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("override, message", [
    (dict(x_teacher=torch.zeros(3, 5)), "x_teacher"),
    (dict(weight=torch.zeros(13, 8)), "weight: 13 rows"),
    (dict(student_logits=torch.zeros(4, 7, dtype=torch.float16)), "student_logits: dtype"),
    (dict(target=torch.tensor([0, 1, 7, 2])), "target: label 7"),
    (dict(target=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), "target: dtype"),
], ids=["shape", "weight-rows", "dtype", "label", "label-dtype"])
def test_head_value_errors(backend, override, message):
    with pytest.raises(ValueError, match=message):
        hcd_head_loss(*_head(**override), CFG, backend=backend)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_student_value_errors(backend):
    z = torch.zeros(4, 7)
    with pytest.raises(ValueError, match="teacher_logits: expected shape"):
        student_loss(z, torch.zeros(4, 6), torch.zeros(4, dtype=torch.long), CFG, backend=backend)
    with pytest.raises(ValueError, match="target: label -1"):
        student_loss(z, z, torch.tensor([0, -1, 0, 0]), CFG, backend=backend)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch\nfrom kernels import HCDLossConfig, student_loss\n"
            "z = torch.zeros(2, 3)\n"
            "try:\n"
            "    student_loss(z, z, torch.zeros(2, dtype=torch.long), HCDLossConfig(), backend='triton')\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ValueError: backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1" in out.stdout
