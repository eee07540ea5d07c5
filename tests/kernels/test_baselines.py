"""The baseline losses (dkd_loss, dist_loss, ofa_loss): the eager reference against a direct float64
transcription of each reference repository's code, every backend against the float64 reference by
kernels/testing.py's rule (values and gradients, grad_output 2.5), the hostile cases of docs/method.md, Numerics
(confident rows, +-500 offsets, student = teacher, C not a power of two, tiny B), and input validation.
Fused kernels run in the Triton interpreter on CPU (fp32, fp16); bf16 only compiled on CUDA."""
import os

import pytest
import torch
import torch.nn.functional as F

from hcd.kernels import dist_loss, dkd_loss, ofa_loss
from tests.kernels.helpers import Case, assert_rows_ok
from hcd.kernels.testing import check_baseline

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 runs only compiled on CUDA (TRITON_INTERPRET=0)")
F64 = torch.float64


# ------------------------------------------------- the reference repositories' code, transcribed in float64

def mdistiller_dkd(ls, lt, y, alpha, beta, T):
    """megvii-research/mdistiller mdistiller/distillers/DKD.py dkd_loss, written out again."""
    gt = torch.zeros_like(ls).scatter_(1, y[:, None], 1).bool()
    pair = lambda p: torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)  # noqa: E731
    b_s, b_t = pair(F.softmax(ls / T, 1)), pair(F.softmax(lt / T, 1))
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T ** 2 / len(y)
    nckd = F.kl_div(F.log_softmax(ls / T - 1000.0 * gt, 1), F.softmax(lt / T - 1000.0 * gt, 1),
                    reduction="sum") * T ** 2 / len(y)
    return alpha * tckd + beta * nckd


def hunto_dist(ls, lt, beta, gamma, T):
    """hunto image_classification_sota dist_kd.py (with OFAKD's temperature), written out again."""
    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    ps, pt = F.softmax(ls / T, 1), F.softmax(lt / T, 1)
    return T ** 2 * (beta * (1 - pearson(ps, pt).mean()) + gamma * (1 - pearson(ps.t(), pt.t()).mean()))


def ofakd_ofa(ls, lt, y, eps, T):
    """Hao840/OFAKD distillers/ofa.py ofa_loss, written out again."""
    m = F.one_hot(y, ls.shape[1])
    w = (F.softmax(lt / T, 1) + m) ** eps - m
    return (-(w * torch.log(F.softmax(ls / T, 1))).sum(-1)).mean()


TRANSCRIBED = {"dkd": (dkd_loss, mdistiller_dkd, [dict(alpha=1.0, beta=8.0, temperature=4.0),
                                                  dict(alpha=0.5, beta=2.0, temperature=1.0)]),
               "dist": (dist_loss, hunto_dist, [dict(beta=1.0, gamma=1.0, temperature=1.0),
                                                dict(beta=2.0, gamma=0.5, temperature=4.0)]),
               "ofa": (ofa_loss, ofakd_ofa, [dict(eps=1.0, temperature=1.0), dict(eps=1.5, temperature=2.0)])}


@pytest.mark.parametrize("confident", [False, True], ids=["plain", "confident"])
@pytest.mark.parametrize("loss", list(TRANSCRIBED))
def test_eager_matches_the_reference_code_in_float64(loss, confident):
    ours_fn, theirs_fn, param_sets = TRANSCRIBED[loss]
    g = torch.Generator().manual_seed(3)
    B, C = 5, 13
    zs, zt = torch.randn(B, C, generator=g, dtype=F64) * 3, torch.randn(B, C, generator=g, dtype=F64) * 3
    y = torch.randint(0, C, (B,), generator=g)
    if confident:  # p_y ~ 1 - 4e-12: log(1 - p_y) still finite in float64 for the transcription
        zs[torch.arange(B), y] += 25.0
        zt[torch.arange(B), y] += 25.0
    label = () if loss == "dist" else (y,)
    for params in param_sets:
        a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
        ours = ours_fn(a, zt, *label, **params, backend="eager")
        theirs = theirs_fn(b, zt, *label, *params.values())
        ours.backward()
        theirs.backward()
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-11, abs=1e-13), params
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11 * b.grad.abs().max().item())


# -------------------------------------------------------------------- every backend against float64

# (case, params): C = 37 and 13 (not powers of two), B in {1, 2, 3, 6, 7}, confident rows, +-500 offsets,
# student = teacher (with and without confident rows), temperatures 1/2/4, non-default weights and eps.
CASES = {
    "odd": (Case(B=7, C=37), {}),
    "confident-T1": (Case(B=6, C=37, confident=True), dict(temperature=1.0)),
    "offset+500-T2": (Case(B=3, C=13, offset=500.0), dict(temperature=2.0)),
    "offset-500-weights": (Case(B=6, C=37, offset=-500.0, seed=1),
                           {"dkd": dict(alpha=0.5, beta=2.0), "dist": dict(beta=2.0, gamma=0.5, temperature=4.0),
                            "ofa": dict(eps=1.5)}),
    "same": (Case(B=6, C=37, same=True), {}),
    "same-confident": (Case(B=3, C=13, same=True, confident=True), dict(temperature=1.0)),
    "B1": (Case(B=1, C=13, seed=2), {"ofa": dict(eps=0.7)}),
    "B2-T4": (Case(B=2, C=37, seed=3), dict(temperature=4.0)),
}
FP16_CASES = ["odd", "confident-T1", "offset-500-weights", "same", "B2-T4"]


