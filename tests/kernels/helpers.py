"""Shared float64 comparison for the kernel tests (and the benchmarks, which import the references here).

The machinery lives in hcd.kernels.testing so that `hcd verify` (which may not import tests) applies the
same inputs and the same tolerance rule; this module re-exports it with a pytest-friendly assertion, and
adds the confident-row check that both the reference's and the fused kernels' tests run.
"""
import torch

from hcd.kernels import HCDLossConfig, hcd_head_loss, student_loss
from hcd.kernels.testing import (MARGIN, Case, as_float64, check_head, check_loss, check_student, compare, failures,
                                 format_rows, make_inputs, make_loss_inputs, run_head, run_student)
from hcd.kernels.reference import hcd_head_loss_eager, student_loss_eager  # the references

__all__ = ["MARGIN", "Case", "as_float64", "check_head", "check_loss", "check_student", "compare", "failures",
           "format_rows", "make_inputs", "make_loss_inputs", "run_head", "run_student", "hcd_head_loss_eager", "student_loss_eager", "assert_rows_ok",
           "CONFIDENT_RTOL", "confident_row_errors"]


def assert_rows_ok(rows, what=""):
    """Fail with the whole table when any output breaks the tolerance rule."""
    bad = failures(rows)
    assert not bad, f"{what}: {', '.join(r.output for r in bad)} outside tolerance\n{format_rows(rows)}"


# Confident rows: p_y ~ 0.9993, so the CE gradient at the target, p_y - 1 ~ -7e-4, is what a 16-bit softmax
# loses (bf16 rounds p_y to 1, a 100 % error; fp16 to a multiple of 2^-11, ~30 %). With fp32 math and one
# rounding on store, every gradient element stays within two roundings of its dtype; in fp32 the bound is a
# few roundings of 1 (2^-24) inside the softmax relative to |p_y - 1|, ~1e-4 each.
CONFIDENT_RTOL = {torch.float32: 5e-4, torch.float16: 2 * 2.0 ** -11, torch.bfloat16: 2 * 2.0 ** -8}
_B, _C, _N, _DP, _DT, _Y, _LIFT, _G = 2, 7, 2, 5, 3, 4, 9.0, 2.5  # every row's target is class _Y


def confident_row_errors(backend: str, dtype: torch.dtype, device="cpu") -> dict:
    """Relative errors of the CE values and of their gradients (student: dz_s; head: db, which sums each
    class over the batch) against float64 math on the same dtype-rounded inputs. Label smoothing 0 and
    every other term weighted 0, so each total is one CE and its gradient is (softmax - onehot) / rows."""
    g = torch.Generator().manual_seed(5)
    y = torch.full((_B,), _Y, dtype=torch.long)
    logits = torch.randn(_B, _C, generator=g, dtype=torch.float64) * 0.1
    logits[:, _Y] += _LIFT
    args = {"x_student": torch.randn(_B, _DP, generator=g), "x_teacher": torch.randn(_B, _DT, generator=g),
            "weight": torch.randn(_N * _C, _DP + _DT, generator=g) * 0.02,
            "bias": torch.randn(_N * _C, generator=g) * 0.02,
            "teacher_logits": logits, "student_logits": logits.flip(0)}
    ours = {k: v.to(dtype).to(device) for k, v in args.items()}  # the inputs, rounded once to dtype
    exact = {k: v.double() for k, v in ours.items()}             # the same values, for the float64 math
    for k in ("x_student", "weight", "bias", "student_logits"):
        ours[k].requires_grad_(True)

    cfg = HCDLossConfig(label_smoothing=0.0, kd_weight=0.0)
    total, parts = student_loss(ours["student_logits"], ours["teacher_logits"], y.to(device), cfg, backend=backend)
    (total * _G).backward()
    p = torch.softmax(exact["student_logits"], -1)
    want_ce = -torch.log(p[:, _Y]).mean()
    want_dz = _G * (p - torch.nn.functional.one_hot(y, _C)) / _B
    errors = {"student ce": _rel(parts["ce"], want_ce), "student dz_s": _rel(ours["student_logits"].grad, want_dz)}

    cfg = HCDLossConfig(n_sublogits=_N, label_smoothing=0.0, sublogit_kl_weight=0.0, ol_weight=0.0)
    total, parts = hcd_head_loss(*(ours[k] for k in ("x_student", "x_teacher", "weight", "bias", "teacher_logits",
                                                    "student_logits")), y.to(device), cfg, backend=backend)
    (total * _G).backward()
    w = exact["weight"]
    z = exact["x_student"] @ w[:, :_DP].t() + exact["x_teacher"] @ w[:, _DP:].t() + exact["bias"]
    fused = cfg.student_scale * z.view(_B, _N, _C) + cfg.teacher_scale * exact["teacher_logits"].unsqueeze(1)
    p = torch.softmax(fused, -1)
    want_ce = -torch.log(p[..., _Y]).mean()
    want_db = _G * cfg.student_scale * (p - torch.nn.functional.one_hot(y, _C).unsqueeze(1)).sum(0) / (_B * _N)
    errors.update({"head ce": _rel(parts["ce"], want_ce), "head db": _rel(ours["bias"].grad, want_db.reshape(-1))})
    return errors


def _rel(got, want):
    """max over elements of |got - want| / |want|."""
    return ((got.double().cpu() - want) / want).abs().max().item()
