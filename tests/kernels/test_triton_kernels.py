"""The fused Triton losses against the float64 reference (CPU: the Triton interpreter, set by conftest).

Shapes stay small because the interpreter is slow; they are still odd on purpose (C not a power of two,
B not a multiple of any block, Dp != Dt). bf16 runs only compiled on CUDA (bf16 tl.dot is wrong in the
interpreter): on a GPU machine run `TRITON_INTERPRET=0 python -m pytest tests/kernels` (tests/conftest.py
only sets the interpreter by default).
"""
import os

import torch
import pytest

from hcd.kernels import HCDLossConfig, hcd_head_loss, student_loss
from tests.kernels.helpers import Case, assert_rows_ok, check_head, check_student, make_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs compiled kernels on CUDA (TRITON_INTERPRET=0): "
                                                        "bf16 tl.dot is wrong under the interpreter")

# (case, cfg) pairs covering n in {1,2,3,4,8}, T in {1,2,4}, theta in {0, 0.5}, detach on/off, bias None,
# teacher grad, confident rows, +-1e3 offsets, student = teacher and a float32 weight.
HEAD_CASES = {
    "odd-n3": (Case(B=47, C=123, n=3), HCDLossConfig()),
    "n1-nobias": (Case(B=5, C=123, n=1, bias=False), HCDLossConfig()),
    "n2-T2-theta0-tgrad": (Case(B=6, C=37, n=2, teacher_grad=True), HCDLossConfig(temperature=2.0, ol_threshold=0.0)),
    "n4-T4-detach-confident": (Case(B=5, C=50, n=4, confident=True, teacher_grad=True),
                               HCDLossConfig(temperature=4.0, detach_sublogit_target=True)),
    "n8-same-theta0": (Case(B=3, C=21, n=8, same=True), HCDLossConfig(ol_threshold=0.0)),
    "offset+1e3-tgrad": (Case(B=6, C=50, n=2, offset=1e3, teacher_grad=True), HCDLossConfig(temperature=2.0)),
    "offset-1e3-scales": (Case(B=6, C=50, n=3, offset=-1e3),
                          HCDLossConfig(student_scale=0.5, teacher_scale=2.0, label_smoothing=0.0)),
    # training's usual case: the teacher feature is frozen, so dX covers only the student columns of W
    "frozen-teacher-feature": (Case(B=7, C=37, n=3, frozen_teacher_feature=True), HCDLossConfig()),
    # the cfm_hidden variant: the last Linear sees the hidden layer only, x_teacher is (B, 0)
    "hidden-Dt0": (Case(B=6, C=29, n=2, Dp=24, Dt=0), HCDLossConfig()),
}
FP16_CASES = ["odd-n3", "n2-T2-theta0-tgrad", "n4-T4-detach-confident", "offset+1e3-tgrad",
              "frozen-teacher-feature"]


@pytest.mark.parametrize("name", list(HEAD_CASES))
def test_head_fp32(name):
    case, cfg = HEAD_CASES[name]
    assert_rows_ok(check_head(case, cfg, torch.float32, DEVICE, grad_scale=2.5), name)


@pytest.mark.parametrize("name", FP16_CASES)
def test_head_fp16(name):
    case, cfg = HEAD_CASES[name]
    assert_rows_ok(check_head(case, cfg, torch.float16, DEVICE, grad_scale=2.5), name)


def test_head_fp16_float32_weight():
    case = Case(B=9, C=37, n=3, Dp=20, Dt=12, weight_fp32=True, teacher_grad=True)
    assert_rows_ok(check_head(case, HCDLossConfig(), torch.float16, DEVICE, grad_scale=2.5), "weight fp32")


def test_head_fp16_large_batch():
    # dZ is stored per sample (1/B rides in the GEMM scale): at large B a batch-mean dZ would sit in fp16's
    # subnormal range and lose bits; this case would show it in dx/dW against the float64 reference.
    case = Case(B=384, C=11, n=2, Dp=8, Dt=6, frozen_teacher_feature=True)
    assert_rows_ok(check_head(case, HCDLossConfig(), torch.float16, DEVICE, grad_scale=2.5), "B=384 fp16")


