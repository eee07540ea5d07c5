"""Input checks shared by every backend: bad input is a ValueError naming the argument, never a kernel crash."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name, t, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not one of float16/bfloat16/float32/float64")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: dtype {t.dtype} differs from the other inputs' {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: device {t.device} differs from the other inputs' {device}")


def _check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        want = "(" + ", ".join(str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def check_target(target, batch, num_classes, device):
    """Labels: (B,) int64 on the same device; the range is checked on CPU only (no host sync on CUDA).

    On CUDA an out-of-range label is not caught here; every backend turns its rows into NaN losses
    instead of reading out of bounds, so a bad label shows up as a non-finite loss.
    """
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise ValueError(f"target: dtype {target.dtype}, expected torch.int64 class indices")
    if target.device != device:
        raise ValueError(f"target: device {target.device} differs from the other inputs' {device}")
    _check_shape("target", target, (batch,))
    if target.device.type == "cpu" and batch > 0:
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target: label {bad} outside [0, {num_classes})")


def check_student_inputs(student_logits, teacher_logits, target):
    _check_float("student_logits", student_logits, None, None)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits: expected 2-D (B, C), got shape {tuple(student_logits.shape)}")
    dtype, device = student_logits.dtype, student_logits.device
    _check_float("teacher_logits", teacher_logits, dtype, device)
    _check_shape("teacher_logits", teacher_logits, student_logits.shape)
    check_target(target, student_logits.shape[0], student_logits.shape[1], device)


def check_head_inputs(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg):
    """Validate hcd_head_loss inputs; returns (B, C, n, Dp, Dt)."""
    _check_float("x_student", x_student, None, None)
    if x_student.dim() != 2:
        raise ValueError(f"x_student: expected 2-D (B, Dp), got shape {tuple(x_student.shape)}")
    dtype, device = x_student.dtype, x_student.device
    B, Dp = x_student.shape
    _check_float("x_teacher", x_teacher, dtype, device)
    if x_teacher.dim() != 2 or x_teacher.shape[0] != B:
        raise ValueError(f"x_teacher: expected shape ({B}, Dt), got {tuple(x_teacher.shape)}")
    Dt = x_teacher.shape[1]
    _check_float("teacher_logits", teacher_logits, dtype, device)
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] != B:
        raise ValueError(f"teacher_logits: expected shape ({B}, C), got {tuple(teacher_logits.shape)}")
    C = teacher_logits.shape[1]
    _check_float("student_logits", student_logits, dtype, device)
    _check_shape("student_logits", student_logits, (B, C))
    n = cfg.n_sublogits
    # Parameters may stay float32 (master weights under autocast) while activations are 16-bit.
    _check_float("weight", weight, None, device)
    if weight.dtype not in (dtype, torch.float32) or (dtype == torch.float64) != (weight.dtype == torch.float64):
        raise ValueError(f"weight: dtype {weight.dtype} must be {dtype} or float32 for {dtype} activations")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-D (n*C, Dp+Dt), got shape {tuple(weight.shape)}")
    if weight.shape[0] != n * C:
        raise ValueError(f"weight: {weight.shape[0]} rows but n_sublogits*C = {n}*{C} = {n * C}")
    if weight.shape[1] != Dp + Dt:
        raise ValueError(f"weight: {weight.shape[1]} columns but Dp+Dt = {Dp}+{Dt} = {Dp + Dt}")
    if bias is not None:
        _check_float("bias", bias, weight.dtype, device)
        _check_shape("bias", bias, (n * C,))
    check_target(target, B, C, device)
    return B, C, n, Dp, Dt
