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
from tests.kernels import hand
from tests.kernels.helpers import (CONFIDENT_RTOL, Case, assert_rows_ok, check_head, check_student,
                                   confident_row_errors, make_inputs)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=needs_cuda)], ids=["fp32", "fp16", "bf16"])
def test_confident_rows_keep_the_target_gradient(dtype):
    """p_y ~ 0.9993: the CE gradient p_y - 1 element by element (the normwise rule above would not see it)."""
    errors = confident_row_errors("triton", dtype, DEVICE)
    assert max(errors.values()) <= CONFIDENT_RTOL[dtype], errors


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


def test_float64_runs_the_reference(monkeypatch):
    """float64 (a debugging dtype; the kernels are fp32 inside) is served by the float64 reference: no fused
    Function runs, and the values match plain-Python float64 math."""
    import hcd.kernels.hcd_head as head
    import hcd.kernels.student as student

    class NotCalled:
        @staticmethod
        def apply(*args):
            raise AssertionError("a fused kernel ran on float64 inputs")
    monkeypatch.setattr(head, "_HCDHead", NotCalled)
    monkeypatch.setattr(student, "_StudentLoss", NotCalled)
    case, cfg = Case(B=4, C=13, n=2, Dp=5, Dt=3), HCDLossConfig(n_sublogits=2)
    args, t = _head_args(case, dtype=torch.float64)
    total, parts = hcd_head_loss(*args, cfg, backend="triton")
    total.backward()
    sce, skl, ol = hand.head_terms_of(t, cfg)
    assert [parts[k].item() for k in ("ce", "kl", "ol")] == pytest.approx([sce, skl, ol], rel=1e-12)
    assert t["weight"].grad.dtype == torch.float64
    total, parts = student_loss(t["student_logits"], t["teacher_logits"], t["target"], cfg, backend="triton")
    ce, kd = hand.student_terms_of(t["student_logits"], t["teacher_logits"], t["target"], cfg)
    assert [parts["ce"].item(), parts["kd"].item()] == pytest.approx([ce, kd], rel=1e-12)


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


def test_cost_model_counts_at_a_small_shape():
    """Each launch's FLOPs and compulsory bytes, counted by hand from the launch plans at B=2, C=3, n=2, Dp=4,
    Dt=5 (N = n*C = 6, D = 9), 16-bit activations and logits (2 bytes), a float32 weight and bias (4 bytes)."""
    from hcd.kernels.costs import head_flops_bytes, student_flops_bytes
    fb = head_flops_bytes(2, 3, 2, 4, 5, 2, weight_bytes=4)
    # Z = x W^T + b: 2*2*6*9 FLOPs; reads x 2*9*2 = 36, W 6*9*4 = 216, b 6*4 = 24; writes Z fp32 2*6*4 = 48
    assert fb["z_gemm"] == (216, 324)
    # row: 60*B*N + 2*B*n*N; reads Z 48, z_t and z_s 2*(2*3*2) = 24, labels 2*8 = 16;
    # writes dZ 48, dz_s fp32 2*3*4 = 24, partials 2*4*4 = 32
    assert fb["row"] == (768, 192)
    assert fb["loss_sum"] == (8, 48)                # 4*B adds; reads the partials (32), writes 4 floats (16)
    assert fb["dx_gemm"] == (216, 300)              # 2*B*N*D; reads dZ 48 and W 216, writes dX 2*9*2 = 36
    assert fb["dw_gemm"] == (216 + 12, 324)         # + B*N adds for db; reads dZ 48, x 36; writes dW 216, db 24
    assert fb["dz_scale"] == (6, 36)                # B*C multiplies; reads fp32 24, writes 2-byte 12
    assert fb["total"] == (1442, 1224)
    # the frozen teacher feature (training): dX covers the Dp columns only: 2*2*6*4; 48 + 6*4*4 + 2*4*2
    frozen = head_flops_bytes(2, 3, 2, 4, 5, 2, weight_bytes=4, x_teacher_grad=False)
    assert frozen["dx_gemm"] == (96, 160) and all(frozen[k] == fb[k] for k in ("z_gemm", "row", "dw_gemm"))
    no_bias = head_flops_bytes(2, 3, 2, 4, 5, 2, weight_bytes=4, bias=False)  # no b to read, no db to write
    assert no_bias["z_gemm"] == (216, 300) and no_bias["dw_gemm"] == (228, 300)
    # student, B=2, C=3: row 25*B*C; reads z_s and z_t 24, labels 16; writes dz fp32 24, partials 2*3*4 = 24
    assert student_flops_bytes(2, 3, 2) == {"row": (150, 88), "loss_sum": (6, 36), "dz_scale": (6, 36),
                                            "total": (162, 160)}


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


@pytest.mark.parametrize("block, warps", [(1, 4), (1024, 4), (2048, 8), (4096, 8), (8192, 16)])
def test_row_num_warps(block, warps):
    """Warps per row program, ~8 fp32 values per thread (the interpreter ignores warps: checked as a function)."""
    from hcd.kernels.launch import row_num_warps
    assert row_num_warps(block) == warps


@pytest.mark.parametrize("shape, dtype, tile", [
    ((256, 4000, 0), torch.bfloat16, (64, 128, 64, 8)),   # ImageNet Z: 4 x 32 = 128 CTAs with the largest tile
    ((256, 2000, 0), torch.float16, (64, 64, 64, 4)),     # 4 x 16 = 64 < 96, then 4 x 32 = 128
    ((128, 400, 0), torch.float16, (32, 64, 64, 4)),      # CIFAR Z: 28 CTAs at most: the smallest tile
    ((4000, 768, 768), torch.float32, (64, 64, 32, 4)),   # dW, both column ranges: 63 x 24
    ((256, 768, 0), torch.float32, (32, 64, 32, 4)),      # dX, frozen teacher feature: 4 x 12 = 48, 8 x 12 = 96
    # split N counts each column range's tiles (a tile never straddles them): 48 + 48 = 96, not ceil(6020/64)
    ((64, 3010, 3010), torch.float32, (64, 64, 32, 4)),
])
def test_gemm_tile_choice(shape, dtype, tile):
    """The largest tile that still gives >= 96 CTAs (about one per SM of an H100), else the smallest."""
    from hcd.kernels.gemm import _tile
    assert _tile(*shape, dtype) == tile
