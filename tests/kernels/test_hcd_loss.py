"""hcd_loss, the one call per step: the eager composition against the per-stage public calls in float64, the
fused path (Triton interpreter on CPU) against float64 by kernels/testing.py's rule, its launch count, and
input validation."""
import os
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from hcd.kernels import HCDLossConfig, hcd_head_loss, hcd_loss, student_loss
from tests.kernels.helpers import Case, assert_rows_ok, check_loss, make_loss_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs compiled kernels on CUDA (TRITON_INTERPRET=0): "
                                                        "bf16 tl.dot is wrong under the interpreter")
ARGS = ("x_students", "x_teacher", "weights", "biases", "teacher_logits", "student_logits", "target")
GRADS = ("x_students", "weights", "biases", "student_logits")


def _call(t, cfg, backend, **kw):
    return hcd_loss(*(t[k] for k in ARGS), cfg, backend=backend, **kw)


def _leaves(inputs):
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in inputs.items()}


def _per_stage_composition(t, cfg, stages):
    """Today's engine path, from the public per-stage calls: student_loss + one hcd_head_loss per stage."""
    total, sp = student_loss(t["student_logits"], t["teacher_logits"], t["target"], cfg, backend="eager")
    parts = {"ce": sp["ce"], "kd": sp["kd"], "sce": 0.0, "skl": 0.0, "ol": 0.0}
    for s, stage in enumerate(stages):
        b = t["biases"][s] if t["biases"] is not None else None
        head_total, hp = hcd_head_loss(t["x_students"][s], t["x_teacher"], t["weights"][s], b, t["teacher_logits"],
                                       t["student_logits"], t["target"], cfg, backend="eager")
        total = total + head_total
        for key, name in (("sce", "ce"), ("skl", "kl"), ("ol", "ol")):
            parts[f"{key}{stage}"] = hp[name]
            parts[key] = parts[key] + hp[name]
    return total, parts


# (case, S, cfg): odd shapes, S in {1, 2, 4}, bias None, D_t = 0 (cfm_hidden), detach on/off, n = 1
EAGER_CASES = {
    "odd-S2": (Case(B=7, C=13, n=3, Dp=5, Dt=4), 2, HCDLossConfig()),
    "S1-n1": (Case(B=3, C=13, n=1, Dp=5, Dt=4), 1, HCDLossConfig(temperature=2.0, kd_temperature=3.0)),
    "S4-nobias-detach": (Case(B=7, C=13, n=3, Dp=6, Dt=3, bias=False), 4,
                         HCDLossConfig(detach_sublogit_target=True, ol_threshold=0.0)),
    "S4-Dt0-weights": (Case(B=5, C=11, n=2, Dp=8, Dt=0), 4,
                       HCDLossConfig(ce_weight=0.7, kd_weight=1.3, sublogit_kl_weight=2.0, ol_weight=3.0,
                                     student_scale=0.5, teacher_scale=1.5, label_smoothing=0.2)),
}


