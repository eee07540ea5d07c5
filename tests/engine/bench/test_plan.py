"""The GPU kernel plan (built on any machine: nothing runs): its parts and its order."""
import torch

from hcd.engine.bench.plan import kernel_plan


def test_gpu_plan_parts_and_order():
    cuda = torch.device("cuda")  # the plan only: nothing runs
    full = kernel_plan(cuda, quick=False)
    # (B, C) per dataset x the shipped configs' distinct (Dp, Dt): CIFAR-100 4, ImageNet 2; n in {2, 4, 8}
    shapes = {r[1] for r in full if r[0] == "head"}
    assert len(shapes) == 6 * 3
    # shapes x dtypes x (modes of the head + the whole loss, full) + student shapes x dtypes
    assert len(full) == len(shapes) * 3 * (3 + 1) + 2 * 3
    assert {r[1] for r in full if r[0] == "loss"} == shapes and {r[3] for r in full if r[0] == "loss"} == {"full"}
    first = full[0][1]  # the whole loss at the headline shape in bf16 first: what issue 14's targets read
    assert (first.B, first.C, first.n, first.Dp, first.Dt) == (256, 1000, 4, 768, 768) and full[0][2] == "bf16"
    assert full[0][0] == "loss" and full[1][:4] == ("head", first, "bf16", "forward")
    quick = kernel_plan(cuda, quick=True)
    assert {r[2] for r in quick} == {"bf16", "fp32"} and {r[1].n for r in quick if r[0] == "head"} == {4}
    assert {(r[1].C, r[1].Dp, r[1].Dt) for r in quick if r[0] == "head"} == {(100, 768, 768), (1000, 768, 768)}
    part = kernel_plan(cuda, quick=False, dtypes=["fp16"], ns=[2, 8])
    assert {r[2] for r in part} == {"fp16"} and {r[1].n for r in part if r[0] == "head"} == {2, 8}
    assert len(part) == 6 * 2 * (3 + 1) + 2 and part[0][1].C == 1000


def test_cpu_plan_has_the_whole_loss(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = [r for r in kernel_plan(cpu, quick=True) if r[0] == "loss"]
    assert [(r[2], r[3], r[4]) for r in rows] == [("fp32", "full", ["eager", "compile"])]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # and the fused path in the interpreter, at the tiny shape
    assert [r[4] for r in kernel_plan(cpu, quick=False) if r[0] == "loss"][-1] == ["eager", "triton"]
    assert [r[4] for r in kernel_plan(cpu, quick=True) if r[0] == "loss"] == [["eager", "compile"]]  # ~10 s a call
