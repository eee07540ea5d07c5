"""Soft targets (docs/method.md, Soft targets): a (B, C) probability target in hcd_head_loss, student_loss and
hcd_loss. The eager reference against a plain-Python transcription of the spec (float64), the one-hot target
against the label path (bit for bit), the fused kernels (Triton interpreter on CPU) against float64 by
kernels/testing.py's rule, argmax ties, unchecked non-finite rows, validation, and the engine's smoothed_ce."""
import os

import pytest
import torch
import torch.nn.functional as F

from hcd.kernels import HCDLossConfig, hcd_head_loss, hcd_loss, student_loss
from hcd.kernels.testing import SOFT_KINDS, as_float64, check_loss, compare, failures, run_head, run_loss, run_student
from tests.kernels import hand
from tests.kernels.helpers import Case, assert_rows_ok, check_head, check_student, make_inputs, make_loss_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs compiled kernels on CUDA (TRITON_INTERPRET=0)")
F64 = torch.float64
HEAD = ("x_student", "x_teacher", "weight", "bias", "teacher_logits", "student_logits", "target")
LOSS = ("x_students", "x_teacher", "weights", "biases", "teacher_logits", "student_logits", "target")


# ------------------------------------------------------------------------------- the reference vs the spec

@pytest.mark.parametrize("kind", SOFT_KINDS)
@pytest.mark.parametrize("n", [1, 3])
def test_eager_matches_the_spec_in_float64(kind, n):
    cfg = HCDLossConfig(n_sublogits=n, label_smoothing=0.2, ol_threshold=0.0, temperature=2.0)
    t = make_inputs(Case(B=4, C=7, n=n, Dp=3, Dt=2, soft=kind, seed=3), F64)
    _, parts = hcd_head_loss(*(t[k] for k in HEAD), cfg, backend="eager")
    sce, skl, ol = hand.head_terms_of(t, cfg)
    assert [parts[k].item() for k in ("ce", "kl", "ol")] == pytest.approx([sce, skl, ol], rel=1e-12, abs=1e-15)
    _, parts = student_loss(t["student_logits"], t["teacher_logits"], t["target"], cfg, backend="eager")
    ce, kd = hand.student_terms_of(t["student_logits"], t["teacher_logits"], t["target"], cfg)
    assert [parts["ce"].item(), parts["kd"].item()] == pytest.approx([ce, kd], rel=1e-12)


def test_eager_gradcheck():
    """The reference's soft CE and its argmax mask are differentiable as written (the fused kernels are held
    to the reference's gradient)."""
    cfg = HCDLossConfig(n_sublogits=2, ol_threshold=0.0)
    t = make_inputs(Case(B=3, C=5, n=2, Dp=3, Dt=2, soft="mixup"), F64)
    head = lambda *a: hcd_head_loss(*a[:4], t["teacher_logits"], a[4], t["target"], cfg, backend="eager")[0]  # noqa
    assert torch.autograd.gradcheck(head, tuple(t[k] for k in HEAD[:4]) + (t["student_logits"],))
    stud = lambda z: student_loss(z, t["teacher_logits"], t["target"], cfg, backend="eager")[0]  # noqa: E731
    assert torch.autograd.gradcheck(stud, (t["student_logits"],))


def test_compile_backend_matches_eager():
    cfg = HCDLossConfig(n_sublogits=2)
    inputs = make_loss_inputs(Case(B=4, C=7, n=2, Dp=4, Dt=3, soft="mixup"), 2, F64)
    e, c = run_loss(inputs, cfg, "eager", 2.5), run_loss(inputs, cfg, "compile", 2.5)
    assert e.keys() == c.keys() and {"dx_s", "dW", "db", "dz_s"} <= set(e)
    for k in e:
        torch.testing.assert_close(c[k], e[k], rtol=1e-12, atol=1e-15, msg=k)


# ------------------------------------------------------------------- one-hot = labels, in every backend

