"""pytest-benchmark: the host (Python) cost of the fused loss wrappers, without a GPU.

At the heads' real sizes the fused path is host-bound on a GPU (see bench/RESULTS.md), so the Python work
around the launches matters. Here the Triton launches are replaced by no-ops and the wrappers run on CPU
tensors: what is timed is validation, the autograd Function, allocations, views and the small torch ops,
not Triton's own launcher (that needs a driver) and not any kernel. Forward only: the CPU backward would
time real CPU arithmetic (the gradient scale) instead of host overhead.
    python -m pytest bench/bench_host.py --benchmark-only
The "whole loss" group times a step's loss both ways at the headline shape with S = 4 stages: the per-stage
calls engine/distiller.py made before hcd_loss (4 x hcd_head_loss + student_loss and the sums of their parts),
and the one hcd_loss call it makes now (x_students already stacked: the distiller's torch.stack is one launch
outside the call, and on CPU it would time a real 3 MB copy).
"""
import pytest
import torch

import hcd.kernels as kernels
from hcd.engine.bench.shapes import STUDENT_SHAPES, headline_shape
from hcd.kernels import HCDLossConfig, hcd_head_loss, hcd_loss, student_loss
from hcd.kernels.testing import make_inputs, make_loss_inputs

HEAD_ARGS = ("x_student", "x_teacher", "weight", "bias", "teacher_logits", "student_logits", "target")


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def no_launches(monkeypatch):
    import hcd.kernels.gemm as gemm
    import hcd.kernels.hcd_head as head
    import hcd.kernels.hcd_step as step
    import hcd.kernels.student as student
    for module, name in ((gemm, "_gemm_kernel"), (head, "_head_row_kernel"), (student, "_student_row_kernel"),
                         (step, "_loss_row_kernel"), (step, "_dz_sum_kernel")):
        monkeypatch.setattr(module, name, _NoLaunch())
    monkeypatch.setattr(kernels, "resolve_backend", lambda backend, device: "triton")  # no interpreter check


def test_head_forward_host(benchmark, no_launches):
    case = headline_shape()
    inp = make_inputs(case, torch.float32)
    args = [inp[k] for k in HEAD_ARGS]
    cfg = HCDLossConfig(n_sublogits=case.n)
    benchmark.group = "host cost, Triton launches stubbed, B256 C1000 n4"
    benchmark(lambda: hcd_head_loss(*args, cfg, backend="triton"))


def test_student_forward_host(benchmark, no_launches):
    inp = make_inputs(STUDENT_SHAPES[-1], torch.float32)
    cfg = HCDLossConfig()
    benchmark.group = "host cost, Triton launches stubbed, B256 C1000 n4"
    benchmark(lambda: student_loss(inp["student_logits"], inp["teacher_logits"], inp["target"], cfg,
                                   backend="triton"))


STAGES = (1, 2, 3, 4)
WHOLE = "host cost of a step's loss, Triton launches stubbed, S=4 B256 C1000 n4 Dp=Dt=768"


@pytest.fixture(scope="module")
def step_inputs():
    case = headline_shape()
    return make_loss_inputs(case, len(STAGES), torch.float32), HCDLossConfig(n_sublogits=case.n)


def test_loss_per_stage_calls_host(benchmark, no_launches, step_inputs):
    """What HCDDistiller.forward did before hcd_loss: student_loss, then per stage hcd_head_loss on that stage's
    own weight and bias (separate parameters), adding totals and parts."""
    t, cfg = step_inputs
    x_s = [x.detach().clone().requires_grad_() for x in t["x_students"]]
    w = [x.detach().clone().requires_grad_() for x in t["weights"]]
    b = [x.detach().clone().requires_grad_() for x in t["biases"]]
    zt, zs, y, dtype = t["teacher_logits"], t["student_logits"], t["target"], t["student_logits"].dtype

    def per_stage():
        total, parts = student_loss(zs, zt, y, cfg, backend="triton")
        sums = {"sce": 0.0, "skl": 0.0, "ol": 0.0}
        for s, stage in enumerate(STAGES):
            head_total, head = hcd_head_loss(x_s[s].to(dtype), t["x_teacher"].to(dtype), w[s], b[s], zt, zs, y, cfg,
                                             backend="triton")
            total = total + head_total
            for key, name in (("sce", "ce"), ("skl", "kl"), ("ol", "ol")):
                parts[f"{key}{stage}"] = head[name]
                sums[key] = sums[key] + head[name]
        parts.update(sums)
        return total, parts
    benchmark.group = WHOLE
    benchmark(per_stage)


def test_loss_one_call_host(benchmark, no_launches, step_inputs):
    t, cfg = step_inputs
    args = [t[k] for k in ("x_students", "x_teacher", "weights", "biases", "teacher_logits", "student_logits",
                           "target")]
    benchmark.group = WHOLE
    benchmark(lambda: hcd_loss(*args, cfg, backend="triton", stages=STAGES))
