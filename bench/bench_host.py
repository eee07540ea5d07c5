"""pytest-benchmark: the host (Python) cost of the fused loss wrappers, without a GPU.

At the heads' real sizes the fused path is host-bound on a GPU (see bench/RESULTS.md), so the Python work
around the launches matters. Here the Triton launches are replaced by no-ops and the wrappers run on CPU
tensors: what is timed is validation, the autograd Function, allocations, views and the small torch ops,
not Triton's own launcher (that needs a driver) and not any kernel. Forward only: the CPU backward would
time real CPU arithmetic (the gradient scale) instead of host overhead.
    python -m pytest bench/bench_host.py --benchmark-only
"""
import pytest
import torch

import hcd.kernels as kernels
from hcd.engine.bench.shapes import STUDENT_SHAPES, headline_shape
from hcd.kernels import HCDLossConfig, hcd_head_loss, student_loss
from hcd.kernels.testing import make_inputs

HEAD_ARGS = ("x_student", "x_teacher", "weight", "bias", "teacher_logits", "student_logits", "target")


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def no_launches(monkeypatch):
    import hcd.kernels.gemm as gemm
    import hcd.kernels.hcd_head as head
    import hcd.kernels.student as student
    for module, name in ((gemm, "_gemm_kernel"), (head, "_head_row_kernel"), (student, "_student_row_kernel")):
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
