"""The HCD losses behind one API: hcd_loss (the whole step: every stage's head and the student terms, the
engine's path), hcd_head_loss (one stage's head) and student_loss (CE + KD); and the baselines of
docs/method.md, Baselines: dkd_loss, dist_loss, ofa_loss (references: hcd.kernels.baselines_reference).

target, in every HCD loss: (B,) int64 class labels, or a (B, C) float soft target (mixup / cutmix
probabilities, any float dtype, read as fp32 by the kernels): CE_eps = -sum_c ((1-eps) t_c + eps/C) log p_c,
the orthogonality mask at argmax(t), ties to the first maximal class (docs/method.md, Soft targets). A
one-hot t gives the label path's results exactly.

backend: "eager" (hcd.kernels.reference, the numerics ground truth), "compile" (torch.compile of the same
functions), "triton" (the fused kernels; on CPU tensors only under TRITON_INTERPRET=1), or "auto"
(triton on CUDA tensors, eager elsewhere).

Teacher-side gradients (teacher_logits, x_teacher) are test-only paths of the fused kernels: the engine
never asks for them (the teacher is frozen). The kernels compute them only when those inputs require grad
(a constexpr branch of each row kernel, the x_teacher columns of the head's dX GEMM), so they cost nothing
otherwise; they are kept so that every backend returns every input's gradient (the API contract) and so
that tests/kernels and `hcd verify` check the fused kernels against the reference's full gradient.
hcd_loss, the engine's one call, has no such path: it refuses a teacher_logits or x_teacher that requires
grad (a ValueError naming it, on every backend), so its kernels never carry teacher-gradient code.
The baselines (dkd_loss, dist_loss, ofa_loss) do the same: the teacher is frozen in every baseline, so a
teacher_logits that requires grad while autograd records is a ValueError; gradients flow to the first
argument only.
"""
import functools
import importlib
import os

import torch

from hcd.kernels import baselines_reference, reference
from hcd.kernels.config import HCDLossConfig
from hcd.kernels.validation import check_baseline_inputs, check_head_inputs, check_loss_inputs, check_student_inputs

__all__ = ["hcd_loss", "hcd_head_loss", "student_loss", "dkd_loss", "dist_loss", "ofa_loss", "HCDLossConfig",
           "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "eager", "compile", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend and refuse combinations that cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "eager"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend: 'triton' requested but the triton package is not importable")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import "
                             "(the Triton interpreter); use backend='eager' or CUDA tensors")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend: 'triton' does not run on {device.type} tensors")
    return backend


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _parts(ce, second, name, **extra):
    parts = {"ce": ce.detach(), name: second.detach()}
    parts.update({k: v.detach() for k, v in extra.items()})
    return parts


def hcd_head_loss(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target,
                  cfg: HCDLossConfig, backend: str = "auto"):
    """One stage's HCD head: total = ce_weight*L_sce + sublogit_kl_weight*L_skl + ol_weight*L_ol.

    Returns (total, parts) with parts = {"ce", "kl", "ol"} as detached 0-dim tensors.
    """
    check_head_inputs(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg)
    args = (x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg)
    backend = resolve_backend(backend, x_student.device)
    if backend == "eager":
        total, ce, kl, ol = reference.hcd_head_loss_eager(*args)
    elif backend == "compile":
        total, ce, kl, ol = _compiled(reference.hcd_head_loss_eager)(*args)
    else:
        from hcd.kernels.hcd_head import hcd_head_loss_triton
        total, ce, kl, ol = hcd_head_loss_triton(*args)
    return total, _parts(ce, kl, "kl", ol=ol)


def student_loss(student_logits, teacher_logits, target, cfg: HCDLossConfig, backend: str = "auto"):
    """Student terms: total = ce_weight*L_ce + kd_weight*L_kd; parts = {"ce", "kd"} (detached)."""
    check_student_inputs(student_logits, teacher_logits, target)
    args = (student_logits, teacher_logits, target, cfg)
    backend = resolve_backend(backend, student_logits.device)
    if backend == "eager":
        total, ce, kd = reference.student_loss_eager(*args)
    elif backend == "compile":
        total, ce, kd = _compiled(reference.student_loss_eager)(*args)
    else:
        from hcd.kernels.student import student_loss_triton
        total, ce, kd = student_loss_triton(*args)
    return total, _parts(ce, kd, "kd")