@pytest.mark.parametrize("backend, dtype", [("eager", F64), ("eager", torch.float32), ("triton", torch.float32),
                                            ("triton", torch.float16)])
def test_onehot_target_equals_the_label_path(backend, dtype):
    """Bit for bit: every loss part and every gradient (the soft code is written so that the zero terms add
    exactly 0 and the sum(t) - 1 correction vanishes)."""
    cfg = HCDLossConfig(n_sublogits=2)
    case = Case(B=4, C=13, n=2, Dp=5, Dt=4, teacher_grad=True)
    for run, inputs in ((run_head, make_inputs(case, dtype, DEVICE)),
                        (run_student, make_inputs(case, dtype, DEVICE)),
                        (run_loss, make_loss_inputs(case, 2, dtype, DEVICE))):
        soft = dict(inputs, target=F.one_hot(inputs["target"], 13).float())
        labels, onehot = run(inputs, cfg, backend, 2.5), run(soft, cfg, backend, 2.5)
        assert labels.keys() == onehot.keys()
        for k in labels:
            assert torch.equal(labels[k], onehot[k]), (run.__name__, k)


# --------------------------------------------------------------------------- fused kernels vs float64

HEAD_CASES = {
    "mixup-n3-tgrad": (Case(B=6, C=13, n=3, Dp=5, Dt=4, soft="mixup", teacher_grad=True), HCDLossConfig()),
    "tie-n4-confident-offset": (Case(B=5, C=37, n=4, Dp=6, Dt=5, soft="tie", confident=True, offset=1e3),
                                HCDLossConfig(temperature=2.0)),
    "dense-n1-nobias": (Case(B=4, C=13, n=1, Dp=5, Dt=4, soft="dense", bias=False), HCDLossConfig()),
    "dense-n3-theta0": (Case(B=4, C=13, n=3, Dp=5, Dt=4, soft="dense", seed=1),
                        HCDLossConfig(ol_threshold=0.0, label_smoothing=0.3)),
    "unnormalised-n2-detach": (Case(B=4, C=13, n=2, Dp=5, Dt=4, soft="unnormalised", teacher_grad=True),
                               HCDLossConfig(detach_sublogit_target=True)),
}
STUDENT_CASES = {
    "mixup": (Case(B=6, C=37, soft="mixup"), HCDLossConfig()),
    "tie-confident-offset": (Case(B=5, C=37, soft="tie", confident=True, offset=-1e3, teacher_grad=True),
                             HCDLossConfig(kd_temperature=2.0)),
    "unnormalised-eps0": (Case(B=5, C=13, soft="unnormalised"), HCDLossConfig(label_smoothing=0.0)),
}
LOSS_CASES = {
    "mixup-S2-n3": (Case(B=5, C=13, n=3, Dp=5, Dt=4, soft="mixup"), HCDLossConfig()),
    "dense-S2-n1": (Case(B=4, C=13, n=1, Dp=5, Dt=4, soft="dense"), HCDLossConfig(kd_temperature=2.0)),
    "tie-S2-confident-offset": (Case(B=4, C=21, n=3, Dp=6, Dt=5, soft="tie", confident=True, offset=1e3),
                                HCDLossConfig(temperature=4.0, ol_threshold=0.0)),
}
FP16 = {"head": ["mixup-n3-tgrad", "tie-n4-confident-offset"], "student": ["mixup", "tie-confident-offset"],
        "loss": ["mixup-S2-n3", "tie-S2-confident-offset"]}


def _dtypes(which, name):
    return [torch.float32] + ([torch.float16] if name in FP16[which] else []) + \
        ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("name", list(HEAD_CASES))
def test_head(name):
    case, cfg = HEAD_CASES[name]
    for dtype in _dtypes("head", name):
        assert_rows_ok(check_head(case, cfg, dtype, DEVICE, grad_scale=2.5), f"{name} {dtype}")


