"""The GPU kernel plan (built on any machine: nothing runs): its parts and its order."""
import torch

from hcd.engine.bench.plan import kernel_plan


def test_gpu_plan_parts_and_order():
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