@pytest.mark.parametrize("name", list(EAGER_CASES))
def test_eager_matches_the_per_stage_calls_in_float64(name):
    case, S, cfg = EAGER_CASES[name]
    cfg = replace(cfg, n_sublogits=case.n)
    stages = (1, 2, 3, 4)[-S:]
    inputs = make_loss_inputs(case, S, torch.float64)
    got_t, want_t = _leaves(inputs), _leaves(inputs)
    total, parts = _call(got_t, cfg, "eager", stages=stages)
    want_total, want_parts = _per_stage_composition(want_t, cfg, stages)
    (2.5 * total).backward()
    (2.5 * want_total).backward()
    assert parts.keys() == want_parts.keys()
    torch.testing.assert_close(total, want_total, rtol=1e-12, atol=1e-14)
    for k, v in want_parts.items():
        torch.testing.assert_close(parts[k], v, rtol=1e-12, atol=1e-14, msg=k)
        assert parts[k].grad_fn is None and parts[k].dim() == 0, k
    for k in GRADS:
        if want_t[k] is not None:
            torch.testing.assert_close(got_t[k].grad, want_t[k].grad, rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("backend, dtype", [("eager", torch.float64), ("triton", torch.float32)])
def test_a_sequence_of_stages_equals_the_stacked_tensor(backend, dtype):
    case, cfg = Case(B=5, C=7, n=2, Dp=4, Dt=3), HCDLossConfig(n_sublogits=2)
    inputs = make_loss_inputs(case, 3, dtype, DEVICE)
    a, b = _leaves(inputs), _leaves(inputs)
    total_a, parts_a = _call(a, cfg, backend)
    b_list = dict(b, x_students=list(b["x_students"].unbind(0)))
    total_b, parts_b = _call(b_list, cfg, backend)
    total_a.backward()
    total_b.backward()
    assert list(parts_a) == ["ce", "kd", "sce", "skl", "ol", "sce1", "sce2", "sce3", "skl1", "skl2", "skl3",
                             "ol1", "ol2", "ol3"]
    assert torch.equal(total_a, total_b) and torch.equal(a["x_students"].grad, b["x_students"].grad)


# The fused path: per case, fp32 always and fp16 where listed; grad_output 2.5 (not 1) everywhere.
TRITON_CASES = {
    "odd-S2": (Case(B=7, C=13, n=3, Dp=5, Dt=4), 2, HCDLossConfig()),
    "S1-n1-T2": (Case(B=4, C=13, n=1, Dp=5, Dt=4), 1, HCDLossConfig(temperature=2.0, kd_temperature=2.0)),
    "S4-nobias-detach": (Case(B=5, C=13, n=3, Dp=6, Dt=3, bias=False), 4,
                         HCDLossConfig(detach_sublogit_target=True, ol_threshold=0.0)),
    "S4-Dt0-hidden": (Case(B=5, C=11, n=2, Dp=8, Dt=0), 4, HCDLossConfig(ol_weight=3.0, kd_weight=0.5)),
    "S2-offset-confident": (Case(B=5, C=21, n=4, Dp=6, Dt=5, offset=1e3, confident=True), 2,
                            HCDLossConfig(temperature=4.0, kd_temperature=2.0)),
    "S2-same-scales": (Case(B=4, C=13, n=2, Dp=5, Dt=4, same=True), 2,
                       HCDLossConfig(student_scale=0.5, teacher_scale=2.0, label_smoothing=0.0)),
}
FP16_CASES = ["odd-S2", "S4-nobias-detach", "S2-offset-confident"]


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_fp32(name):
    case, S, cfg = TRITON_CASES[name]
    assert_rows_ok(check_loss(case, cfg, torch.float32, DEVICE, grad_scale=2.5, stages=S), name)


@pytest.mark.parametrize("name", FP16_CASES)
def test_triton_fp16(name):
    case, S, cfg = TRITON_CASES[name]
    assert_rows_ok(check_loss(case, cfg, torch.float16, DEVICE, grad_scale=2.5, stages=S), name)


def test_triton_fp16_float32_weights():
    case = Case(B=6, C=13, n=3, Dp=6, Dt=5, weight_fp32=True)
    assert_rows_ok(check_loss(case, HCDLossConfig(), torch.float16, DEVICE, grad_scale=2.5, stages=2), "w fp32")


@needs_cuda
@pytest.mark.parametrize("name", ["odd-S2", "S2-offset-confident"])
def test_triton_bf16_cuda(name):
    case, S, cfg = TRITON_CASES[name]
    assert_rows_ok(check_loss(case, cfg, torch.bfloat16, DEVICE, grad_scale=2.5, stages=S), name)


# ------------------------------------------------------------------------------------------ launches

class _Launches(TorchDispatchMode):
    """Records every Triton launch of the fused modules and every torch op dispatched around them.

    Counted as device launches: each `kernel[grid](...)` of gemm._gemm_kernel, hcd_loss._loss_row_kernel and
    hcd_loss._dz_sum_kernel, and every torch op except allocations and views (which launch nothing) and the
    label-range check, which runs on CPU tensors only (on CUDA labels are not read: docs/method.md, Numerics).
    The kernels run for real; torch ops inside the interpreter's own launch are not recorded."""
    FREE = {"empty", "empty_like", "empty_strided", "transpose", "slice", "select", "unbind", "view", "t",
            "as_strided", "expand", "detach", "alias", "permute", "unsqueeze", "squeeze"}
    CPU_LABEL_CHECK = {"min", "max", "_local_scalar_dense"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.seen = []
        import hcd.kernels.gemm as gemm
        import hcd.kernels.hcd_step as fused
        for module, name in ((gemm, "_gemm_kernel"), (fused, "_loss_row_kernel"), (fused, "_dz_sum_kernel")):
            monkeypatch.setattr(module, name, self._counted(getattr(module, name), name))

    def _counted(self, kernel, name):
        outer = self

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    outer.seen.append(name)
                    with _disable_current_modes():
                        return kernel[grid](*args, **kwargs)
                return launch
        return Counted()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        if op not in self.FREE | self.CPU_LABEL_CHECK:
            self.seen.append(f"torch.{op}")
        return func(*args, **(kwargs or {}))


def test_six_launches_for_forward_and_backward(monkeypatch):
    case, cfg = Case(B=5, C=13, n=3, Dp=5, Dt=4), HCDLossConfig(n_sublogits=3)
    t = make_loss_inputs(case, 4, torch.float32, DEVICE)
    grad_output = torch.tensor(2.5, device=DEVICE)
    with _Launches(monkeypatch) as mode:
        total, parts = _call(t, cfg, "triton")
        forward = list(mode.seen)
        torch.autograd.grad(total, [t[k] for k in GRADS], grad_output)
    assert forward == ["_gemm_kernel", "_loss_row_kernel", "torch.sum"], forward
    assert mode.seen[3:] == ["_gemm_kernel", "_gemm_kernel", "_dz_sum_kernel"], mode.seen
    assert len(mode.seen) <= 6


# ---------------------------------------------------------------------------------------- behaviour

def test_stage_names_no_grad_and_float64(monkeypatch):
    case, cfg = Case(B=4, C=7, n=2, Dp=4, Dt=3), HCDLossConfig(n_sublogits=2)
    t = make_loss_inputs(case, 2, torch.float32, DEVICE)
    total, parts = _call(t, cfg, "triton", stages=(2, 4))
    assert set(parts) == {"ce", "kd", "sce", "skl", "ol", "sce2", "sce4", "skl2", "skl4", "ol2", "ol4"}
    assert all(p.grad_fn is None and p.dim() == 0 for p in parts.values()) and total.grad_fn is not None
    with torch.no_grad():
        total2, _ = _call(t, cfg, "triton")
    torch.testing.assert_close(total2, total.detach())
    # float64 is served by the reference: no fused Function runs
    import hcd.kernels.hcd_step as fused

    class NotCalled:
        @staticmethod
        def apply(*args):
            raise AssertionError("a fused kernel ran on float64 inputs")
    monkeypatch.setattr(fused, "_HCDLoss", NotCalled)
    t64 = make_loss_inputs(case, 2, torch.float64, DEVICE)
    total64, _ = _call(t64, cfg, "triton")
    total64.backward()
    assert t64["weights"].grad.dtype == torch.float64


def test_frozen_weights_with_trainable_biases():
    """db without the dW GEMM; a frozen weight gets no gradient."""
    case, cfg = Case(B=5, C=7, n=2, Dp=4, Dt=3), HCDLossConfig(n_sublogits=2)
    grads = {}
    for backend in ("triton", "eager"):
        t = make_loss_inputs(case, 2, torch.float32, DEVICE)
        t["weights"].requires_grad_(False)
        total, _ = _call(t, cfg, backend)
        (2.5 * total).backward()
        assert t["weights"].grad is None
        grads[backend] = t["biases"].grad
    assert grads["triton"] is not None and grads["triton"].shape == (2, 14)
    torch.testing.assert_close(grads["triton"], grads["eager"], rtol=0, atol=1e-5 * grads["eager"].abs().max().item())


def test_out_of_range_label_gives_nan_not_a_crash():
    from hcd.kernels.hcd_step import hcd_loss_triton
    case, cfg = Case(B=4, C=13, n=2, Dp=4, Dt=3), HCDLossConfig(n_sublogits=2)
    t = make_loss_inputs(case, 2, torch.float32, DEVICE)
    t["target"] = torch.tensor([0, 13, 2, -1], device=DEVICE)  # bypasses validation on purpose
    total, values = hcd_loss_triton(*(t[k] for k in ARGS), cfg)
    ce, kd, sce, skl, ol = values[:5]
    assert torch.isnan(total) and torch.isnan(ce) and torch.isnan(sce)
    assert torch.isfinite(kd) and torch.isfinite(skl) and torch.isfinite(ol)
    total.backward()
    assert torch.isfinite(t["x_students"].grad).all() and torch.isfinite(t["student_logits"].grad).all()


# ---------------------------------------------------------------------------------------- validation

def _bad(**changes):
    t = make_loss_inputs(Case(B=4, C=7, n=2, Dp=3, Dt=5), 2, torch.float32)
    t.update(changes)
    return t


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("changes, message", [
    (dict(x_students=torch.zeros(4, 3)), r"x_students: expected \(S, B, Dp\) with S >= 1"),
    (dict(x_students=[torch.zeros(4, 3), torch.zeros(4, 2)]), r"x_students\[1\]: expected shape"),
    (dict(x_students=[torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float16)]), r"x_students\[1\]: dtype"),
    (dict(x_students=[]), "x_students: expected"),
    (dict(x_teacher=torch.zeros(3, 5)), "x_teacher: expected shape"),
    (dict(weights=torch.zeros(2, 13, 8)), r"weights: expected shape .* = \(2, 14, 8\)"),
    (dict(weights=torch.zeros(3, 14, 8)), "weights: expected shape"),
    (dict(weights=torch.zeros(2, 14, 8, dtype=torch.float16)), "weights: dtype"),
    (dict(biases=torch.zeros(14)), "biases: expected shape"),
    (dict(student_logits=torch.zeros(4, 7, dtype=torch.float16)), "student_logits: dtype"),
    (dict(teacher_logits=torch.zeros(4, 6)), "student_logits: expected shape"),
    (dict(teacher_logits=torch.zeros(4, 7, requires_grad=True)), "teacher_logits: requires grad"),
    (dict(x_teacher=torch.zeros(4, 5, requires_grad=True)), "x_teacher: requires grad"),
    (dict(target=torch.tensor([0, 1, 7, 2])), "target: label 7"),
    (dict(target=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), "target: dtype"),
], ids=["x-2d", "x-list-shape", "x-list-dtype", "x-empty", "x_teacher", "weights-rows", "weights-stages",
        "weights-dtype", "biases", "dtype", "logits-shape", "teacher-grad", "x_teacher-grad", "label",
        "label-dtype"])
def test_value_errors_name_the_argument(backend, changes, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        _call(_bad(**changes), HCDLossConfig(n_sublogits=2), backend)


def test_stage_names_must_match_the_stage_count():
    with pytest.raises(ValueError, match="^stages: 3 names for 2 stages"):
        _call(_bad(), HCDLossConfig(n_sublogits=2), "eager", stages=(1, 2, 3))


def test_frozen_teacher_rule_only_while_autograd_records():
    t = _bad(teacher_logits=torch.zeros(4, 7, requires_grad=True))
    with torch.no_grad():
        total, _ = _call(t, HCDLossConfig(n_sublogits=2), "eager")
    assert torch.isfinite(total)


def test_compile_backend_matches_eager():
    case, cfg = Case(B=4, C=7, n=2, Dp=4, Dt=3), HCDLossConfig(n_sublogits=2)
    inputs = make_loss_inputs(case, 2, torch.float64)
    a, b = _leaves(inputs), _leaves(inputs)
    total_e, parts_e = _call(a, cfg, "eager")
    total_c, parts_c = _call(b, cfg, "compile")
    total_e.backward()
    total_c.backward()
    torch.testing.assert_close(total_c, total_e, rtol=1e-12, atol=0)
    assert parts_c.keys() == parts_e.keys()
    for k in parts_e:
        torch.testing.assert_close(parts_c[k], parts_e[k], rtol=1e-12, atol=1e-15, msg=k)
    for k in GRADS:
        torch.testing.assert_close(b[k].grad, a[k].grad, rtol=1e-12, atol=1e-15, msg=k)