@pytest.mark.parametrize("name", list(STUDENT_CASES))
def test_student(name):
    case, cfg = STUDENT_CASES[name]
    for dtype in _dtypes("student", name):
        assert_rows_ok(check_student(case, cfg, dtype, DEVICE, grad_scale=2.5), f"{name} {dtype}")


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_hcd_loss(name):
    case, cfg = LOSS_CASES[name]
    for dtype in _dtypes("loss", name):
        assert_rows_ok(check_loss(case, cfg, dtype, DEVICE, grad_scale=2.5, stages=2), f"{name} {dtype}")


def test_the_rule_fails_a_kernel_that_reads_only_the_argmax():
    """The check can fail: the fused head given argmax(t) as labels (what a label-only kernel would compute,
    and what the baselines do on purpose) is outside the rule against the soft float64 reference."""
    case, cfg = HEAD_CASES["mixup-n3-tgrad"][0], HCDLossConfig(n_sublogits=3)
    inputs = make_inputs(case, torch.float32, DEVICE)
    ref = run_head(as_float64(inputs), cfg, "eager", 2.5)
    eager = run_head(inputs, cfg, "eager", 2.5)
    wrong = run_head(dict(inputs, target=inputs["target"].argmax(1)), cfg, "triton", 2.5)
    bad = {r.output for r in failures(compare(wrong, eager, ref, torch.float32))}
    assert {"ce", "loss", "dW", "dz_t"} <= bad, bad


# -------------------------------------------------------------------------------- ties, dtypes, NaN rows

@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_tied_rows_mask_the_first_maximal_class(backend):
    """t = 0.5 at classes a < b: the OL mask zeroes a (torch.argmax's first maximal index). The OL with label
    a equals it; with label b it differs (so the check can tell the two apart)."""
    cfg = HCDLossConfig(n_sublogits=3, ol_threshold=0.0)
    inputs = make_inputs(Case(B=4, C=11, n=3, Dp=5, Dt=4), torch.float32, DEVICE)
    a, b = torch.tensor([1, 0, 3, 2]), torch.tensor([6, 9, 4, 10])
    tie = 0.5 * F.one_hot(a, 11).float() + 0.5 * F.one_hot(b, 11).float()
    ol = {name: run_head(dict(inputs, target=y.to(DEVICE)), cfg, backend)["ol"].item()
          for name, y in (("tie", tie), ("first", a), ("second", b))}
    assert ol["tie"] == pytest.approx(ol["first"], rel=1e-6) and ol["tie"] != pytest.approx(ol["second"], rel=1e-3)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_target_dtype_is_read_as_fp32(backend):
    """A 16-bit or float64 target with float32 logits gives exactly the float32 target's results (values
    exactly representable in every dtype)."""
    cfg = HCDLossConfig(n_sublogits=2)
    inputs = make_loss_inputs(Case(B=4, C=13, n=2, Dp=5, Dt=4, soft="tie"), 2, torch.float32, DEVICE)
    want = run_loss(inputs, cfg, backend, 2.5)
    for dtype in (torch.float16, torch.bfloat16, F64):
        got = run_loss(dict(inputs, target=inputs["target"].to(dtype)), cfg, backend, 2.5)
        assert all(torch.equal(got[k], want[k]) for k in want), dtype


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_non_finite_rows_give_nan_ce_not_nan_gradients():
    """Soft targets are not read up front on CUDA: a row with inf / NaN makes the CE NaN (as an
    out-of-range label does) while KL, OL and every gradient stay finite, in the reference and the kernels."""
    from hcd.kernels import reference
    from hcd.kernels.hcd_head import hcd_head_loss_triton
    from hcd.kernels.hcd_step import hcd_loss_triton
    from hcd.kernels.student import student_loss_triton
    cfg = HCDLossConfig(n_sublogits=2)
    case = Case(B=4, C=13, n=2, Dp=5, Dt=4, soft="mixup")
    for head_fn, loss_fn, student_fn in ((reference.hcd_head_loss_eager, reference.hcd_loss_eager,
                                          reference.student_loss_eager),
                                         (hcd_head_loss_triton, hcd_loss_triton, student_loss_triton)):
        t = make_inputs(case, torch.float32, DEVICE)
        t["target"][1, 3], t["target"][2, 0] = float("nan"), float("inf")  # bypasses validation on purpose
        total, ce, kl, ol = head_fn(*(t[k] for k in HEAD), cfg)
        total.backward()
        assert torch.isnan(ce) and torch.isfinite(kl) and torch.isfinite(ol)
        assert all(torch.isfinite(t[k].grad).all() for k in ("x_student", "weight", "student_logits"))
        total, ce, kd = student_fn(t["student_logits"], t["teacher_logits"], t["target"], cfg)
        assert torch.isnan(ce) and torch.isfinite(kd)
        s = make_loss_inputs(case, 2, torch.float32, DEVICE)
        s["target"] = t["target"]
        total, values = loss_fn(*(s[k] for k in LOSS), cfg)
        total.backward()
        assert torch.isnan(values[0]) and torch.isfinite(values[1]) and torch.isfinite(s["x_students"].grad).all()


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("target, message", [
    (torch.full((4, 6), 1 / 6), r"target: expected shape \(4, 7\)"),
    (torch.full((4,), 0.5), r"target: float targets are \(B, C\)"),
    (torch.full((4, 7), float("nan")), "target: soft target has a non-finite entry"),
    (torch.full((4, 7), 1 / 7) - torch.eye(4, 7), "target: soft target has a negative entry"),
    (torch.full((4, 7), 1 / 7, requires_grad=True), "target: requires grad"),
], ids=["shape", "1-d", "nan", "negative", "grad"])
def test_value_errors_name_target(backend, target, message):
    t = make_loss_inputs(Case(B=4, C=7, n=2, Dp=3, Dt=5), 2, torch.float32)
    cfg = HCDLossConfig(n_sublogits=2)
    with pytest.raises(ValueError, match=f"^{message}"):
        hcd_loss(*(t[k] for k in LOSS[:-1]), target, cfg, backend=backend)
    with pytest.raises(ValueError, match=f"^{message}"):
        student_loss(t["student_logits"], t["teacher_logits"], target, cfg, backend=backend)


