"""The HCD losses behind one API: hcd_head_loss (one stage's head) and student_loss (CE + KD).

backend: "eager" (hcd.kernels.reference, the numerics ground truth), "compile" (torch.compile of the same
functions), "triton" (the fused kernels; on CPU tensors only under TRITON_INTERPRET=1), or "auto"
(triton on CUDA tensors, eager elsewhere).

Teacher-side gradients (teacher_logits, x_teacher) are test-only paths of the fused kernels: the engine
never asks for them (the teacher is frozen). The kernels compute them only when those inputs require grad
(a constexpr branch of each row kernel, the x_teacher columns of the head's dX GEMM), so they cost nothing
otherwise; they are kept so that every backend returns every input's gradient (the API contract) and so
that tests/kernels and `hcd verify` check the fused kernels against the reference's full gradient.
"""
import functools
import importlib
import os

import torch

from hcd.kernels import reference
from hcd.kernels.config import HCDLossConfig
from hcd.kernels.validation import check_head_inputs, check_student_inputs

__all__ = ["hcd_head_loss", "student_loss", "HCDLossConfig", "BACKENDS", "resolve_backend"]

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