def _params(loss, params):
    return params.get(loss, {}) if set(params) <= {"dkd", "dist", "ofa"} and params else dict(params)


@pytest.mark.parametrize("loss", ["dkd", "dist", "ofa"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_fp32(loss, name):
    case, params = CASES[name]
    assert_rows_ok(check_baseline(loss, case, torch.float32, DEVICE, grad_scale=2.5, **_params(loss, params)), name)


@pytest.mark.parametrize("loss", ["dkd", "dist", "ofa"])
@pytest.mark.parametrize("name", FP16_CASES)
def test_triton_fp16(loss, name):
    case, params = CASES[name]
    assert_rows_ok(check_baseline(loss, case, torch.float16, DEVICE, grad_scale=2.5, **_params(loss, params)), name)


@needs_cuda
@pytest.mark.parametrize("loss", ["dkd", "dist", "ofa"])
@pytest.mark.parametrize("name", ["odd", "confident-T1", "offset-500-weights", "same"])
def test_triton_bf16_cuda(loss, name):
    case, params = CASES[name]
    assert_rows_ok(check_baseline(loss, case, torch.bfloat16, DEVICE, grad_scale=2.5, **_params(loss, params)), name)


def test_triton_large_batch_dist_columns():
    """B beyond one column tile (64 rows): the column kernel's loop over row tiles, and a C over 32 columns."""
    assert_rows_ok(check_baseline("dist", Case(B=70, C=37), torch.float32, DEVICE, grad_scale=2.5,
                                  temperature=2.0), "B=70")


@pytest.mark.parametrize("loss", ["dkd", "dist", "ofa"])
def test_compile_backend(loss):
    assert_rows_ok(check_baseline(loss, Case(B=4, C=13), torch.float32, "cpu", backend="compile"), loss)


def test_student_equal_to_teacher_gives_zero_dkd_gradient():
    """DKD's gradient is a difference of student and teacher terms, each computed the same way: exactly 0."""
    z = torch.randn(4, 13, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.tensor([0, 5, 12, 3])
    zs = z.clone().requires_grad_()
    dkd_loss(zs, z, y, backend="triton").backward()
    assert zs.grad.abs().max().item() == 0.0


# ------------------------------------------------------------------------------------- the API's contract

@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_probability_targets_are_their_argmax(backend):
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    soft = torch.softmax(torch.randn(5, 11, generator=g) * 3, 1)
    for fn in (dkd_loss, ofa_loss):
        assert fn(zs, zt, soft, backend=backend).item() == fn(zs, zt, soft.argmax(1), backend=backend).item()


def test_no_grad_forward_and_frozen_first_argument():
    z = torch.randn(3, 13)
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        for backend in ("eager", "triton"):
            assert torch.isfinite(dkd_loss(z, z.clone().requires_grad_(), y, backend=backend))  # no_grad: allowed
    assert dist_loss(z, z * 0.5, backend="triton").requires_grad is False


_Z, _Y = torch.zeros(4, 7), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("call, message", [
    (lambda b: dkd_loss(_Z, torch.zeros(4, 6), _Y, backend=b), "teacher_logits: expected shape"),
    (lambda b: dkd_loss(_Z, _Z.half(), _Y, backend=b), "teacher_logits: dtype"),
    (lambda b: dkd_loss(_Z, _Z, torch.tensor([0, 1, 7, 2]), backend=b), "target: label 7"),
    (lambda b: ofa_loss(_Z, _Z, _Y.int(), backend=b), "target: dtype"),
    (lambda b: ofa_loss(_Z, _Z, torch.zeros(4, 6), backend=b), "target: expected shape"),
    (lambda b: ofa_loss(_Z[0], _Z, _Y, backend=b), "logits: expected 2-D"),
    (lambda b: dist_loss(torch.zeros(4, 1), torch.zeros(4, 1), backend=b),
     "student_logits: dist_loss needs at least 2"),
    (lambda b: dist_loss(_Z, _Z.clone().requires_grad_(), backend=b), "teacher_logits: requires grad"),
    (lambda b: dkd_loss(_Z, _Z, _Y, temperature=0.0, backend=b), "temperature: must be > 0"),
    (lambda b: ofa_loss(_Z, _Z, _Y, eps=float("nan"), backend=b), "eps: expected a finite number"),
    (lambda b: dist_loss(_Z.long(), _Z, backend=b), "student_logits: dtype"),
], ids=["shape", "dtype", "label", "label-dtype", "soft-target-shape", "logits-1d", "one-class", "teacher-grad",
        "temperature", "eps-nan", "int-logits"])
def test_value_errors(backend, call, message):
    with pytest.raises(ValueError, match=message):
        call(backend)