# ------------------------------------------------------------------------------- the engine's smoothed_ce

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_engine_smoothed_ce_takes_soft_targets(eps, dtype):
    """engine/methods/logits.py smoothed_ce on (B, C) probabilities: -mean_b sum_c ((1-eps) t + eps/C) log p,
    against the plain-Python transcription (float64 logits) or the reference's fp32 math, and equal to the
    label path on one-hot targets."""
    from hcd.engine.methods.logits import smoothed_ce
    from hcd.kernels.reference import smoothed_ce_rows
    inputs = make_inputs(Case(B=6, C=13, soft="mixup", seed=2), dtype)
    z, t, y = inputs["student_logits"].detach(), inputs["target"], inputs["target"].argmax(1)
    got = smoothed_ce(z, t, eps)
    if dtype == F64:
        want = sum(hand.ce(row, trow, eps) for row, trow in zip(z.tolist(), t.tolist())) / len(t)
        assert got.item() == pytest.approx(want, rel=1e-12)
    else:
        torch.testing.assert_close(got, smoothed_ce_rows(z.float(), t, eps).mean(), rtol=1e-6, atol=0)
    onehot = F.one_hot(y, 13).to(t.dtype)
    torch.testing.assert_close(smoothed_ce(z, onehot, eps), smoothed_ce(z, y, eps), rtol=1e-6 if dtype != F64
                               else 1e-14, atol=0)
    assert smoothed_ce(z, onehot.to(torch.bfloat16), eps).dtype == got.dtype  # any float target dtype