@needs_cuda
@pytest.mark.parametrize("name", ["odd-n3", "n4-T4-detach-confident", "offset+1e3-tgrad"])
def test_head_bf16_cuda(name):
    case, cfg = HEAD_CASES[name]
    assert_rows_ok(check_head(case, cfg, torch.bfloat16, DEVICE, grad_scale=2.5), name)


STUDENT_CASES = {
    "odd-T1": (Case(B=47, C=123), HCDLossConfig()),
    "T2-offset-tgrad": (Case(B=5, C=123, offset=1e3, teacher_grad=True), HCDLossConfig(kd_temperature=2.0)),
    "T4-same-confident": (Case(B=5, C=37, same=True, confident=True, teacher_grad=True),
                          HCDLossConfig(kd_temperature=4.0, label_smoothing=0.0)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(STUDENT_CASES))
def test_student(name, dtype):
    case, cfg = STUDENT_CASES[name]
    assert_rows_ok(check_student(case, cfg, dtype, DEVICE, grad_scale=2.5), name)


@needs_cuda
def test_student_bf16_cuda():
    case, cfg = STUDENT_CASES["T2-offset-tgrad"]
    assert_rows_ok(check_student(case, cfg, torch.bfloat16, DEVICE, grad_scale=2.5), "bf16")


def _head_args(case, cfg=None, dtype=torch.float32):
    t = make_inputs(case, dtype, DEVICE)
    return [t["x_student"], t["x_teacher"], t["weight"], t["bias"], t["teacher_logits"], t["student_logits"],
            t["target"]], t


def test_frozen_weight_and_no_grad():
    """needs_input_grad is honoured: a frozen weight gets no gradient, and a no-grad forward still runs."""
    case, cfg = Case(B=5, C=37, n=2), HCDLossConfig(n_sublogits=2)
    args, t = _head_args(case)
    t["weight"].requires_grad_(False)
    t["bias"].requires_grad_(False)
    total, parts = hcd_head_loss(*args, cfg, backend="triton")
    total.backward()
    assert t["weight"].grad is None and t["bias"].grad is None
    assert t["x_student"].grad is not None and t["student_logits"].grad is not None
    eager, _ = hcd_head_loss(*args, cfg, backend="eager")
    torch.testing.assert_close(total, eager, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        total2, _ = hcd_head_loss(*args, cfg, backend="triton")
    torch.testing.assert_close(total2, total.detach())
    assert total.dim() == 0 and all(p.dim() == 0 and p.grad_fn is None for p in parts.values())


def test_frozen_weight_trainable_bias():
    """db without the dW GEMM (the weight is frozen) still matches eager."""
    case, cfg = Case(B=5, C=37, n=2), HCDLossConfig(n_sublogits=2)
    grads = {}
    for backend in ("triton", "eager"):
        args, t = _head_args(case)
        t["weight"].requires_grad_(False)
        total, _ = hcd_head_loss(*args, cfg, backend=backend)
        (2.5 * total).backward()
        grads[backend] = t["bias"].grad
    assert grads["triton"] is not None
    torch.testing.assert_close(grads["triton"], grads["eager"], rtol=1e-5, atol=1e-7)


def test_float64_inputs_match_reference():
    """float64 is served by the float64 reference (documented fallback), so it is exact."""
    case, cfg = Case(B=4, C=13, n=2), HCDLossConfig(n_sublogits=2)
    args, _ = _head_args(case, dtype=torch.float64)
    ours, _ = hcd_head_loss(*args, cfg, backend="triton")
    ref, _ = hcd_head_loss(*args, cfg, backend="eager")
    assert ours.dtype == torch.float64 and ours.item() == ref.item()


def test_out_of_range_label_gives_nan_not_a_crash():
    """Labels are unchecked on CUDA; the kernels must clamp the read and make the loss NaN (as eager does)."""
    from hcd.kernels.hcd_head import hcd_head_loss_triton
    from hcd.kernels.student import student_loss_triton
    case = Case(B=4, C=13, n=2)
    cfg = HCDLossConfig(n_sublogits=2)
    args, t = _head_args(case)
    args[-1] = torch.tensor([0, 13, 2, -1], device=DEVICE)  # bypasses validation on purpose
    total, ce, kl, ol = hcd_head_loss_triton(*args, cfg)
    assert torch.isnan(total) and torch.isnan(ce) and torch.isfinite(kl) and torch.isfinite(ol)
    total.backward()
    assert torch.isfinite(t["x_student"].grad).all()
    s_total, s_ce, s_kd = student_loss_triton(args[5], args[4], args[-1], cfg)
    assert torch.isnan(s_total) and torch.isnan(s_ce) and torch.isfinite(s_kd)


def test_flop_byte_model():
    from hcd.kernels.costs import head_flops_bytes
    from hcd.kernels.costs import student_flops_bytes
    fb = head_flops_bytes(256, 1000, 4, 768, 768, 2, weight_bytes=4)
    assert fb["z_gemm"][0] == 2 * 256 * 4000 * 1536
    assert fb["total"][0] == sum(v[0] for k, v in fb.items() if k != "total")
    assert student_flops_bytes(128, 100, 2)["total"][1] > 0


def test_student_loss_parts_and_grad_fn():
    case, cfg = Case(B=6, C=11), HCDLossConfig()
    t = make_inputs(case, torch.float32, DEVICE)
    total, parts = student_loss(t["student_logits"], t["teacher_logits"], t["target"], cfg, backend="triton")
    assert total.dim() == 0 and total.grad_fn is not None and set(parts) == {"ce", "kd"}
    torch.testing.assert_close(total.detach(), cfg.ce_weight * parts["ce"] + cfg.kd_weight * parts["kd"])


@pytest.mark.parametrize("tile", [(32, 64, 32, 4, 4), (64, 32, 16, 2, 2)])
def test_gemm_tile_override_changes_only_the_schedule(tile):
    """bench/tile_sweep.py times other tiles than the library's: each must still compute the same GEMM
    (both K ranges, bias, device scale, colsum), with M, N, K not multiples of any block."""
    from hcd.kernels.gemm import _gemm
    g = torch.Generator().manual_seed(3)
    a1, a2 = torch.randn(37, 40, generator=g), torch.randn(37, 24, generator=g)
    b1, b2 = torch.randn(40, 50, generator=g), torch.randn(24, 50, generator=g)
    bias, scale = torch.randn(50, generator=g), torch.tensor(1.5)
    want = (a1.double() @ b1.double() + a2.double() @ b2.double()) * 0.5 * 1.5 + bias.double()
    out = _gemm(torch.empty(37, 50), a1, b1, a2=a2, b2=b2, bias=bias, scale=scale, alpha=0.5, tile=tile)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-4)
    # the dW form: output columns split over two B operands, column sums of A (db) from the same tiles
    colsum = torch.empty(40)
    dw = _gemm(torch.empty(40, 64), a1.t(), a1, b2=a2, split_n=True, colsum=colsum, tile=tile)
    assert torch.allclose(dw.double(), a1.t().double() @ torch.cat([a1, a2], 1).double(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(colsum.double(), a1.t().double().sum(1), rtol=1e-5, atol=1e-4)


def test_row_kernel_warps_override_gives_the_same_gradients():
    """The launch helper the tile sweep uses (the interpreter ignores warps: there it checks the plumbing;
    compiled on CUDA it compares two warp counts)."""
    from hcd.kernels.gemm import _gemm
    from hcd.kernels.hcd_head import _row_launch
    from dataclasses import replace
    case, cfg = HEAD_CASES["odd-n3"]
    cfg = replace(cfg, n_sublogits=case.n)  # the internal launch trusts its arguments (the API checks them)
    inp = {k: (v.detach() if v is not None else None) for k, v in make_inputs(case, torch.float32).items()}
    w, Dp = inp["weight"], case.Dp
    z = _gemm(torch.empty(case.B, w.shape[0]), inp["x_student"], w[:, :Dp].t(), a2=inp["x_teacher"],
              b2=w[:, Dp:].t(), bias=inp["bias"])
    outs = []
    for warps in (None, 2):
        dz, dzl, partials = torch.empty_like(z), torch.empty(1, case.B, case.C), torch.empty(case.B, 4)
        _row_launch(z, inp["teacher_logits"], inp["student_logits"], inp["target"], dz, dzl, partials, cfg,
                    teacher_grad=False, write_dz=True, num_warps=warps)
        outs.append((dz, dzl, partials))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
