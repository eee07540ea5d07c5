"""The eager reference against independent hand computations (plain Python math on a tiny case),
float64 gradchecks, the hostile cases of docs/method.md (Numerics), and input validation."""
import pytest
import torch

from hcd.kernels import HCDLossConfig, hcd_head_loss, student_loss
from tests.kernels import hand
from tests.kernels.helpers import CONFIDENT_RTOL, confident_row_errors

F64 = torch.float64


def _tiny(B=3, C=5, n=3, Dp=4, Dt=2, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(x_student=r(B, Dp), x_teacher=r(B, Dt), weight=r(n * C, Dp + Dt) * 0.7,
                bias=r(n * C) if bias else None, teacher_logits=r(B, C) * 2, student_logits=r(B, C) * 2,
                target=torch.randint(0, C, (B,), generator=g))


def _call_head(inp, cfg, backend="eager"):
    return hcd_head_loss(inp["x_student"], inp["x_teacher"], inp["weight"], inp["bias"], inp["teacher_logits"],
                         inp["student_logits"], inp["target"], cfg, backend=backend)


@pytest.mark.parametrize("cfg", [
    HCDLossConfig(n_sublogits=3),
    HCDLossConfig(n_sublogits=2, temperature=2.0, label_smoothing=0.0, ol_threshold=0.0,
                  student_scale=0.5, teacher_scale=1.5, sublogit_kl_weight=1.0, ol_weight=2.0, ce_weight=0.3),
    HCDLossConfig(n_sublogits=1, temperature=4.0),
])
@pytest.mark.parametrize("bias", [True, False])
def test_head_terms_match_hand_computation(cfg, bias):
    inp = _tiny(n=cfg.n_sublogits, bias=bias)
    total, parts = _call_head(inp, cfg)
    sce, skl, ol = hand.head_terms_of(inp, cfg)
    assert parts["ce"].item() == pytest.approx(sce, rel=1e-12)
    assert parts["kl"].item() == pytest.approx(skl, rel=1e-12)
    assert parts["ol"].item() == pytest.approx(ol, rel=1e-12, abs=1e-15)
    want = cfg.ce_weight * sce + cfg.sublogit_kl_weight * skl + cfg.ol_weight * ol
    assert total.item() == pytest.approx(want, rel=1e-12)


def test_ol_is_positive_on_a_case_built_to_trigger_it():
    # Two identical sub-logits (cosine 1 > theta) must give relu(1 - 0.5)^2 = 0.25 on every pair.
    cfg = HCDLossConfig(n_sublogits=2)
    inp = _tiny(n=2)
    C = inp["teacher_logits"].shape[1]
    inp["weight"][C:] = inp["weight"][:C]
    inp["bias"][C:] = inp["bias"][:C]
    _, parts = _call_head(inp, cfg)
    assert parts["ol"].item() == pytest.approx(0.25, rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_student_terms_match_hand_computation(T):
    cfg = HCDLossConfig(kd_temperature=T, label_smoothing=0.2, kd_weight=0.7, ce_weight=1.3)
    inp = _tiny()
    zs, zt, y = inp["student_logits"], inp["teacher_logits"], inp["target"]
    total, parts = student_loss(zs, zt, y, cfg, backend="eager")
    ce, kd = hand.student_terms_of(zs, zt, y, cfg)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-12)
    assert total.item() == pytest.approx(1.3 * ce + 0.7 * kd, rel=1e-12)


def test_student_ce_matches_torch_cross_entropy():
    inp = _tiny(B=6, C=9)
    cfg = HCDLossConfig(label_smoothing=0.1)
    _, parts = student_loss(inp["student_logits"], inp["teacher_logits"], inp["target"], cfg, backend="eager")
    want = torch.nn.functional.cross_entropy(inp["student_logits"], inp["target"], label_smoothing=0.1)
    torch.testing.assert_close(parts["ce"], want, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------- gradients

# With the target detached the loss's true derivative no longer equals its gradient on the CFM side
# (by design), so only the student side is gradchecked there.
@pytest.mark.parametrize("detach,names", [
    (False, ["x_student", "x_teacher", "weight", "bias", "teacher_logits", "student_logits"]),
    (True, ["student_logits"]),
])
def test_head_gradcheck(detach, names):
    cfg = HCDLossConfig(n_sublogits=3, temperature=2.0, ol_threshold=0.0, detach_sublogit_target=detach)
    inp = _tiny(B=3, C=4, n=3, Dp=3, Dt=2, seed=1)
    tensors = [inp[k].clone().requires_grad_(True) for k in names]

    def f(*ts):
        args = dict(inp, **dict(zip(names, ts)))
        return _call_head(args, cfg)[0]
    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7)


def test_student_loss_gradcheck():
    cfg = HCDLossConfig(kd_temperature=2.0)
    inp = _tiny(B=4, C=6)
    zs = inp["student_logits"].clone().requires_grad_(True)
    zt = inp["teacher_logits"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: student_loss(a, b, inp["target"], cfg, backend="eager")[0],
                                    (zs, zt), eps=1e-6, atol=1e-7)


def test_detach_changes_gradients_only():
    inp = _tiny(B=4, C=5, n=2, seed=3)
    results = {}
    for detach in (False, True):
        cfg = HCDLossConfig(n_sublogits=2, detach_sublogit_target=detach)
        w = inp["weight"].clone().requires_grad_(True)
        zs = inp["student_logits"].clone().requires_grad_(True)
        total, parts = hcd_head_loss(inp["x_student"], inp["x_teacher"], w, inp["bias"], inp["teacher_logits"],
                                     zs, inp["target"], cfg, backend="eager")
        total.backward()
        results[detach] = (total.detach(), parts, w.grad, zs.grad)
    (t0, p0, gw0, gz0), (t1, p1, gw1, gz1) = results[False], results[True]
    assert torch.equal(t0, t1) and all(torch.equal(p0[k], p1[k]) for k in p0)
    torch.testing.assert_close(gz0, gz1, rtol=1e-12, atol=1e-14)  # the student side is unchanged
    assert (gw0 - gw1).abs().max() > 1e-3                       # the KL no longer pulls on the CFM


# --------------------------------------------------------------------------------------- hostile cases

def _finite_grads(inp, cfg, dtype=F64):
    ts = {k: (v.to(dtype).requires_grad_(True) if v is not None and v.is_floating_point() else v)
          for k, v in inp.items()}
    total, parts = _call_head(ts, cfg)
    total.backward()
    for k, v in ts.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            assert torch.isfinite(v.grad).all(), k
    return total, parts


@pytest.mark.parametrize("offset", [1e3, -1e3])
def test_large_offsets_are_shift_invariant(offset):
    # Adding the same constant to every logit of a row changes no softmax: CE/KL must not move,
    # even though exp(1e3) overflows a naive implementation.
    cfg = HCDLossConfig(n_sublogits=2, ol_weight=0.0)
    inp = _tiny(n=2)
    _, base = _call_head(inp, cfg)
    shifted = dict(inp, teacher_logits=inp["teacher_logits"] + offset / cfg.teacher_scale,
                   student_logits=inp["student_logits"] + offset)
    total, parts = _finite_grads(shifted, cfg)
    assert parts["ce"].item() == pytest.approx(base["ce"].item(), rel=1e-9)
    assert parts["kl"].item() == pytest.approx(base["kl"].item(), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_confident_rows_keep_the_target_gradient(dtype):
    # p_y -> 1: CE -> 0 and p_y - 1 cancels (docs/method.md, Numerics); fp32 math, one rounding on store
    errors = confident_row_errors("eager", dtype)
    assert max(errors.values()) <= CONFIDENT_RTOL[dtype], errors


def test_n1_gives_zero_ol():
    cfg = HCDLossConfig(n_sublogits=1)
    _, parts = _finite_grads(_tiny(n=1), cfg)
    assert parts["ol"].item() == 0.0


def test_student_equals_teacher_gives_zero_kl_and_kd():
    inp = _tiny(B=4, C=5, n=1)
    cfg = HCDLossConfig(n_sublogits=1, student_scale=0.0)  # fused sub-logit = teacher logits exactly
    inp["student_logits"] = inp["teacher_logits"].clone()
    _, parts = _call_head(inp, cfg)
    assert abs(parts["kl"].item()) < 1e-14
    _, sparts = student_loss(inp["student_logits"], inp["teacher_logits"], inp["target"], cfg, backend="eager")
    assert abs(sparts["kd"].item()) < 1e-14


def test_16bit_inputs_give_16bit_grads_and_fp32_weight_allowed():
    inp = _tiny(n=2)
    ts = {k: (v.to(torch.bfloat16).requires_grad_(True) if v is not None and v.is_floating_point() else v)
          for k, v in inp.items()}
    ts["weight"] = inp["weight"].float().requires_grad_(True)  # fp32 master weight, bf16 activations
    ts["bias"] = inp["bias"].float().requires_grad_(True)
    total, _ = _call_head(ts, HCDLossConfig(n_sublogits=2))
    total.backward()
    assert total.dtype == torch.float32
    assert ts["x_student"].grad.dtype == torch.bfloat16 and ts["weight"].grad.dtype == torch.float32


def test_compile_backend_matches_eager():
    cfg = HCDLossConfig(n_sublogits=2)
    inp = _tiny(n=2)
    t0, p0 = _call_head(inp, cfg, "eager")
    t1, p1 = _call_head(inp, cfg, "compile")
    torch.testing.assert_close(t1, t0, rtol=1e-12, atol=0)
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------- validation

def _bad(**changes):
    inp = _tiny(n=2)
    inp.update(changes)
    return inp


@pytest.mark.parametrize("changes,name", [
    (dict(x_student=torch.randn(3, 4, 1, dtype=F64)), "x_student"),
    (dict(x_teacher=torch.randn(2, 2, dtype=F64)), "x_teacher"),
    (dict(x_teacher=torch.randn(3, 2, dtype=torch.float32)), "x_teacher"),
    (dict(weight=torch.randn(9, 6, dtype=F64)), "weight"),        # rows != n*C
    (dict(weight=torch.randn(10, 7, dtype=F64)), "weight"),       # cols != Dp+Dt
    (dict(weight=torch.randn(10, 6, dtype=torch.float16)), "weight"),
    (dict(bias=torch.randn(11, dtype=F64)), "bias"),
    (dict(student_logits=torch.randn(3, 4, dtype=F64)), "student_logits"),
    (dict(teacher_logits=torch.randn(3, 5).to(torch.int64)), "teacher_logits"),
    (dict(target=torch.tensor([0, 1, 5])), "target"),             # label == C
    (dict(target=torch.tensor([0, -1, 2])), "target"),
    (dict(target=torch.tensor([0, 1, 2], dtype=torch.int32)), "target"),
    (dict(target=torch.tensor([0, 1])), "target"),
])
def test_invalid_head_inputs_name_the_argument(changes, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        _call_head(_bad(**changes), HCDLossConfig(n_sublogits=2))


def test_invalid_student_inputs_and_backend():
    inp = _tiny()
    cfg = HCDLossConfig()
    with pytest.raises(ValueError, match="^teacher_logits:"):
        student_loss(inp["student_logits"], inp["teacher_logits"][:, :3], inp["target"], cfg)
    with pytest.raises(ValueError, match="^target:"):
        student_loss(inp["student_logits"], inp["teacher_logits"], inp["target"] + 10, cfg)
    with pytest.raises(ValueError, match="^backend:"):
        student_loss(inp["student_logits"], inp["teacher_logits"], inp["target"], cfg, backend="cuda")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="^n_sublogits:"):
        HCDLossConfig(n_sublogits=0)
    with pytest.raises(ValueError, match="^temperature:"):
        HCDLossConfig(temperature=0.0)