def hcd_loss(x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg: HCDLossConfig,
             backend: str = "auto", stages=None):
    """The whole loss of docs/method.md (Losses, Total) in one call: S stages' heads and the student terms,
    total = ce_weight*(L_ce + sum_i L_sce,i) + kd_weight*L_kd + sublogit_kl_weight*sum_i L_skl,i
    + ol_weight*sum_i L_ol,i.

    x_students: an (S, B, Dp) tensor or a sequence of S (B, Dp) tensors; x_teacher (B, Dt), Dt may be 0;
    weights (S, n*C, Dp+Dt) (nn.Linear layout per stage, columns [0:Dp] multiply x_students[s]); biases
    (S, n*C) or None; teacher/student logits (B, C); target (B,) int64 or (B, C) soft. The teacher side is frozen: a
    teacher_logits or x_teacher that requires grad is a ValueError. stages: the stage numbers that name
    the per-stage parts (default 1..S). Returns (total, parts) with parts detached 0-dim tensors: the
    unweighted "ce", "kd", "sce", "skl", "ol" (stage terms summed over the stages) and per stage
    "sce<i>", "skl<i>", "ol<i>".
    """
    S = check_loss_inputs(x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg,
                          stages)
    args = (x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg)
    backend = resolve_backend(backend, x_teacher.device)
    if backend == "triton":
        from hcd.kernels.hcd_step import hcd_loss_triton
        total, values = hcd_loss_triton(*args)
    else:
        fn = reference.hcd_loss_eager if backend == "eager" else _compiled(reference.hcd_loss_eager)
        total, values = fn(*args)
        values = [v.detach() for v in values]
    return total, dict(zip(loss_part_names(tuple(stages) if stages is not None else S), values))


@functools.lru_cache(maxsize=None)
def loss_part_names(stages) -> tuple:
    """hcd_loss's part names, in the order of its values: stages is a tuple of stage numbers or a count S."""
    stages = tuple(range(1, stages + 1)) if isinstance(stages, int) else stages
    return ("ce", "kd", "sce", "skl", "ol") + tuple(f"{term}{i}" for term in ("sce", "skl", "ol") for i in stages)


def _baseline(loss, args, params, backend):
    """Run baseline `loss` ("dkd" | "dist" | "ofa") on its validated args on the chosen backend."""
    backend = resolve_backend(backend, args[0].device)
    if backend == "triton":
        from hcd.kernels import baselines
        return getattr(baselines, f"{loss}_loss_triton")(*args, *params)
    fn = getattr(baselines_reference, f"{loss}_loss_eager")
    return (fn if backend == "eager" else _compiled(fn))(*args, *params)


def dkd_loss(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, temperature=4.0, backend="auto"):
    """DKD (Zhao et al., CVPR 2022): alpha*TCKD + beta*NCKD, each T^2-scaled, batch mean; a 0-dim tensor.

    student_logits, teacher_logits (B, C), C >= 2, the teacher frozen (not requiring grad); target (B,) int64
    labels or (B, C) probabilities (their argmax is the label, as the reference code does)."""
    y = check_baseline_inputs("dkd_loss", "student_logits", student_logits, teacher_logits, target,
                              alpha=alpha, beta=beta, temperature=temperature)
    return _baseline("dkd", (student_logits, teacher_logits, y), (alpha, beta, temperature), backend)


def dist_loss(student_logits, teacher_logits, beta=1.0, gamma=1.0, temperature=1.0, backend="auto"):
    """DIST (Huang et al., NeurIPS 2022): T^2 (beta (1 - mean row Pearson) + gamma (1 - mean column Pearson))
    of softmax(z / T); a 0-dim tensor. Logits (B, C), C >= 2, the teacher frozen."""
    check_baseline_inputs("dist_loss", "student_logits", student_logits, teacher_logits, None,
                          beta=beta, gamma=gamma, temperature=temperature)
    return _baseline("dist", (student_logits, teacher_logits), (beta, gamma, temperature), backend)


def ofa_loss(logits, teacher_logits, target, eps=1.0, temperature=1.0, backend="auto"):
    """OFA (Hao et al., NeurIPS 2023): mean_b -sum_c ((p_t + 1_y)^eps - 1_y)_c log p_c, p = softmax(logits / T),
    p_t = softmax(teacher_logits / T), no T^2 (as the reference); a 0-dim tensor. logits is a stage head's
    or the student's (B, C), C >= 2; the teacher frozen; target as in dkd_loss."""
    y = check_baseline_inputs("ofa_loss", "logits", logits, teacher_logits, target, eps=eps, temperature=temperature)
    return _baseline("ofa", (logits, teacher_logits, y), (eps, temperature), backend)
